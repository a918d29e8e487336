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
//! A table copied again (`walshore resnapshot`, or a copy whose table already has rows in
//! the lake) starts with one `T` row at `_lsn` = point − 1, `_seq` = 0: a reader
//! replaying in `(_lsn, _seq)` order empties the table there and rebuilds it from the
//! `R` rows that follow. No transaction commits at point − 1 (WAL records start on
//! 8-byte boundaries and the point is one), so the position is free.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::copy_binary::RowCutter;
use crate::batch::{BatchError, Batcher, Taken, copy_formats};
use crate::change::{Change, Event, TxInfo};
use crate::checkpoint::{CheckpointError, announce_copy};
use crate::config::SourceConfig;
use crate::decode::{Column, Relation, ReplicaIdentity};
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError, WrittenObject};
use crate::source::{Retry, quote_ident, quote_literal, sql};

/// Uploads in flight at once for one flush of a chunk.
const UPLOAD_CONCURRENCY: usize = 4;
/// How often copy progress is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// Where `walshore resnapshot` leaves its requests.
const REQUESTS: &str = "_walshore/requests";

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
            _ => false,
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            SnapshotError::Connect(crate::source::sql::SqlError::Connect { source, .. }) => {
                crate::retry::of_client(source)
            }
            SnapshotError::Connect(_) => Retry::Definite,
            SnapshotError::Sql { source, .. } => crate::retry::of_client(source),
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
    /// Starts with a `T` row: the lake already has rows of this table.
    reset: bool,
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
    point: Point,
    workers: Vec<tokio_postgres::Client>,
    tables: Vec<Table>,
    chunks: Vec<Chunk>,
}

/// A table whose copy is uploaded, ready to commit.
#[derive(Debug)]
pub struct TableCopied {
    pub table: String,
    pub lsn: Lsn,
    pub files: Vec<WrittenObject>,
    /// Pending records announcing `files`: delete once committed.
    pub pending: Vec<Path>,
    pub rows: u64,
    pub reset: bool,
    /// The columns as copied, for the table's lake schema.
    pub relation: Arc<Relation>,
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
    /// The role copying, named in a permission error's GRANT.
    pub user: String,
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

fn sql_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    let what = what.to_owned();
    move |source| SnapshotError::Sql { what, source }
}

/// The published tables as of the snapshot, with the columns pgoutput will send
/// (attnum order, no dropped or generated columns, replica-identity flags).
async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<(Relation, bool, u64)>, SnapshotError> {
    let tables = client
        .query(
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, c.relreplident::text,
                    c.relkind = 'p',
                    (pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8
             FROM pg_catalog.pg_publication_tables pt
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(sql_err("listing the publication's tables"))?;
    let mut out = Vec::new();
    for t in tables {
        let oid: u32 = t.get(0);
        let (schema, name, ident): (String, String, String) = (t.get(1), t.get(2), t.get(3));
        let (partitioned, pages): (bool, i64) = (t.get(4), t.get(5));
        let columns = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod,
                        CASE WHEN $2 = 'f' THEN true
                             ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                          WHERE i.indrelid = a.attrelid AND a.attnum = ANY (i.indkey)
                                            AND CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END)
                        END
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&oid, &ident],
            )
            .await
            .map_err(sql_err("reading table columns"))?;
        let replica_identity = match ident.as_str() {
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            "n" => ReplicaIdentity::Nothing,
            _ => ReplicaIdentity::Default,
        };
        let columns = columns
            .iter()
            .map(|c| Column {
                name: c.get(0),
                type_oid: c.get(1),
                type_modifier: c.get(2),
                key: c.get(3),
            })
            .collect();
        let relation = Relation {
            id: oid,
            namespace: schema,
            name,
            replica_identity,
            columns,
        };
        // Domains as their base type, multi-dimensional arrays as text: as the stream.
        let relation = crate::source::types::resolve(client, &relation)
            .await
            .map_err(sql_err("reading column types"))?;
        out.push((relation, partitioned, pages.max(0) as u64));
    }
    Ok(out)
}

/// What to copy.
pub struct Selection<'a> {
    /// Only these `schema.table` (None: every published table).
    pub only: Option<&'a BTreeSet<String>>,
    /// These start with a `T` row.
    pub reset: &'a BTreeSet<String>,
}

