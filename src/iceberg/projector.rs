//! The projector: keeps an Iceberg table per covered lake table equal to the change log,
//! by tailing walshore's own commit log. It is not in the slot's confirmation path: it
//! runs beside the pipeline (`run`), lags, catches up, and `sync` waits for it at the
//! end.
//!
//! Exactly once: each table's snapshot carries the commit-log record it holds
//! (`walshore.seq`, `walshore.lsn`); a start reads it and applies the records after it.
//! A crash before a snapshot's metadata file is written leaves the table at its
//! previous watermark, and the records are applied again. Tables that had nothing to
//! apply keep an older watermark; `_walshore/iceberg/progress.json` records the record
//! up to which every table it names was current, so a start does not re-read the log
//! from a quiet table's last change. A table whose records were pruned from the log
//! before it caught up (or a new table, or one added to `[iceberg] tables` later) is
//! rebuilt from the whole log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::Int64Type;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

use super::fold::{FoldError, IndexMemory, KeyHash, KeyIndex, Prepared, fold};
use super::manifest::ManifestEntry;
use super::schema::Identity;
use super::table::{Commit, Location, Table, TableError, WATERMARK_LSN, WATERMARK_SEQ};
use crate::checkpoint::{CheckpointError, CommitRecord, read_head, read_schemas, walk_manifest};
use crate::config::{Config, IcebergConfig};
use crate::sink::WrittenObject;

const PROGRESS: &str = "_walshore/iceberg/progress.json";
/// A bucket is compacted (its live rows rewritten into one data file, its delete files
/// dropped) once it has more data files than this...
const COMPACT_DATA_FILES: usize = 2;
/// ... or more than 1 in this many of its rows deleted.
const COMPACT_DELETED_SHARE: u64 = 5;
/// Compaction snapshots a table takes an interval at most...
const COMPACT_PASSES: usize = 4;
/// ... each rewriting up to this many `max_fold`s of rows, a bucket at a time.
const COMPACT_FOLDS: u64 = 4;
/// Memory a row takes while it is folded, beyond its stored bytes, about (its decoded
/// values, the order, key hash and image of the fold, the rows it becomes): a fold
/// holds at most `max_fold / FOLD_ROW_BYTES` rows, however well they compress.
const FOLD_ROW_BYTES: u64 = 256;

/// What a fold (or a compaction) has taken so far, against `max_fold`.
#[derive(Default)]
struct Budget {
    bytes: u64,
    rows: u64,
}

impl Budget {
    fn add(&mut self, bytes: u64, rows: u64) {
        self.bytes += bytes;
        self.rows += rows;
    }

    fn spent(&self, max_fold: u64) -> bool {
        self.bytes >= max_fold || self.rows.saturating_mul(FOLD_ROW_BYTES) >= max_fold
    }

    /// Rows of a file of `bytes` and `rows` that fit one fold (at least one).
    fn rows_per_fold(bytes: u64, rows: u64, max_fold: u64) -> u64 {
        let by_rows = max_fold / FOLD_ROW_BYTES;
        let by_bytes = (rows as u128 * max_fold as u128 / bytes.max(1) as u128) as u64;
        by_rows.min(by_bytes).max(1)
    }
}

/// What one snapshot of a fold takes: change-log files, whole, or rows `offset ..
/// offset + len` of a single file (a first build's file larger than `max_fold`).
#[derive(Clone, Copy)]
struct FoldInput<'a> {
    files: &'a [WrittenObject],
    rows: Option<(usize, usize)>,
}

