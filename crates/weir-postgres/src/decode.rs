//! Decoding a `COPY … TO STDOUT (FORMAT binary)` stream straight into Arrow builders.
//!
//! Bytes arrive in arbitrary chunks; tuples may straddle them. The decoder keeps the
//! unconsumed tail, appends each complete tuple to the column builders, and hands out a
//! `RecordBatch` every `batch_rows` rows. Values are appended in place: no per-row heap
//! allocation (strings go straight into the builder's buffer, numerics are decoded into an
//! i128, uuids are formatted on the stack).

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use bytes::{Buf, BytesMut};

use crate::copy::{PG_EPOCH_DAYS, PG_EPOCH_MICROS};
use crate::types::{PgColumn, PgType, arrow_schema};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{context}: not a COPY BINARY stream (bad signature)")]
    Signature { context: String },
    #[error("{context}: tuple has {got} fields, expected {expected}")]
    FieldCount { context: String, got: i16, expected: usize },
    #[error("{context}: column {column}: {message}")]
    Value { context: String, column: String, message: String },
    #[error("{context}: the stream ended in the middle of a tuple")]
    Truncated { context: String },
}

enum Col {
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Dec(Decimal128Builder, i8),
    Str(StringBuilder),
    Uuid(StringBuilder),
    Jsonb(StringBuilder),
    Bin(BinaryBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

impl Col {
    fn new(col: &PgColumn, cap: usize) -> Self {
        match col.ty {
            PgType::Int2 => Self::I16(Int16Builder::with_capacity(cap)),
            PgType::Int4 => Self::I32(Int32Builder::with_capacity(cap)),
            PgType::Int8 => Self::I64(Int64Builder::with_capacity(cap)),
            PgType::Float4 => Self::F32(Float32Builder::with_capacity(cap)),
            PgType::Float8 => Self::F64(Float64Builder::with_capacity(cap)),
            PgType::Bool => Self::Bool(BooleanBuilder::with_capacity(cap)),
            PgType::Numeric { precision, scale } => Self::Dec(
                Decimal128Builder::with_capacity(cap).with_precision_and_scale(precision, scale).expect("validated"),
                scale,
            ),
            PgType::Text | PgType::Json => Self::Str(StringBuilder::with_capacity(cap, cap * 16)),
            PgType::Uuid => Self::Uuid(StringBuilder::with_capacity(cap, cap * 36)),
            PgType::Jsonb => Self::Jsonb(StringBuilder::with_capacity(cap, cap * 32)),
            PgType::Bytea => Self::Bin(BinaryBuilder::with_capacity(cap, cap * 16)),
            PgType::Date => Self::Date(Date32Builder::with_capacity(cap)),
            PgType::Timestamptz => Self::Ts(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone("UTC")),
            PgType::Timestamp => Self::Ts(TimestampMicrosecondBuilder::with_capacity(cap)),
        }
    }

    fn null(&mut self) {
        match self {
            Self::I16(b) => b.append_null(),
            Self::I32(b) => b.append_null(),
            Self::I64(b) => b.append_null(),
            Self::F32(b) => b.append_null(),
            Self::F64(b) => b.append_null(),
            Self::Bool(b) => b.append_null(),
            Self::Dec(b, _) => b.append_null(),
            Self::Str(b) | Self::Uuid(b) | Self::Jsonb(b) => b.append_null(),
            Self::Bin(b) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Ts(b) => b.append_null(),
        }
    }

    /// Appends one non-NULL value in the type's binary send format.
    fn value(&mut self, v: &[u8]) -> Result<(), String> {
        let fixed = |n: usize| if v.len() == n { Ok(()) } else { Err(format!("expected {n} bytes, got {}", v.len())) };
        match self {
            Self::I16(b) => {
                fixed(2)?;
                b.append_value(i16::from_be_bytes([v[0], v[1]]));
            }
            Self::I32(b) => {
                fixed(4)?;
                b.append_value(i32::from_be_bytes(v.try_into().expect("4 bytes")));
            }
            Self::I64(b) => {
                fixed(8)?;
                b.append_value(i64::from_be_bytes(v.try_into().expect("8 bytes")));
            }
            Self::F32(b) => {
                fixed(4)?;
                b.append_value(f32::from_be_bytes(v.try_into().expect("4 bytes")));
            }
            Self::F64(b) => {
                fixed(8)?;
                b.append_value(f64::from_be_bytes(v.try_into().expect("8 bytes")));
            }
            Self::Bool(b) => {
                fixed(1)?;
                b.append_value(v[0] != 0);
            }
            Self::Dec(b, scale) => b.append_value(decode_numeric(v, *scale)?),
            Self::Str(b) => b.append_value(std::str::from_utf8(v).map_err(|e| format!("invalid UTF-8: {e}"))?),
            Self::Jsonb(b) => {
                // jsonb's binary format: a version byte (1), then the text.
                match v.split_first() {
                    Some((1, text)) => {
                        b.append_value(std::str::from_utf8(text).map_err(|e| format!("invalid UTF-8: {e}"))?)
                    }
                    _ => return Err("unknown jsonb binary version".to_string()),
                }
            }
            Self::Uuid(b) => {
                fixed(16)?;
                let mut out = [0u8; 36];
                let hex = b"0123456789abcdef";
                let mut j = 0;
                for (i, byte) in v.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        out[j] = b'-';
                        j += 1;
                    }
                    out[j] = hex[(byte >> 4) as usize];
                    out[j + 1] = hex[(byte & 15) as usize];
                    j += 2;
                }
                b.append_value(std::str::from_utf8(&out).expect("ascii"));
            }
            Self::Bin(b) => b.append_value(v),
            Self::Date(b) => {
                fixed(4)?;
                let d = i32::from_be_bytes(v.try_into().expect("4 bytes"));
                if d == i32::MAX || d == i32::MIN {
                    return Err("'infinity' dates have no Arrow value".to_string());
                }
                b.append_value(d + PG_EPOCH_DAYS);
            }
            Self::Ts(b) => {
                fixed(8)?;
                let t = i64::from_be_bytes(v.try_into().expect("8 bytes"));
                if t == i64::MAX || t == i64::MIN {
                    return Err("'infinity' timestamps have no Arrow value".to_string());
                }
                b.append_value(t + PG_EPOCH_MICROS);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::I16(b) => Arc::new(b.finish()),
            Self::I32(b) => Arc::new(b.finish()),
            Self::I64(b) => Arc::new(b.finish()),
            Self::F32(b) => Arc::new(b.finish()),
            Self::F64(b) => Arc::new(b.finish()),
            Self::Bool(b) => Arc::new(b.finish()),
            Self::Dec(b, _) => Arc::new(b.finish()),
            Self::Str(b) | Self::Uuid(b) | Self::Jsonb(b) => Arc::new(b.finish()),
            Self::Bin(b) => Arc::new(b.finish()),
            Self::Date(b) => Arc::new(b.finish()),
            Self::Ts(b) => Arc::new(b.finish()),
        }
    }
}

/// A numeric in binary send format as an i128 at `scale`. Exact: a value with more
/// fractional digits than `scale`, NaN or ±Infinity is an error.
pub fn decode_numeric(v: &[u8], scale: i8) -> Result<i128, String> {
    if v.len() < 8 {
        return Err("numeric shorter than its header".to_string());
    }
    let ndigits = u16::from_be_bytes([v[0], v[1]]) as usize;
    let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    if v.len() != 8 + 2 * ndigits {
        return Err("numeric length does not match its digit count".to_string());
    }
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN has no decimal value".to_string()),
        _ => return Err("±Infinity has no decimal value".to_string()),
    }
    let overflow = || "numeric does not fit Decimal128".to_string();
    // Each base-10000 digit d at position i is worth d × 10^(4·(weight − i) + scale) in the
    // unscaled result; summing those (instead of Horner's rule over all digits) never builds
    // an intermediate larger than the result.
    let mut unscaled: i128 = 0;
    for i in 0..ndigits {
        let d = i16::from_be_bytes([v[8 + 2 * i], v[9 + 2 * i]]);
        if !(0..10_000).contains(&d) {
            return Err("numeric digit out of range".to_string());
        }
        let d = i128::from(d);
        let exp = 4 * (weight - i as i32) + i32::from(scale);
        let part = if exp >= 0 {
            if d == 0 {
                0
            } else {
                10i128.checked_pow(exp as u32).and_then(|p| d.checked_mul(p)).ok_or_else(overflow)?
            }
        } else {
            let p = 10i128.checked_pow((-exp) as u32).unwrap_or(i128::MAX);
            if d % p != 0 {
                return Err(format!("numeric has more than {scale} fractional digits"));
            }
            d / p
        };
        unscaled = unscaled.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(if sign == 0x4000 { -unscaled } else { unscaled })
}

/// Streaming decoder for one COPY BINARY stream.
pub struct CopyDecoder {
    context: String,
    columns: Vec<PgColumn>,
    schema: SchemaRef,
    builders: Vec<Col>,
    batch_rows: usize,
    rows_in_batch: usize,
    rows_total: u64,
    buf: BytesMut,
    header_done: bool,
    finished: bool,
}

impl std::fmt::Debug for CopyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyDecoder").field("context", &self.context).field("rows", &self.rows_total).finish()
    }
}

