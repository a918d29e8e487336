//! Iceberg schemas of current-state tables, and the lake's Arrow types mapped onto them.
//!
//! | lake (Arrow) | Iceberg | Parquet as written |
//! |---|---|---|
//! | Boolean | boolean | BOOLEAN |
//! | Int16, Int32 | int | INT32 (an Int16 column is widened) |
//! | Int64 | long | INT64 |
//! | Float32 / Float64 | float / double | FLOAT / DOUBLE |
//! | Decimal128(p,s) | decimal(p,s) | DECIMAL(p,s) |
//! | Utf8 (text, uuid, json, numeric without typmod, …) | string | BYTE_ARRAY UTF8 |
//! | Binary | binary | BYTE_ARRAY |
//! | Date32 | date | INT32 DATE |
//! | Timestamp(µs) / Timestamp(µs, UTC) | timestamp / timestamptz | INT64 TIMESTAMP(MICROS) |
//! | List(x) | list\<x\> | 3-level LIST |
//!
//! Every Parquet column carries its Iceberg field id: readers find columns by id, never
//! by name.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef, TimeUnit};
use parquet::arrow::PARQUET_FIELD_ID_META_KEY;
use serde::{Deserialize, Serialize};

use crate::batch::schema::LakeSchema;

/// The two columns every current-state row carries after its source columns: the commit
/// LSN and commit time of the row's last change.
pub const LSN: &str = "_lsn";
pub const COMMIT_TS: &str = "_commit_ts";

/// An Iceberg type as the table metadata writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Type {
    Primitive(String),
    List(ListType),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ListType {
    /// Always `"list"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub element_id: i32,
    pub element_required: bool,
    pub element: Box<Type>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestedField {
    pub id: i32,
    pub name: String,
    pub required: bool,
    #[serde(rename = "type")]
    pub ty: Type,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Schema {
    /// Always `"struct"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub schema_id: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifier_field_ids: Vec<i32>,
    pub fields: Vec<NestedField>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("column {column}: the lake type {ty} has no Iceberg type")]
    Unmapped { column: String, ty: String },
    #[error(
        "the primary key changed from {from:?} to {to:?}: an Iceberg table keeps its identifier fields and partition"
    )]
    KeyChanged { from: Vec<String>, to: Vec<String> },
}

/// The Iceberg type of a lake column, taking ids for nested fields from `next_id`.
fn iceberg_type(column: &str, t: &DataType, next_id: &mut i32) -> Result<Type, SchemaError> {
    let p = |s: &str| Ok(Type::Primitive(s.to_owned()));
    match t {
        DataType::Boolean => p("boolean"),
        DataType::Int16 | DataType::Int32 => p("int"),
        DataType::Int64 => p("long"),
        DataType::Float32 => p("float"),
        DataType::Float64 => p("double"),
        DataType::Decimal128(precision, scale) => p(&format!("decimal({precision},{scale})")),
        DataType::Utf8 => p("string"),
        DataType::Binary => p("binary"),
        DataType::Date32 => p("date"),
        DataType::Timestamp(TimeUnit::Microsecond, None) => p("timestamp"),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => p("timestamptz"),
        DataType::List(element) => {
            let element_id = *next_id;
            *next_id += 1;
            Ok(Type::List(ListType {
                kind: "list".into(),
                element_id,
                element_required: false,
                element: Box::new(iceberg_type(column, element.data_type(), next_id)?),
            }))
        }
        other => Err(SchemaError::Unmapped {
            column: column.to_owned(),
            ty: other.to_string(),
        }),
    }
}

/// Whether `from` widens to `to` as Iceberg v2 allows: int → long, float → double,
/// decimal(p,s) → decimal(p',s) with p' > p, and the same for a list's elements.
fn promotes(from: &Type, to: &Type) -> bool {
    match (from, to) {
        (Type::List(a), Type::List(b)) => {
            a.element_id == b.element_id && (a.element == b.element || promotes(&a.element, &b.element))
        }
        (Type::Primitive(a), Type::Primitive(b)) => match (a.as_str(), b.as_str()) {
            ("int", "long") | ("float", "double") => true,
            (a, b) => match (decimal(a), decimal(b)) {
                (Some((p1, s1)), Some((p2, s2))) => s1 == s2 && p2 > p1,
                _ => false,
            },
        },
        _ => false,
    }
}

