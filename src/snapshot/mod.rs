//! Table copies: every row of a published table as of a snapshot point, written as `R`
//! rows whose `_lsn` is that point, beside the stream.
//!
//! # How a copy meets the stream
//!
//! A snapshot point is a pair (exported snapshot, LSN) taken from a logical slot's
//! creation: transactions that commit before the LSN are visible in the snapshot, the
//! others are decoded by the slot. On a new lake the pipeline's own slot is created with
//! `EXPORT_SNAPSHOT`; later copies (tables added to the publication, `walshore
//! resnapshot`, copies a crash interrupted) take theirs from a temporary slot created for
//! the purpose and dropped as soon as the copy connections have imported the snapshot.
//! The batcher then writes a copied table's stream changes only from its point on
//! ([`crate::batch::Gate`]), so copy and stream meet with no gap and no overlap, while
//! every other table keeps streaming.
//!
//! Taking a point waits for the transactions running at that moment to end, which may
//! take as long as somebody keeps one open. The stream does not wait: a copy is first
//! *due* (an event in the stream, `Event::CopyDue`), and from there its tables' changes
//! are written and held back by the sink; when the point is known (`Event::CopyStart`,
//! again in stream order) the sink drops what of them is before the point (the copy
//! holds it), keeps what is after, and cuts the one file that straddles it. So the
//! stream may run past a point it does not know yet, and the hand-off from stream to
//! copy is decided by the order of events, never by timing. The tables of a new lake's
//! first copy are gated from its start, at the slot's own point.
//!
//! # Chunks, commits and crashes
//!
//! A table is cut into ctid ranges of `snapshot.chunk_size` heap bytes (TID range scans,
//! PostgreSQL ≥ 14), and `snapshot.parallelism` connections copy chunks in turn, so one
//! large table is copied by all of them. Each connection parses and encodes its own
//! chunks; `_seq` of chunk `k` starts at `k << 32` (a table of one chunk is numbered
//! 0, 1, 2, …), which depends only on the snapshot and the chunk size. A table is
//! committed once all its chunks are uploaded, together with the stream's files of that
//! table held back since its snapshot point, in one commit record that also records the
//! table's point (`snapshots` in the record). A connection lost mid-chunk puts its
//! chunk back in the queue for the connections that still hold the snapshot. A crash
//! before the table's commit leaves only uncommitted files, deleted at the next start,
//! and the table is copied again from a new snapshot point; tables already committed
//! are never copied again. An exported snapshot
//! does not survive its session, so the chunks of an unfinished table cannot be resumed
//! under it: mixing rows from two snapshot points inside one table is only correct with
//! a per-key reconciliation against the stream (DBLog, Debezium's incremental snapshots),
//! which needs a primary key and costs a key-ordered scan. walshore keeps the exact,
//! key-independent method and accepts re-copying one table's chunks after a crash.
//!
//! # Re-snapshots
//!
//! A table copied again (`walshore resnapshot`, a table that came back to the
//! publication or was created again under its name, or any copy whose table has
//! committed rows in the lake) starts with one `T` row at `_lsn` = point − 1, `_seq` = 0,
//! written by the sink when it commits the copy: a reader
//! replaying in `(_lsn, _seq)` order empties the table there and rebuilds it from the
//! `R` rows that follow. No transaction commits at point − 1 (WAL records start on
//! 8-byte boundaries and the point is one), so the position is free.

mod copy;
pub mod publication;
mod read;
pub mod requests;

use std::collections::BTreeSet;
use std::sync::Arc;

use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use crate::batch::{BatchError, Batcher};
use crate::change::{Change, CopyId, Event, TableIdentity, TxInfo};
use crate::checkpoint::{CheckpointError, announce_copy};
use crate::config::SourceConfig;
use crate::decode::Relation;
use crate::lsn::Lsn;
use crate::retry::Retry;
use crate::sink::{Sink, SinkError, WrittenObject};
use crate::source::{Conn, SourceError, quote_ident, quote_literal, sql};
pub use read::SnapshotTable;
pub use requests::{request_resnapshot, requested};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Connect(#[from] sql::SqlError),
    #[error("table copy: {what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// On a copy connection (an ordinary session spoken by walshore's own client).
    #[error("table copy: {what}: {source}")]
    Source {
        what: String,
        #[source]
        source: crate::source::SourceError,
    },
    #[error("copy of {table}: permission denied; GRANT SELECT ON {table} TO {user}")]
    Permission { table: String, user: String },
    #[error("copy of {table}: malformed COPY data: {what}")]
    Format { table: String, what: String },
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("table copy interrupted by shutdown; it starts again at the next start")]
    Interrupted,
    #[error("table copy task failed: {0}")]
    Task(String),
}

