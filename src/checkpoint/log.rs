//! The commit log's objects and how they are found: numbered commit records, the head
//! hint, and the checkpoints old records are folded into before they are pruned.
//!
//! Finding the head costs the same after a million commits as after ten: the hint names
//! the newest record (it is written after each commit, so it may lag by the records
//! whose hint write was lost), and a reader walks forward from it while the next record
//! exists. Records are numbered without gaps, so the first missing number ends the walk.
//! Only a lake without a hint (written by an older walshore) is listed, once.
//!
//! Folding: records `k·FOLD + 1 ..= (k+1)·FOLD` become one checkpoint object once all of
//! them exist and the head has passed them; a folded record older than
//! `sink.log_retention` is deleted. A reader that needs every committed file (tests,
//! `verify`, the Iceberg projector's rebuild) walks from the head down: the records
//! after the last checkpoint, then the checkpoints, so that it meets each compaction
//! before the files it replaced ([`walk_manifest`]).
//!
//! Readers learn both from a durable head, so each step waits for the one before it to
//! be recorded by a commit: a chunk is marked pruned (`pruned` in the next commit) only
//! once a head records it folded, and its records are deleted only once a head records
//! it pruned. A record missing below a head's `pruned` is therefore pruned, and every
//! record after a head's `folded` exists, whatever housekeeping did since. A chunk that
//! holds the head's base (see [`CommitRecord::delta`]) is not pruned: bases only move
//! forward, so it is pruned once a newer base is written.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::record::{CheckpointRecord, CommitRecord, FORMAT, HeadHint, Replaced};
use super::{CheckpointError, store_err};
use crate::sink::WrittenObject;

pub(crate) const COMMITS: &str = "_walshore/commits";
pub(crate) const CHECKPOINTS: &str = "_walshore/checkpoints";
const HEAD: &str = "_walshore/head.json";

/// Commit records per checkpoint: about 1 MiB of JSON for a few files per commit, and at
/// a commit every 5 s one checkpoint every 83 minutes (6,300 objects a year instead of
/// 6.3 million).
pub const FOLD: u64 = 1000;
/// Records read at once while folding.
const FOLD_CONCURRENCY: usize = 16;

pub(crate) fn commit_key(seq: u64) -> Path {
    Path::from(format!("{COMMITS}/{seq:020}.json"))
}

pub(crate) fn checkpoint_key(last: u64) -> Path {
    Path::from(format!("{CHECKPOINTS}/{last:020}.json"))
}

