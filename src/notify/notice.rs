//! The notice of one commit: what it published, where, and up to when. Built from the
//! commit record alone, so the notice sent right after the commit and the one read back
//! from the log after a restart are the same bytes.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::checkpoint::CommitRecord;

/// The format of the notice body (`format` field).
pub const FORMAT: u32 = 1;
/// Largest body: SNS takes 256 KiB with attributes; a commit that would exceed this
/// lists fewer partitions (`truncated`), never fewer tables' counts.
pub const MAX_BODY: usize = 200 * 1024;
/// Partitions listed per table in a body that had to be cut.
const CUT_PARTITIONS: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Notice {
    pub format: u32,
    /// The commit record's number: increases by one per commit; dedupe by it.
    pub seq: u64,
    pub system_id: String,
    pub slot: String,
    pub publication: String,
    /// `sink.url` with a trailing slash.
    pub lake: String,
    /// When the commit record was written (the data became readable).
    pub committed_at: String,
    /// Source commit time of the newest transaction in the commit (absent for a commit
    /// of table copies only).
    pub source_commit_time: Option<String>,
    /// The stream resumes after this position.
    pub end_lsn: String,
    /// `_lsn` of the first and last rows the commit's files hold.
    pub first_lsn: String,
    pub last_lsn: String,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub tables: Vec<TableNotice>,
    /// Some partition lists were cut to keep the body under 200 KiB.
    pub truncated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TableNotice {
    /// `schema.table` in PostgreSQL.
    pub table: String,
    /// The table's folder (the Glue table's location).
    pub location: String,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    /// Partition paths below `location` with new files (`dt=2026-12-01`), sorted; "" for
    /// an unpartitioned table.
    pub partitions: Vec<String>,
    /// How many partitions had new files (more than listed when the body was cut).
    pub partition_count: u64,
}

fn rfc3339(micros: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

impl Notice {
    /// The notice of `record`, its tables under `root` (`sink.url` with a trailing slash).
    pub fn of(record: &CommitRecord, root: &str) -> Notice {
        let mut tables: BTreeMap<&str, TableNotice> = BTreeMap::new();
        let mut partitions: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
        for f in &record.files {
            let t = tables.entry(&f.table).or_insert_with(|| {
                let (schema, name) = f.table.split_once('.').unwrap_or(("public", &f.table));
                TableNotice {
                    table: f.table.clone(),
                    location: format!("{root}{schema}/{name}/"),
                    files: 0,
                    rows: 0,
                    bytes: 0,
                    partitions: Vec::new(),
                    partition_count: 0,
                }
            });
            t.files += 1;
            t.rows += f.rows;
            t.bytes += f.bytes;
            partitions.entry(&f.table).or_default().insert(&f.partition);
        }
        for (table, parts) in partitions {
            let t = tables.get_mut(table).expect("counted above");
            t.partition_count = parts.len() as u64;
            t.partitions = parts.into_iter().map(str::to_owned).collect();
        }
        let first = record.files.iter().map(|f| f.first.lsn).min().unwrap_or(record.end_lsn);
        let last = record.files.iter().map(|f| f.last.lsn).max().unwrap_or(record.end_lsn);
        Notice {
            format: FORMAT,
            seq: record.seq,
            system_id: record.system_id.clone(),
            slot: record.slot.clone(),
            publication: record.publication.clone(),
            lake: root.to_owned(),
            committed_at: rfc3339(record.written_at),
            source_commit_time: record.commit_ts.map(rfc3339),
            end_lsn: record.end_lsn.to_string(),
            first_lsn: first.to_string(),
            last_lsn: last.to_string(),
            files: record.files.len() as u64,
            rows: record.files.iter().map(|f| f.rows).sum(),
            bytes: record.files.iter().map(|f| f.bytes).sum(),
            tables: tables.into_values().collect(),
            truncated: false,
        }
    }

    /// The JSON body, under [`MAX_BODY`]: partition lists are cut first, then tables
    /// beyond what fits are left out of the list (the totals still count them).
    pub fn body(&self) -> Vec<u8> {
        let full = serde_json::to_vec(self).expect("a notice serializes");
        if full.len() <= MAX_BODY {
            return full;
        }
        let mut cut = self.clone();
        cut.truncated = true;
        for t in &mut cut.tables {
            t.partitions.truncate(CUT_PARTITIONS);
        }
        loop {
            let body = serde_json::to_vec(&cut).expect("a notice serializes");
            if body.len() <= MAX_BODY || cut.tables.is_empty() {
                return body;
            }
            let keep = cut.tables.len() * MAX_BODY / body.len();
            cut.tables.truncate(keep.min(cut.tables.len() - 1));
        }
    }

    /// The tables, for the SNS message attribute that subscriptions filter on.
    pub fn table_names(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.table.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RowPos;
    use crate::checkpoint::record::Identity;
    use crate::lsn::Lsn;
    use crate::sink::WrittenObject;

    fn file(table: &str, partition: &str, rows: u64, first: u64, last: u64) -> WrittenObject {
        WrittenObject {
            key: format!("{}/{partition}/x.parquet", table.replace('.', "/")),
            table: table.into(),
            partition: partition.into(),
            rows,
            bytes: rows * 10,
            first: RowPos {
                lsn: Lsn(first),
                seq: 0,
            },
            last: RowPos { lsn: Lsn(last), seq: 1 },
            ops: Default::default(),
        }
    }

    fn record(files: Vec<WrittenObject>) -> CommitRecord {
        let id = Identity {
            system_id: "7".into(),
            slot: "walshore".into(),
            publication: "walshore".into(),
        };
        let mut r = CommitRecord::genesis(&id).next("run", Lsn(0x300), Some(1_764_550_923_456_789), files);
        r.written_at = 1_764_550_924_000_000;
        r
    }

    #[test]
    fn a_notice_counts_files_rows_and_partitions_per_table() {
        let r = record(vec![
            file("public.trades", "dt=2025-12-01", 5, 0x100, 0x180),
            file("public.trades", "dt=2025-11-30", 2, 0x190, 0x1a0),
            file("public.trades", "dt=2025-12-01", 1, 0x1b0, 0x1b0),
            file("fx.rates", "", 3, 0x120, 0x2f0),
        ]);
        let n = Notice::of(&r, "s3://lake/prefix/");
        assert_eq!((n.seq, n.files, n.rows, n.bytes), (1, 4, 11, 110));
        assert_eq!(
            (n.first_lsn.as_str(), n.last_lsn.as_str(), n.end_lsn.as_str()),
            ("0/100", "0/2F0", "0/300")
        );
        assert_eq!(n.committed_at, "2025-12-01T01:02:04.000000Z");
        assert_eq!(n.source_commit_time.as_deref(), Some("2025-12-01T01:02:03.456789Z"));
        assert_eq!(n.table_names(), ["fx.rates", "public.trades"]);
        let trades = &n.tables[1];
        assert_eq!(trades.location, "s3://lake/prefix/public/trades/");
        assert_eq!((trades.files, trades.rows, trades.partition_count), (3, 8, 2));
        assert_eq!(trades.partitions, ["dt=2025-11-30", "dt=2025-12-01"]);
        assert_eq!(n.tables[0].partitions, [""]);
        assert!(!n.truncated);
        let v: serde_json::Value = serde_json::from_slice(&n.body()).unwrap();
        assert_eq!(v["tables"][1]["partitions"][0], "dt=2025-11-30");
    }

    #[test]
    fn a_huge_commit_lists_fewer_partitions_but_counts_them_all() {
        let files = (0..20_000)
            .map(|i| {
                file(
                    "public.ticks",
                    &format!("dt=2025-01-01/hour={i:05}"),
                    1,
                    0x100 + i,
                    0x100 + i,
                )
            })
            .collect();
        let n = Notice::of(&record(files), "s3://lake/");
        assert_eq!(n.tables[0].partition_count, 20_000);
        let body = n.body();
        assert!(body.len() <= MAX_BODY, "{} bytes", body.len());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["tables"][0]["partition_count"], 20_000);
        assert_eq!(v["tables"][0]["partitions"].as_array().unwrap().len(), CUT_PARTITIONS);
        assert_eq!(v["rows"], 20_000);
    }

    #[test]
    fn thousands_of_tables_keep_the_totals() {
        let files = (0..10_000)
            .map(|i| file(&format!("s.table_with_a_long_name_{i:05}"), "", 2, 0x100, 0x200))
            .collect();
        let n = Notice::of(&record(files), "s3://lake/");
        let body = n.body();
        assert!(body.len() <= MAX_BODY, "{} bytes", body.len());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["rows"], 20_000);
        assert!(v["tables"].as_array().unwrap().len() < 10_000);
        assert_eq!(v["truncated"], true);
    }
}
