//! One Iceberg table by path: its metadata, and the commit of a snapshot.
//!
//! Layout under the table's location:
//! - `data/{field}={bucket}/{snapshot}-{n}.parquet`: data files;
//! - `data/{field}={bucket}/{snapshot}-{n}-deletes.parquet`: position deletes;
//! - `metadata/{snapshot}-m{k}.avro`, `metadata/snap-{snapshot}.avro`: manifests and
//!   manifest lists;
//! - `metadata/v{N}.metadata.json` and `metadata/version-hint.text` (`N`, no newline).
//!
//! A commit writes new objects only, every one under a name no other commit uses, and
//! publishes them by writing `v{N+1}.metadata.json` if it does not exist yet (a
//! conditional put: a second writer loses, rather than overwriting), then the hint.
//! A crash before the metadata file leaves objects no snapshot names; a crash between
//! the metadata file and the hint leaves a hint one behind, which [`Table::load`] walks
//! past and sets right.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::TryStreamExt;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema as ArrowSchema};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::{ArrowWriter, PARQUET_FIELD_ID_META_KEY};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::bucket::{bucket_of, bucketable};
use super::manifest::{self, DataFile, FieldSummary, ManifestEntry, ManifestFile};
use super::metadata::{
    MetadataLogEntry, PartitionField, PartitionSpec, Snapshot, SnapshotLogEntry, SnapshotRef, SortOrder, TableMetadata,
};
use super::schema::Schema;
use crate::batch::schema::LakeSchema;

/// The snapshot summary keys that carry walshore's watermark: the last commit-log
/// sequence number and commit LSN whose changes the snapshot holds.
pub const WATERMARK_SEQ: &str = "walshore.seq";
pub const WATERMARK_LSN: &str = "walshore.lsn";

/// Manifests carried from snapshot to snapshot before they are merged into one a
/// content (each commit adds up to two).
const MERGE_AT: usize = 8;

/// Metadata files (versions) kept behind the current one, and listed in the current
/// one's `metadata-log`. An older one is deleted once [`METADATA_GRACE`] old, or older
/// than the snapshot retention when that is shorter; never one a catalog may name
/// ([`Table::keep_from`]).
pub const KEEP_METADATA: usize = 16;

/// How long a metadata file this writer replaced stays (unless the retention is
/// shorter): a reader that found it through the hint has read it by then. A table
/// committed every minute for a day otherwise keeps a day of metadata files (each
/// listing the day's snapshots) until the next expiry.
const METADATA_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Position-delete columns, with the field ids the spec reserves for them.
const FILE_PATH_ID: i32 = 2147483546;
const POS_ID: i32 = 2147483545;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("Iceberg table {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("Iceberg table {location}: {what}")]
    Invalid { location: String, what: String },
    #[error(
        "Iceberg table {location}: version {version} was committed by another writer; only one walshore may \
         write a table (stop the other walshore, or the `walshore iceberg rebuild` running beside it)"
    )]
    Conflict { location: String, version: u64 },
    #[error("Iceberg table {location}: {source}")]
    Manifest {
        location: String,
        #[source]
        source: manifest::ManifestError,
    },
    #[error("Iceberg table {location}: writing a Parquet file: {source}")]
    Parquet {
        location: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("Iceberg table {location}: {source}")]
    Arrow {
        location: String,
        #[source]
        source: arrow::error::ArrowError,
    },
}

/// Where a table lives: the store (rooted at the sink), the table's key prefix in it,
/// and the fully qualified location its metadata names.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
    pub uri: String,
}

impl Location {
    fn key(&self, rel: &str) -> Path {
        Path::from(format!("{}/{rel}", self.root))
    }

    fn uri(&self, rel: &str) -> String {
        format!("{}/{rel}", self.uri.trim_end_matches('/'))
    }

    /// The key of a fully qualified path under this location.
    fn key_of(&self, uri: &str) -> Option<Path> {
        uri.strip_prefix(self.uri.trim_end_matches('/'))
            .and_then(|rel| rel.strip_prefix('/'))
            .map(|rel| self.key(rel))
    }

    fn store_err(&self) -> impl Fn(object_store::Error) -> TableError + '_ {
        move |source| TableError::Store {
            location: self.uri.clone(),
            source,
        }
    }

    fn invalid(&self, what: impl Into<String>) -> TableError {
        TableError::Invalid {
            location: self.uri.clone(),
            what: what.into(),
        }
    }

    async fn get(&self, rel_or_uri: &str) -> Result<Bytes, TableError> {
        let key = self.key_of(rel_or_uri).unwrap_or_else(|| self.key(rel_or_uri));
        let got = self.store.get(&key).await.map_err(self.store_err())?;
        got.bytes().await.map_err(self.store_err())
    }

    async fn put(&self, rel: &str, body: Vec<u8>) -> Result<(), TableError> {
        self.store
            .put(&self.key(rel), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(self.store_err())
    }
}

/// A table as its newest metadata file describes it.
pub struct Table {
    location: Location,
    metadata: TableMetadata,
    version: u64,
    /// What `version-hint.text` says (None: missing).
    hinted: Option<u64>,
    /// The current snapshot's manifests.
    manifests: Vec<ManifestFile>,
    /// The versions this writer published and when, oldest first: deleted once
    /// [`KEEP_METADATA`] versions behind and `metadata_grace` old.
    published: std::collections::VecDeque<(u64, std::time::Instant)>,
    /// [`METADATA_GRACE`], but for tests.
    metadata_grace: std::time::Duration,
    /// The oldest version a catalog may name: it and later ones are never deleted.
    kept_from: Option<u64>,
}

