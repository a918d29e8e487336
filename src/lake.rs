//! Reading a table back from a local lake: its current state, replayed from the change
//! rows in `(_lsn, _seq)` order (DESIGN.md "Output layout and columns").

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::AsArray;
use std::sync::Arc;

use arrow::datatypes::{DataType, Int64Type, TimeUnit, TimestampMicrosecondType};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A key's last change: its `(_lsn, _seq)`, `_op` and row.
type Latest = ((i64, i64), String, Vec<String>);

/// The live rows of the table whose files are under `dir` (a local folder), as text:
/// the `key` columns, then the `values` columns. A key's last change wins unless it is a
/// delete; a truncate removes every row changed before it. Values PostgreSQL did not
/// send (`_unchanged`) are not carried forward here: give columns that are never TOASTed.
pub fn current_state(dir: &Path, key: &[&str], values: &[&str]) -> anyhow::Result<Vec<Vec<String>>> {
    let mut files = Vec::new();
    parquet_files(dir, &mut files)?;
    let mut state: HashMap<Vec<String>, Latest> = HashMap::new();
    let mut truncates: Vec<(i64, i64)> = Vec::new();
    let options = FormatOptions::default().with_null("NULL");
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| anyhow::anyhow!("{} has no column {name}", file.display()))
            };
            let op = column("_op")?;
            let op = op.as_string::<i32>();
            let lsn = column("_lsn")?.as_primitive::<Int64Type>().clone();
            let seq = column("_seq")?.as_primitive::<Int64Type>().clone();
            let wanted: Vec<_> = key
                .iter()
                .chain(values)
                .map(|c| column(c).map(utc_offset))
                .collect::<Result<_, _>>()?;
            let formatters: Vec<_> = wanted
                .iter()
                .map(|a| ArrayFormatter::try_new(a.as_ref(), &options))
                .collect::<Result<_, _>>()?;
            for i in 0..batch.num_rows() {
                let position = (lsn.value(i), seq.value(i));
                if op.value(i) == "T" {
                    truncates.push(position);
                    continue;
                }
                let row: Vec<String> = formatters.iter().map(|f| f.value(i).to_string()).collect();
                let k = row[..key.len()].to_vec();
                if state.get(&k).is_none_or(|(p, _, _)| *p < position) {
                    state.insert(k, (position, op.value(i).to_owned(), row));
                }
            }
        }
    }
    let last_truncate = truncates.into_iter().max();
    let mut rows: Vec<Vec<String>> = state
        .into_values()
        .filter(|(p, op, _)| op != "D" && last_truncate.is_none_or(|t| *p > t))
        .map(|(_, _, row)| row)
        .collect();
    rows.sort();
    Ok(rows)
}

/// Timestamps labelled "UTC" relabelled "+00:00": the same instants, which arrow
/// formats without a time zone database.
fn utc_offset(a: &arrow::array::ArrayRef) -> arrow::array::ArrayRef {
    match a.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => Arc::new(
            a.as_primitive::<TimestampMicrosecondType>()
                .clone()
                .with_timezone("+00:00"),
        ),
        _ => a.clone(),
    }
}

/// The `.parquet` files under `dir`, skipping `_`-prefixed folders (walshore's own).
fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() && !name.starts_with('_') {
            parquet_files(&p, out)?;
        } else if name.ends_with(".parquet") {
            out.push(p);
        }
    }
    Ok(())
}
