//! pgoutput messages -> whole transactions ([`Event`]s), with streamed in-progress
//! transactions buffered in a [`StreamBuffer`] until their Stream Commit.

use std::sync::Arc;

use bytes::Bytes;

use super::SourceError;
use crate::change::{Change, Event, PG_EPOCH_OFFSET_MICROS, TxInfo};
use crate::decode::{self, Framing, Message, StreamBuffer};
use crate::lsn::Lsn;

/// What the caller does next.
pub enum Step {
    Continue,
    /// A streamed transaction committed: feed its messages through
    /// [`Assembler::replay`], then push `Event::Commit { end_lsn }`.
    Replay {
        messages: decode::stream::Committed,
        end_lsn: Lsn,
    },
}

pub struct Assembler {
    framing: Framing,
    stream_xid: Option<u32>,
    in_tx: bool,
    skipping: bool,
    /// End LSN of the last transaction durably in the sink: anything that commits
    /// before it is a resend and is skipped.
    committed: Lsn,
    buffer: StreamBuffer,
}

impl Assembler {
    /// Bytes of streamed transactions spilled to disk now.
    pub fn spill_bytes(&self) -> u64 {
        self.buffer.spill_bytes()
    }

    pub fn new(committed: Lsn, buffer: StreamBuffer) -> Assembler {
        Assembler {
            framing: Framing::default(),
            stream_xid: None,
            in_tx: false,
            skipping: false,
            committed,
            buffer,
        }
    }

    /// True while a (non-streamed) transaction is being received: stopping now would
    /// cut it.
    pub fn in_transaction(&self) -> bool {
        self.in_tx
    }

    /// True while some transaction has been started and not finished.
    pub fn in_flight(&self) -> bool {
        self.in_tx || self.buffer.in_flight()
    }

    fn already_committed(&self, commit_lsn: Lsn) -> bool {
        commit_lsn < self.committed
    }

    pub fn on_message(&mut self, raw: Bytes, out: &mut Vec<Event>) -> Result<Step, SourceError> {
        let msg = decode::decode(raw.clone(), self.framing)?;
        if self.framing.in_stream {
            match msg {
                Message::StreamStop => {
                    self.framing.in_stream = false;
                    self.stream_xid = None;
                }
                other => {
                    let top = self
                        .stream_xid
                        .ok_or_else(|| SourceError::Protocol("streamed message outside a stream block".into()))?;
                    let sub = other.stream_xid().unwrap_or(top);
                    self.buffer.push(top, sub, raw)?;
                }
            }
            return Ok(Step::Continue);
        }
        match msg {
            Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                self.in_tx = true;
                self.skipping = self.already_committed(final_lsn);
                if !self.skipping {
                    out.push(Event::Begin(TxInfo {
                        xid,
                        commit_lsn: final_lsn,
                        commit_ts: commit_ts + PG_EPOCH_OFFSET_MICROS,
                    }));
                }
            }
            Message::Commit { end_lsn, .. } => {
                self.in_tx = false;
                if !std::mem::take(&mut self.skipping) {
                    out.push(Event::Commit { end_lsn });
                }
            }
            Message::StreamStart { xid, .. } => {
                self.framing.in_stream = true;
                self.stream_xid = Some(xid);
            }
            Message::StreamStop => return Err(SourceError::Protocol("Stream Stop outside a stream block".into())),
            Message::StreamAbort { xid, subxid } => self.buffer.abort(xid, subxid)?,
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                if self.already_committed(commit_lsn) {
                    self.buffer.abort(xid, xid)?;
                    return Ok(Step::Continue);
                }
                out.push(Event::Begin(TxInfo {
                    xid,
                    commit_lsn,
                    commit_ts: commit_ts + PG_EPOCH_OFFSET_MICROS,
                }));
                return Ok(Step::Replay {
                    messages: self.buffer.commit(xid)?,
                    end_lsn,
                });
            }
            other => {
                // Relations describe the schema from here on, even in a skipped resend.
                if matches!(other, Message::Relation { .. }) || !self.skipping {
                    emit(other, out);
                }
            }
        }
        Ok(Step::Continue)
    }

    /// One buffered message of a committed streamed transaction.
    pub fn replay(&mut self, raw: Bytes, out: &mut Vec<Event>) -> Result<(), SourceError> {
        let msg = decode::decode(raw, Framing { in_stream: true })?;
        emit(msg, out);
        Ok(())
    }

    pub fn set_committed(&mut self, lsn: Lsn) {
        self.committed = self.committed.max(lsn);
    }
}

