//! Pending records: files announced before they are uploaded, so that a crash or a
//! fenced writer never leaves a file that nobody will delete.
//!
//! A pending record lists files of one writer, and data file names carry their writer's
//! tag, so no other writer ever commits (or uploads) a file a pending record lists.
//! Which listed files are committed follows from one record: the head's `completes`
//! (a writer deletes the pending records a commit completes before its next commit, and
//! a claim inherits its head's list). Every other pending record lists only uncommitted
//! files, and deleting them is always safe.
//!
//! Records of another process (a writer that was fenced, paused, or crashed) are kept
//! for [`FOREIGN_GRACE`] after they were written, and their files deleted again at every
//! sweep: a fenced writer that wakes and finishes an upload after our start has its file
//! removed within one sweep interval.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::log::{delete_all, is_not_found, read_json};
use super::record::{PendingRecord, now_micros};
use super::{CheckpointError, store_err};

pub(crate) const PENDING: &str = "_walshore/pending";

/// How long the records of another process are kept (their files deleted at every
/// sweep), so that a writer that was paused or cut off and wakes within it has its late
/// uploads removed: longer than any upload's retries (`sink.request_timeout` × the
/// store's retries, two minutes) by far.
pub const FOREIGN_GRACE: Duration = Duration::from_secs(3600);

pub(crate) fn stream_key(seq: u64, part: u32) -> Path {
    Path::from(format!("{PENDING}/{seq:020}-{part:06}.json"))
}

pub(crate) fn copy_key(floor: u64) -> Path {
    Path::from(format!(
        "{PENDING}/{floor:020}-copy-{:016x}.json",
        rand::random::<u64>()
    ))
}

pub(crate) async fn write(store: &dyn ObjectStore, key: &Path, record: &PendingRecord) -> Result<(), CheckpointError> {
    let body = serde_json::to_vec(record).expect("pending record serializes");
    store.put(key, PutPayload::from(body)).await.map_err(store_err(key))?;
    Ok(())
}

/// Announces files that a table copy (or the sink, for files it holds back) is about to
/// upload or keeps beyond the next commit. `floor` is a commit number no later than the
/// one that will publish them. Returns the pending record's key.
pub async fn announce_copy(
    store: &dyn ObjectStore,
    floor: u64,
    run_id: &str,
    keys: Vec<String>,
) -> Result<Path, CheckpointError> {
    let key = copy_key(floor);
    let record = PendingRecord {
        seq: floor,
        run_id: run_id.to_owned(),
        keys,
    };
    write(store, &key, &record).await?;
    Ok(key)
}

/// What a pass over the pending records did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cleared {
    /// Uncommitted files deleted (or already gone).
    pub files: usize,
    /// Of those, the files of records this pass read for the first time (the others
    /// were deleted by an earlier pass and are deleted again, for a late upload).
    pub fresh: usize,
    /// Records of other processes kept for their grace period.
    pub kept: usize,
}

/// Who is asking: which records are its own, and what it has committed.
pub struct Sweeper<'a> {
    /// The sequence number this writer claimed: a record numbered after it belongs to a
    /// writer that claimed later (this one is fenced, and finds out at its next commit),
    /// and is never touched.
    pub claim_seq: u64,
    /// The current attempt's run id: its own records are in flight, never touched.
    pub run_id: &'a str,
    /// Whether a run id is of this process (an earlier attempt, finished): its records
    /// go at once.
    pub owns: &'a (dyn Fn(&str) -> bool + Send + Sync),
    /// Pending records whose files are committed (the head's `completes`).
    pub completes: &'a [String],
}

/// Deletes the files of every pending record that no commit completes, and the records
/// themselves (another process's after its grace period). Records are immutable once
/// written: `cache` keeps those already read, so a sweep repeated every few seconds
/// costs one listing.
pub async fn clear(
    store: &dyn ObjectStore,
    who: &Sweeper<'_>,
    cache: &mut HashMap<Path, PendingRecord>,
) -> Result<Cleared, CheckpointError> {
    let prefix = Path::from(PENDING);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(store_err(&prefix))?;
    let completed: HashSet<&str> = who.completes.iter().map(String::as_str).collect();
    let mut out = Cleared::default();
    let listed: HashSet<Path> = metas.iter().map(|m| m.location.clone()).collect();
    cache.retain(|k, _| listed.contains(k));
    // One bulk delete for the files of every record, then one for the records whose
    // time is up: a pass costs a few requests however many records wait out their grace.
    let mut files = Vec::new();
    let mut done = Vec::new();
    for meta in metas {
        let (record, fresh) = match cache.get(&meta.location) {
            Some(r) => (r.clone(), false),
            None => match read_json::<PendingRecord>(store, &meta.location).await {
                Ok(r) => {
                    cache.insert(meta.location.clone(), r.clone());
                    (r, true)
                }
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        if record.seq > who.claim_seq || record.run_id == who.run_id {
            continue;
        }
        if completed.contains(meta.location.as_ref()) {
            done.push(meta.location);
            continue;
        }
        out.files += record.keys.len();
        if fresh {
            out.fresh += record.keys.len();
            tracing::debug!(record = %meta.location, run_id = %record.run_id, files = record.keys.len(), "deleting the uncommitted files of another run");
        }
        files.extend(record.keys.iter().map(|k| crate::sink::key_path(k)));
        let age = now_micros() - meta.last_modified.timestamp_micros();
        if (who.owns)(&record.run_id) || age > FOREIGN_GRACE.as_micros() as i64 {
            done.push(meta.location);
        } else {
            out.kept += 1;
        }
    }
    // Files before the records that list them: a crash in between leaves records whose
    // files are gone, and the next pass deletes them again.
    if !files.is_empty() {
        delete_all(store, files).await?;
        crate::fault::point("during_recovery");
    }
    delete_all(store, done.clone()).await?;
    for key in &done {
        cache.remove(key);
    }
    Ok(out)
}

/// A fenced writer withdraws what it announced: its files are uncommitted (no commit of
/// its can follow), and no other writer uses their names, except those of the records
/// the head completes, which a commit of its own published before the other writer
/// claimed. The head is read first: the writer that claimed after it deletes those
/// records before it commits again, so a record completed by an older head is gone
/// from the listing that follows.
pub async fn withdraw(store: &dyn ObjectStore, run_id: &str) -> Result<usize, CheckpointError> {
    let completes: HashSet<String> = super::read_head(store)
        .await?
        .map(|h| h.completes.into_iter().collect())
        .unwrap_or_default();
    let prefix = Path::from(PENDING);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(store_err(&prefix))?;
    let mut files = 0;
    for meta in metas {
        let record = match read_json::<PendingRecord>(store, &meta.location).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(e),
        };
        if record.run_id != run_id || completes.contains(meta.location.as_ref()) {
            continue;
        }
        files += record.keys.len();
        delete_all(store, record.keys.iter().map(|k| crate::sink::key_path(k)).collect()).await?;
        delete_all(store, vec![meta.location]).await?;
    }
    Ok(files)
}

/// Every file listed in a pending record now: uploads under way (or left by a crash
/// for the next start to delete), and the files the head's `completes` publishes.
pub async fn announced_keys(store: &dyn ObjectStore) -> Result<HashSet<String>, CheckpointError> {
    let prefix = Path::from(PENDING);
    let records: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(store_err(&prefix))?;
    let mut keys = HashSet::new();
    for meta in records {
        match read_json::<PendingRecord>(store, &meta.location).await {
            Ok(r) => keys.extend(r.keys),
            // Completed and deleted since the listing.
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}
