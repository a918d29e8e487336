//! Folding change-log rows into an Iceberg commit: the key index (where each live row
//! of the table is), and the fold of an interval's changes in `(_lsn, _seq)` order into
//! rows to add, positions to delete, or a truncate.

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use arrow::row::{RowConverter, SortField};

use super::bucket::bucket_of;
use super::metadata::PartitionSpec;
use super::schema::Schema;
use super::table::Commit;

/// A key's 128-bit hash (XXH3 of its row-format bytes). The index keeps hashes, not
/// keys: 24 bytes a live row whatever the key's width. Two keys of one table share a
/// hash with a chance of about n²/2¹²⁹ (10⁻²³ at a billion rows).
pub type KeyHash = u128;

fn hash_key(row: arrow::row::Row<'_>) -> KeyHash {
    twox_hash::XxHash3_128::oneshot(row.as_ref())
}

/// A removed key keeps its place in a [`Part`] until the next merge.
const GONE: u64 = u64::MAX;
/// Bytes a held key takes.
pub const ENTRY_BYTES: u64 = 24;

fn pack(file: u32, pos: u32) -> u64 {
    (u64::from(file) << 32) | u64::from(pos)
}

fn unpack(loc: u64) -> (u32, u32) {
    ((loc >> 32) as u32, loc as u32)
}

/// One bucket's live keys: (hash high, hash low, file << 32 | position), sorted by hash.
#[derive(Default)]
struct Part {
    entries: Vec<(u64, u64, u64)>,
}

impl Part {
    /// The entries of hash `h` (several: a multiset's equal rows).
    fn range(&self, h: KeyHash) -> std::ops::Range<usize> {
        let k = ((h >> 64) as u64, h as u64);
        let lo = self.entries.partition_point(|e| (e.0, e.1) < k);
        lo..lo + self.entries[lo..].partition_point(|e| (e.0, e.1) == k)
    }

    /// The `k`-th live place of hash `h`.
    fn nth(&self, h: KeyHash, k: usize) -> Option<(u32, u32)> {
        self.entries[self.range(h)]
            .iter()
            .filter(|e| e.2 != GONE)
            .nth(k)
            .map(|e| unpack(e.2))
    }

    fn remove(&mut self, h: KeyHash) {
        let range = self.range(h);
        for e in &mut self.entries[range] {
            e.2 = GONE;
        }
    }

    fn remove_at(&mut self, h: KeyHash, (file, pos): (u32, u32)) {
        let range = self.range(h);
        if let Some(e) = self.entries[range].iter_mut().find(|e| e.2 == pack(file, pos)) {
            e.2 = GONE;
        }
    }

    /// Adds keys, in one merge that also drops the removed ones; with `replace`, a key
    /// already there moves to its new place (else both stay: a multiset's equal rows).
    fn insert(&mut self, mut new: Vec<(u64, u64, u64)>, replace: bool) {
        if new.is_empty() {
            return;
        }
        new.sort_unstable_by_key(|e| (e.0, e.1));
        let live = self.entries.iter().filter(|e| e.2 != GONE).count();
        let mut out = Vec::with_capacity(live + new.len());
        let mut old = self.entries.iter().filter(|e| e.2 != GONE).peekable();
        for n in new {
            while let Some(o) = old.next_if(|o| (o.0, o.1) < (n.0, n.1) || (!replace && (o.0, o.1) == (n.0, n.1))) {
                out.push(*o);
            }
            while old.next_if(|o| (o.0, o.1) == (n.0, n.1)).is_some() {}
            out.push(n);
        }
        out.extend(old);
        self.entries = out;
    }

    fn bytes(&self) -> u64 {
        self.entries.capacity() as u64 * ENTRY_BYTES
    }
}

/// The bound every table's key index shares (`[iceberg] index_memory`): the bytes all
/// of them hold, against the most they may.
pub struct IndexMemory {
    max: u64,
    held: std::sync::atomic::AtomicU64,
}