fn emit(msg: Message, out: &mut Vec<Event>) {
    let change = match msg {
        Message::Relation { relation, .. } => {
            out.push(Event::Relation(Arc::new(relation)));
            return;
        }
        Message::Insert { rel_id, new, .. } => Change::Insert { rel_id, new },
        Message::Update {
            rel_id,
            old,
            old_is_full_row,
            new,
            ..
        } => Change::Update {
            rel_id,
            old,
            old_is_full_row,
            new,
        },
        Message::Delete {
            rel_id,
            old,
            old_is_full_row,
            ..
        } => Change::Delete {
            rel_id,
            old,
            old_is_full_row,
        },
        Message::Truncate { rel_ids, .. } => Change::Truncate { rel_ids },
        // Types are described in the Relation's OIDs; origins and logical messages carry
        // no row data.
        Message::Type { .. } | Message::Origin { .. } | Message::Message { .. } => return,
        Message::Begin { .. }
        | Message::Commit { .. }
        | Message::StreamStart { .. }
        | Message::StreamStop
        | Message::StreamCommit { .. }
        | Message::StreamAbort { .. } => return,
    };
    out.push(Event::Change(change));
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;

    fn begin(final_lsn: u64, xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(final_lsn);
        b.put_i64(0);
        b.put_u32(xid);
        b.freeze()
    }
    fn commit(lsn: u64, end: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(lsn);
        b.put_u64(end);
        b.put_i64(0);
        b.freeze()
    }
    fn relation(xid: Option<u32>) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        if let Some(x) = xid {
            b.put_u32(x);
        }
        b.put_u32(1);
        b.put_slice(b"public\0t\0");
        b.put_u8(b'd');
        b.put_i16(1);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.freeze()
    }
    fn insert(xid: Option<u32>, v: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        if let Some(x) = xid {
            b.put_u32(x);
        }
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(v.len() as i32);
        b.put_slice(v);
        b.freeze()
    }
    fn stream(tag: u8, xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_u32(xid);
        if tag == b'S' {
            b.put_u8(1);
        }
        b.freeze()
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                Event::Begin(_) => "begin",
                Event::Relation(_) => "relation",
                Event::Change(_) => "change",
                Event::Commit { .. } => "commit",
                Event::Idle { .. } => "idle",
                Event::CopyDue { .. } => "copy-due",
                Event::CopyStart(_) => "copy-start",
            })
            .collect()
    }

    fn assembler(committed: u64) -> (Assembler, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (
            Assembler::new(
                Lsn(committed),
                StreamBuffer::new(dir.path().to_owned(), 1 << 20, u64::MAX),
            ),
            dir,
        )
    }

    #[test]
    fn a_resent_transaction_below_the_committed_position_is_skipped_but_its_relation_kept() {
        let (mut a, _dir) = assembler(0x200);
        let mut out = Vec::new();
        for m in [
            begin(0x100, 7),
            relation(None),
            insert(None, b"1"),
            commit(0x100, 0x180),
        ] {
            a.on_message(m, &mut out).unwrap();
        }
        assert_eq!(kinds(&out), ["relation"]);
        out.clear();
        for m in [begin(0x300, 8), insert(None, b"2"), commit(0x300, 0x380)] {
            a.on_message(m, &mut out).unwrap();
        }
        assert_eq!(kinds(&out), ["begin", "change", "commit"]);
        assert!(!a.in_flight());
    }

    #[test]
    fn a_streamed_transaction_is_released_only_at_its_stream_commit() {
        let (mut a, _dir) = assembler(0);
        let mut out = Vec::new();
        for m in [
            stream(b'S', 9),
            relation(Some(9)),
            insert(Some(9), b"1"),
            insert(Some(10), b"2"),
            Bytes::from_static(b"E"),
        ] {
            assert!(matches!(a.on_message(m, &mut out).unwrap(), Step::Continue));
        }
        assert!(out.is_empty() && a.in_flight());
        // An ordinary transaction commits in between and is not mixed with the stream.
        for m in [begin(0x100, 11), insert(None, b"3"), commit(0x100, 0x110)] {
            a.on_message(m, &mut out).unwrap();
        }
        assert_eq!(kinds(&out), ["begin", "change", "commit"]);
        out.clear();
        let mut sc = BytesMut::new();
        sc.put_u8(b'c');
        sc.put_u32(9);
        sc.put_u8(0);
        sc.put_u64(0x200);
        sc.put_u64(0x210);
        sc.put_i64(0);
        let Step::Replay { mut messages, end_lsn } = a.on_message(sc.freeze(), &mut out).unwrap() else {
            panic!("expected a replay")
        };
        assert_eq!(end_lsn, Lsn(0x210));
        while let Some(m) = messages.next_message().unwrap() {
            a.replay(m, &mut out).unwrap();
        }
        assert_eq!(kinds(&out), ["begin", "relation", "change", "change"]);
        let Event::Begin(info) = &out[0] else { unreachable!() };
        assert_eq!((info.xid, info.commit_lsn), (9, Lsn(0x200)));
        assert!(!a.in_flight());
    }
}
