//! The `pgoutput` logical replication protocol (version 1): the messages a logical slot
//! emits, decoded from their wire form. Column values are kept as the raw bytes PostgreSQL
//! sent (with `binary 'true'`, each type's binary send format, the same bytes COPY BINARY
//! carries), so one decoder turns both into Arrow.

use bytes::{Buf, Bytes};

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

/// One column value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change: not sent; the current value stands.
    Unchanged,
    /// The value in text form (`binary 'false'`).
    Text(Bytes),
    /// The value in its type's binary send format.
    Binary(Bytes),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
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
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key (`K`, replica identity default/index) or old row (`O`, full), when sent.
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
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

struct Reader {
    buf: Bytes,
    kind: char,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.buf.remaining() < n {
            return Err(self.err(format!("needs {n} more bytes, {} left", self.buf.remaining())));
        }
        Ok(())
    }
    fn err(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError { kind: self.kind, reason: reason.into() }
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self) -> Result<i16, ProtocolError> {
        self.need(2)?;
        Ok(self.buf.get_i16())
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn i64(&mut self) -> Result<i64, ProtocolError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let Some(end) = self.buf.iter().position(|b| *b == 0) else {
            return Err(self.err("unterminated string"));
        };
        let s = String::from_utf8(self.buf[..end].to_vec()).map_err(|_| self.err("string is not UTF-8"))?;
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, ProtocolError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn tuple(&mut self) -> Result<Vec<Value>, ProtocolError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err(format!("negative column count {n}")));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.err(format!("negative value length {len}")));
                    }
                    let v = self.bytes(len as usize)?;
                    if kind == b't' { Value::Text(v) } else { Value::Binary(v) }
                }
                other => return Err(self.err(format!("unknown tuple value kind {:?}", other as char))),
            });
        }
        Ok(values)
    }
}

/// Decodes one message (one row of `pg_logical_slot_peek_binary_changes`).
pub fn decode(data: Bytes) -> Result<Message, ProtocolError> {
    let Some(&first) = data.first() else {
        return Err(ProtocolError { kind: '?', reason: "empty message".into() });
    };
    let mut r = Reader { buf: data.slice(1..), kind: first as char };
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
        assert_eq!(decode(b.split().freeze()).unwrap(), Message::Begin { final_lsn: 0x100, commit_time: 42, xid: 7 });

        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(0x100);
        b.put_u64(0x128);
        b.put_i64(42);
        assert_eq!(
            decode(b.split().freeze()).unwrap(),
            Message::Commit { commit_lsn: 0x100, end_lsn: 0x128, commit_time: 42 }
        );

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
        let Message::Relation(rel) = decode(b.split().freeze()).unwrap() else { panic!("not a relation") };
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
        let m = decode(b.freeze()).unwrap();
        let Message::Update { relation, old: Some(old), new } = m else { panic!("not an update with a key: {m:?}") };
        assert_eq!(relation, 5);
        assert_eq!(old, vec![Value::Binary(Bytes::copy_from_slice(&1i64.to_be_bytes())), Value::Null]);
        assert_eq!(new[1], Value::Unchanged);
        assert_eq!(new[2], Value::Text(Bytes::from_static(b"hi")));
    }

    #[test]
    fn insert_delete_truncate() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(9);
        b.put_u8(b'N');
        tuple(&mut b, &[Some(b"abc")]);
        assert!(matches!(decode(b.split().freeze()).unwrap(), Message::Insert { relation: 9, .. }));

        b.put_u8(b'D');
        b.put_u32(9);
        b.put_u8(b'O');
        tuple(&mut b, &[None]);
        assert_eq!(decode(b.split().freeze()).unwrap(), Message::Delete { relation: 9, old: vec![Value::Null] });

        b.put_u8(b'T');
        b.put_i32(2);
        b.put_u8(1);
        b.put_u32(9);
        b.put_u32(10);
        assert_eq!(
            decode(b.split().freeze()).unwrap(),
            Message::Truncate { relations: vec![9, 10], cascade: true, restart_identity: false }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(decode(Bytes::new()).is_err());
        assert!(decode(Bytes::from_static(b"B\0\0")).is_err());
        assert!(decode(Bytes::from_static(b"Z")).is_err());
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(9);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'b');
        b.put_i32(100);
        b.put_slice(b"short");
        let e = decode(b.freeze()).unwrap_err();
        assert_eq!(e.kind, 'I');
        assert!(e.reason.contains("needs 100 more bytes"), "{e}");
    }
}
