//! `walshore verify`: proves, on demand, that the lake equals the source.
//!
//! # One consistent point
//!
//! A temporary logical slot created with `EXPORT_SNAPSHOT` gives a snapshot and the LSN
//! it stands for: transactions that commit before the LSN are visible in it, the others
//! are not (the same point a table copy takes). The source is read in that snapshot
//! (a `REPEATABLE READ` transaction: no lock beyond what a read takes), with the same
//! COPY and decoding as a table copy, so each value is the one the lake would hold.
//! The lake is replayed up to exactly that point: rows at `(_lsn, _seq)` before
//! `(point, 2^62)` (a transaction committing exactly at the point has `_seq` ≥ 2^62 in
//! a copied table and `_lsn` = point elsewhere: both follow it).
//!
//! Before reading the lake, verify waits until it holds everything before the point:
//! the lake's committed `end_lsn`, or the slot's `confirmed_flush_lsn` (walshore
//! confirms only what its lake holds), has reached it. When no walshore streams from
//! the slot, verify asks a temporary copy of it (`pg_copy_logical_replication_slot`:
//! the same position, the same plugin), without consuming anything
//! (`pg_logical_slot_peek_binary_changes` up to the point): if no change of the
//! publication waits there, the lake is complete up to the point. The copy is what the
//! peek holds while it decodes, never the slot itself, so a walshore that starts
//! meanwhile streams as ever; the copy goes with verify's session.
//!
//! # Bounded memory
//!
//! Each side is spilled to buckets on disk by a hash of the row's key (of the whole row
//! for a table without one), and each bucket is compared with a digest first: an
//! order-free sum of 128-bit hashes of its rows. The lake's bucket is replayed in
//! `(_lsn, _seq)` order (`T` empties, `R`/`I`/`U` upsert by key, `D` deletes, a value
//! PostgreSQL did not send is carried forward); only when the digests differ is the
//! source's bucket read back to name what differs. Memory holds one bucket; the number
//! of buckets follows the table's size.

pub mod compare;
mod iceberg;
mod manifest;
pub mod report;
pub mod rows;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStore, ObjectStoreExt};

use crate::batch::SNAPSHOT_TIE_SEQ;
use crate::checkpoint::{CheckpointError, CommitRecord, read_head};
use crate::config::{Config, SnapshotMode};
use crate::lsn::Lsn;
use crate::snapshot::{self, SnapshotError, SnapshotTable};
use crate::source::{SourceError, quote_ident, sql};
pub use report::{IcebergReport, Outcome, Report, TableReport, read_last};

/// `application_name` of verify's connections, so that a DBA sees them for what they are
/// (`pg_stat_activity`; a peek that holds the slot for a moment names it).
pub const APPLICATION: &str = "walshore verify";

