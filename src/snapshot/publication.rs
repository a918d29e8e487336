//! What the publication holds: its tables with the columns pgoutput sends, and what
//! makes each the table it is ([`TableIdentity`]: its OID and the catalog rows that put
//! it in the publication).

use std::collections::BTreeMap;

use super::{SnapshotError, sql_err};
use crate::change::TableIdentity;
use crate::decode::{Column, Relation, ReplicaIdentity};

/// Each published table (`schema.table`) and its identity, in one query. Run inside a
/// copy's snapshot it gives the identity as of the snapshot point.
pub async fn members(
    client: &tokio_postgres::Client,
    publication: &str,
    server_version: i32,
) -> Result<BTreeMap<String, TableIdentity>, tokio_postgres::Error> {
    // A table is in a publication by a row of pg_publication_rel (its own or a partition
    // ancestor's), by its schema's row of pg_publication_namespace (PostgreSQL 15), or
    // for every table (FOR ALL TABLES: no row). Leaving and coming back makes new rows.
    // (pg_partition_ancestors has no row for a table that is not a partition.)
    let schemas = if server_version >= 150_000 {
        "UNION ALL
         SELECT pn.oid FROM pg_catalog.pg_publication_namespace pn
         WHERE pn.pnpubid = p.oid AND (pn.pnnspid = c.relnamespace OR pn.pnnspid IN (
             SELECT a.relnamespace FROM pg_catalog.pg_partition_ancestors(c.oid) x
             JOIN pg_catalog.pg_class a ON a.oid = x.relid))"
    } else {
        ""
    };
    let rows = client
        .query(
            &format!(
                "SELECT pt.schemaname::text || '.' || pt.tablename::text, c.oid,
                        ARRAY(SELECT m FROM (
                            SELECT pr.oid FROM pg_catalog.pg_publication_rel pr
                            WHERE pr.prpubid = p.oid
                              AND (pr.prrelid = c.oid
                                   OR pr.prrelid IN (SELECT relid FROM pg_catalog.pg_partition_ancestors(c.oid)))
                            {schemas}) AS members(m) ORDER BY m)
                 FROM pg_catalog.pg_publication p
                 JOIN pg_catalog.pg_publication_tables pt ON pt.pubname = p.pubname
                 JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                 WHERE p.pubname = $1"
            ),
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                TableIdentity {
                    oid: r.get(1),
                    membership: r.get(2),
                    departed: false,
                },
            )
        })
        .collect())
}

/// The published tables as of the snapshot, with the columns pgoutput will send
/// (attnum order, no dropped or generated columns, replica-identity flags).
pub(super) async fn tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<(Relation, bool, u64)>, SnapshotError> {
    let tables = client
        .query(
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, c.relreplident::text,
                    c.relkind = 'p',
                    (pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8
             FROM pg_catalog.pg_publication_tables pt
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(sql_err("listing the publication's tables"))?;
    let mut out = Vec::new();
    for t in tables {
        let oid: u32 = t.get(0);
        let (schema, name, ident): (String, String, String) = (t.get(1), t.get(2), t.get(3));
        let (partitioned, pages): (bool, i64) = (t.get(4), t.get(5));
        let columns = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod,
                        CASE WHEN $2 = 'f' THEN true
                             ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                          WHERE i.indrelid = a.attrelid AND a.attnum = ANY (i.indkey)
                                            AND CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END)
                        END
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&oid, &ident],
            )
            .await
            .map_err(sql_err("reading table columns"))?;
        let replica_identity = match ident.as_str() {
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            "n" => ReplicaIdentity::Nothing,
            _ => ReplicaIdentity::Default,
        };
        let columns = columns
            .iter()
            .map(|c| Column {
                name: c.get(0),
                type_oid: c.get(1),
                type_modifier: c.get(2),
                key: c.get(3),
            })
            .collect();
        let relation = Relation {
            id: oid,
            namespace: schema,
            name,
            replica_identity,
            columns,
        };
        // Domains as their base type, multi-dimensional arrays as text: as the stream.
        let relation = crate::source::types::resolve(client, &relation)
            .await
            .map_err(sql_err("reading column types"))?;
        out.push((relation, partitioned, pages.max(0) as u64));
    }
    Ok(out)
}
