//! What pgoutput's Relation message does not say about a column's type, from the
//! catalog: a domain's base type (written as that type), and whether an array column
//! is declared with more than one dimension (written as PostgreSQL's text, since a
//! List column has one depth).

use std::collections::HashMap;

use crate::decode::Relation;

/// The type a column is written as when its values have no fixed Arrow shape: no
/// type (InvalidOid), so that it maps to PostgreSQL's text in both paths, and the copy
/// reads it as text (a multi-dimensional array's binary form is not its text).
pub const WRITTEN_AS_TEXT: u32 = 0;
/// OIDs below this are built-in types, never domains.
const FIRST_NORMAL_OID: u32 = 16384;

/// A column as the catalog describes it now.
struct CatalogColumn {
    ndims: i32,
    /// The base type and its typmod, when the column's type is a domain.
    base: Option<(u32, i32)>,
}

/// `rel` with domain columns as their base type and multi-dimensional array columns as
/// text. Only user-defined types and arrays need the catalog: other relations come back
/// unchanged without a query.
pub async fn resolve(client: &tokio_postgres::Client, rel: &Relation) -> Result<Relation, tokio_postgres::Error> {
    let needs = rel
        .columns
        .iter()
        .any(|c| c.type_oid >= FIRST_NORMAL_OID || crate::batch::is_array(c.type_oid));
    if !needs {
        return Ok(rel.clone());
    }
    // Domains over domains: follow typbasetype to the first non-domain type; the
    // typmod is the outermost domain's that has one.
    let rows = client
        .query(
            "WITH RECURSIVE d(attname, ndims, oid, typmod, depth) AS (
                 SELECT a.attname::text, a.attndims, a.atttypid, a.atttypmod, 0
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
               UNION ALL
                 SELECT d.attname, d.ndims, t.typbasetype,
                        CASE WHEN d.typmod >= 0 THEN d.typmod ELSE t.typtypmod END, d.depth + 1
                 FROM d JOIN pg_catalog.pg_type t ON t.oid = d.oid
                 WHERE t.typtype = 'd' AND d.depth < 16
             )
             SELECT DISTINCT ON (attname) attname, ndims, oid, typmod, depth
             FROM d ORDER BY attname, depth DESC",
            &[&rel.id],
        )
        .await?;
    let catalog: HashMap<String, CatalogColumn> = rows
        .iter()
        .map(|r| {
            let depth: i32 = r.get(4);
            (
                r.get::<_, String>(0),
                CatalogColumn {
                    ndims: r.get(1),
                    base: (depth > 0).then(|| (r.get::<_, u32>(2), r.get::<_, i32>(3))),
                },
            )
        })
        .collect();
    let mut out = rel.clone();
    for c in &mut out.columns {
        let Some(cat) = catalog.get(&c.name) else { continue };
        if let Some((oid, typmod)) = cat.base {
            c.type_oid = oid;
            c.type_modifier = typmod;
        }
        if cat.ndims > 1 && crate::batch::is_array(c.type_oid) {
            c.type_oid = WRITTEN_AS_TEXT;
            c.type_modifier = -1;
        }
    }
    Ok(out)
}
