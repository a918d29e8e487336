//! Iceberg v2 table metadata (`metadata/v{N}.metadata.json`), as the spec's
//! "Table Metadata Fields" lists it and Java validates it on load.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schema::Schema;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PartitionField {
    pub source_id: i32,
    pub field_id: i32,
    pub name: String,
    pub transform: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PartitionSpec {
    pub spec_id: i32,
    pub fields: Vec<PartitionField>,
}

impl PartitionSpec {
    /// The bucket count of the spec's one field, if it has one.
    pub fn buckets(&self) -> Option<u32> {
        self.fields.first().and_then(|f| {
            f.transform
                .strip_prefix("bucket[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SortOrder {
    pub order_id: i32,
    pub fields: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Snapshot {
    pub snapshot_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<i64>,
    pub sequence_number: i64,
    pub timestamp_ms: i64,
    pub manifest_list: String,
    pub summary: BTreeMap<String, String>,
    pub schema_id: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotRef {
    pub snapshot_id: i64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotLogEntry {
    pub snapshot_id: i64,
    pub timestamp_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetadataLogEntry {
    pub metadata_file: String,
    pub timestamp_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TableMetadata {
    pub format_version: u8,
    pub table_uuid: String,
    pub location: String,
    pub last_sequence_number: i64,
    pub last_updated_ms: i64,
    pub last_column_id: i32,
    pub schemas: Vec<Schema>,
    pub current_schema_id: i32,
    pub partition_specs: Vec<PartitionSpec>,
    pub default_spec_id: i32,
    pub last_partition_id: i32,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_snapshot_id: Option<i64>,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    #[serde(default)]
    pub snapshot_log: Vec<SnapshotLogEntry>,
    #[serde(default)]
    pub metadata_log: Vec<MetadataLogEntry>,
    pub sort_orders: Vec<SortOrder>,
    pub default_sort_order_id: i32,
    #[serde(default)]
    pub refs: BTreeMap<String, SnapshotRef>,
}

impl TableMetadata {
    pub fn current_schema(&self) -> &Schema {
        self.schemas
            .iter()
            .find(|s| s.schema_id == self.current_schema_id)
            .expect("current-schema-id names a schema (checked on load)")
    }

    pub fn default_spec(&self) -> &PartitionSpec {
        self.partition_specs
            .iter()
            .find(|s| s.spec_id == self.default_spec_id)
            .expect("default-spec-id names a spec (checked on load)")
    }

    pub fn current_snapshot(&self) -> Option<&Snapshot> {
        let id = self.current_snapshot_id.filter(|id| *id != -1)?;
        self.snapshots.iter().find(|s| s.snapshot_id == id)
    }

    /// What a reader of ours needs to hold true before it trusts the file.
    pub fn check(&self) -> Result<(), String> {
        if self.format_version != 2 {
            return Err(format!("format-version {} (walshore writes 2)", self.format_version));
        }
        if !self.schemas.iter().any(|s| s.schema_id == self.current_schema_id) {
            return Err(format!("current-schema-id {} names no schema", self.current_schema_id));
        }
        if !self.partition_specs.iter().any(|s| s.spec_id == self.default_spec_id) {
            return Err(format!("default-spec-id {} names no spec", self.default_spec_id));
        }
        if let Some(id) = self.current_snapshot_id.filter(|id| *id != -1)
            && self.current_snapshot().is_none()
        {
            return Err(format!("current-snapshot-id {id} names no snapshot"));
        }
        Ok(())
    }
}
