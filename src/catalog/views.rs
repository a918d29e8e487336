//! The current state of a table as an Athena view over its change-log table: the
//! latest row per key by `(_lsn, _seq)`, rows before the last truncate (`T`) dropped,
//! deletes applied, and values PostgreSQL did not send (unchanged TOAST, listed in
//! `_unchanged`) carried forward from the key's previous row. The SQL keeps to what
//! Trino (Athena) and DuckDB both accept, so the tests run it in DuckDB.

use arrow::datatypes::DataType;

use crate::batch::schema::LakeSchema;
use crate::batch::value::Kind;
use crate::config::PartitionBy;

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL type to cast a partition column's text back to.
fn sql_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::Date32 => "date".into(),
        DataType::Utf8 => "varchar".into(),
        _ => return None,
    })
}

/// Whether PostgreSQL may leave a column's value out of an update (a TOAST-able,
/// variable-length value): text, bytea and arrays here.
fn may_be_unchanged(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::Binary | DataType::List(_))
}

/// `CREATE OR REPLACE VIEW "{database}"."{view}"` with the current state of
/// `qualified` (`schema.table`), whose lake schema is `schema`.
pub fn current_state(database: &str, qualified: &str, schema: &LakeSchema, partition: &PartitionBy) -> String {
    format!(
        "CREATE OR REPLACE VIEW {}.{} AS\n{}",
        ident(database),
        ident(&super::view_name(qualified)),
        select(database, qualified, schema, partition)
    )
}

/// The view's columns with their Athena (Trino) types, for a view stored in Glue.
pub fn view_columns(schema: &LakeSchema) -> Vec<(String, String)> {
    schema
        .columns
        .iter()
        .filter(|c| !c.dropped)
        .map(|c| {
            (
                c.name.clone(),
                trino_type(&Kind::for_type(c.pg_type_oid, c.pg_type_modifier).data_type()),
            )
        })
        .collect()
}

fn trino_type(t: &DataType) -> String {
    match t {
        DataType::Binary => "varbinary".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::List(f) => format!("array({})", trino_type(f.data_type())),
        other => sql_type(other).unwrap_or_else(|| "varchar".into()),
    }
}

/// The view's query (what follows `AS`).
pub fn select(database: &str, qualified: &str, schema: &LakeSchema, partition: &PartitionBy) -> String {
    let live: Vec<_> = schema.columns.iter().filter(|c| !c.dropped).collect();
    let mut keys: Vec<&str> = live.iter().filter(|c| c.key).map(|c| c.name.as_str()).collect();
    if keys.is_empty() {
        // No key recorded: the whole row is the key (identical rows appear once).
        keys = live.iter().map(|c| c.name.as_str()).collect();
    }
    let part_col = match partition {
        PartitionBy::Column(c) => Some(c.as_str()),
        _ => None,
    };
    let source_cols: Vec<String> = live
        .iter()
        .map(|c| {
            let t = Kind::for_type(c.pg_type_oid, c.pg_type_modifier).data_type();
            match (Some(c.name.as_str()) == part_col, sql_type(&t)) {
                // The partition key holds the column as text in Athena (null as Hive's
                // default partition name): cast it back.
                (true, Some(ty)) => format!(
                    "CAST(NULLIF(CAST({n} AS varchar), {null}) AS {ty}) AS {n}",
                    n = ident(&c.name),
                    null = literal(crate::batch::NULL_PARTITION)
                ),
                _ => ident(&c.name),
            }
        })
        .collect();
    let partition_by = keys.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
    let carried: Vec<&str> = live
        .iter()
        .filter(|c| !c.key && may_be_unchanged(&Kind::for_type(c.pg_type_oid, c.pg_type_modifier).data_type()))
        .map(|c| c.name.as_str())
        .collect();
    let groups: String = carried
        .iter()
        .map(|c| {
            format!(
                ",\n           sum(CASE WHEN coalesce(contains(_unchanged, {lit}), false) THEN 0 ELSE 1 END) OVER (PARTITION BY {partition_by} ORDER BY _lsn, _seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS {g}",
                lit = literal(c),
                g = ident(&format!("_g_{c}"))
            )
        })
        .collect();
    let filled: Vec<String> = live
        .iter()
        .map(|c| {
            if carried.contains(&c.name.as_str()) {
                format!(
                    "first_value({n}) OVER (PARTITION BY {partition_by}, {g} ORDER BY _lsn, _seq) AS {n}",
                    n = ident(&c.name),
                    g = ident(&format!("_g_{}", c.name))
                )
            } else {
                ident(&c.name)
            }
        })
        .collect();
    let out_cols = live.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
    format!(
        "WITH changes AS (
    SELECT _op, _lsn, _seq, _unchanged, {source_cols}
    FROM {db}.{log}
),
last_truncate AS (
    SELECT max(_lsn) AS t_lsn FROM changes WHERE _op = 'T'
),
truncate_position AS (
    SELECT l.t_lsn, max(c._seq) AS t_seq
    FROM last_truncate l LEFT JOIN changes c ON c._op = 'T' AND c._lsn = l.t_lsn
    GROUP BY l.t_lsn
),
live AS (
    SELECT c.* FROM changes c CROSS JOIN truncate_position t
    WHERE c._op <> 'T' AND (t.t_lsn IS NULL OR c._lsn > t.t_lsn OR (c._lsn = t.t_lsn AND c._seq > t.t_seq))
),
grouped AS (
    SELECT live.*{groups}
    FROM live
),
filled AS (
    SELECT _op, {filled},
           row_number() OVER (PARTITION BY {partition_by} ORDER BY _lsn DESC, _seq DESC) AS _rn
    FROM grouped
)
SELECT {out_cols} FROM filled WHERE _rn = 1 AND _op <> 'D'",
        db = ident(database),
        log = ident(&super::table_name(qualified)),
        source_cols = source_cols.join(", "),
        filled = filled.join(",\n           "),
    )
}
