//! The COPY BINARY wire format: encoding rows for `COPY … FROM STDIN (FORMAT binary)`.
//!
//! Layout (PostgreSQL docs, "COPY", binary format): an 11-byte signature, a 32-bit flags
//! field and a 32-bit header-extension length; then per tuple a 16-bit field count and per
//! field a 32-bit length (-1 for NULL) and the value in the type's binary send format; then
//! a 16-bit -1 trailer. All integers are network byte order.

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::conn::PgError;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from 1970-01-01 to 2000-01-01, the PostgreSQL epoch.
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
pub const PG_EPOCH_DAYS: i32 = 10_957;

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;

/// Appends COPY BINARY tuples to a buffer. The header and trailer are separate so that a
/// stream can be produced in independently encoded chunks.
#[derive(Debug, Default)]
pub struct CopyBinaryWriter {
    buf: BytesMut,
}

impl CopyBinaryWriter {
    pub fn with_capacity(cap: usize) -> Self {
        Self { buf: BytesMut::with_capacity(cap) }
    }

    /// Signature, flags (0) and an empty header extension.
    pub fn header() -> Bytes {
        let mut b = BytesMut::with_capacity(19);
        b.put_slice(SIGNATURE);
        b.put_i32(0);
        b.put_i32(0);
        b.freeze()
    }

    pub fn trailer() -> Bytes {
        Bytes::from_static(&[0xff, 0xff])
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes the encoded tuples, leaving the writer empty.
    pub fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buf.put_i16(fields);
        self
    }

    /// A field already in its type's binary send format (e.g. from pgoutput).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.put_i32(v.len() as i32);
        self.buf.put_slice(v);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.put_i32(-1);
        self
    }

    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i32(2);
        self.buf.put_i16(v);
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32(4);
        self.buf.put_i32(v);
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(v));
        self
    }

    /// text, varchar, bpchar (the server pads char(n) itself).
    pub fn text(&mut self, v: &str) -> &mut Self {
        self.buf.put_i32(i32::try_from(v.len()).expect("text value over 2 GiB"));
        self.buf.put_slice(v.as_bytes());
        self
    }

    /// A date given as days since 1970-01-01.
    pub fn date_unix_days(&mut self, days: i32) -> &mut Self {
        self.buf.put_i32(4);
        self.buf.put_i32(days - PG_EPOCH_DAYS);
        self
    }

    /// A timestamptz given as microseconds since 1970-01-01 UTC.
    pub fn timestamptz_unix_micros(&mut self, micros: i64) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(micros - PG_EPOCH_MICROS);
        self
    }

    /// A numeric with value `unscaled / 10^scale`, sent with display scale `scale`.
    pub fn numeric(&mut self, unscaled: i128, scale: u16) -> &mut Self {
        let mut digits = [0i16; 12]; // 38 decimal digits + 3 padding = 41 → 11 groups
        let (n, weight) = numeric_digits(unscaled, scale, &mut digits);
        self.buf.put_i32(8 + 2 * n as i32);
        self.buf.put_i16(n as i16);
        self.buf.put_i16(weight);
        self.buf.put_u16(if unscaled < 0 { NUMERIC_NEG } else { NUMERIC_POS });
        self.buf.put_u16(scale);
        for d in &digits[..n] {
            self.buf.put_i16(*d);
        }
        self
    }
}

