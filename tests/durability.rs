//! Durable before confirmed, on the local sink too: data files, the commit record and
//! their directories are fsynced before the slot hears of them, and a failed fsync stops
//! the commit (nothing is confirmed, and the next run writes it all). Observed with
//! strace on a real `walshore sync`.

mod support;

use std::process::Command;

use support::*;

/// `walshore sync` under strace; returns (exit success, strace's output, walshore's
/// stderr).
fn traced_sync(config: &std::path::Path, strace_args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", trace.to_str().unwrap()])
        .args(strace_args)
        .args([BIN, "sync", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "info")
        .output()
        .expect("strace (Debian package strace)");
    (
        out.status.success(),
        std::fs::read_to_string(&trace).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn setup() -> (
    walshore::cluster::TempCluster,
    tokio_postgres::Client,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    sync(&config);
    (cluster, c, dir, config)
}

#[tokio::test]
async fn data_files_the_commit_record_and_their_directories_are_fsynced() {
    let (_cluster, c, dir, config) = setup().await;
    c.batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let (ok, trace, stderr) = traced_sync(&config, &["-y", "-e", "trace=fsync,fdatasync"]);
    assert!(ok, "{stderr}");
    let lake = dir.path().join("lake");
    let synced: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
        .filter_map(|l| l.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(p, _)| p))
        .collect();
    let lake = lake.to_str().unwrap();
    let any = |f: &dyn Fn(&str) -> bool| synced.iter().any(|p| f(p));
    assert!(
        any(&|p| p.starts_with(&format!("{lake}/_walshore/commits/")) && p.contains(".json")),
        "a commit record is fsynced: {synced:?}"
    );
    assert!(
        any(&|p| p == format!("{lake}/_walshore/commits")),
        "the commit log's directory is fsynced: {synced:?}"
    );
    assert!(
        any(&|p| p.starts_with(&format!("{lake}/public/t/dt=")) && p.contains(".parquet")),
        "a data file is fsynced: {synced:?}"
    );
    assert!(
        any(&|p| p.starts_with(&format!("{lake}/public/t/dt=")) && !p.contains(".parquet")),
        "a data file's directory is fsynced: {synced:?}"
    );
    assert_eq!(
        replay(&read_table(&open_lake(&config), "public", "t").await, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM t").await
    );
}

/// Builds the shim that makes fsync fail for matching paths (`tests/c/failing_fsync.c`)
/// with the C compiler Rust links with.
fn failing_fsync_shim(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("failing_fsync.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o", out.to_str().unwrap()])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/failing_fsync.c"))
        .arg("-ldl")
        .status()
        .expect("cc");
    assert!(status.success(), "cannot build the fsync shim");
    out
}

#[tokio::test]
async fn a_failed_fsync_of_a_data_file_stops_the_commit_and_nothing_is_confirmed() {
    let (_cluster, c, dir, config) = setup().await;
    let shim = failing_fsync_shim(dir.path());
    let slot = || async {
        c.query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walshore'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
    };
    let head_before = walshore::checkpoint::read_head(open_lake(&config).as_ref())
        .await
        .unwrap()
        .unwrap();
    c.batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    // The insert's commit record ends here: a slot confirmed at or past it would skip it.
    let after_insert: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let out = Command::new(BIN)
        .args(["sync", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "info")
        .env("LD_PRELOAD", &shim)
        .env("WALSHORE_TEST_FAIL_FSYNC", ".parquet")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a sync whose data files cannot be made durable must fail: {stderr}"
    );
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let head = walshore::checkpoint::read_head(open_lake(&config).as_ref())
        .await
        .unwrap()
        .unwrap();
    assert!(head.seq > head_before.seq, "the failing runs claimed the lake");
    assert_eq!(
        head.tables.get("public.t").map(|s| s.rows).unwrap_or(0),
        head_before.tables.get("public.t").map(|s| s.rows).unwrap_or(0),
        "nothing of the data was committed"
    );
    assert_eq!(head.end_lsn, head_before.end_lsn, "the committed position did not move");
    let confirmed = slot().await;
    let lsn = |s: &str| s.parse::<walshore::lsn::Lsn>().unwrap();
    assert!(
        lsn(&confirmed) < lsn(&after_insert),
        "the slot was confirmed past the insert that is not in the lake: {confirmed} (insert ends at {after_insert})"
    );
    // With a working disk, the next run writes all of it, and nothing of the failed
    // runs is left behind.
    sync(&config);
    assert_eq!(
        replay(&read_table(&open_lake(&config), "public", "t").await, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM t").await
    );
    assert_no_orphans(&config).await;
}
