//! Folding change-log rows into an Iceberg commit: the key index (where each live row
//! of the table is), and the fold of an interval's changes in `(_lsn, _seq)` order into
//! rows to add, positions to delete, or a truncate.

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use arrow::row::{OwnedRow, RowConverter, SortField};

use super::schema::Schema;
use super::table::Commit;

/// Where each live row of a table is: key → (data file, position).
pub struct KeyIndex {
    converter: RowConverter,
    /// The key columns, by name, in key order, and their types in the table.
    keys: Vec<String>,
    types: Vec<arrow::datatypes::DataType>,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
    live: HashMap<OwnedRow, (u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("change-log rows without column {0}")]
    Missing(String),
}

impl KeyIndex {
    /// An empty index over the identifier fields of `schema`.
    pub fn new(schema: &Schema) -> Result<KeyIndex, FoldError> {
        let arrow = schema.arrow_schema();
        let keys: Vec<String> = schema
            .identifier_field_ids
            .iter()
            .filter_map(|id| schema.fields.iter().find(|f| f.id == *id))
            .map(|f| f.name.clone())
            .collect();
        let types = keys
            .iter()
            .map(|k| Ok(arrow.field_with_name(k)?.data_type().clone()))
            .collect::<Result<Vec<_>, arrow::error::ArrowError>>()?;
        let fields = types.iter().map(|t| SortField::new(t.clone())).collect();
        Ok(KeyIndex {
            converter: RowConverter::new(fields)?,
            keys,
            types,
            files: Vec::new(),
            file_ids: HashMap::new(),
            live: HashMap::new(),
        })
    }

    pub fn key_columns(&self) -> &[String] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The keys of `batch` (conformed to the table's schema).
    fn keys_of(&self, batch: &RecordBatch) -> Result<arrow::row::Rows, FoldError> {
        // A file written before its key column widened holds the narrower type.
        let columns: Vec<ArrayRef> = self
            .keys
            .iter()
            .zip(&self.types)
            .map(|(k, t)| {
                let c = batch.column_by_name(k).ok_or_else(|| FoldError::Missing(k.clone()))?;
                if c.data_type() == t {
                    Ok(c.clone())
                } else {
                    Ok(arrow::compute::cast(c, t)?)
                }
            })
            .collect::<Result<_, FoldError>>()?;
        Ok(self.converter.convert_columns(&columns)?)
    }

    fn file_id(&mut self, path: &str) -> u32 {
        if let Some(id) = self.file_ids.get(path) {
            return *id;
        }
        let id = self.files.len() as u32;
        self.files.push(path.to_owned());
        self.file_ids.insert(path.to_owned(), id);
        id
    }

    /// Indexes the rows of a data file, `rows` holding (at least) its key columns in
    /// file order; positions in `deleted` are not live.
    pub fn add_file(&mut self, path: &str, rows: &RecordBatch, deleted: &HashSet<i64>) -> Result<(), FoldError> {
        let keys = self.keys_of(rows)?;
        let id = self.file_id(path);
        for (pos, key) in keys.iter().enumerate() {
            if !deleted.contains(&(pos as i64)) {
                self.live.insert(key.owned(), (id, pos as u32));
            }
        }
        Ok(())
    }

    fn get(&self, key: &OwnedRow) -> Option<(u32, u32)> {
        self.live.get(key).copied()
    }

    pub fn clear(&mut self) {
        self.live.clear();
        self.files.clear();
        self.file_ids.clear();
    }
}

/// Where an output column's value comes from: a change-log row, or a live row of the
/// table (a value PostgreSQL did not send, carried forward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Log(usize, usize),
    Table(u32, u32),
}

/// A key's newest image in the interval: its change-log row, and the columns whose
/// value comes from elsewhere.
#[derive(Clone)]
struct Image {
    row: (usize, usize),
    carried: Vec<(usize, Source)>,
}