/// What a commit changes.
#[derive(Default)]
pub struct Commit {
    /// Rows to add, named as the table's columns (of lake types; cast on write).
    pub rows: Vec<RecordBatch>,
    /// Rows to delete: data file (fully qualified, a live file of the table) → positions.
    pub deletes: BTreeMap<String, Vec<i64>>,
    /// Remove every live file first (a TRUNCATE): the rows are then the whole table.
    pub truncate: bool,
    /// Live files (data or delete) the snapshot removes: a compaction's rewritten ones.
    pub remove: Vec<String>,
    /// Added to the snapshot's summary (the watermark).
    pub summary: BTreeMap<String, String>,
    /// The same rows in other files (a compaction): a `replace` snapshot.
    pub replace: bool,
    /// Data files already written ([`Table::write_ahead`]) that the snapshot adds.
    pub written: Vec<DataFile>,
}

/// What a commit wrote: the new data files, with the bucket and the rows each holds
/// (for a caller's index of where rows live).
pub struct Committed {
    pub snapshot_id: i64,
    pub data_files: Vec<(String, Option<i32>, RecordBatch)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn uuid4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Rows a row group of a data file holds at most: small enough that a point lookup in a
/// compacted (key-sorted) file reads one of several, by the key's min/max statistics
/// and bloom filter.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// How data files are written: ZSTD, row groups of [`ROW_GROUP_ROWS`], and a bloom
/// filter on each of `keys` (sized for the file's `rows`), so that a reader looking up
/// a key skips the row groups without it.
fn writer_properties(keys: &[String], rows: usize) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1 is valid")))
        .set_created_by(format!("walshore {}", env!("CARGO_PKG_VERSION")))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for k in keys {
        let path = parquet::schema::types::ColumnPath::from(k.as_str());
        b = b
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_fpp(path.clone(), 0.01)
            .set_column_bloom_filter_max_ndv(path, rows.clamp(1, ROW_GROUP_ROWS) as u64);
    }
    b.build()
}

fn parquet_bytes(batch: &RecordBatch, keys: &[String]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let props = writer_properties(keys, batch.num_rows());
    let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))?;
    w.write(batch)?;
    w.into_inner()
}

fn position_delete_schema() -> Arc<ArrowSchema> {
    let id = |i: i32| HashMap::from([(PARQUET_FIELD_ID_META_KEY.to_owned(), i.to_string())]);
    Arc::new(ArrowSchema::new(vec![
        Field::new("file_path", DataType::Utf8, false).with_metadata(id(FILE_PATH_ID)),
        Field::new("pos", DataType::Int64, false).with_metadata(id(POS_ID)),
    ]))
}