fn decimal(t: &str) -> Option<(u8, i8)> {
    let (p, s) = t.strip_prefix("decimal(")?.strip_suffix(')')?.split_once(',')?;
    Some((p.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// The Arrow type an Iceberg type is written as.
fn arrow_type(t: &Type) -> DataType {
    match t {
        Type::List(l) => {
            let element = Field::new("element", arrow_type(&l.element), !l.element_required)
                .with_metadata(field_id(l.element_id));
            DataType::List(Arc::new(element))
        }
        Type::Primitive(p) => match p.as_str() {
            "boolean" => DataType::Boolean,
            "int" => DataType::Int32,
            "long" => DataType::Int64,
            "float" => DataType::Float32,
            "double" => DataType::Float64,
            "string" => DataType::Utf8,
            "binary" => DataType::Binary,
            "date" => DataType::Date32,
            "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
            "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            other => {
                let (p, s) = decimal(other).unwrap_or_else(|| panic!("an Iceberg type walshore writes: {other}"));
                DataType::Decimal128(p, s)
            }
        },
    }
}

fn field_id(id: i32) -> HashMap<String, String> {
    HashMap::from([(PARQUET_FIELD_ID_META_KEY.to_owned(), id.to_string())])
}

/// How the rows of a table are identified in its Iceberg table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// By the primary key (the identifier fields).
    Key,
    /// By the whole row, as a multiset: a table whose every column is its replica
    /// identity (`REPLICA IDENTITY FULL`), or that has none (insert-only).
    Row,
    /// A key Iceberg cannot identify rows by (a float or list column): not projected.
    Unsupported,
}

impl Identity {
    pub fn of(lake: &LakeSchema) -> Identity {
        let live: Vec<_> = lake.columns.iter().filter(|c| !c.dropped).collect();
        if live.iter().all(|c| c.key) || !live.iter().any(|c| c.key) {
            return Identity::Row;
        }
        match Schema::for_lake(lake) {
            Ok((s, _)) if !s.identifier_field_ids.is_empty() => Identity::Key,
            _ => Identity::Unsupported,
        }
    }
}

impl Schema {
    /// The first schema of a table whose change log has `lake`'s columns: its live
    /// columns in order (ids from 1), then `_lsn` and `_commit_ts`. The key columns are
    /// the identifier fields, required, unless every column is a key column (a table
    /// with `REPLICA IDENTITY FULL`, whose columns may be null) or a key column has a
    /// type Iceberg cannot identify rows by (float, list). Returns the schema and the
    /// last column id it assigned.
    pub fn for_lake(lake: &LakeSchema) -> Result<(Schema, i32), SchemaError> {
        let live: Vec<_> = lake.columns.iter().filter(|c| !c.dropped).collect();
        let keyed = live.iter().any(|c| c.key)
            && !live.iter().all(|c| c.key)
            && live
                .iter()
                .filter(|c| c.key)
                .all(|c| !matches!(c.arrow_type.as_str(), "Float32" | "Float64") && !c.arrow_type.starts_with("List"));
        let mut next_id = 1 + live.len() as i32 + 2;
        let mut fields = Vec::new();
        let mut identifier_field_ids = Vec::new();
        for (i, c) in live.iter().enumerate() {
            let id = 1 + i as i32;
            let t: DataType = c.arrow_type.parse().map_err(|_| SchemaError::Unmapped {
                column: c.name.clone(),
                ty: c.arrow_type.clone(),
            })?;
            let required = keyed && c.key;
            if required {
                identifier_field_ids.push(id);
            }
            fields.push(NestedField {
                id,
                name: c.name.clone(),
                required,
                ty: iceberg_type(&c.name, &t, &mut next_id)?,
            });
        }
        let n = live.len() as i32;
        fields.push(NestedField {
            id: n + 1,
            name: LSN.into(),
            required: true,
            ty: Type::Primitive("long".into()),
        });
        fields.push(NestedField {
            id: n + 2,
            name: COMMIT_TS.into(),
            required: false,
            ty: Type::Primitive("timestamptz".into()),
        });
        let schema = Schema {
            kind: "struct".into(),
            schema_id: 0,
            identifier_field_ids,
            fields,
        };
        Ok((schema, next_id - 1))
    }

    /// The schema after the lake's columns changed, or None if they did not: a column
    /// added to the source joins with new ids (after `last_column_id`, which is
    /// returned advanced), optional, before `_lsn`; a dropped one leaves (its id is never
    /// used again); a widened one (int → long, float → double, a decimal's precision up,
    /// the same within a list) keeps its id with the wider type. A change Iceberg cannot
    /// express is an error (the lake refuses those itself).
    pub fn evolve(&self, lake: &LakeSchema, last_column_id: i32) -> Result<Option<(Schema, i32)>, SchemaError> {
        // Rows are identified and bucketed by the key: a table whose key changed is
        // built anew (the caller says how), never folded under the old key.
        let from = self.identifier_names();
        let to: Vec<String> = lake
            .columns
            .iter()
            .filter(|c| !c.dropped && c.key)
            .map(|c| c.name.clone())
            .collect();
        // A table identified by the whole row that gained a key: its updates are no
        // longer a delete and an insert of whole rows.
        let keyed_now = from.is_empty() && Identity::of(lake) == Identity::Key;
        if (!from.is_empty() && from != to) || keyed_now {
            return Err(SchemaError::KeyChanged { from, to });
        }
        let mut next_id = last_column_id + 1;
        let mut fields = Vec::new();
        for c in lake.columns.iter().filter(|c| !c.dropped) {
            let t: DataType = c.arrow_type.parse().map_err(|_| SchemaError::Unmapped {
                column: c.name.clone(),
                ty: c.arrow_type.clone(),
            })?;
            match self.field(&c.name) {
                Some(f) => {
                    // Nested ids stay: map the type with the old ids, then check.
                    let mut old_next = match &f.ty {
                        Type::List(l) => l.element_id,
                        Type::Primitive(_) => 0,
                    };
                    let ty = iceberg_type(&c.name, &t, &mut old_next)?;
                    if ty != f.ty && !promotes(&f.ty, &ty) {
                        return Err(SchemaError::Unmapped {
                            column: c.name.clone(),
                            ty: format!("{} (from {:?}: not a promotion Iceberg allows)", c.arrow_type, f.ty),
                        });
                    }
                    fields.push(NestedField { ty, ..f.clone() });
                }
                None => {
                    let id = next_id;
                    next_id += 1;
                    fields.push(NestedField {
                        id,
                        name: c.name.clone(),
                        required: false,
                        ty: iceberg_type(&c.name, &t, &mut next_id)?,
                    });
                }
            }
        }
        for name in [LSN, COMMIT_TS] {
            if let Some(f) = self.field(name) {
                fields.push(f.clone());
            }
        }
        if fields == self.fields {
            return Ok(None);
        }
        let identifier_field_ids = self
            .identifier_field_ids
            .iter()
            .copied()
            .filter(|id| fields.iter().any(|f| f.id == *id))
            .collect();
        let schema = Schema {
            kind: "struct".into(),
            schema_id: self.schema_id + 1,
            identifier_field_ids,
            fields,
        };
        Ok(Some((schema, next_id - 1)))
    }

    /// The Arrow schema of this table's data files, every field with its field id.
    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::new(ArrowSchema::new(
            self.fields
                .iter()
                .map(|f| Field::new(&f.name, arrow_type(&f.ty), !f.required).with_metadata(field_id(f.id)))
                .collect::<Vec<_>>(),
        ))
    }

    /// The identifier fields' names, in key order.
    pub fn identifier_names(&self) -> Vec<String> {
        self.identifier_field_ids
            .iter()
            .filter_map(|id| self.fields.iter().find(|f| f.id == *id))
            .map(|f| f.name.clone())
            .collect()
    }

    pub fn field(&self, name: &str) -> Option<&NestedField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// `rows` (columns named as the schema's, of lake types) as a batch of this schema:
    /// each column cast to the type it is written as (Int16 to Int32), missing columns
    /// null.
    pub fn conform(&self, rows: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
        self.conform_to(rows, self.arrow_schema())
    }

    /// [`Schema::conform`] with every column nullable: change-log rows, whose truncate
    /// rows have no key.
    pub fn conform_log(&self, rows: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
        let strict = self.arrow_schema();
        let fields: Vec<Field> = strict
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        self.conform_to(rows, Arc::new(ArrowSchema::new(fields)))
    }

    fn conform_to(&self, rows: &RecordBatch, schema: SchemaRef) -> Result<RecordBatch, arrow::error::ArrowError> {
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| match rows.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
                Some(c) => arrow::compute::cast(c, f.data_type()),
                None => Ok(arrow::array::new_null_array(f.data_type(), rows.num_rows())),
            })
            .collect::<Result<_, _>>()?;
        RecordBatch::try_new(schema, columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::schema::LakeColumn;

    fn column(name: &str, arrow_type: &str, key: bool) -> LakeColumn {
        LakeColumn {
            name: name.into(),
            arrow_type: arrow_type.into(),
            pg_type_oid: 0,
            pg_type_modifier: -1,
            dropped: false,
            key,
        }
    }

    #[test]
    fn lake_columns_map_to_iceberg_types_with_ids() {
        let mut lake = LakeSchema {
            columns: vec![
                column("id", "Int64", true),
                column("qty", "Int16", false),
                column("px", "Decimal128(18, 6)", false),
                column("tags", "List(Utf8)", false),
                column("gone", "Utf8", false),
                column("at", "Timestamp(µs, \"UTC\")", false),
            ],
        };
        lake.columns[4].dropped = true;
        let (schema, last) = Schema::for_lake(&lake).unwrap();
        let json = serde_json::to_value(&schema).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "struct", "schema-id": 0, "identifier-field-ids": [1],
                "fields": [
                    {"id": 1, "name": "id", "required": true, "type": "long"},
                    {"id": 2, "name": "qty", "required": false, "type": "int"},
                    {"id": 3, "name": "px", "required": false, "type": "decimal(18,6)"},
                    {"id": 4, "name": "tags", "required": false,
                     "type": {"type": "list", "element-id": 8, "element-required": false, "element": "string"}},
                    {"id": 5, "name": "at", "required": false, "type": "timestamptz"},
                    {"id": 6, "name": "_lsn", "required": true, "type": "long"},
                    {"id": 7, "name": "_commit_ts", "required": false, "type": "timestamptz"},
                ]
            })
        );
        assert_eq!(last, 8);
        let back: Schema = serde_json::from_value(json).unwrap();
        assert_eq!(back, schema);
        let arrow = schema.arrow_schema();
        assert_eq!(arrow.field(1).data_type(), &DataType::Int32);
        assert_eq!(arrow.field(0).metadata()[PARQUET_FIELD_ID_META_KEY], "1");
        assert!(!arrow.field(0).is_nullable());
        match arrow.field(3).data_type() {
            DataType::List(e) => assert_eq!(e.metadata()[PARQUET_FIELD_ID_META_KEY], "8"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn added_dropped_and_widened_columns_evolve_the_schema() {
        let mut lake = LakeSchema {
            columns: vec![
                column("id", "Int32", true),
                column("qty", "Int16", false),
                column("px", "Decimal128(10, 2)", false),
                column("old", "Utf8", false),
            ],
        };
        let (schema, last) = Schema::for_lake(&lake).unwrap();
        assert_eq!(schema.evolve(&lake, last).unwrap(), None, "nothing changed");
        lake.columns[0].arrow_type = "Int64".into();
        lake.columns[2].arrow_type = "Decimal128(12, 2)".into();
        lake.columns[3].dropped = true;
        lake.columns.push(column(
            "tags",
            &DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))).to_string(),
            false,
        ));
        let (next, next_last) = schema.evolve(&lake, last).unwrap().unwrap();
        let ids: Vec<(i32, &str)> = next.fields.iter().map(|f| (f.id, f.name.as_str())).collect();
        assert_eq!(
            ids,
            [
                (1, "id"),
                (2, "qty"),
                (3, "px"),
                (7, "tags"),
                (5, "_lsn"),
                (6, "_commit_ts")
            ]
        );
        assert_eq!(next.fields[0].ty, Type::Primitive("long".into()));
        assert_eq!(next.fields[2].ty, Type::Primitive("decimal(12,2)".into()));
        assert_eq!(next_last, 8, "the list's element took an id too");
        assert_eq!(next.schema_id, 1);
        assert_eq!(next.identifier_field_ids, [1]);
        lake.columns[2].arrow_type = "Decimal128(12, 3)".into();
        assert!(next.evolve(&lake, next_last).is_err(), "a scale change is no promotion");
        lake.columns[2].arrow_type = "Decimal128(12, 2)".into();
        lake.columns[1].key = true;
        let err = next.evolve(&lake, next_last).unwrap_err().to_string();
        assert!(err.contains("primary key changed"), "{err}");
    }

    #[test]
    fn a_table_keyed_by_every_column_has_no_identifier_fields() {
        let lake = LakeSchema {
            columns: vec![column("a", "Utf8", true), column("b", "Float64", true)],
        };
        let (schema, _) = Schema::for_lake(&lake).unwrap();
        assert!(schema.identifier_field_ids.is_empty());
        assert!(schema.fields[..2].iter().all(|f| !f.required));
    }
}