/// Imports the snapshot on `parallelism` connections and plans the chunks. The exporting
/// connection must stay idle until this returns.
pub async fn prepare(
    cfg: &SourceConfig,
    point: Point,
    parallelism: usize,
    chunk_bytes: u64,
    select: Selection<'_>,
) -> Result<Prepared, SnapshotError> {
    let mut workers = Vec::with_capacity(parallelism.max(1));
    for _ in 0..parallelism.max(1) {
        workers.push(import(cfg, &point.snapshot).await?);
    }
    let catalog = &workers[0];
    let version: i32 = catalog
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(sql_err("reading the server version"))?
        .get(0);
    let chunk_pages = (chunk_bytes / 8192).max(1);
    let mut tables = Vec::new();
    let mut chunks = Vec::new();
    for (relation, partitioned, pages) in published_tables(catalog, &cfg.publication).await? {
        let name = crate::batch::qualified(&relation);
        if select.only.is_some_and(|only| !only.contains(&name)) {
            continue;
        }
        let quoted = format!("{}.{}", quote_ident(&relation.namespace), quote_ident(&relation.name));
        // TID range scans (PostgreSQL 14) make a ctid range read only its pages; before
        // that every chunk would scan the whole table.
        let n = if partitioned || version < 140_000 {
            1
        } else {
            pages.div_ceil(chunk_pages).max(1)
        };
        for k in 0..n {
            chunks.push(Chunk {
                table: tables.len(),
                index: k as u32,
                lo: k * chunk_pages,
                hi: (k + 1 < n).then_some((k + 1) * chunk_pages),
            });
        }
        tables.push(Table {
            reset: select.reset.contains(&name),
            name,
            from: if partitioned { quoted } else { format!("ONLY {quoted}") },
            relation: Arc::new(relation),
            pages,
        });
    }
    Ok(Prepared {
        point,
        workers,
        tables,
        chunks,
    })
}

/// Per-table progress, shared by the connections copying its chunks.
struct Progress {
    rows: AtomicU64,
    bytes: AtomicU64,
    pages_done: AtomicU64,
    chunks_left: AtomicU64,
    files: std::sync::Mutex<(Vec<WrittenObject>, Vec<Path>)>,
}

impl Progress {
    /// Keeps a finished chunk's files until the table is done.
    fn hold(&self, files: Vec<WrittenObject>, pending: impl IntoIterator<Item = Path>) {
        let mut held = self.files.lock().expect("files lock");
        held.0.extend(files);
        held.1.extend(pending);
    }
}

impl Prepared {
    /// Starts [`Prepared::run`] on the run's task tracker.
    pub fn spawn(self, env: &CopyEnv, done: mpsc::Sender<Result<TableCopied, SnapshotError>>) {
        env.tracker.spawn(self.run(env.clone(), done));
    }

    /// `schema.table` of every table this copy writes.
    pub fn tables(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }

    pub fn lsn(&self) -> Lsn {
        self.point.lsn
    }

    /// Copies every chunk, sending each table to `done` once all its chunks are
    /// uploaded. Stops at the first error (sent to `done` too) or on shutdown.
    pub async fn run(self, env: CopyEnv, done: mpsc::Sender<Result<TableCopied, SnapshotError>>) {
        let Prepared {
            point,
            workers,
            tables,
            chunks,
        } = self;
        let started = Instant::now();
        let progress: Vec<Progress> = tables
            .iter()
            .enumerate()
            .map(|(i, _)| Progress {
                rows: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                pages_done: AtomicU64::new(0),
                chunks_left: AtomicU64::new(chunks.iter().filter(|c| c.table == i).count() as u64),
                files: std::sync::Mutex::new((Vec::new(), Vec::new())),
            })
            .collect();
        tracing::info!(
            tables = tables.len(),
            chunks = chunks.len(),
            snapshot_point = %point.lsn,
            "table copy started"
        );
        let shared = Arc::new(Shared {
            queue: std::sync::Mutex::new(Queue {
                chunks: chunks.into_iter().collect(),
                connections: workers.len(),
            }),
            stop: env.shutdown.child_token(),
            point,
            tables,
            progress,
            env,
            done,
        });
        // One task per connection: each parses and encodes its own chunks.
        let work = futures::future::join_all(workers.into_iter().map(|client| {
            let shared = shared.clone();
            tokio::spawn(async move { shared.worker(&client).await })
        }));
        let mut work = std::pin::pin!(work);
        let mut log = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        // A progress bar too when a person watches (stderr is a terminal).
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut redraw = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut work => break,
                _ = log.tick() => shared.log_progress(started),
                _ = redraw.tick(), if bar => shared.draw_bar(started),
            }
        }
        if bar {
            eprint!("\r\x1b[K");
        }
        // Every chunk is copied, or an error (or shutdown) said why not.
        if !shared.stop.is_cancelled()
            && shared
                .progress
                .iter()
                .any(|p| p.chunks_left.load(Ordering::Acquire) > 0)
        {
            let _ = shared
                .done
                .send(Err(SnapshotError::Task(
                    "the copy connections ended with chunks left".into(),
                )))
                .await;
        }
        tracing::info!(
            tables = shared.tables.len(),
            rows = shared
                .progress
                .iter()
                .map(|p| p.rows.load(Ordering::Relaxed))
                .sum::<u64>(),
            secs = started.elapsed().as_secs_f64(),
            "table copy read"
        );
    }
}

