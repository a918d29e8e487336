//! Iceberg v2 manifests and manifest lists: Avro container files whose every field
//! carries its `field-id` (readers bind by id, not by name), maps written as arrays of
//! key/value records marked `logicalType: map`, deflate-compressed as Java writes them.
//!
//! The schemas are built from JSON and then given back the `logicalType` of their
//! map-arrays, which `apache-avro`'s parser drops (a unit test holds the written header
//! to it).

use std::collections::HashMap;

use apache_avro::schema::{ArraySchema, RecordSchema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::{Codec, DeflateSettings, Reader, Schema as AvroSchema, Writer};
use serde_json::json;

use super::metadata::PartitionSpec;
use super::schema::Schema;

/// `data_file.content`.
pub const DATA: i32 = 0;
pub const POSITION_DELETES: i32 = 1;

/// `manifest_entry.status`.
pub const EXISTING: i32 = 0;
pub const ADDED: i32 = 1;
pub const DELETED: i32 = 2;

/// A data or position-delete file as a manifest lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct DataFile {
    pub content: i32,
    /// Fully qualified.
    pub path: String,
    /// The bucket, when the spec has one.
    pub partition: Option<i32>,
    pub record_count: i64,
    pub file_size: i64,
    pub value_counts: Vec<(i32, i64)>,
    pub null_value_counts: Vec<(i32, i64)>,
    pub lower_bounds: Vec<(i32, Vec<u8>)>,
    pub upper_bounds: Vec<(i32, Vec<u8>)>,
    /// For a position-delete file: the one data file whose rows it deletes.
    pub referenced_data_file: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    pub status: i32,
    /// Null in an ADDED entry: inherited from the manifest list.
    pub snapshot_id: Option<i64>,
    pub sequence_number: Option<i64>,
    pub file_sequence_number: Option<i64>,
    pub file: DataFile,
}

/// A partition field's summary over a manifest's entries.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldSummary {
    pub contains_null: bool,
    pub lower_bound: Option<Vec<u8>>,
    pub upper_bound: Option<Vec<u8>>,
}

/// A manifest as a manifest list names it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestFile {
    pub path: String,
    pub length: i64,
    pub spec_id: i32,
    /// 0 data, 1 deletes.
    pub content: i32,
    pub sequence_number: i64,
    pub min_sequence_number: i64,
    pub added_snapshot_id: i64,
    pub added_files_count: i32,
    pub existing_files_count: i32,
    pub deleted_files_count: i32,
    pub added_rows_count: i64,
    pub existing_rows_count: i64,
    pub deleted_rows_count: i64,
    pub partitions: Vec<FieldSummary>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("Avro: {0}")]
    Avro(#[from] Box<apache_avro::Error>),
    #[error("{what}: field {field} is missing or of another type")]
    Field { what: &'static str, field: &'static str },
}

impl From<apache_avro::Error> for ManifestError {
    fn from(e: apache_avro::Error) -> Self {
        ManifestError::Avro(Box::new(e))
    }
}

fn optional(t: serde_json::Value) -> serde_json::Value {
    json!(["null", t])
}

/// An Iceberg map<int, V> as Avro writes it: an array of key/value records.
fn int_map(key_id: i32, value_id: i32, value: &str) -> serde_json::Value {
    json!({"type": "array", "logicalType": "map", "items": {
    "type": "record", "name": format!("k{key_id}_v{value_id}"), "fields": [
        {"name": "key", "type": "int", "field-id": key_id},
        {"name": "value", "type": value, "field-id": value_id},
    ]}})
}

fn field(name: &str, id: i32, t: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "type": t, "field-id": id})
}

fn optional_field(name: &str, id: i32, t: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "type": optional(t), "default": null, "field-id": id})
}

