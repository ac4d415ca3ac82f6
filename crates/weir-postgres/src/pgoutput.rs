//! The `pgoutput` logical replication protocol (version 1): the messages a logical slot
//! emits, decoded from their wire form. Column values are kept as the raw bytes PostgreSQL
//! sent (with `binary 'true'`, each type's binary send format, the same bytes COPY BINARY
//! carries), read in place from the message, so one decoder turns both into Arrow.

/// A LSN as PostgreSQL prints it: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xffff_ffff && lo <= 0xffff_ffff).then_some((hi << 32) | lo)
}

/// One column value in a tuple, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the update did not change: not sent; the current value stands.
    Unchanged,
    /// The value in text form (`binary 'false'`).
    Text(&'a [u8]),
    /// The value in its type's binary send format.
    Binary(&'a [u8]),
}

/// A tuple as the message carries it: validated when the message is decoded, its values read
/// in place (no copy, no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    /// The values, from the first one's kind byte to the end of the last one.
    values: &'a [u8],
    len: usize,
    /// Where the tuple (its column count) starts in its message.
    offset: usize,
}

impl<'a> Tuple<'a> {
    /// The number of columns sent.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the tuple starts in its message: [`tuple_at`] reads it again from there.
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn iter(&self) -> TupleValues<'a> {
        TupleValues { rest: self.values, left: self.len }
    }

    /// The value of column `i` (a scan from the first column).
    pub fn get(&self, i: usize) -> Option<Value<'a>> {
        self.iter().nth(i)
    }
}

impl<'a> IntoIterator for Tuple<'a> {
    type Item = Value<'a>;
    type IntoIter = TupleValues<'a>;
    fn into_iter(self) -> TupleValues<'a> {
        self.iter()
    }
}

/// The values of a [`Tuple`], in column order.
#[derive(Debug, Clone)]
pub struct TupleValues<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for TupleValues<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        // The tuple was validated when its message was decoded: every read below is in bounds
        // (a short read ends the iteration rather than panicking).
        if self.left == 0 {
            return None;
        }
        let (&kind, rest) = self.rest.split_first()?;
        self.left -= 1;
        let value = match kind {
            b'n' => {
                self.rest = rest;
                Value::Null
            }
            b'u' => {
                self.rest = rest;
                Value::Unchanged
            }
            _ => {
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let len = i32::from_be_bytes(*len) as usize;
                let (v, rest) = rest.split_at_checked(len)?;
                self.rest = rest;
                if kind == b't' { Value::Text(v) } else { Value::Binary(v) }
            }
        };
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub name: String,
    /// Part of the replica identity (the key).
    pub key: bool,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// One message; the tuples of data messages borrow from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        /// The LSN of the commit record.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// The end of the transaction's commit record: where a consumer that applied it resumes.
        end_lsn: u64,
        commit_time: i64,
    },
    Origin,
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        relation: u32,
        /// The old key (`K`, replica identity default/index) or old row (`O`, full), when sent.
        old: Option<Tuple<'a>>,
        new: Tuple<'a>,
    },
    Delete {
        relation: u32,
        old: Tuple<'a>,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`): not table data.
    Logical,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message ({kind}): {reason}")]
pub struct ProtocolError {
    pub kind: char,
    pub reason: String,
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    kind: char,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError { kind: self.kind, reason: reason.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let left = self.data.len() - self.at;
        if left < n {
            return Err(self.err(format!("needs {n} more bytes, {left} left")));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, ProtocolError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let rest = &self.data[self.at..];
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            return Err(self.err("unterminated string"));
        };
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| self.err("string is not UTF-8"))?.to_string();
        self.at += end + 1;
        Ok(s)
    }
    /// Walks a tuple once, checking every length, so its values can be read in place later.
    fn tuple(&mut self) -> Result<Tuple<'a>, ProtocolError> {
        let offset = self.at;
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err(format!("negative column count {n}")));
        }
        let start = self.at;
        for _ in 0..n {
            match self.u8()? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.err(format!("negative value length {len}")));
                    }
                    self.take(len as usize)?;
                }
                other => return Err(self.err(format!("unknown tuple value kind {:?}", other as char))),
            }
        }
        Ok(Tuple { values: &self.data[start..self.at], len: n as usize, offset })
    }
}

/// The tuple starting at `offset` of `message` (a [`Tuple::offset`] of the same bytes).
pub fn tuple_at(message: &[u8], offset: usize) -> Result<Tuple<'_>, ProtocolError> {
    let kind = message.first().map_or('?', |&b| b as char);
    if offset > message.len() {
        return Err(ProtocolError { kind, reason: format!("no tuple at byte {offset} of {}", message.len()) });
    }
    Reader { data: message, at: offset, kind }.tuple()
}

