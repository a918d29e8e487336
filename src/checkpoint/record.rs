//! The JSON records of the commit log. Field names are a stable format: `status` and
//! operators read them. Fields added after format 1 default when absent, so a lake
//! written by an older walshore reads as it did.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::sink::WrittenObject;

/// The format written; 2 added `completes`, `identities`, `folded`, `pruned`, writer tags
/// in data file names, the head hint and checkpoints; 3 added `base` and `dropped`: a
/// record holds only what changed since its base (see [`CommitRecord::delta`]); 4 added
/// `compacted`, and `counts` and `compacted` in checkpoints. A writer refuses a lake of
/// a newer format: it would fold away what it does not know.
pub const FORMAT: u32 = 4;

/// A record is written whole (a base) at least every this many commits, and whenever
/// what changed since its base is more than half the whole: so the head's state is
/// read in two objects at most. Pruning never reaches the head's base (`log`).
pub const BASE_EVERY: u64 = 100;

/// Which pipeline a lake belongs to.
#[derive(Clone, Debug)]
pub struct Identity {
    pub system_id: String,
    pub slot: String,
    pub publication: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableStats {
    /// Rows written for the table since the lake began.
    pub rows: u64,
    /// Commit time (µs since the Unix epoch) of the latest change written for it.
    pub last_commit_ts: Option<i64>,
}

pub use crate::change::TableIdentity;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitRecord {
    pub format: u32,
    pub seq: u64,
    pub run_id: String,
    pub system_id: String,
    pub slot: String,
    pub publication: String,
    /// Replication resumes here: the end of the last committed transaction.
    pub end_lsn: Lsn,
    /// Commit time of the last committed transaction, µs since the Unix epoch.
    pub commit_ts: Option<i64>,
    /// Wall-clock time of this record, µs since the Unix epoch.
    pub written_at: i64,
    /// The data files this record publishes.
    pub files: Vec<WrittenObject>,
    /// Running totals per `schema.table`.
    pub tables: BTreeMap<String, TableStats>,
    /// The lake continues the slot's stream (set by the first claim after
    /// START_REPLICATION). Until then a start recreates the slot.
    #[serde(default)]
    pub initialized: bool,
    /// Tables whose copy is committed: `schema.table` -> the snapshot point its `R` rows
    /// carry as `_lsn`. The stream's changes to a table before its point are in the
    /// copy and are not written again.
    #[serde(default)]
    pub snapshots: BTreeMap<String, Lsn>,
    /// The pending records whose files this record publishes (a claim inherits its
    /// head's): the only pending records whose files are committed. The writer deletes
    /// them before its next commit, so at a start every other pending record lists only
    /// uncommitted files.
    #[serde(default)]
    pub completes: Vec<String>,
    /// What each table of the lake is a copy of: set when its copy commits, dropped when
    /// it leaves the publication.
    #[serde(default)]
    pub identities: BTreeMap<String, TableIdentity>,
    /// Records `1..=folded` are also in checkpoints (`_walshore/checkpoints/`).
    #[serde(default)]
    pub folded: u64,
    /// Records `1..=pruned` have been deleted (they are in checkpoints).
    #[serde(default)]
    pub pruned: u64,
    /// As written: absent in a whole record (a base). Present in a delta, which holds
    /// in `tables`, `snapshots` and `identities` only the entries that differ from those
    /// of record `base`, and in `dropped` the tables whose snapshot point and identity
    /// that record has and this one has not. Readers get records resolved
    /// ([`super::read_head`]): every field whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// Change-log partitions this record compacts: each entry's files replace the
    /// partition's files committed up to its `through` (see [`Compaction`]). Not in
    /// `files`, which holds only new changes: readers of the changes (the projector,
    /// notifications, row counts) pass over a compaction; readers of the manifest take
    /// its files and leave out what it replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacted: Vec<Compaction>,
}

/// A partition of the change log rewritten into fewer files: the same rows, in
/// `(_lsn, _seq)` order. The files of `table`'s `partition` committed by records
/// `..=through` are replaced by `files`; a file committed to the partition after
/// `through` (a late row) stays as it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Compaction {
    /// `schema.table`
    pub table: String,
    pub partition: String,
    pub through: u64,
    /// Names the compaction's folder (`{partition}/_c{tag}/`) and its record of the
    /// files it replaced (`_walshore/compactions/{tag}.json`).
    pub tag: String,
    pub files: Vec<WrittenObject>,
}