impl IndexMemory {
    pub fn new(max: u64) -> std::sync::Arc<IndexMemory> {
        std::sync::Arc::new(IndexMemory {
            max,
            held: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes all indexes hold.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where each live row of a table is: key hash → (data file, position), per bucket of
/// the partition spec. Buckets are held in memory up to a bound (`[iceberg]
/// index_memory`); a bucket not held is looked up by reading its files' key columns,
/// only for the keys an interval touches ([`KeyIndex::resolve`]).
pub struct KeyIndex {
    converter: RowConverter,
    /// The key columns, by name, in key order, and their types in the table.
    keys: Vec<String>,
    types: Vec<arrow::datatypes::DataType>,
    /// Rows are identified by all their columns, as a multiset (a table without
    /// identifier fields: `REPLICA IDENTITY FULL`, or none): equal rows are several.
    multiset: bool,
    /// The spec's source column and bucket count: which part a row is in.
    bucket: Option<(String, u32)>,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
    /// Ids of files forgotten, to be used again.
    free: Vec<u32>,
    /// Per bucket: its keys, or None when not held.
    parts: Vec<Option<Part>>,
    /// Keys of buckets not held, looked up for the interval at hand (a multiset's
    /// equal rows: several places).
    resolved: HashMap<KeyHash, Vec<(u32, u32)>>,
    /// The bound shared with the other tables' indexes, and what this one last
    /// counted there.
    memory: std::sync::Arc<IndexMemory>,
    counted: u64,
}

impl Drop for KeyIndex {
    fn drop(&mut self) {
        self.memory
            .held
            .fetch_sub(self.counted, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("change-log rows without column {0}")]
    Missing(String),
}

impl KeyIndex {
    /// An empty index over the identifier fields of `schema` (every column but `_lsn`
    /// and `_commit_ts` when it has none: a multiset), partitioned as `spec`, holding at
    /// most what `memory` leaves (shared with the other tables' indexes).
    pub fn new(
        schema: &Schema,
        spec: &PartitionSpec,
        memory: std::sync::Arc<IndexMemory>,
    ) -> Result<KeyIndex, FoldError> {
        let arrow = schema.arrow_schema();
        let multiset = schema.identifier_field_ids.is_empty();
        let keys: Vec<String> = if multiset {
            schema
                .fields
                .iter()
                .filter(|f| f.name != super::schema::LSN && f.name != super::schema::COMMIT_TS)
                .map(|f| f.name.clone())
                .collect()
        } else {
            schema.identifier_names()
        };
        let types = keys
            .iter()
            .map(|k| Ok(arrow.field_with_name(k)?.data_type().clone()))
            .collect::<Result<Vec<_>, arrow::error::ArrowError>>()?;
        let fields = types.iter().map(|t| SortField::new(t.clone())).collect();
        let bucket = match (spec.buckets(), spec.fields.first()) {
            (Some(n), Some(f)) => schema
                .fields
                .iter()
                .find(|c| c.id == f.source_id)
                .map(|c| (c.name.clone(), n)),
            _ => None,
        };
        let parts = bucket.as_ref().map_or(1, |(_, n)| *n as usize);
        Ok(KeyIndex {
            converter: RowConverter::new(fields)?,
            keys,
            types,
            multiset,
            bucket,
            files: Vec::new(),
            file_ids: HashMap::new(),
            free: Vec::new(),
            parts: (0..parts).map(|_| Some(Part::default())).collect(),
            resolved: HashMap::new(),
            memory,
            counted: 0,
        })
    }

    pub fn key_columns(&self) -> &[String] {
        &self.keys
    }

    /// Live keys held in memory.
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .flatten()
            .map(|p| p.entries.iter().filter(|e| e.2 != GONE).count())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the held buckets take.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().flatten().map(Part::bytes).sum()
    }

    /// Buckets held in memory, of all.
    pub fn held(&self) -> (usize, usize) {
        (self.parts.iter().flatten().count(), self.parts.len())
    }

    /// The part a manifest's bucket is.
    pub fn part(bucket: Option<i32>) -> usize {
        bucket.map_or(0, |b| b as usize)
    }

    /// Whether a bucket's keys are held.
    pub fn holds(&self, part: usize) -> bool {
        self.parts.get(part).is_some_and(Option::is_some)
    }

    /// Whether `rows` more keys fit within the bound.
    pub fn fits(&self, rows: u64) -> bool {
        self.memory.held() + rows * ENTRY_BYTES <= self.memory.max
    }

    /// Brings the shared count up to date with what this index holds.
    fn count(&mut self) {
        let now = self.bytes();
        let held = &self.memory.held;
        if now >= self.counted {
            held.fetch_add(now - self.counted, std::sync::atomic::Ordering::Relaxed);
        } else {
            held.fetch_sub(self.counted - now, std::sync::atomic::Ordering::Relaxed);
        }
        self.counted = now;
    }

    /// Lets a bucket go: its keys are looked up from its files from now on.
    pub fn release(&mut self, part: usize) {
        if let Some(p) = self.parts.get_mut(part) {
            *p = None;
        }
        self.count();
    }

    /// Holds a bucket (empty: its rows follow through [`KeyIndex::add_file`]).
    pub fn hold(&mut self, part: usize) {
        if let Some(p) = self.parts.get_mut(part)
            && p.is_none()
        {
            *p = Some(Part::default());
        }
    }

    /// Lets this index's largest buckets go until all indexes fit the bound; returns
    /// how many it let go.
    pub fn shed(&mut self) -> usize {
        self.count();
        let mut shed = 0;
        while self.memory.held() > self.memory.max {
            let Some(largest) = (0..self.parts.len())
                .filter(|i| self.parts[*i].is_some())
                .max_by_key(|i| self.parts[*i].as_ref().map_or(0, Part::bytes))
            else {
                break;
            };
            self.release(largest);
            shed += 1;
        }
        shed
    }

    /// The keys of `batch` (conformed to the table's schema).
    fn keys_of(&self, batch: &RecordBatch) -> Result<arrow::row::Rows, FoldError> {
        // A file written before its key column widened holds the narrower type; one
        // written before a multiset's column was added lacks it (null, as readers see).
        let columns: Vec<ArrayRef> = self
            .keys
            .iter()
            .zip(&self.types)
            .map(|(k, t)| {
                let Some(c) = batch.column_by_name(k) else {
                    if self.multiset {
                        return Ok(arrow::array::new_null_array(t, batch.num_rows()));
                    }
                    return Err(FoldError::Missing(k.clone()));
                };
                if c.data_type() == t {
                    Ok(c.clone())
                } else {
                    Ok(arrow::compute::cast(c, t)?)
                }
            })
            .collect::<Result<_, FoldError>>()?;
        Ok(self.converter.convert_columns(&columns)?)
    }

    /// The key hashes of `batch`'s rows (key columns, at least).
    pub fn hashes_of(&self, batch: &RecordBatch) -> Result<Vec<KeyHash>, FoldError> {
        Ok(self.keys_of(batch)?.iter().map(hash_key).collect())
    }

    /// The part each row of `batch` (conformed) is in.
    fn parts_of(&self, batch: &RecordBatch) -> Result<Vec<u32>, FoldError> {
        let Some((name, n)) = &self.bucket else {
            return Ok(vec![0; batch.num_rows()]);
        };
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| FoldError::Missing(name.clone()))?;
        Ok((0..batch.num_rows())
            .map(|i| bucket_of(column.as_ref(), i, *n).map_or(0, |b| b as u32))
            .collect())
    }

    pub fn file_id(&mut self, path: &str) -> u32 {
        if let Some(id) = self.file_ids.get(path) {
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.files[id as usize] = path.to_owned();
                id
            }
            None => {
                self.files.push(path.to_owned());
                self.files.len() as u32 - 1
            }
        };
        self.file_ids.insert(path.to_owned(), id);
        id
    }

    /// Forgets files no snapshot holds any more (compacted away): no held key is in
    /// them, and their ids are used again.
    pub fn forget<'a>(&mut self, paths: impl IntoIterator<Item = &'a String>) {
        for path in paths {
            if let Some(id) = self.file_ids.remove(path) {
                self.files[id as usize] = String::new();
                self.free.push(id);
            }
        }
    }

    /// Indexes the rows of a data file of bucket `part`, `rows` holding (at least) its
    /// key columns in file order; positions in `deleted` are not live. Nothing to do
    /// for a bucket not held.
    pub fn add_file(
        &mut self,
        path: &str,
        part: usize,
        rows: &RecordBatch,
        deleted: &HashSet<i64>,
    ) -> Result<(), FoldError> {
        if !self.holds(part) {
            return Ok(());
        }
        let hashes = self.hashes_of(rows)?;
        let id = self.file_id(path);
        let new = hashes
            .into_iter()
            .enumerate()
            .filter(|(pos, _)| !deleted.contains(&(*pos as i64)))
            .map(|(pos, h)| ((h >> 64) as u64, h as u64, pack(id, pos as u32)))
            .collect();
        let replace = !self.multiset;
        if let Some(Some(p)) = self.parts.get_mut(part) {
            p.insert(new, replace);
        }
        self.count();
        Ok(())
    }

    /// Where a key of a bucket not held is, found by reading the bucket's files.
    pub fn resolve(&mut self, h: KeyHash, path: &str, pos: u32) {
        let id = self.file_id(path);
        self.resolved.entry(h).or_default().push((id, pos));
    }

    fn get(&self, part: u32, h: KeyHash) -> Option<(u32, u32)> {
        self.nth(part, h, 0)
    }

    /// The `k`-th live place of a key (of a multiset's equal rows).
    fn nth(&self, part: u32, h: KeyHash, k: usize) -> Option<(u32, u32)> {
        match self.parts.get(part as usize) {
            Some(Some(p)) => p.nth(h, k),
            _ => self.resolved.get(&h).and_then(|v| v.get(k)).copied(),
        }
    }

    fn remove(&mut self, part: u32, h: KeyHash) {
        match self.parts.get_mut(part as usize) {
            Some(Some(p)) => p.remove(h),
            _ => {
                self.resolved.remove(&h);
            }
        }
    }

    /// Removes one place of a key (one of a multiset's equal rows).
    fn remove_at(&mut self, part: u32, h: KeyHash, at: (u32, u32)) {
        match self.parts.get_mut(part as usize) {
            Some(Some(p)) => p.remove_at(h, at),
            _ => {
                if let Some(v) = self.resolved.get_mut(&h) {
                    v.retain(|x| *x != at);
                }
            }
        }
    }

    /// The table is empty: every bucket held, none with a key.
    pub fn clear(&mut self) {
        for p in &mut self.parts {
            *p = Some(Part::default());
        }
        self.files.clear();
        self.file_ids.clear();
        self.free.clear();
        self.resolved.clear();
        self.count();
    }

    /// Forgets a held bucket's keys (its files were rewritten: the new one follows).
    pub fn reset(&mut self, part: usize) {
        if let Some(Some(p)) = self.parts.get_mut(part) {
            *p = Part::default();
        }
        self.count();
    }

    /// Ends an interval: the keys looked up for it go.
    pub fn settle(&mut self) {
        self.resolved = HashMap::new();
    }
}

/// Change-log rows read for an interval, conformed, with each row's key hash and
/// bucket: what [`fold`] takes, and which keys it needs looked up first.
pub struct Prepared<'a> {
    batches: &'a [RecordBatch],
    conformed: Vec<RecordBatch>,
    hashes: Vec<Vec<KeyHash>>,
    parts: Vec<Vec<u32>>,
}