pub(crate) fn is_not_found(e: &CheckpointError) -> bool {
    matches!(
        e,
        CheckpointError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }
    )
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    store: &dyn ObjectStore,
    key: &Path,
) -> Result<T, CheckpointError> {
    let bytes = store
        .get(key)
        .await
        .map_err(store_err(key))?
        .bytes()
        .await
        .map_err(store_err(key))?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// A record, or None when it does not exist.
pub(crate) async fn read_commit(store: &dyn ObjectStore, seq: u64) -> Result<Option<CommitRecord>, CheckpointError> {
    match read_json(store, &commit_key(seq)).await {
        Ok(r) => Ok(Some(r)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Record `seq`, which must exist (below the head, above the pruned records): its
/// absence is a damaged log, named with `why` (what was reading it).
pub(crate) async fn required_commit(
    store: &dyn ObjectStore,
    seq: u64,
    why: &str,
) -> Result<CommitRecord, CheckpointError> {
    read_commit(store, seq).await?.ok_or_else(|| CheckpointError::Corrupt {
        key: commit_key(seq).to_string(),
        message: format!("missing {why}"),
    })
}

/// Record `seq` made whole with its base (see [`CommitRecord::delta`]).
pub(crate) async fn read_whole(store: &dyn ObjectStore, record: CommitRecord) -> Result<CommitRecord, CheckpointError> {
    match record.base {
        Some(b) if b != record.seq => {
            let base = read_commit(store, b).await?.ok_or_else(|| CheckpointError::Corrupt {
                key: commit_key(b).to_string(),
                message: format!("missing, and record {} holds only what changed since it", record.seq),
            })?;
            Ok(record.resolve(Some(&base)))
        }
        _ => Ok(record),
    }
}

/// The latest commit record, if any, whole: from the hint, walking forward; a lake
/// without a hint (or whose hint names a pruned record) is listed.
pub async fn read_head(store: &dyn ObjectStore) -> Result<Option<CommitRecord>, CheckpointError> {
    match read_head_as_written(store).await? {
        Some(r) => Ok(Some(read_whole(store, r).await?)),
        None => Ok(None),
    }
}

async fn read_head_as_written(store: &dyn ObjectStore) -> Result<Option<CommitRecord>, CheckpointError> {
    let hint = match read_json::<HeadHint>(store, &Path::from(HEAD)).await {
        Ok(h) => Some(h.seq),
        Err(e) if is_not_found(&e) => None,
        // A torn or foreign hint only costs a listing.
        Err(CheckpointError::Corrupt { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut head = match hint.filter(|s| *s > 0) {
        Some(seq) => match read_commit(store, seq).await? {
            Some(r) => r,
            None => return list_head(store).await,
        },
        None => return list_head(store).await,
    };
    while let Some(next) = read_commit(store, head.seq + 1).await? {
        head = next;
    }
    Ok(Some(head))
}

/// The head by listing every record: lakes from before the hint.
async fn list_head(store: &dyn ObjectStore) -> Result<Option<CommitRecord>, CheckpointError> {
    let prefix = Path::from(COMMITS);
    let last = store
        .list(Some(&prefix))
        .try_filter_map(|m| async move { Ok(m.location.as_ref().ends_with(".json").then_some(m.location)) })
        .try_fold(None::<Path>, |max, p| async move { Ok(max.max(Some(p))) })
        .await
        .map_err(store_err(&prefix))?;
    match last {
        None => Ok(None),
        Some(key) => {
            let head: CommitRecord = read_json(store, &key).await?;
            // Walk on, in case records were added while we listed.
            let mut head = head;
            while let Some(next) = read_commit(store, head.seq + 1).await? {
                head = next;
            }
            Ok(Some(head))
        }
    }
}

/// Records the head's number. A failure is only logged: the hint may lag.
pub(crate) async fn write_hint(store: &dyn ObjectStore, seq: u64) {
    let body = serde_json::to_vec(&HeadHint { seq }).expect("hint serializes");
    if let Err(e) = store.put(&Path::from(HEAD), PutPayload::from(body)).await {
        tracing::warn!(seq, error = %e, "cannot write the head hint; the next start walks the commit log from an older one");
    }
}

/// How far folding and pruning have come (carried in every commit record): records
/// `1..=folded` are in checkpoints, records `1..=pruned` are (or are about to be)
/// deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watermarks {
    pub folded: u64,
    pub pruned: u64,
}

/// One step of log housekeeping against the durable `head`: folds the next chunk of
/// records into a checkpoint when the head has passed it, else marks pruned the next
/// chunk the head records as folded whose newest record is older than `retention`.
/// Returns the new watermarks (for the next commit), or None when there is nothing to
/// do. Every step is idempotent: a crash in the middle is finished by the next one.
/// Records are deleted by [`delete_pruned`], once a head records the mark.
pub async fn fold_or_prune(
    store: &Arc<dyn ObjectStore>,
    head: &CommitRecord,
    marks: Watermarks,
    retention: std::time::Duration,
) -> Result<Option<Watermarks>, CheckpointError> {
    // Only whole chunks that the head has passed: their records never change again.
    if marks.folded + FOLD < head.seq {
        let first = marks.folded + 1;
        let last = marks.folded + FOLD;
        fold(store, first, last).await?;
        return Ok(Some(Watermarks { folded: last, ..marks }));
    }
    // Never the chunk of the head's base: the head is read whole with it (a lake that
    // commits seldom keeps a base older than its retention).
    let base = head.base.unwrap_or(head.seq);
    let folded = marks.folded.min(head.folded);
    if marks.pruned < folded && marks.pruned + FOLD < base {
        let last = (marks.pruned + FOLD).min(folded);
        let cp: CheckpointRecord = read_json(store.as_ref(), &checkpoint_key(last)).await?;
        let age = crate::checkpoint::record::now_micros() - cp.last_written_at;
        if age < retention.as_micros() as i64 {
            return Ok(None);
        }
        return Ok(Some(Watermarks { pruned: last, ..marks }));
    }
    Ok(None)
}

/// Deletes the records a durable head marks pruned (`head_pruned`), from `deleted` + 1
/// on; `deleted` (None at a start) tracks how far that has come. At a start, the
/// records below the mark are gone but for a crash between a mark's commit and its
/// deletes: the chunks whose last record is still there are deleted again.
pub async fn delete_pruned(
    store: &dyn ObjectStore,
    head_pruned: u64,
    deleted: &mut Option<u64>,
) -> Result<(), CheckpointError> {
    let mut done = match *deleted {
        Some(d) => d,
        None => {
            let mut d = head_pruned;
            while d > 0 && store.head(&commit_key(d)).await.is_ok() {
                d = d.saturating_sub(FOLD);
            }
            d
        }
    };
    while done < head_pruned {
        let (first, last) = (done + 1, (done + FOLD).min(head_pruned));
        delete_all(store, (first..=last).map(commit_key).collect()).await?;
        tracing::info!(
            first,
            last,
            "pruned commit records older than sink.log_retention (kept in a checkpoint)"
        );
        done = last;
        *deleted = Some(done);
    }
    *deleted = Some(done);
    Ok(())
}

/// Deletes `keys`; one already gone is not an error.
pub(crate) async fn delete_all(store: &dyn ObjectStore, keys: Vec<Path>) -> Result<(), CheckpointError> {
    let first = keys.first().cloned().unwrap_or_default();
    let stream = futures::stream::iter(keys.into_iter().map(Ok)).boxed();
    store
        .delete_stream(stream)
        .map(|r| match r {
            Err(object_store::Error::NotFound { path, .. }) => Ok(Path::from(path)),
            other => other,
        })
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(store_err(&first))
}

async fn fold(store: &Arc<dyn ObjectStore>, first: u64, last: u64) -> Result<(), CheckpointError> {
    let key = checkpoint_key(last);
    if store.head(&key).await.is_ok() {
        return Ok(());
    }
    // Only the files of each record are kept as it arrives: the chunk in memory is the
    // checkpoint's size, whatever else the records hold.
    let records = futures::stream::iter(first..=last)
        .map(|seq| {
            let store = store.clone();
            async move {
                match read_commit(store.as_ref(), seq).await? {
                    Some(mut r) => {
                        let mut replaced = Vec::new();
                        for c in r.compacted {
                            replaced.push(Replaced {
                                seq,
                                table: c.table,
                                partition: c.partition,
                                through: c.through,
                            });
                            r.files.extend(c.files);
                        }
                        Ok((r.written_at, r.files, replaced))
                    }
                    None => Err(CheckpointError::Corrupt {
                        key: commit_key(seq).to_string(),
                        message: format!("missing while folding records {first}..={last} into a checkpoint"),
                    }),
                }
            }
        })
        .buffered(FOLD_CONCURRENCY);
    let mut records = std::pin::pin!(records);
    let mut files: Vec<WrittenObject> = Vec::new();
    let mut counts = Vec::new();
    let mut compacted = Vec::new();
    let mut last_written_at = 0;
    while let Some((written_at, f, replaced)) = records.try_next().await? {
        last_written_at = written_at;
        counts.push(f.len() as u32);
        files.extend(f);
        compacted.extend(replaced);
    }
    let body = serde_json::to_vec(&CheckpointRecord {
        format: FORMAT,
        first,
        last,
        last_written_at,
        files,
        counts,
        compacted,
    })
    .expect("checkpoint serializes");
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match store.put_opts(&key, PutPayload::from(body), opts).await {
        // The same records give the same checkpoint: one folded before us is as good.
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(store_err(&key)(e)),
    }
    tracing::info!(first, last, "folded commit records into a checkpoint");
    Ok(())
}

/// Every data file the log names and no compaction replaced, in commit order. For
/// readers that need the whole manifest in memory (tests); it reads the whole log, so it
/// costs what the lake's age costs.
pub async fn committed_files(store: &dyn ObjectStore) -> Result<Vec<WrittenObject>, CheckpointError> {
    let mut files = Vec::new();
    for_each_committed_file(store, |f| {
        files.push(f);
        Ok(())
    })
    .await?;
    files.reverse();
    Ok(files)
}

/// Hands `each` every data file the log names and no compaction replaced, newest record
/// first, holding one checkpoint or record at a time: a reader of the whole manifest
/// (`verify`) whose memory does not grow with the lake's age.
pub async fn for_each_committed_file(
    store: &dyn ObjectStore,
    mut each: impl FnMut(WrittenObject) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let Some(head) = read_head(store).await? else {
        return Ok(());
    };
    walk_manifest(store, &head, 1, |l| if l.replaced { Ok(()) } else { each(l.file) }).await
}

/// A data file as the commit log names it.
#[derive(Clone, Debug)]
pub struct Listed {
    pub file: WrittenObject,
    /// The record that committed it; for a file of a checkpoint written before
    /// compaction existed, the checkpoint's last record.
    pub seq: u64,
    /// When that record was written (µs since the Unix epoch); for a file of a
    /// checkpoint, when its last record was.
    pub written_at: i64,
    /// A later compaction replaced it: readers leave it out; it stays in the lake until
    /// `compaction.delete_after` has passed.
    pub replaced: bool,
}

/// The compactions seen so far by a walk from the head down: the newest `through` per
/// table and partition.
#[derive(Default)]
struct Masks(HashMap<String, HashMap<String, u64>>);

impl Masks {
    fn add(&mut self, table: &str, partition: &str, through: u64) {
        let m = self
            .0
            .entry(table.to_owned())
            .or_default()
            .entry(partition.to_owned())
            .or_default();
        *m = (*m).max(through);
    }

    /// Whether a compaction seen so far replaced `f`, committed by record `seq`.
    fn replaces(&self, f: &WrittenObject, seq: u64) -> bool {
        self.0
            .get(&f.table)
            .and_then(|p| p.get(&f.partition))
            .is_some_and(|through| seq <= *through)
    }
}

/// Hands `each` every data file that records `from..=head.seq` name (`head`: a whole
/// record, the durable head or an older one), the newest record first, with whether a
/// compaction in a record up to `head` replaced it. The newest-first walk meets every
/// compaction before the files it replaced (a compaction replaces only files committed
/// before it), so it holds one checkpoint or record at a time, and a number per
/// partition ever compacted. The files of a record come in reverse order.
pub async fn walk_manifest(
    store: &dyn ObjectStore,
    head: &CommitRecord,
    from: u64,
    each: impl FnMut(Listed) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    walk_manifest_and_compactions(store, head, from, each, |_| {}).await
}

/// [`walk_manifest`], also handing `compaction` each compaction committed by a record
/// from `from` on (after the files of its record).
pub async fn walk_manifest_and_compactions(
    store: &dyn ObjectStore,
    head: &CommitRecord,
    from: u64,
    mut each: impl FnMut(Listed) -> Result<(), CheckpointError>,
    mut compaction: impl FnMut(&Replaced),
) -> Result<(), CheckpointError> {
    let mut masks = Masks::default();
    let mut emit = |masks: &Masks, files: Vec<WrittenObject>, seq: u64, written_at: i64| {
        files.into_iter().rev().try_for_each(|file| {
            let replaced = masks.replaces(&file, seq);
            each(Listed {
                file,
                seq,
                written_at,
                replaced,
            })
        })
    };
    for s in (from.max(head.folded + 1)..=head.seq).rev() {
        let record = if s == head.seq {
            head.clone()
        } else {
            required_commit(store, s, "while reading the manifest: neither folded nor present").await?
        };
        let mut files = record.files;
        for c in &record.compacted {
            files.extend(c.files.iter().cloned());
        }
        emit(&masks, files, s, record.written_at)?;
        for c in &record.compacted {
            masks.add(&c.table, &c.partition, c.through);
            compaction(&Replaced {
                seq: s,
                table: c.table.clone(),
                partition: c.partition.clone(),
                through: c.through,
            });
        }
    }
    let mut last = head.folded;
    while last > 0 && last >= from {
        let cp: CheckpointRecord = read_json(store, &checkpoint_key(last)).await?;
        let mut files = cp.files;
        if cp.counts.is_empty() {
            // From before compaction: no compaction is in it, and any compaction
            // later than it replaces its files whole or not at all.
            emit(&masks, files, cp.last, cp.last_written_at)?;
        } else {
            for (i, n) in cp.counts.iter().enumerate().rev() {
                let seq = cp.first + i as u64;
                if seq < from {
                    break;
                }
                let at = files.len().saturating_sub(*n as usize);
                emit(&masks, files.split_off(at), seq, cp.last_written_at)?;
                for c in cp.compacted.iter().filter(|c| c.seq == seq) {
                    masks.add(&c.table, &c.partition, c.through);
                    compaction(c);
                }
            }
        }
        last = cp.first.saturating_sub(1);
    }
    Ok(())
}
