//! Type fidelity: one column of each common type, ordinary and edge values, copied and
//! then streamed; PostgreSQL is the oracle for every value, and pyarrow (an independent
//! reader) reads every file with the documented Arrow types.

mod support;

use std::collections::BTreeMap;

use support::kinds::{ROWS, SCHEMA};
use support::*;

/// The documented Arrow type of each column as pyarrow names it (README, "Types").
const ARROW_TYPES: &[(&str, &str)] = &[
    ("id", "int64"),
    ("s", "int16"),
    ("i", "int32"),
    ("b", "int64"),
    ("n", "decimal128(12, 3)"),
    ("nu", "string"),
    ("m", "string"),
    ("r", "float"),
    ("d", "double"),
    ("c", "string"),
    ("t", "string"),
    ("by", "binary"),
    ("dt", "date32[day]"),
    ("tm", "string"),
    ("tz", "string"),
    ("ts", "timestamp[us]"),
    ("tstz", "timestamp[us, tz=UTC]"),
    ("iv", "string"),
    ("u", "string"),
    ("j", "string"),
    ("jb", "string"),
    ("x", "string"),
    ("ip", "string"),
    ("cid", "string"),
    ("mac", "string"),
    ("bt", "string"),
    ("vb", "string"),
    ("tv", "string"),
    ("h", "string"),
    ("rg", "string"),
    ("mr", "string"),
    ("e", "string"),
    ("dm", "int32"),
    ("dmn", "decimal128(10, 2)"),
    ("cp", "string"),
    ("ai", "list<element: int32>"),
    ("at", "list<element: string>"),
    ("a2", "string"),
];

/// PostgreSQL rendering each column the way the test reader renders the lake's value.
fn oracle(column: &str) -> String {
    match column {
        "dt" => "(dt - date '1970-01-01')::text".into(),
        "ts" => "(extract(epoch FROM ts) * 1000000)::bigint::text".into(),
        "tstz" => "(extract(epoch FROM tstz) * 1000000)::bigint::text".into(),
        "r" | "d" => format!("{column}::float8::text"),
        // The reader renders a list as {a,NULL,...} (element text unquoted).
        "at" => "'{' || array_to_string(at, ',', 'NULL') || '}'".into(),
        // The type's output function, as pgoutput uses (a cast to text trims char(n)
        // and adds inet's netmask).
        other => format!("CASE WHEN num_nulls({other}) = 0 THEN format('%s', {other}) END"),
    }
}

/// The lake's value in the oracle's form: Rust writes infinite floats as `inf`.
fn lake_form(column: &str, v: Option<String>) -> Option<String> {
    match (column, v.as_deref()) {
        ("r" | "d", Some("inf")) => Some("Infinity".into()),
        ("r" | "d", Some("-inf")) => Some("-Infinity".into()),
        _ => v,
    }
}

#[tokio::test]
async fn every_type_round_trips_through_copy_and_stream_and_pyarrow_reads_every_file() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(SCHEMA).await.unwrap();
    c.batch_execute(ROWS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "");
    sync(&config);
    // The stream: the same values again under new ids, and updates of every column.
    c.batch_execute(&format!(
        "{}; UPDATE kinds SET t = t || '!' WHERE id = 1; UPDATE kinds SET s = s + 1, dt = dt + 1, ts = ts + interval '1 microsecond' WHERE id = 3",
        ROWS.trim().trim_end_matches(';')
    ))
    .await
    .unwrap();
    sync(&config);

    // The values as pyarrow reads them (an independent reader), replayed.
    let read = python_json(
        "read_lake.py",
        &[dir.path().join("lake").to_str().unwrap(), "public.kinds"],
    );
    let mut lake = LakeTable {
        columns: read["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect(),
        rows: read["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| LakeRow {
                lsn: r["lsn"].as_i64().unwrap(),
                seq: r["seq"].as_i64().unwrap(),
                op: r["op"].as_str().unwrap().to_owned(),
                unchanged: r["unchanged"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_owned())
                    .collect(),
                replaced: Vec::new(),
                values: r["values"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                    .collect(),
            })
            .collect(),
        files: 0,
    };
    lake.rows.sort_by_key(|r| (r.lsn, r.seq));
    // The Rust reader sees the same rows.
    let store = open_lake(&config);
    let ours = read_table(&store, "public", "kinds").await;
    assert_eq!(ours.rows.len(), lake.rows.len());
    assert_unique_positions(&lake);
    assert!(lake.rows.iter().any(|r| r.op == "R") && lake.rows.iter().any(|r| r.op == "I"));
    assert!(
        !lake.columns.contains(&"gen".to_owned()),
        "PostgreSQL 15 does not send generated columns"
    );
    let replayed = replay(&lake, Some(&["id"]));
    let columns: Vec<&str> = ARROW_TYPES.iter().map(|(c, _)| *c).collect();
    let at = |name: &str| lake.columns.iter().position(|c| c == name).unwrap();
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3")
        .await
        .unwrap();
    let select = format!(
        "SELECT {} FROM kinds ORDER BY id",
        columns.iter().map(|c| oracle(c)).collect::<Vec<_>>().join(", ")
    );
    let source = source_rows(&c, &select).await;
    let mut lake_rows: Vec<Vec<Option<String>>> = replayed
        .iter()
        .map(|r| columns.iter().map(|col| lake_form(col, r[at(col)].clone())).collect())
        .collect();
    lake_rows.sort_by_key(|r| r[0].as_ref().map(|id| id.parse::<i64>().unwrap()));
    let mut source = source;
    source.sort_by_key(|r| r[0].as_ref().map(|id| id.parse::<i64>().unwrap()));
    assert_eq!(lake_rows.len(), 8);
    let mut diffs = BTreeMap::new();
    for (l, s) in lake_rows.iter().zip(&source) {
        for (k, col) in columns.iter().enumerate() {
            if l[k] != s[k] {
                diffs.insert(
                    format!("id {} {col}", s[0].clone().unwrap()),
                    (l[k].clone(), s[k].clone()),
                );
            }
        }
    }
    assert!(diffs.is_empty(), "lake vs PostgreSQL: {diffs:#?}");

    let out = std::process::Command::new("python3")
        .args(["tests/py/read_lake.py", dir.path().join("lake").to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pyarrow read every file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds = &read["public.kinds"];
    assert!(kinds["files"].as_u64().unwrap() >= 2, "{read}");
    for (col, ty) in ARROW_TYPES {
        assert_eq!(kinds["types"][*col], *ty, "Arrow type of {col}");
    }
}
