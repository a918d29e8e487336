//! The lake schema of a table: every column it has ever had, with the widest type its
//! files hold. A Relation message is checked against it: added columns join, dropped
//! ones stay (null in newer files), a widening (int2 → int4 → int8, float4 → float8,
//! numeric(p,s) → numeric(p',s) with p' ≥ p, varchar(n) → text) widens, and any other
//! change of a column's type is refused: files already written hold the old type and a
//! reader sees one type per column. A renamed column is a drop and an add.

use super::value::Kind;
use crate::decode::{Column, Relation, ReplicaIdentity};

/// One column of a lake table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LakeColumn {
    pub name: String,
    /// The Arrow type of the column in the newest files (`DataType`'s display form).
    pub arrow_type: String,
    pub pg_type_oid: u32,
    pub pg_type_modifier: i32,
    /// No longer sent by PostgreSQL: null in files written since.
    #[serde(default)]
    pub dropped: bool,
    /// Part of the replica identity key (the primary key; every column under REPLICA
    /// IDENTITY FULL). Lakes written before this was recorded read as `false`.
    #[serde(default)]
    pub key: bool,
}

/// `_walshore/schemas/{schema.table}.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LakeSchema {
    pub columns: Vec<LakeColumn>,
}

/// A change to a column's type that is not a widening.
#[derive(Debug)]
pub struct Incompatible {
    pub column: String,
    pub from: String,
    pub to: String,
}

fn widens(from: &Kind, to: &Kind) -> bool {
    use Kind::*;
    match (from, to) {
        (a, b) if a == b => true,
        (Int16, Int32 | Int64) | (Int32, Int64) | (Float32, Float64) => true,
        (
            Decimal {
                precision: p1,
                scale: s1,
            },
            Decimal {
                precision: p2,
                scale: s2,
            },
        ) => s1 == s2 && p2 >= p1,
        (List(a), List(b)) => widens(a, b),
        _ => false,
    }
}

impl LakeSchema {
    /// The schema after `rel`, or the first column whose type changed incompatibly.
    /// `None` when nothing changed.
    pub fn merge(&self, rel: &Relation) -> Result<Option<LakeSchema>, Incompatible> {
        let mut next = self.clone();
        for c in &mut next.columns {
            c.dropped = !rel.columns.iter().any(|r| r.name == c.name);
        }
        for r in &rel.columns {
            let kind = Kind::for_type(r.type_oid, r.type_modifier);
            let arrow_type = kind.data_type().to_string();
            match next.columns.iter_mut().find(|c| c.name == r.name) {
                None => next.columns.push(LakeColumn {
                    name: r.name.clone(),
                    arrow_type,
                    pg_type_oid: r.type_oid,
                    pg_type_modifier: r.type_modifier,
                    dropped: false,
                    key: r.key,
                }),
                Some(c) => {
                    let old = Kind::for_type(c.pg_type_oid, c.pg_type_modifier);
                    if !widens(&old, &kind) {
                        return Err(Incompatible {
                            column: r.name.clone(),
                            from: old.data_type().to_string(),
                            to: arrow_type,
                        });
                    }
                    c.arrow_type = arrow_type;
                    c.pg_type_oid = r.type_oid;
                    c.pg_type_modifier = r.type_modifier;
                    c.key = r.key;
                }
            }
        }
        Ok((next != *self).then_some(next))
    }

    /// [`LakeSchema::merge`] with the live columns of a schema built elsewhere (from
    /// a copy, or a batcher that did not know this table's history).
    pub fn merge_schema(&self, newer: &LakeSchema) -> Result<Option<LakeSchema>, Incompatible> {
        let rel = Relation {
            id: 0,
            namespace: String::new(),
            name: String::new(),
            replica_identity: ReplicaIdentity::Default,
            columns: newer
                .columns
                .iter()
                .filter(|c| !c.dropped)
                .map(|c| Column {
                    name: c.name.clone(),
                    type_oid: c.pg_type_oid,
                    type_modifier: c.pg_type_modifier,
                    key: c.key,
                })
                .collect(),
        };
        self.merge(&rel)
    }
}
