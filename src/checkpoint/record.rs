//! The JSON records of the commit log. Field names are a stable format: `status` and
//! operators read them.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::sink::WrittenObject;

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
}

/// Files announced for commit `seq` before upload.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PendingRecord {
    pub seq: u64,
    pub run_id: String,
    pub keys: Vec<String>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl CommitRecord {
    /// The state of an empty lake (never written).
    pub fn genesis(id: &Identity) -> CommitRecord {
        CommitRecord {
            format: 1,
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
        }
    }

    /// The record that follows this one.
    pub fn next(&self, run_id: &str, end_lsn: Lsn, commit_ts: Option<i64>, files: Vec<WrittenObject>) -> CommitRecord {
        self.next_with(run_id, end_lsn, commit_ts, files, &[])
    }

    /// [`CommitRecord::next`] that also records finished table copies.
    pub fn next_with(
        &self,
        run_id: &str,
        end_lsn: Lsn,
        commit_ts: Option<i64>,
        files: Vec<WrittenObject>,
        copied: &[(String, Lsn)],
    ) -> CommitRecord {
        let mut snapshots = self.snapshots.clone();
        snapshots.extend(copied.iter().cloned());
        let mut tables = self.tables.clone();
        for f in &files {
            let t = tables.entry(f.table.clone()).or_default();
            t.rows += f.rows;
            t.last_commit_ts = t.last_commit_ts.max(commit_ts);
        }
        CommitRecord {
            format: 1,
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
        }
    }
}
