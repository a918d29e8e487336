//! One table's comparison: the source's rows and the lake's replayed state, both
//! spilled to buckets by a hash of the key, so that memory holds one bucket at a time;
//! a bucket whose digests agree costs nothing more.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use arrow::record_batch::RecordBatch;

use super::report::{Sample, SampleValue, TableReport};
use super::rows::{Cell, Columns, Digest, Records, Spill, bucket_of, cells, push_cell, row_hash};

/// The lake's record header: `_lsn`, `_seq`, `_op`.
const LAKE_HEADER: usize = 17;

/// A row's `(_lsn, _seq)`.
pub type Pos = (i64, i64);

/// A lake row read back from its bucket.
struct LakeChange<'a> {
    pos: Pos,
    op: u8,
    key: &'a [u8],
    row: &'a [u8],
}

/// Encodes the rows of batches into `(key, row)`: a keyed table's key is its key
/// columns' cells, a multiset's is empty (the row is the key).
fn each_row(
    cols: &Columns,
    batch: &RecordBatch,
    mut each: impl FnMut(usize, &[u8], &[u8]) -> std::io::Result<()>,
    unchanged: impl Fn(usize, usize) -> bool,
) -> Result<(), String> {
    let arrays = cols.arrays(batch)?;
    let encoded = cols.encode(&arrays)?;
    let mut row = Vec::new();
    let mut key = Vec::new();
    for i in 0..batch.num_rows() {
        row.clear();
        key.clear();
        for (c, rows) in encoded.iter().enumerate() {
            let cell = if unchanged(i, c) {
                Cell::Unchanged
            } else {
                Cell::Value(rows.row(i).data())
            };
            push_cell(&mut row, cell);
        }
        if !cols.multiset {
            for &c in &cols.key {
                push_cell(&mut key, Cell::Value(encoded[c].row(i).data()));
            }
        }
        each(i, &key, &row).map_err(|e| format!("writing the spill: {e}"))?;
    }
    Ok(())
}

fn bucket_key<'a>(key: &'a [u8], row: &'a [u8]) -> &'a [u8] {
    if key.is_empty() { row } else { key }
}

/// The source side of a table: its rows spilled by bucket, with each bucket's digest.
pub struct SourceSide {
    spill: Spill,
    digests: Vec<Digest>,
    pub rows: u64,
}

impl SourceSide {
    pub fn new(dir: &Path, table: usize, buckets: usize) -> std::io::Result<SourceSide> {
        Ok(SourceSide {
            spill: Spill::create(dir, &format!("source-{table}"), buckets)?,
            digests: vec![Digest::default(); buckets],
            rows: 0,
        })
    }

    pub fn add(&mut self, cols: &Columns, batch: &RecordBatch) -> Result<(), String> {
        let n = self.digests.len();
        let (spill, digests) = (&mut self.spill, &mut self.digests);
        each_row(
            cols,
            batch,
            |_, key, row| {
                let b = bucket_of(bucket_key(key, row), n);
                digests[b].add(row_hash(row), 1);
                spill.write(b, &[], &[key, row])
            },
            |_, _| false,
        )?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<(Vec<PathBuf>, Vec<Digest>, u64)> {
        Ok((self.spill.finish()?, self.digests, self.rows))
    }
}

/// The lake side of a table: its changes before the point, spilled by bucket, and its
/// truncates (which empty every bucket).
pub struct LakeSide {
    spill: Spill,
    truncates: Vec<Pos>,
    cutoff: Pos,
    pub changes: u64,
}

impl LakeSide {
    /// Changes at positions before `cutoff` are replayed; later ones are not.
    pub fn new(dir: &Path, table: usize, buckets: usize, cutoff: Pos) -> std::io::Result<LakeSide> {
        Ok(LakeSide {
            spill: Spill::create(dir, &format!("lake-{table}"), buckets)?,
            truncates: Vec::new(),
            cutoff,
            changes: 0,
        })
    }