impl SnapshotError {
    /// The copy connection is gone (network, server restart, a terminated backend).
    fn connection_lost(&self) -> bool {
        match self {
            SnapshotError::Sql { source, .. } => {
                source.is_closed()
                    || source.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("57P")
                    })
            }
            SnapshotError::Source { source, .. } => match source {
                SourceError::Io(_) => true,
                SourceError::Server(e) => e.code.starts_with("08") || e.code.starts_with("57P"),
                _ => false,
            },
            _ => false,
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            SnapshotError::Connect(sql::SqlError::Connect { source, .. }) => crate::retry::of_client(source),
            SnapshotError::Connect(sql::SqlError::Tcp { .. } | sql::SqlError::Timeout { .. }) => Retry::Transient,
            SnapshotError::Connect(_) => Retry::Definite,
            SnapshotError::Sql { source, .. } => crate::retry::of_client(source),
            SnapshotError::Source { source, .. } => source.retry(),
            SnapshotError::Sink(e) => e.retry(),
            SnapshotError::Checkpoint(e) => e.retry(),
            _ => Retry::Definite,
        }
    }
}

/// A snapshot point: an exported snapshot and the LSN it corresponds to.
#[derive(Clone, Debug)]
pub struct Point {
    pub snapshot: String,
    pub lsn: Lsn,
    /// µs since the Unix epoch: `_commit_ts` of the copied rows.
    pub taken_at: i64,
}

impl Point {
    pub fn new(snapshot: String, lsn: Lsn) -> Point {
        let taken_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Point {
            snapshot,
            lsn,
            taken_at,
        }
    }
}

struct Table {
    relation: Arc<Relation>,
    name: String,
    /// `ONLY "schema"."table"`, or without ONLY for a partitioned root.
    from: String,
    /// Heap pages when the copy started (0 when unknown, e.g. a partitioned root).
    pages: u64,
    identity: TableIdentity,
}

struct Chunk {
    table: usize,
    index: u32,
    /// Heap pages `[lo, hi)`; `hi` None: to the end.
    lo: u64,
    hi: Option<u64>,
}

/// A copy whose connections hold the snapshot: the exporting connection may now run
/// other commands (or close).
pub struct Prepared {
    id: CopyId,
    point: Point,
    /// The copy connections, each in a transaction on the snapshot.
    workers: Vec<Conn>,
    /// The role they read as, named in a permission error's GRANT.
    user: String,
    tables: Vec<Table>,
    chunks: Vec<Chunk>,
}

/// A table whose copy is uploaded, ready to commit.
#[derive(Debug)]
pub struct TableCopied {
    pub id: CopyId,
    pub table: String,
    pub lsn: Lsn,
    /// µs since the Unix epoch: `_commit_ts` of the copy's rows.
    pub taken_at: i64,
    pub files: Vec<WrittenObject>,
    /// Pending records announcing `files`: completed by the commit that publishes them.
    pub pending: Vec<Path>,
    pub rows: u64,
    /// The columns as copied, for the table's lake schema.
    pub relation: Arc<Relation>,
}

/// What the copy side tells the sink (one channel, so the sink hears it in order).
#[derive(Debug)]
pub enum CopyMsg {
    /// A table's copy is uploaded.
    Copied(TableCopied),
    /// A copy failed; the pipeline stops (and a retry copies the table again).
    Failed(SnapshotError),
    /// A table left the publication. Its changes before it left come before `at` in the
    /// stream, so the sink records the departure (its point and identity go, or only
    /// its membership with `keep_oid`) with the first commit at or past `at`.
    Left { table: String, at: Lsn, keep_oid: bool },
    /// The identity of a table a lake from before identities holds, adopted as found.
    Adopted(String, TableIdentity),
}

