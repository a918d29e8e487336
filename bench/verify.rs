//! `walshore verify` against reading the table: a trades table of `--rows` rows (default
//! 1,000,000) copied into a file lake, then as many changes streamed into it (half
//! updates, a tenth deletes, the rest inserts), so that the lake holds twice the table's
//! rows. Times `walshore verify` against `COPY trades TO STDOUT (FORMAT binary)` into
//! /dev/null, in the same run, `--runs` times (default 3): medians, the ratio, CPU and
//! peak RSS (target ≤ 256 MiB).
//!
//! `cargo bench --bench verify [-- --rows N --runs N]`

#[path = "common.rs"]
#[allow(dead_code)] // the S3 test server is not used here
mod common;

use std::process::Command;

use common::{median, timed};
use walshore::cluster::{ClusterOptions, TempCluster};

const SCHEMA: &str = "
CREATE TABLE trades (id bigint PRIMARY KEY, symbol text NOT NULL, side char(1) NOT NULL, quantity integer NOT NULL,
    price numeric(18,6) NOT NULL, trader text NOT NULL, traded_at timestamptz NOT NULL);
CREATE PUBLICATION bench FOR TABLE trades;";

fn insert(from: u64, to: u64) -> String {
    format!(
        "INSERT INTO trades (id, symbol, side, quantity, price, trader, traded_at)
         SELECT i, (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], CASE WHEN i % 2 = 0 THEN 'B' ELSE 'S' END,
                100 + i % 900, round((100 + (i * 7919 % 10000) / 100.0)::numeric, 6), 'trader' || (i % 17),
                timestamptz '2026-11-20 09:30:00+00' + i * interval '1 millisecond'
         FROM generate_series({from}::bigint, {to}) AS i"
    )
}

fn main() {
    let arg = common::arg::<u64>;
    let rows = arg("--rows", 1_000_000);
    let runs = arg("--runs", 3) as usize;
    let walshore = env!("CARGO_BIN_EXE_walshore");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(client.batch_execute(&format!("{SCHEMA}; {}", insert(1, rows))))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verify.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"verify\"\nspill_dir = \"{}/spill\"\n[sink]\nurl = \"file://{}/lake\"\n[snapshot]\nmode = \"initial\"\n",
            cluster.url("postgres", "postgres"),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let sync = || {
        timed(
            Command::new(walshore)
                .args(["sync", "--config", config.to_str().unwrap()])
                .env("WALSHORE_LOG", "warn"),
        )
    };
    sync();
    // As many changes as rows: updates of the first half, deletes of the last tenth,
    // inserts of four tenths more.
    let (half, tenth) = (rows / 2, rows / 10);
    rt.block_on(client.batch_execute(&format!(
        "UPDATE trades SET quantity = quantity + 1, price = price + 0.000001 WHERE id <= {half};
         DELETE FROM trades WHERE id > {};
         {}",
        rows - tenth,
        insert(rows + 1, rows + 4 * tenth)
    )))
    .unwrap();
    sync();
    rt.block_on(client.batch_execute("VACUUM ANALYZE trades")).unwrap();
    let size: i64 = rt
        .block_on(client.query_one("SELECT pg_table_size('trades')", &[]))
        .unwrap()
        .get(0);
    let lake_bytes: u64 = walkdir_bytes(&dir.path().join("lake"));
    println!(
        "walshore verify benchmark: {} source rows ({:.0} MiB table), {} changes in the lake ({:.0} MiB of Parquet), {runs} runs",
        rows - tenth + 4 * tenth,
        size as f64 / 1048576.0,
        rows * 2,
        lake_bytes as f64 / 1048576.0
    );
    let (mut copy_t, mut verify_t, mut rss, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let c = timed(&mut common::psql(&cluster, "COPY trades TO STDOUT (FORMAT binary)"));
        println!("  COPY to /dev/null  run {i}: {:.2}s", c.secs);
        copy_t.push(c.secs);
        // Exit 0 only when equal: the benchmark checks the answer too.
        let v = timed(
            Command::new(walshore)
                .args(["verify", "--config", config.to_str().unwrap()])
                .env("WALSHORE_LOG", "warn"),
        );
        println!(
            "  walshore verify    run {i}: {:.2}s  CPU {:.2}s  peak RSS {:.0} MiB",
            v.secs, v.cpu_secs, v.rss_mib
        );
        verify_t.push(v.secs);
        rss.push(v.rss_mib);
        cpu.push(v.cpu_secs);
    }
    let (c, v) = (median(copy_t), median(verify_t));
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    println!("  median: COPY {c:.2}s, verify {v:.2}s (CPU {:.2}s)", median(cpu));
    println!(
        "  RATIO verify/COPY = {:.2} (time; lower is better); verify peak RSS {peak:.0} MiB (target <= 256)",
        v / c
    );
}

/// Bytes of the files under `dir`.
fn walkdir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        total += if meta.is_dir() {
            walkdir_bytes(&e.path())
        } else {
            meta.len()
        };
    }
    total
}