    pub fn add(&mut self, cols: &Columns, batch: &RecordBatch) -> Result<(), String> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| format!("a lake file has no {name} column"))
        };
        let op = column("_op")?.as_string_opt::<i32>().ok_or("_op is not Utf8")?.clone();
        let lsn = column("_lsn")?
            .as_primitive_opt::<Int64Type>()
            .ok_or("_lsn is not Int64")?
            .clone();
        let seq = column("_seq")?
            .as_primitive_opt::<Int64Type>()
            .ok_or("_seq is not Int64")?
            .clone();
        let unchanged = batch
            .column_by_name("_unchanged")
            .and_then(|a| a.as_list_opt::<i32>())
            .cloned();
        // Per row, the compared columns PostgreSQL did not send.
        let listed = |i: usize| -> Vec<usize> {
            match &unchanged {
                Some(l) if l.is_valid(i) => {
                    let names = l.value(i);
                    let names = names.as_string::<i32>();
                    (0..names.len())
                        .filter_map(|j| cols.names.iter().position(|n| n == names.value(j)))
                        .collect()
                }
                _ => Vec::new(),
            }
        };
        let per_row: Vec<Vec<usize>> = (0..batch.num_rows()).map(listed).collect();
        let n = self.spill_buckets();
        let (spill, truncates, cutoff, changes) =
            (&mut self.spill, &mut self.truncates, self.cutoff, &mut self.changes);
        each_row(
            cols,
            batch,
            |i, key, row| {
                let pos = (lsn.value(i), seq.value(i));
                if pos >= cutoff {
                    return Ok(());
                }
                *changes += 1;
                let op = op.value(i).as_bytes().first().copied().unwrap_or(b'?');
                if op == b'T' {
                    truncates.push(pos);
                    return Ok(());
                }
                let mut header = [0u8; LAKE_HEADER];
                header[..8].copy_from_slice(&pos.0.to_le_bytes());
                header[8..16].copy_from_slice(&pos.1.to_le_bytes());
                header[16] = op;
                spill.write(bucket_of(bucket_key(key, row), n), &header, &[key, row])
            },
            |i, c| per_row[i].contains(&c),
        )
    }

    fn spill_buckets(&self) -> usize {
        self.spill.buckets()
    }

    pub fn finish(mut self) -> std::io::Result<(Vec<PathBuf>, Vec<Pos>)> {
        self.truncates.sort_unstable();
        Ok((self.spill.finish()?, self.truncates))
    }
}

/// A bucket's live rows after replay, borrowed from its records where they are whole.
enum State<'a> {
    /// key -> row
    Keyed(Map<&'a [u8], Cow<'a, [u8]>>),
    /// row -> how many times
    Multiset(Map<&'a [u8], u64>),
}

type Map<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// Replays a lake bucket in `(_lsn, _seq)` order: `T` empties, `R`/`I`/`U` upsert by
/// key, `D` deletes; a value PostgreSQL did not send is carried forward from the key's
/// previous row.
fn replay<'a>(cols: &Columns, records: &'a Records, truncates: &[Pos]) -> State<'a> {
    let mut changes: Vec<LakeChange<'a>> = records
        .iter()
        .map(|(h, key, row)| LakeChange {
            pos: (
                i64::from_le_bytes(h[..8].try_into().expect("8 bytes")),
                i64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
            ),
            op: h[16],
            key,
            row,
        })
        .collect();
    changes.sort_unstable_by_key(|r| r.pos);
    let mut t = truncates.iter().peekable();
    // Whether a truncate lies between the previous change and this one.
    let mut truncated_before = |pos: Pos| {
        let mut any = false;
        while t.next_if(|&&tp| tp < pos).is_some() {
            any = true;
        }
        any
    };
    if cols.multiset {
        let mut state: Map<&[u8], u64> = Map::default();
        for LakeChange { pos, op, row, .. } in changes {
            if truncated_before(pos) {
                state.clear();
            }
            if op == b'D' {
                if let Some(n) = state.get_mut(row) {
                    *n -= 1;
                    if *n == 0 {
                        state.remove(row);
                    }
                }
            } else if op != b'U' {
                *state.entry(row).or_default() += 1;
            }
            // A `U` of a table keyed by all its columns kept the key (`SET a = a`): the
            // row is as it was. (Under REPLICA IDENTITY FULL every update is `D` + `I`.)
        }
        if truncated_before((i64::MAX, i64::MAX)) {
            state.clear();
        }
        return State::Multiset(state);
    }
    let mut state: Map<&[u8], Cow<'a, [u8]>> = Map::default();
    for LakeChange { pos, op, key, row } in changes {
        if truncated_before(pos) {
            state.clear();
        }
        if op == b'D' {
            state.remove(key);
            continue;
        }
        let row = if cells(row).any(|c| c == Cell::Unchanged) {
            let previous = state.get(key);
            let mut merged = Vec::with_capacity(row.len());
            let mut before = previous.map(|p| cells(p));
            for cell in cells(row) {
                let old = before.as_mut().and_then(|b| b.next());
                let cell = match (cell, old) {
                    (Cell::Unchanged, Some(old)) => old,
                    // An insert with a value not sent is the new key of a key change:
                    // its value is in the old key's history.
                    (Cell::Unchanged, None) if op == b'I' => Cell::Unchecked,
                    (Cell::Unchanged, None) => Cell::Unknown,
                    (cell, _) => cell,
                };
                push_cell(&mut merged, cell);
            }
            Cow::Owned(merged)
        } else {
            Cow::Borrowed(row)
        };
        state.insert(key, row);
    }
    if truncated_before((i64::MAX, i64::MAX)) {
        state.clear();
    }
    State::Keyed(state)
}

