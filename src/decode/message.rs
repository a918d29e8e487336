//! The pgoutput message types and their wire decoding.

use bytes::Bytes;

use super::reader::Reader;
use super::{DecodeError, Framing};
use crate::lsn::Lsn;

/// One pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation {
        xid: Option<u32>,
        relation: Relation,
    },
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        rel_id: u32,
        new: Tuple,
    },
    /// `key` is the old key (`K`, sent when the key changed) or the whole old row (`O`,
    /// REPLICA IDENTITY FULL); `key_is_full_row` tells which.
    Update {
        xid: Option<u32>,
        rel_id: u32,
        old: Option<Tuple>,
        old_is_full_row: bool,
        new: Tuple,
    },
    Delete {
        xid: Option<u32>,
        rel_id: u32,
        old: Tuple,
        old_is_full_row: bool,
    },
    Truncate {
        xid: Option<u32>,
        options: u8,
        rel_ids: Vec<u32>,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

impl Message {
    /// The transaction id a message inside a stream block belongs to.
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Relation { xid, .. }
            | Message::Type { xid, .. }
            | Message::Insert { xid, .. }
            | Message::Update { xid, .. }
            | Message::Delete { xid, .. }
            | Message::Truncate { xid, .. }
            | Message::Message { xid, .. } => *xid,
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value PostgreSQL did not send.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

pub type Tuple = Vec<TupleValue>;

pub(super) fn decode_message(mut r: Reader, framing: Framing) -> Result<Message, DecodeError> {
    let tag = r.u8("message type")?;
    let s = framing.in_stream;
    let msg = match tag {
        b'B' => {
            r.kind = "Begin";
            Message::Begin {
                final_lsn: Lsn(r.u64("final lsn")?),
                commit_ts: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            }
        }
        b'C' => {
            r.kind = "Commit";
            Message::Commit {
                flags: r.u8("flags")?,
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("end lsn")?),
                commit_ts: r.i64("commit timestamp")?,
            }
        }
        b'O' => {
            r.kind = "Origin";
            Message::Origin {
                lsn: Lsn(r.u64("origin lsn")?),
                name: r.cstr("origin name")?,
            }
        }
        b'R' => {
            r.kind = "Relation";
            let xid = stream_xid(&mut r, s)?;
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = match r.u8("replica identity")? {
                b'd' => ReplicaIdentity::Default,
                b'n' => ReplicaIdentity::Nothing,
                b'f' => ReplicaIdentity::Full,
                b'i' => ReplicaIdentity::Index,
                other => return Err(r.err(format!("unknown replica identity {other:#04x}"))),
            };
            let n = r.i16("column count")?;
            if n < 0 {
                return Err(r.err(format!("negative column count {n}")));
            }
            let mut columns = Vec::with_capacity((n as usize).min(r.remaining()));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            Message::Relation {
                xid,
                relation: Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            }
        }
        b'Y' => {
            r.kind = "Type";
            Message::Type {
                xid: stream_xid(&mut r, s)?,
                oid: r.u32("type oid")?,
                namespace: r.cstr("namespace")?,
                name: r.cstr("type name")?,
            }
        }
        b'I' => {
            r.kind = "Insert";
            let xid = stream_xid(&mut r, s)?;
            let rel_id = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'N' => {}
                other => return Err(r.err(format!("expected 'N', found {other:#04x}"))),
            }
            Message::Insert {
                xid,
                rel_id,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            r.kind = "Update";
            let xid = stream_xid(&mut r, s)?;
            let rel_id = r.u32("relation id")?;
            let mut old = None;
            let mut old_is_full_row = false;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old_is_full_row = marker == b'O';
                old = Some(tuple(&mut r)?);
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(r.err(format!("expected 'N', found {marker:#04x}")));
            }
            Message::Update {
                xid,
                rel_id,
                old,
                old_is_full_row,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            r.kind = "Delete";
            let xid = stream_xid(&mut r, s)?;
            let rel_id = r.u32("relation id")?;
            let old_is_full_row = match r.u8("tuple marker")? {
                b'K' => false,
                b'O' => true,
                other => return Err(r.err(format!("expected 'K' or 'O', found {other:#04x}"))),
            };
            Message::Delete {
                xid,
                rel_id,
                old: tuple(&mut r)?,
                old_is_full_row,
            }
        }
        b'T' => {
            r.kind = "Truncate";
            let xid = stream_xid(&mut r, s)?;
            let n = r.u32("relation count")?;
            let options = r.u8("options")?;
            let mut rel_ids = Vec::with_capacity((n as usize).min(r.remaining() / 4));
            for _ in 0..n {
                rel_ids.push(r.u32("relation id")?);
            }
            Message::Truncate { xid, options, rel_ids }
        }
        b'M' => {
            r.kind = "Message";
            let xid = stream_xid(&mut r, s)?;
            let flags = r.u8("flags")?;
            let lsn = Lsn(r.u64("message lsn")?);
            let prefix = r.cstr("prefix")?;
            let len = r.u32("content length")? as usize;
            Message::Message {
                xid,
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            }
        }
        b'S' => {
            r.kind = "Stream Start";
            Message::StreamStart {
                xid: r.u32("xid")?,
                first_segment: r.u8("first segment")? == 1,
            }
        }
        b'E' => {
            r.kind = "Stream Stop";
            Message::StreamStop
        }
        b'c' => {
            r.kind = "Stream Commit";
            Message::StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("end lsn")?),
                commit_ts: r.i64("commit timestamp")?,
            }
        }
        b'A' => {
            r.kind = "Stream Abort";
            Message::StreamAbort {
                xid: r.u32("xid")?,
                subxid: r.u32("subtransaction xid")?,
            }
        }
        other => {
            r.kind = "unknown";
            return Err(DecodeError {
                kind: "unknown",
                offset: 0,
                what: format!("unknown message type {other:#04x}"),
            });
        }
    };
    Ok(msg)
}

fn stream_xid(r: &mut Reader, in_stream: bool) -> Result<Option<u32>, DecodeError> {
    if in_stream {
        Ok(Some(r.u32("streamed transaction xid")?))
    } else {
        Ok(None)
    }
}

fn tuple(r: &mut Reader) -> Result<Tuple, DecodeError> {
    let n = r.i16("tuple column count")?;
    if n < 0 {
        return Err(r.err(format!("negative tuple column count {n}")));
    }
    // Each column takes at least one byte: never pre-allocate more than the input holds.
    let mut values = Vec::with_capacity((n as usize).min(r.remaining()));
    for _ in 0..n {
        let v = match r.u8("column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::Unchanged,
            kind @ (b't' | b'b') => {
                let len = r.i32("value length")?;
                if len < 0 {
                    return Err(r.err(format!("negative value length {len}")));
                }
                let data = r.bytes(len as usize, "value")?;
                if kind == b't' {
                    TupleValue::Text(data)
                } else {
                    TupleValue::Binary(data)
                }
            }
            other => return Err(r.err(format!("unknown column kind {other:#04x}"))),
        };
        values.push(v);
    }
    Ok(values)
}