/// What one chunk has uploaded so far.
#[derive(Default)]
struct ChunkOut {
    files: Vec<WrittenObject>,
    pending: Vec<Path>,
    /// Rows counted in the table's progress.
    rows: u64,
}

impl ChunkOut {
    fn absorb(&mut self, (files, pending): Uploaded) {
        self.files.extend(files);
        self.pending.extend(pending);
    }
}

/// The chunks not taken yet, and the connections still there to take them (one lock:
/// a connection never leaves while another puts a chunk back).
struct Queue {
    chunks: VecDeque<Chunk>,
    connections: usize,
}

/// What the copy connections share.
struct Shared {
    point: Point,
    tables: Vec<Table>,
    progress: Vec<Progress>,
    env: CopyEnv,
    done: mpsc::Sender<Result<TableCopied, SnapshotError>>,
    queue: std::sync::Mutex<Queue>,
    /// Cancelled on shutdown, or when one connection fails.
    stop: CancellationToken,
}

impl Shared {
    async fn worker(&self, client: &tokio_postgres::Client) {
        loop {
            let chunk = {
                let mut queue = self.queue.lock().expect("queue lock");
                match queue.chunks.pop_front() {
                    Some(c) => c,
                    None => {
                        queue.connections -= 1;
                        return;
                    }
                }
            };
            let Err(e) = self.chunk_then_table(client, &chunk).await else {
                continue;
            };
            // A connection lost while others still hold the snapshot: they take its
            // chunk over (chunks already copied are not copied again).
            if (e.connection_lost() || client.is_closed()) && !self.stop.is_cancelled() {
                let table = self.tables[chunk.table].name.clone();
                let index = chunk.index;
                let mut queue = self.queue.lock().expect("queue lock");
                if queue.connections > 1 {
                    queue.connections -= 1;
                    queue.chunks.push_front(chunk);
                    drop(queue);
                    tracing::warn!(table = %table, chunk = index, error = %e, "copy connection lost; its chunk goes back to the queue for the other connections");
                    return;
                }
            }
            if !self.stop.is_cancelled() || matches!(e, SnapshotError::Interrupted) {
                self.stop.cancel();
                let _ = self.done.send(Err(e)).await;
            }
            return;
        }
    }

    async fn chunk_then_table(&self, client: &tokio_postgres::Client, chunk: &Chunk) -> Result<(), SnapshotError> {
        let table = &self.tables[chunk.table];
        let progress = &self.progress[chunk.table];
        let mut out = ChunkOut::default();
        if let Err(e) = self.copy_chunk(client, table, chunk, progress, &mut out).await {
            // Its rows are copied again: take them out of the count and the lake (the
            // files are uncommitted; a pending record lists them for the next start too).
            progress.rows.fetch_sub(out.rows, Ordering::Relaxed);
            for f in &out.files {
                self.env.sink.store().delete(&crate::sink::key_path(&f.key)).await.ok();
            }
            return Err(e);
        }
        progress.hold(out.files, out.pending);
        let pages = chunk.hi.unwrap_or(table.pages.max(chunk.lo)) - chunk.lo;
        progress.pages_done.fetch_add(pages, Ordering::Relaxed);
        if progress.chunks_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        // The table's last chunk: with its marker, the table is ready to commit.
        if table.reset {
            let mut batcher = self.batcher(table, self.point.lsn.0.saturating_sub(1))?;
            batcher.push(Event::Change(Change::Truncate {
                rel_ids: vec![table.relation.id],
            }))?;
            let (files, pending) = upload(&self.env, batcher.take()).await?;
            progress.hold(files, pending);
        }
        let (files, pending) = std::mem::take(&mut *progress.files.lock().expect("files lock"));
        let rows = progress.rows.load(Ordering::Relaxed);
        tracing::info!(table = %table.name, rows, bytes = progress.bytes.load(Ordering::Relaxed), files = files.len(), snapshot_point = %self.point.lsn, "copied table");
        let copied = TableCopied {
            table: table.name.clone(),
            lsn: self.point.lsn,
            files,
            pending,
            rows,
            reset: table.reset,
            relation: table.relation.clone(),
        };
        if self.done.send(Ok(copied)).await.is_err() {
            return Err(SnapshotError::Interrupted);
        }
        Ok(())
    }