/// What a copy needs from the pipeline.
#[derive(Clone)]
pub struct CopyEnv {
    pub sink: Arc<Sink>,
    pub run_id: String,
    /// A commit number no later than the one that publishes the copy.
    pub floor: u64,
    /// Buffered row bytes per connection before a file is written.
    pub buffer_bytes: usize,
    /// Cancelled when the run ends (shutdown, or an error and a restart).
    pub shutdown: CancellationToken,
    /// The run's copies: it waits for them before it returns, so a copy never uploads
    /// after the next start has cleaned up.
    pub tracker: tokio_util::task::TaskTracker,
    /// `sink.unrepresentable`.
    pub unrepresentable: crate::config::Unrepresentable,
    pub partitions: Arc<crate::config::Partitions>,
}

/// Session settings that make COPY's text output the same as pgoutput's.
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; \
                       SET extra_float_digits = 3; SET bytea_output = 'hex'; SET client_encoding = 'UTF8'";

async fn import(cfg: &SourceConfig, snapshot: &str) -> Result<tokio_postgres::Client, SnapshotError> {
    let client = sql::connect(&cfg.conn).await?;
    let stmt = format!(
        "{SESSION}; BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    );
    client.batch_execute(&stmt).await.map_err(|source| SnapshotError::Sql {
        what: "importing the exported snapshot".into(),
        source,
    })?;
    Ok(client)
}

/// [`import`] on a copy connection: walshore's own client, which hands COPY data over
/// a read at a time rather than a message (a row) at a time.
async fn import_session(cfg: &SourceConfig, snapshot: &str) -> Result<Conn, SnapshotError> {
    let what = || "importing the exported snapshot".to_string();
    let mut conn = Conn::connect_session(&cfg.conn)
        .await
        .map_err(|source| SnapshotError::Source { what: what(), source })?;
    let stmt = format!(
        "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    );
    conn.simple_query(&stmt)
        .await
        .map_err(|source| SnapshotError::Source { what: what(), source })?;
    Ok(conn)
}

fn sql_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let what = what.to_owned();
    move |source| SnapshotError::Sql { what, source }
}

/// What to copy: every published table, or only these `schema.table`.
pub type Selection<'a> = Option<&'a BTreeSet<String>>;

/// Imports the snapshot on `parallelism` connections and plans the chunks. The exporting
/// connection must stay idle until this returns.
pub async fn prepare(
    cfg: &SourceConfig,
    point: Point,
    parallelism: usize,
    chunk_bytes: u64,
    id: CopyId,
    only: Selection<'_>,
) -> Result<Prepared, SnapshotError> {
    // The plan is read on a connection of its own (closed when this returns), under
    // the same snapshot; the connections open at once.
    let (catalog, workers) = tokio::try_join!(
        import(cfg, &point.snapshot),
        futures::future::try_join_all((0..parallelism.max(1)).map(|_| import_session(cfg, &point.snapshot))),
    )?;
    let catalog = &catalog;
    let version: i32 = catalog
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(sql_err("reading the server version"))?
        .get(0);
    let chunk_pages = (chunk_bytes / 8192).max(1);
    let mut tables = Vec::new();
    let mut chunks = Vec::new();
    let members = publication::members(catalog, &cfg.publication, version)
        .await
        .map_err(sql_err("reading the publication's members"))?;
    for (relation, partitioned, pages) in publication::tables(catalog, &cfg.publication).await? {
        let name = crate::batch::qualified(&relation);
        if only.is_some_and(|only| !only.contains(&name)) {
            continue;
        }
        let Some(identity) = members.get(&name).cloned() else {
            continue;
        };
        let quoted = format!("{}.{}", quote_ident(&relation.namespace), quote_ident(&relation.name));
        // TID range scans (PostgreSQL 14) make a ctid range read only its pages; before
        // that every chunk would scan the whole table.
        let (n, per) = if partitioned || version < 140_000 {
            (1, pages)
        } else {
            chunking(pages, chunk_pages, parallelism as u64)
        };
        for k in 0..n {
            chunks.push(Chunk {
                table: tables.len(),
                index: k as u32,
                lo: k * per,
                hi: (k + 1 < n).then_some((k + 1) * per),
            });
        }
        tables.push(Table {
            identity,
            name,
            from: if partitioned { quoted } else { format!("ONLY {quoted}") },
            relation: Arc::new(relation),
            pages,
        });
    }
    Ok(Prepared {
        id,
        point,
        workers,
        user: cfg.conn.user.clone(),
        tables,
        chunks,
    })
}

/// How a table of `pages` is cut: the number of chunks and the pages in each (the last
/// is open-ended). At most `chunk_pages` each; a table of more than one chunk is cut in
/// a multiple of `parallelism` equal chunks (unless that is more chunks than pages), so
/// that its connections finish together instead of one reading a short last chunk
/// alone.
fn chunking(pages: u64, chunk_pages: u64, parallelism: u64) -> (u64, u64) {
    let n = pages.div_ceil(chunk_pages).max(1);
    if n == 1 {
        return (1, chunk_pages);
    }
    // Not more chunks than pages: a chunk with no page is a COPY for nothing.
    let even = n.next_multiple_of(parallelism.max(1));
    let n = if even <= pages { even } else { n };
    (n, pages.div_ceil(n))
}

impl Prepared {
    /// Starts the copy on the run's task tracker; it reports to `done`.
    pub fn spawn(self, env: &CopyEnv, done: tokio::sync::mpsc::Sender<CopyMsg>) {
        env.tracker.spawn(self.run(env.clone(), done));
    }

    /// Every table this copy writes, with its identity as of the point and its columns.
    pub fn tables(&self) -> Vec<(String, TableIdentity, Arc<Relation>)> {
        self.tables
            .iter()
            .map(|t| (t.name.clone(), t.identity.clone(), t.relation.clone()))
            .collect()
    }

    pub fn lsn(&self) -> Lsn {
        self.point.lsn
    }
}

/// The `T` row that starts a table copied again: at the copy's point − 1, where no
/// transaction commits (WAL records start on 8-byte boundaries and the point is one),
/// so a reader replaying in `(_lsn, _seq)` order empties the table there. Encoded,
/// announced for a commit at or after `floor`, and uploaded; returns the file and its
/// pending record.
pub async fn truncate_marker(
    sink: &Sink,
    run_id: &str,
    floor: u64,
    partitions: Arc<crate::config::Partitions>,
    unrepresentable: crate::config::Unrepresentable,
    copied: &TableCopied,
) -> Result<(Vec<WrittenObject>, Path), SnapshotError> {
    let mut b = Batcher::new()
        .with_unrepresentable(unrepresentable)
        .with_partitions(partitions);
    b.push(Event::Begin(TxInfo {
        xid: 0,
        commit_lsn: Lsn(copied.lsn.0.saturating_sub(1)),
        commit_ts: copied.taken_at,
    }))?;
    b.push(Event::Relation(copied.relation.clone()))?;
    b.push(Event::Change(Change::Truncate {
        rel_ids: vec![copied.relation.id],
    }))?;
    let encoded = sink.encode_all(b.take().files).await?;
    let pending = announce_copy(
        sink.store().as_ref(),
        floor,
        run_id,
        encoded.iter().map(|e| e.object.key.clone()).collect(),
    )
    .await?;
    let mut files = Vec::new();
    for e in encoded {
        files.push(sink.write(e).await?);
    }
    Ok((files, pending))
}

#[cfg(test)]
mod tests {
    use super::chunking;

    #[test]
    fn a_table_is_cut_in_even_chunks_for_its_connections() {
        // One chunk's worth or less: one chunk, whatever the parallelism.
        assert_eq!(chunking(0, 4096, 2).0, 1);
        assert_eq!(chunking(4096, 4096, 4).0, 1);
        // 73 MiB in 32 MiB chunks on two connections: four even chunks, not 32+32+9.
        assert_eq!(chunking(9346, 4096, 2), (4, 2337));
        assert_eq!(chunking(8192, 4096, 2), (2, 4096));
        assert_eq!(chunking(8193, 4096, 3), (3, 2731));
        // Never more chunks than pages.
        assert_eq!(chunking(5, 1, 4), (5, 1));
        for (pages, chunk, par) in [(9346, 4096, 2), (100_000, 4096, 3), (8, 1, 4), (12_289, 4096, 1)] {
            let (n, per) = chunking(pages, chunk, par);
            assert_eq!(n % par, 0, "{pages} pages: {n} chunks for {par} connections");
            assert!(
                per <= chunk && per * n >= pages && per * (n - 1) < pages,
                "{pages} pages: {n} × {per}"
            );
        }
    }
}
