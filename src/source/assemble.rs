//! pgoutput messages -> whole transactions ([`Event`]s), with streamed in-progress
//! transactions buffered in a [`StreamBuffer`] until their Stream Commit.

use std::sync::Arc;

use bytes::Bytes;

use super::SourceError;
use crate::change::{Change, Event, TxInfo, PG_EPOCH_OFFSET_MICROS};
use crate::decode::{self, Framing, Message, StreamBuffer};
use crate::lsn::Lsn;

/// What the caller does next.
pub enum Step {
    Continue,
    /// A streamed transaction committed: feed its messages through
    /// [`Assembler::replay`], then push `Event::Commit { end_lsn }`.
    Replay { messages: decode::stream::Committed, end_lsn: Lsn },
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
    pub fn new(committed: Lsn, buffer: StreamBuffer) -> Assembler {
        Assembler { framing: Framing::default(), stream_xid: None, in_tx: false, skipping: false, committed, buffer }
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
                    let top = self.stream_xid.ok_or_else(|| SourceError::Protocol("streamed message outside a stream block".into()))?;
                    let sub = other.stream_xid().unwrap_or(top);
                    self.buffer.push(top, sub, raw)?;
                }
            }
            return Ok(Step::Continue);
        }
        match msg {
            Message::Begin { final_lsn, commit_ts, xid } => {
                self.in_tx = true;
                self.skipping = self.already_committed(final_lsn);
                if !self.skipping {
                    out.push(Event::Begin(TxInfo { xid, commit_lsn: final_lsn, commit_ts: commit_ts + PG_EPOCH_OFFSET_MICROS }));
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
            Message::StreamCommit { xid, commit_lsn, end_lsn, commit_ts, .. } => {
                if self.already_committed(commit_lsn) {
                    self.buffer.abort(xid, xid)?;
                    return Ok(Step::Continue);
                }
                out.push(Event::Begin(TxInfo { xid, commit_lsn, commit_ts: commit_ts + PG_EPOCH_OFFSET_MICROS }));
                return Ok(Step::Replay { messages: self.buffer.commit(xid)?, end_lsn });
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
        Message::Update { rel_id, old, old_is_full_row, new, .. } => Change::Update { rel_id, old, old_is_full_row, new },
        Message::Delete { rel_id, old, old_is_full_row, .. } => Change::Delete { rel_id, old, old_is_full_row },
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