impl<'a> FoldInput<'a> {
    fn whole(files: &'a [WrittenObject]) -> FoldInput<'a> {
        FoldInput { files, rows: None }
    }
}

/// The snapshots a build from the whole change log takes, in order: `files` (one
/// table's, every record's) put in (_lsn, _seq) order, the order the fold takes their
/// rows in, then cut into folds of `max_fold`; a table readers already see (`whole`) is
/// folded in one. A part ends only where every file after it starts past every row
/// before it, as a part folds its own rows only: files may overlap (partitions of one
/// flush interleave, and a copy's record holds the changes held back for it). A copy's
/// record lists its chunks in the order they ended: left so, a part could end only
/// where every chunk before it had ended (a first build of ten million keys folded two
/// million rows at once).
fn build_parts(files: &mut [WrittenObject], whole: bool, max_fold: u64) -> Vec<FoldInput<'_>> {
    files.sort_by_key(|f| f.first);
    let f: &[WrittenObject] = files;
    let mut later_first = vec![None; f.len() + 1];
    for i in (0..f.len()).rev() {
        later_first[i] = Some(later_first[i + 1].map_or(f[i].first, |l: crate::batch::RowPos| l.min(f[i].first)));
    }
    // A file that alone outgrows `max_fold` (a copy's hold a million rows) is folded
    // in slices of rows, where no other file's rows fall between its first and last:
    // its rows are in (_lsn, _seq) order.
    let mut parts: Vec<FoldInput> = Vec::new();
    let (mut start, mut budget) = (0, Budget::default());
    let mut last_so_far: Option<crate::batch::RowPos> = None;
    for (i, file) in f.iter().enumerate() {
        let clean_before = match (last_so_far, later_first[i]) {
            (Some(last), Some(next)) => last < next,
            _ => true,
        };
        let clean_after = later_first[i + 1].is_none_or(|next| file.last < next);
        let mut alone = Budget::default();
        alone.add(file.bytes, file.rows);
        let slices = Budget::rows_per_fold(file.bytes, file.rows, max_fold);
        if !whole && alone.spent(max_fold) && clean_before && clean_after && file.rows > slices {
            if start < i {
                parts.push(FoldInput::whole(&f[start..i]));
            }
            for offset in (0..file.rows).step_by(slices as usize) {
                let len = slices.min(file.rows - offset);
                parts.push(FoldInput {
                    files: &f[i..=i],
                    rows: Some((offset as usize, len as usize)),
                });
            }
            (start, budget) = (i + 1, Budget::default());
            last_so_far = Some(last_so_far.map_or(file.last, |l| l.max(file.last)));
            continue;
        }
        budget.add(file.bytes, file.rows);
        last_so_far = Some(last_so_far.map_or(file.last, |l| l.max(file.last)));
        let clean_cut = match (last_so_far, later_first[i + 1]) {
            (Some(last), Some(next)) => last < next,
            _ => true,
        };
        if budget.spent(max_fold) && !whole && clean_cut {
            parts.push(FoldInput::whole(&f[start..=i]));
            (start, budget) = (i + 1, Budget::default());
        }
    }
    if start < f.len() || parts.is_empty() {
        parts.push(FoldInput::whole(&f[start..]));
    }
    parts
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("the commit log: {0}")]
    Log(#[from] CheckpointError),
    #[error("{key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{key}: reading Parquet: {source}")]
    Parquet {
        key: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("Iceberg table of {table}: {source}")]
    Fold {
        table: String,
        #[source]
        source: FoldError,
    },
    #[error("sink: {0}")]
    Open(#[from] crate::sink::StoreError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{0}")]
    NoTable(String),
    #[error("table {table} (and {others} other failures logged before): {source}")]
    InTable {
        table: String,
        others: usize,
        #[source]
        source: Box<ProjectError>,
    },
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    /// Every table in `tables` holds the commit log up to this record.
    seq: u64,
    tables: Vec<String>,
}

struct Projected {
    table: Table,
    index: KeyIndex,
    /// The commit-log record up to which the table is current.
    applied: u64,
    /// When its snapshots were last expired.
    expired_at: Option<std::time::Instant>,
    /// The metadata version Glue was last pointed at.
    pointed: Option<u64>,
}

pub struct Projector {
    store: Arc<dyn ObjectStore>,
    sink_uri: String,
    cfg: IcebergConfig,
    tables: HashMap<String, Projected>,
    /// Tables not projected, already warned about.
    skipped: HashSet<String>,
    /// Tables that took a snapshot since their last compaction check.
    dirty: HashSet<String>,
    /// This pass's failed tables, each with its error.
    failures: Vec<(String, ProjectError)>,
    progress: Option<Progress>,
    /// `[catalog] kind = "glue"`: each table is registered under the analyst's name.
    glue: Option<Config>,
    catalog: Option<crate::catalog::Catalog>,
    /// The bound all tables' key indexes share.
    memory: Arc<IndexMemory>,
}

async fn get(store: &dyn ObjectStore, key: &Path) -> Result<Bytes, ProjectError> {
    let err = |source| ProjectError::Store {
        key: key.to_string(),
        source,
    };
    store.get(key).await.map_err(err)?.bytes().await.map_err(err)
}

/// The batches of a Parquet object, only the named top-level columns when given.
fn parquet_batches(key: &str, bytes: Bytes, columns: Option<&[String]>) -> Result<Vec<RecordBatch>, ProjectError> {
    parquet_rows(key, bytes, columns, None)
}

/// The rows of a Parquet file (`rows`: only `offset .. offset + len`), decoded.
fn parquet_rows(
    key: &str,
    bytes: Bytes,
    columns: Option<&[String]>,
    rows: Option<(usize, usize)>,
) -> Result<Vec<RecordBatch>, ProjectError> {
    let err = |source| ProjectError::Parquet {
        key: key.to_owned(),
        source,
    };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(err)?;
    if let Some((offset, len)) = rows {
        builder = builder.with_offset(offset).with_limit(len);
    }
    if let Some(columns) = columns {
        let indices: Vec<usize> = columns
            .iter()
            .filter_map(|c| builder.schema().index_of(c).ok())
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(err)?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(parquet::errors::ParquetError::ArrowError(e.to_string())))
}

/// The positions the position-delete files `deletes` name: data file → positions.
async fn deleted_positions(
    table: &Table,
    deletes: &[&ManifestEntry],
) -> Result<HashMap<String, HashSet<i64>>, ProjectError> {
    let mut deleted: HashMap<String, HashSet<i64>> = HashMap::new();
    for x in deletes {
        let body = table.read(&x.file.path).await?;
        for b in parquet_batches(&x.file.path, body, None)? {
            let paths = b.column(0).as_string::<i32>();
            let pos = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                deleted
                    .entry(paths.value(i).to_owned())
                    .or_default()
                    .insert(pos.value(i));
            }
        }
    }
    Ok(deleted)
}

fn concat(batches: &[RecordBatch], schema: arrow::datatypes::SchemaRef) -> Result<RecordBatch, FoldError> {
    Ok(arrow::compute::concat_batches(&schema, batches)?)
}

/// The projector's progress record in the lake: the commit-log record every table it
/// lists holds (compaction waits for it before deleting replaced files).
pub async fn progress_of(store: &dyn ObjectStore) -> Option<(u64, Vec<String>)> {
    let body = get(store, &Path::from(PROGRESS)).await.ok()?;
    let p: Progress = serde_json::from_slice(&body).ok()?;
    Some((p.seq, p.tables))
}

/// Where the Iceberg table of `schema.table` lives in the sink at `sink_uri` (`store`).
pub fn location_of(store: Arc<dyn ObjectStore>, sink_uri: &str, table: &str) -> Location {
    let rel = format!("_iceberg/{}", table.replacen('.', "/", 1));
    Location {
        store,
        root: Path::from(rel.as_str()),
        uri: format!("{}/{rel}", sink_uri.trim_end_matches('/')),
    }
}

/// The rows of data file `path` that are live (the positions in `gone` are deleted),
/// every column, in file order (None: it has no rows).
async fn live_rows_of(
    table: &Table,
    path: &str,
    gone: Option<&HashSet<i64>>,
) -> Result<Option<RecordBatch>, ProjectError> {
    let fold_err = |source| ProjectError::Fold {
        table: table.location_uri().to_owned(),
        source,
    };
    let body = table.read(path).await?;
    let batches = parquet_batches(path, body, None)?;
    let Some(first) = batches.first() else {
        return Ok(None);
    };
    let all = concat(&batches, first.schema()).map_err(fold_err)?;
    let Some(gone) = gone.filter(|g| !g.is_empty()) else {
        return Ok(Some(all));
    };
    let keep = arrow::array::BooleanArray::from_iter((0..all.num_rows() as i64).map(|pos| Some(!gone.contains(&pos))));
    arrow::compute::filter_record_batch(&all, &keep)
        .map(Some)
        .map_err(|e| fold_err(e.into()))
}