/// A compaction as a checkpoint keeps it: what it replaced, and the record it was in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replaced {
    pub seq: u64,
    pub table: String,
    pub partition: String,
    pub through: u64,
}

/// Files announced before upload: for commit `seq` (the stream), or for a commit at or
/// after `seq` (copies and the files held back for them).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PendingRecord {
    pub seq: u64,
    pub run_id: String,
    pub keys: Vec<String>,
}

/// `_walshore/head.json`: where the newest commit record was, a hint written after each
/// commit so that a start reads the head without listing the log. The log itself stays
/// the truth: a reader walks forward from the hint while the next record exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadHint {
    pub seq: u64,
}

/// `_walshore/checkpoints/{last:020}.json`: the data files of commit records
/// `first..=last`, folded into one object so that old records can be pruned and the log
/// does not grow by an object per commit forever.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    pub format: u32,
    pub first: u64,
    pub last: u64,
    /// Wall-clock time of record `last`.
    pub last_written_at: i64,
    /// Every data file the folded records publish, in commit order (a compaction's
    /// after the record's own).
    pub files: Vec<WrittenObject>,
    /// How many of `files` each record `first..=last` published; empty in checkpoints
    /// written before compaction, whose records are all older than any compaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<u32>,
    /// The compactions the folded records made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compacted: Vec<Replaced>,
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What a commit publishes besides the stream's files.
#[derive(Clone, Debug, Default)]
pub struct CommitExtras {
    /// Table copies that this commit finishes: `schema.table`, snapshot point, identity.
    pub copied: Vec<(String, Lsn, TableIdentity)>,
    /// Tables no longer in the publication: their point and identity are dropped, so
    /// that a return copies them again.
    pub left: Vec<String>,
    /// Tables no longer in the publication whose OID is kept (`snapshot.mode =
    /// "never"`): a table created again under the name starts with a `T` row.
    pub departed: Vec<String>,
    /// Table OIDs seen in the stream (`snapshot.mode = "never"`, where no copy records
    /// them): a later table under the same name is a new table.
    pub oids: Vec<(String, u32)>,
    /// Publication memberships observed (adopted for tables a lake from before
    /// identities holds).
    pub adopted: Vec<(String, TableIdentity)>,
    /// Pending records whose files this commit publishes (besides its own stream parts).
    pub completes: Vec<String>,
    /// Change-log partitions compacted.
    pub compacted: Vec<Compaction>,
}

impl CommitRecord {
    /// The state of an empty lake (never written).
    pub fn genesis(id: &Identity) -> CommitRecord {
        CommitRecord {
            format: FORMAT,
            seq: 0,
            run_id: String::new(),
            system_id: id.system_id.clone(),
            slot: id.slot.clone(),
            publication: id.publication.clone(),
            end_lsn: Lsn::ZERO,
            commit_ts: None,
            written_at: 0,
            files: Vec::new(),
            tables: BTreeMap::new(),
            initialized: false,
            snapshots: BTreeMap::new(),
            completes: Vec::new(),
            identities: BTreeMap::new(),
            folded: 0,
            pruned: 0,
            base: None,
            dropped: Vec::new(),
            compacted: Vec::new(),
        }
    }

