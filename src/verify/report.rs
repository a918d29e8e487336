//! What `walshore verify` reports: per table the rows checked, missing, extra and
//! differing with the first few keys of each, a one-line summary, and the record of the
//! last verification kept in the lake (`_walshore/verify/last.json`, counts only: the
//! lake's readers may not see the values).

use std::fmt::Write as _;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// A table's (or the whole run's) outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The lake's replay equals the source at the point.
    Equal,
    /// They differ: rows missing, extra or differing.
    Differs,
    /// Not compared, for the reason given (a copy not committed yet, or after the point).
    Unverified,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Equal => "equal",
            Outcome::Differs => "DIFFERS",
            Outcome::Unverified => "unverified",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SampleValue {
    pub column: String,
    pub source: Option<String>,
    pub lake: Option<String>,
}

/// One of the first few keys found missing, extra or differing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// `missing` (in the source, not the lake), `extra` (in the lake only), `differing`.
    pub kind: String,
    /// `column=value, …` of the key; none for a table without one (its rows are shown
    /// only with `--show-values`).
    pub key: Option<String>,
    /// The differing columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// With `--show-values`: the values on each side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<SampleValue>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableReport {
    pub table: String,
    pub result: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Rows in the source at the point.
    pub source_rows: u64,
    /// Live rows of the lake's replay at the point.
    pub lake_rows: u64,
    pub missing: u64,
    pub extra: u64,
    pub differing: u64,
    /// Values carried across a key change, which the replay cannot place.
    pub unchecked_values: u64,
    /// Committed files and change rows of the table read from the lake.
    pub lake_files: u64,
    pub lake_changes: u64,
    /// Files the commit log names that are gone.
    pub files_missing: u64,
    /// Files whose row count is not the one their commit record gives.
    pub files_damaged: u64,
    /// Files in the table's folder that no commit names and no writer has announced:
    /// a query engine reads them, the replay does not.
    pub files_stray: u64,
    /// The first few of those files, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    /// With `[iceberg]` covering the table: its Iceberg table against the change log at
    /// the Iceberg table's watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iceberg: Option<IcebergReport>,
}

/// A table's Iceberg table, as its current snapshot holds it, against the change log
/// replayed up to the commit-log record that snapshot's watermark names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IcebergReport {
    pub result: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The watermark: the commit-log record and LSN the Iceberg table holds.
    pub seq: u64,
    pub lsn: String,
    /// Live rows of the Iceberg table, and of the change log replayed to `seq`.
    pub rows: u64,
    pub log_rows: u64,
    /// Change rows of the change log replayed.
    pub log_changes: u64,
    /// Keys live in the change log that the Iceberg table lacks, the other way round,
    /// and live in both with different values.
    pub missing: u64,
    pub extra: u64,
    pub differing: u64,
    /// `missing`, `extra` or `differing` as the Iceberg table has it (`source`: the
    /// change log's value, `lake`: the Iceberg table's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
}

impl IcebergReport {
    pub fn unverified(reason: &str) -> IcebergReport {
        IcebergReport {
            result: Outcome::Unverified,
            reason: Some(reason.into()),
            seq: 0,
            lsn: String::new(),
            rows: 0,
            log_rows: 0,
            log_changes: 0,
            missing: 0,
            extra: 0,
            differing: 0,
            samples: Vec::new(),
        }
    }
}

impl TableReport {
    pub fn new(table: &str) -> TableReport {
        TableReport {
            table: table.into(),
            result: Outcome::Equal,
            reason: None,
            source_rows: 0,
            lake_rows: 0,
            missing: 0,
            extra: 0,
            differing: 0,
            unchecked_values: 0,
            lake_files: 0,
            lake_changes: 0,
            files_missing: 0,
            files_damaged: 0,
            files_stray: 0,
            file_problems: Vec::new(),
            samples: Vec::new(),
            iceberg: None,
        }
    }

    pub fn unverified(table: &str, reason: String) -> TableReport {
        TableReport {
            result: Outcome::Unverified,
            reason: Some(reason),
            ..TableReport::new(table)
        }
    }