/// The manifest entry schema for a partition spec (the `partition` record holds one
/// optional int per bucket field).
fn manifest_schema(spec: &PartitionSpec) -> AvroSchema {
    let partition_fields: Vec<_> = spec
        .fields
        .iter()
        .map(|f| optional_field(&f.name, f.field_id, json!("int")))
        .collect();
    let data_file = json!({"type": "record", "name": "r2", "fields": [
        field("content", 134, json!("int")),
        field("file_path", 100, json!("string")),
        field("file_format", 101, json!("string")),
        field("partition", 102, json!({"type": "record", "name": "r102", "fields": partition_fields})),
        field("record_count", 103, json!("long")),
        field("file_size_in_bytes", 104, json!("long")),
        optional_field("column_sizes", 108, int_map(117, 118, "long")),
        optional_field("value_counts", 109, int_map(119, 120, "long")),
        optional_field("null_value_counts", 110, int_map(121, 122, "long")),
        optional_field("nan_value_counts", 137, int_map(138, 139, "long")),
        optional_field("lower_bounds", 125, int_map(126, 127, "bytes")),
        optional_field("upper_bounds", 128, int_map(129, 130, "bytes")),
        optional_field("key_metadata", 131, json!("bytes")),
        optional_field("split_offsets", 132, json!({"type": "array", "items": "long", "element-id": 133})),
        optional_field("equality_ids", 135, json!({"type": "array", "items": "int", "element-id": 136})),
        optional_field("sort_order_id", 140, json!("int")),
        optional_field("referenced_data_file", 143, json!("string")),
    ]});
    let entry = json!({"type": "record", "name": "manifest_entry", "fields": [
        field("status", 0, json!("int")),
        optional_field("snapshot_id", 1, json!("long")),
        optional_field("sequence_number", 3, json!("long")),
        optional_field("file_sequence_number", 4, json!("long")),
        field("data_file", 2, data_file),
    ]});
    with_maps(AvroSchema::parse(&entry).expect("the manifest entry schema parses"))
}

fn manifest_list_schema() -> AvroSchema {
    let summary = json!({"type": "record", "name": "r508", "fields": [
        field("contains_null", 509, json!("boolean")),
        optional_field("contains_nan", 518, json!("boolean")),
        optional_field("lower_bound", 510, json!("bytes")),
        optional_field("upper_bound", 511, json!("bytes")),
    ]});
    let list = json!({"type": "record", "name": "manifest_file", "fields": [
        field("manifest_path", 500, json!("string")),
        field("manifest_length", 501, json!("long")),
        field("partition_spec_id", 502, json!("int")),
        field("content", 517, json!("int")),
        field("sequence_number", 515, json!("long")),
        field("min_sequence_number", 516, json!("long")),
        field("added_snapshot_id", 503, json!("long")),
        field("added_files_count", 504, json!("int")),
        field("existing_files_count", 505, json!("int")),
        field("deleted_files_count", 506, json!("int")),
        field("added_rows_count", 512, json!("long")),
        field("existing_rows_count", 513, json!("long")),
        field("deleted_rows_count", 514, json!("long")),
        optional_field("partitions", 507, json!({"type": "array", "element-id": 508, "items": summary})),
        optional_field("key_metadata", 519, json!("bytes")),
    ]});
    AvroSchema::parse(&list).expect("the manifest list schema parses")
}

/// `s` with `logicalType: map` put back on every array of `k{id}_v{id}` records.
fn with_maps(s: AvroSchema) -> AvroSchema {
    match s {
        AvroSchema::Record(mut r) => {
            for f in &mut r.fields {
                f.schema = with_maps(std::mem::replace(&mut f.schema, AvroSchema::Null));
            }
            AvroSchema::Record(RecordSchema { ..r })
        }
        AvroSchema::Union(u) => AvroSchema::Union(
            UnionSchema::new(u.variants().iter().cloned().map(with_maps).collect())
                .expect("a union rebuilt from its own variants"),
        ),
        AvroSchema::Array(mut a) => {
            if matches!(&*a.items, AvroSchema::Record(r) if r.name.name().starts_with('k') && r.name.name().contains("_v"))
            {
                a.attributes.insert("logicalType".into(), json!("map"));
            }
            AvroSchema::Array(ArraySchema { ..a })
        }
        other => other,
    }
}