impl Image {
    fn source_of(&self, column: usize) -> Source {
        self.carried
            .iter()
            .find(|(c, _)| *c == column)
            .map_or(Source::Log(self.row.0, self.row.1), |(_, s)| *s)
    }
}

/// The image of a key a delete removed: from the interval, or the table's row.
enum Prev {
    Image(Image),
    Table(u32, u32),
}

impl Prev {
    fn source_of(&self, column: usize) -> Source {
        match self {
            Prev::Image(i) => i.source_of(column),
            Prev::Table(f, p) => Source::Table(*f, *p),
        }
    }
}

/// An interval folded: what to commit, and the table rows (file, positions) whose
/// values it needs before it can be built.
pub struct Folded {
    truncate: bool,
    /// Keys touched, in first-touch order, with their final image (None: deleted).
    latest: Vec<(OwnedRow, Option<Image>)>,
    conformed: Vec<RecordBatch>,
}

impl Folded {
    /// Table rows whose values carry forward: data file path → positions.
    pub fn needs(&self, index: &KeyIndex) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (_, image) in &self.latest {
            for (_, s) in image.iter().flat_map(|i| &i.carried) {
                if let Source::Table(f, p) = s {
                    out.entry(index.files[*f as usize].clone())
                        .or_default()
                        .push(i64::from(*p));
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        !self.truncate && self.latest.is_empty()
    }

    /// The commit, given the table rows [`Folded::needs`] asked for (`carried`: path →
    /// rows at the positions asked, in that order, conformed), and the keys it removes
    /// from the index. Applies to `index`: the caller adds the committed files after.
    pub fn into_commit(
        self,
        schema: &Schema,
        index: &mut KeyIndex,
        carried: &BTreeMap<String, (Vec<i64>, RecordBatch)>,
    ) -> Result<Commit, FoldError> {
        let mut deletes: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        if !self.truncate {
            for (key, _) in &self.latest {
                if let Some((f, p)) = index.get(key) {
                    deletes
                        .entry(index.files[f as usize].clone())
                        .or_default()
                        .push(i64::from(p));
                }
            }
        }
        // The sources: the conformed log batches, then one batch per carried file.
        let mut batches: Vec<&RecordBatch> = self.conformed.iter().collect();
        let mut table_rows: HashMap<(u32, u32), (usize, usize)> = HashMap::new();
        for (path, (positions, batch)) in carried {
            let b = batches.len();
            batches.push(batch);
            if let Some(&f) = index.file_ids.get(path) {
                for (i, p) in positions.iter().enumerate() {
                    table_rows.insert((f, *p as u32), (b, i));
                }
            }
        }
        let images: Vec<&Image> = self.latest.iter().filter_map(|(_, i)| i.as_ref()).collect();
        let arrow = schema.arrow_schema();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(arrow.fields().len());
        for c in 0..arrow.fields().len() {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            let at: Vec<(usize, usize)> = images
                .iter()
                .map(|i| match i.source_of(c) {
                    Source::Log(b, r) => (b, r),
                    Source::Table(f, p) => table_rows[&(f, p)],
                })
                .collect();
            columns.push(arrow::compute::interleave(&arrays, &at)?);
        }
        let rows = RecordBatch::try_new(arrow, columns)?;
        if self.truncate {
            index.clear();
        } else {
            for (key, _) in &self.latest {
                index.live.remove(key);
            }
        }
        Ok(Commit {
            rows: if rows.num_rows() > 0 { vec![rows] } else { Vec::new() },
            deletes,
            truncate: self.truncate,
            remove: Vec::new(),
            summary: BTreeMap::new(),
        })
    }
}

/// Folds change-log rows (`batches`, of lake types, with `_op`, `_lsn`, `_seq` and
/// `_unchanged`) in `(_lsn, _seq)` order: each key's last image wins, a delete removes
/// it, a truncate removes everything before it. A value PostgreSQL did not send takes
/// the key's previous image's, from the interval or from the table. `rebuild` starts
/// from an empty table (as if the rows followed a truncate).
pub fn fold(schema: &Schema, index: &KeyIndex, batches: &[RecordBatch], rebuild: bool) -> Result<Folded, FoldError> {
    let mut conformed = Vec::with_capacity(batches.len());
    let mut order: Vec<(i64, i64, usize, usize)> = Vec::new();
    let mut keys = Vec::with_capacity(batches.len());
    for (b, batch) in batches.iter().enumerate() {
        let c = schema.conform_log(batch)?;
        keys.push(index.keys_of(&c)?);
        conformed.push(c);
        let column = |n: &str| batch.column_by_name(n).ok_or_else(|| FoldError::Missing(n.into()));
        let lsn = column("_lsn")?.as_primitive::<Int64Type>();
        let seq = column("_seq")?.as_primitive::<Int64Type>();
        for r in 0..batch.num_rows() {
            order.push((lsn.value(r), seq.value(r), b, r));
        }
    }
    order.sort_unstable();
    let arrow = schema.arrow_schema();
    let mut truncate = rebuild;
    let mut slot: HashMap<OwnedRow, usize> = HashMap::new();
    let mut latest: Vec<(OwnedRow, Option<Image>)> = Vec::new();
    // Keys deleted earlier in the interval: the table's row is not their previous image.
    let mut deleted: Vec<bool> = Vec::new();
    // The image a delete just removed, with its (_lsn, _seq): an update that changes
    // the key is a delete of the old key then an insert of the new one at the next
    // `_seq`, and PostgreSQL does not send the unchanged TOAST values of the new row.
    let mut just_deleted: Option<(i64, i64, Prev)> = None;
    for (lsn, seq, b, r) in order {
        let batch = &batches[b];
        let op = batch
            .column_by_name("_op")
            .ok_or_else(|| FoldError::Missing("_op".into()))?
            .as_string::<i32>()
            .value(r);
        if op == "T" {
            truncate = true;
            slot.clear();
            latest.clear();
            deleted.clear();
            continue;
        }
        let key = keys[b].row(r).owned();
        let at = *slot.entry(key.clone()).or_insert_with(|| {
            latest.push((key.clone(), None));
            deleted.push(false);
            latest.len() - 1
        });
        if op == "D" {
            let prev = match latest[at].1.take() {
                Some(image) => Some(Prev::Image(image)),
                None if !truncate && !deleted[at] => index.get(&latest[at].0).map(|(f, p)| Prev::Table(f, p)),
                None => None,
            };
            just_deleted = prev.map(|p| (lsn, seq, p));
            deleted[at] = true;
            continue;
        }
        let moved_from = just_deleted
            .take()
            .filter(|(l, s, _)| *l == lsn && s.checked_add(1) == Some(seq))
            .map(|(_, _, p)| p);
        let mut image = Image {
            row: (b, r),
            carried: Vec::new(),
        };
        if let Some(unchanged) = batch.column_by_name("_unchanged")
            && unchanged.is_valid(r)
        {
            let names = unchanged.as_list::<i32>().value(r);
            let names = names.as_string::<i32>();
            for name in names.iter().flatten() {
                let Some((c, _)) = arrow.column_with_name(name) else {
                    continue;
                };
                let previous = match &latest[at].1 {
                    Some(prev) => Some(prev.source_of(c)),
                    None if !truncate && !deleted[at] => index.get(&latest[at].0).map(|(f, p)| Source::Table(f, p)),
                    None => None,
                }
                // A new key: the old key's image, when this row is its update.
                .or_else(|| moved_from.as_ref().map(|p| p.source_of(c)));
                // No previous image (the row predates the lake, with no copy): the
                // value stays null, as the change log holds it.
                if let Some(s) = previous {
                    image.carried.push((c, s));
                }
            }
        }
        latest[at].1 = Some(image);
    }
    Ok(Folded {
        truncate,
        latest,
        conformed,
    })
}