impl<'a> Prepared<'a> {
    pub fn new(schema: &Schema, index: &KeyIndex, batches: &'a [RecordBatch]) -> Result<Prepared<'a>, FoldError> {
        let mut conformed = Vec::with_capacity(batches.len());
        let mut hashes = Vec::with_capacity(batches.len());
        let mut parts = Vec::with_capacity(batches.len());
        for batch in batches {
            let c = schema.conform_log(batch)?;
            hashes.push(index.hashes_of(&c)?);
            parts.push(index.parts_of(&c)?);
            conformed.push(c);
        }
        Ok(Prepared {
            batches,
            conformed,
            hashes,
            parts,
        })
    }

    /// The keys in buckets `index` does not hold, by bucket: they are looked up in the
    /// bucket's files before the fold.
    pub fn unheld(&self, index: &KeyIndex) -> BTreeMap<usize, HashSet<KeyHash>> {
        let mut out: BTreeMap<usize, HashSet<KeyHash>> = BTreeMap::new();
        for (b, (hashes, parts)) in self.hashes.iter().zip(&self.parts).enumerate() {
            // A multiset's inserts replace nothing: only its deletes look a row up.
            let ops = self.batches.get(b).and_then(|batch| batch.column_by_name("_op"));
            let ops = ops.and_then(|o| o.as_string_opt::<i32>());
            for (r, (h, p)) in hashes.iter().zip(parts).enumerate() {
                if index.multiset && ops.is_some_and(|o| o.value(r) != "D") {
                    continue;
                }
                if !index.holds(*p as usize) {
                    out.entry(*p as usize).or_default().insert(*h);
                }
            }
        }
        out
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

/// A table row a multiset's delete removes: its bucket, hash and place.
type Taken = (u32, KeyHash, (u32, u32));

/// An interval folded: what to commit, and the table rows (file, positions) whose
/// values it needs before it can be built.
pub struct Folded {
    truncate: bool,
    /// Keys touched (hash and bucket), in first-touch order, with their final image
    /// (None: deleted).
    latest: Vec<(KeyHash, u32, Option<Image>)>,
    conformed: Vec<RecordBatch>,
    /// A multiset: `latest` holds each row added (equal rows: several entries), and
    /// these the table's rows its deletes removed (bucket, hash, place), one each.
    multiset: Option<Vec<Taken>>,
    /// A multiset's deletes that found no equal row.
    missed: usize,
}

impl Folded {
    /// Table rows whose values carry forward: data file path → positions.
    pub fn needs(&self, index: &KeyIndex) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (_, _, image) in &self.latest {
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

    /// Deletes that found no row to remove (a multiset's: the table should have had one).
    pub fn missed(&self) -> usize {
        self.missed
    }

    pub fn is_empty(&self) -> bool {
        !self.truncate && self.latest.is_empty() && self.multiset.as_ref().is_none_or(Vec::is_empty)
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
        let mut delete = |(f, p): (u32, u32)| {
            deletes
                .entry(index.files[f as usize].clone())
                .or_default()
                .push(i64::from(p))
        };
        match &self.multiset {
            _ if self.truncate => {}
            Some(taken) => taken.iter().for_each(|(_, _, at)| delete(*at)),
            None => {
                for (key, part, _) in &self.latest {
                    if let Some(at) = index.get(*part, *key) {
                        delete(at);
                    }
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
        let images: Vec<&Image> = self.latest.iter().filter_map(|(_, _, i)| i.as_ref()).collect();
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
        match &self.multiset {
            _ if self.truncate => index.clear(),
            Some(taken) => {
                for (part, key, at) in taken {
                    index.remove_at(*part, *key, *at);
                }
            }
            None => {
                for (key, part, _) in &self.latest {
                    index.remove(*part, *key);
                }
            }
        }
        Ok(Commit {
            rows: if rows.num_rows() > 0 { vec![rows] } else { Vec::new() },
            deletes,
            truncate: self.truncate,
            remove: Vec::new(),
            summary: BTreeMap::new(),
            replace: false,
            written: Vec::new(),
        })
    }
}

/// Folds change-log rows (`prepared`: of lake types, with `_op`, `_lsn`, `_seq` and
/// `_unchanged`) in `(_lsn, _seq)` order: each key's last image wins, a delete removes
/// it, a truncate removes everything before it. A value PostgreSQL did not send takes
/// the key's previous image's, from the interval or from the table (`index`, which
/// must hold or have resolved every key of [`Prepared::unheld`]). `rebuild` starts
/// from an empty table (as if the rows followed a truncate).
pub fn fold(schema: &Schema, index: &KeyIndex, prepared: Prepared<'_>, rebuild: bool) -> Result<Folded, FoldError> {
    let Prepared {
        batches,
        conformed,
        hashes,
        parts,
    } = prepared;
    let mut order: Vec<(i64, i64, usize, usize)> = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let column = |n: &str| batch.column_by_name(n).ok_or_else(|| FoldError::Missing(n.into()));
        let lsn = column("_lsn")?.as_primitive::<Int64Type>();
        let seq = column("_seq")?.as_primitive::<Int64Type>();
        for r in 0..batch.num_rows() {
            order.push((lsn.value(r), seq.value(r), b, r));
        }
    }
    order.sort_unstable();
    if index.multiset {
        return Ok(fold_multiset(
            index, batches, conformed, &hashes, &parts, &order, rebuild,
        ));
    }
    let arrow = schema.arrow_schema();
    let mut truncate = rebuild;
    let mut slot: HashMap<KeyHash, usize> = HashMap::new();
    let mut latest: Vec<(KeyHash, u32, Option<Image>)> = Vec::new();
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
        let (key, part) = (hashes[b][r], parts[b][r]);
        let at = *slot.entry(key).or_insert_with(|| {
            latest.push((key, part, None));
            deleted.push(false);
            latest.len() - 1
        });
        if op == "D" {
            let prev = match latest[at].2.take() {
                Some(image) => Some(Prev::Image(image)),
                None if !truncate && !deleted[at] => index.get(part, key).map(|(f, p)| Prev::Table(f, p)),
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
                let previous = match &latest[at].2 {
                    Some(prev) => Some(prev.source_of(c)),
                    None if !truncate && !deleted[at] => index.get(part, key).map(|(f, p)| Source::Table(f, p)),
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
        latest[at].2 = Some(image);
    }
    Ok(Folded {
        truncate,
        latest,
        conformed,
        multiset: None,
        missed: 0,
    })
}

/// [`fold`] of a table whose rows are identified by all their columns, as a multiset:
/// an insert adds a row, a delete removes one row equal to its image (one added in the
/// interval, else one of the table's), a truncate removes everything before it. An
/// update is a delete and an insert in the change log.
fn fold_multiset(
    index: &KeyIndex,
    batches: &[RecordBatch],
    conformed: Vec<RecordBatch>,
    hashes: &[Vec<KeyHash>],
    parts: &[Vec<u32>],
    order: &[(i64, i64, usize, usize)],
    rebuild: bool,
) -> Folded {
    let mut truncate = rebuild;
    let mut latest: Vec<(KeyHash, u32, Option<Image>)> = Vec::new();
    // Rows added in the interval and still live, by hash (indices into `latest`).
    let mut added: HashMap<KeyHash, Vec<usize>> = HashMap::new();
    // The table's rows taken by deletes, and how many of each hash so far.
    let mut taken = Vec::new();
    let mut taken_of: HashMap<KeyHash, usize> = HashMap::new();
    let mut missed = 0;
    for &(_, _, b, r) in order {
        let op = batches[b]
            .column_by_name("_op")
            .and_then(|o| o.as_string_opt::<i32>())
            .map_or("", |o| o.value(r));
        let (h, part) = (hashes[b][r], parts[b][r]);
        match op {
            "T" => {
                truncate = true;
                latest.clear();
                added.clear();
                taken.clear();
                taken_of.clear();
            }
            "D" => {
                if let Some(i) = added.get_mut(&h).and_then(Vec::pop) {
                    latest[i].2 = None;
                } else if !truncate {
                    let k = taken_of.entry(h).or_default();
                    // A row the table does not have (it predates the lake, with no
                    // copy) is not there to remove.
                    if let Some(at) = index.nth(part, h, *k) {
                        *k += 1;
                        taken.push((part, h, at));
                    } else {
                        missed += 1;
                    }
                }
            }
            // An update of a table keyed by all its columns that kept the key (`SET a =
            // a`): the row is as it was. (Under REPLICA IDENTITY FULL every update is a
            // `D` and an `I`.)
            "U" => {}
            _ => {
                added.entry(h).or_default().push(latest.len());
                latest.push((
                    h,
                    part,
                    Some(Image {
                        row: (b, r),
                        carried: Vec::new(),
                    }),
                ));
            }
        }
    }
    Folded {
        truncate,
        latest,
        conformed,
        multiset: Some(taken),
        missed,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field};

    use super::*;
    use crate::batch::schema::{LakeColumn, LakeSchema};
    use crate::iceberg::metadata::PartitionField;

    fn index(buckets: u32, max_bytes: u64) -> KeyIndex {
        let memory = IndexMemory::new(max_bytes);
        let lake = LakeSchema {
            columns: [("id", true), ("px", false)]
                .into_iter()
                .map(|(name, key)| LakeColumn {
                    name: name.into(),
                    arrow_type: "Int64".into(),
                    pg_type_oid: 20,
                    pg_type_modifier: -1,
                    dropped: false,
                    key,
                })
                .collect(),
        };
        let (schema, _) = Schema::for_lake(&lake).unwrap();
        let spec = PartitionSpec {
            spec_id: 0,
            fields: vec![PartitionField {
                source_id: 1,
                field_id: 1000,
                name: "id_bucket".into(),
                transform: format!("bucket[{buckets}]"),
            }],
        };
        KeyIndex::new(&schema, &spec, memory).unwrap()
    }

    fn keys(ids: impl IntoIterator<Item = i64>) -> RecordBatch {
        let field = Field::new("id", DataType::Int64, false);
        RecordBatch::try_new(
            Arc::new(arrow::datatypes::Schema::new(vec![field])),
            vec![Arc::new(Int64Array::from_iter_values(ids))],
        )
        .unwrap()
    }

    fn hash(index: &KeyIndex, id: i64) -> (u32, KeyHash) {
        let rows = keys([id]);
        (index.parts_of(&rows).unwrap()[0], index.hashes_of(&rows).unwrap()[0])
    }

    /// Keys of one bucket, as [`KeyIndex::add_file`] is given them: (id, part).
    fn in_bucket(index: &KeyIndex, part: u32, n: usize) -> Vec<i64> {
        (0..).filter(|i| hash(index, *i).0 == part).take(n).collect()
    }

    #[test]
    fn keys_are_found_moved_and_removed() {
        let mut index = index(4, u64::MAX);
        let ids = in_bucket(&index, 1, 100);
        index.add_file("a", 1, &keys(ids.clone()), &HashSet::from([3])).unwrap();
        assert_eq!(index.len(), 99, "a deleted position is not live");
        let (part, h) = hash(&index, ids[5]);
        assert_eq!(
            index.get(part, h).map(|(f, p)| (index.files[f as usize].as_str(), p)),
            Some(("a", 5))
        );
        let (_, gone) = hash(&index, ids[3]);
        assert_eq!(index.get(part, gone), None);

        // Moved: a later file's place wins; removed: gone until added again.
        index
            .add_file("b", 1, &keys([ids[5], ids[3]]), &HashSet::new())
            .unwrap();
        assert_eq!(
            index.get(part, h).map(|(f, p)| (index.files[f as usize].as_str(), p)),
            Some(("b", 0))
        );
        assert_eq!(index.get(part, gone).map(|(_, p)| p), Some(1));
        index.remove(part, h);
        assert_eq!(index.get(part, h), None);
        assert_eq!(index.len(), 99);
        index.add_file("c", 1, &keys([ids[7]]), &HashSet::new()).unwrap();
        assert_eq!(
            index.len(),
            99,
            "a merge drops the removed key and keeps the moved one once"
        );
        assert_eq!(
            index.parts[1].as_ref().unwrap().entries.len(),
            99,
            "the merge left no removed entry behind"
        );
    }

    #[test]
    fn equal_rows_of_a_multiset_are_several_and_go_one_at_a_time() {
        let mut part = Part::default();
        let e = |h: u64, file: u32, pos: u32| (0, h, pack(file, pos));
        part.insert(vec![e(7, 0, 0), e(7, 0, 1), e(3, 0, 2)], false);
        part.insert(vec![e(7, 1, 0)], false);
        let h: KeyHash = 7;
        assert_eq!(part.nth(h, 0), Some((0, 0)));
        assert_eq!(part.nth(h, 2), Some((1, 0)), "a later file's equal row is kept beside");
        assert_eq!(part.nth(h, 3), None);
        part.remove_at(h, (0, 1));
        assert_eq!(part.nth(h, 1), Some((1, 0)), "the one removed is skipped");
        part.insert(vec![e(3, 1, 1)], true);
        assert_eq!(part.nth(3, 0), Some((1, 1)), "a key moves when replacing");
        assert_eq!(part.nth(3, 1), None);
        assert_eq!(part.entries.len(), 3, "the merge dropped the removed and the moved");
    }

    #[test]
    fn buckets_beyond_the_bound_are_let_go_and_looked_up() {
        // Room for 150 keys: two buckets of 100 do not fit.
        let mut index = index(4, 150 * ENTRY_BYTES);
        let first = in_bucket(&index, 0, 100);
        let second = in_bucket(&index, 2, 100);
        index.add_file("a", 0, &keys(first.clone()), &HashSet::new()).unwrap();
        index.add_file("b", 2, &keys(second.clone()), &HashSet::new()).unwrap();
        assert_eq!(index.held(), (4, 4));
        assert_eq!(index.shed(), 1, "the largest bucket goes");
        assert!(index.bytes() <= 150 * ENTRY_BYTES);
        let (part, h) = hash(&index, second[9]);
        let gone = if index.holds(part as usize) { 0 } else { part as usize };
        let kept = if gone == 0 { 2 } else { 0 };
        assert!(index.holds(kept) && !index.holds(gone));

        // A bucket not held: its keys are looked up from its files for an interval.
        let batch = keys([second[9], first[9]]);
        let prepared = Prepared {
            batches: &[],
            conformed: Vec::new(),
            hashes: vec![index.hashes_of(&batch).unwrap()],
            parts: vec![index.parts_of(&batch).unwrap()],
        };
        let unheld = prepared.unheld(&index);
        assert_eq!(unheld.len(), 1);
        assert_eq!(unheld[&gone].len(), 1);
        index.resolve(h, "b", 9);
        if gone == 2 {
            assert_eq!(index.get(part, h).map(|(_, p)| p), Some(9));
        }
        index.settle();
        assert_eq!(index.get(2, hash(&index, second[9]).1).is_some(), index.holds(2));
        // Adding to a bucket not held keeps nothing.
        let before = index.bytes();
        index
            .add_file("z", gone, &keys(in_bucket(&index, gone as u32, 10)), &HashSet::new())
            .unwrap();
        assert_eq!(index.bytes(), before);

        // A truncate: every bucket held again, empty; files forgotten are used again.
        index.clear();
        assert_eq!(index.held(), (4, 4));
        assert!(index.is_empty());
        let a = index.file_id("x");
        index.forget([&"x".to_owned()]);
        assert_eq!(index.file_id("y"), a, "a forgotten file's id is used again");
    }
}