fn union(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn pairs<T: Clone>(kv: &[(i32, T)], f: impl Fn(T) -> Value) -> Value {
    if kv.is_empty() {
        return union(None);
    }
    union(Some(Value::Array(
        kv.iter()
            .map(|(k, v)| Value::Record(vec![("key".into(), Value::Int(*k)), ("value".into(), f(v.clone()))]))
            .collect(),
    )))
}

fn entry_value(spec: &PartitionSpec, e: &ManifestEntry) -> Value {
    let f = &e.file;
    let partition = spec
        .fields
        .iter()
        .map(|p| (p.name.clone(), union(f.partition.map(Value::Int))))
        .collect();
    let data_file = Value::Record(vec![
        ("content".into(), Value::Int(f.content)),
        ("file_path".into(), Value::String(f.path.clone())),
        ("file_format".into(), Value::String("PARQUET".into())),
        ("partition".into(), Value::Record(partition)),
        ("record_count".into(), Value::Long(f.record_count)),
        ("file_size_in_bytes".into(), Value::Long(f.file_size)),
        ("column_sizes".into(), union(None)),
        ("value_counts".into(), pairs(&f.value_counts, Value::Long)),
        ("null_value_counts".into(), pairs(&f.null_value_counts, Value::Long)),
        ("nan_value_counts".into(), union(None)),
        ("lower_bounds".into(), pairs(&f.lower_bounds, Value::Bytes)),
        ("upper_bounds".into(), pairs(&f.upper_bounds, Value::Bytes)),
        ("key_metadata".into(), union(None)),
        ("split_offsets".into(), union(None)),
        ("equality_ids".into(), union(None)),
        // Data files are unsorted (order 0); delete files carry none.
        (
            "sort_order_id".into(),
            union((f.content == DATA).then_some(Value::Int(0))),
        ),
        (
            "referenced_data_file".into(),
            union(f.referenced_data_file.clone().map(Value::String)),
        ),
    ]);
    Value::Record(vec![
        ("status".into(), Value::Int(e.status)),
        ("snapshot_id".into(), union(e.snapshot_id.map(Value::Long))),
        ("sequence_number".into(), union(e.sequence_number.map(Value::Long))),
        (
            "file_sequence_number".into(),
            union(e.file_sequence_number.map(Value::Long)),
        ),
        ("data_file".into(), data_file),
    ])
}

fn deflate() -> Codec {
    Codec::Deflate(DeflateSettings::default())
}

/// A manifest of `entries` (all data or all deletes, as `content` says), written with
/// `schema` and `spec` in its header.
pub fn write_manifest(
    schema: &Schema,
    spec: &PartitionSpec,
    content: i32,
    entries: &[ManifestEntry],
) -> Result<Vec<u8>, ManifestError> {
    let avro = manifest_schema(spec);
    let mut w = Writer::with_codec(&avro, Vec::new(), deflate())?;
    let header = [
        ("schema", serde_json::to_string(schema).expect("a schema serializes")),
        ("schema-id", schema.schema_id.to_string()),
        (
            "partition-spec",
            serde_json::to_string(&spec.fields).expect("a spec serializes"),
        ),
        ("partition-spec-id", spec.spec_id.to_string()),
        ("format-version", "2".into()),
        ("content", if content == DATA { "data" } else { "deletes" }.into()),
    ];
    for (k, v) in header {
        w.add_user_metadata(k.into(), v)?;
    }
    for e in entries {
        w.append_value(entry_value(spec, e))?;
    }
    Ok(w.into_inner()?)
}

/// The manifest list of a snapshot.
pub fn write_manifest_list(
    snapshot_id: i64,
    parent: Option<i64>,
    sequence_number: i64,
    manifests: &[ManifestFile],
) -> Result<Vec<u8>, ManifestError> {
    let avro = manifest_list_schema();
    let mut w = Writer::with_codec(&avro, Vec::new(), deflate())?;
    let header = [
        ("snapshot-id", snapshot_id.to_string()),
        ("parent-snapshot-id", parent.map_or("null".into(), |p| p.to_string())),
        ("sequence-number", sequence_number.to_string()),
        ("format-version", "2".into()),
    ];
    for (k, v) in header {
        w.add_user_metadata(k.into(), v)?;
    }
    for m in manifests {
        let partitions = m
            .partitions
            .iter()
            .map(|s| {
                Value::Record(vec![
                    ("contains_null".into(), Value::Boolean(s.contains_null)),
                    ("contains_nan".into(), union(Some(Value::Boolean(false)))),
                    ("lower_bound".into(), union(s.lower_bound.clone().map(Value::Bytes))),
                    ("upper_bound".into(), union(s.upper_bound.clone().map(Value::Bytes))),
                ])
            })
            .collect();
        w.append_value(Value::Record(vec![
            ("manifest_path".into(), Value::String(m.path.clone())),
            ("manifest_length".into(), Value::Long(m.length)),
            ("partition_spec_id".into(), Value::Int(m.spec_id)),
            ("content".into(), Value::Int(m.content)),
            ("sequence_number".into(), Value::Long(m.sequence_number)),
            ("min_sequence_number".into(), Value::Long(m.min_sequence_number)),
            ("added_snapshot_id".into(), Value::Long(m.added_snapshot_id)),
            ("added_files_count".into(), Value::Int(m.added_files_count)),
            ("existing_files_count".into(), Value::Int(m.existing_files_count)),
            ("deleted_files_count".into(), Value::Int(m.deleted_files_count)),
            ("added_rows_count".into(), Value::Long(m.added_rows_count)),
            ("existing_rows_count".into(), Value::Long(m.existing_rows_count)),
            ("deleted_rows_count".into(), Value::Long(m.deleted_rows_count)),
            ("partitions".into(), union(Some(Value::Array(partitions)))),
            ("key_metadata".into(), union(None)),
        ]))?;
    }
    Ok(w.into_inner()?)
}

/// A record's fields by name, unions unwrapped (a null branch reads as absent).
fn fields(v: Value, what: &'static str) -> Result<HashMap<String, Value>, ManifestError> {
    match v {
        Value::Record(f) => Ok(f
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::Union(_, inner) if *inner == Value::Null => None,
                Value::Union(_, inner) => Some((k, *inner)),
                Value::Null => None,
                v => Some((k, v)),
            })
            .collect()),
        _ => Err(ManifestError::Field {
            what,
            field: "(record)",
        }),
    }
}

