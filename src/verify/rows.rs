//! Rows as bytes: each value in arrow's row format (lossless, and equal bytes exactly
//! when the values are equal: `-0` is not `0`, NULL is not the empty string), rows
//! as length-prefixed cells, and the buckets they spill to by a hash of their key.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, GenericListArray, OffsetSizeTrait, PrimitiveArray, new_null_array};
use arrow::datatypes::{ArrowPrimitiveType, DataType, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::batch::value::Kind;
use crate::decode::Relation;

/// A cell that holds no value of its own: the lake's `_unchanged` (to carry forward).
pub const UNCHANGED: u32 = u32::MAX;
/// A value carried forward from nothing: the lake lost the change that held it.
pub const UNKNOWN: u32 = u32::MAX - 1;
/// A value carried across a key change (`D` of the old key, `I` of the new one with the
/// value unchanged): held by another key's history, so not checked.
pub const UNCHECKED: u32 = u32::MAX - 2;

/// The table's columns as the source has them now: what is compared.
pub struct Columns {
    pub names: Vec<String>,
    types: Vec<DataType>,
    converters: Vec<RowConverter>,
    /// The replica identity's columns; with none, or all of them (`FULL`), rows are
    /// compared as a multiset of whole rows.
    pub key: Vec<usize>,
    pub multiset: bool,
}

impl Columns {
    pub fn new(relation: &Relation) -> Result<Columns, String> {
        let types: Vec<DataType> = relation
            .columns
            .iter()
            .map(|c| Kind::for_type(c.type_oid, c.type_modifier).data_type())
            .collect();
        let converters = types
            .iter()
            .map(|t| RowConverter::new(vec![SortField::new(t.clone())]).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let key: Vec<usize> = (0..relation.columns.len())
            .filter(|&i| relation.columns[i].key)
            .collect();
        let multiset = key.is_empty() || key.len() == relation.columns.len();
        Ok(Columns {
            names: relation.columns.iter().map(|c| c.name.clone()).collect(),
            types,
            converters,
            key,
            multiset,
        })
    }

    /// The compared columns of a batch, found by name and read as the source's types
    /// (a lake file written before a widening holds the narrower type; one written
    /// before a column was added lacks it: null). NaNs are made one NaN: PostgreSQL
    /// prints them all as `NaN`.
    pub fn arrays(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>, String> {
        self.names
            .iter()
            .zip(&self.types)
            .map(|(name, t)| {
                let a = match batch.column_by_name(name) {
                    None => return Ok(new_null_array(t, batch.num_rows())),
                    Some(a) if a.data_type() == t => a.clone(),
                    Some(a) => arrow::compute::cast(a, t).map_err(|e| {
                        format!("column {name}: the lake's {} cannot be read as {t}: {e}", a.data_type())
                    })?,
                };
                Ok(canonical_nan(a))
            })
            .collect()
    }

    /// Each column's values in row format.
    pub fn encode(&self, arrays: &[ArrayRef]) -> Result<Vec<Rows>, String> {
        self.converters
            .iter()
            .zip(arrays)
            .map(|(c, a)| c.convert_columns(std::slice::from_ref(a)).map_err(|e| e.to_string()))
            .collect()
    }

    /// A cell's value as text, for the report.
    pub fn render(&self, column: usize, cell: Cell<'_>) -> String {
        let bytes = match cell {
            Cell::Value(b) => b,
            Cell::Unchanged => return "(unchanged TOAST)".into(),
            Cell::Unknown => return "(unknown: carried forward from a change the lake lacks)".into(),
            Cell::Unchecked => return "(carried across a key change)".into(),
        };
        let converter = &self.converters[column];
        let parser = converter.parser();
        let arrays = match converter.convert_rows([parser.parse(bytes)]) {
            Ok(a) => a,
            Err(e) => return format!("(undecodable: {e})"),
        };
        let options = FormatOptions::default().with_null("NULL");
        match ArrayFormatter::try_new(arrays[0].as_ref(), &options) {
            Ok(f) => f.value(0).to_string(),
            Err(e) => format!("(unprintable: {e})"),
        }
    }

    /// `name=value, …` of a key (the key columns' cells, as [`Row::key`] wrote them).
    pub fn render_key(&self, key: &[u8]) -> String {
        let columns: &[usize] = if self.multiset { &[] } else { &self.key };
        columns
            .iter()
            .zip(cells(key))
            .map(|(&c, cell)| format!("{}={}", self.names[c], self.render(c, cell)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Float NaNs with one bit pattern.
fn canonical_nan(a: ArrayRef) -> ArrayRef {
    fn floats<T: ArrowPrimitiveType>(a: &ArrayRef, nan: T::Native) -> ArrayRef
    where
        T::Native: num_like::Float,
    {
        let p = a.as_primitive::<T>();
        if !p.values().iter().any(|v| num_like::Float::is_nan(*v)) {
            return a.clone();
        }
        let out: PrimitiveArray<T> = p.unary(|v| if num_like::Float::is_nan(v) { nan } else { v });
        Arc::new(out.with_data_type(a.data_type().clone()))
    }
    fn list<O: OffsetSizeTrait>(a: &ArrayRef) -> ArrayRef {
        let l: &GenericListArray<O> = a.as_list::<O>();
        let values = canonical_nan(l.values().clone());
        if Arc::ptr_eq(&values, l.values()) {
            return a.clone();
        }
        let (DataType::List(field) | DataType::LargeList(field)) = a.data_type() else {
            return a.clone();
        };
        Arc::new(GenericListArray::<O>::new(
            field.clone(),
            l.offsets().clone(),
            values,
            l.nulls().cloned(),
        ))
    }
    match a.data_type() {
        DataType::Float32 => floats::<Float32Type>(&a, f32::NAN),
        DataType::Float64 => floats::<Float64Type>(&a, f64::NAN),
        DataType::List(_) => list::<i32>(&a),
        DataType::LargeList(_) => list::<i64>(&a),
        _ => a,
    }
}

mod num_like {
    pub trait Float: Copy {
        fn is_nan(self) -> bool;
    }
    impl Float for f32 {
        fn is_nan(self) -> bool {
            f32::is_nan(self)
        }
    }
    impl Float for f64 {
        fn is_nan(self) -> bool {
            f64::is_nan(self)
        }
    }
}

/// A cell of an encoded row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell<'a> {
    Value(&'a [u8]),
    Unchanged,
    Unknown,
    Unchecked,
}

/// Appends one cell: a u32 length (or a marker) and the value's bytes.
pub fn push_cell(out: &mut Vec<u8>, cell: Cell<'_>) {
    match cell {
        Cell::Value(b) => {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Cell::Unchanged => out.extend_from_slice(&UNCHANGED.to_le_bytes()),
        Cell::Unknown => out.extend_from_slice(&UNKNOWN.to_le_bytes()),
        Cell::Unchecked => out.extend_from_slice(&UNCHECKED.to_le_bytes()),
    }
}

/// The cells of an encoded row.
pub fn cells(mut row: &[u8]) -> impl Iterator<Item = Cell<'_>> {
    std::iter::from_fn(move || {
        let (len, rest) = row.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len);
        row = rest;
        Some(match len {
            UNCHANGED => Cell::Unchanged,
            UNKNOWN => Cell::Unknown,
            UNCHECKED => Cell::Unchecked,
            n => {
                let (value, rest) = row.split_at(n as usize);
                row = rest;
                Cell::Value(value)
            }
        })
    })
}

/// A 128-bit hash of a row (XXH3), for the order-free digest of a bucket. A key is
/// some of its row's cells, so the row alone says both.
pub fn row_hash(row: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(row)
}

/// Which of `buckets` a key goes to.
pub fn bucket_of(key: &[u8], buckets: usize) -> usize {
    (twox_hash::XxHash3_64::oneshot_with_seed(0x5eed, key) % buckets as u64) as usize
}

/// What a bucket holds, in any order: rows, and a sum of their hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: u64,
    pub sum: u128,
}

impl Digest {
    pub fn add(&mut self, hash: u128, times: u64) {
        self.rows += times;
        self.sum = self.sum.wrapping_add(hash.wrapping_mul(u128::from(times)));
    }
}

/// One spill file per bucket, written through small buffers.
pub struct Spill {
    paths: Vec<PathBuf>,
    writers: Vec<BufWriter<std::fs::File>>,
}

/// Buffer per bucket file: with the most buckets, 16 MiB in all.
const SPILL_BUFFER: usize = 16 * 1024;

impl Spill {
    pub fn create(dir: &Path, side: &str, buckets: usize) -> std::io::Result<Spill> {
        let mut paths = Vec::with_capacity(buckets);
        let mut writers = Vec::with_capacity(buckets);
        for b in 0..buckets {
            let path = dir.join(format!("{side}-{b:04}"));
            writers.push(BufWriter::with_capacity(SPILL_BUFFER, std::fs::File::create(&path)?));
            paths.push(path);
        }
        Ok(Spill { paths, writers })
    }

    pub fn buckets(&self) -> usize {
        self.writers.len()
    }

    /// Appends a record made of `parts`, each length-prefixed.
    pub fn write(&mut self, bucket: usize, header: &[u8], parts: &[&[u8]]) -> std::io::Result<()> {
        let w = &mut self.writers[bucket];
        w.write_all(header)?;
        for p in parts {
            w.write_all(&(p.len() as u32).to_le_bytes())?;
            w.write_all(p)?;
        }
        Ok(())
    }

    /// Flushes and closes every file; returns their paths, by bucket.
    pub fn finish(self) -> std::io::Result<Vec<PathBuf>> {
        for w in self.writers {
            w.into_inner().map_err(|e| e.into_error())?;
        }
        Ok(self.paths)
    }
}

/// A u32-length-prefixed part and what follows it.
fn length_prefixed(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = buf.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A bucket file read whole: its records, each a `header`-byte header and two
/// length-prefixed parts, borrowed from the buffer (one allocation per bucket).
pub struct Records {
    buf: Vec<u8>,
    header: usize,
}

impl Records {
    pub fn read(path: &Path, header: usize) -> std::io::Result<Records> {
        Ok(Records {
            buf: std::fs::read(path)?,
            header,
        })
    }

    /// `(header, first part, second part)` of each record, in the order written.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
        let mut rest = &self.buf[..];
        let header = self.header;
        std::iter::from_fn(move || {
            if rest.len() < header {
                return None;
            }
            let (h, tail) = rest.split_at(header);
            let (first, tail) = length_prefixed(tail)?;
            let (second, tail) = length_prefixed(tail)?;
            rest = tail;
            Some((h, first, second))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int32Array, StringArray};

    fn one_column(t: DataType) -> Columns {
        Columns {
            names: vec!["c".into()],
            converters: vec![RowConverter::new(vec![SortField::new(t.clone())]).unwrap()],
            types: vec![t],
            key: vec![0],
            multiset: false,
        }
    }

    fn encoded(cols: &Columns, a: ArrayRef) -> Vec<Vec<u8>> {
        let batch = RecordBatch::try_from_iter([("c", a)]).unwrap();
        let rows = cols.encode(&cols.arrays(&batch).unwrap()).unwrap();
        (0..batch.num_rows()).map(|i| rows[0].row(i).data().to_vec()).collect()
    }

    #[test]
    fn values_that_print_alike_but_differ_encode_differently() {
        let cols = one_column(DataType::Float64);
        let v = encoded(
            &cols,
            Arc::new(Float64Array::from(vec![
                Some(0.0),
                Some(-0.0),
                None,
                Some(f64::NAN),
                Some(-f64::NAN),
            ])),
        );
        assert_ne!(v[0], v[1], "-0 and 0");
        assert_ne!(v[2], v[0], "NULL and 0");
        assert_eq!(v[3], v[4], "every NaN is NaN");
        let cols = one_column(DataType::Utf8);
        let v = encoded(&cols, Arc::new(StringArray::from(vec![Some(""), None])));
        assert_ne!(v[0], v[1], "empty and NULL");
    }

    #[test]
    fn a_narrower_lake_column_reads_as_the_source_type_and_a_missing_one_as_null() {
        let cols = one_column(DataType::Int64);
        let narrow = encoded(&cols, Arc::new(Int32Array::from(vec![7])));
        let wide = encoded(&cols, Arc::new(arrow::array::Int64Array::from(vec![7])));
        assert_eq!(narrow, wide);
        let batch = RecordBatch::try_from_iter([("other", Arc::new(Int32Array::from(vec![1])) as ArrayRef)]).unwrap();
        assert_eq!(cols.arrays(&batch).unwrap()[0].null_count(), 1);
        assert_eq!(cols.render(0, Cell::Value(&wide[0])), "7");
    }

    #[test]
    fn cells_round_trip_with_their_markers() {
        let mut row = Vec::new();
        for c in [
            Cell::Value(b"ab"),
            Cell::Unchanged,
            Cell::Value(b""),
            Cell::Unknown,
            Cell::Unchecked,
        ] {
            push_cell(&mut row, c);
        }
        let back: Vec<Cell<'_>> = cells(&row).collect();
        assert_eq!(
            back,
            [
                Cell::Value(b"ab"),
                Cell::Unchanged,
                Cell::Value(b""),
                Cell::Unknown,
                Cell::Unchecked
            ]
        );
    }

    #[test]
    fn spilled_records_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::create(dir.path(), "t", 2).unwrap();
        spill.write(1, b"hd", &[b"key", b""]).unwrap();
        spill.write(1, b"HD", &[b"", b"row"]).unwrap();
        let paths = spill.finish().unwrap();
        assert_eq!(Records::read(&paths[0], 2).unwrap().iter().count(), 0);
        let r = Records::read(&paths[1], 2).unwrap();
        let back: Vec<_> = r.iter().collect();
        assert_eq!(
            back,
            [(&b"hd"[..], &b"key"[..], &b""[..]), (&b"HD"[..], &b""[..], &b"row"[..])]
        );
    }

    #[test]
    fn a_digest_ignores_order_and_counts_repeats() {
        let (a, b) = (row_hash(b"r1"), row_hash(b"r2"));
        let mut x = Digest::default();
        x.add(a, 1);
        x.add(b, 2);
        let mut y = Digest::default();
        y.add(b, 1);
        y.add(a, 1);
        y.add(b, 1);
        assert_eq!(x, y);
        y.add(a, 1);
        assert_ne!(x, y);
    }
}
