//! `verify` of the Iceberg tables (`[iceberg]`): each covered table's Iceberg table, as
//! its current snapshot holds it, against the change log replayed up to the commit-log
//! record that snapshot's watermark names (`walshore.seq`). The change log is compared
//! with the source in the same run, so an Iceberg table found equal here holds the
//! source as it was at its watermark.
//!
//! The Iceberg table is loaded before the commit log is read: its watermark is then at
//! or before every record verify reads, and the files of the records after it are left
//! out of the replay. A replaced file stays readable for `snapshot_retention`, so a
//! compaction meanwhile does not take the loaded snapshot's files away.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use object_store::ObjectStore;

use super::compare::{self, LakeSide, SourceSide};
use super::manifest::TableFiles;
use super::report::{IcebergReport, Outcome, Sample, TableReport};
use super::{VerifyError, rows};
use crate::checkpoint::CommitRecord;
use crate::config::Config;
use crate::iceberg::projector::{location_of, read_live_rows};
use crate::iceberg::table::Table;

/// A covered table's Iceberg table as verify found it.
pub(super) enum Loaded {
    Table(Box<Table>),
    /// Not built yet (or a table the projector skips: one without a primary key).
    Absent,
    /// Its metadata cannot be read.
    Broken(String),
}

/// The Iceberg table of `name`, or None when `[iceberg]` does not cover it.
pub(super) async fn load(cfg: &Config, store: Arc<dyn ObjectStore>, name: &str) -> Option<Loaded> {
    let iceberg = cfg.iceberg.as_ref()?;
    if !iceberg.covers(name) {
        return None;
    }
    let location = location_of(store, cfg.sink.url.as_str(), name);
    Some(match Table::load(location).await {
        Ok(Some(t)) => Loaded::Table(Box::new(t)),
        Ok(None) => Loaded::Absent,
        Err(e) => Loaded::Broken(e.to_string()),
    })
}

/// What compares one table's Iceberg table: where to spill, and the table's change log.
pub(super) struct Job<'a> {
    pub store: Arc<dyn ObjectStore>,
    pub head: &'a CommitRecord,
    pub dir: &'a Path,
    /// A spill name no other side of this run uses.
    pub spill: usize,
    pub buckets: usize,
    pub table: &'a str,
    pub cols: &'a rows::Columns,
    pub files: &'a TableFiles,
    pub samples: usize,
    pub show_values: bool,
}

/// Compares the loaded Iceberg table with the change log at its watermark.
pub(super) async fn compare(job: Job<'_>, loaded: Loaded) -> Result<IcebergReport, VerifyError> {
    let table = match loaded {
        Loaded::Table(t) => t,
        Loaded::Absent => {
            return Ok(IcebergReport::unverified(
                "no Iceberg table yet: the projector has not built it (a table whose key has a float or array column is not projected)",
            ));
        }
        Loaded::Broken(what) => {
            let mut r = IcebergReport::unverified(&format!("its metadata cannot be read: {what}"));
            r.result = Outcome::Differs;
            return Ok(r);
        }
    };
    let Some((seq, lsn)) = table.watermark() else {
        return Ok(IcebergReport::unverified(
            "its first build is under way (no snapshot holds a watermark yet)",
        ));
    };
    if seq > job.head.seq || seq <= job.head.pruned {
        return Ok(IcebergReport::unverified(&format!(
            "its watermark (commit record {seq}) is outside the records the commit log holds ({}..={}): the projector rebuilds it",
            job.head.pruned + 1,
            job.head.seq
        )));
    }
    // The table's files committed after the watermark are left out of the replay. A
    // compaction after it is left in: its files hold the rows up to its `through`, the
    // same as the files it replaced, unless some of those came after the watermark
    // (the first record after it with a file in each partition tells).
    let mut later = HashSet::new();
    let mut touched: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for s in seq + 1..=job.head.seq {
        let record = crate::checkpoint::log::read_commit(job.store.as_ref(), s).await?;
        let Some(record) = record else {
            return Ok(IcebergReport::unverified(&format!(
                "commit record {s} after its watermark is gone (pruned meanwhile): verify again"
            )));
        };
        for c in record.compacted.iter().filter(|c| c.table == job.table) {
            if touched.get(&c.partition).is_some_and(|first| *first <= c.through) {
                return Ok(IcebergReport::unverified(&format!(
                    "a compaction after its watermark (commit record {s}) holds rows after it: verify again once the projector has passed it"
                )));
            }
        }
        for f in record.files.into_iter().filter(|f| f.table == job.table) {
            touched.entry(f.partition.clone()).or_insert(s);
            later.insert(f.key);
        }
    }
    let spill_err = |source| VerifyError::Spill {
        dir: job.dir.display().to_string(),
        source,
    };
    let mut iceberg = SourceSide::new(job.dir, job.spill, job.buckets).map_err(spill_err)?;
    let rows = read_live_rows(&table, |batch| iceberg.add(job.cols, &batch))
        .await
        .map_err(|what| VerifyError::Lake {
            key: table.location_uri().to_owned(),
            what,
        })?;
    let (paths, digests, _) = iceberg.finish().map_err(spill_err)?;
    let everything = (i64::MAX, i64::MAX);
    let mut log = LakeSide::new(job.dir, job.spill, job.buckets, everything).map_err(spill_err)?;
    // Damaged or missing change-log files are the lake's own comparison's to report.
    let mut scratch = TableReport::new(job.table);
    super::read_lake(
        job.store.clone(),
        job.table,
        job.cols,
        job.files,
        everything,
        &later,
        &mut log,
        &mut scratch,
    )
    .await?;
    let changes = log.changes;
    let (log_paths, truncates) = log.finish().map_err(spill_err)?;
    // The Iceberg table plays the source's part: what the source has is what it has.
    compare::compare(
        job.cols,
        (&paths, &digests),
        (&log_paths, &truncates),
        job.samples,
        job.show_values,
        &mut scratch,
    )
    .map_err(spill_err)?;
    for p in paths.iter().chain(&log_paths) {
        let _ = std::fs::remove_file(p);
    }
    let differs = scratch.missing + scratch.extra + scratch.differing > 0 || rows != scratch.lake_rows;
    Ok(IcebergReport {
        result: if differs { Outcome::Differs } else { Outcome::Equal },
        reason: None,
        seq,
        lsn: crate::lsn::Lsn(lsn).to_string(),
        rows,
        log_rows: scratch.lake_rows,
        log_changes: changes,
        // In the change log only: the Iceberg table lacks it, and the other way round.
        missing: scratch.extra,
        extra: scratch.missing,
        differing: scratch.differing,
        samples: scratch.samples.into_iter().map(from_iceberg_side).collect(),
    })
}

/// A sample of the comparison in which the Iceberg table stood for the source, told
/// from the Iceberg table's side: `source` is the change log's value, `lake` the
/// Iceberg table's.
fn from_iceberg_side(mut s: Sample) -> Sample {
    s.kind = match s.kind.as_str() {
        "missing" => "extra".into(),
        "extra" => "missing".into(),
        other => other.into(),
    };
    for v in &mut s.values {
        std::mem::swap(&mut v.source, &mut v.lake);
    }
    s
}