    /// A batcher inside the copy's transaction, positioned at `lsn`. Fails on a table
    /// walshore cannot write (a reserved column name, a missing partition column).
    fn batcher(&self, table: &Table, lsn: u64) -> Result<Batcher, BatchError> {
        let mut b = Batcher::new()
            .with_unrepresentable(self.env.unrepresentable)
            .with_partitions(self.env.partitions.clone());
        b.push(Event::Begin(TxInfo {
            xid: 0,
            commit_lsn: Lsn(lsn),
            commit_ts: self.point.taken_at,
        }))?;
        b.push(Event::Relation(table.relation.clone()))?;
        Ok(b)
    }

    async fn copy_chunk(
        &self,
        client: &tokio_postgres::Client,
        table: &Table,
        chunk: &Chunk,
        progress: &Progress,
        out: &mut ChunkOut,
    ) -> Result<(), SnapshotError> {
        // Binary where walshore decodes the binary form (cheaper for PostgreSQL and for
        // us), the output function's text for the rest: its binary COPY form is that
        // text, the same pgoutput sends.
        let binary = copy_formats(&table.relation, &self.env.partitions);
        let cols: Vec<String> = table
            .relation
            .columns
            .iter()
            .zip(&binary)
            .map(|(c, binary)| {
                let q = quote_ident(&c.name);
                // The type's output function, which pgoutput uses too (a cast to
                // text differs for some types: inet adds its netmask). num_nulls: a
                // composite whose fields are all null is not itself null.
                if *binary {
                    q
                } else {
                    format!("CASE WHEN num_nulls({q}) = 0 THEN format('%s', {q}) END")
                }
            })
            .collect();
        let mut range = Vec::new();
        if chunk.lo > 0 {
            range.push(format!("ctid >= '({},0)'::tid", chunk.lo));
        }
        if let Some(hi) = chunk.hi {
            range.push(format!("ctid < '({hi},0)'::tid"));
        }
        let filter = if range.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", range.join(" AND "))
        };
        let sql = format!(
            "COPY (SELECT {} FROM {}{filter}) TO STDOUT (FORMAT binary)",
            cols.join(", "),
            table.from
        );
        let stream = client.copy_out(&sql).await.map_err(|source| {
            if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                SnapshotError::Permission {
                    table: table.from.trim_start_matches("ONLY ").to_owned(),
                    user: quote_ident(&self.env.user),
                }
            } else {
                SnapshotError::Sql {
                    what: format!("COPY {}", table.name),
                    source,
                }
            }
        })?;
        let mut stream = std::pin::pin!(stream.map_err(|source| SnapshotError::Sql {
            what: format!("COPY {}", table.name),
            source
        }));
        let mut batcher = self.batcher(table, self.point.lsn.0)?;
        batcher.set_snapshot_seq(table.relation.id, u64::from(chunk.index) << 32);
        let mut cutter = RowCutter::default();
        let format_err = |what| SnapshotError::Format {
            table: table.name.clone(),
            what,
        };
        let mut counted = 0;
        // One flush uploads while the next is read.
        let mut uploading: Option<tokio::task::JoinHandle<Result<Uploaded, SnapshotError>>> = None;
        let mut ended = false;
        while !ended {
            let block = match stream.next().await {
                Some(data) => {
                    let data = data?;
                    progress.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    match cutter.push(&data).map_err(format_err)? {
                        Some(block) => block,
                        None => continue,
                    }
                }
                None => {
                    ended = true;
                    progress.rows.fetch_add(cutter.rows() - counted, Ordering::Relaxed);
                    out.rows = cutter.rows();
                    std::mem::take(&mut cutter).finish().map_err(format_err)?
                }
            };
            if self.stop.is_cancelled() {
                return Err(SnapshotError::Interrupted);
            }
            if !block.is_empty() {
                batcher.push(Event::Change(Change::SnapshotBinaryRows {
                    rel_id: table.relation.id,
                    rows: block,
                }))?;
            }
            if !ended {
                progress.rows.fetch_add(cutter.rows() - counted, Ordering::Relaxed);
                counted = cutter.rows();
                out.rows = counted;
            }
            if ended || batcher.buffered_bytes() >= self.env.buffer_bytes {
                if let Some(h) = uploading.take() {
                    out.absorb(h.await.map_err(|e| SnapshotError::Task(e.to_string()))??);
                }
                if batcher.has_data() {
                    uploading = Some(tokio::spawn(upload_owned(self.env.clone(), batcher.take())));
                }
            }
        }
        if let Some(h) = uploading.take() {
            out.absorb(h.await.map_err(|e| SnapshotError::Task(e.to_string()))??);
        }
        Ok(())
    }

    /// One line, redrawn in place: the whole copy's share of pages, rows, rate, ETA.
    fn draw_bar(&self, started: Instant) {
        let total: u64 = self.tables.iter().map(|t| t.pages).sum();
        let done: u64 = self.progress.iter().map(|p| p.pages_done.load(Ordering::Relaxed)).sum();
        let rows: u64 = self.progress.iter().map(|p| p.rows.load(Ordering::Relaxed)).sum();
        let bytes: u64 = self.progress.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let share = if total > 0 {
            (done as f64 / total as f64).min(1.0)
        } else {
            0.0
        };
        let width = 30;
        let filled = (share * width as f64) as usize;
        let eta = if done > 0 && total > done {
            format!("ETA {:.0}s", secs * (total - done) as f64 / done as f64)
        } else {
            String::new()
        };
        eprint!(
            "\r\x1b[Kcopy [{}{}] {:>3.0}%  {rows} rows  {:.1} MiB/s  {eta}",
            "=".repeat(filled),
            " ".repeat(width - filled),
            share * 100.0,
            bytes as f64 / 1048576.0 / secs
        );
    }

    fn log_progress(&self, started: Instant) {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        for (table, p) in self.tables.iter().zip(&self.progress) {
            let rows = p.rows.load(Ordering::Relaxed);
            let left = p.chunks_left.load(Ordering::Relaxed);
            if rows == 0 || left == 0 {
                continue;
            }
            let done = p.pages_done.load(Ordering::Relaxed);
            // ETA from the finished chunks' share of the table's pages.
            let eta_secs =
                (done > 0 && table.pages > done).then(|| (secs * (table.pages - done) as f64 / done as f64) as u64);
            tracing::info!(
                table = %table.name,
                rows,
                bytes = p.bytes.load(Ordering::Relaxed),
                percent = (table.pages > 0).then(|| (done * 100 / table.pages).min(100)),
                rows_per_sec = (rows as f64 / secs) as u64,
                eta_secs,
                "copying"
            );
        }
    }
}