/// Row data decoded from the source before it is spilled.
const SOURCE_BUFFER: usize = 8 * 1024 * 1024;
/// Spilled bytes per bucket the bucket count aims at: a bucket's replay holds a few
/// times this in memory.
const BUCKET_BYTES: u64 = 8 * 1024 * 1024;
/// At most this many buckets (files open at once per side).
const MAX_BUCKETS: u64 = 1024;
/// Lake files fetched at once.
const FETCH_CONCURRENCY: usize = 16;
/// How often a long run says how far it got.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Options {
    /// `schema.table` to verify; all published tables when empty.
    pub tables: Vec<String>,
    /// Print values of the rows found differing (the lake may hold personal data).
    pub show_values: bool,
    /// How long to wait for the lake to reach the point.
    pub timeout: Duration,
    /// Keys shown per kind of difference and table.
    pub samples: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sql(#[from] sql::SqlError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the lake at {0} has no commit yet: run walshore (run or sync) first, then verify")]
    NoLake(String),
    #[error(
        "replication slot {0:?} does not exist: the lake's pipeline is not set up on this database (check source.slot)"
    )]
    NoSlot(String),
    #[error(
        "the lake has not reached the verify point {point} after {waited:?}: its committed position is {reached}{why}; verify again once it has (or raise --timeout)"
    )]
    NotReached {
        point: Lsn,
        reached: Lsn,
        waited: Duration,
        why: String,
    },
    #[error("reading {key} from the lake: {what}")]
    Lake { key: String, what: String },
    #[error("{table}: {what}")]
    Compare { table: String, what: String },
    #[error(
        "verify's spill directory {dir}: {source}; set source.spill_dir to a directory with room for the largest table"
    )]
    Spill {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("querying the source: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl VerifyError {
    pub fn exit_code(&self) -> u8 {
        match self {
            VerifyError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Compares the lake with the source at one consistent point, records the outcome in
/// the lake and returns the report.
pub async fn verify(cfg: &Config, opts: &Options) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let started_at = crate::checkpoint::record::now_micros();
    let store = crate::sink::open_store(&cfg.sink).map_err(|e| VerifyError::Usage(e.to_string()))?;
    if read_head(store.as_ref()).await?.is_none() {
        return Err(VerifyError::NoLake(cfg.sink.url.to_string()));
    }
    let mut source = cfg.source.clone();
    source.conn.application_name = APPLICATION.into();

    // The point: a snapshot and its LSN, imported by a reading connection, then the
    // temporary slot goes (the import keeps the snapshot).
    let (repl, exported, point) = take_point(&source).await?;
    let selection: Option<BTreeSet<String>> = (!opts.tables.is_empty()).then(|| opts.tables.iter().cloned().collect());
    let mut prepared = snapshot::prepare(
        &source,
        snapshot::Point::new(exported, point),
        1,
        u64::MAX,
        0,
        selection.as_ref(),
    )
    .await?;
    repl.close().await;
    let tables = prepared.snapshot_tables();
    for t in &opts.tables {
        if !tables.iter().any(|s| &s.name == t) {
            return Err(VerifyError::Usage(format!(
                "{t} is not a table of publication {:?} (give --table as schema.table)",
                source.publication
            )));
        }
    }
    tracing::info!(point = %point, tables = tables.len(), "verify: consistent point taken");

    let reached = wait_for_lake(&source, store.as_ref(), point, opts.timeout).await?;
    // Resnapshots asked for and not yet committed: their tables' changes are held back
    // from the lake until the copy commits.
    let requested = snapshot::requested(store.as_ref())
        .await
        .map_err(|e| VerifyError::Lake {
            key: "_walshore/requests".into(),
            what: e.to_string(),
        })?;
    tracing::info!(point = %point, lake = %reached, "verify: the lake holds everything before the point");
    let dir = std::fs::create_dir_all(&cfg.source.spill_dir)
        .and_then(|()| {
            tempfile::Builder::new()
                .prefix("walshore-verify-")
                .tempdir_in(&cfg.source.spill_dir)
        })
        .map_err(|source| VerifyError::Spill {
            dir: cfg.source.spill_dir.display().to_string(),
            source,
        })?;
    let spill_err = |source| VerifyError::Spill {
        dir: dir.path().display().to_string(),
        source,
    };
    let partitions = Arc::new(cfg.partitions.clone());
    // The tables' folders first, then the pending records, then the commit log: a file
    // listed was announced before its upload, so by the time the log is read it is either
    // still announced or committed (or deleted by a start's clean-up: checked again).
    // The lists go to the spill directory: their size is the lake's age.
    let mut listed = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        listed.push(Some(
            manifest::spill_listing(store.as_ref(), &t.name, dir.path(), i).await?,
        ));
    }
    // As paths, the form a listing gives (a key with escapes parses to the same path).
    let announced: std::collections::HashSet<object_store::path::Path> =
        crate::checkpoint::announced_keys(store.as_ref())
            .await?
            .iter()
            .map(|k| crate::sink::key_path(k))
            .collect();
    // Each covered Iceberg table before the commit log: its watermark is then at or
    // before every record the log gives.
    let mut icebergs = Vec::new();
    for t in &tables {
        icebergs.push(iceberg::load(cfg, store.clone(), &t.name).await);
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let mut committed = manifest::spill_committed(store.as_ref(), &names, dir.path()).await?;
    // The head as of the manifest: which copies it holds, of which tables.
    let head = read_head(store.as_ref())
        .await?
        .ok_or_else(|| VerifyError::NoLake(cfg.sink.url.to_string()))?;

    // The source first, all tables, so that the snapshot is held no longer than reading
    // takes; then the lake, table by table.
    let mut plans = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let files = &committed[i];
        if let Some(reason) = unverifiable(cfg, &head, &requested, table, point) {
            plans.push(Plan::Skip(TableReport::unverified(&table.name, reason)));
            listed[i] = None;
            continue;
        }
        let cols = rows::Columns::new(&table.relation).map_err(|what| VerifyError::Compare {
            table: table.name.clone(),
            what,
        })?;
        let buckets = bucket_count(table.bytes, files.bytes);
        let mut side = compare::SourceSide::new(dir.path(), i, buckets).map_err(spill_err)?;
        let mut last_log = Instant::now();
        let rows = prepared
            .read_table(i, cfg.sink.unrepresentable, &partitions, SOURCE_BUFFER, |batch| {
                side.add(&cols, &batch).map_err(|what| VerifyError::Compare {
                    table: table.name.clone(),
                    what,
                })?;
                if last_log.elapsed() >= PROGRESS_INTERVAL {
                    last_log = Instant::now();
                    tracing::info!(table = %table.name, rows = side.rows, "verify: reading the source");
                }
                Ok::<(), VerifyError>(())
            })
            .await?;
        let (paths, digests, counted) = side.finish().map_err(spill_err)?;
        debug_assert_eq!(rows, counted);
        plans.push(Plan::Compare {
            table: table.name.clone(),
            cols,
            source: (paths, digests, rows),
        });
    }
    drop(prepared);

    let cutoff = (point.0 as i64, SNAPSHOT_TIE_SEQ as i64);
    let mut reports = Vec::new();
    for (i, plan) in plans.into_iter().enumerate() {
        let (table, cols, (paths, digests, rows)) = match plan {
            Plan::Skip(r) => {
                reports.push(r);
                continue;
            }
            Plan::Compare { table, cols, source } => (table, cols, source),
        };
        let files = &mut committed[i];
        let mut report = TableReport::new(&table);
        report.source_rows = rows;
        report.lake_files = files.files;
        let listing = listed[i].take().expect("listed above");
        for path in manifest::strays(listing, files, &announced, dir.path())? {
            // Deleted since the listing (a start's clean-up of an uncommitted file).
            if store.head(&path).await.is_err() {
                continue;
            }
            report.files_stray += 1;
            problem(
                &mut report,
                format!("{path}: in the table's folder, named by no commit record (query engines read it)"),
            );
        }
        let mut lake = compare::LakeSide::new(dir.path(), i, digests.len(), cutoff).map_err(spill_err)?;
        let none = HashSet::new();
        read_lake(
            store.clone(),
            &table,
            &cols,
            files,
            cutoff,
            &none,
            &mut lake,
            &mut report,
        )
        .await?;
        report.lake_changes = lake.changes;
        let (lake_paths, truncates) = lake.finish().map_err(spill_err)?;
        compare::compare(
            &cols,
            (&paths, &digests),
            (&lake_paths, &truncates),
            opts.samples,
            opts.show_values,
            &mut report,
        )
        .map_err(spill_err)?;
        for p in paths.iter().chain(&lake_paths) {
            let _ = std::fs::remove_file(p);
        }
        if let Some(loaded) = icebergs[i].take() {
            let job = iceberg::Job {
                store: store.clone(),
                head: &head,
                dir: dir.path(),
                spill: committed.len() + i,
                buckets: digests.len(),
                table: &table,
                cols: &cols,
                files: &committed[i],
                samples: opts.samples,
                show_values: opts.show_values,
            };
            let checked = iceberg::compare(job, loaded).await?;
            tracing::info!(table = %table, result = ?checked.result, seq = checked.seq, "verify: Iceberg table compared");
            report.iceberg = Some(checked);
        }
        report.settle();
        tracing::info!(table = %table, result = ?report.result, rows = report.source_rows, "verify: table compared");
        reports.push(report);
    }
    let report = Report::new(point.to_string(), started_at, started.elapsed().as_secs_f64(), reports);
    if let Err(e) = report::write_last(store.as_ref(), &report).await {
        tracing::warn!(error = %e, key = %report::last_key(), "cannot record the verification in the lake; status will not show it");
    }
    Ok(report)
}

/// Notes a damaged, missing or stray file by name (the first few).
fn problem(report: &mut TableReport, what: String) {
    const SHOWN: usize = 5;
    if report.file_problems.len() < SHOWN {
        report.file_problems.push(what);
    }
}

enum Plan {
    Skip(TableReport),
    Compare {
        table: String,
        cols: rows::Columns,
        source: (Vec<std::path::PathBuf>, Vec<rows::Digest>, u64),
    },
}

/// Why a table's lake cannot stand for the source at `point`, if it cannot.
fn unverifiable(
    cfg: &Config,
    head: &CommitRecord,
    requested: &std::collections::BTreeMap<String, Vec<String>>,
    table: &SnapshotTable,
    point: Lsn,
) -> Option<String> {
    const AGAIN: &str = "verify again once status shows its new snapshot_lsn";
    if let Some(identity) = head.identities.get(&table.name) {
        if identity.oid != table.relation.id {
            return Some(format!(
                "the lake holds an earlier table of this name (OID {}; the source's is {}): walshore copies the new one; {AGAIN}",
                identity.oid, table.relation.id
            ));
        }
        if cfg.snapshot == SnapshotMode::Initial && (identity.departed || !identity.continues_as(&table.identity)) {
            return Some(format!(
                "it left the publication and came back: walshore copies it again; {AGAIN}"
            ));
        }
    }
    if requested.contains_key(&table.name) {
        return Some(format!(
            "a resnapshot of it is under way (its changes wait for the copy); {AGAIN}"
        ));
    }
    match head.snapshots.get(&table.name) {
        Some(copied) if *copied > point => Some(format!(
            "the lake's copy of it was taken at {copied}, after the verify point: verify again"
        )),
        None if cfg.snapshot == SnapshotMode::Initial => Some(format!(
            "its copy is not committed yet (a table new to the publication); {AGAIN}"
        )),
        _ => None,
    }
}

/// Buckets for a table: enough that each holds about [`BUCKET_BYTES`] of spilled rows,
/// judged from the heap's size and the lake's compressed files (a few times larger once
/// decoded).
fn bucket_count(heap_bytes: u64, lake_bytes: u64) -> usize {
    let spilled = heap_bytes.max(lake_bytes.saturating_mul(6));
    spilled.div_ceil(BUCKET_BYTES).clamp(1, MAX_BUCKETS) as usize
}

/// Takes the consistent point, saying every ten seconds which transactions it waits for.
async fn take_point(
    source: &crate::config::SourceConfig,
) -> Result<(crate::source::Replication, String, Lsn), VerifyError> {
    let mut take = std::pin::pin!(crate::source::Replication::export_temporary(source));
    let started = Instant::now();
    loop {
        tokio::select! {
            r = &mut take => return Ok(r?),
            _ = tokio::time::sleep(PROGRESS_INTERVAL) => {
                let open = match sql::connect(&source.conn).await {
                    Ok(c) => sql::open_transactions(&c).await,
                    Err(e) => Err(e.to_string()),
                };
                let blocking = match open {
                    Ok(list) => list.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    Err(e) => format!("cannot read pg_stat_activity: {e}"),
                };
                tracing::warn!(
                    waiting_secs = started.elapsed().as_secs(),
                    blocking = %blocking,
                    "verify waits for its consistent point: PostgreSQL takes it once the transactions open when it was asked for have ended"
                );
            }
        }
    }
}

/// Waits until the lake holds every change committed before `point`; returns the
/// position it has reached.
async fn wait_for_lake(
    source: &crate::config::SourceConfig,
    store: &dyn ObjectStore,
    point: Lsn,
    timeout: Duration,
) -> Result<Lsn, VerifyError> {
    let client = sql::connect(&source.conn).await?;
    let started = Instant::now();
    let mut peeked: Option<Instant> = None;
    let mut waiting: Option<u64> = None;
    loop {
        let committed = read_head(store).await?.map_or(Lsn::ZERO, |h| h.end_lsn);
        let slot = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&source.slot],
            )
            .await?
            .ok_or_else(|| VerifyError::NoSlot(source.slot.clone()))?;
        let confirmed: Lsn = slot
            .get::<_, Option<String>>(0)
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn::ZERO);
        let active: bool = slot.get(1);
        let reached = committed.max(confirmed);
        if reached >= point {
            return Ok(reached);
        }
        if !active && peeked.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
            peeked = Some(Instant::now());
            match pending_changes(&client, source, point).await {
                Ok(0) => return Ok(point),
                Ok(n) => {
                    if waiting.is_none() {
                        tracing::warn!(
                            slot = %source.slot,
                            changes = n,
                            "no walshore is streaming from the slot, and changes committed before the verify point wait there: start walshore (run or sync)"
                        );
                    }
                    waiting = Some(n);
                }
                // Taken by a walshore meanwhile: its confirmations will tell.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if started.elapsed() >= timeout {
            let why = match waiting {
                Some(n) if !active => format!(
                    ", no walshore is streaming from slot {:?} and {n} change(s) committed before the point wait in it: start walshore (run or sync)",
                    source.slot
                ),
                _ => String::new(),
            };
            return Err(VerifyError::NotReached {
                point,
                reached,
                waited: timeout,
                why,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Changes of the publication committed before `point` that the slot has not yet
/// delivered and confirmed, read without consuming them, from a temporary copy of the
/// slot (dropped before this returns, and with the session in any case).
async fn pending_changes(
    client: &tokio_postgres::Client,
    source: &crate::config::SourceConfig,
    point: Lsn,
) -> Result<u64, tokio_postgres::Error> {
    // Up to the point − 1: a commit record starting at the point follows it, and no
    // record starts at point − 1 (records start on 8-byte boundaries).
    let upto = Lsn(point.0.saturating_sub(1)).to_string();
    let copy = format!("walshore_verify_{:016x}", rand::random::<u64>());
    client
        .query_one(
            "SELECT 1 FROM pg_catalog.pg_copy_logical_replication_slot($1, $2, true)",
            &[&source.slot, &copy],
        )
        .await?;
    let peeked = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL,
                 'proto_version', '1', 'publication_names', $3)
             WHERE get_byte(data, 0) IN (73, 85, 68, 84)",
            &[&copy, &upto, &quote_ident(&source.publication)],
        )
        .await;
    if let Err(e) = client
        .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&copy])
        .await
    {
        tracing::debug!(slot = %copy, error = %e, "cannot drop verify's copy of the slot; it goes with the session");
    }
    Ok(peeked?.get::<_, i64>(0) as u64)
}

