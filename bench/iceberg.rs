//! Current state from the Iceberg table against the fold over the change log.
//!
//! A `prices` table of `--keys` rows (default 100,000) is copied into a file lake; then
//! `walshore run` (flush every 50 ms, an Iceberg snapshot every 5 s, 16 buckets)
//! replicates a writer that updates 50 random keys a transaction, deletes and inserts
//! now and then, for `--seconds` (default 60). After a `walshore sync` the lake holds
//! one change-log file per flush and the Iceberg table what compaction left. DuckDB
//! then answers a full count and a point lookup both ways, `--runs` times each
//! (default 5), and the bench prints the medians, the ratios (targets: ≥ 20×), the
//! files on each side, and checks that both answers equal PostgreSQL's. Meanwhile
//! `bench/iceberg_day.py --freshness-only` measures each commit's freshness: from its
//! commit record to the first Iceberg snapshot that holds it (target: p99 ≤ the commit
//! interval + 30 s).
//!
//! `cargo bench --bench iceberg [-- --keys N --seconds N --runs N --max-fold SIZE --index-memory SIZE --keep 1]`

#[path = "common.rs"]
#[allow(dead_code)] // the S3 test server is not used here
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walshore::cluster::{ClusterOptions, TempCluster};

fn count_files(dir: &std::path::Path, suffix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                count_files(&p, suffix)
            } else {
                usize::from(p.to_str().unwrap().ends_with(suffix))
            }
        })
        .sum()
}

fn main() {
    let arg = common::arg::<u64>;
    let keys = arg("--keys", 100_000);
    let seconds = arg("--seconds", 60);
    let runs = arg("--runs", 5);
    // `--max-fold 64MiB`, `--index-memory 128MiB`: [iceberg] settings other than the
    // defaults.
    let setting = |name: &str, key: &str| {
        let given = std::env::args().skip_while(|a| a != name).nth(1);
        given.map(|v| format!("{key} = \"{v}\"\n")).unwrap_or_default()
    };
    let extra = setting("--max-fold", "max_fold") + &setting("--index-memory", "index_memory");
    let walshore = env!("CARGO_BIN_EXE_walshore");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE prices (sym text PRIMARY KEY, px numeric(18,6) NOT NULL, qty integer NOT NULL, venue text);
         INSERT INTO prices SELECT 'S' || i, i * 0.01, i % 1000, 'XLON' FROM generate_series(1, {keys}) i;
         CREATE PUBLICATION bench FOR TABLE prices;"
    )))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = common::iceberg_config(
        dir.path(),
        &cluster,
        "iceberg",
        "50ms",
        &format!("commit_interval = \"5s\"\nbuckets = 16\n{extra}"),
    );
    let sync = || common::sync(walshore, &config);
    let copy = sync();
    println!("walshore iceberg benchmark: {keys} keys, {seconds} s of updates, {runs} runs a query");
    println!("  copy and first Iceberg build: {:.1} s", copy.secs);

    let stop_file = dir.path().join("final-watermark");
    let follower = common::follow(&lake, &stop_file, true);

    #[allow(clippy::zombie_processes)] // reaped by wait4 below
    let run = Command::new(walshore)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut transactions = 0u64;
    let mut seed = 1u64;
    while Instant::now() < until {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let first = 1 + (seed >> 33) % keys.saturating_sub(50).max(1);
        let sql = match transactions % 20 {
            0 => format!("DELETE FROM prices WHERE sym = 'S{first}'"),
            1 => format!(
                "INSERT INTO prices VALUES ('S{first}', 1, 1, 'XNYS') ON CONFLICT (sym) DO UPDATE SET venue = 'XNYS'"
            ),
            _ => format!(
                "UPDATE prices SET px = px + 0.01, qty = qty + 1 WHERE sym IN (SELECT 'S' || g FROM generate_series({first}, {}) g)",
                first + 49
            ),
        };
        rt.block_on(client.batch_execute(&sql)).unwrap();
        transactions += 1;
    }
    // Reaped by wait4, which also gives the run's peak RSS.
    let pid = run.id() as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "walshore run stopped cleanly (status {status})"
    );
    drop(run);
    let last = sync();
    println!(
        "  {transactions} transactions written; the last sync (Iceberg catching up): {:.1} s",
        last.secs
    );
    println!(
        "  peak RSS: copy and first build {:.0} MiB, run {:.0} MiB, last sync (key index built from the table) {:.0} MiB",
        copy.rss_mib,
        usage.ru_maxrss as f64 / 1024.0,
        last.rss_mib
    );

    let change_files = count_files(&lake.join("public/prices"), ".parquet");
    let ice = lake.join("_iceberg/public/prices");
    let data_files = count_files(&ice.join("data"), ".parquet") - count_files(&ice.join("data"), "-deletes.parquet");
    let status = Command::new(walshore)
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let t = &status["iceberg"]["public.prices"];
    println!(
        "  change log: {change_files} Parquet files; Iceberg: {} live data files, {} live delete files, {} snapshots ({data_files} data files on disk)",
        t["data_files"], t["delete_files"], t["snapshots"]
    );
    let watermark = t["watermark_seq"].as_u64().expect("a watermark after the sync");
    common::follower_report(follower, &stop_file, watermark, "5 s");

    let q = common::query_current_state(&rt, &client, &lake, "sym,px,qty,venue,_lsn,_commit_ts", runs);
    let rows = rt
        .block_on(client.query_one("SELECT count(*)::text FROM prices", &[]))
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(
        q["fold count"]["result"][0][0], rows,
        "the fold counts PostgreSQL's rows"
    );
    assert_eq!(
        q["iceberg count"]["result"][0][0], rows,
        "the Iceberg table counts PostgreSQL's rows"
    );
    assert_eq!(
        q["iceberg point"]["result"].as_array().unwrap().len(),
        1,
        "the key is found"
    );
    // `--keep 1`: the lake stays, for a closer look (DuckDB's EXPLAIN ANALYZE).
    if arg("--keep", 0) == 1 {
        println!("  the lake is kept at {}", dir.keep().join("lake").display());
    }
}
