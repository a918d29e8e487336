//! Durable progress: the commit log under `{sink.url}/_walshore/`, recovery and fencing.
//!
//! # The exactly-once argument
//!
//! **Keys follow from rows and writer.** A data file is named by the `(_lsn, _seq)` of its
//! first and last rows and by the tag of the attempt that wrote it, and holds exactly
//! the table's rows of its partition between those positions (see `sink`). Within an
//! attempt, two writes of a key carry the same rows, so a retried upload changes
//! nothing a reader can see; two attempts (a restart, a fenced writer) never share a
//! name, so deleting what one attempt left uncommitted never removes a file another
//! committed.
//!
//! **The commit log is the source of truth.** Progress is a log of numbered objects,
//! `_walshore/commits/{seq:020}.json`, each created with a conditional request
//! (`PutMode::Create`, `If-None-Match: *` on S3; create-new on a local directory). A
//! commit record names every data file of the transactions it covers and the `end_lsn`
//! replication resumes from. The record with the highest number is the head. Creating
//! `seq` succeeds for exactly one writer: this is the compare-and-swap that orders
//! commits and fences off a second writer. A record is written only after all its files
//! are durable (on a local directory: fsynced with their directories), and only at a
//! transaction boundary, so a transaction is never split across commit records.
//!
//! **The head is found from a hint.** `_walshore/head.json` names the newest record,
//! written after each commit; a reader walks forward from it while the next number
//! exists (numbers have no gaps). A start therefore costs the same after a million
//! commits as after ten. Old records are folded into checkpoints and pruned (see
//! [`log`]); the manifest of committed files stays whole (less what compactions
//! replaced, below).
//!
//! **Files not yet committed are announced.** Before uploading files for commit `seq`,
//! the writer creates `_walshore/pending/{seq:020}-{n:06}.json` listing their keys. A file
//! in the lake is therefore either named by a commit record or listed in a pending
//! record. A commit record lists the pending records it completes (`completes`), and the
//! writer deletes those before its next commit; so at any moment the only pending
//! records whose files are committed are those the head completes (a claim inherits its
//! head's list). Every other pending record lists only uncommitted files.
//!
//! **PostgreSQL only hears committed positions.** The slot is confirmed up to the head's
//! `end_lsn` after the record is durable, or, when nothing at all is in flight, up to a
//! keepalive's position (the walsender sends a keepalive only for WAL it has decoded, and
//! skips on restart only transactions whose commit record lies before the confirmed
//! position). So PostgreSQL never discards WAL that the lake does not yet hold.
//!
//! **Start-up.** A starting instance (1) reads the head, (2) acquires the slot with
//! START_REPLICATION from the head's `end_lsn` — PostgreSQL refuses a second consumer of
//! an active slot — (3) claims the next sequence number with an empty commit record, so
//! that any earlier writer still running (paused, cut off) fails its next commit and
//! stops, and (4) deletes the files of every pending record the claim does not complete,
//! reading no commit record (see [`pending`]). Transactions PostgreSQL resends from
//! before the head's `end_lsn` are skipped by commit LSN. A process that claimed once
//! and, retrying after a failure, finds a head written by another process stops
//! (`pipeline::Process`): it was taken over, and two writers that claim in turn would
//! restart each other's streams forever. A writer fenced off at its commit deletes what
//! it announced; the running writer deletes again, every `snapshot.poll_interval`, the
//! files of other writers' pending records, so a late upload of a fenced writer is gone
//! within one interval.
//!
//! **The starting state.** A commit record says whether the lake continues a slot's
//! stream (`initialized`, set by the first claim after START_REPLICATION). Until then a
//! start recreates the slot (with an exported snapshot for the copies). Once
//! initialized, a slot that has to be created again means lost continuity, and
//! walshore refuses.
//!
//! **Table copies** run beside the stream (see `snapshot`). A copy's files are
//! announced in their own pending records (numbered no later than the commit that will
//! publish them); the stream's files that wait for a copy are held back and announced
//! again before each commit that passes them over, one record per table, so every file
//! of an unfinished copy stays listed in a pending record that no commit completes
//! until the copy commits, and a crash deletes them all (step 4). The table's snapshot
//! point and identity (`snapshots`, `identities`) are recorded in the same record that
//! publishes the copy; a table without them, or whose identity changed, is copied again,
//! and its changes before the new point are not written. Confirming the slot past
//! held-back changes is safe for the same reason: if their copy never commits, the next
//! copy of the table contains them.
//!
//! **A crash at each step.** Before the pending record: nothing was written. After the
//! pending record or some uploads, before the commit record: the files are listed in a
//! pending record no commit completes; start-up (4) deletes them and the changes are
//! streamed again, because the slot was not confirmed past the head. After the commit
//! record, before its pending records are deleted: the claim inherits their names, and
//! their files are kept. Before confirming to PostgreSQL: the transactions are in the
//! lake; PostgreSQL resends them and the assembler skips them by LSN. After confirming:
//! nothing is resent.
//!
//! **Compaction** (`crate::compaction`) rewrites a closed partition's files and
//! publishes the new ones in a commit record's `compacted` entry, which replaces the
//! partition's files committed up to the record the compaction read the manifest at
//! (`through`). A reader of the manifest walks from the head down and so meets each
//! compaction before the files it replaced ([`log::walk_manifest`]): it sees the old
//! files or the new ones, never both. The new files are announced in pending records
//! like a copy's (a crash before the commit deletes them), and the replaced ones are
//! deleted only `compaction.delete_after` after the commit.

