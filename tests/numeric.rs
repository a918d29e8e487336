//! `numeric(p,s)` is exact for every value PostgreSQL accepts, in both paths: the copy
//! (binary COPY, base-10000 digit groups) and the stream (pgoutput's text). Random digit
//! strings up to each declared precision, and the values at its limits, are written by
//! PostgreSQL, replicated, and compared with PostgreSQL's own output. The seed is printed
//! (set `WALSHORE_NUMERIC_SEED` to replay one).

mod support;

use rand::{Rng, RngExt, SeedableRng};
use support::*;

/// Declared `(precision, scale)` of the columns: the limits (38 digits, scale = precision,
/// scale 0), the common money and price shapes, and group-boundary precisions.
const SHAPES: &[(u32, u32)] = &[
    (1, 0),
    (4, 4),
    (5, 2),
    (9, 4),
    (12, 2),
    (18, 6),
    (19, 0),
    (20, 20),
    (28, 10),
    (33, 3),
    (38, 0),
    (38, 10),
    (38, 37),
    (38, 38),
];

fn column(p: u32, s: u32) -> String {
    format!("n_{p}_{s}")
}

/// A value of `numeric(p,s)` with a random number of integer and fraction digits.
fn random_value(rng: &mut impl Rng, p: u32, s: u32) -> String {
    let int_digits = rng.random_range(0..=p - s);
    let frac_digits = rng.random_range(0..=s);
    let mut v = String::new();
    if rng.random_bool(0.5) {
        v.push('-');
    }
    if int_digits == 0 {
        v.push('0');
    }
    for _ in 0..int_digits {
        v.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
    if frac_digits > 0 {
        v.push('.');
        for _ in 0..frac_digits {
            v.push(char::from(b'0' + rng.random_range(0..10u8)));
        }
    }
    v
}

/// The extremes of `numeric(p,s)`: ±(10^(p-s) - 10^-s), ±10^-s, 0, -0, and 10^(p-s-1).
fn limit_values(p: u32, s: u32) -> Vec<String> {
    let nines = |n: u32| "9".repeat(n as usize);
    let max = match (p - s, s) {
        (0, s) => format!("0.{}", nines(s)),
        (i, 0) => nines(i),
        (i, s) => format!("{}.{}", nines(i), nines(s)),
    };
    let tiny = if s == 0 {
        "1".to_owned()
    } else {
        format!("0.{}1", "0".repeat(s as usize - 1))
    };
    let mut out = vec![
        max.clone(),
        format!("-{max}"),
        tiny.clone(),
        format!("-{tiny}"),
        "0".into(),
        "-0".into(),
    ];
    if p > s {
        out.push(format!("1{}", "0".repeat((p - s - 1) as usize)));
    }
    out
}

/// One row per value: every column gets a value of its own shape.
fn rows_sql(rng: &mut impl Rng, first_id: i64, random_rows: usize) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let limits: Vec<Vec<String>> = SHAPES.iter().map(|&(p, s)| limit_values(p, s)).collect();
    let n_limit_rows = limits.iter().map(Vec::len).max().unwrap();
    for i in 0..n_limit_rows {
        rows.push(
            limits
                .iter()
                .map(|l| l.get(i).cloned().unwrap_or_else(|| "NULL".into()))
                .collect(),
        );
    }
    for _ in 0..random_rows {
        rows.push(SHAPES.iter().map(|&(p, s)| random_value(rng, p, s)).collect());
    }
    let values: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let vals: Vec<String> = r
                .iter()
                .map(|v| if v == "NULL" { v.clone() } else { format!("'{v}'") })
                .collect();
            format!("({}, {})", first_id + i as i64, vals.join(", "))
        })
        .collect();
    let cols: Vec<String> = SHAPES.iter().map(|&(p, s)| column(p, s)).collect();
    format!(
        "INSERT INTO nums (id, {}) VALUES {}",
        cols.join(", "),
        values.join(",\n")
    )
}

#[tokio::test]
async fn numeric_values_of_every_declared_precision_are_exact_through_copy_and_stream() {
    let seed: u64 = std::env::var("WALSHORE_NUMERIC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("numeric property test seed: {seed} (WALSHORE_NUMERIC_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    let cols: Vec<String> = SHAPES
        .iter()
        .map(|&(p, s)| format!("{} numeric({p},{s})", column(p, s)))
        .collect();
    c.batch_execute(&format!(
        "CREATE TABLE nums (id bigint PRIMARY KEY, {}); CREATE PUBLICATION pub FOR TABLE nums;",
        cols.join(", ")
    ))
    .await
    .unwrap();
    // Rows present before the first start go through the copy (binary COPY)...
    c.batch_execute(&rows_sql(&mut rng, 0, 400)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "");
    sync(&config);
    // ... and rows written afterwards through the stream (pgoutput's text), inserted and
    // then updated to other random values.
    c.batch_execute(&rows_sql(&mut rng, 1_000, 400)).await.unwrap();
    let updates: Vec<String> = (0..100)
        .map(|i| {
            let (p, s) = SHAPES[i % SHAPES.len()];
            format!(
                "UPDATE nums SET {} = '{}' WHERE id = {}",
                column(p, s),
                random_value(&mut rng, p, s),
                1_000 + i as i64 * 3
            )
        })
        .collect();
    c.batch_execute(&updates.join(";")).await.unwrap();
    sync(&config);

    let lake = read_table(&open_lake(&config), "public", "nums").await;
    assert_unique_positions(&lake);
    assert!(lake.rows.iter().any(|r| r.op == "R"), "the copy path was taken");
    assert!(lake.rows.iter().any(|r| r.op == "I"), "the stream path was taken");
    let mut lake_cols = vec!["id".to_owned()];
    lake_cols.extend(SHAPES.iter().map(|&(p, s)| column(p, s)));
    assert_eq!(lake.columns, lake_cols);
    let select: Vec<String> = lake_cols.iter().map(|c| format!("{c}::text")).collect();
    let source = source_rows(&c, &format!("SELECT {} FROM nums", select.join(", "))).await;
    let replayed = replay(&lake, Some(&["id"]));
    assert_eq!(replayed.len(), source.len(), "seed {seed}: row count");
    for (l, s) in replayed.iter().zip(&source) {
        assert_eq!(l, s, "seed {seed}: a numeric value differs from PostgreSQL's");
    }
}