impl Table {
    /// The table at `location`, if it has been created: the newest metadata file the
    /// hint names or that follows it.
    pub async fn load(location: Location) -> Result<Option<Table>, TableError> {
        let hinted = match location.get("metadata/version-hint.text").await {
            Ok(b) => {
                let text = String::from_utf8_lossy(&b);
                Some(text.trim().parse::<u64>().map_err(|_| {
                    location.invalid(format!("metadata/version-hint.text holds {text:?}, not a version"))
                })?)
            }
            Err(TableError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        // A crash between a metadata file and its hint leaves the hint behind (or, at
        // the creation, absent): walk past it. [`Table::repair_hint`] sets it right.
        let exists = |v: u64| {
            let key = location.key(&format!("metadata/v{v}.metadata.json"));
            let store = location.store.clone();
            async move { store.head(&key).await.is_ok() }
        };
        let mut version = match hinted {
            Some(v) => v,
            None if exists(1).await => 1,
            None => return Ok(None),
        };
        while exists(version + 1).await {
            version += 1;
        }
        let body = location.get(&format!("metadata/v{version}.metadata.json")).await?;
        let metadata: TableMetadata = serde_json::from_slice(&body)
            .map_err(|e| location.invalid(format!("metadata/v{version}.metadata.json: {e}")))?;
        metadata
            .check()
            .map_err(|e| location.invalid(format!("metadata/v{version}.metadata.json: {e}")))?;
        let manifests = match metadata.current_snapshot() {
            None => Vec::new(),
            Some(s) => {
                let list = location.get(&s.manifest_list).await?;
                manifest::read_manifest_list(&list).map_err(|source| TableError::Manifest {
                    location: location.uri.clone(),
                    source,
                })?
            }
        };
        Ok(Some(Table {
            location,
            metadata,
            version,
            hinted,
            manifests,
            published: Default::default(),
            metadata_grace: METADATA_GRACE,
            kept_from: None,
        }))
    }

    /// Writes `version-hint.text` if it lags the newest metadata file (readers by path
    /// go by the hint alone). Only the table's writer calls this.
    pub async fn repair_hint(&mut self) -> Result<(), TableError> {
        if self.hinted != Some(self.version) {
            self.location
                .put("metadata/version-hint.text", self.version.to_string().into_bytes())
                .await?;
            self.hinted = Some(self.version);
        }
        Ok(())
    }

    /// A new, empty table for a change log of `lake`'s columns, partitioned by
    /// `bucket[buckets]` of its first key column (unpartitioned when it has none that
    /// can be bucketed).
    pub async fn create(location: Location, lake: &LakeSchema, buckets: u32) -> Result<Table, TableError> {
        let (schema, last_column_id) = Schema::for_lake(lake).map_err(|e| location.invalid(e.to_string()))?;
        let source = lake
            .columns
            .iter()
            .filter(|c| !c.dropped && c.key)
            .find(|c| c.arrow_type.parse::<DataType>().is_ok_and(|t| bucketable(&t)))
            .and_then(|c| schema.field(&c.name));
        let fields = match source {
            Some(f) if buckets > 1 => vec![PartitionField {
                source_id: f.id,
                field_id: 1000,
                name: format!("{}_bucket", f.name),
                transform: format!("bucket[{buckets}]"),
            }],
            _ => Vec::new(),
        };
        let last_partition_id = if fields.is_empty() { 999 } else { 1000 };
        let properties = [
            ("write.format.default", "parquet"),
            ("write.parquet.compression-codec", "zstd"),
            ("write.delete.mode", "merge-on-read"),
            ("write.update.mode", "merge-on-read"),
            ("write.merge.mode", "merge-on-read"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let metadata = TableMetadata {
            format_version: 2,
            table_uuid: uuid4(),
            location: location.uri.trim_end_matches('/').to_owned(),
            last_sequence_number: 0,
            last_updated_ms: now_ms(),
            last_column_id,
            schemas: vec![schema],
            current_schema_id: 0,
            partition_specs: vec![PartitionSpec { spec_id: 0, fields }],
            default_spec_id: 0,
            last_partition_id,
            properties,
            current_snapshot_id: None,
            snapshots: Vec::new(),
            snapshot_log: Vec::new(),
            metadata_log: Vec::new(),
            sort_orders: vec![SortOrder {
                order_id: 0,
                fields: Vec::new(),
            }],
            default_sort_order_id: 0,
            refs: BTreeMap::new(),
        };
        let mut table = Table {
            location,
            metadata,
            version: 0,
            hinted: None,
            manifests: Vec::new(),
            published: Default::default(),
            metadata_grace: METADATA_GRACE,
            kept_from: None,
        };
        table.publish(table.metadata.clone()).await?;
        Ok(table)
    }

    pub fn metadata(&self) -> &TableMetadata {
        &self.metadata
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The table's location, fully qualified.
    pub fn location_uri(&self) -> &str {
        self.location.uri.trim_end_matches('/')
    }

    /// The current metadata file, fully qualified.
    pub fn metadata_location(&self) -> String {
        self.location.uri(&format!("metadata/v{}.metadata.json", self.version))
    }

    /// Live files of the current snapshot of one content (data or position deletes),
    /// from the manifest list's counts: no manifest is read.
    pub fn live_file_count(&self, content: i32) -> i64 {
        self.manifests
            .iter()
            .filter(|m| m.content == content)
            .map(|m| i64::from(m.added_files_count + m.existing_files_count))
            .sum()
    }

    /// The current snapshot's manifests.
    pub fn manifests(&self) -> &[ManifestFile] {
        &self.manifests
    }

    pub fn schema(&self) -> &Schema {
        self.metadata.current_schema()
    }

    /// The watermark of the current snapshot: `(seq, lsn)` from its summary.
    pub fn watermark(&self) -> Option<(u64, u64)> {
        let s = self.metadata.current_snapshot()?;
        Some((
            s.summary.get(WATERMARK_SEQ)?.parse().ok()?,
            s.summary.get(WATERMARK_LSN)?.parse().ok()?,
        ))
    }

    /// Evolves the table's schema to the lake's columns (a new metadata version, no
    /// snapshot), if they changed. Returns whether they did.
    pub async fn evolve(&mut self, lake: &LakeSchema) -> Result<bool, TableError> {
        let evolved = self
            .schema()
            .evolve(lake, self.metadata.last_column_id)
            .map_err(|e| match e {
                super::schema::SchemaError::KeyChanged { .. } => self.location.invalid(format!(
                    "{e}; delete the table's folder ({}) and the next start builds it anew from the change log",
                    self.location.uri
                )),
                e => self.location.invalid(e.to_string()),
            })?;
        let Some((schema, last_column_id)) = evolved else {
            return Ok(false);
        };
        let mut next = self.metadata.clone();
        next.last_updated_ms = now_ms().max(next.last_updated_ms);
        next.current_schema_id = schema.schema_id;
        next.last_column_id = last_column_id;
        next.schemas.push(schema);
        self.publish(next).await?;
        Ok(true)
    }

    /// Expires the snapshots older than `retention` and those beyond the newest
    /// `max_snapshots` (never the current one), then deletes what no retained snapshot
    /// reaches and is older than `retention`: the expired snapshots' manifest lists,
    /// manifests and files, and files a crashed commit left behind. Metadata files
    /// beyond the last [`KEEP_METADATA`] versions go too, once [`METADATA_GRACE`] old.
    /// Returns the snapshots expired and the objects deleted.
    pub async fn expire(
        &mut self,
        retention: std::time::Duration,
        max_snapshots: usize,
    ) -> Result<(usize, usize), TableError> {
        let now = now_ms();
        let cutoff = now - retention.as_millis() as i64;
        let current = self.metadata.current_snapshot_id;
        let mut kept: Vec<Snapshot> = self
            .metadata
            .snapshots
            .iter()
            .filter(|s| Some(s.snapshot_id) == current || s.timestamp_ms >= cutoff)
            .cloned()
            .collect();
        // The oldest first (by sequence number, the order of commits).
        kept.sort_by_key(|s| s.sequence_number);
        let mut excess = kept.len().saturating_sub(max_snapshots.max(1));
        kept.retain(|s| {
            let expire = excess > 0 && Some(s.snapshot_id) != current;
            excess -= usize::from(expire);
            !expire
        });
        let expired = self.metadata.snapshots.len() - kept.len();
        if expired > 0 {
            let mut next = self.metadata.clone();
            next.last_updated_ms = now.max(next.last_updated_ms);
            next.snapshot_log
                .retain(|e| kept.iter().any(|s| s.snapshot_id == e.snapshot_id));
            next.snapshots = kept;
            self.publish(next).await?;
        }
        let prefix = format!("{}/", self.location.root);
        let objects: Vec<object_store::ObjectMeta> = self
            .location
            .store
            .list(Some(&self.location.root))
            .try_collect()
            .await
            .map_err(self.location.store_err())?;
        // What the retained snapshots reach ...
        let mut reachable: HashSet<String> = HashSet::new();
        for snapshot in &self.metadata.snapshots {
            self.reach(&snapshot.manifest_list, &mut reachable).await?;
        }
        // ... and every manifest list younger than the retention: a snapshot expired
        // by `max_snapshots` (now or in an earlier pass) can still be in a reader's
        // hands, and the files it reaches may be older than it. A list a crashed
        // commit left keeps its files as long; one that cannot be read protects none.
        for o in &objects {
            let key = o.location.to_string();
            let Some(rel) = key.strip_prefix(&prefix) else { continue };
            let young = o.last_modified.timestamp_millis() >= cutoff;
            if !young || !rel.starts_with("metadata/snap-") || !rel.ends_with(".avro") {
                continue;
            }
            let uri = self.location.uri(rel);
            if !reachable.contains(&uri)
                && let Err(e) = self.reach(&uri, &mut reachable).await
            {
                tracing::warn!(list = %uri, error = %e, "an unreferenced Iceberg manifest list could not be read; it protects no files");
            }
        }
        let mut gone = Vec::new();
        // A replaced metadata file needs no snapshot to expire: it goes after the
        // grace, when that is shorter than the retention.
        let metadata_cutoff = cutoff.max(now - self.metadata_grace.as_millis() as i64);
        for o in objects {
            let key = o.location.to_string();
            let Some(rel) = key.strip_prefix(&prefix) else { continue };
            let modified = o.last_modified.timestamp_millis();
            let version = rel
                .strip_prefix("metadata/v")
                .and_then(|r| r.strip_suffix(".metadata.json"))
                .and_then(|v| v.parse::<u64>().ok());
            let unreachable = match version {
                Some(v) => self.replaced(v) && modified < metadata_cutoff,
                None => {
                    rel != "metadata/version-hint.text"
                        && modified < cutoff
                        && !reachable.contains(&self.location.uri(rel))
                }
            };
            if unreachable {
                gone.push(o.location);
            }
        }
        let deleted = gone.len();
        for key in gone {
            match self.location.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.location.store_err()(e)),
            }
        }
        Ok((expired, deleted))
    }

    /// Adds manifest list `list`, its manifests and the files they hold live to
    /// `reachable`.
    async fn reach(&self, list: &str, reachable: &mut HashSet<String>) -> Result<(), TableError> {
        reachable.insert(list.to_owned());
        let body = self.location.get(list).await?;
        let manifests = manifest::read_manifest_list(&body).map_err(|source| TableError::Manifest {
            location: self.location.uri.clone(),
            source,
        })?;
        for m in manifests {
            if !reachable.insert(m.path.clone()) {
                continue;
            }
            let body = self.location.get(&m.path).await?;
            let entries = manifest::read_manifest(&body, &m).map_err(|source| TableError::Manifest {
                location: self.location.uri.clone(),
                source,
            })?;
            reachable.extend(
                entries
                    .into_iter()
                    .filter(|e| e.status != manifest::DELETED)
                    .map(|e| e.file.path),
            );
        }
        Ok(())
    }

    /// An object of the table by its fully qualified path (a data or delete file).
    pub async fn read(&self, uri: &str) -> Result<Bytes, TableError> {
        self.location.get(uri).await
    }

    /// The live entries of the current snapshot (data and position-delete files).
    pub async fn live_files(&self) -> Result<Vec<ManifestEntry>, TableError> {
        Ok(self
            .manifest_entries()
            .await?
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .filter(|e| e.status != manifest::DELETED)
            .collect())
    }

    /// The current snapshot's manifests, each with its entries.
    async fn manifest_entries(&self) -> Result<Vec<(ManifestFile, Vec<ManifestEntry>)>, TableError> {
        let mut out = Vec::with_capacity(self.manifests.len());
        for m in &self.manifests {
            let bytes = self.location.get(&m.path).await?;
            let entries = manifest::read_manifest(&bytes, m).map_err(|source| TableError::Manifest {
                location: self.location.uri.clone(),
                source,
            })?;
            out.push((m.clone(), entries));
        }
        Ok(out)
    }

    /// Writes a manifest of `entries` for this snapshot and returns its list entry.
    async fn write_manifest(
        &self,
        rel: String,
        content: i32,
        entries: &[ManifestEntry],
        sequence_number: i64,
        snapshot_id: i64,
    ) -> Result<ManifestFile, TableError> {
        let spec = self.metadata.default_spec();
        let body =
            manifest::write_manifest(self.schema(), spec, content, entries).map_err(|source| TableError::Manifest {
                location: self.location.uri.clone(),
                source,
            })?;
        let listed = manifest_file(
            self.location.uri(&rel),
            body.len() as i64,
            spec,
            content,
            sequence_number,
            snapshot_id,
            entries,
        );
        self.location.put(&rel, body).await?;
        Ok(listed)
    }

    /// Writes `next` as the next version (the one it replaces listed in its
    /// `metadata-log`, which keeps the last [`KEEP_METADATA`]), points the hint at it,
    /// and deletes the versions this writer replaced that are past keeping.
    async fn publish(&mut self, mut next: TableMetadata) -> Result<(), TableError> {
        let version = self.version + 1;
        if self.version > 0 {
            next.metadata_log.push(MetadataLogEntry {
                metadata_file: self.location.uri(&format!("metadata/v{}.metadata.json", self.version)),
                timestamp_ms: self.metadata.last_updated_ms,
            });
        }
        let excess = next.metadata_log.len().saturating_sub(KEEP_METADATA);
        next.metadata_log.drain(..excess);
        let name = format!("metadata/v{version}.metadata.json");
        let body = serde_json::to_vec(&next).expect("metadata serializes");
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .location
            .store
            .put_opts(&self.location.key(&name), PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(TableError::Conflict {
                    location: self.location.uri.clone(),
                    version,
                });
            }
            Err(e) => return Err(self.location.store_err()(e)),
        }
        crate::fault::point("iceberg_after_metadata");
        self.location
            .put("metadata/version-hint.text", version.to_string().into_bytes())
            .await?;
        self.metadata = next;
        self.version = version;
        self.hinted = Some(version);
        self.published.push_back((version, std::time::Instant::now()));
        while let Some(&(old, at)) = self.published.front() {
            if !self.replaced(old) || at.elapsed() < self.metadata_grace {
                break;
            }
            self.published.pop_front();
            // A failure leaves the file to expiry, which deletes it too.
            let key = self.location.key(&format!("metadata/v{old}.metadata.json"));
            match self.location.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, version = old, "an old Iceberg metadata file could not be deleted; expiry tries again")
                }
            }
        }
        Ok(())
    }

    /// Whether metadata version `v` is past keeping: [`KEEP_METADATA`] versions behind,
    /// and older than the oldest a catalog may name.
    fn replaced(&self, v: u64) -> bool {
        v + (KEEP_METADATA as u64) < self.version && self.kept_from.is_none_or(|k| v < k)
    }

    /// The oldest version a catalog (Glue's `metadata_location`) may name: it and later
    /// versions are never deleted, whatever their age. `Some(0)` keeps every version
    /// (the catalog's is not known yet); None: no catalog.
    pub fn keep_from(&mut self, version: Option<u64>) {
        self.kept_from = version;
    }

    /// How long a replaced metadata file stays ([`METADATA_GRACE`]): for tests.
    pub fn set_metadata_grace(&mut self, grace: std::time::Duration) {
        self.metadata_grace = grace;
    }

    /// The identifier fields' names: the columns data files carry a bloom filter on.
    fn key_names(&self) -> Vec<String> {
        self.schema().identifier_names()
    }

    /// Writes `part` (conformed rows of one bucket) as the data file `rel`.
    async fn put_data(&self, rel: &str, bucket: Option<i32>, part: &RecordBatch) -> Result<DataFile, TableError> {
        let body = parquet_bytes(part, &self.key_names()).map_err(|source| self.parquet_err(source))?;
        let file = DataFile {
            content: manifest::DATA,
            path: self.location.uri(rel),
            partition: bucket,
            record_count: part.num_rows() as i64,
            file_size: body.len() as i64,
            value_counts: Vec::new(),
            null_value_counts: Vec::new(),
            lower_bounds: Vec::new(),
            upper_bounds: Vec::new(),
            referenced_data_file: None,
        };
        self.location.put(rel, body).await?;
        Ok(file)
    }

    /// Writes `rows` as data files ahead of the commit that adds them
    /// ([`Commit::written`]), one a bucket, so that a compaction holds one bucket's rows
    /// at a time. Returns each file with its bucket. A file no commit adds (a crash
    /// between) is deleted by expiry once `snapshot_retention` old.
    pub async fn write_ahead(&self, rows: &RecordBatch) -> Result<Vec<(DataFile, RecordBatch)>, TableError> {
        let rows = self.schema().conform(rows).map_err(|source| self.arrow_err(source))?;
        let tag = rand::random::<u64>() >> 1;
        let mut out = Vec::new();
        for (n, (bucket, part)) in self.by_bucket(&rows)?.into_iter().enumerate() {
            let rel = format!("{}/{tag:019}-w{n}.parquet", self.partition_dir(bucket));
            let file = self.put_data(&rel, bucket, &part).await?;
            out.push((file, part));
        }
        Ok(out)
    }

    /// Rows grouped by bucket of the spec's source column.
    fn by_bucket(&self, batch: &RecordBatch) -> Result<Vec<(Option<i32>, RecordBatch)>, TableError> {
        let spec = self.metadata.default_spec();
        let (Some(n), Some(field)) = (spec.buckets(), spec.fields.first()) else {
            return Ok(vec![(None, batch.clone())]);
        };
        let schema = self.schema();
        let name = &schema
            .fields
            .iter()
            .find(|f| f.id == field.source_id)
            .ok_or_else(|| {
                self.location
                    .invalid(format!("partition source {} is not a column", field.source_id))
            })?
            .name;
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| self.location.invalid(format!("rows without the key column {name}")))?;
        let mut groups: BTreeMap<Option<i32>, Vec<u32>> = BTreeMap::new();
        for i in 0..batch.num_rows() {
            groups
                .entry(bucket_of(column.as_ref(), i, n))
                .or_default()
                .push(i as u32);
        }
        groups
            .into_iter()
            .map(|(b, rows)| {
                let rows = UInt32Array::from(rows);
                let columns: Vec<ArrayRef> = batch
                    .columns()
                    .iter()
                    .map(|c| arrow::compute::take(c.as_ref(), &rows, None))
                    .collect::<Result<_, _>>()
                    .map_err(|source| self.arrow_err(source))?;
                RecordBatch::try_new(batch.schema(), columns)
                    .map(|batch| (b, batch))
                    .map_err(|source| self.arrow_err(source))
            })
            .collect()
    }

    fn arrow_err(&self, source: arrow::error::ArrowError) -> TableError {
        TableError::Arrow {
            location: self.location.uri.clone(),
            source,
        }
    }

    fn parquet_err(&self, source: parquet::errors::ParquetError) -> TableError {
        TableError::Parquet {
            location: self.location.uri.clone(),
            source,
        }
    }

    fn partition_dir(&self, bucket: Option<i32>) -> String {
        match (bucket, self.metadata.default_spec().fields.first()) {
            (Some(b), Some(f)) => format!("data/{}={b}", f.name),
            _ => "data".into(),
        }
    }

    /// Commits one snapshot: the rows as new data files (one a bucket), the deletes as
    /// position-delete files (one per data file they delete from), and, for a
    /// truncate, every live file marked deleted.
    pub async fn commit(&mut self, c: Commit) -> Result<Committed, TableError> {
        let snapshot_id = (rand::random::<u64>() >> 1) as i64;
        let sequence_number = self.metadata.last_sequence_number + 1;
        let schema = self.schema().clone();
        // The current entries, when a removal, a delete or a merge needs them.
        let carried_manifests = self
            .manifests
            .iter()
            .filter(|m| m.added_files_count + m.existing_files_count > 0)
            .count();
        let merge = carried_manifests > MERGE_AT;
        let current = if c.truncate || !c.deletes.is_empty() || !c.remove.is_empty() || merge {
            self.manifest_entries().await?
        } else {
            Vec::new()
        };
        let live: Vec<ManifestEntry> = current
            .iter()
            .flat_map(|(_, e)| e)
            .filter(|e| e.status != manifest::DELETED)
            .cloned()
            .collect();
        let remove: std::collections::HashSet<&str> = c.remove.iter().map(String::as_str).collect();
        if let Some(gone) = c.remove.iter().find(|p| !live.iter().any(|e| &e.file.path == *p)) {
            return Err(self
                .location
                .invalid(format!("a removal of {gone}, which is not a live file")));
        }

        // Data files (and those written ahead).
        let mut data_entries: Vec<ManifestEntry> = c.written.iter().cloned().map(added).collect();
        let mut data_files = Vec::new();
        let mut n = 0;
        for rows in &c.rows {
            let rows = schema.conform(rows).map_err(|source| self.arrow_err(source))?;
            for (bucket, part) in self.by_bucket(&rows)? {
                let rel = format!("{}/{snapshot_id:019}-{n}.parquet", self.partition_dir(bucket));
                n += 1;
                let file = self.put_data(&rel, bucket, &part).await?;
                data_files.push((file.path.clone(), bucket, part));
                data_entries.push(added(file));
            }
        }
        crate::fault::point("iceberg_after_data_files");

        // Position-delete files: one a bucket, its rows sorted by file and position (a
        // reader opens one file a bucket, not one a data file).
        let mut by_bucket: BTreeMap<Option<i32>, Vec<(&str, i64)>> = BTreeMap::new();
        for (target, positions) in &c.deletes {
            let Some(of) = live
                .iter()
                .find(|e| e.file.content == manifest::DATA && &e.file.path == target)
            else {
                return Err(self
                    .location
                    .invalid(format!("a delete from {target}, which is not a live data file")));
            };
            by_bucket
                .entry(of.file.partition)
                .or_default()
                .extend(positions.iter().map(|p| (target.as_str(), *p)));
        }
        let mut delete_entries = Vec::new();
        for (bucket, mut rows) in by_bucket {
            rows.sort_unstable();
            rows.dedup();
            let (Some(first), Some(last)) = (rows.first().copied(), rows.last().copied()) else {
                continue;
            };
            let batch = RecordBatch::try_new(
                position_delete_schema(),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                ],
            )
            .map_err(|source| self.arrow_err(source))?;
            let rel = format!("{}/{snapshot_id:019}-{n}-deletes.parquet", self.partition_dir(bucket));
            n += 1;
            let body = parquet_bytes(&batch, &[]).map_err(|source| self.parquet_err(source))?;
            let positions = |f: fn(&i64, &i64) -> bool| {
                rows.iter()
                    .map(|r| r.1)
                    .reduce(|a, b| if f(&a, &b) { a } else { b })
                    .unwrap_or(0)
            };
            let file = DataFile {
                content: manifest::POSITION_DELETES,
                path: self.location.uri(&rel),
                partition: bucket,
                record_count: rows.len() as i64,
                file_size: body.len() as i64,
                value_counts: vec![(FILE_PATH_ID, rows.len() as i64), (POS_ID, rows.len() as i64)],
                null_value_counts: vec![(FILE_PATH_ID, 0), (POS_ID, 0)],
                lower_bounds: vec![
                    (FILE_PATH_ID, first.0.as_bytes().to_vec()),
                    (POS_ID, positions(|a, b| a <= b).to_le_bytes().to_vec()),
                ],
                upper_bounds: vec![
                    (FILE_PATH_ID, last.0.as_bytes().to_vec()),
                    (POS_ID, positions(|a, b| a >= b).to_le_bytes().to_vec()),
                ],
                referenced_data_file: (first.0 == last.0).then(|| first.0.to_owned()),
            };
            self.location.put(&rel, body).await?;
            delete_entries.push(added(file));
        }
        crate::fault::point("iceberg_after_delete_files");

        // Manifests: the new ones (added files, and removed ones marked deleted); the
        // old ones carried over as they are, or written again without what this
        // snapshot removes (their other entries as existing), or all merged into one a
        // content once there are more than MERGE_AT; none after a truncate.
        let removed: Vec<ManifestEntry> = live
            .iter()
            .filter(|e| c.truncate || remove.contains(e.file.path.as_str()))
            .map(|e| ManifestEntry {
                status: manifest::DELETED,
                snapshot_id: Some(snapshot_id),
                ..e.clone()
            })
            .collect();
        let (removed_data, removed_deletes): (Vec<_>, Vec<_>) =
            removed.iter().cloned().partition(|e| e.file.content == manifest::DATA);
        let mut manifests = Vec::new();
        let mut k = 0;
        let mut rel = || {
            k += 1;
            format!("metadata/{snapshot_id:019}-m{}.avro", k - 1)
        };
        for (content, entries) in [
            (manifest::DATA, [data_entries.clone(), removed_data].concat()),
            (
                manifest::POSITION_DELETES,
                [delete_entries.clone(), removed_deletes].concat(),
            ),
        ] {
            if !entries.is_empty() {
                manifests.push(
                    self.write_manifest(rel(), content, &entries, sequence_number, snapshot_id)
                        .await?,
                );
            }
        }
        if !c.truncate {
            let mut rewrite: [Vec<ManifestEntry>; 2] = [Vec::new(), Vec::new()];
            let loaded: HashMap<&str, &Vec<ManifestEntry>> =
                current.iter().map(|(m, e)| (m.path.as_str(), e)).collect();
            for m in &self.manifests {
                // A manifest whose every entry an older snapshot removed lists nothing live.
                if m.added_files_count + m.existing_files_count == 0 {
                    continue;
                }
                let entries = loaded.get(m.path.as_str());
                let touched = entries.is_some_and(|e| e.iter().any(|e| remove.contains(e.file.path.as_str())));
                match entries {
                    Some(entries) if touched || merge => rewrite[m.content as usize].extend(
                        entries
                            .iter()
                            .filter(|e| e.status != manifest::DELETED && !remove.contains(e.file.path.as_str()))
                            .map(|e| ManifestEntry {
                                status: manifest::EXISTING,
                                ..e.clone()
                            }),
                    ),
                    _ => manifests.push(m.clone()),
                }
            }
            for (content, entries) in [manifest::DATA, manifest::POSITION_DELETES].into_iter().zip(rewrite) {
                if !entries.is_empty() {
                    manifests.push(
                        self.write_manifest(rel(), content, &entries, sequence_number, snapshot_id)
                            .await?,
                    );
                }
            }
        }
        crate::fault::point("iceberg_after_manifests");

        let parent = self.metadata.current_snapshot().map(|s| s.snapshot_id);
        let list =
            manifest::write_manifest_list(snapshot_id, parent, sequence_number, &manifests).map_err(|source| {
                TableError::Manifest {
                    location: self.location.uri.clone(),
                    source,
                }
            })?;
        let list_rel = format!("metadata/snap-{snapshot_id:019}.avro");
        self.location.put(&list_rel, list).await?;
        crate::fault::point("iceberg_after_manifest_list");

        let summary = self.summary(&c, &data_entries, &delete_entries, &removed);
        let now = now_ms().max(self.metadata.last_updated_ms);
        let mut next = self.metadata.clone();
        next.last_sequence_number = sequence_number;
        next.last_updated_ms = now;
        next.current_snapshot_id = Some(snapshot_id);
        next.snapshots.push(Snapshot {
            snapshot_id,
            parent_snapshot_id: parent,
            sequence_number,
            timestamp_ms: now,
            manifest_list: self.location.uri(&list_rel),
            summary,
            schema_id: schema.schema_id,
        });
        next.snapshot_log.push(SnapshotLogEntry {
            snapshot_id,
            timestamp_ms: now,
        });
        next.refs.insert(
            "main".into(),
            SnapshotRef {
                snapshot_id,
                kind: "branch".into(),
            },
        );
        self.publish(next).await?;
        self.manifests = manifests;
        Ok(Committed {
            snapshot_id,
            data_files,
        })
    }

    /// The snapshot summary: the operation, Appendix F's counts, totals carried from
    /// the parent, and the caller's keys.
    fn summary(
        &self,
        c: &Commit,
        data: &[ManifestEntry],
        deletes: &[ManifestEntry],
        removed: &[ManifestEntry],
    ) -> BTreeMap<String, String> {
        let parent = self.metadata.current_snapshot().map(|s| &s.summary);
        let total = |k: &str| -> i64 { parent.and_then(|s| s.get(k)).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let count = |e: &[ManifestEntry], content: i32| e.iter().filter(|e| e.file.content == content).count() as i64;
        let rows = |e: &[ManifestEntry], content: i32| -> i64 {
            e.iter()
                .filter(|e| e.file.content == content)
                .map(|e| e.file.record_count)
                .sum()
        };
        let size = |e: &[ManifestEntry]| -> i64 { e.iter().map(|e| e.file.file_size).sum() };
        let operation = if c.replace || (!c.remove.is_empty() && !c.truncate && deletes.is_empty()) {
            // A compaction: the same rows in fewer files.
            "replace"
        } else {
            match (data.is_empty(), deletes.is_empty() && removed.is_empty()) {
                (_, true) => "append",
                (false, false) => "overwrite",
                (true, false) => "delete",
            }
        };
        let added_records = rows(data, manifest::DATA);
        let deleted_records = rows(removed, manifest::DATA);
        let added_deletes = rows(deletes, manifest::POSITION_DELETES);
        let removed_deletes = rows(removed, manifest::POSITION_DELETES);
        let mut s: BTreeMap<String, String> = [
            ("operation", operation.to_owned()),
            ("added-data-files", count(data, manifest::DATA).to_string()),
            ("deleted-data-files", count(removed, manifest::DATA).to_string()),
            (
                "added-delete-files",
                count(deletes, manifest::POSITION_DELETES).to_string(),
            ),
            (
                "added-position-delete-files",
                count(deletes, manifest::POSITION_DELETES).to_string(),
            ),
            (
                "removed-delete-files",
                count(removed, manifest::POSITION_DELETES).to_string(),
            ),
            (
                "removed-position-delete-files",
                count(removed, manifest::POSITION_DELETES).to_string(),
            ),
            ("added-records", added_records.to_string()),
            ("deleted-records", deleted_records.to_string()),
            ("added-position-deletes", added_deletes.to_string()),
            ("removed-position-deletes", removed_deletes.to_string()),
            ("added-files-size", (size(data) + size(deletes)).to_string()),
            ("removed-files-size", size(removed).to_string()),
            (
                "total-records",
                (total("total-records") + added_records - deleted_records).to_string(),
            ),
            (
                "total-files-size",
                (total("total-files-size") + size(data) + size(deletes) - size(removed)).to_string(),
            ),
            (
                "total-data-files",
                (total("total-data-files") + count(data, manifest::DATA) - count(removed, manifest::DATA)).to_string(),
            ),
            (
                "total-delete-files",
                (total("total-delete-files") + count(deletes, manifest::POSITION_DELETES)
                    - count(removed, manifest::POSITION_DELETES))
                .to_string(),
            ),
            (
                "total-position-deletes",
                (total("total-position-deletes") + added_deletes - removed_deletes).to_string(),
            ),
            ("total-equality-deletes", "0".to_owned()),
            ("engine-name", "walshore".to_owned()),
            ("engine-version", env!("CARGO_PKG_VERSION").to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        s.extend(c.summary.clone());
        s
    }
}

fn added(file: DataFile) -> ManifestEntry {
    ManifestEntry {
        status: manifest::ADDED,
        snapshot_id: None,
        sequence_number: None,
        file_sequence_number: None,
        file,
    }
}

/// The manifest list's entry for a manifest of `entries` written by this snapshot.
fn manifest_file(
    path: String,
    length: i64,
    spec: &PartitionSpec,
    content: i32,
    sequence_number: i64,
    snapshot_id: i64,
    entries: &[ManifestEntry],
) -> ManifestFile {
    let of = |status: i32| entries.iter().filter(move |e| e.status == status);
    let rows = |status: i32| of(status).map(|e| e.file.record_count).sum::<i64>();
    // The smallest data sequence number of a live entry; an added one inherits ours.
    let min_sequence_number = entries
        .iter()
        .filter(|e| e.status != manifest::DELETED)
        .map(|e| e.sequence_number.unwrap_or(sequence_number))
        .min()
        .unwrap_or(sequence_number);
    let partitions = spec
        .fields
        .iter()
        .map(|_| {
            let buckets: Vec<i32> = entries.iter().filter_map(|e| e.file.partition).collect();
            FieldSummary {
                contains_null: entries.iter().any(|e| e.file.partition.is_none()),
                lower_bound: buckets.iter().min().map(|b| b.to_le_bytes().to_vec()),
                upper_bound: buckets.iter().max().map(|b| b.to_le_bytes().to_vec()),
            }
        })
        .collect();
    ManifestFile {
        path,
        length,
        spec_id: spec.spec_id,
        content,
        sequence_number,
        min_sequence_number,
        added_snapshot_id: snapshot_id,
        added_files_count: of(manifest::ADDED).count() as i32,
        existing_files_count: of(manifest::EXISTING).count() as i32,
        deleted_files_count: of(manifest::DELETED).count() as i32,
        added_rows_count: rows(manifest::ADDED),
        existing_rows_count: rows(manifest::EXISTING),
        deleted_rows_count: rows(manifest::DELETED),
        partitions,
    }
}
