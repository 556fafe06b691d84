//! The `pgoutput` byte format (PostgreSQL docs, "Logical Replication Message
//! Formats", protocol version 1), decoded from the rows that
//! `pg_logical_slot_peek_binary_changes` returns: one message per row.
//!
//! Only what the relay applies is decoded; `Type` and `Origin` messages are
//! recognised and skipped. Values arrive in PostgreSQL's text format, which
//! the relay hands back to the target as literals.

use thiserror::Error;

/// A message the bytes did not describe correctly.
#[derive(Debug, Error, PartialEq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity (the primary key, or every column with `FULL`).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

/// The shape of a table as the changes that follow it use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change: not sent, keep the old one.
    Unchanged,
    Text(String),
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin { final_lsn: u64, commit_time_us: i64, xid: u32 },
    Commit { commit_lsn: u64, end_lsn: u64, commit_time_us: i64 },
    Relation(Relation),
    Insert { rel: u32, new: Vec<Value> },
    /// `old`: the old key (`K`) or the whole old row (`O`, identity `FULL`), when sent.
    Update { rel: u32, old: Option<Vec<Value>>, new: Vec<Value> },
    Delete { rel: u32, old: Vec<Value> },
    Truncate { rels: Vec<u32>, cascade: bool, restart_identity: bool },
    /// `pg_logical_emit_message`: the DDL capture's channel.
    Logical { transactional: bool, prefix: String, content: Vec<u8> },
    /// `Type`, `Origin`: nothing to apply.
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!("needed {n} more bytes, {} left", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A NUL-terminated string.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|b| *b == 0).ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = String::from_utf8(self.buf[..end].to_vec()).map_err(|_| DecodeError("string is not UTF-8".into()))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16()?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let bytes = self.take(usize::try_from(len).map_err(|_| DecodeError("negative length".into()))?)?;
                    Value::Text(String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError("text value is not UTF-8".into()))?)
                }
                other => return Err(DecodeError(format!("unknown tuple value kind {:?}", other as char))),
            });
        }
        Ok(values)
    }
}

/// Decodes one message (one row's `data`).
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data };
    let kind = r.u8()?;
    let msg = match kind {
        b'B' => Message::Begin { final_lsn: r.u64()?, commit_time_us: r.i64()?, xid: r.u32()? },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit { commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time_us: r.i64()? }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.i32()?;
                columns.push(Column { key: flags & 1 == 1, name, type_oid });
            }
            // An empty namespace is pg_catalog (never published); keep it explicit.
            let namespace = if namespace.is_empty() { "pg_catalog".to_string() } else { namespace };
            Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
        }
        b'I' => {
            let rel = r.u32()?;
            expect(r.u8()?, b'N')?;
            Message::Insert { rel, new: r.tuple()? }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut tag = r.u8()?;
            if tag == b'K' || tag == b'O' {
                old = Some(r.tuple()?);
                tag = r.u8()?;
            }
            expect(tag, b'N')?;
            Message::Update { rel, old, new: r.tuple()? }
        }
        b'D' => {
            let rel = r.u32()?;
            let tag = r.u8()?;
            if tag != b'K' && tag != b'O' {
                return Err(DecodeError(format!("delete without old tuple (tag {:?})", tag as char)));
            }
            Message::Delete { rel, old: r.tuple()? }
        }
        b'T' => {
            let n = r.i32()?;
            let options = r.u8()?;
            let mut rels = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate { rels, cascade: options & 1 == 1, restart_identity: options & 2 == 2 }
        }
        b'M' => {
            let flags = r.u8()?;
            let _lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.i32()?;
            let content = r.take(usize::try_from(len).map_err(|_| DecodeError("negative length".into()))?)?.to_vec();
            Message::Logical { transactional: flags & 1 == 1, prefix, content }
        }
        b'Y' | b'O' => Message::Other(kind),
        other => return Err(DecodeError(format!("unknown message type {:?}", other as char))),
    };
    Ok(msg)
}

fn expect(got: u8, want: u8) -> Result<(), DecodeError> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeError(format!("expected {:?}, found {:?}", want as char, got as char)))
    }
}

/// `0/16B3748`, PostgreSQL's spelling of an LSN.
pub fn lsn_to_string(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's spelling of an LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_a_relation_and_an_update_with_its_old_key() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0items\0");
        rel.push(b'd');
        rel.extend(2i16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(23u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"note\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel).unwrap() else { panic!("not a relation") };
        assert_eq!((r.namespace.as_str(), r.name.as_str(), r.replica_identity), ("public", "items", b'd'));
        assert_eq!(r.columns.iter().map(|c| (c.name.as_str(), c.key)).collect::<Vec<_>>(), [("id", true), ("note", false)]);

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("2"), Some("it's")]));
        assert_eq!(
            decode(&upd).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("1".into()), Value::Null]),
                new: vec![Value::Text("2".into()), Value::Text("it's".into())]
            }
        );
    }

    #[test]
    fn decodes_begin_commit_and_a_transactional_message() {
        let mut b = vec![b'B'];
        b.extend(0x1_0000_0010u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(77u32.to_be_bytes());
        assert_eq!(decode(&b).unwrap(), Message::Begin { final_lsn: 0x1_0000_0010, commit_time_us: 5, xid: 77 });
        let mut m = vec![b'M', 1];
        m.extend(9u64.to_be_bytes());
        m.extend(b"omni_ddl\0");
        m.extend(3i32.to_be_bytes());
        m.extend(b"abc");
        assert_eq!(decode(&m).unwrap(), Message::Logical { transactional: true, prefix: "omni_ddl".into(), content: b"abc".to_vec() });
        let mut c = vec![b'C', 0];
        c.extend(10u64.to_be_bytes());
        c.extend(20u64.to_be_bytes());
        c.extend(30i64.to_be_bytes());
        assert_eq!(decode(&c).unwrap(), Message::Commit { commit_lsn: 10, end_lsn: 20, commit_time_us: 30 });
    }

    #[test]
    fn rejects_truncated_and_unknown_messages() {
        assert!(decode(b"B\0\0").is_err());
        assert!(decode(b"Z").is_err());
        assert!(decode(b"").is_err());
        let mut ins = vec![b'I'];
        ins.extend(1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(1i16.to_be_bytes());
        ins.push(b'x');
        assert!(decode(&ins).is_err(), "unknown value kind");
    }

    #[test]
    fn lsns_round_trip_in_postgres_spelling() {
        assert_eq!(lsn_to_string(0x016B_3748), "0/16B3748");
        assert_eq!(parse_lsn("1/A"), Some((1 << 32) | 10));
        assert_eq!(parse_lsn(&lsn_to_string(0xDEAD_BEEF_0000_0001)), Some(0xDEAD_BEEF_0000_0001));
        assert_eq!(parse_lsn("nope"), None);
    }
}