/// Decodes one message (one row of `pg_logical_slot_peek_binary_changes`); its tuples borrow
/// from `data`.
pub fn decode(data: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let Some(&first) = data.first() else {
        return Err(ProtocolError { kind: '?', reason: "empty message".into() });
    };
    let mut r = Reader { data, at: 1, kind: first as char };
    let msg = match first {
        b'B' => Message::Begin { final_lsn: r.u64()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit { commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time: r.i64()? }
        }
        b'O' => Message::Origin,
        b'M' => Message::Logical,
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    name: r.string()?,
                    key: flags & 1 == 1,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
        }
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.string()?, name: r.string()? },
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                other => return Err(r.err(format!("expected N, got {:?}", other as char))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut marker = r.u8()?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8()?;
            }
            if marker != b'N' {
                return Err(r.err(format!("expected N, got {:?}", marker as char)));
            }
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete { relation, old: r.tuple()? },
                other => return Err(r.err(format!("expected K or O, got {:?}", other as char))),
            }
        }
        b'T' => {
            let n = r.i32()?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        other => {
            return Err(ProtocolError {
                kind: other as char,
                reason: "unknown message type (streamed transactions and protocol > 1 are not requested)".into(),
            });
        }
    };
    Ok(msg)
}

/// The name of a built-in type by OID (the types Weir lands; see [`crate::PgType`]).
pub fn builtin_type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        17 => "bytea",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        114 => "json",
        700 => "float4",
        701 => "float8",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1114 => "timestamp",
        1184 => "timestamptz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn tuple(b: &mut BytesMut, values: &[Option<&[u8]>]) {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_u8(b'n'),
                Some(v) => {
                    b.put_u8(b'b');
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("1FFFFFFFF/0"), None);
    }

    #[test]
    fn begin_commit_relation() {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(0x100);
        b.put_i64(42);
        b.put_u32(7);
        assert_eq!(decode(&b.split()).unwrap(), Message::Begin { final_lsn: 0x100, commit_time: 42, xid: 7 });

        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(0x100);
        b.put_u64(0x128);
        b.put_i64(42);
        assert_eq!(decode(&b.split()).unwrap(), Message::Commit { commit_lsn: 0x100, end_lsn: 0x128, commit_time: 42 });

        b.put_u8(b'R');
        b.put_u32(16_384);
        b.put_slice(b"public\0listings\0");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"listing_id\0");
        b.put_u32(20);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"price\0");
        b.put_u32(1700);
        b.put_i32((12 << 16 | 2) + 4);
        let Message::Relation(rel) = decode(&b.split()).unwrap() else { panic!("not a relation") };
        assert_eq!(rel.name, "listings");
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_oid, 1700);
        assert_eq!(builtin_type_name(rel.columns[1].type_oid), Some("numeric"));
    }

    #[test]
    fn update_with_old_key_and_unchanged_toast() {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(5);
        b.put_u8(b'K');
        tuple(&mut b, &[Some(&1i64.to_be_bytes()), None]);
        b.put_u8(b'N');
        b.put_i16(3);
        b.put_u8(b'b');
        b.put_i32(8);
        b.put_i64(2);
        b.put_u8(b'u');
        b.put_u8(b't');
        b.put_i32(2);
        b.put_slice(b"hi");
        let m = decode(&b).unwrap();
        let Message::Update { relation, old: Some(old), new } = m else { panic!("not an update with a key: {m:?}") };
        assert_eq!(relation, 5);
        assert_eq!(old.iter().collect::<Vec<_>>(), vec![Value::Binary(&1i64.to_be_bytes()), Value::Null]);
        assert_eq!(new.len(), 3);
        assert_eq!(
            new.iter().collect::<Vec<_>>(),
            vec![Value::Binary(&2i64.to_be_bytes()), Value::Unchanged, Value::Text(b"hi")]
        );
        assert_eq!(new.get(1), Some(Value::Unchanged));
        assert_eq!(new.get(3), None);
        // Found again from its offset, as a folded change refers to it.
        assert_eq!(tuple_at(&b, new.offset()).unwrap(), new);
        assert_eq!(tuple_at(&b, old.offset()).unwrap(), old);
        assert!(tuple_at(&b, b.len() + 1).is_err());
    }

    #[test]
    fn insert_delete_truncate() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(9);
        b.put_u8(b'N');
        tuple(&mut b, &[Some(b"abc")]);
        assert!(matches!(decode(&b.split()).unwrap(), Message::Insert { relation: 9, .. }));

        b.put_u8(b'D');
        b.put_u32(9);
        b.put_u8(b'O');
        tuple(&mut b, &[None]);
        let data = b.split();
        let Message::Delete { relation: 9, old } = decode(&data).unwrap() else { panic!("not a delete") };
        assert_eq!(old.iter().collect::<Vec<_>>(), vec![Value::Null]);

        b.put_u8(b'T');
        b.put_i32(2);
        b.put_u8(1);
        b.put_u32(9);
        b.put_u32(10);
        assert_eq!(
            decode(&b.split()).unwrap(),
            Message::Truncate { relations: vec![9, 10], cascade: true, restart_identity: false }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(decode(b"").is_err());
        assert!(decode(b"B\0\0").is_err());
        assert!(decode(b"Z").is_err());
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(9);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'b');
        b.put_i32(100);
        b.put_slice(b"short");
        let e = decode(&b).unwrap_err();
        assert_eq!(e.kind, 'I');
        assert!(e.reason.contains("needs 100 more bytes"), "{e}");
    }
}