pub mod log;
pub mod pending;
pub mod record;

use std::collections::HashMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::batch::schema::LakeSchema;
use crate::lsn::Lsn;
use crate::retry::Retry;
use crate::sink::WrittenObject;
pub use log::{
    FOLD, Listed, Watermarks, committed_files, delete_pruned, fold_or_prune, for_each_committed_file, read_head,
    walk_manifest, walk_manifest_and_compactions,
};
use log::{commit_key, read_json, write_hint};
pub use pending::{FOREIGN_GRACE, Sweeper, announce_copy, announced_keys};
pub use record::{CommitExtras, CommitRecord, Compaction, PendingRecord, TableIdentity, TableStats};

const SCHEMAS: &str = "_walshore/schemas";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "another walshore committed to this sink (commit {seq} exists, written by run {holder}); this instance stops so that only one writes: check for a second walshore on the same sink.url"
    )]
    Fenced { seq: u64, holder: String },
    #[error("object store error at {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "commit record {key} is unreadable: {message}; it was not written by this version of walshore or is damaged"
    )]
    Corrupt { key: String, message: String },
    #[error(
        "this sink holds the lake of slot {found_slot:?} in database system {found_system}, but the configuration points at slot {slot:?} in system {system}; use a separate sink.url per pipeline"
    )]
    WrongPipeline {
        found_slot: String,
        found_system: String,
        slot: String,
        system: String,
    },
}

impl CheckpointError {
    pub fn retry(&self) -> Retry {
        match self {
            CheckpointError::Store { source, .. } => crate::retry::of_store(source),
            _ => Retry::Definite,
        }
    }
}

