//! RecordBatch -> Parquet object.
//!
//! Contract:
//! - [`Sink::write`] MUST be atomic per object (a single PUT, or a multipart upload that
//!   the store assembles at its completing request: readers see all or nothing) and
//!   returns what it wrote; publishing is the checkpoint's commit, a separate step.
//! - The key follows from the rows and the writer:
//!   `{schema}/{table}/{partition}/{first}-{last}-{writer}.parquet` where `first` and
//!   `last` are the `(_lsn, _seq)` of the file's first and last rows in fixed-width hex
//!   and `writer` is the tag of the pipeline attempt that wrote it. A file holds exactly
//!   the table's rows of its partition between those positions, so within an attempt the
//!   same key always means the same content and a retry MAY overwrite an object with
//!   identical bytes. Names sort in commit order. The tag keeps the names of two writers
//!   apart (a replay after a restart, a fenced writer that wakes up), so deleting a file
//!   a pending record lists can never remove a file another writer committed.

pub mod recut;
mod store;

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, FieldRef};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowColumnWriter, compute_leaves};
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::batch::{RowPos, TableFile};
use crate::config::{Compression, SinkConfig};
pub use store::{StoreError, open_store};

/// What a write put in the object store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WrittenObject {
    pub key: String,
    /// `schema.table`
    pub table: String,
    pub partition: String,
    pub rows: u64,
    pub bytes: u64,
    pub first: RowPos,
    pub last: RowPos,
    /// Rows per `_op`, for the metrics (not recorded in the log).
    #[serde(skip)]
    pub ops: OpCounts,
}

/// Rows of a file per `_op` value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts(pub [u64; 5]);

impl OpCounts {
    /// The `_op` values, in the order of the counts.
    pub const OPS: [&str; 5] = ["I", "U", "D", "T", "R"];