struct Fields {
    what: &'static str,
    map: HashMap<String, Value>,
}

impl Fields {
    fn new(v: Value, what: &'static str) -> Result<Fields, ManifestError> {
        Ok(Fields {
            what,
            map: fields(v, what)?,
        })
    }
    fn missing(&self, field: &'static str) -> ManifestError {
        ManifestError::Field { what: self.what, field }
    }
    fn int(&self, f: &'static str) -> Result<i32, ManifestError> {
        match self.map.get(f) {
            Some(Value::Int(v)) => Ok(*v),
            _ => Err(self.missing(f)),
        }
    }
    fn long(&self, f: &'static str) -> Result<i64, ManifestError> {
        self.opt_long(f)?.ok_or_else(|| self.missing(f))
    }
    fn opt_long(&self, f: &'static str) -> Result<Option<i64>, ManifestError> {
        match self.map.get(f) {
            Some(Value::Long(v)) => Ok(Some(*v)),
            None => Ok(None),
            _ => Err(self.missing(f)),
        }
    }
    fn string(&self, f: &'static str) -> Result<String, ManifestError> {
        self.opt_string(f)?.ok_or_else(|| self.missing(f))
    }
    fn opt_string(&self, f: &'static str) -> Result<Option<String>, ManifestError> {
        match self.map.get(f) {
            Some(Value::String(v)) => Ok(Some(v.clone())),
            None => Ok(None),
            _ => Err(self.missing(f)),
        }
    }
    fn opt_bytes(&self, f: &'static str) -> Result<Option<Vec<u8>>, ManifestError> {
        match self.map.get(f) {
            Some(Value::Bytes(v)) => Ok(Some(v.clone())),
            None => Ok(None),
            _ => Err(self.missing(f)),
        }
    }
    fn take(&mut self, f: &'static str) -> Option<Value> {
        self.map.remove(f)
    }
    fn pairs<T>(&mut self, f: &'static str, conv: impl Fn(Value) -> Option<T>) -> Result<Vec<(i32, T)>, ManifestError> {
        let Some(Value::Array(items)) = self.take(f) else {
            return Ok(Vec::new());
        };
        items
            .into_iter()
            .map(|item| {
                let kv = Fields::new(item, self.what)?;
                let value = kv
                    .map
                    .get("value")
                    .cloned()
                    .and_then(&conv)
                    .ok_or_else(|| self.missing(f))?;
                Ok((kv.int("key")?, value))
            })
            .collect()
    }
}