    /// This record (whole) as written after the whole record `base`: its entries that
    /// differ from the base's, and what the base has that it has not. None when that is
    /// not worth it (see [`BASE_EVERY`]): the record is then written whole.
    pub fn delta(&self, base: &CommitRecord) -> Option<CommitRecord> {
        if base.seq == 0 || self.seq.saturating_sub(base.seq) >= BASE_EVERY {
            return None;
        }
        fn changed<K: Ord + Clone, V: PartialEq + Clone>(
            now: &BTreeMap<K, V>,
            then: &BTreeMap<K, V>,
        ) -> BTreeMap<K, V> {
            now.iter()
                .filter(|(k, v)| then.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }
        // Running totals per table are never removed; a snapshot point or identity is,
        // when its table leaves: such a table's other entry, if it has one, goes in
        // whole, so that `resolve` can drop both and take back what stays.
        if base.tables.keys().any(|t| !self.tables.contains_key(t)) {
            return None;
        }
        let mut dropped: Vec<String> = base
            .snapshots
            .keys()
            .filter(|t| !self.snapshots.contains_key(*t))
            .chain(base.identities.keys().filter(|t| !self.identities.contains_key(*t)))
            .cloned()
            .collect();
        dropped.sort();
        dropped.dedup();
        let tables = changed(&self.tables, &base.tables);
        let mut snapshots = changed(&self.snapshots, &base.snapshots);
        let mut identities = changed(&self.identities, &base.identities);
        for t in &dropped {
            if let Some(p) = self.snapshots.get(t) {
                snapshots.insert(t.clone(), *p);
            }
            if let Some(i) = self.identities.get(t) {
                identities.insert(t.clone(), i.clone());
            }
        }
        let entries = tables.len() + snapshots.len() + identities.len() + dropped.len();
        let whole = self.tables.len() + self.snapshots.len() + self.identities.len();
        if entries * 2 > whole {
            return None;
        }
        Some(CommitRecord {
            tables,
            snapshots,
            identities,
            dropped,
            base: Some(base.seq),
            ..self.clone()
        })
    }

    /// A record read as written, made whole with its base (read whole); a base is
    /// returned as it is. `base` still names the base it was made whole with.
    pub fn resolve(self, base: Option<&CommitRecord>) -> CommitRecord {
        let (Some(_), Some(base)) = (self.base, base) else {
            return self;
        };
        let mut whole = CommitRecord {
            tables: base.tables.clone(),
            snapshots: base.snapshots.clone(),
            identities: base.identities.clone(),
            dropped: Vec::new(),
            ..self.clone()
        };
        for t in &self.dropped {
            whole.snapshots.remove(t);
            whole.identities.remove(t);
        }
        whole.tables.extend(self.tables);
        whole.snapshots.extend(self.snapshots);
        whole.identities.extend(self.identities);
        whole
    }

    /// The record that follows this one.
    pub fn next(&self, run_id: &str, end_lsn: Lsn, commit_ts: Option<i64>, files: Vec<WrittenObject>) -> CommitRecord {
        self.next_with(run_id, end_lsn, commit_ts, files, &CommitExtras::default())
    }

    /// [`CommitRecord::next`] that also records finished table copies, departures and
    /// the pending records it completes.
    pub fn next_with(
        &self,
        run_id: &str,
        end_lsn: Lsn,
        commit_ts: Option<i64>,
        files: Vec<WrittenObject>,
        extras: &CommitExtras,
    ) -> CommitRecord {
        let mut snapshots = self.snapshots.clone();
        let mut identities = self.identities.clone();
        for t in &extras.left {
            snapshots.remove(t);
            identities.remove(t);
        }
        for t in &extras.departed {
            if let Some(i) = identities.get_mut(t) {
                i.departed = true;
            }
        }
        for (t, identity) in &extras.adopted {
            identities.insert(t.clone(), identity.clone());
        }
        for (t, oid) in &extras.oids {
            let i = identities.entry(t.clone()).or_default();
            i.oid = *oid;
            i.departed = false;
        }
        for (t, point, identity) in &extras.copied {
            snapshots.insert(t.clone(), *point);
            identities.insert(t.clone(), identity.clone());
        }
        let mut tables = self.tables.clone();
        for f in &files {
            let t = tables.entry(f.table.clone()).or_default();
            t.rows += f.rows;
            t.last_commit_ts = t.last_commit_ts.max(commit_ts);
        }
        CommitRecord {
            format: FORMAT,
            seq: self.seq + 1,
            run_id: run_id.to_owned(),
            system_id: self.system_id.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            end_lsn,
            commit_ts,
            written_at: now_micros(),
            // Data is only ever committed on top of a starting state.
            initialized: self.initialized || !files.is_empty(),
            files,
            tables,
            snapshots,
            completes: extras.completes.clone(),
            identities,
            folded: self.folded,
            pruned: self.pruned,
            base: None,
            dropped: Vec::new(),
            compacted: extras.compacted.clone(),
        }
    }
}