/// Hands `each` the live rows of `table`'s current snapshot, a data file at a time
/// (as written: conform them to read them as the table's schema); returns how many.
pub async fn read_live_rows(
    table: &Table,
    mut each: impl FnMut(RecordBatch) -> Result<(), String>,
) -> Result<u64, String> {
    let live = table.live_files().await.map_err(|e| e.to_string())?;
    let mut rows = 0;
    for (_, (data, deletes)) in by_bucket(&live) {
        let deleted = deleted_positions(table, &deletes).await.map_err(|e| e.to_string())?;
        for d in data {
            let Some(kept) = live_rows_of(table, &d.file.path, deleted.get(&d.file.path))
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let kept = table
                .schema()
                .conform(&kept)
                .map_err(|e| format!("{}: {e}", d.file.path))?;
            rows += kept.num_rows() as u64;
            each(kept)?;
        }
    }
    Ok(rows)
}

/// `batch`'s rows in the order of the `keys` columns (as arrow's row format orders
/// them: bytes for strings, as Parquet's statistics do), so that a reader looking up a
/// key finds it in one row group of a compacted file.
fn sorted_by(batch: &RecordBatch, keys: &[String]) -> Result<RecordBatch, FoldError> {
    let columns: Vec<arrow::array::ArrayRef> = keys.iter().filter_map(|k| batch.column_by_name(k).cloned()).collect();
    if columns.is_empty() {
        return Ok(batch.clone());
    }
    let fields = columns
        .iter()
        .map(|c| arrow::row::SortField::new(c.data_type().clone()))
        .collect();
    let rows = arrow::row::RowConverter::new(fields)?.convert_columns(&columns)?;
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_unstable_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));
    let order = UInt32Array::from(order);
    let sorted = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c.as_ref(), &order, None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), sorted)?)
}

/// A bucket's live files: (data, position deletes).
type BucketFiles<'a> = (Vec<&'a ManifestEntry>, Vec<&'a ManifestEntry>);

/// Live files by bucket.
fn by_bucket(live: &[ManifestEntry]) -> BTreeMap<Option<i32>, BucketFiles<'_>> {
    let mut buckets: BTreeMap<Option<i32>, BucketFiles<'_>> = BTreeMap::new();
    for e in live {
        let b = buckets.entry(e.file.partition).or_default();
        if e.file.content == super::manifest::DATA {
            b.0.push(e);
        } else {
            b.1.push(e);
        }
    }
    buckets
}

/// Rows the files hold (data rows, or deleted positions), as the manifests count them.
fn records(files: &[&ManifestEntry]) -> u64 {
    files.iter().map(|e| e.file.record_count.max(0) as u64).sum()
}

/// Live rows of a bucket, as its manifests count them.
fn live_rows((data, deletes): &BucketFiles<'_>) -> u64 {
    records(data).saturating_sub(records(deletes))
}

/// Commit record `seq`, which the log must hold (below its head, above what it pruned).
async fn required_record(store: &dyn ObjectStore, seq: u64) -> Result<CommitRecord, ProjectError> {
    Ok(crate::checkpoint::log::required_commit(store, seq, "below the head, above the pruned records").await?)
}

/// The key columns of a data file, in file order (None: it has no rows).
async fn key_rows(table: &Table, keys: &[String], path: &str) -> Result<Option<RecordBatch>, ProjectError> {
    let bytes = table.read(path).await?;
    let batches = parquet_batches(path, bytes, Some(keys))?;
    let Some(first) = batches.first() else {
        return Ok(None);
    };
    concat(&batches, first.schema())
        .map(Some)
        .map_err(|source| ProjectError::Fold {
            table: table.location_uri().to_owned(),
            source,
        })
}

impl Projector {
    /// The projector of `cfg`'s `[iceberg]`, or None when it has none.
    pub fn new(cfg: &Config) -> Result<Option<Projector>, ProjectError> {
        let Some(iceberg) = &cfg.iceberg else {
            return Ok(None);
        };
        Ok(Some(Projector {
            store: crate::sink::open_store(&cfg.sink)?,
            sink_uri: cfg.sink.url.as_str().trim_end_matches('/').to_owned(),
            cfg: iceberg.clone(),
            tables: HashMap::new(),
            skipped: HashSet::new(),
            dirty: HashSet::new(),
            failures: Vec::new(),
            progress: None,
            glue: cfg.glue.is_some().then(|| cfg.clone()),
            catalog: None,
            memory: IndexMemory::new(iceberg.index_memory),
        }))
    }

    /// The projector's progress record: the commit-log record every table it lists
    /// holds (`status`).
    pub async fn progress_seq(&self) -> Option<(u64, Vec<String>)> {
        progress_of(self.store.as_ref()).await
    }

    /// Where the Iceberg table of `schema.table` lives.
    pub fn location(&self, table: &str) -> Location {
        location_of(self.store.clone(), &self.sink_uri, table)
    }

