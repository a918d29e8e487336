//! Compaction of the change log: a closed partition's files rewritten into a few, in
//! `(_lsn, _seq)` order, and swapped in by one commit record (see
//! `docs/design/compaction.md`).
//!
//! **Closed.** A partition is closed once nothing was committed to it for
//! `compaction.grace`, and, partitioned by commit time, once the stream has passed the
//! end of its day or hour by the grace too (the head's `commit_ts`). A row that comes
//! later (a `column:` partition's value written again, a copy's held rows) lands in the
//! partition's folder as always; the partition is then compacted again, the grace after.
//!
//! **The swap.** The new files are written to `{partition}/_c{tag}/` (query engines skip
//! folders whose names begin with `_`, so a reader of the folder does not see them
//! twice before the swap), each announced in a pending record first. A ticket,
//! `_walshore/compactions/{tag}.json`, names the files replaced and the files written.
//! Then the sink commits a record whose `compacted` entry names the partition, the
//! record the compaction read the manifest at (`through`), and the new files: readers
//! of the manifest take the new files and leave out the partition's files committed up
//! to `through`; a file committed after `through` stays.
//!
//! **A crash at each step.** Before the commit: the new files are listed in a pending
//! record no commit completes, and the next start deletes them; the ticket names no
//! committed compaction, and the next attempt's first pass deletes it and what it
//! wrote (never a pass of the attempt that wrote it: its commit may still land). After
//! the commit: a pass finds the compaction's files named by the manifest and marks the
//! ticket committed. The replaced files are deleted `delete_after` later, once every
//! Iceberg table of the table has passed the compaction (and with Glue once the
//! partition points at it), and the ticket last: a crash in between deletes them again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatchReader;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::{mpsc, oneshot};

use crate::batch::RowPos;
use crate::catalog::Catalog;
use crate::checkpoint::log::{delete_all, is_not_found, read_json, required_commit};
use crate::checkpoint::record::now_micros;
use crate::checkpoint::{CheckpointError, CommitRecord, Compaction, announce_copy, walk_manifest};
use crate::config::{CompactionConfig, IcebergConfig, PartitionBy, Partitions};
use crate::sink::{Sink, WrittenObject, file_name, key_path};

pub(crate) const TICKETS: &str = "_walshore/compactions";
/// What the last pass found, for `walshore status`.
pub const REPORT: &str = "_walshore/compaction.json";
/// Waiting partitions the report lists at most (it counts them all).
const REPORT_PARTITIONS: usize = 100;

/// The folder segment below a partition that holds a compaction's files.
const FOLDER: &str = "_c";

/// Bytes of a compacted file uploaded per request.
const UPLOAD_PART: usize = 16 << 20;

/// A compacted file's row group is closed at this many bytes (encoded, in memory) if
/// `sink.row_group_rows` has not closed it before: the flushes it gathers may hold far
/// more than one flush's rows together. At most [`ROW_GROUPS_PER_TARGET`]th of the
/// target, so that a file is cut close to the target.
const ROW_GROUP_BYTES: usize = 64 << 20;
const ROW_GROUPS_PER_TARGET: u64 = 32;

/// The niceness of the threads that decode and encode a compaction's rows: the
/// scheduler gives them a core only when replication does not want it.
#[cfg(target_os = "linux")]
const NICE: libc::c_int = 19;

#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    #[error(transparent)]
    Log(#[from] CheckpointError),
    #[error("compaction of {table} {partition}: object store error at {key}: {source}")]
    Store {
        table: String,
        partition: String,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("compaction of {table} {partition}: {key} is not readable Parquet: {source}")]
    Parquet {
        table: String,
        partition: String,
        key: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("compaction spill file: {0}")]
    Spill(#[from] std::io::Error),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
}

/// A compaction ready to commit, handed to the sink; the reply is the record that
/// committed it (dropped when the commit did not happen).
pub struct Ready {
    pub compaction: Compaction,
    /// The pending records that announced its files: the commit completes them.
    pub pending: Vec<String>,
    pub reply: oneshot::Sender<u64>,
}

/// `_walshore/compactions/{tag}.json`: what a compaction replaced and wrote, kept until
/// the replaced files are deleted.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    pub tag: String,
    /// The attempt that made it: only another attempt may judge it abandoned.
    #[serde(default)]
    pub run_id: String,
    pub table: String,
    pub partition: String,
    pub through: u64,
    pub replaced: Vec<String>,
    pub written: Vec<String>,
    pub pending: Vec<String>,
    /// The record that committed it and when it was written (µs since the Unix epoch),
    /// once a pass saw it.
    #[serde(default)]
    pub committed: Option<(u64, i64)>,
    /// With Glue: the partition's location is its folder (or a later compaction's),
    /// since this time (µs since the Unix epoch).
    #[serde(default)]
    pub pointed: Option<i64>,
}

impl Ticket {
    /// The folder of its files (`{partition}/_c{tag}`), as a key prefix.
    fn folder(&self) -> Option<&str> {
        self.written.first().and_then(|k| k.rsplit_once('/')).map(|(d, _)| d)
    }
}

/// Points the Glue partition of a committed compaction at its folder, unless a later
/// compaction replaced its files (`superseded`: that one's ticket points instead).
async fn point(
    store: &dyn ObjectStore,
    catalog: &mut Catalog,
    t: &mut Ticket,
    superseded: bool,
) -> Result<(), CompactionError> {
    if let Some(folder) = t.folder().filter(|_| !superseded) {
        catalog.point_partition(&t.table, &t.partition, folder).await?;
    }
    t.pointed = Some(now_micros());
    put_ticket(store, t).await?;
    Ok(())
}

fn ticket_key(tag: &str) -> Path {
    Path::from(format!("{TICKETS}/{tag}.json"))
}

async fn put_ticket(store: &dyn ObjectStore, t: &Ticket) -> Result<(), CheckpointError> {
    let key = ticket_key(&t.tag);
    let body = serde_json::to_vec(t).expect("a ticket serializes");
    store
        .put(&key, PutPayload::from(body))
        .await
        .map_err(|source| CheckpointError::Store {
            key: key.to_string(),
            source,
        })?;
    Ok(())
}

/// Whether `key` is a file a compaction wrote (below its partition's `_c{tag}` folder).
pub fn is_compacted(key: &str) -> bool {
    key.rsplit('/').nth(1).is_some_and(is_compacted_folder)
}

