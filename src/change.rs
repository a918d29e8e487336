//! The types the stages share: what the source hands to the batcher.

use std::sync::Arc;

use crate::decode::{Relation, Tuple};
use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// What the source knows about a transaction before its first change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxInfo {
    pub xid: u32,
    /// LSN of the commit record: `_lsn` of every row of the transaction.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
}

/// One row-level change, as decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Insert {
        rel_id: u32,
        new: Tuple,
    },
    Update {
        rel_id: u32,
        old: Option<Tuple>,
        old_is_full_row: bool,
        new: Tuple,
    },
    Delete {
        rel_id: u32,
        old: Tuple,
        old_is_full_row: bool,
    },
    Truncate {
        rel_ids: Vec<u32>,
    },
    /// Rows of a table copy (`_op = 'R'`) in COPY's binary format, whole rows without
    /// header or trailer: `_seq` counts per chunk from the chunk's base, `_xid` is null.
    SnapshotBinaryRows {
        rel_id: u32,
        rows: bytes::Bytes,
    },
}

/// The source's output, in WAL commit order. Transactions arrive whole and never
/// interleave: `Begin`, its relations and changes, `Commit`.
#[derive(Clone, Debug)]
pub enum Event {
    Begin(TxInfo),
    Relation(Arc<Relation>),
    Change(Change),
    /// `end_lsn`: the LSN just past the commit record; replication resumes there.
    Commit {
        end_lsn: Lsn,
    },
    /// Copies of these tables (`schema.table`) run from snapshot point `from`: from
    /// here on the stream's changes to them before `from` are not written (the copy
    /// holds them), and their files wait for the copy's commit.
    CopyStart {
        tables: Vec<String>,
        from: Lsn,
    },
    /// Nothing is in flight and the server has sent everything up to `lsn`: a flush
    /// that finds nothing buffered may confirm it (idle publications hold no WAL).
    Idle {
        lsn: Lsn,
    },
}