fn digest(state: &State<'_>) -> Digest {
    let mut d = Digest::default();
    match state {
        State::Keyed(m) => m.values().for_each(|r| d.add(row_hash(r), 1)),
        State::Multiset(m) => m.iter().for_each(|(r, n)| d.add(row_hash(r), *n)),
    }
    d
}

/// Compares the source and the lake bucket by bucket into `report`.
pub fn compare(
    cols: &Columns,
    source: (&[PathBuf], &[Digest]),
    lake: (&[PathBuf], &[Pos]),
    samples: usize,
    show_values: bool,
    report: &mut TableReport,
) -> std::io::Result<()> {
    for (b, (source_path, source_digest)) in source.0.iter().zip(source.1).enumerate() {
        let records = Records::read(&lake.0[b], LAKE_HEADER)?;
        let state = replay(cols, &records, lake.1);
        let lake_digest = digest(&state);
        report.lake_rows += lake_digest.rows;
        if lake_digest == *source_digest {
            continue;
        }
        let source_records = Records::read(source_path, 0)?;
        let mut keyed: Map<&[u8], &[u8]> = Map::default();
        let mut counted: Map<&[u8], u64> = Map::default();
        for (_, key, row) in source_records.iter() {
            if cols.multiset {
                *counted.entry(row).or_default() += 1;
            } else {
                keyed.insert(key, row);
            }
        }
        let sample = |report: &mut TableReport, s: Sample| {
            if report.samples.iter().filter(|x| x.kind == s.kind).count() < samples {
                report.samples.push(s);
            }
        };
        match state {
            State::Keyed(mut lake) => {
                for (key, source_row) in keyed {
                    let Some(lake_row) = lake.remove(&key) else {
                        report.missing += 1;
                        sample(
                            report,
                            keyed_sample(cols, "missing", key, Some(source_row), None, show_values),
                        );
                        continue;
                    };
                    let mut differing = Vec::new();
                    for (c, (s, l)) in cells(source_row).zip(cells(&lake_row)).enumerate() {
                        match l {
                            Cell::Unchecked => report.unchecked_values += 1,
                            l if l != s => differing.push(c),
                            _ => {}
                        }
                    }
                    if !differing.is_empty() {
                        report.differing += 1;
                        let mut s =
                            keyed_sample(cols, "differing", key, Some(source_row), Some(&lake_row), show_values);
                        s.columns = differing.iter().map(|&c| cols.names[c].clone()).collect();
                        if show_values {
                            s.values.retain(|v| s.columns.contains(&v.column));
                        }
                        sample(report, s);
                    }
                }
                for (key, lake_row) in lake {
                    report.extra += 1;
                    sample(
                        report,
                        keyed_sample(cols, "extra", key, None, Some(&lake_row), show_values),
                    );
                }
            }
            State::Multiset(mut lake) => {
                for (row, n) in counted {
                    let l = lake.remove(&row).unwrap_or(0);
                    if n > l {
                        report.missing += n - l;
                        sample(report, multiset_sample(cols, "missing", row, show_values));
                    } else if l > n {
                        report.extra += l - n;
                        sample(report, multiset_sample(cols, "extra", row, show_values));
                    }
                }
                for (row, l) in lake {
                    report.extra += l;
                    sample(report, multiset_sample(cols, "extra", row, show_values));
                }
            }
        }
    }
    Ok(())
}

fn keyed_sample(
    cols: &Columns,
    kind: &str,
    key: &[u8],
    source: Option<&[u8]>,
    lake: Option<&[u8]>,
    show_values: bool,
) -> Sample {
    let render = |row: Option<&[u8]>| -> Vec<Option<String>> {
        match row {
            Some(r) => cells(r)
                .enumerate()
                .map(|(c, cell)| Some(cols.render(c, cell)))
                .collect(),
            None => vec![None; cols.names.len()],
        }
    };
    let values = if show_values {
        let (s, l) = (render(source), render(lake));
        cols.names
            .iter()
            .zip(s.into_iter().zip(l))
            .map(|(column, (source, lake))| SampleValue {
                column: column.clone(),
                source,
                lake,
            })
            .collect()
    } else {
        Vec::new()
    };
    Sample {
        kind: kind.into(),
        key: Some(cols.render_key(key)),
        columns: Vec::new(),
        values,
    }
}

/// A row of a table without a key: shown only with `--show-values` (the row is all
/// there is to name it by).
fn multiset_sample(cols: &Columns, kind: &str, row: &[u8], show_values: bool) -> Sample {
    let values = if show_values {
        cells(row)
            .enumerate()
            .map(|(c, cell)| {
                let v = Some(cols.render(c, cell));
                SampleValue {
                    column: cols.names[c].clone(),
                    source: if kind == "missing" { v.clone() } else { None },
                    lake: if kind == "extra" { v } else { None },
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    Sample {
        kind: kind.into(),
        key: None,
        columns: Vec::new(),
        values,
    }
}