impl CopyDecoder {
    /// `context` names the table or chunk in errors.
    pub fn new(context: impl Into<String>, columns: Vec<PgColumn>, batch_rows: usize) -> Self {
        let schema = arrow_schema(&columns);
        let builders = columns.iter().map(|c| Col::new(c, batch_rows)).collect();
        Self {
            context: context.into(),
            columns,
            schema,
            builders,
            batch_rows: batch_rows.max(1),
            rows_in_batch: 0,
            rows_total: 0,
            buf: BytesMut::new(),
            header_done: false,
            finished: false,
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn rows(&self) -> u64 {
        self.rows_total
    }

    /// Feeds bytes; full batches are pushed to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        if self.header_done && self.buf.is_empty() {
            // The usual case: PostgreSQL sends one CopyData message per row, so the tuples are
            // decoded straight from the message; only a partial tail is kept.
            let used = self.decode(data, out)?;
            self.buf.extend_from_slice(&data[used..]);
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        if !self.header_done {
            if self.buf.len() < 19 {
                return Ok(());
            }
            if &self.buf[..11] != SIGNATURE {
                return Err(DecodeError::Signature { context: self.context.clone() });
            }
            let ext = u32::from_be_bytes([self.buf[15], self.buf[16], self.buf[17], self.buf[18]]) as usize;
            if self.buf.len() < 19 + ext {
                return Ok(());
            }
            self.buf.advance(19 + ext);
            self.header_done = true;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let used = self.decode(&buf, out);
        if let Ok(n) = used {
            buf.advance(n);
        }
        self.buf = buf;
        used.map(drop)
    }

    /// Decodes the complete tuples at the start of `b` (and the trailer); returns the bytes
    /// used.
    fn decode(&mut self, b: &[u8], out: &mut Vec<RecordBatch>) -> Result<usize, DecodeError> {
        let mut pos = 0;
        while !self.finished {
            match self.tuple_len(&b[pos..])? {
                None => break,
                Some(0) => {
                    // Trailer (-1 field count).
                    pos += 2;
                    self.finished = true;
                }
                Some(len) => {
                    self.append_tuple(&b[pos..pos + len])?;
                    pos += len;
                    if self.rows_in_batch >= self.batch_rows {
                        out.push(self.take_batch());
                    }
                }
            }
        }
        Ok(pos)
    }

    /// Ends the stream; the last partial batch, if any, is pushed to `out`.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        if !self.finished || !self.buf.is_empty() {
            return Err(DecodeError::Truncated { context: self.context.clone() });
        }
        if self.rows_in_batch > 0 {
            out.push(self.take_batch());
        }
        Ok(())
    }