fn store_err(key: &Path) -> impl FnOnce(object_store::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        key: key.to_string(),
        source,
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SchemaRecord {
    table: String,
    #[serde(flatten)]
    schema: LakeSchema,
}

fn schema_key(table: &str) -> Path {
    let name = format!("{table}.json");
    Path::from_iter(
        SCHEMAS
            .split('/')
            .map(PathPart::from)
            .chain([PathPart::from(name.as_str())]),
    )
}

/// Every table's lake schema (`_walshore/schemas/`).
pub async fn read_schemas(store: &dyn ObjectStore) -> Result<HashMap<String, LakeSchema>, CheckpointError> {
    let prefix = Path::from(SCHEMAS);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(store_err(&prefix))?;
    let mut out = HashMap::new();
    for m in metas {
        let r: SchemaRecord = read_json(store, &m.location).await?;
        out.insert(r.table, r.schema);
    }
    Ok(out)
}

/// Records a table's lake schema; written before the commit of the first file that
/// has it, so the lake never holds a committed file its recorded schema does not cover.
pub async fn write_schema(store: &dyn ObjectStore, table: &str, schema: &LakeSchema) -> Result<(), CheckpointError> {
    let key = schema_key(table);
    let body = serde_json::to_vec_pretty(&SchemaRecord {
        table: table.to_owned(),
        schema: schema.clone(),
    })
    .expect("schema serializes");
    store.put(&key, PutPayload::from(body)).await.map_err(store_err(&key))?;
    Ok(())
}

/// The commit log of one pipeline, as seen by its single writer.
pub struct Checkpoint {
    store: Arc<dyn ObjectStore>,
    head: CommitRecord,
    /// The newest record written whole: the next record holds what changed since it.
    base: CommitRecord,
    pending_parts: u32,
    /// Log housekeeping's progress, recorded with the next commit.
    marks: Watermarks,
}

impl Checkpoint {
    /// Reads the head; a sink without one starts at `Lsn::ZERO`.
    pub async fn load(store: Arc<dyn ObjectStore>, identity: &record::Identity) -> Result<Checkpoint, CheckpointError> {
        let head = match read_head(store.as_ref()).await? {
            Some(h) => {
                if h.format > record::FORMAT {
                    return Err(CheckpointError::Corrupt {
                        key: commit_key(h.seq).to_string(),
                        message: format!(
                            "written in format {} by a newer walshore (this one writes format {}): run that version or a later one",
                            h.format,
                            record::FORMAT
                        ),
                    });
                }
                if h.slot != identity.slot || h.system_id != identity.system_id {
                    return Err(CheckpointError::WrongPipeline {
                        found_slot: h.slot,
                        found_system: h.system_id,
                        slot: identity.slot.clone(),
                        system: identity.system_id.clone(),
                    });
                }
                h
            }
            None => CommitRecord::genesis(identity),
        };
        let marks = Watermarks {
            folded: head.folded,
            pruned: head.pruned,
        };
        let base = match head.base {
            Some(b) if b != head.seq => {
                log::read_commit(store.as_ref(), b)
                    .await?
                    .ok_or_else(|| CheckpointError::Corrupt {
                        key: commit_key(b).to_string(),
                        message: format!("missing, and record {} holds only what changed since it", head.seq),
                    })?
            }
            _ => head.clone(),
        };
        Ok(Checkpoint {
            store,
            head,
            base,
            pending_parts: 0,
            marks,
        })
    }

    pub fn head(&self) -> &CommitRecord {
        &self.head
    }

    /// Where replication resumes: the end of the last committed transaction.
    pub fn position(&self) -> Lsn {
        self.head.end_lsn
    }

    /// Start-up steps (3) and (4): claim the next sequence number, then clear what a
    /// crashed or fenced writer left behind (files of pending records that no commit
    /// completes). `initialized`: from this claim on the lake continues the slot's
    /// stream. `owns`: whether a run id is of this process (an earlier attempt).
    pub async fn claim_and_recover(
        &mut self,
        run_id: &str,
        initialized: bool,
        owns: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<pending::Cleared, CheckpointError> {
        let mut claim = self
            .head
            .next(run_id, self.head.end_lsn, self.head.commit_ts, Vec::new());
        claim.initialized |= initialized;
        // Nothing is published by a claim: the pending records its head completed may
        // still be there, and their files stay.
        claim.completes = self.head.completes.clone();
        self.commit(claim).await?;
        write_hint(self.store.as_ref(), self.head.seq).await;
        let who = Sweeper {
            claim_seq: self.head.seq,
            run_id,
            owns,
            completes: &self.head.completes,
        };
        pending::clear(self.store.as_ref(), &who, &mut HashMap::new()).await
    }

    /// Announces files about to be uploaded for the next commit.
    pub async fn announce(&mut self, run_id: &str, keys: Vec<String>) -> Result<(), CheckpointError> {
        let seq = self.head.seq + 1;
        let key = pending::stream_key(seq, self.pending_parts);
        self.pending_parts += 1;
        let record = PendingRecord {
            seq,
            run_id: run_id.to_owned(),
            keys,
        };
        pending::write(self.store.as_ref(), &key, &record).await?;
        crate::fault::point("after_pending_record");
        Ok(())
    }

    /// Log housekeeping's progress, recorded with the next commit.
    pub fn set_watermarks(&mut self, marks: Watermarks) {
        self.marks = marks;
    }

    /// Commits `files` up to `end_lsn` as the next record, with the table copies they
    /// finish: compare-and-swap on the sequence number, so it never moves backward and a
    /// second writer is refused. Then the pending records it completes are deleted: they
    /// must be gone before the next commit (see [`pending`]).
    pub async fn commit_files(
        &mut self,
        run_id: &str,
        end_lsn: Lsn,
        commit_ts: Option<i64>,
        files: Vec<WrittenObject>,
        extras: CommitExtras,
    ) -> Result<&CommitRecord, CheckpointError> {
        let seq = self.head.seq + 1;
        let mut extras = extras;
        extras
            .completes
            .extend((0..self.pending_parts).map(|n| pending::stream_key(seq, n).to_string()));
        let mut next = self.head.next_with(
            run_id,
            end_lsn.max(self.head.end_lsn),
            commit_ts.or(self.head.commit_ts),
            files,
            &extras,
        );
        next.folded = self.marks.folded.max(self.head.folded);
        next.pruned = self.marks.pruned.max(self.head.pruned);
        self.commit(next).await?;
        self.pending_parts = 0;
        let done = self.head.completes.iter().map(|k| crate::sink::key_path(k)).collect();
        log::delete_all(self.store.as_ref(), done).await?;
        write_hint(self.store.as_ref(), self.head.seq).await;
        Ok(&self.head)
    }

    async fn commit(&mut self, mut record: CommitRecord) -> Result<(), CheckpointError> {
        let key = commit_key(record.seq);
        // What changed since the last whole record, unless it is time for a whole one.
        let delta = record.delta(&self.base);
        let body = serde_json::to_vec(delta.as_ref().unwrap_or(&record)).expect("commit record serializes");
        crate::fault::point("before_commit_record");
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.store.put_opts(&key, PutPayload::from(body), opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Only a record read back with another writer's id is fencing. A failed
                // read says nothing (the record may well be ours): transient, and the
                // next attempt finds out from the head which it is.
                let holder = read_json::<CommitRecord>(self.store.as_ref(), &key).await?.run_id;
                // Our own earlier try of this very request reached the store (its reply
                // was lost): the record is ours, and it is the one we meant to write.
                if holder != record.run_id {
                    return Err(CheckpointError::Fenced {
                        seq: record.seq,
                        holder,
                    });
                }
            }
            Err(source) => {
                return Err(CheckpointError::Store {
                    key: key.to_string(),
                    source,
                });
            }
        }
        crate::fault::point("after_commit_record");
        match delta {
            Some(d) => record.base = d.base,
            None => {
                record.base = None;
                self.base = record.clone();
            }
        }
        self.head = record;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> record::Identity {
        record::Identity {
            system_id: "7000000000000000001".into(),
            slot: "walshore".into(),
            publication: "pub".into(),
        }
    }

    fn local() -> (tempfile::TempDir, Arc<dyn ObjectStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        (dir, store)
    }

    fn file(key: &str) -> WrittenObject {
        WrittenObject {
            key: key.into(),
            table: "public.t".into(),
            partition: "dt=2026-11-30".into(),
            rows: 1,
            bytes: 1,
            first: crate::batch::RowPos { lsn: Lsn(1), seq: 0 },
            last: crate::batch::RowPos { lsn: Lsn(1), seq: 0 },
            ops: Default::default(),
        }
    }

    /// `n` commits, each publishing one file named after its number.
    async fn commits(store: &Arc<dyn ObjectStore>, n: u64) -> Checkpoint {
        let mut c = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        let own = |_: &str| false;
        c.claim_and_recover("host-1-aaaa-000000000001", true, &own)
            .await
            .unwrap();
        for i in 2..=n {
            c.commit_files(
                "host-1-aaaa-000000000001",
                Lsn(i * 8),
                None,
                vec![file(&format!("f{i}"))],
                Default::default(),
            )
            .await
            .unwrap();
        }
        c
    }

    #[tokio::test]
    async fn the_head_is_read_from_its_hint_walking_forward_or_by_listing_without_one() {
        let (dir, store) = local();
        commits(&store, 40).await;
        assert_eq!(read_head(store.as_ref()).await.unwrap().unwrap().seq, 40);
        // A hint left behind (a crash between a commit and its hint): walked forward.
        log::write_hint(store.as_ref(), 31).await;
        assert_eq!(read_head(store.as_ref()).await.unwrap().unwrap().seq, 40);
        // No hint (a lake of an older walshore), or one naming a deleted record: listed.
        std::fs::remove_file(dir.path().join("_walshore/head.json")).unwrap();
        assert_eq!(read_head(store.as_ref()).await.unwrap().unwrap().seq, 40);
        log::write_hint(store.as_ref(), 5).await;
        std::fs::remove_file(dir.path().join("_walshore/commits/00000000000000000005.json")).unwrap();
        assert_eq!(read_head(store.as_ref()).await.unwrap().unwrap().seq, 40);
    }

    /// Housekeeping's passes until it has nothing left to do, as the running writer
    /// makes them between its commits.
    async fn housekeeping(
        store: &Arc<dyn ObjectStore>,
        marks: &mut Watermarks,
        deleted: &mut Option<u64>,
        retention: std::time::Duration,
    ) {
        loop {
            let head = read_head(store.as_ref()).await.unwrap().unwrap();
            log::delete_pruned(store.as_ref(), head.pruned, deleted).await.unwrap();
            match fold_or_prune(store, &head, *marks, retention).await.unwrap() {
                Some(next) => *marks = next,
                None => break,
            }
        }
    }

    /// What a reader finds now: the whole manifest, and every record missing below the
    /// head is below its `pruned`.
    async fn assert_readable(store: &Arc<dyn ObjectStore>, expected: &[String]) {
        let files: Vec<String> = committed_files(store.as_ref())
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(files, expected);
        let head = read_head(store.as_ref()).await.unwrap().unwrap();
        for seq in 1..=head.seq {
            if log::read_commit(store.as_ref(), seq).await.unwrap().is_none() {
                assert!(
                    seq <= head.pruned,
                    "record {seq} is gone, the head says pruned through {}",
                    head.pruned
                );
            }
        }
    }

    #[tokio::test]
    async fn folding_and_pruning_keep_every_committed_file_named_at_every_step() {
        let (dir, store) = local();
        let mut c = commits(&store, 2 * FOLD + 5).await;
        let mut expected: Vec<String> = (2..=2 * FOLD + 5).map(|i| format!("f{i}")).collect();
        let commit = async |c: &mut Checkpoint, marks: Watermarks, name: &str, expected: &mut Vec<String>| {
            c.set_watermarks(marks);
            let lsn = Lsn((c.head().seq + 1) * 8);
            c.commit_files(
                "host-1-aaaa-000000000001",
                lsn,
                None,
                vec![file(name)],
                Default::default(),
            )
            .await
            .unwrap();
            expected.push(name.to_owned());
        };
        let (mut marks, mut deleted) = (Watermarks::default(), None);
        // Two chunks are folded; with a day's retention none is pruned.
        let day = std::time::Duration::from_secs(86_400);
        housekeeping(&store, &mut marks, &mut deleted, day).await;
        assert_eq!(
            marks,
            Watermarks {
                folded: 2 * FOLD,
                pruned: 0
            }
        );
        assert_readable(&store, &expected).await;
        // Without retention: nothing is pruned before a commit records the folding,
        commit(&mut c, marks, "a", &mut expected).await;
        let zero = std::time::Duration::ZERO;
        housekeeping(&store, &mut marks, &mut deleted, zero).await;
        assert_eq!(
            marks,
            Watermarks {
                folded: 2 * FOLD,
                pruned: 2 * FOLD
            }
        );
        assert_readable(&store, &expected).await;
        let records = || std::fs::read_dir(dir.path().join("_walshore/commits")).unwrap().count();
        assert_eq!(records(), 2 * FOLD as usize + 6, "marked pruned, nothing deleted yet");
        // ... and nothing is deleted before a commit records the pruning.
        commit(&mut c, marks, "b", &mut expected).await;
        housekeeping(&store, &mut marks, &mut deleted, zero).await;
        assert_readable(&store, &expected).await;
        assert_eq!(records(), 7, "the head and the records after the last checkpoint stay");
        let head = read_head(store.as_ref()).await.unwrap().unwrap();
        assert_eq!((head.folded, head.pruned), (2 * FOLD, 2 * FOLD));
        // A start after a crash between the commit of a mark and its deletes deletes them.
        std::fs::write(dir.path().join(log::commit_key(2 * FOLD).as_ref()), b"{}").unwrap();
        let mut after_start = None;
        log::delete_pruned(store.as_ref(), head.pruned, &mut after_start)
            .await
            .unwrap();
        assert_eq!(after_start, Some(2 * FOLD));
        assert_eq!(records(), 7);
    }

    /// A compaction replaces the partition's files committed up to its `through`: the
    /// manifest names its files instead, a file committed after `through` (a late row)
    /// and the files of another partition stay, and the same holds once the records are
    /// folded into a checkpoint (the compaction in the middle of it). The manifest as
    /// of a record before the compaction is what it was.
    #[tokio::test]
    async fn a_compaction_replaces_what_was_committed_up_to_its_record_before_and_after_folding() {
        let (_dir, store) = local();
        let run = "host-1-aaaa-000000000001";
        let mut c = commits(&store, 600).await;
        let in_q = |key: &str| WrittenObject {
            partition: "dt=2026-12-01".into(),
            ..file(key)
        };
        c.commit_files(run, Lsn(601 * 8), None, vec![in_q("q601")], Default::default())
            .await
            .unwrap();
        let through = c.head().seq;
        let before: Vec<String> = committed_files(store.as_ref())
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        // A late file, committed while the compaction ran.
        c.commit_files(run, Lsn(602 * 8), None, vec![file("late1")], Default::default())
            .await
            .unwrap();
        let extras = CommitExtras {
            compacted: vec![Compaction {
                table: "public.t".into(),
                partition: "dt=2026-11-30".into(),
                through,
                tag: "00000000000000aa".into(),
                files: vec![file("c1"), file("c2")],
            }],
            ..Default::default()
        };
        c.commit_files(run, Lsn(602 * 8), None, Vec::new(), extras)
            .await
            .unwrap();
        let compaction = c.head().seq;
        for i in 0..400 {
            c.commit_files(
                run,
                Lsn((603 + i) * 8),
                None,
                vec![file(&format!("late{}", i + 2))],
                Default::default(),
            )
            .await
            .unwrap();
        }
        let mut expected = vec!["q601".to_owned(), "late1".into(), "c1".into(), "c2".into()];
        expected.extend((0..400).map(|i| format!("late{}", i + 2)));
        let visible = |store: Arc<dyn ObjectStore>| async move {
            committed_files(store.as_ref())
                .await
                .unwrap()
                .into_iter()
                .map(|f| f.key)
                .collect::<Vec<_>>()
        };
        assert_eq!(visible(store.clone()).await, expected);
        // As of the record before the compaction: every file, none replaced.
        let older = log::read_whole(
            store.as_ref(),
            log::read_commit(store.as_ref(), compaction - 1).await.unwrap().unwrap(),
        )
        .await
        .unwrap();
        let mut then = Vec::new();
        walk_manifest(store.as_ref(), &older, 1, |l| {
            assert!(!l.replaced, "{} replaced before the compaction", l.file.key);
            then.push(l.file.key);
            Ok(())
        })
        .await
        .unwrap();
        then.reverse();
        let mut want_then = before.clone();
        want_then.push("late1".into());
        assert_eq!(then, want_then);
        // Folded: the compaction sits inside the checkpoint, and the manifest is the same.
        let (mut marks, mut deleted) = (Watermarks::default(), None);
        housekeeping(&store, &mut marks, &mut deleted, std::time::Duration::from_secs(86_400)).await;
        assert_eq!(marks.folded, FOLD);
        c.set_watermarks(marks);
        c.commit_files(run, Lsn(1100 * 8), None, vec![file("after")], Default::default())
            .await
            .unwrap();
        expected.push("after".into());
        assert_eq!(read_head(store.as_ref()).await.unwrap().unwrap().folded, FOLD);
        assert_eq!(visible(store.clone()).await, expected);
        // Replaced files are listed as such, with the record that committed them.
        let head = read_head(store.as_ref()).await.unwrap().unwrap();
        let mut replaced = Vec::new();
        walk_manifest(store.as_ref(), &head, 1, |l| {
            if l.replaced {
                replaced.push((l.seq, l.file.key));
            }
            Ok(())
        })
        .await
        .unwrap();
        replaced.reverse();
        let want: Vec<(u64, String)> = (2..=600).map(|i| (i, format!("f{i}"))).collect();
        assert_eq!(replaced, want);
    }

    #[tokio::test]
    async fn recovery_keeps_what_the_head_completes_and_a_sweep_spares_fresh_foreign_records() {
        let (dir, store) = local();
        let put = |k: &str| {
            let p = dir.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        };
        let mut a = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        let own_a = |r: &str| r.starts_with("host-1-");
        a.claim_and_recover("host-1-aaaa-000000000001", true, &own_a)
            .await
            .unwrap();
        // Writer A announces and uploads two flushes; the first is committed, then A
        // dies before it deleted that pending record; the second never commits.
        a.announce("host-1-aaaa-000000000001", vec!["public/t/a1.parquet".into()])
            .await
            .unwrap();
        put("public/t/a1.parquet");
        let committed_pending = pending::stream_key(a.head().seq + 1, 0).to_string();
        let mut extras = CommitExtras::default();
        extras.completes.push(committed_pending.clone());
        let mut next = a.head().next_with(
            "host-1-aaaa-000000000001",
            Lsn(16),
            None,
            vec![file("public/t/a1.parquet")],
            &extras,
        );
        next.completes = vec![committed_pending.clone()];
        a.commit(next).await.unwrap();
        a.pending_parts = 0;
        a.announce("host-1-aaaa-000000000001", vec!["public/t/a2.parquet".into()])
            .await
            .unwrap();
        put("public/t/a2.parquet");
        // B starts: A's committed file stays, its uncommitted one goes; A's records are
        // another process's and young, so the one of the uncommitted file is kept (a
        // late upload is deleted again by the sweep); the completed one goes.
        let mut b = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        let own_b = |r: &str| r.starts_with("host-2-");
        let cleared = b
            .claim_and_recover("host-2-bbbb-000000000001", true, &own_b)
            .await
            .unwrap();
        assert_eq!((cleared.files, cleared.kept), (1, 1));
        assert!(dir.path().join("public/t/a1.parquet").exists(), "committed: kept");
        assert!(!dir.path().join("public/t/a2.parquet").exists(), "uncommitted: deleted");
        assert!(!dir.path().join(&committed_pending).exists());
        // A's late upload lands after B's start: the sweep removes it, and keeps the
        // record for the grace period.
        put("public/t/a2.parquet");
        let who = Sweeper {
            claim_seq: b.head().seq,
            run_id: "host-2-bbbb-000000000001",
            owns: &own_b,
            completes: &[],
        };
        let mut cache = HashMap::new();
        let swept = pending::clear(store.as_ref(), &who, &mut cache).await.unwrap();
        assert_eq!((swept.files, swept.kept), (1, 1));
        assert!(!dir.path().join("public/t/a2.parquet").exists());
        // B's own records in flight are never touched.
        b.announce("host-2-bbbb-000000000001", vec!["public/t/b1.parquet".into()])
            .await
            .unwrap();
        put("public/t/b1.parquet");
        pending::clear(store.as_ref(), &who, &mut cache).await.unwrap();
        assert!(dir.path().join("public/t/b1.parquet").exists());
    }

    /// 300 tables, each commit touching two of a hot ten (and a cold one every tenth),
    /// now and then one leaving or adopted: every record read back is whole and equal
    /// to what the writer holds, and a record holds only what changed since its base
    /// (a few hundred bytes here, not the whole state of 300 tables).
    #[tokio::test]
    async fn records_hold_what_changed_since_their_base_and_read_back_whole() {
        let (dir, store) = local();
        // The claim, commit 1.
        let mut c = commits(&store, 1).await;
        let table = |i: u64| format!("public.t{:03}", i % 300);
        let mut sizes = Vec::new();
        for i in 1..=450u64 {
            let mut extras = CommitExtras::default();
            if i <= 300 {
                extras.copied.push((
                    table(i),
                    Lsn(i * 8),
                    TableIdentity {
                        oid: i as u32,
                        ..Default::default()
                    },
                ));
            } else if i % 7 == 0 {
                extras.left.push(table(i));
            } else if i % 11 == 0 {
                extras.adopted.push((
                    table(i + 1),
                    TableIdentity {
                        oid: 7,
                        membership: vec![1, 2],
                        ..Default::default()
                    },
                ));
            }
            // Two tables of a hot ten, and a cold one now and then.
            let touched = if i % 10 == 0 {
                vec![i % 10, 3 + i % 7, i / 10]
            } else {
                vec![i % 10, 3 + i % 7]
            };
            let files = touched
                .iter()
                .map(|k| WrittenObject {
                    table: table(*k),
                    ..file(&format!("f{i}-{k}"))
                })
                .collect();
            let written = c
                .commit_files("host-1-aaaa-000000000001", Lsn(i * 16), Some(i as i64), files, extras)
                .await
                .unwrap()
                .clone();
            let raw = std::fs::read(dir.path().join(log::commit_key(written.seq).as_ref())).unwrap();
            sizes.push((
                written.seq,
                raw.len(),
                written.base == Some(written.seq) || written.base.is_none(),
            ));
            let head = read_head(store.as_ref()).await.unwrap().unwrap();
            assert_eq!(
                (&head.tables, &head.snapshots, &head.identities),
                (&written.tables, &written.snapshots, &written.identities),
                "record {} read back whole",
                written.seq
            );
            // A writer starting now resumes from the same state and base.
            let again = Checkpoint::load(store.clone(), &identity()).await.unwrap();
            assert_eq!(again.head().tables, written.tables);
        }
        let head = read_head(store.as_ref()).await.unwrap().unwrap();
        assert!(
            head.snapshots.len() > 250 && head.identities.len() > 250,
            "{} {}",
            head.snapshots.len(),
            head.identities.len()
        );
        let deltas: Vec<usize> = sizes
            .iter()
            .filter(|(s, _, whole)| !whole && *s > 310)
            .map(|(_, n, _)| *n)
            .collect();
        let wholes: Vec<usize> = sizes
            .iter()
            .filter(|(s, _, whole)| *whole && *s > 310)
            .map(|(_, n, _)| *n)
            .collect();
        assert!(!wholes.is_empty() && !deltas.is_empty(), "{sizes:?}");
        let (most, least) = (deltas.iter().max().unwrap(), wholes.iter().min().unwrap());
        assert!(
            most * 5 < *least,
            "deltas up to {most} bytes, whole records from {least}"
        );
    }

    /// A lake that commits seldom keeps a head whose base lies in a chunk old enough to
    /// prune: that chunk waits until a newer base is written, and the head reads back
    /// whole at every step.
    #[tokio::test]
    async fn pruning_never_reaches_the_heads_base() {
        let (_dir, store) = local();
        // The claim, commit 1.
        let mut c = commits(&store, 1).await;
        let (mut marks, mut deleted) = (Watermarks::default(), None);
        let zero = std::time::Duration::ZERO;
        let commit = async |c: &mut Checkpoint, marks: Watermarks, i: u64, copies: u64| {
            let mut extras = CommitExtras::default();
            for k in 0..copies {
                extras.copied.push((
                    format!("public.t{k:03}"),
                    Lsn(i * 8),
                    TableIdentity {
                        oid: (i * 1000 + k) as u32,
                        ..Default::default()
                    },
                ));
            }
            c.set_watermarks(marks);
            let f = WrittenObject {
                table: format!("public.t{:03}", i % 3),
                ..file(&format!("f{i}"))
            };
            c.commit_files("host-1-aaaa-000000000001", Lsn(i * 8), None, vec![f], extras)
                .await
                .unwrap()
                .clone()
        };
        // 300 tables copied, then small commits; at 1950 every table is copied again (a
        // whole record), so the records after it lean on 1950.
        commit(&mut c, marks, 2, 300).await;
        for i in 3..=2040 {
            let written = commit(&mut c, marks, i, if i == 1950 { 300 } else { 0 }).await;
            if i > 1950 && i < 2040 {
                assert_eq!(written.base, Some(1950), "record {i}");
            }
        }
        for _ in 0..3 {
            housekeeping(&store, &mut marks, &mut deleted, zero).await;
            let head = read_head(store.as_ref())
                .await
                .expect("the head reads back whole")
                .unwrap();
            assert_eq!(head.snapshots.len(), 300);
            assert!(head.pruned < 1950, "the chunk of the head's base is kept: {marks:?}");
            let next = head.seq + 1;
            commit(&mut c, marks, next, 0).await;
        }
        // Past a newer base, the chunk goes.
        for i in 0..150 {
            let next = c.head().seq + 1;
            commit(&mut c, marks, next, 0).await;
            if i % 50 == 0 {
                housekeeping(&store, &mut marks, &mut deleted, zero).await;
            }
        }
        housekeeping(&store, &mut marks, &mut deleted, zero).await;
        let next = c.head().seq + 1;
        commit(&mut c, marks, next, 0).await;
        housekeeping(&store, &mut marks, &mut deleted, zero).await;
        let head = read_head(store.as_ref()).await.unwrap().unwrap();
        assert_eq!((head.folded, head.pruned), (2000, 2000), "{marks:?}");
        assert!(log::read_commit(store.as_ref(), 1950).await.unwrap().is_none());
        assert_eq!(head.snapshots.len(), 300);
    }

    /// The compare-and-swap on a real directory: a writer that claimed, was paused, and
    /// commits after another instance claimed the next number is refused, naming the
    /// other; so is a second claim of the same number.
    #[tokio::test]
    async fn a_writer_overtaken_by_a_later_claim_cannot_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let mut a = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        let mut late = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        let own = |_: &str| false;
        a.claim_and_recover("host-1-aaaa-00000001", true, &own).await.unwrap();
        // Loaded before a's claim: its claim takes the same number and is refused.
        match late.claim_and_recover("host-2-bbbb-00000001", true, &own).await {
            Err(CheckpointError::Fenced { seq: 1, holder }) => assert_eq!(holder, "host-1-aaaa-00000001"),
            other => panic!("a second claim of commit 1 was not refused: {other:?}"),
        }
        // b takes over after a paused; a wakes and commits.
        let mut b = Checkpoint::load(store.clone(), &identity()).await.unwrap();
        b.claim_and_recover("host-2-bbbb-00000002", true, &own).await.unwrap();
        match a
            .commit_files("host-1-aaaa-00000001", Lsn(0x100), None, Vec::new(), Default::default())
            .await
        {
            Err(CheckpointError::Fenced { seq: 2, holder }) => assert_eq!(holder, "host-2-bbbb-00000002"),
            other => panic!("the overtaken writer committed: {:?}", other.map(|r| r.seq)),
        }
        assert_eq!(
            read_head(store.as_ref()).await.unwrap().unwrap().run_id,
            "host-2-bbbb-00000002"
        );
    }
}