    /// Sets `result` from the counts: an Iceberg table that differs makes the table
    /// differ (one not verified yet, for the reason it gives, does not).
    pub fn settle(&mut self) {
        if self.result != Outcome::Unverified {
            let files = self.files_missing + self.files_damaged + self.files_stray;
            let iceberg = self.iceberg.as_ref().is_some_and(|i| i.result == Outcome::Differs);
            self.result = if self.missing + self.extra + self.differing + files == 0
                && self.source_rows == self.lake_rows
                && !iceberg
            {
                Outcome::Equal
            } else {
                Outcome::Differs
            };
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub format: u32,
    pub result: Outcome,
    /// The consistent point: the source was read in a snapshot taken there, the lake
    /// replayed up to it.
    pub point: String,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    /// `finished_at` in Unix seconds (for the metrics).
    #[serde(default)]
    pub finished_at_seconds: f64,
    pub seconds: f64,
    pub tables: Vec<TableReport>,
    pub summary: String,
}

impl Report {
    pub fn new(point: String, started_at: i64, seconds: f64, tables: Vec<TableReport>) -> Report {
        let count = |o: Outcome| tables.iter().filter(|t| t.result == o).count();
        let (equal, differs, unverified) = (
            count(Outcome::Equal),
            count(Outcome::Differs),
            count(Outcome::Unverified),
        );
        let result = if differs > 0 {
            Outcome::Differs
        } else if unverified > 0 {
            Outcome::Unverified
        } else {
            Outcome::Equal
        };
        let rows: u64 = tables.iter().map(|t| t.source_rows).sum();
        let mut summary = format!(
            "verify at {point}: {} table(s), {rows} source rows: {equal} equal",
            tables.len()
        );
        if differs > 0 {
            let _ = write!(summary, ", {differs} differ");
        }
        if unverified > 0 {
            let _ = write!(summary, ", {unverified} unverified");
        }
        let micros = crate::checkpoint::record::now_micros();
        Report {
            format: 1,
            result,
            point,
            started_at: crate::status::micros_to_rfc3339(started_at),
            finished_at: crate::status::micros_to_rfc3339(micros),
            finished_at_seconds: micros as f64 / 1e6,
            seconds,
            tables,
            summary,
        }
    }

    /// Exit status: 0 equal, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        if self.result == Outcome::Equal { 0 } else { 1 }
    }

    /// The human report: a line per table, the samples under it, the summary last.
    pub fn text(&self) -> String {
        let width = self.tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
        let mut out = String::new();
        for t in &self.tables {
            let _ = write!(out, "{:<width$}  {:<10}", t.table, t.result.label());
            match t.result {
                Outcome::Unverified => {
                    let _ = write!(out, " {}", t.reason.as_deref().unwrap_or(""));
                }
                _ => {
                    let _ = write!(
                        out,
                        " {} rows in the source, {} in the lake ({} changes in {} files)",
                        t.source_rows, t.lake_rows, t.lake_changes, t.lake_files
                    );
                    if t.result == Outcome::Differs {
                        let _ = write!(
                            out,
                            ": {} missing, {} extra, {} differing",
                            t.missing, t.extra, t.differing
                        );
                    }
                    let files = t.files_missing + t.files_damaged + t.files_stray;
                    if files > 0 {
                        let _ = write!(
                            out,
                            "; files: {} missing, {} damaged, {} not in the commit log",
                            t.files_missing, t.files_damaged, t.files_stray
                        );
                    }
                    if t.unchecked_values > 0 {
                        let _ = write!(
                            out,
                            "; {} value(s) carried across a key change not checked",
                            t.unchecked_values
                        );
                    }
                }
            }
            out.push('\n');
            for p in &t.file_problems {
                let _ = writeln!(out, "    file      {p}");
            }
            samples(&mut out, "", &t.samples, ("source", "lake"));
            if let Some(i) = &t.iceberg {
                let _ = write!(out, "    Iceberg table  {}", i.result.label());
                match i.result {
                    Outcome::Unverified => {
                        let _ = write!(out, " {}", i.reason.as_deref().unwrap_or(""));
                    }
                    _ if i.reason.is_some() => {
                        let _ = write!(out, " {}", i.reason.as_deref().unwrap_or(""));
                    }
                    _ => {
                        let _ = write!(
                            out,
                            " at commit record {} ({}): {} rows, the change log replayed to it {} ({} changes)",
                            i.seq, i.lsn, i.rows, i.log_rows, i.log_changes
                        );
                        if i.result == Outcome::Differs {
                            let _ = write!(
                                out,
                                ": {} missing, {} extra, {} differing",
                                i.missing, i.extra, i.differing
                            );
                        }
                    }
                }
                out.push('\n');
                samples(&mut out, "iceberg ", &i.samples, ("change log", "iceberg"));
            }
        }
        out.push_str(&self.summary);
        out.push('\n');
        out
    }

    /// What the lake keeps of this run: the counts, never keys or values.
    pub fn record(&self) -> Report {
        let mut r = self.clone();
        for t in &mut r.tables {
            t.samples.clear();
            t.file_problems.clear();
            if let Some(i) = &mut t.iceberg {
                i.samples.clear();
            }
        }
        r
    }
}

/// Sample lines: the kind (after `prefix`), the key, the differing columns, and with
/// `--show-values` each side's value under `sides`' names.
fn samples(out: &mut String, prefix: &str, samples: &[Sample], sides: (&str, &str)) {
    for s in samples {
        let kind = format!("{prefix}{}", s.kind);
        let _ = write!(
            out,
            "    {kind:<9} {}",
            s.key.as_deref().unwrap_or("(a row without a key)")
        );
        if !s.columns.is_empty() {
            let _ = write!(out, "  columns: {}", s.columns.join(", "));
        }
        out.push('\n');
        for v in &s.values {
            let side = |x: &Option<String>| x.clone().unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "        {}: {} {}  {} {}",
                v.column,
                sides.0,
                side(&v.source),
                sides.1,
                side(&v.lake)
            );
        }
    }
}

/// Where the last verification's record is kept.
pub fn last_key() -> Path {
    Path::from("_walshore/verify/last.json")
}

pub async fn write_last(store: &dyn ObjectStore, report: &Report) -> Result<(), object_store::Error> {
    let body = serde_json::to_vec_pretty(&report.record()).expect("a report serializes");
    store.put(&last_key(), PutPayload::from(body)).await.map(|_| ())
}

/// The last verification's record, if one ran (an unreadable one is an error).
pub async fn read_last(store: &dyn ObjectStore) -> Result<Option<Report>, String> {
    match store.get(&last_key()).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", last_key()))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
