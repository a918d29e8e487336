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
    /// Copies of these tables (`schema.table`) are due, their snapshot point not known
    /// yet: from here their changes are written but held back, to be sorted out against
    /// the point when the copy starts (those before it are in the copy).
    CopyDue {
        tables: Vec<String>,
    },
    /// A copy runs from its snapshot point: from here on the stream's changes to its
    /// tables before the point are not written (the copy holds them), and their files
    /// wait for the copy's commit.
    CopyStart(Arc<CopyStart>),
    /// Nothing is in flight and the server has sent everything up to `lsn`: a flush
    /// that finds nothing buffered may confirm it (idle publications hold no WAL).
    Idle {
        lsn: Lsn,
    },
}

/// A copy of tables beside the stream, numbered in the order a run starts them.
pub type CopyId = u64;

/// Which PostgreSQL table a lake table is a copy of, and how it is in the publication.
/// A table dropped and created again under its name has another `oid`; a table that
/// left the publication and came back has other `membership` rows. Either way the lake
/// no longer continues it, and it is copied again.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct TableIdentity {
    /// `pg_class.oid` of the table.
    pub oid: u32,
    /// OIDs of the catalog rows that put it in the publication (`pg_publication_rel`,
    /// `pg_publication_namespace`, of the table or of a partition ancestor); empty for a
    /// `FOR ALL TABLES` publication. Sorted.
    pub membership: Vec<u32>,
    /// `snapshot.mode = "never"`: the table left the publication (or was dropped). Its
    /// OID is kept, so that a table created again under its name starts with a `T` row
    /// (no copy does it); with copies, a departure drops the identity instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub departed: bool,
}

impl TableIdentity {
    /// Whether the table as it is now (`now`) is the one recorded here, continuously in
    /// the publication as far as the catalog tells: the same OID, and one of the
    /// catalog rows that put it there still does (a row lives as long as its
    /// membership: a table removed and added again has only new rows, while one also
    /// added by its schema keeps its own row). A table that left without its row going
    /// (moved out of a published schema and back, a partition detached and attached
    /// again) keeps it: only a departure seen while it lasted tells (README, Limits).
    /// Both empty: `FOR ALL TABLES`.
    pub fn continues_as(&self, now: &TableIdentity) -> bool {
        self.oid == now.oid
            && ((self.membership.is_empty() && now.membership.is_empty())
                || self.membership.iter().any(|m| now.membership.binary_search(m).is_ok()))
    }
}

/// One table of a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyTable {
    /// `schema.table`.
    pub name: String,
    /// As of the snapshot point.
    pub identity: TableIdentity,
    /// The columns as copied (types resolved).
    pub relation: Arc<crate::decode::Relation>,
    /// `walshore resnapshot` requests this copy carries out: deleted once it commits.
    pub requests: Vec<String>,
}

/// A copy's snapshot point, known: the hand-off from stream to copy for its tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyStart {
    pub id: CopyId,
    /// Transactions committed before it are in the copy, the others in the stream.
    pub from: Lsn,
    pub tables: Vec<CopyTable>,
    /// Tables that were due but are not copied (no longer in the publication at the
    /// point): what was held back for them is dropped.
    pub dropped: Vec<String>,
}