    /// Counts the `_op` column (the first) of `batch`.
    pub fn of(batch: &arrow::record_batch::RecordBatch) -> OpCounts {
        let mut c = OpCounts::default();
        let Some(ops) = batch
            .column_by_name("_op")
            .and_then(|a| a.as_any().downcast_ref::<arrow::array::StringArray>())
        else {
            return c;
        };
        for op in ops.iter().flatten() {
            if let Some(i) = Self::OPS.iter().position(|o| *o == op) {
                c.0[i] += 1;
            }
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot encode Parquet for {table}: {source}")]
    Encode {
        table: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("cannot write object {key}: {source}")]
    Put {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read object {key} back: {source}")]
    Read {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot list {prefix} in the lake: {source}")]
    List {
        prefix: String,
        #[source]
        source: object_store::Error,
    },
}

impl SinkError {
    pub fn retry(&self) -> crate::retry::Retry {
        match self {
            SinkError::Encode { .. } => crate::retry::Retry::Definite,
            SinkError::Put { source, .. } | SinkError::Read { source, .. } | SinkError::List { source, .. } => {
                crate::retry::of_store(source)
            }
        }
    }
}

/// An encoded file, ready to upload.
pub struct Encoded {
    pub object: WrittenObject,
    pub data: Bytes,
}

/// See `Sink::new`.
const DICTIONARY_PAGE_LIMIT: usize = 128 * 1024;

pub struct Sink {
    store: Arc<dyn ObjectStore>,
    props: WriterProperties,
    part_size: usize,
    /// This attempt's tag in file names.
    writer: String,
}

/// Listings in flight at once in [`partitions_in_lake`].
const LIST_CONCURRENCY: usize = 16;

/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;

fn pos_key(p: RowPos) -> String {
    format!("{}.{:016X}", p.lsn.to_key(), p.seq)
}

/// The path of a key written by [`object_key`] (already encoded: parsed, not encoded
/// again, so that an escaped partition value keeps its `%XX`).
pub fn key_path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// The name of a table file: its first and last rows' positions and its writer.
pub fn file_name(first: RowPos, last: RowPos, writer: &str) -> String {
    format!("{}-{}-{writer}.parquet", pos_key(first), pos_key(last))
}

/// The object key of a table file (relative to the sink's root).
pub fn object_key(schema: &str, table: &str, partition: &str, first: RowPos, last: RowPos, writer: &str) -> Path {
    let name = file_name(first, last, writer);
    // Partition segments come escaped (Hive style, `batch::column_partition`): taken as
    // they are, one segment per `/`.
    let segments = partition
        .split('/')
        .map(|p| PathPart::parse(p).unwrap_or_else(|_| PathPart::from(p)));
    Path::from_iter(
        [PathPart::from(schema), PathPart::from(table)]
            .into_iter()
            .chain(segments)
            .chain([PathPart::from(name.as_str())]),
    )
}

/// The partition folders of `schema.table` in the lake, as the files' partitions are
/// written (`dt=…`, `dt=…/hour=…`, `{column}=…`, escaped), one level per key of `keys`.
/// Listed with a delimiter: a request per thousand folders, not per file. Folders of
/// another partition spec (a table whose `[partitions]` entry changed) are left out.
pub async fn partitions_in_lake(
    store: &dyn ObjectStore,
    schema: &str,
    table: &str,
    keys: &[String],
) -> Result<Vec<String>, SinkError> {
    let base = Path::from_iter([PathPart::from(schema), PathPart::from(table)]);
    let strip = format!("{}/", base.as_ref());
    let mut level = vec![base];
    for key in keys {
        // A level below the first has a folder per date, say: listed 16 at a time.
        // Owned prefixes: a closure over borrowed ones is not provably Send where a
        // spawned task awaits this (rust-lang/rust#102211).
        let listed: Vec<Vec<Path>> = futures::stream::iter(std::mem::take(&mut level))
            .map(|prefix| async move {
                store
                    .list_with_delimiter(Some(&prefix))
                    .await
                    .map(|l| l.common_prefixes)
                    .map_err(|source| SinkError::List {
                        prefix: prefix.to_string(),
                        source,
                    })
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        level = listed
            .into_iter()
            .flatten()
            .filter(|p| {
                p.filename()
                    .is_some_and(|f| f.strip_prefix(key.as_str()).is_some_and(|r| r.starts_with('=')))
            })
            .collect();
    }
    let mut out: Vec<String> = level
        .iter()
        .filter_map(|p| p.as_ref().strip_prefix(&strip).map(str::to_owned))
        .collect();
    out.sort();
    Ok(out)
}

/// A field's column in a row group and its Parquet column writers (index in the row
/// group, writer).
type ColumnJob = (FieldRef, ArrayRef, Vec<(usize, ArrowColumnWriter)>);

/// Rows handed to a column writer at once. Parquet's levels for them are computed in
/// vectors of this length: small enough to come from the allocator's free lists, where
/// a row group's worth (two bytes a row, a vector per column) would be fresh pages,
/// faulted in for every file. The values are those of one write of the whole; pages
/// may end a few rows elsewhere (a 111,000-row trade file came out 0.03% smaller).
const ENCODE_SLICE_ROWS: usize = 16 * 1024;

/// Writes and closes the columns of `jobs`, [`ENCODE_SLICE_ROWS`] at a time.
fn encode_columns(jobs: Vec<ColumnJob>) -> Result<Vec<(usize, ArrowColumnChunk)>, parquet::errors::ParquetError> {
    let mut chunks = Vec::new();
    for (field, column, mut writers) in jobs {
        let mut at = 0;
        while at < column.len() {
            let n = ENCODE_SLICE_ROWS.min(column.len() - at);
            let leaves = compute_leaves(&field, &column.slice(at, n))?;
            if leaves.len() != writers.len() {
                return Err(parquet::errors::ParquetError::General(format!(
                    "column {} has {} Parquet leaves, expected {}",
                    field.name(),
                    leaves.len(),
                    writers.len()
                )));
            }
            for ((_, w), leaf) in writers.iter_mut().zip(leaves) {
                w.write(&leaf)?;
            }
            at += n;
        }
        for (i, w) in writers {
            chunks.push((i, w.close()?));
        }
    }
    Ok(chunks)
}

/// Parquet leaf columns under an Arrow type: one, or its children's.
fn leaf_count(t: &DataType) -> usize {
    match t {
        DataType::Struct(fields) => fields.iter().map(|f| leaf_count(f.data_type())).sum(),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) | DataType::Map(f, _) => {
            leaf_count(f.data_type())
        }
        _ => 1,
    }
}

impl Sink {
    /// `writer`: the attempt's tag in file names (lower-case hex).
    pub fn new(store: Arc<dyn ObjectStore>, cfg: &SinkConfig, writer: &str) -> Sink {
        let compression = match cfg.compression {
            Compression::Zstd => PqCompression::ZSTD(ZstdLevel::try_new(1).expect("level 1 is valid")),
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::None => PqCompression::UNCOMPRESSED,
        };
        // Dictionary encoding pays for repetitive columns (the op, the commit LSN shared
        // by a transaction's rows, symbols); parquet falls back to plain encoding by itself
        // once a column's dictionary passes the page limit. A 128 KiB limit (default
        // 1 MiB) gives up early on unique columns (ids, prices, times), where hashing
        // every value bought nothing. `_seq` never repeats: no dictionary at all.
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(cfg.row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Chunk)
            .set_column_dictionary_enabled(ColumnPath::from("_seq"), false)
            .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT)
            .set_created_by(format!("walshore {}", env!("CARGO_PKG_VERSION")))
            .build();
        Sink {
            store,
            props,
            part_size: cfg.part_size,
            writer: writer.to_owned(),
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Encodes a table file as Parquet. CPU-bound: run it off the async threads. The
    /// columns of each row group are encoded on two threads (the flush after a large
    /// copy or transaction is on the critical path; the machines have 2 cores).
    pub fn encode(props: &WriterProperties, tag: &str, file: &TableFile) -> Result<Encoded, SinkError> {
        let table = format!("{}.{}", file.schema, file.table);
        let err = |source| SinkError::Encode {
            table: table.clone(),
            source,
        };
        let mut buf = Vec::with_capacity(file.batch.get_array_memory_size() / 4);
        let schema = file.batch.schema();
        // ArrowWriter sets up the file (schema, embedded Arrow schema); the row groups
        // are written column by column below.
        let (mut writer, factory) = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props.clone()))
            .and_then(ArrowWriter::into_serialized_writer)
            .map_err(err)?;
        let rows_per_group = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
        let mut offset = 0;
        let mut group = 0;
        while offset < file.batch.num_rows() {
            let len = rows_per_group.min(file.batch.num_rows() - offset);
            let batch = file.batch.slice(offset, len);
            let mut writers = factory
                .create_column_writers(group)
                .map_err(err)?
                .into_iter()
                .enumerate();
            // Each field with its column writers (one per Parquet leaf column), the
            // fields dealt to the two threads in turn.
            let mut jobs: [Vec<ColumnJob>; 2] = [Vec::new(), Vec::new()];
            for (k, (field, column)) in schema.fields().iter().zip(batch.columns()).enumerate() {
                let writers: Vec<_> = writers.by_ref().take(leaf_count(field.data_type())).collect();
                jobs[k % 2].push((field.clone(), column.clone(), writers));
            }
            if writers.next().is_some() {
                return Err(err(parquet::errors::ParquetError::General(
                    "more Parquet columns than the Arrow schema's leaves".into(),
                )));
            }
            let [a, b] = jobs;
            let (ra, rb) = std::thread::scope(|s| {
                let other = s.spawn(|| encode_columns(b));
                (encode_columns(a), other.join().expect("encoder thread panicked"))
            });
            let mut chunks: Vec<_> = ra.map_err(err)?.into_iter().chain(rb.map_err(err)?).collect();
            chunks.sort_by_key(|(i, _)| *i);
            let mut rg = writer.next_row_group().map_err(err)?;
            for (_, chunk) in chunks {
                chunk.append_to_row_group(&mut rg).map_err(err)?;
            }
            rg.close().map_err(err)?;
            offset += len;
            group += 1;
        }
        writer.close().map_err(err)?;
        let key = object_key(&file.schema, &file.table, &file.partition, file.first, file.last, tag);
        Ok(Encoded {
            object: WrittenObject {
                key: key.to_string(),
                table,
                partition: file.partition.clone(),
                rows: file.batch.num_rows() as u64,
                bytes: buf.len() as u64,
                first: file.first,
                last: file.last,
                ops: OpCounts::of(&file.batch),
            },
            data: Bytes::from(buf),
        })
    }

    /// Encodes files off the async threads.
    pub async fn encode_all(&self, files: Vec<TableFile>) -> Result<Vec<Encoded>, SinkError> {
        let props = self.props.clone();
        let writer = self.writer.clone();
        let encoded =
            tokio::task::spawn_blocking(move || files.iter().map(|f| Sink::encode(&props, &writer, f)).collect());
        match encoded.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    pub fn props(&self) -> &WriterProperties {
        &self.props
    }

    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// Uploads one encoded file: a single PUT, or for a file larger than
    /// `sink.part_size` a multipart upload (parts in parallel, each retried by the
    /// store). Either way the object appears whole or not at all.
    pub async fn write(&self, e: Encoded) -> Result<WrittenObject, SinkError> {
        let path = key_path(&e.object.key);
        let err = |source| SinkError::Put {
            key: e.object.key.clone(),
            source,
        };
        if e.data.len() <= self.part_size {
            self.store
                .put(&path, PutPayload::from_bytes(e.data.clone()))
                .await
                .map_err(err)?;
            return Ok(e.object);
        }
        let mut upload = self.store.put_multipart(&path).await.map_err(err)?;
        let parts: Vec<_> = (0..e.data.len())
            .step_by(self.part_size)
            .map(|at| {
                upload.put_part(PutPayload::from_bytes(
                    e.data.slice(at..(at + self.part_size).min(e.data.len())),
                ))
            })
            .collect();
        let uploaded = async {
            let mut parts = futures::stream::iter(parts).buffer_unordered(PART_CONCURRENCY);
            while let Some(done) = futures::StreamExt::next(&mut parts).await {
                done?;
                crate::fault::point("mid_multipart_upload");
            }
            upload.complete().await
        }
        .await;
        if let Err(source) = uploaded {
            // Parts of an unfinished upload are invisible but cost storage: abort it
            // (a crash cannot; the README asks for a lifecycle rule for that case).
            if let Err(abort) = upload.abort().await {
                tracing::warn!(key = %e.object.key, error = %abort, "cannot abort the failed multipart upload; a bucket lifecycle rule removes its parts");
            }
            return Err(err(source));
        }
        Ok(e.object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn partition_folders_one_level_per_key_and_only_of_the_current_spec() {
        let store = InMemory::new();
        for key in [
            "public/trades/dt=2026-11-22/hour=09/a.parquet",
            "public/trades/dt=2026-11-22/hour=10/b.parquet",
            "public/trades/dt=2026-11-23/hour=00/c.parquet",
            // An older spec's folder, and a file at the wrong depth.
            "public/trades/symbol=X/d.parquet",
            "public/trades/dt=2026-11-24/e.parquet",
            "public/prices/symbol=EUR%2FUSD/f.parquet",
        ] {
            store.put(&key_path(key), PutPayload::from_static(b"x")).await.unwrap();
        }
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            partitions_in_lake(&store, "public", "trades", &keys(&["dt", "hour"]))
                .await
                .unwrap(),
            [
                "dt=2026-11-22/hour=09",
                "dt=2026-11-22/hour=10",
                "dt=2026-11-23/hour=00"
            ]
        );
        assert_eq!(
            partitions_in_lake(&store, "public", "trades", &keys(&["dt"]))
                .await
                .unwrap(),
            ["dt=2026-11-22", "dt=2026-11-23", "dt=2026-11-24"]
        );
        assert_eq!(
            partitions_in_lake(&store, "public", "prices", &keys(&["symbol"]))
                .await
                .unwrap(),
            ["symbol=EUR%2FUSD"]
        );
        assert!(
            partitions_in_lake(&store, "public", "none", &keys(&["dt"]))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