/// Whether a folder's name is a compaction's: `_c` and sixteen hex digits (a
/// partition's folder always has a `=`). Tags begin with the record the compaction
/// read, so a later compaction of a partition has the greater name.
pub fn is_compacted_folder(name: &str) -> bool {
    name.strip_prefix(FOLDER)
        .is_some_and(|tag| tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The folder of the partition `key` is in (a compacted file's is above its `_c{tag}`).
fn partition_dir(key: &str) -> &str {
    let dir = key.rsplit_once('/').map_or("", |(d, _)| d);
    if is_compacted(key) {
        dir.rsplit_once('/').map_or("", |(d, _)| d)
    } else {
        dir
    }
}

/// A loose file as the planner keeps it: the record that committed it, its bytes, and
/// when the record was written.
type Loose = (u64, u64, i64);

/// What the planner knows of a partition.
#[derive(Default, Debug, PartialEq)]
struct Part {
    /// Files the stream or a copy wrote and no compaction replaced: the record that
    /// committed each, its bytes, and when the record was written.
    loose: Vec<Loose>,
    /// The record that committed the compacted files it has, if any.
    compacted_at: Option<u64>,
    /// Its files' row ranges overlap: not compacted until a new file comes.
    overlapping: bool,
}

/// Which partitions have files to compact, kept up to date from the commit log.
///
/// A pass saves it every [`SAVE_EVERY`] records ([`PLANNER`]); a start takes the saved
/// planner and walks the manifest only from the record after it, not from the lake's
/// first.
pub struct Planner {
    /// The last record read.
    scanned: u64,
    /// The record the saved planner is of (0: none saved or loaded yet).
    saved: u64,
    partitions: Arc<Partitions>,
    /// Column partitions never compacted are compacted too (not with Glue). When
    /// false, the planner keeps nothing of them.
    columns: bool,
    /// A record compacted a partition the planner kept nothing of (another writer's
    /// compaction, under other settings): the manifest is walked again from the first
    /// record, for the partition's files before it.
    stale: bool,
    parts: BTreeMap<(String, String), Part>,
}

/// The planner as a pass saved it.
pub(crate) const PLANNER: &str = "_walshore/compaction-planner.json";
const PLANNER_FORMAT: u32 = 1;
/// Records read between two saves of the planner: a start walks about as many again.
const SAVE_EVERY: u64 = 1000;

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedPlanner {
    format: u32,
    /// The lake's source, the record the planner is of, and when that record was
    /// written: a log rebuilt since does not match.
    system_id: String,
    slot: String,
    scanned: u64,
    written_at: i64,
    /// What it keeps depends on these: a start under other ones walks the whole
    /// manifest (a partition it left out may be compacted now).
    columns: bool,
    partitioning: String,
    /// Table, partition, the record of its compacted files, its loose files.
    parts: Vec<(String, String, Option<u64>, Vec<Loose>)>,
}

/// A partition chosen for compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub table: String,
    pub partition: String,
    pub bytes: u64,
    /// The oldest record it has a file of.
    pub from: u64,
}

impl Planner {
    /// `columns`: column partitions never compacted are compacted too (not with Glue).
    pub fn new(partitions: Arc<Partitions>, columns: bool) -> Planner {
        Planner {
            scanned: 0,
            saved: 0,
            partitions,
            columns,
            stale: false,
            parts: BTreeMap::new(),
        }
    }

    /// A partition the planner keeps nothing of: a column's never compacted, when
    /// those are not compacted.
    fn ignored(columns: bool, partitions: &Partitions, table: &str, part: Option<&Part>) -> bool {
        !columns
            && matches!(partitions.of(table), PartitionBy::Column(_))
            && part.is_none_or(|p| p.compacted_at.is_none())
    }

    fn partitioning(&self) -> String {
        format!("{:?}", self.partitions)
    }

    /// Reads the log up to `head`: at first the saved planner and the manifest after it
    /// (the whole manifest if none was saved under these settings), then the records
    /// after the last one read.
    pub async fn update(&mut self, store: &dyn ObjectStore, head: &CommitRecord) -> Result<(), CheckpointError> {
        if self.scanned > 0 && !self.stale {
            for seq in self.scanned + 1..=head.seq {
                let record = if seq == head.seq {
                    head.clone()
                } else {
                    required_commit(store, seq, "while compaction read the records after the last it read").await?
                };
                self.apply(&record);
            }
            self.scanned = head.seq;
            if !self.stale {
                return Ok(());
            }
        }
        let saved = if self.stale {
            None
        } else {
            self.load(store, head).await?
        };
        self.stale = false;
        if let Some(saved) = saved
            && self.rebuild(store, head, Some(saved)).await?
        {
            return Ok(());
        }
        self.rebuild(store, head, None).await?;
        Ok(())
    }

    /// The saved planner, if it is of this lake's log and these settings.
    async fn load(
        &self,
        store: &dyn ObjectStore,
        head: &CommitRecord,
    ) -> Result<Option<SavedPlanner>, CheckpointError> {
        let saved = match read_json::<SavedPlanner>(store, &Path::from(PLANNER)).await {
            Ok(s) => s,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(CheckpointError::Corrupt { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if saved.format != PLANNER_FORMAT
            || saved.scanned > head.seq
            || saved.system_id != head.system_id
            || saved.slot != head.slot
            || saved.columns != self.columns
            || saved.partitioning != self.partitioning()
        {
            return Ok(None);
        }
        // The record it is of, unless pruned since: the same one, not one of a log
        // rebuilt since.
        let at = if saved.scanned == head.seq {
            Some(head.written_at)
        } else {
            crate::checkpoint::log::read_commit(store, saved.scanned)
                .await?
                .map(|r| r.written_at)
        };
        Ok(at.is_none_or(|at| at == saved.written_at).then_some(saved))
    }

    /// Builds the planner from `saved` and the manifest after it, or from the whole
    /// manifest. False if the manifest after `saved` compacts a partition `saved` kept
    /// nothing of: the whole manifest must be read.
    async fn rebuild(
        &mut self,
        store: &dyn ObjectStore,
        head: &CommitRecord,
        saved: Option<SavedPlanner>,
    ) -> Result<bool, CheckpointError> {
        let from = saved.as_ref().map_or(1, |s| s.scanned + 1);
        self.saved = saved.as_ref().map_or(0, |s| s.scanned);
        let mut parts: BTreeMap<(String, String), Part> = BTreeMap::new();
        for (table, partition, compacted_at, loose) in saved.map(|s| s.parts).unwrap_or_default() {
            let part = Part {
                loose,
                compacted_at,
                overlapping: false,
            };
            parts.insert((table, partition), part);
        }
        let ignored_before = |parts: &BTreeMap<(String, String), Part>, table: &str, partition: &str| {
            from > 1
                && Self::ignored(
                    self.columns,
                    &self.partitions,
                    table,
                    parts.get(&(table.to_owned(), partition.to_owned())),
                )
        };
        let mut compactions = Vec::new();
        let mut added: BTreeMap<(String, String), Part> = BTreeMap::new();
        crate::checkpoint::walk_manifest_and_compactions(
            store,
            head,
            from,
            |l| {
                if !l.replaced {
                    let part = added.entry((l.file.table, l.file.partition)).or_default();
                    if is_compacted(&l.file.key) {
                        part.compacted_at = part.compacted_at.max(Some(l.seq));
                    } else {
                        part.loose.push((l.seq, l.file.bytes, l.written_at));
                    }
                }
                Ok(())
            },
            |c| compactions.push(c.clone()),
        )
        .await?;
        if compactions
            .iter()
            .any(|c| ignored_before(&parts, &c.table, &c.partition))
        {
            return Ok(false);
        }
        // What the saved planner had, less what compactions after it replaced, and the
        // files after it that none replaced.
        for c in &compactions {
            let part = parts.entry((c.table.clone(), c.partition.clone())).or_default();
            part.loose.retain(|(seq, _, _)| *seq > c.through);
            part.compacted_at = part.compacted_at.max(Some(c.seq));
        }
        for (key, new) in added {
            let part = parts.entry(key).or_default();
            part.loose.extend(new.loose);
            part.compacted_at = part.compacted_at.max(new.compacted_at);
        }
        for part in parts.values_mut() {
            part.loose.sort_unstable();
        }
        parts.retain(|(table, _), p| !Self::ignored(self.columns, &self.partitions, table, Some(p)));
        self.parts = parts;
        self.scanned = head.seq;
        Ok(true)
    }

    /// Saves the planner (of `head`, the record last read) every [`SAVE_EVERY`]
    /// records, and after a walk of the whole manifest. A save that fails is tried
    /// again the next pass.
    pub async fn save_if_due(&mut self, store: &dyn ObjectStore, head: &CommitRecord) {
        if self.scanned != head.seq || self.scanned == 0 || (self.saved > 0 && self.scanned < self.saved + SAVE_EVERY) {
            return;
        }
        let saved = SavedPlanner {
            format: PLANNER_FORMAT,
            system_id: head.system_id.clone(),
            slot: head.slot.clone(),
            scanned: head.seq,
            written_at: head.written_at,
            columns: self.columns,
            partitioning: self.partitioning(),
            parts: self
                .parts
                .iter()
                .map(|((t, p), part)| (t.clone(), p.clone(), part.compacted_at, part.loose.clone()))
                .collect(),
        };
        let body = serde_json::to_vec(&saved).expect("a planner serializes");
        match store.put(&Path::from(PLANNER), PutPayload::from(body)).await {
            Ok(_) => self.saved = self.scanned,
            Err(e) => tracing::warn!(error = %e, "cannot save compaction's planner; a start reads more of the log"),
        }
    }

    fn apply(&mut self, record: &CommitRecord) {
        for c in &record.compacted {
            let key = (c.table.clone(), c.partition.clone());
            if Self::ignored(self.columns, &self.partitions, &c.table, self.parts.get(&key)) {
                self.stale = true;
            }
        }
        for f in &record.files {
            let key = (f.table.clone(), f.partition.clone());
            if Self::ignored(self.columns, &self.partitions, &f.table, self.parts.get(&key)) {
                continue;
            }
            let part = self.parts.entry(key).or_default();
            part.loose.push((record.seq, f.bytes, record.written_at));
            part.overlapping = false;
        }
        for c in &record.compacted {
            let part = self.parts.entry((c.table.clone(), c.partition.clone())).or_default();
            part.loose.retain(|(seq, _, _)| *seq > c.through);
            part.compacted_at = Some(record.seq);
        }
    }

    /// Marks a chosen partition whose files overlap: passed over until a file comes.
    pub fn overlapping(&mut self, chosen: &Chosen) {
        if let Some(p) = self.parts.get_mut(&(chosen.table.clone(), chosen.partition.clone())) {
            p.overlapping = true;
        }
    }

    /// The closed partitions worth compacting, in name order, up to `budget` bytes (at
    /// least one, however large). Worth it: more than one file, or a late file beside
    /// an earlier compaction's. Column partitions never compacted before only if the
    /// planner was made with `columns` (not with Glue, which reads one folder per
    /// partition: a row may come to a column's partition at any time, and would wait
    /// for the next compaction to show).
    pub fn choose(&self, head: &CommitRecord, grace: Duration, now: i64, budget: u64) -> Vec<Chosen> {
        let grace_us = grace.as_micros() as i64;
        let mut out: Vec<Chosen> = Vec::new();
        let mut spent = 0;
        for ((table, partition), part) in &self.parts {
            let Some(newest) = part.loose.iter().map(|(_, _, at)| *at).max() else {
                continue;
            };
            if part.overlapping || (part.loose.len() < 2 && part.compacted_at.is_none()) {
                continue;
            }
            if now - newest < grace_us {
                continue;
            }
            let by = self.partitions.of(table);
            if Self::ignored(self.columns, &self.partitions, table, Some(part)) {
                continue;
            }
            if let Some(end) = period_end(by, partition)
                && head.commit_ts.is_none_or(|ts| ts < end + grace_us)
            {
                continue;
            }
            let bytes: u64 = part.loose.iter().map(|(_, b, _)| b).sum();
            if !out.is_empty() && spent + bytes > budget {
                break;
            }
            spent += bytes;
            let from = part
                .loose
                .iter()
                .map(|(s, _, _)| *s)
                .chain(part.compacted_at)
                .min()
                .unwrap_or(1);
            out.push(Chosen {
                table: table.clone(),
                partition: partition.clone(),
                bytes,
                from,
            });
        }
        out
    }

    /// Partitions with files to compact, closed or not yet.
    pub fn waiting(&self) -> impl Iterator<Item = Waiting> + '_ {
        self.parts
            .iter()
            .filter(|(_, p)| p.loose.len() > 1 || (!p.loose.is_empty() && p.compacted_at.is_some()))
            .map(|((table, partition), p)| Waiting {
                table: table.clone(),
                partition: partition.clone(),
                files: p.loose.len(),
                bytes: p.loose.iter().map(|(_, b, _)| b).sum(),
                last_commit: rfc3339(p.loose.iter().map(|(_, _, at)| *at).max().unwrap_or(0)),
            })
    }

    /// What this planner found, with the tickets not settled yet.
    pub fn report(&self, unsettled: usize) -> Report {
        Report {
            written_at: rfc3339(now_micros()),
            seq: self.scanned,
            waiting: self.waiting().count(),
            most_files: self.waiting().map(|w| w.files).max().unwrap_or(0),
            partitions: self.waiting().take(REPORT_PARTITIONS).collect(),
            unsettled,
        }
    }
}

fn rfc3339(micros: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `_walshore/compaction.json`: what the last pass of a running walshore found.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub written_at: String,
    /// The commit record it had read up to.
    pub seq: u64,
    /// Partitions with files to compact, closed or not yet.
    pub waiting: usize,
    /// The most files not compacted yet in any one partition.
    #[serde(default)]
    pub most_files: usize,
    /// The first of them, by name.
    pub partitions: Vec<Waiting>,
    /// Compactions whose replaced files are not deleted yet (or whose commit is not
    /// known yet).
    pub unsettled: usize,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    pub table: String,
    pub partition: String,
    /// Files not compacted yet, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// When the newest of them was committed.
    pub last_commit: String,
}

/// Writes the report (a failure is only logged: it is for `status`).
pub async fn write_report(store: &dyn ObjectStore, report: &Report) {
    let body = serde_json::to_vec_pretty(report).expect("a report serializes");
    if let Err(e) = store.put(&Path::from(REPORT), PutPayload::from(body)).await {
        tracing::warn!(error = %e, "cannot write the compaction report for walshore status");
    }
}

/// The end (µs since the Unix epoch) of a commit-time partition's day or hour; None
/// for a column's partition (or a folder of another spec).
fn period_end(by: &PartitionBy, partition: &str) -> Option<i64> {
    let mut date = None;
    let mut hour = None;
    for seg in partition.split('/') {
        match seg.split_once('=') {
            Some(("dt", d)) => date = Some(d),
            Some(("hour", h)) => hour = h.parse::<i64>().ok(),
            _ => {}
        }
    }
    let days = days_from_civil(date?)?;
    let start = days * 86_400 + hour.unwrap_or(0) * 3600;
    let length = match by {
        PartitionBy::CommitDate => 86_400,
        PartitionBy::CommitHour => 3600,
        PartitionBy::Column(_) => return None,
    };
    Some((start + length) * 1_000_000)
}

/// Days since 1970-01-01 of `YYYY-MM-DD` (proleptic Gregorian).
fn days_from_civil(date: &str) -> Option<i64> {
    let mut it = date.splitn(3, '-');
    let (y, m, d): (i64, i64, i64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// The visible files of a partition at `head`, in `(_lsn, _seq)` order, and whether they
/// are disjoint (each starts after the one before ends): a rewrite in file order is
/// then in row order.
pub async fn files_of(
    store: &dyn ObjectStore,
    head: &CommitRecord,
    chosen: &Chosen,
) -> Result<Option<Vec<WrittenObject>>, CheckpointError> {
    let mut files = Vec::new();
    walk_manifest(store, head, chosen.from, |l| {
        if !l.replaced && l.file.table == chosen.table && l.file.partition == chosen.partition {
            files.push(l.file);
        }
        Ok(())
    })
    .await?;
    files.sort_by_key(|f| f.first);
    let disjoint = files.windows(2).all(|w| w[0].last < w[1].first);
    Ok(disjoint.then_some(files))
}

/// What a rewrite has put in the store: its files and the pending records that
/// announce them (deleted again if the compaction fails before its ticket).
#[derive(Default)]
pub struct Written {
    pub files: Vec<WrittenObject>,
    pub pending: Vec<String>,
    /// Every key announced, uploaded or not (an upload that failed may have landed).
    pub announced: Vec<String>,
}

/// Writes `files` (one partition's, in row order) again as files of about `target`
/// bytes below `{partition}/_c{tag}/`, each announced before its upload, into `out`.
/// A file is cut before an input whose bytes would take it past the target, by the
/// bytes it has written so far; a change of the files' schema (a column added) starts
/// a new file: each keeps its schema. Each input is downloaded to a spill file in
/// `spill` and read a row group at a time, on a thread of the lowest priority
/// ([`on_a_low_priority_thread`]); each output is written to one and uploaded in parts.
pub async fn rewrite(
    job: &Job<'_>,
    chosen: &Chosen,
    files: &[WrittenObject],
    tag: &str,
    done: &mut Written,
) -> Result<(), CompactionError> {
    let (sink, spill, target) = (job.sink, job.spill, job.cfg.target_file_size);
    // The partition's folder as its files' keys have it (escaped as written).
    let Some(first) = files.first() else {
        return Ok(());
    };
    let folder = format!("{}/{FOLDER}{tag}", partition_dir(&first.key));
    std::fs::create_dir_all(spill)?;
    let store = sink.store().clone();
    let mut out: Option<Output> = None;
    for f in files {
        let path = key_path(&f.key);
        let err = |source| CompactionError::Store {
            table: chosen.table.clone(),
            partition: chosen.partition.clone(),
            key: f.key.clone(),
            source: Box::new(source),
        };
        let mut input = tempfile::tempfile_in(spill)?;
        job.flushing.quiet().await;
        let mut body = store.get(&path).await.map_err(err)?.into_stream();
        while let Some(chunk) = body.try_next().await.map_err(err)? {
            std::io::Write::write_all(&mut input, &chunk)?;
        }
        let perr = |source| CompactionError::Parquet {
            table: chosen.table.clone(),
            partition: chosen.partition.clone(),
            key: f.key.clone(),
            source,
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(input)
            .map_err(perr)?
            .build()
            .map_err(perr)?;
        let file_schema = reader.schema();
        if out
            .as_ref()
            .is_some_and(|o| o.schema != file_schema || (o.rows > 0 && o.size() + f.bytes > target))
        {
            let full = out.take().expect("checked above");
            full.finish(job, chosen, &folder, done).await?;
        }
        let o = match out.take() {
            Some(o) => o,
            None => Output::new(file_schema.clone(), sink.props().clone(), spill)?,
        };
        let group = ROW_GROUP_BYTES.min((target / ROW_GROUPS_PER_TARGET).max(1) as usize);
        let (mut o, copied) = on_a_low_priority_thread(move || {
            let mut o = o;
            let copied = reader.into_iter().try_for_each(|batch| {
                o.writer.write(&batch?)?;
                if o.writer.in_progress_size() >= group {
                    o.writer.flush()?;
                }
                Ok::<_, parquet::errors::ParquetError>(())
            });
            (o, copied)
        })
        .await?;
        copied.map_err(perr)?;
        o.rows += f.rows;
        o.first.get_or_insert(f.first);
        o.last = Some(f.last);
        out = Some(o);
    }
    if let Some(last) = out {
        last.finish(job, chosen, &folder, done).await?;
    }
    Ok(())
}

/// A compacted file being written, to a spill file (its size is the target's, not the
/// memory's).
struct Output {
    schema: arrow::datatypes::SchemaRef,
    writer: ArrowWriter<std::fs::File>,
    rows: u64,
    first: Option<RowPos>,
    last: Option<RowPos>,
}

impl Output {
    fn new(
        schema: arrow::datatypes::SchemaRef,
        props: parquet::file::properties::WriterProperties,
        spill: &std::path::Path,
    ) -> Result<Output, CompactionError> {
        let spill = tempfile::tempfile_in(spill)?;
        let writer =
            ArrowWriter::try_new(spill, schema.clone(), Some(props)).map_err(|source| CompactionError::Parquet {
                table: String::new(),
                partition: String::new(),
                key: "a compacted file".into(),
                source,
            })?;
        Ok(Output {
            schema,
            writer,
            rows: 0,
            first: None,
            last: None,
        })
    }

    /// The file's bytes so far: its closed row groups and the open one's estimate.
    fn size(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size()) as u64
    }

    /// Closes the file, announces it and uploads it to `folder`, adding both to `done`.
    async fn finish(
        self,
        job: &Job<'_>,
        chosen: &Chosen,
        folder: &str,
        done: &mut Written,
    ) -> Result<(), CompactionError> {
        let (sink, run_id, floor) = (job.sink, job.run_id, job.floor);
        let (qualified, partition) = (chosen.table.as_str(), chosen.partition.as_str());
        let (first, last) = (
            self.first.expect("a file was added"),
            self.last.expect("a file was added"),
        );
        let key = key_path(&format!("{folder}/{}", file_name(first, last, sink.writer())));
        let mut spill = self.writer.into_inner().map_err(|source| CompactionError::Parquet {
            table: qualified.to_owned(),
            partition: partition.to_owned(),
            key: key.to_string(),
            source,
        })?;
        let size = std::io::Seek::stream_position(&mut spill)?;
        job.flushing.quiet().await;
        let announced = announce_copy(sink.store().as_ref(), floor, run_id, vec![key.to_string()]).await?;
        done.pending.push(announced.to_string());
        done.announced.push(key.to_string());
        job.flushing.quiet().await;
        upload(sink.store().as_ref(), &key, spill, size, job.flushing)
            .await
            .map_err(|source| CompactionError::Store {
                table: qualified.to_owned(),
                partition: partition.to_owned(),
                key: key.to_string(),
                source: Box::new(source),
            })?;
        done.files.push(WrittenObject {
            key: key.to_string(),
            table: qualified.to_owned(),
            partition: partition.to_owned(),
            rows: self.rows,
            bytes: size,
            first,
            last,
            ops: Default::default(),
        });
        crate::fault::point("after_compacted_upload");
        Ok(())
    }
}

/// Runs `work` on a thread of its own at the lowest priority ([`NICE`]) and waits for
/// it without holding up the runtime: a compaction's decoding and encoding takes a
/// core only when replication leaves one idle, so commits are never late for it.
async fn on_a_low_priority_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("walshore-compaction".into())
        .spawn(move || {
            // A thread's own niceness (Linux: `PRIO_PROCESS` with a thread id). Where
            // the system refuses, the work runs at the normal priority.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE)
            };
            let _ = tx.send(work());
        })?;
    // A panic drops the sender: the compaction fails like any other, and its files go.
    rx.await
        .map_err(|_| std::io::Error::other("a compaction thread panicked decoding or encoding rows"))
}

/// Uploads a spill file: one PUT, or a multipart upload of [`UPLOAD_PART`] parts read
/// one at a time, so memory holds a part, not the file.
async fn upload(
    store: &dyn ObjectStore,
    key: &Path,
    mut spill: std::fs::File,
    size: u64,
    flushing: &Flushing,
) -> object_store::Result<()> {
    use std::io::{Read, Seek};
    let read = |spill: &mut std::fs::File, n: usize| -> object_store::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        spill.read_exact(&mut buf).map_err(|e| object_store::Error::Generic {
            store: "spill",
            source: Box::new(e),
        })?;
        Ok(buf)
    };
    spill.rewind().map_err(|e| object_store::Error::Generic {
        store: "spill",
        source: Box::new(e),
    })?;
    if size as usize <= UPLOAD_PART {
        let body = read(&mut spill, size as usize)?;
        store.put(key, PutPayload::from(body)).await?;
        return Ok(());
    }
    let mut upload = store.put_multipart(key).await?;
    let mut left = size as usize;
    let result = async {
        while left > 0 {
            let n = left.min(UPLOAD_PART);
            let part = read(&mut spill, n)?;
            flushing.quiet().await;
            upload.put_part(PutPayload::from(part)).await?;
            left -= n;
        }
        upload.complete().await
    }
    .await;
    if let Err(e) = result {
        let _ = upload.abort().await;
        return Err(e);
    }
    Ok(())
}

/// The tickets under `_walshore/compactions/`, read through `cache` (by key, with the
/// modification time it was read at): a ticket lists a partition's files, thousands
/// for a busy day, and a pass every few seconds reads only those that changed.
pub async fn tickets(
    store: &dyn ObjectStore,
    cache: &mut HashMap<Path, (i64, Ticket)>,
) -> Result<Vec<Ticket>, CheckpointError> {
    let prefix = Path::from(TICKETS);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| CheckpointError::Store {
            key: prefix.to_string(),
            source,
        })?;
    let listed: std::collections::HashSet<&Path> = metas.iter().map(|m| &m.location).collect();
    cache.retain(|k, _| listed.contains(k));
    let mut out = Vec::new();
    for m in &metas {
        let modified = m.last_modified.timestamp_micros();
        if let Some((at, t)) = cache.get(&m.location)
            && *at == modified
        {
            out.push(t.clone());
            continue;
        }
        match read_json::<Ticket>(store, &m.location).await {
            Ok(t) => {
                cache.insert(m.location.clone(), (modified, t.clone()));
                out.push(t);
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What a pass did with the tickets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Tickets left: committed compactions waiting to delete what they replaced.
    pub left: usize,
    /// Compactions found committed since the last pass.
    pub committed: usize,
    /// Compactions never committed: their files deleted.
    pub abandoned: usize,
    /// Compactions whose replaced files were deleted.
    pub finished: usize,
    /// Files deleted (replaced, or written by an abandoned compaction).
    pub files: usize,
}

/// The commit record a table's Iceberg table holds, or None when there is none to wait
/// for (`[iceberg]` does not cover it, or it is not built: its build reads the
/// manifest as it is then). The projector's progress record counts too: a table with
/// nothing to apply keeps its snapshot's watermark. An unreadable table answers 0:
/// wait.
async fn iceberg_watermark(
    store: &Arc<dyn ObjectStore>,
    iceberg: Option<&(IcebergConfig, String)>,
    table: &str,
) -> Option<u64> {
    let (cfg, url) = iceberg?;
    if !cfg.covers(table) {
        return None;
    }
    let progress = crate::iceberg::projector::progress_of(store.as_ref())
        .await
        .filter(|(_, tables)| tables.iter().any(|t| t == table))
        .map_or(0, |(seq, _)| seq);
    let location = crate::iceberg::projector::location_of(store.clone(), url, table);
    match crate::iceberg::table::Table::load(location).await {
        Ok(Some(t)) => Some(t.watermark().map_or(0, |(seq, _)| seq).max(progress)),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(table, error = %e, "cannot read the Iceberg table; replaced files wait");
            Some(progress)
        }
    }
}

/// Settles every ticket against the durable `head`: marks committed those whose files
/// the manifest names, deletes what an abandoned one wrote (a ticket of an earlier
/// writer, read before `claim` (this attempt's claim), that the manifest does not
/// name: a later writer's ticket is never touched), points the Glue partition of a committed
/// one at its folder, and deletes the replaced files of those committed (and pointed)
/// `delete_after` ago once the table's Iceberg table (`iceberg`: the config and the
/// sink's URL) holds the compaction's record.
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    store: &Arc<dyn ObjectStore>,
    head: &CommitRecord,
    run_id: &str,
    claim: u64,
    delete_after: Duration,
    iceberg: Option<&(IcebergConfig, String)>,
    mut catalog: Option<&mut Catalog>,
    cache: &mut HashMap<Path, (i64, Ticket)>,
) -> Result<Settled, CompactionError> {
    let store_arc = store;
    let store = store.as_ref();
    let mut out = Settled::default();
    let mut tickets = tickets(store, cache).await?;
    // Tickets not known committed, or not pointed yet: the manifest says whether a
    // record names their files, and whether a later compaction replaced them. Read
    // from the oldest one's `through` on only, and only then (after a crash, mostly).
    let unsure = |t: &Ticket| t.committed.is_none() || (catalog.is_some() && t.pointed.is_none());
    let mut named: HashMap<String, (u64, i64, bool)> = HashMap::new();
    if let Some(from) = tickets.iter().filter(|t| unsure(t)).map(|t| t.through + 1).min() {
        let wanted: std::collections::HashSet<&str> = tickets
            .iter()
            .filter(|t| unsure(t))
            .filter_map(|t| t.written.first().map(String::as_str))
            .collect();
        walk_manifest(store, head, from, |l| {
            if wanted.contains(l.file.key.as_str()) {
                named.insert(l.file.key.clone(), (l.seq, l.written_at, l.replaced));
            }
            Ok(())
        })
        .await?;
    }
    let mut abandoned = Vec::new();
    for t in &mut tickets {
        if t.committed.is_some() {
            continue;
        }
        match t.written.first().and_then(|k| named.get(k)) {
            Some((seq, at, _)) => {
                t.committed = Some((*seq, *at));
                put_ticket(store, t).await?;
                cache.remove(&ticket_key(&t.tag));
                out.committed += 1;
            }
            // Its own attempt may still commit it (a commit that failed late), and a
            // writer that claimed after this one (which is then fenced off) too.
            None if t.run_id == run_id || t.through >= claim => {}
            None => abandoned.push(t.tag.clone()),
        }
    }
    for t in tickets.iter().filter(|t| abandoned.contains(&t.tag)) {
        tracing::info!(table = %t.table, partition = %t.partition, files = t.written.len(), "deleting the files of a compaction that was never committed");
        delete_all(store, t.written.iter().map(|k| key_path(k)).collect()).await?;
        delete_all(store, t.pending.iter().map(|k| key_path(k)).collect()).await?;
        delete_all(store, vec![ticket_key(&t.tag)]).await?;
        out.abandoned += 1;
        out.files += t.written.len();
    }
    tickets.retain(|t| t.committed.is_some());
    // Glue first, every ticket: the replaced files of one go only once its partition
    // points at its files or at a later compaction's.
    if let Some(c) = catalog.as_deref_mut() {
        for t in tickets.iter_mut().filter(|t| t.pointed.is_none()) {
            let superseded = t.written.first().and_then(|k| named.get(k)).is_some_and(|(_, _, r)| *r);
            point(store, c, t, superseded).await?;
        }
    }
    for t in &tickets {
        let (seq, at) = t.committed.expect("kept committed ones");
        let since = t.pointed.filter(|_| catalog.is_some()).unwrap_or(at).max(at);
        if now_micros() - since < delete_after.as_micros() as i64 {
            out.left += 1;
            continue;
        }
        if iceberg_watermark(store_arc, iceberg, &t.table)
            .await
            .is_some_and(|w| w < seq)
        {
            tracing::debug!(table = %t.table, seq, "replaced files wait for the Iceberg table to pass the compaction");
            out.left += 1;
            continue;
        }
        delete_all(store, t.replaced.iter().map(|k| key_path(k)).collect()).await?;
        crate::fault::point("after_replaced_deleted");
        delete_all(store, vec![ticket_key(&t.tag)]).await?;
        tracing::info!(table = %t.table, partition = %t.partition, files = t.replaced.len(), "deleted the files a compaction replaced");
        out.finished += 1;
        out.files += t.replaced.len();
    }
    Ok(out)
}

/// What one compaction needs besides the partition.
pub struct Job<'a> {
    pub sink: &'a Sink,
    pub run_id: &'a str,
    /// The pending records' number: the attempt's claim + 1, no later than any commit
    /// that can publish the files.
    pub floor: u64,
    pub cfg: &'a CompactionConfig,
    pub spill: &'a std::path::Path,
    pub commits: &'a mpsc::Sender<Ready>,
    /// The sink's flushes: the rewrite sends no request while one is under way.
    pub flushing: &'a Flushing,
}

/// Whether the sink is flushing: set from a flush's start to its commit. Compaction
/// waits for it to clear before each request to the store (at most
/// [`Flushing::MOST_WAIT`]), so that its downloads and uploads never queue beside a
/// commit's: a store, a connection pool or an uplink shared with the stream serves the
/// commit first.
#[derive(Clone, Default)]
pub struct Flushing(std::sync::Arc<std::sync::atomic::AtomicBool>);

/// Clears [`Flushing`] when dropped.
pub struct FlushGuard(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Flushing {
    /// A stream whose flushes follow each other without a pause still lets compaction
    /// through, a request at a time.
    const MOST_WAIT: Duration = Duration::from_secs(1);
    const POLL: Duration = Duration::from_millis(5);

    /// A flush begins; it ends when the guard is dropped.
    pub fn begin(&self) -> FlushGuard {
        self.0.store(true, std::sync::atomic::Ordering::Release);
        FlushGuard(self.0.clone())
    }

    /// Waits until no flush is under way, or [`Flushing::MOST_WAIT`].
    pub async fn quiet(&self) {
        let deadline = tokio::time::Instant::now() + Self::MOST_WAIT;
        while self.0.load(std::sync::atomic::Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Self::POLL).await;
        }
    }
}

/// How a compaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed by this record.
    Committed(u64),
    /// Not committed: the sink stopped (a later attempt settles its ticket).
    NotCommitted,
    /// Its files' row ranges overlap (never seen in a lake walshore wrote): left as it is.
    Overlapping,
}

/// Compacts one chosen partition and has the sink commit it (and with Glue points the
/// partition at it).
pub async fn compact(
    job: &Job<'_>,
    head: &CommitRecord,
    chosen: &Chosen,
    catalog: Option<&mut Catalog>,
) -> Result<Outcome, CompactionError> {
    let store = job.sink.store().clone();
    let Some(files) = files_of(store.as_ref(), head, chosen).await? else {
        tracing::warn!(table = %chosen.table, partition = %chosen.partition, "not compacted: its files' row ranges overlap");
        return Ok(Outcome::Overlapping);
    };
    if files.is_empty() {
        return Ok(Outcome::NotCommitted);
    }
    // The record read, in the tag: a later compaction of the partition sorts after.
    let tag = format!("{:012x}{:04x}", head.seq, rand::random::<u16>());
    let mut done = Written::default();
    let made = async {
        rewrite(job, chosen, &files, &tag, &mut done).await?;
        let ticket = Ticket {
            tag: tag.clone(),
            run_id: job.run_id.to_owned(),
            table: chosen.table.clone(),
            partition: chosen.partition.clone(),
            through: head.seq,
            replaced: files.iter().map(|f| f.key.clone()).collect(),
            written: done.files.iter().map(|f| f.key.clone()).collect(),
            pending: done.pending.clone(),
            committed: None,
            pointed: None,
        };
        put_ticket(store.as_ref(), &ticket).await?;
        Ok::<Ticket, CompactionError>(ticket)
    }
    .await;
    let mut ticket = match made {
        Ok(t) => t,
        Err(e) => {
            // Nothing names them: gone now, not at the next start.
            let keys = done.announced.iter().map(|k| key_path(k));
            if let Err(d) = delete_all(store.as_ref(), keys.collect()).await {
                tracing::warn!(error = %d, "cannot delete a failed compaction's files; the next start does");
            } else if let Err(d) = delete_all(store.as_ref(), done.pending.iter().map(|k| key_path(k)).collect()).await
            {
                tracing::warn!(error = %d, "cannot delete a failed compaction's pending records; the next start does");
            }
            return Err(e);
        }
    };
    crate::fault::point("after_compaction_ticket");
    let (reply, committed) = oneshot::channel();
    let ready = Ready {
        compaction: Compaction {
            table: chosen.table.clone(),
            partition: chosen.partition.clone(),
            through: head.seq,
            tag,
            files: done.files,
        },
        pending: done.pending,
        reply,
    };
    if job.commits.send(ready).await.is_err() {
        return Ok(Outcome::NotCommitted);
    }
    let Ok(seq) = committed.await else {
        return Ok(Outcome::NotCommitted);
    };
    ticket.committed = Some((seq, now_micros()));
    match catalog {
        Some(c) => point(store.as_ref(), c, &mut ticket, false).await?,
        None => put_ticket(store.as_ref(), &ticket).await?,
    }
    Ok(Outcome::Committed(seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, CommitExtras, read_head};
    use crate::lsn::Lsn;

    const RUN: &str = "host-1-aaaa-000000000001";

    fn file(key: &str, table: &str, partition: &str, seq: u64) -> WrittenObject {
        let at = RowPos {
            lsn: Lsn(seq * 8),
            seq: 0,
        };
        WrittenObject {
            key: format!("{}/{partition}/{key}.parquet", table.replace('.', "/")),
            table: table.into(),
            partition: partition.into(),
            rows: 1,
            bytes: 10,
            first: at,
            last: at,
            ops: Default::default(),
        }
    }

    /// Commits `n` records, each with a file in `public.t`'s hour `hour(i)` and one in
    /// `public.r`'s `region=eu`.
    async fn commit(c: &mut Checkpoint, n: u64, hour: impl Fn(u64) -> u64) {
        for _ in 0..n {
            let seq = c.head().seq + 1;
            let files = vec![
                file(
                    &format!("t{seq}"),
                    "public.t",
                    &format!("dt=2026-12-01/hour={:02}", hour(seq)),
                    seq,
                ),
                file(&format!("r{seq}"), "public.r", "region=eu", seq),
            ];
            c.commit_files(RUN, Lsn(seq * 8), None, files, Default::default())
                .await
                .unwrap();
        }
    }

    /// A compaction of `table`'s `partition` as of the head.
    async fn compact(c: &mut Checkpoint, table: &str, partition: &str) {
        let through = c.head().seq;
        let tag = format!("{through:012x}00aa");
        let extras = CommitExtras {
            compacted: vec![Compaction {
                table: table.into(),
                partition: partition.into(),
                through,
                tag: tag.clone(),
                files: vec![file(&format!("_c{tag}/c0"), table, partition, through)],
            }],
            ..Default::default()
        };
        c.commit_files(RUN, Lsn(through * 8), None, Vec::new(), extras)
            .await
            .unwrap();
    }

    fn hour(h: u64) -> String {
        format!("dt=2026-12-01/hour={h:02}")
    }

    /// Folds and prunes (no retention) as far as there is work, each step recorded by
    /// a commit, as the running writer's housekeeping does.
    async fn fold_all(store: &Arc<dyn ObjectStore>, c: &mut Checkpoint, marks: &mut crate::checkpoint::Watermarks) {
        let mut deleted = None;
        loop {
            let head = read_head(store.as_ref()).await.unwrap().unwrap();
            crate::checkpoint::delete_pruned(store.as_ref(), head.pruned, &mut deleted)
                .await
                .unwrap();
            match crate::checkpoint::fold_or_prune(store, &head, *marks, Duration::ZERO)
                .await
                .unwrap()
            {
                Some(next) => {
                    *marks = next;
                    c.set_watermarks(next);
                    commit(c, 1, |_| 9).await;
                }
                None => break,
            }
        }
    }

    /// The planner's partitions: loose files by record and bytes (a file read from a
    /// checkpoint takes the checkpoint's time), and the compacted files' record.
    type State = Vec<(String, String, Vec<(u64, u64)>, Option<u64>)>;

    fn state(p: &Planner) -> State {
        p.parts
            .iter()
            .map(|((t, q), part)| {
                let loose = part.loose.iter().map(|(seq, bytes, _)| (*seq, *bytes)).collect();
                (t.clone(), q.clone(), loose, part.compacted_at)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_start_from_the_saved_planner_knows_what_a_walk_of_the_whole_manifest_knows() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let identity = crate::checkpoint::record::Identity {
            system_id: "7000000000000000001".into(),
            slot: "walshore".into(),
            publication: "pub".into(),
        };
        let mut c = Checkpoint::load(store.clone(), &identity).await.unwrap();
        c.claim_and_recover(RUN, true, &|_: &str| false).await.unwrap();
        let partitions = Arc::new(Partitions {
            default: PartitionBy::CommitDate,
            tables: [
                ("public.t".to_owned(), PartitionBy::CommitHour),
                ("public.r".to_owned(), PartitionBy::Column("region".into())),
            ]
            .into(),
        });
        let planner = |columns: bool| Planner::new(partitions.clone(), columns);
        let head = || async { read_head(store.as_ref()).await.unwrap().unwrap() };
        let mut marks = crate::checkpoint::Watermarks::default();

        // Hours 0 and 1, compacted; then hours 2 to 4, and the first thousand records
        // folded into a checkpoint and pruned.
        commit(&mut c, 598, |seq| seq / 300).await;
        compact(&mut c, "public.t", &hour(0)).await;
        compact(&mut c, "public.t", &hour(1)).await;
        let compactions = c.head().seq;
        commit(&mut c, 600, |seq| 2 + (seq - compactions - 1) / 200).await;
        fold_all(&store, &mut c, &mut marks).await;
        assert!(marks.pruned >= 1000, "{marks:?}");
        let mut first = planner(false);
        first.update(store.as_ref(), &head().await).await.unwrap();
        first.save_if_due(store.as_ref(), &head().await).await;
        let saved: SavedPlanner = read_json(store.as_ref(), &Path::from(PLANNER)).await.unwrap();
        assert_eq!(saved.scanned, c.head().seq);
        // With Glue, the never-compacted column partition is not kept.
        assert!(
            first.parts.keys().all(|(t, _)| t == "public.t"),
            "{:?}",
            first.parts.keys()
        );

        // More hours, a late file in compacted hour 0, hour 2 compacted (its files are
        // in the checkpoint), and the records of the save folded and pruned too.
        let from = c.head().seq + 1;
        commit(&mut c, 900, |seq| 5 + (seq - from) / 300).await;
        commit(&mut c, 1, |_| 0).await;
        compact(&mut c, "public.t", &hour(2)).await;
        commit(&mut c, 10, |_| 9).await;
        fold_all(&store, &mut c, &mut marks).await;
        assert!(marks.pruned > saved.scanned, "the saved record is pruned: {marks:?}");

        let head_now = head().await;
        let mut resumed = planner(false);
        resumed.update(store.as_ref(), &head_now).await.unwrap();
        assert_eq!(resumed.saved, saved.scanned, "the start took the saved planner");
        store.delete(&Path::from(PLANNER)).await.unwrap();
        let mut walked = planner(false);
        walked.update(store.as_ref(), &head_now).await.unwrap();
        assert_eq!(walked.saved, 0);
        assert_eq!(
            state(&resumed),
            state(&walked),
            "from the saved planner as from the whole manifest"
        );
        let late = &resumed.parts[&("public.t".to_owned(), hour(0))];
        assert_eq!(late.loose.len(), 1, "the late file beside hour 0's compaction");
        assert!(late.compacted_at.is_some());
        assert!(
            !resumed.parts.contains_key(&("public.t".to_owned(), hour(2)))
                || resumed.parts[&("public.t".to_owned(), hour(2))].loose.is_empty(),
            "hour 2's files, replaced"
        );
        let grace = Duration::from_secs(0);
        let now = now_micros() + 1;
        assert_eq!(
            resumed.choose(&head_now, grace, now, u64::MAX),
            walked.choose(&head_now, grace, now, u64::MAX)
        );

        // Saved again (by the walk), then read under another choice of columns: not
        // used, and the whole manifest walked, column partitions and all.
        walked.save_if_due(store.as_ref(), &head_now).await;
        let mut columns = planner(true);
        columns.update(store.as_ref(), &head_now).await.unwrap();
        assert_eq!(
            columns.saved, 0,
            "a planner saved without column partitions is not used with them"
        );
        let region = ("public.r".to_owned(), "region=eu".to_owned());
        let files = columns.parts[&region].loose.len();
        assert!(files > 2000, "every file of the column partition: {files}");

        // Another writer (without Glue) compacts the column partition the running
        // planner keeps nothing of: the running planner and a start from the saved
        // one both read the whole manifest again, and know its late file.
        let mut running = planner(false);
        running.update(store.as_ref(), &head_now).await.unwrap();
        compact(&mut c, "public.r", "region=eu").await;
        commit(&mut c, 1, |_| 9).await;
        let head_now = head().await;
        running.update(store.as_ref(), &head_now).await.unwrap();
        let mut started = planner(false);
        started.update(store.as_ref(), &head_now).await.unwrap();
        assert_eq!(
            started.saved, 0,
            "the saved planner kept nothing of the partition: not used"
        );
        for p in [&running, &started] {
            let part = &p.parts[&region];
            assert_eq!(part.loose.len(), 1, "the file after the compaction");
            assert!(part.compacted_at.is_some());
        }
        assert_eq!(state(&running), state(&started));
    }

    #[test]
    fn a_day_or_an_hour_ends_where_the_next_begins() {
        assert_eq!(days_from_civil("1970-01-01"), Some(0));
        assert_eq!(days_from_civil("2000-03-01"), Some(11_017));
        assert_eq!(days_from_civil("2026-12-07"), Some(20_794));
        let day = period_end(&PartitionBy::CommitDate, "dt=2026-12-07").unwrap();
        assert_eq!(day, 20_795 * 86_400 * 1_000_000);
        let hour = period_end(&PartitionBy::CommitHour, "dt=2026-12-07/hour=09").unwrap();
        assert_eq!(hour, (20_794 * 86_400 + 10 * 3600) * 1_000_000);
        assert_eq!(period_end(&PartitionBy::Column("region".into()), "region=eu"), None);
        assert_eq!(period_end(&PartitionBy::CommitDate, "dt=not-a-date"), None);
    }

    #[test]
    fn only_a_compactions_own_folder_marks_its_files() {
        assert!(is_compacted("public/t/dt=2026-12-07/_c00ab00ab00ab00ab/0-1-w.parquet"));
        assert!(!is_compacted("public/t/dt=2026-12-07/0-1-w.parquet"));
        assert!(!is_compacted("public/t/_cat=0123456789abcdef/0-1-w.parquet"));
        assert!(!is_compacted("public/t/dt=2026-12-07/_c00ab/0-1-w.parquet"));
        assert_eq!(
            partition_dir("public/t/region=EU%2FUS/0-1-w.parquet"),
            "public/t/region=EU%2FUS"
        );
        assert_eq!(
            partition_dir("public/t/region=EU%2FUS/_c00ab00ab00ab00ab/0-1-w.parquet"),
            "public/t/region=EU%2FUS"
        );
    }
}