/// The manifests a manifest list names.
pub fn read_manifest_list(bytes: &[u8]) -> Result<Vec<ManifestFile>, ManifestError> {
    let mut out = Vec::new();
    for v in Reader::new(bytes)? {
        let mut m = Fields::new(v?, "manifest list")?;
        let partitions = match m.take("partitions") {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|s| {
                    let s = Fields::new(s, "manifest list partitions")?;
                    Ok(FieldSummary {
                        contains_null: matches!(s.map.get("contains_null"), Some(Value::Boolean(true))),
                        lower_bound: s.opt_bytes("lower_bound")?,
                        upper_bound: s.opt_bytes("upper_bound")?,
                    })
                })
                .collect::<Result<_, ManifestError>>()?,
            _ => Vec::new(),
        };
        out.push(ManifestFile {
            path: m.string("manifest_path")?,
            length: m.long("manifest_length")?,
            spec_id: m.int("partition_spec_id")?,
            content: m.int("content")?,
            sequence_number: m.long("sequence_number")?,
            min_sequence_number: m.long("min_sequence_number")?,
            added_snapshot_id: m.long("added_snapshot_id")?,
            added_files_count: m.int("added_files_count")?,
            existing_files_count: m.int("existing_files_count")?,
            deleted_files_count: m.int("deleted_files_count")?,
            added_rows_count: m.long("added_rows_count")?,
            existing_rows_count: m.long("existing_rows_count")?,
            deleted_rows_count: m.long("deleted_rows_count")?,
            partitions,
        });
    }
    Ok(out)
}