    /// Projects on every `commit_interval` until `stop`; a failure is logged and the
    /// next interval tries again (from what the tables hold).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.commit_interval) => {}
            }
            // A stop cuts a projection short: whatever it had not published is folded
            // again by the next start.
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.catch_up() => r,
            };
            if let Err(e) = result {
                tracing::error!(error = %crate::retry::ErrorChain(&e), "Iceberg projection failed; trying again in the next interval");
                if crate::telemetry::enabled() {
                    metrics::counter!(crate::telemetry::names::ICEBERG_ERRORS).increment(1);
                }
            }
        }
    }

    /// Brings every covered table up to the head of the commit log. Returns the record
    /// reached.
    pub async fn catch_up(&mut self) -> Result<u64, ProjectError> {
        let Some(head) = read_head(self.store.as_ref()).await? else {
            return Ok(0);
        };
        if self.progress.is_none() {
            self.progress = Some(match get(self.store.as_ref(), &Path::from(PROGRESS)).await {
                Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
                Err(ProjectError::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => Progress::default(),
                Err(e) => return Err(e),
            });
        }
        let schemas = read_schemas(self.store.as_ref()).await?;
        let mut names: Vec<&String> = schemas.keys().filter(|t| self.cfg.covers(t)).collect();
        names.sort();
        for name in names {
            if self.skipped.contains(name) {
                continue;
            }
            if let Some(mut p) = self.tables.remove(name) {
                // Columns added, dropped or widened since: the schema follows, and the
                // index is read again (a key column may have widened).
                let evolved = match p.table.evolve(&schemas[name]).await {
                    Ok(true) => {
                        tracing::info!(table = %name, schema_id = p.table.schema().schema_id, "Iceberg schema evolved with the source's columns");
                        self.index(name, &p.table).await.map(Some)
                    }
                    Ok(false) => Ok(None),
                    Err(e) => Err(e.into()),
                };
                match evolved {
                    Ok(index) => {
                        if let Some(index) = index {
                            p.index = index;
                        }
                        self.tables.insert(name.clone(), p);
                    }
                    Err(e) => self.fail(name, e),
                }
                continue;
            }
            if let Err(e) = self.open(name, &schemas[name]).await {
                self.fail(name, e);
            }
        }
        self.gauge_behind(head.seq);
        self.apply_log(&head).await?;
        self.compact_dirty().await?;
        self.expire_due().await?;
        self.point_glue().await?;
        self.gauge_tables(head.seq);
        let mut tables: Vec<String> = self.tables.keys().cloned().collect();
        tables.sort();
        let progress = Progress { seq: head.seq, tables };
        let body = serde_json::to_vec(&progress).expect("progress serializes");
        self.store
            .put(&Path::from(PROGRESS), PutPayload::from(body))
            .await
            .map_err(|source| ProjectError::Store {
                key: PROGRESS.into(),
                source,
            })?;
        self.progress = Some(progress);
        // One table's failure held back no other: report it now, and the failed
        // tables are loaded again next time.
        self.take_failures()?;
        Ok(head.seq)
    }

    /// The first failure of this pass, if any (each was logged when it happened).
    fn take_failures(&mut self) -> Result<(), ProjectError> {
        let mut failures = std::mem::take(&mut self.failures);
        if failures.is_empty() {
            return Ok(());
        }
        let (table, source) = failures.swap_remove(0);
        Err(ProjectError::InTable {
            table,
            others: failures.len(),
            source: Box::new(source),
        })
    }

    /// Records a table's failure; the other tables go on.
    fn fail(&mut self, table: &str, e: ProjectError) {
        tracing::error!(table, error = %crate::retry::ErrorChain(&e), "an Iceberg table failed; the others go on, and it is tried again next interval");
        self.failures.push((table.to_owned(), e));
    }

    /// Builds the Iceberg table of `name` again from the whole change log, in a snapshot
    /// that replaces every file it had. Returns the commit-log record it holds.
    pub async fn rebuild(&mut self, name: &str) -> Result<u64, ProjectError> {
        let Some(head) = read_head(self.store.as_ref()).await? else {
            return Err(ProjectError::NoTable("the lake has no commit yet".into()));
        };
        let schemas = read_schemas(self.store.as_ref()).await?;
        let Some(lake) = schemas.get(name) else {
            let mut known: Vec<&String> = schemas.keys().collect();
            known.sort();
            return Err(ProjectError::NoTable(format!(
                "the lake has no table {name} (it has {known:?}); give it as schema.table"
            )));
        };
        if !self.cfg.covers(name) {
            return Err(ProjectError::NoTable(format!("[iceberg] tables does not cover {name}")));
        }
        // Only this table: the progress record (which names every table) is left alone.
        self.progress = Some(Progress::default());
        self.open(name, lake).await?;
        let Some(p) = self.tables.get_mut(name) else {
            return Err(ProjectError::NoTable(format!(
                "{name} has a primary key with a float or array column, which Iceberg cannot identify rows by: it has no Iceberg table"
            )));
        };
        p.applied = 0;
        self.apply_log(&head).await?;
        self.compact_dirty().await?;
        self.point_glue().await?;
        self.take_failures()?;
        Ok(head.seq)
    }

    /// Loads (or creates) the Iceberg table of `name`, and indexes its live rows.
    async fn open(&mut self, name: &str, lake: &crate::batch::schema::LakeSchema) -> Result<(), ProjectError> {
        let location = self.location(name);
        let mut table = match Table::load(location.clone()).await? {
            Some(mut t) => {
                t.repair_hint().await?;
                t.evolve(lake).await?;
                t
            }
            None => {
                if Identity::of(lake) == Identity::Unsupported {
                    tracing::warn!(
                        table = name,
                        "not projected into Iceberg: its primary key has a float or array column, which Iceberg cannot identify rows by"
                    );
                    self.skipped.insert(name.to_owned());
                    return Ok(());
                }
                Table::create(location, lake, self.cfg.buckets).await?
            }
        };
        // With Glue, no metadata version is deleted until Glue is known to name one.
        table.keep_from(self.glue.is_some().then_some(0));
        let index = self.index(name, &table).await?;
        let progress = self.progress.as_ref().expect("loaded first");
        let watermark = table.watermark().map_or(0, |(seq, _)| seq);
        let applied = if watermark > 0 && progress.tables.iter().any(|t| t == name) {
            watermark.max(progress.seq)
        } else {
            watermark
        };
        self.tables.insert(
            name.to_owned(),
            Projected {
                table,
                index,
                applied,
                expired_at: None,
                pointed: None,
            },
        );
        Ok(())
    }

    /// The key index of a table's live rows: its data files' key columns minus the
    /// positions its delete files name, bucket by bucket while `index_memory` allows
    /// (the others are looked up from their files when an interval touches them).
    async fn index(&self, name: &str, table: &Table) -> Result<KeyIndex, ProjectError> {
        let fold_err = |source| ProjectError::Fold {
            table: name.to_owned(),
            source,
        };
        let mut index =
            KeyIndex::new(table.schema(), table.metadata().default_spec(), self.memory.clone()).map_err(fold_err)?;
        let live = table.live_files().await?;
        for (bucket, files) in by_bucket(&live) {
            let part = KeyIndex::part(bucket);
            if !index.fits(live_rows(&files)) {
                index.release(part);
                continue;
            }
            Self::read_bucket(table, &mut index, part, &files, None).await?;
        }
        let (held, of) = index.held();
        if held < of {
            tracing::info!(
                table = name,
                held,
                buckets = of,
                index_memory = self.cfg.index_memory,
                "the Iceberg key index holds only some buckets within [iceberg] index_memory; the others are looked up from their files"
            );
        }
        Ok(index)
    }

    /// Reads a bucket's keys from its files: all of them into the index when it holds
    /// the bucket, else only where the keys in `wanted` are.
    async fn read_bucket(
        table: &Table,
        index: &mut KeyIndex,
        part: usize,
        (data, deletes): &BucketFiles<'_>,
        wanted: Option<&HashSet<KeyHash>>,
    ) -> Result<(), ProjectError> {
        let fold_err = |source| ProjectError::Fold {
            table: table.location_uri().to_owned(),
            source,
        };
        let deleted = deleted_positions(table, deletes).await?;
        let keys = index.key_columns().to_vec();
        let none = HashSet::new();
        for e in data {
            let path = &e.file.path;
            let Some(rows) = key_rows(table, &keys, path).await? else {
                continue;
            };
            let gone = deleted.get(path).unwrap_or(&none);
            match wanted {
                Some(wanted) if !index.holds(part) => {
                    for (pos, h) in index.hashes_of(&rows).map_err(fold_err)?.into_iter().enumerate() {
                        if wanted.contains(&h) && !gone.contains(&(pos as i64)) {
                            index.resolve(h, path, pos as u32);
                        }
                    }
                }
                _ => index.add_file(path, part, &rows, gone).map_err(fold_err)?,
            }
        }
        Ok(())
    }

    /// Looks up the keys of buckets the index does not hold (`unheld`), from the
    /// buckets' files; a bucket that fits within `index_memory` again is held from now on.
    async fn resolve(&self, p: &mut Projected, unheld: BTreeMap<usize, HashSet<KeyHash>>) -> Result<(), ProjectError> {
        let live = p.table.live_files().await?;
        let buckets: BTreeMap<usize, BucketFiles<'_>> = by_bucket(&live)
            .into_iter()
            .map(|(b, files)| (KeyIndex::part(b), files))
            .collect();
        for (part, wanted) in unheld {
            // No file: no key there.
            let Some(files) = buckets.get(&part) else { continue };
            if p.index.fits(live_rows(files)) {
                p.index.hold(part);
            }
            Self::read_bucket(&p.table, &mut p.index, part, files, Some(&wanted)).await?;
        }
        Ok(())
    }

    /// Applies the commit log after each table's `applied` up to `head`.
    async fn apply_log(&mut self, head: &CommitRecord) -> Result<(), ProjectError> {
        if self.tables.values().all(|t| t.applied >= head.seq) {
            return Ok(());
        }
        let lsn = head.end_lsn.0;
        // Records at or below the head's `pruned` are gone: a table that needs them is
        // rebuilt from the whole log.
        let rebuild: Vec<String> = self
            .tables
            .iter()
            .filter(|(_, t)| t.applied == 0 || t.applied < head.pruned)
            .map(|(n, _)| n.clone())
            .collect();
        if !rebuild.is_empty() {
            // The manifest as of `head`: the build holds the records up to it only (its
            // watermark), or the next pass would apply later ones twice (a multiset's
            // inserts are not idempotent). A compaction after `head` does not count
            // yet: the files it replaced stay until the table has passed it.
            let mut files: BTreeMap<String, Vec<WrittenObject>> = BTreeMap::new();
            walk_manifest(self.store.as_ref(), head, 1, |l| {
                if !l.replaced && rebuild.contains(&l.file.table) {
                    files.entry(l.file.table.clone()).or_default().push(l.file);
                }
                Ok(())
            })
            .await?;
            for name in &rebuild {
                let mut f = files.remove(name).unwrap_or_default();
                tracing::info!(table = %name, files = f.len(), "building the Iceberg table from the whole change log");
                // A table readers already see is replaced in one snapshot: they see
                // the old state until the new one is whole. A table built for the
                // first time is built in parts of `max_fold`; only the last snapshot
                // carries the watermark, so a build cut short starts over.
                let whole = self.tables.get(name).is_some_and(|p| {
                    p.table
                        .metadata()
                        .current_snapshot()
                        .is_some_and(|s| s.summary.contains_key(WATERMARK_SEQ))
                });
                let parts = build_parts(&mut f, whole, self.cfg.max_fold);
                let last = parts.len() - 1;
                for (i, part) in parts.into_iter().enumerate() {
                    let at = (i == last).then_some((head.seq, lsn));
                    if let Err(e) = self.apply(name, part, at, i == 0).await {
                        self.fail(name, e);
                        break;
                    }
                }
            }
        }
        let Some(from) = self.tables.values().map(|t| t.applied).filter(|a| *a < head.seq).min() else {
            return Ok(());
        };
        let mut pending: BTreeMap<String, Vec<WrittenObject>> = BTreeMap::new();
        let mut budget = Budget::default();
        for seq in from + 1..=head.seq {
            let record = required_record(self.store.as_ref(), seq).await?;
            for f in record.files {
                if self.tables.get(&f.table).is_some_and(|t| t.applied < seq) {
                    budget.add(f.bytes, f.rows);
                    pending.entry(f.table.clone()).or_default().push(f);
                }
            }
            if budget.spent(self.cfg.max_fold) || seq == head.seq {
                let at = (seq, record.end_lsn.0);
                for (name, files) in std::mem::take(&mut pending) {
                    if let Err(e) = self.apply(&name, FoldInput::whole(&files), Some(at), false).await {
                        self.fail(&name, e);
                    }
                }
                budget = Budget::default();
                for t in self.tables.values_mut() {
                    t.applied = t.applied.max(seq);
                }
            }
        }
        Ok(())
    }

    /// Folds `part` (change-log files of `name`, in `(_lsn, _seq)` order) into one snapshot
    /// with the watermark `at` (none: a part of a rebuild); `rebuild` empties the table
    /// first. On failure the table is dropped from memory and loaded again next time.
    async fn apply(
        &mut self,
        name: &str,
        part: FoldInput<'_>,
        at: Option<(u64, u64)>,
        rebuild: bool,
    ) -> Result<(), ProjectError> {
        let Some(mut p) = self.tables.remove(name) else {
            return Ok(());
        };
        let result = self.apply_to(&mut p, name, part, at, rebuild).await;
        if let Ok(committed) = result {
            if committed {
                self.dirty.insert(name.to_owned());
            }
            self.tables.insert(name.to_owned(), p);
        }
        result.map(|_| ())
    }

    /// How far behind the head each table is, before it catches up.
    fn gauge_behind(&self, head: u64) {
        if !crate::telemetry::enabled() {
            return;
        }
        for (name, p) in &self.tables {
            metrics::gauge!(crate::telemetry::names::ICEBERG_BEHIND, "table" => name.clone())
                .set(head.saturating_sub(p.applied) as f64);
        }
    }

    /// Each table's gauges once it has caught up.
    fn gauge_tables(&self, head: u64) {
        use crate::telemetry::names::*;
        if !crate::telemetry::enabled() {
            return;
        }
        for (name, p) in &self.tables {
            let table = name.clone();
            metrics::gauge!(ICEBERG_BEHIND, "table" => table.clone()).set(head.saturating_sub(p.applied) as f64);
            for (content, label) in [
                (super::manifest::DATA, "data"),
                (super::manifest::POSITION_DELETES, "deletes"),
            ] {
                metrics::gauge!(ICEBERG_FILES, "table" => table.clone(), "content" => label)
                    .set(p.table.live_file_count(content) as f64);
            }
            metrics::gauge!(ICEBERG_SNAPSHOTS, "table" => table).set(p.table.metadata().snapshots.len() as f64);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(ICEBERG_PROJECTED).set(now);
    }

    /// Points each table's Glue entry at its current metadata file, when it moved.
    async fn point_glue(&mut self) -> Result<(), ProjectError> {
        let Some(cfg) = &self.glue else {
            return Ok(());
        };
        if self.catalog.is_none() {
            let glue = cfg.glue.as_ref().expect("glue is set");
            self.catalog = Some(crate::catalog::Catalog::open(glue, &cfg.sink, &cfg.partitions).await);
        }
        let catalog = self.catalog.as_mut().expect("opened");
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        for name in names {
            let p = self.tables.get_mut(&name).expect("listed");
            if p.pointed == Some(p.table.version()) || p.table.metadata().current_snapshot().is_none() {
                continue;
            }
            match catalog
                .point_iceberg(
                    &name,
                    p.table.location_uri(),
                    &p.table.metadata_location(),
                    p.table.schema(),
                )
                .await
            {
                Ok(()) => {
                    p.pointed = Some(p.table.version());
                    p.table.keep_from(p.pointed);
                }
                // The table itself is fine: Glue is pointed again next time.
                Err(e) => self.failures.push((name.clone(), e.into())),
            }
        }
        Ok(())
    }

    /// Expires each table's old snapshots and deletes what nothing reaches: at most
    /// once an hour (or once a retention, when that is shorter), and whenever a table
    /// holds a quarter more snapshots than `max_snapshots` (each pass reads every
    /// retained snapshot's manifest list: not at every commit).
    async fn expire_due(&mut self) -> Result<(), ProjectError> {
        let every = self.cfg.snapshot_retention.min(std::time::Duration::from_secs(3600));
        let max_snapshots = self.cfg.max_snapshots;
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        for name in names {
            let p = self.tables.get_mut(&name).expect("listed");
            let crowded = p.table.metadata().snapshots.len() > max_snapshots + (max_snapshots / 4).max(1);
            if p.expired_at.is_some_and(|t| t.elapsed() < every) && !crowded {
                continue;
            }
            match p.table.expire(self.cfg.snapshot_retention, max_snapshots).await {
                Ok((snapshots, objects)) => {
                    p.expired_at = Some(std::time::Instant::now());
                    if snapshots + objects > 0 {
                        tracing::info!(table = %name, snapshots, objects, "Iceberg snapshots expired and unreachable files deleted");
                    }
                }
                Err(e) => {
                    // Loaded again next time: the failure may have come after a publish.
                    self.tables.remove(&name);
                    self.fail(&name, e.into());
                }
            }
        }
        Ok(())
    }

    /// Compacts the buckets of the tables that took snapshots, where files piled up.
    async fn compact_dirty(&mut self) -> Result<(), ProjectError> {
        let dirty: HashSet<String> = self.dirty.drain().collect();
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        for name in names {
            let quiet = !dirty.contains(&name);
            // A quiet table already in its best shape is not read again.
            let p = &self.tables[&name];
            let buckets = p.table.metadata().default_spec().buckets().unwrap_or(1);
            let shaped = p.table.live_file_count(super::manifest::POSITION_DELETES) == 0
                && p.table.live_file_count(super::manifest::DATA) <= i64::from(buckets);
            if quiet && shaped {
                continue;
            }
            let Some(mut p) = self.tables.remove(&name) else {
                continue;
            };
            // `max_fold` a snapshot, a few snapshots an interval: a table whose
            // buckets all came due at once is compacted whole, in bounded memory.
            let mut result = Ok(true);
            for _ in 0..COMPACT_PASSES {
                result = self.compact(&mut p, &name, quiet).await;
                if !matches!(result, Ok(true)) {
                    break;
                }
            }
            match result {
                Ok(_) => {
                    self.tables.insert(name, p);
                }
                Err(e) => self.fail(&name, e),
            }
        }
        Ok(())
    }

    /// One `replace` snapshot that keeps each bucket's files few, so that a reader opens
    /// few: a bucket with more than [`COMPACT_DATA_FILES`] data files, or more than a
    /// fifth of its rows deleted, is rewritten (its live rows, sorted by key, into one
    /// data file, written as soon as it is read; its data and delete files removed),
    /// those most in need first and at most [`COMPACT_FOLDS`] `max_fold`s of them a
    /// snapshot, the rest in the next snapshot or interval. Elsewhere, a
    /// bucket's delete files are merged into one (positions only). A `quiet` table (it
    /// took no snapshot this interval) has every bucket with a delete file or more than
    /// one data file rewritten: a table that stops changing ends at one file a bucket.
    /// Returns whether buckets due were left for the next snapshot.
    async fn compact(&self, p: &mut Projected, name: &str, quiet: bool) -> Result<bool, ProjectError> {
        let fold_err = |source| ProjectError::Fold {
            table: name.to_owned(),
            source,
        };
        // A rebuild under way (no watermark yet) is not compacted.
        let Some((seq, lsn)) = p.table.watermark() else {
            return Ok(false);
        };
        let live = p.table.live_files().await?;
        let buckets = by_bucket(&live);
        let mut rewrite: Vec<(f64, usize, &BucketFiles<'_>)> = Vec::new();
        let mut merge: Vec<&Vec<&ManifestEntry>> = Vec::new();
        for (bucket, files) in &buckets {
            let (data, deletes) = files;
            let (rows, gone) = (records(data), records(deletes));
            let due = data.len() > COMPACT_DATA_FILES || gone * COMPACT_DELETED_SHARE > rows.max(1);
            // A table with nothing new: any bucket not yet in its best shape.
            let tidy = quiet && (data.len() > 1 || !deletes.is_empty());
            if due || tidy {
                let need = data.len() as f64 + gone as f64 / rows.max(1) as f64;
                rewrite.push((need, KeyIndex::part(*bucket), files));
            } else if deletes.len() > 1 {
                merge.push(deletes);
            }
        }
        rewrite.sort_by(|a, b| b.0.total_cmp(&a.0));
        let schema = p.table.schema().clone();
        // Each bucket's rows are written as soon as they are read: one bucket in memory.
        let mut written = Vec::new();
        let mut keys = Vec::new();
        let mut remove = Vec::new();
        let mut budget = Budget::default();
        let mut left = false;
        let mut rewritten = Vec::new();
        for (_, part, (data, deletes)) in rewrite {
            // One bucket in memory at a time: a snapshot may rewrite several folds' worth.
            if budget.spent(self.cfg.max_fold.saturating_mul(COMPACT_FOLDS)) {
                left = true;
                break;
            }
            let deleted = deleted_positions(&p.table, deletes).await?;
            remove.extend(deletes.iter().map(|x| x.file.path.clone()));
            rewritten.push(part);
            let mut kept = Vec::new();
            for d in data {
                budget.add(d.file.file_size as u64, d.file.record_count as u64);
                remove.push(d.file.path.clone());
                if let Some(k) = live_rows_of(&p.table, &d.file.path, deleted.get(&d.file.path)).await? {
                    kept.push(schema.conform(&k).map_err(|e| fold_err(e.into()))?);
                }
            }
            if let Some(first) = kept.first() {
                let all = concat(&kept, first.schema()).map_err(fold_err)?;
                let sorted = sorted_by(&all, p.index.key_columns()).map_err(fold_err)?;
                drop((kept, all));
                for (file, rows) in p.table.write_ahead(&sorted).await? {
                    // Only the key columns stay, for the index.
                    let columns: Vec<usize> = p
                        .index
                        .key_columns()
                        .iter()
                        .filter_map(|k| rows.schema().index_of(k).ok())
                        .collect();
                    let rows = rows.project(&columns).map_err(|e| fold_err(e.into()))?;
                    keys.push((file.path.clone(), file.partition, rows));
                    written.push(file);
                }
            }
        }
        let mut deletes = BTreeMap::new();
        for files in merge {
            let positions = deleted_positions(&p.table, files).await?;
            remove.extend(files.iter().map(|x| x.file.path.clone()));
            deletes.extend(
                positions
                    .into_iter()
                    .map(|(target, p)| (target, p.into_iter().collect())),
            );
        }
        if remove.is_empty() {
            return Ok(false);
        }
        let committed_removed = remove.clone();
        let commit = Commit {
            written,
            deletes,
            remove,
            summary: BTreeMap::from([
                (WATERMARK_SEQ.to_owned(), seq.to_string()),
                (WATERMARK_LSN.to_owned(), lsn.to_string()),
            ]),
            replace: true,
            ..Commit::default()
        };
        p.table.commit(commit).await?;
        // A rewritten bucket's keys are all in its new file: its old places go first
        // (a multiset's would stay beside the new ones), then its old files' ids.
        for part in rewritten {
            p.index.reset(part);
        }
        p.index.forget(&committed_removed);
        for (path, bucket, rows) in &keys {
            p.index
                .add_file(path, KeyIndex::part(*bucket), rows, &HashSet::new())
                .map_err(fold_err)?;
        }
        tracing::info!(
            table = name,
            files = keys.len(),
            removed = committed_removed.len(),
            "Iceberg buckets compacted"
        );
        if crate::telemetry::enabled() {
            metrics::counter!(crate::telemetry::names::ICEBERG_COMPACTIONS, "table" => name.to_owned()).increment(1);
        }
        Ok(left)
    }

    async fn apply_to(
        &self,
        p: &mut Projected,
        name: &str,
        part: FoldInput<'_>,
        at: Option<(u64, u64)>,
        rebuild: bool,
    ) -> Result<bool, ProjectError> {
        let fold_err = |source| ProjectError::Fold {
            table: name.to_owned(),
            source,
        };
        let mut batches = Vec::new();
        for f in part.files {
            let key = Path::from(f.key.as_str());
            let bytes = get(self.store.as_ref(), &key).await?;
            batches.extend(parquet_rows(&f.key, bytes, None, part.rows)?);
        }
        let schema = p.table.schema().clone();
        let prepared = Prepared::new(&schema, &p.index, &batches).map_err(fold_err)?;
        if !rebuild {
            let unheld = prepared.unheld(&p.index);
            if !unheld.is_empty() {
                self.resolve(p, unheld).await?;
            }
        }
        let folded = fold(&schema, &p.index, prepared, rebuild).map_err(fold_err)?;
        if folded.missed() > 0 {
            tracing::warn!(
                table = name,
                rows = folded.missed(),
                "deletes of rows the Iceberg table does not hold (a table without a key: a row that predates the lake, or whose image differs, such as a column added with a default); walshore verify names the difference"
            );
        }
        if folded.is_empty() {
            p.index.settle();
            if let Some((seq, _)) = at {
                p.applied = seq;
            }
            return Ok(false);
        }
        // Values PostgreSQL did not send, carried forward from the table's rows.
        let mut carried = BTreeMap::new();
        for (path, positions) in folded.needs(&p.index) {
            let bytes = p.table.read(&path).await?;
            let batches = parquet_batches(&path, bytes, None)?;
            let Some(first) = batches.first() else { continue };
            let all = concat(&batches, first.schema()).map_err(fold_err)?;
            let take = UInt32Array::from_iter_values(positions.iter().map(|p| *p as u32));
            let columns = all
                .columns()
                .iter()
                .map(|c| arrow::compute::take(c.as_ref(), &take, None))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fold_err(e.into()))?;
            let rows = RecordBatch::try_new(all.schema(), columns).map_err(|e| fold_err(e.into()))?;
            let rows = schema.conform(&rows).map_err(|e| fold_err(e.into()))?;
            carried.insert(path, (positions, rows));
        }
        let mut commit = folded.into_commit(&schema, &mut p.index, &carried).map_err(fold_err)?;
        if let Some((seq, lsn)) = at {
            commit.summary = BTreeMap::from([
                (WATERMARK_SEQ.to_owned(), seq.to_string()),
                (WATERMARK_LSN.to_owned(), lsn.to_string()),
            ]);
        }
        let committed = p.table.commit(commit).await?;
        crate::fault::point("iceberg_after_commit");
        for (path, bucket, rows) in &committed.data_files {
            p.index
                .add_file(path, KeyIndex::part(*bucket), rows, &HashSet::new())
                .map_err(fold_err)?;
        }
        p.index.settle();
        let shed = p.index.shed();
        if shed > 0 {
            tracing::info!(
                table = name,
                buckets = shed,
                index_memory = self.cfg.index_memory,
                "the Iceberg key index outgrew [iceberg] index_memory: buckets let go are looked up from their files"
            );
        }
        if let Some((seq, _)) = at {
            p.applied = seq;
        }
        tracing::debug!(table = name, seq = ?at, snapshot = committed.snapshot_id, "Iceberg snapshot committed");
        Ok(true)
    }
}

/// Starts the projector of `cfg` beside the pipeline (`run`): None without `[iceberg]`.
pub fn start(cfg: &Config, stop: CancellationToken) -> Result<Option<tokio::task::JoinHandle<()>>, ProjectError> {
    Ok(Projector::new(cfg)?.map(|p| tokio::spawn(p.run(stop))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RowPos;
    use crate::lsn::Lsn;

    /// A change-log file of `rows` rows at `lsn`, `_seq` from `seq` on.
    fn file(lsn: u64, seq: u64, rows: u64) -> WrittenObject {
        let at = |seq| RowPos { lsn: Lsn(lsn), seq };
        WrittenObject {
            key: format!("{lsn}-{seq}.parquet"),
            table: "public.prices".into(),
            partition: String::new(),
            rows,
            bytes: rows * 10,
            first: at(seq),
            last: at(seq + rows - 1),
            ops: Default::default(),
        }
    }

    /// Each part: the first `_seq` of its files, and its rows.
    fn shape(parts: &[FoldInput<'_>]) -> Vec<(Vec<u64>, u64)> {
        parts
            .iter()
            .map(|p| {
                let seqs = p.files.iter().map(|f| f.first.seq).collect();
                let rows = p
                    .rows
                    .map_or(p.files.iter().map(|f| f.rows).sum(), |(_, len)| len as u64);
                (seqs, rows)
            })
            .collect()
    }

    // A fold of 1,024 rows (256 KiB at FOLD_ROW_BYTES).
    const FOLD: u64 = 1024 * FOLD_ROW_BYTES;

    #[test]
    fn a_copys_chunks_listed_as_they_ended_are_built_a_fold_at_a_time() {
        // Two chunks copied side by side (`_seq` from chunk << 32), three files of 600
        // rows each, chunk 1 ended first.
        let chunk = |c: u64| (0..3).map(move |i| file(100, (c << 32) + i * 600, 600));
        let mut files: Vec<WrittenObject> = chunk(1).chain(chunk(0)).collect();
        let parts = build_parts(&mut files, false, FOLD);
        let c1 = 1 << 32;
        assert_eq!(
            shape(&parts),
            [
                (vec![0, 600], 1200),
                (vec![1200, c1], 1200),
                (vec![c1 + 600, c1 + 1200], 1200)
            ],
            "in (_lsn, _seq) order, two files a fold"
        );
        let parts = build_parts(&mut files, true, FOLD);
        assert_eq!(shape(&parts).len(), 1, "a table readers see is built in one snapshot");
    }

    #[test]
    fn a_file_larger_than_a_fold_is_sliced_and_overlapping_files_stay_together() {
        let mut files = vec![
            file(100, 0, 2500),
            // Two partitions of one flush, each larger than a fold: their rows
            // interleave, so neither is sliced nor cut after.
            file(200, 0, 1100),
            file(200, 400, 1100),
            file(300, 0, 100),
        ];
        files[1].last.seq = 1500;
        let parts = build_parts(&mut files, false, FOLD);
        let slices: Vec<_> = parts.iter().map(|p| p.rows).collect();
        assert_eq!(
            slices,
            [Some((0, 1024)), Some((1024, 1024)), Some((2048, 452)), None, None]
        );
        assert_eq!(
            shape(&parts)[3..],
            [(vec![0, 400], 2200), (vec![0], 100)],
            "no part ends inside an overlap"
        );
    }
}