/// Reads the table's committed files (the part of them before the cutoff, none of
/// `skip`) into `lake`, several fetches in flight while one is decoded; the list is read
/// from its spill as the fetches go.
#[allow(clippy::too_many_arguments)]
async fn read_lake(
    store: Arc<dyn ObjectStore>,
    table: &str,
    cols: &rows::Columns,
    files: &manifest::TableFiles,
    cutoff: (i64, i64),
    skip: &HashSet<String>,
    lake: &mut compare::LakeSide,
    report: &mut TableReport,
) -> Result<(), VerifyError> {
    use futures::StreamExt;
    let listed = files.entries().map_err(|source| VerifyError::Spill {
        dir: "verify's spill directory".into(),
        source,
    })?;
    let broken = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = broken.clone();
    let skip = skip.clone();
    let wanted = listed
        .map_while(move |e| match e {
            Ok(e) => Some(e),
            Err(what) => {
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
                None
            }
        })
        .filter(move |e| !e.replaced && (e.first_lsn as i64, e.first_seq as i64) < cutoff && !skip.contains(&e.key))
        .map(|e| (e.key, e.rows));
    let total = files.files;
    // Fetches run ahead (several at once); one blocking thread decodes file after file
    // and hands over a few batches at a time, while this task encodes and spills them.
    let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::channel(FETCH_CONCURRENCY);
    let fetches = futures::stream::iter(wanted.map(move |(key, rows)| {
        let store = store.clone();
        tokio::spawn(async move {
            let path = crate::sink::key_path(&key);
            let got = match store.get(&path).await {
                Ok(g) => g.bytes().await,
                Err(e) => Err(e),
            };
            (key, rows, got)
        })
    }))
    .buffered(FETCH_CONCURRENCY);
    let feeder = tokio::spawn(async move {
        let mut fetches = std::pin::pin!(fetches);
        while let Some(joined) = fetches.next().await {
            let item = joined.map_err(|e| e.to_string());
            if fetched_tx.send(item).await.is_err() {
                break;
            }
        }
    });
    let (decoded_tx, mut decoded) = tokio::sync::mpsc::channel(4);
    let names = cols.names.clone();
    let decoder = tokio::task::spawn_blocking(move || {
        while let Some(item) = fetched_rx.blocking_recv() {
            let (key, rows, got) = match item {
                Ok(x) => x,
                Err(what) => {
                    let _ = decoded_tx.blocking_send(Decoded::Failed(String::new(), what));
                    return;
                }
            };
            let ended = match got {
                Err(object_store::Error::NotFound { .. }) => Decoded::Missing(key),
                Err(e) => Decoded::Failed(key, e.to_string()),
                Ok(bytes) => match decode_file(bytes, &names, |batch| {
                    decoded_tx.blocking_send(Decoded::Batch(batch)).is_ok()
                }) {
                    Ok(found) => Decoded::End { key, rows, found },
                    Err(what) => Decoded::Failed(key, what),
                },
            };
            if decoded_tx.blocking_send(ended).is_err() {
                return;
            }
        }
    });
    let mut done = 0;
    let mut last_log = Instant::now();
    let result = loop {
        let Some(next) = decoded.recv().await else {
            break Ok(());
        };
        match next {
            Decoded::Batch(batch) => {
                if let Err(what) = lake.add(cols, &batch) {
                    break Err(VerifyError::Lake {
                        key: table.into(),
                        what,
                    });
                }
            }
            Decoded::Missing(key) => {
                report.files_missing += 1;
                problem(
                    report,
                    format!(
                        "{key}: named by the commit log, missing from the lake (deleted by hand, or by a lifecycle rule?)"
                    ),
                );
            }
            Decoded::Failed(key, what) => {
                let key = if key.is_empty() { table.to_owned() } else { key };
                break Err(VerifyError::Lake { key, what });
            }
            Decoded::End { key, rows, found } => {
                if found != rows {
                    report.files_damaged += 1;
                    problem(
                        report,
                        format!("{key}: holds {found} rows, its commit record says {rows}"),
                    );
                }
                done += 1;
                if last_log.elapsed() >= PROGRESS_INTERVAL {
                    last_log = Instant::now();
                    tracing::info!(
                        table,
                        files = done,
                        of = total,
                        changes = lake.changes,
                        "verify: reading the lake"
                    );
                }
            }
        }
    };
    // On an error the channels close and both stop at their next hand-over.
    drop(decoded);
    feeder.abort();
    let _ = decoder.await;
    if let Some(what) = broken.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(VerifyError::Lake {
            key: format!("{table} (verify's list of its committed files)"),
            what,
        });
    }
    result
}

/// What the decoding thread hands over.
enum Decoded {
    Batch(arrow::record_batch::RecordBatch),
    /// A file's batches are all handed over: the rows its footer gives, and its
    /// commit record's.
    End {
        key: String,
        rows: u64,
        found: u64,
    },
    Missing(String),
    Failed(String, String),
}

/// Decodes one Parquet file, the compared columns (`names`) and the metadata, handing
/// each batch to `each` (which returns false to stop); returns the rows its footer gives.
fn decode_file(
    bytes: bytes::Bytes,
    names: &[String],
    mut each: impl FnMut(arrow::record_batch::RecordBatch) -> bool,
) -> Result<u64, String> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| e.to_string())?;
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            matches!(f.name().as_str(), "_op" | "_lsn" | "_seq" | "_unchanged") || names.contains(f.name())
        })
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|e| e.to_string())?;
    for batch in reader {
        if !each(batch.map_err(|e| e.to_string())?) {
            break;
        }
    }
    Ok(rows)
}