    /// The byte length of the next complete tuple, Some(0) for the trailer, None when more
    /// bytes are needed.
    fn tuple_len(&self, b: &[u8]) -> Result<Option<usize>, DecodeError> {
        if b.len() < 2 {
            return Ok(None);
        }
        let n = i16::from_be_bytes([b[0], b[1]]);
        if n == -1 {
            return Ok(Some(0));
        }
        if n as usize != self.columns.len() {
            return Err(DecodeError::FieldCount {
                context: self.context.clone(),
                got: n,
                expected: self.columns.len(),
            });
        }
        let mut pos = 2;
        for _ in 0..n {
            if b.len() < pos + 4 {
                return Ok(None);
            }
            let len = i32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
            pos += 4 + len.max(0) as usize;
        }
        Ok(if b.len() >= pos { Some(pos) } else { None })
    }

    /// Appends one row given field by field in the types' binary send format (None for
    /// NULL), as pgoutput delivers them: no COPY stream is built for it. Full batches are
    /// pushed to `out`; [`CopyDecoder::flush`] pushes the rest.
    pub fn push_row<'a>(
        &mut self,
        fields: impl IntoIterator<Item = Option<&'a [u8]>>,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let mut fields = fields.into_iter();
        for (i, col) in self.builders.iter_mut().enumerate() {
            let field = fields.next().ok_or_else(|| DecodeError::FieldCount {
                context: self.context.clone(),
                got: i as i16,
                expected: self.columns.len(),
            })?;
            match field {
                None => col.null(),
                Some(v) => col.value(v).map_err(|message| DecodeError::Value {
                    context: self.context.clone(),
                    column: self.columns[i].name.clone(),
                    message,
                })?,
            }
        }
        let extra = fields.count();
        if extra > 0 {
            return Err(DecodeError::FieldCount {
                context: self.context.clone(),
                got: i16::try_from(self.columns.len() + extra).unwrap_or(i16::MAX),
                expected: self.columns.len(),
            });
        }
        self.rows_in_batch += 1;
        self.rows_total += 1;
        if self.rows_in_batch >= self.batch_rows {
            out.push(self.take_batch());
        }
        Ok(())
    }

    /// Pushes the rows given by [`CopyDecoder::push_row`] since the last full batch.
    pub fn flush(&mut self, out: &mut Vec<RecordBatch>) {
        if self.rows_in_batch > 0 {
            out.push(self.take_batch());
        }
    }

    fn append_tuple(&mut self, t: &[u8]) -> Result<(), DecodeError> {
        let mut pos = 2;
        for (i, col) in self.builders.iter_mut().enumerate() {
            let len = i32::from_be_bytes([t[pos], t[pos + 1], t[pos + 2], t[pos + 3]]);
            pos += 4;
            if len < 0 {
                col.null();
            } else {
                let v = &t[pos..pos + len as usize];
                pos += len as usize;
                col.value(v).map_err(|message| DecodeError::Value {
                    context: self.context.clone(),
                    column: self.columns[i].name.clone(),
                    message,
                })?;
            }
        }
        self.rows_in_batch += 1;
        self.rows_total += 1;
        Ok(())
    }

    fn take_batch(&mut self) -> RecordBatch {
        // Fresh builders at full capacity: a finished builder starts again from empty buffers,
        // which would regrow (and copy) by doubling through every batch.
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .zip(&self.columns)
            .map(|(b, c)| std::mem::replace(b, Col::new(c, self.batch_rows)).finish())
            .collect();
        self.rows_in_batch = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).expect("builders match the schema")
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, Int64Type, TimestampMicrosecondType};

    use super::*;
    use crate::copy::CopyBinaryWriter;

    #[test]
    fn numerics_round_trip_through_the_encoder() {
        for (unscaled, scale) in [
            (0i128, 2u16),
            (5, 2),
            (-123_456, 2),
            (999_999_999_999, 2),
            (1, 8),
            (4_500_000, 8),
            (10i128.pow(38) - 1, 0),
            (-(10i128.pow(37)), 5),
            (10i128.pow(38) - 1, 10),
            (-(10i128.pow(38) - 1), 10),
            (1, 38),
        ] {
            let mut w = CopyBinaryWriter::default();
            w.numeric(unscaled, scale);
            let bytes = w.take();
            assert_eq!(decode_numeric(&bytes[4..], scale as i8), Ok(unscaled), "{unscaled} scale {scale}");
        }
        // 1.5 read at scale 0 is not exact.
        let mut w = CopyBinaryWriter::default();
        w.numeric(15, 1);
        assert!(decode_numeric(&w.take()[4..], 0).is_err());
        // 1.5 read at scale 3 → 1500.
        let mut w = CopyBinaryWriter::default();
        w.numeric(15, 1);
        assert_eq!(decode_numeric(&w.take()[4..], 3), Ok(1500));
        assert!(decode_numeric(&[0, 0, 0, 0, 0xC0, 0, 0, 0], 2).unwrap_err().contains("NaN"));
    }

    /// id, title, price, at: a key, text with NULLs, a numeric, a timestamp.
    fn listing_columns() -> Vec<PgColumn> {
        vec![
            PgColumn { name: "id".into(), ty: PgType::Int8, nullable: false },
            PgColumn { name: "title".into(), ty: PgType::Text, nullable: true },
            PgColumn { name: "price".into(), ty: PgType::Numeric { precision: 12, scale: 2 }, nullable: true },
            PgColumn { name: "at".into(), ty: PgType::Timestamptz, nullable: false },
        ]
    }

    #[test]
    fn rows_pushed_field_by_field_decode_like_the_stream() {
        let mut columns = listing_columns();
        columns.truncate(3);
        // Each field written alone: its length prefix (-1 for NULL), then its bytes.
        let fields_of = |i: i64| -> Vec<Option<Vec<u8>>> {
            let mut w = CopyBinaryWriter::default();
            w.i64(i);
            if i % 3 == 0 {
                w.null()
            } else {
                w.text(&format!("car {i} ✓"))
            };
            if i % 4 == 0 {
                w.null()
            } else {
                w.numeric(i128::from(i) * -7, 2)
            };
            let b = w.take();
            let mut pos = 0;
            (0..3)
                .map(|_| {
                    let len = i32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
                    pos += 4;
                    (len >= 0).then(|| {
                        pos += len as usize;
                        b[pos - len as usize..pos].to_vec()
                    })
                })
                .collect()
        };
        let mut pushed = CopyDecoder::new("t", columns.clone(), 40);
        let mut w = CopyBinaryWriter::default();
        let mut out = Vec::new();
        for i in 0..100i64 {
            let fields = fields_of(i);
            w.row(3);
            for f in &fields {
                match f {
                    Some(v) => w.raw(v),
                    None => w.null(),
                };
            }
            pushed.push_row(fields.iter().map(|f| f.as_deref()), &mut out).unwrap();
        }
        pushed.flush(&mut out);
        assert_eq!(out.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), vec![40, 40, 20]);
        let mut stream = CopyBinaryWriter::header().to_vec();
        stream.extend_from_slice(&w.take());
        stream.extend_from_slice(&CopyBinaryWriter::trailer());
        let mut streamed = CopyDecoder::new("t", columns.clone(), 1000);
        let mut expected = Vec::new();
        streamed.feed(&stream, &mut expected).unwrap();
        streamed.finish(&mut expected).unwrap();
        let all = arrow::compute::concat_batches(&pushed.schema(), &out).unwrap();
        assert_eq!(all, expected[0]);
        assert_eq!(all.column(1).null_count(), 34);

        // A row of the wrong width is an error naming the counts.
        let mut d = CopyDecoder::new("t", columns, 10);
        let e = d.push_row([Some(&[0u8; 8][..])], &mut out).unwrap_err().to_string();
        assert!(e.contains("has 1 fields, expected 3"), "{e}");
        let e = d.push_row([None, None, None, None, None], &mut out).unwrap_err().to_string();
        assert!(e.contains("has 5 fields, expected 3"), "{e}");
    }

    #[test]
    fn decodes_across_arbitrary_chunk_boundaries() {
        let columns = listing_columns();
        let mut w = CopyBinaryWriter::default();
        let titles = ["a\tb\n\"c\"", "", "🚗"];
        for i in 0..1000i64 {
            w.row(4).i64(i);
            if i % 7 == 0 {
                w.null()
            } else {
                w.text(titles[i as usize % 3])
            };
            if i % 5 == 0 {
                w.null()
            } else {
                w.numeric(i128::from(i) * 101, 2)
            };
            w.timestamptz_unix_micros(1_700_000_000_000_000 + i);
        }
        let mut stream = CopyBinaryWriter::header().to_vec();
        stream.extend_from_slice(&w.take());
        stream.extend_from_slice(&CopyBinaryWriter::trailer());
        for chunk in [1usize, 3, 7, 64, 4096, stream.len()] {
            let mut d = CopyDecoder::new("t", columns.clone(), 300);
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                d.feed(piece, &mut out).unwrap();
            }
            d.finish(&mut out).unwrap();
            assert_eq!(out.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), vec![300, 300, 300, 100], "chunk {chunk}");
            let all = arrow::compute::concat_batches(&d.schema(), &out).unwrap();
            let ids = all.column(0).as_primitive::<Int64Type>();
            let titles_col = all.column(1).as_string::<i32>();
            let prices = all.column(2).as_primitive::<Decimal128Type>();
            let at = all.column(3).as_primitive::<TimestampMicrosecondType>();
            for i in 0..1000usize {
                assert_eq!(ids.value(i), i as i64);
                assert_eq!(titles_col.is_null(i), i % 7 == 0);
                if i % 7 != 0 {
                    assert_eq!(titles_col.value(i), titles[i % 3]);
                }
                assert_eq!(prices.is_null(i), i % 5 == 0);
                if i % 5 != 0 {
                    assert_eq!(prices.value(i), i as i128 * 101);
                }
                assert_eq!(at.value(i), 1_700_000_000_000_000 + i as i64);
            }
        }
        // A stream cut short is an error, not a silent partial result.
        let mut d = CopyDecoder::new("t", columns, 300);
        let mut out = Vec::new();
        d.feed(&stream[..stream.len() - 10], &mut out).unwrap();
        assert!(d.finish(&mut out).is_err());
    }
}