/// Base-10000 digits of `unscaled / 10^scale`, most significant first, without leading or
/// trailing zero groups; returns (count, weight of the first digit). Works on decimal digits
/// on the stack, so any i128 at any scale up to 38 is exact (no intermediate overflow).
fn numeric_digits(unscaled: i128, scale: u16, out: &mut [i16; 12]) -> (usize, i16) {
    let mut mag = unscaled.unsigned_abs();
    if mag == 0 {
        return (0, 0);
    }
    // Decimal digits, least significant first.
    let mut dec = [0u8; 40];
    let mut len = 0;
    while mag > 0 {
        dec[len] = (mag % 10) as u8;
        mag /= 10;
        len += 1;
    }
    let scale = usize::from(scale);
    let int_len = len.saturating_sub(scale);
    let lead = (4 - int_len % 4) % 4;
    let trail = (4 - scale % 4) % 4;
    // Digit k of the padded sequence [lead zeros][integer digits][scale fraction digits][trail zeros].
    let total = lead + int_len + scale + trail;
    let digit = |k: usize| -> u8 {
        // Position from the right, in the unpadded `dec` numbering.
        let from_right = total - 1 - k;
        if from_right < trail {
            return 0;
        }
        let idx = from_right - trail;
        if idx < len { dec[idx] } else { 0 }
    };
    let groups = total / 4;
    let mut weight = ((lead + int_len) / 4) as i32 - 1;
    let mut first = 0;
    let group = |g: usize| -> i16 { (0..4).fold(0i16, |acc, d| acc * 10 + i16::from(digit(4 * g + d))) };
    while first < groups && group(first) == 0 {
        first += 1;
        weight -= 1;
    }
    let mut last = groups;
    while last > first && group(last - 1) == 0 {
        last -= 1;
    }
    for (i, g) in (first..last).enumerate() {
        out[i] = group(g);
    }
    (last - first, weight as i16)
}

/// Runs `COPY … FROM STDIN (FORMAT binary)` and feeds it header, chunks and trailer.
/// Returns the number of rows the server reports.
pub async fn copy_in<I>(client: &Client, statement: &str, chunks: I) -> Result<u64, PgError>
where
    I: IntoIterator<Item = Bytes>,
{
    copy_in_stream(client, statement, futures::stream::iter(chunks)).await
}

/// [`copy_in`] from a stream of encoded chunks (back-pressure: one chunk in flight).
pub async fn copy_in_stream<S>(client: &Client, statement: &str, chunks: S) -> Result<u64, PgError>
where
    S: futures::Stream<Item = Bytes>,
{
    let sink = client.copy_in::<_, Bytes>(statement).await.map_err(PgError::query(statement))?;
    futures::pin_mut!(sink);
    futures::pin_mut!(chunks);
    sink.send(CopyBinaryWriter::header()).await.map_err(PgError::query(statement))?;
    while let Some(chunk) = chunks.next().await {
        sink.send(chunk).await.map_err(PgError::query(statement))?;
    }
    sink.send(CopyBinaryWriter::trailer()).await.map_err(PgError::query(statement))?;
    sink.finish().await.map_err(PgError::query(statement))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(unscaled: i128, scale: u16) -> (Vec<i16>, i16) {
        let mut out = [0i16; 12];
        let (n, w) = numeric_digits(unscaled, scale, &mut out);
        (out[..n].to_vec(), w)
    }

    #[test]
    fn numeric_groups() {
        // 1234.56 → 1234 | 5600, weight 0
        assert_eq!(digits(123_456, 2), (vec![1234, 5600], 0));
        // 0.05 → 0500, weight -1
        assert_eq!(digits(5, 2), (vec![500], -1));
        // 10000.00 → 1, weight 1 (trailing zero groups stripped)
        assert_eq!(digits(1_000_000, 2), (vec![1], 1));
        // 9999999999.99 → 99 | 9999 | 9999 | 9900, weight 2
        assert_eq!(digits(999_999_999_999, 2), (vec![99, 9999, 9999, 9900], 2));
        // 0.00000001 (scale 8) → 0000 | 0001 after the point → weight -2, one digit
        assert_eq!(digits(1, 8), (vec![1], -2));
        assert_eq!(digits(0, 2), (vec![], 0));
        assert_eq!(digits(-123_456, 2), (vec![1234, 5600], 0));
        // the largest numeric(38, 0)
        let max = 10i128.pow(38) - 1;
        let (d, w) = digits(max, 0);
        assert_eq!(w, 9);
        assert_eq!(d.len(), 10);
        assert_eq!(d[0], 99);
    }

    #[test]
    fn row_layout() {
        let mut w = CopyBinaryWriter::default();
        w.row(3).i16(7).null().text("a\tb");
        assert_eq!(
            w.take().as_ref(),
            &[0, 3, 0, 0, 0, 2, 0, 7, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 3, b'a', b'\t', b'b'][..]
        );
        assert_eq!(CopyBinaryWriter::header().len(), 19);
    }
}
