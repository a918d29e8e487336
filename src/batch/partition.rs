//! Partitions: the path segments below a table's folder (commit date, commit hour, or
//! a column's Hive-escaped value), and which columns a copy reads as text because they
//! name one.

use super::{civil_from_days, copies_binary, qualified};
use crate::config::{PartitionBy, Partitions};
use crate::decode::Relation;

/// A layout's partitioning, resolved against its columns.
pub(super) enum PartSource {
    CommitDate,
    CommitHour,
    /// Index and name of the column.
    Column(usize, String),
}

/// Hive's name for the partition of null (and empty) values.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// `{column}={value}` with the value escaped as Hive escapes path names (so no value
/// can add a path segment or change the key's meaning); null or empty: Hive's default.
pub fn column_partition(column: &str, value: Option<&[u8]>) -> String {
    let mut out = String::with_capacity(column.len() + 16);
    out.push_str(column);
    out.push('=');
    match value {
        None | Some([]) => out.push_str(NULL_PARTITION),
        Some(raw) => {
            for ch in String::from_utf8_lossy(raw).chars() {
                let escape = ch.is_control()
                    || matches!(
                        ch,
                        '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '{' | '[' | ']' | '^'
                    );
                if escape {
                    let mut buf = [0u8; 4];
                    for b in ch.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("%{b:02X}"));
                    }
                } else {
                    out.push(ch);
                }
            }
        }
    }
    out
}

/// Which columns a table copy reads in COPY's binary format: those [`copies_binary`]
/// allows, except a partition column (its text names the partition).
pub fn copy_formats(relation: &Relation, partitions: &Partitions) -> Vec<bool> {
    let part = match partitions.of(&qualified(relation)) {
        PartitionBy::Column(c) => Some(c.as_str()),
        _ => None,
    };
    relation
        .columns
        .iter()
        .map(|c| copies_binary(c.type_oid, c.type_modifier) && Some(c.name.as_str()) != part)
        .collect()
}

/// `dt=YYYY-MM-DD/hour=HH` of a commit time in UTC (µs since the Unix epoch).
pub fn hour_partition(commit_ts: i64) -> String {
    let hour = commit_ts.rem_euclid(86_400_000_000) / 3_600_000_000;
    format!("{}/hour={hour:02}", date_partition(commit_ts))
}

/// `dt=YYYY-MM-DD` of a commit time in UTC (µs since the Unix epoch).
pub fn date_partition(commit_ts: i64) -> String {
    let (y, m, d) = civil_from_days(commit_ts.div_euclid(86_400_000_000));
    format!("dt={y:04}-{m:02}-{d:02}")
}