/// The entries of a manifest, sequence numbers of ADDED entries inherited from `list`'s
/// entry for it, as readers do.
pub fn read_manifest(bytes: &[u8], list: &ManifestFile) -> Result<Vec<ManifestEntry>, ManifestError> {
    let mut out = Vec::new();
    for v in Reader::new(bytes)? {
        let mut e = Fields::new(v?, "manifest entry")?;
        let status = e.int("status")?;
        let inherit = |own: Option<i64>, from: i64| if status == ADDED { own.or(Some(from)) } else { own };
        let snapshot_id = inherit(e.opt_long("snapshot_id")?, list.added_snapshot_id);
        let sequence_number = inherit(e.opt_long("sequence_number")?, list.sequence_number);
        let file_sequence_number = inherit(e.opt_long("file_sequence_number")?, list.sequence_number);
        let data_file = e.take("data_file").ok_or_else(|| e.missing("data_file"))?;
        let mut f = Fields::new(data_file, "data file")?;
        let partition = match f.take("partition") {
            Some(p) => Fields::new(p, "partition")?
                .map
                .into_values()
                .find_map(|v| if let Value::Int(b) = v { Some(b) } else { None }),
            None => None,
        };
        let long = |v: Value| if let Value::Long(x) = v { Some(x) } else { None };
        let bytes = |v: Value| if let Value::Bytes(x) = v { Some(x) } else { None };
        out.push(ManifestEntry {
            status,
            snapshot_id,
            sequence_number,
            file_sequence_number,
            file: DataFile {
                content: f.int("content")?,
                path: f.string("file_path")?,
                partition,
                record_count: f.long("record_count")?,
                file_size: f.long("file_size_in_bytes")?,
                value_counts: f.pairs("value_counts", long)?,
                null_value_counts: f.pairs("null_value_counts", long)?,
                lower_bounds: f.pairs("lower_bounds", bytes)?,
                upper_bounds: f.pairs("upper_bounds", bytes)?,
                referenced_data_file: f.opt_string("referenced_data_file")?,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iceberg::metadata::PartitionField;

    fn spec() -> PartitionSpec {
        PartitionSpec {
            spec_id: 0,
            fields: vec![PartitionField {
                source_id: 1,
                field_id: 1000,
                name: "id_bucket".into(),
                transform: "bucket[16]".into(),
            }],
        }
    }

    fn schema() -> Schema {
        serde_json::from_value(json!({"type": "struct", "schema-id": 0, "fields": [
            {"id": 1, "name": "id", "required": true, "type": "long"}]}))
        .unwrap()
    }

    #[test]
    fn the_header_keeps_field_ids_and_map_arrays() {
        let bytes = write_manifest(&schema(), &spec(), DATA, &[]).unwrap();
        // The header as written (a parser of it would drop `logicalType` again).
        let avro_schema = String::from_utf8_lossy(&bytes).into_owned();
        let reader = Reader::new(&bytes[..]).unwrap();
        assert_eq!(
            avro_schema.matches("\"logicalType\":\"map\"").count(),
            6,
            "{avro_schema}"
        );
        assert!(avro_schema.contains("\"field-id\":1000"), "{avro_schema}");
        assert!(avro_schema.contains("\"element-id\":133"), "{avro_schema}");
        let meta = reader.user_metadata();
        assert_eq!(meta["content"], b"data");
        assert_eq!(meta["format-version"], b"2");
        assert_eq!(
            std::str::from_utf8(&meta["partition-spec"]).unwrap(),
            r#"[{"source-id":1,"field-id":1000,"name":"id_bucket","transform":"bucket[16]"}]"#
        );
    }

    #[test]
    fn entries_and_lists_read_back_as_written() {
        let file = DataFile {
            content: POSITION_DELETES,
            path: "s3://b/t/data/x.parquet".into(),
            partition: Some(7),
            record_count: 3,
            file_size: 1234,
            value_counts: vec![(2147483545, 3)],
            null_value_counts: vec![],
            lower_bounds: vec![(2147483546, b"s3://b/t/data/y.parquet".to_vec())],
            upper_bounds: vec![(2147483546, b"s3://b/t/data/y.parquet".to_vec())],
            referenced_data_file: Some("s3://b/t/data/y.parquet".into()),
        };
        let added = ManifestEntry {
            status: ADDED,
            snapshot_id: None,
            sequence_number: None,
            file_sequence_number: None,
            file: file.clone(),
        };
        let gone = ManifestEntry {
            status: DELETED,
            snapshot_id: Some(5),
            sequence_number: Some(2),
            file_sequence_number: Some(2),
            file: DataFile {
                partition: None,
                ..file.clone()
            },
        };
        let bytes = write_manifest(&schema(), &spec(), POSITION_DELETES, &[added, gone.clone()]).unwrap();
        let listed = ManifestFile {
            path: "s3://b/t/metadata/m.avro".into(),
            length: bytes.len() as i64,
            spec_id: 0,
            content: 1,
            sequence_number: 9,
            min_sequence_number: 2,
            added_snapshot_id: 77,
            added_files_count: 1,
            existing_files_count: 0,
            deleted_files_count: 1,
            added_rows_count: 3,
            existing_rows_count: 0,
            deleted_rows_count: 3,
            partitions: vec![FieldSummary {
                contains_null: true,
                lower_bound: Some(7i32.to_le_bytes().to_vec()),
                upper_bound: Some(7i32.to_le_bytes().to_vec()),
            }],
        };
        let back = read_manifest(&bytes, &listed).unwrap();
        assert_eq!(back[0].snapshot_id, Some(77));
        assert_eq!(back[0].sequence_number, Some(9));
        assert_eq!(back[0].file, file);
        assert_eq!(back[1], gone);
        let list = write_manifest_list(77, Some(5), 9, std::slice::from_ref(&listed)).unwrap();
        assert_eq!(read_manifest_list(&list).unwrap(), vec![listed]);
    }
}