type Uploaded = (Vec<WrittenObject>, Option<Path>);

async fn upload_owned(env: CopyEnv, taken: Taken) -> Result<Uploaded, SnapshotError> {
    upload(&env, taken).await
}

/// Encodes, announces and uploads what a copy's batcher holds.
async fn upload(env: &CopyEnv, taken: Taken) -> Result<Uploaded, SnapshotError> {
    if taken.files.is_empty() {
        return Ok((Vec::new(), None));
    }
    let encoded = env.sink.encode_all(taken.files).await?;
    let pending = announce_copy(
        env.sink.store().as_ref(),
        env.floor,
        &env.run_id,
        encoded.iter().map(|e| e.object.key.clone()).collect(),
    )
    .await?;
    crate::fault::point("after_copy_announce");
    let written = futures::stream::iter(encoded.into_iter().map(|e| env.sink.write(e)))
        .buffered(UPLOAD_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    crate::fault::point("after_copy_upload");
    Ok((written, Some(pending)))
}

/// The object of a `walshore resnapshot` request for `schema.table`.
pub fn request_key(table: &str) -> Path {
    let name = format!("{table}.json");
    Path::from_iter(
        REQUESTS
            .split('/')
            .map(PathPart::from)
            .chain([PathPart::from(name.as_str())]),
    )
}

/// Asks the pipeline writing to `store` to copy `table` again.
pub async fn request_resnapshot(store: &dyn ObjectStore, table: &str) -> Result<Path, object_store::Error> {
    let key = request_key(table);
    let body = serde_json::json!({ "table": table, "requested_at": Point::new(String::new(), Lsn::ZERO).taken_at });
    store.put(&key, PutPayload::from(body.to_string().into_bytes())).await?;
    Ok(key)
}

#[derive(serde::Deserialize)]
struct Request {
    table: String,
}

/// The tables with a pending resnapshot request.
pub async fn requested(store: &dyn ObjectStore) -> Result<BTreeSet<String>, object_store::Error> {
    let prefix = Path::from(REQUESTS);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let mut out = BTreeSet::new();
    for m in metas {
        let body = match store.get(&m.location).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Request>(&body) {
            Ok(r) => {
                out.insert(r.table);
            }
            Err(e) => tracing::warn!(key = %m.location, error = %e, "ignoring an unreadable resnapshot request"),
        }
    }
    Ok(out)
}
