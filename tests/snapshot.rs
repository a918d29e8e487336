//! The initial copy: existing rows as `R` at the slot's consistent point, followed
//! seamlessly by the stream, whatever commits while the copy runs.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

const TABLES: &str = "
CREATE TABLE trades (id bigint PRIMARY KEY, symbol text, qty integer, price numeric(12,2), ts timestamptz);
CREATE TABLE prices (symbol text, ts timestamptz, bid numeric(18,6), PRIMARY KEY (symbol, ts));
CREATE TABLE empty_one (id int PRIMARY KEY, note text);
CREATE TABLE only_key (id int PRIMARY KEY);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE misc (id int PRIMARY KEY, b bytea, tags text[], u uuid, j jsonb, f float8, flag bool, d date,
    t timestamp, n numeric, c char(3), s smallint, note varchar(20));
CREATE PUBLICATION pub FOR TABLE trades, prices, empty_one, only_key, nokey, misc;";
const MISC: &str =
    "SELECT id::text, b::text, tags::text, u::text, j::text, f::text, flag::text, (d - date '1970-01-01')::text,
    (extract(epoch FROM t) * 1000000)::bigint::text, n::text, c, s::text, note FROM misc";

const TRADES: &str =
    "SELECT id::text, symbol, qty::text, price::text, (extract(epoch FROM ts) * 1000000)::bigint::text FROM trades";
const PRICES: &str = "SELECT symbol, (extract(epoch FROM ts) * 1000000)::bigint::text, bid::text FROM prices";

fn seed(n: i64) -> String {
    format!(
        "INSERT INTO trades SELECT i, 'S' || (i % 50), (i % 1000)::int, (i * 0.25)::numeric(12,2), timestamptz '2026-01-01' + i * interval '1 second' FROM generate_series(1, {n}) i;
         INSERT INTO prices SELECT 'S' || (i % 50), timestamptz '2026-01-01' + i * interval '1 second', i / 1000.0 FROM generate_series(1, {n} / 2) i;
         INSERT INTO only_key SELECT generate_series(1, 1000);
         INSERT INTO nokey SELECT i % 10, 'x' || (i % 3) FROM generate_series(1, 500) i;
         INSERT INTO misc SELECT i, decode(lpad(to_hex(i), 6, '0'), 'hex'), ARRAY['a' || i, NULL, 'b'],
             md5(i::text)::uuid, jsonb_build_object('k', i, 'v', 'line\nbreak'), i / 8.0, i % 2 = 0, date '1999-12-30' + i,
             timestamp '1969-12-31 23:00:00.25' + i * interval '1 hour', (i * 1.5)::numeric / 7, 'ab', (i % 300)::smallint, 'n\\x' || i || E'\\t'
           FROM generate_series(1, 300) i;
         INSERT INTO misc (id) VALUES (0);"
    )
}

/// Commits `sql(i)` for i = 0, 1, 2, … every `pause_ms` until `stop`; returns how many.
fn spawn_writer(
    w: tokio_postgres::Client,
    stop: Arc<AtomicBool>,
    pause_ms: u64,
    sql: impl Fn(i64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            w.batch_execute(&sql(i)).await.unwrap();
            i += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
        i
    })
}

async fn setup(
    n: i64,
) -> (
    walshore::cluster::TempCluster,
    tokio_postgres::Client,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(TABLES).await.unwrap();
    c.batch_execute(&seed(n)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "parallelism = 2");
    (cluster, c, dir, config)
}

async fn assert_all_tables_equal(c: &tokio_postgres::Client, config: &std::path::Path) {
    let store = open_lake(config);
    for (table, key, select) in [
        ("trades", Some(&["id"][..]), TRADES),
        ("prices", Some(&["symbol", "ts"][..]), PRICES),
        ("only_key", Some(&["id"][..]), "SELECT id::text FROM only_key"),
        ("nokey", None, "SELECT a::text, b FROM nokey"),
        ("empty_one", Some(&["id"][..]), "SELECT id::text, note FROM empty_one"),
        ("misc", Some(&["id"][..]), MISC),
    ] {
        let lake = read_table(&store, "public", table).await;
        assert_unique_positions(&lake);
        let source = source_rows(c, select).await;
        if lake.rows.is_empty() {
            assert!(
                source.is_empty(),
                "{table}: nothing in the lake, {} rows at the source",
                source.len()
            );
            continue;
        }
        assert_eq!(
            replay(&lake, key),
            source,
            "{table}: lake replay differs from the source"
        );
    }
}

#[tokio::test]
async fn initial_copy_then_stream_equals_the_source_with_a_writer_running_throughout() {
    let (cluster, c, _dir, config) = setup(150_000).await;
    // 1 MiB chunks: trades is copied in ~10 ctid ranges by both connections at once.
    snapshot_keys(&config, "parallelism = 2\nchunk_size = \"1MiB\"");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(cluster.connect("postgres").await.unwrap(), stop.clone(), 2, |i| {
        format!(
                    "BEGIN; INSERT INTO trades VALUES ({id}, 'NEW', 1, 1.00, now()); UPDATE trades SET qty = qty + 1 WHERE id = {u};
                     DELETE FROM trades WHERE id = {d}; UPDATE nokey SET b = 'w{i}' WHERE ctid = (SELECT min(ctid) FROM nokey); COMMIT",
                    id = 1_000_000 + i, u = 1 + i * 37 % 150_000, d = 2 + i * 91 % 150_000
        )
    });
    let child = spawn_run(&config);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 50, "the writer committed during the copy ({rounds})");
    sync(&config);
    assert_all_tables_equal(&c, &config).await;
    let lake = read_table(&open_lake(&config), "public", "trades").await;
    let r: Vec<_> = lake.rows.iter().filter(|r| r.op == "R").collect();
    assert_eq!(r.len(), 150_000, "every existing row copied once");
    assert!(r.iter().all(|row| row.lsn == r[0].lsn), "R rows: one consistent point");
    // Chunk k numbers its rows k << 32, +1, +2, ...
    let mut chunks: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for row in &r {
        chunks.entry(row.seq >> 32).or_default().push(row.seq & 0xFFFF_FFFF);
    }
    assert!(chunks.len() > 5, "trades copied in several chunks: {}", chunks.len());
    for (k, seqs) in &chunks {
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as i64),
            "chunk {k}: _seq 0, 1, 2, ..."
        );
    }
    assert!(
        lake.rows.iter().any(|row| row.op != "R" && row.lsn > r[0].lsn),
        "the stream follows the copy"
    );
}

#[tokio::test]
async fn sigkill_during_the_copy_then_restart_gives_an_exact_lake() {
    let (_cluster, c, dir, config) = setup(200_000).await;
    // Small buffers: the copy uploads many files before it commits.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("flush_interval", "max_buffer = \"1MiB\"\nflush_interval");
    std::fs::write(&config, text).unwrap();
    let mut child = spawn_run(&config);
    let lake = dir.path().join("lake/public/trades");
    wait_until(Duration::from_secs(60), "the copy to upload some files", || {
        let lake = lake.clone();
        async move { std::fs::read_dir(lake).map(|mut d| d.next().is_some()).unwrap_or(false) }
    })
    .await;
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    c.batch_execute("UPDATE trades SET qty = -1 WHERE id < 100; DELETE FROM prices WHERE bid < 1")
        .await
        .unwrap();
    sync(&config);
    assert_all_tables_equal(&c, &config).await;
}

/// Rows larger than a read of a copy connection (256 KiB), between small ones, copied in
/// two chunks: each row arrives whole and exact.
#[tokio::test]
async fn rows_larger_than_a_read_are_copied_whole() {
    let (_cluster, c, _dir, config) = setup(10).await;
    c.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, t text);
         ALTER TABLE big ALTER COLUMN t SET STORAGE EXTERNAL;
         INSERT INTO big SELECT i, CASE WHEN i % 50 = 0
             THEN (SELECT string_agg(md5((i * 100000 + g)::text), '') FROM generate_series(1, 40000) g)
             ELSE 'small ' || i END
         FROM generate_series(1, 200) i;
         ALTER PUBLICATION pub ADD TABLE big",
    )
    .await
    .unwrap();
    // Chunks of a page: the table is read in several ctid ranges.
    snapshot_keys(&config, "parallelism = 2\nchunk_size = \"8KiB\"");
    sync(&config);
    let source = source_rows(&c, "SELECT id::text, t FROM big").await;
    let large = source
        .iter()
        .filter(|r| r[1].as_ref().unwrap().len() > 1_000_000)
        .count();
    assert_eq!(large, 4, "four rows of 1.28 MB at the source");
    let lake = replay(&read_table(&open_lake(&config), "public", "big").await, Some(&["id"]));
    assert_eq!(lake.len(), source.len(), "rows in the lake");
    for (l, s) in lake.iter().zip(&source) {
        // Not assert_eq: a differing megabyte is no message.
        assert!(
            l == s,
            "row {:?} differs: {} bytes in the lake, {} at the source",
            s[0],
            l[1].as_ref().map_or(0, String::len),
            s[1].as_ref().map_or(0, String::len)
        );
    }
}

#[tokio::test]
async fn a_table_without_select_privilege_names_the_grant() {
    let (cluster, c, dir, _config) = setup(10).await;
    c.batch_execute("CREATE ROLE rep LOGIN REPLICATION PASSWORD 'pw'; GRANT SELECT ON trades, prices, empty_one, only_key, misc TO rep").await.unwrap();
    let url = format!("postgres://rep:pw@127.0.0.1:{}/postgres?sslmode=disable", cluster.port);
    let config = write_config(
        dir.path(),
        &url,
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake2")),
        "",
        "",
    );
    use_initial_snapshot(&config, "");
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("GRANT SELECT ON \"public\".\"nokey\" TO \"rep\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn partitioned_tables_copy_and_stream_with_and_without_publish_via_partition_root() {
    for via_root in [true, false] {
        let cluster = cluster(&[]);
        let c = cluster.connect("postgres").await.unwrap();
        c.batch_execute(&format!(
            "CREATE TABLE fills (id bigint, day date, qty int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
             CREATE TABLE fills_a PARTITION OF fills FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
             CREATE TABLE fills_b PARTITION OF fills FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
             INSERT INTO fills SELECT i, date '2026-01-01' + (i % 59), i FROM generate_series(1, 2000) i;
             CREATE PUBLICATION pub FOR TABLE fills WITH (publish_via_partition_root = {via_root});"
        ))
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = lake_config(dir.path(), &cluster, "postgres");
        use_initial_snapshot(&config, "");
        sync(&config);
        c.batch_execute("UPDATE fills SET qty = -qty WHERE id % 3 = 0; DELETE FROM fills WHERE id % 7 = 0; INSERT INTO fills VALUES (5000, '2026-02-15', 1)")
            .await
            .unwrap();
        sync(&config);
        let store = open_lake(&config);
        let tables: Vec<&str> = if via_root {
            vec!["fills"]
        } else {
            vec!["fills_a", "fills_b"]
        };
        let mut replayed = Vec::new();
        for t in &tables {
            let lake = read_table(&store, "public", t).await;
            assert_unique_positions(&lake);
            assert!(
                lake.rows.iter().any(|r| r.op == "R"),
                "{t}: copied (via_root = {via_root})"
            );
            replayed.extend(replay(&lake, Some(&["id", "day"])));
        }
        replayed.sort();
        let source = source_rows(
            &c,
            "SELECT id::text, (day - date '1970-01-01')::text, qty::text FROM fills",
        )
        .await;
        assert_eq!(replayed, source, "via_root = {via_root}");
    }
}

/// The commit log's head: which tables are copied, at which snapshot point.
async fn copied_tables(config: &std::path::Path) -> std::collections::BTreeMap<String, walshore::lsn::Lsn> {
    walshore::checkpoint::read_head(open_lake(config).as_ref())
        .await
        .unwrap()
        .map(|h| h.snapshots)
        .unwrap_or_default()
}

/// Sets keys of the `[snapshot]` table (after `mode = ...`).
fn snapshot_keys(config: &std::path::Path, keys: &str) {
    edit_config(config, "parallelism = 2", keys);
}

fn files_under(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_crash_after_some_tables_are_committed_copies_only_the_others_again() {
    let (_cluster, c, dir, config) = setup(200_000).await;
    // One connection and small chunks: tables commit one by one, trades (copied last)
    // in many chunks.
    snapshot_keys(&config, "parallelism = 1\nchunk_size = \"256kB\"");
    let out = std::process::Command::new(BIN)
        .args(["sync", "--config", config.to_str().unwrap()])
        .env("WALSHORE_FAULT", "after_copy_commit@2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fault injected"),
        "the copy did not crash after its second table commit:\n{stderr}"
    );
    let before = copied_tables(&config).await;
    assert!(
        !before.is_empty() && !before.contains_key("public.trades"),
        "some tables committed, trades not yet: {before:?}"
    );
    let first_point = *before.values().next().unwrap();
    let lake = dir.path().join("lake/public");
    let kept: Vec<(String, std::collections::BTreeSet<String>)> = before
        .keys()
        .map(|t| {
            let name = t.trim_start_matches("public.");
            (t.clone(), files_under(&lake.join(name)))
        })
        .collect();
    c.batch_execute(
        "UPDATE trades SET qty = -1 WHERE id < 100; DELETE FROM prices WHERE bid < 1; INSERT INTO only_key VALUES (5000);
         UPDATE nokey SET b = 'z' WHERE a = 1; UPDATE misc SET note = 'changed' WHERE id < 10; INSERT INTO empty_one VALUES (1, 'one')",
    )
    .await
    .unwrap();
    sync(&config);
    let after = copied_tables(&config).await;
    assert_eq!(after.len(), 6, "every table copied: {after:?}");
    for (t, files) in &kept {
        assert_eq!(after[t], first_point, "{t} committed before the crash keeps its copy");
        let now = files_under(&lake.join(t.trim_start_matches("public.")));
        assert!(
            files.is_subset(&now),
            "{t}: the files committed before the crash are kept"
        );
        let lake_table = read_table(&open_lake(&config), "public", t.trim_start_matches("public.")).await;
        let copied_at: std::collections::BTreeSet<i64> =
            lake_table.rows.iter().filter(|r| r.op == "R").map(|r| r.lsn).collect();
        assert!(
            copied_at.len() <= 1 && lake_table.rows.iter().all(|r| r.op != "T"),
            "{t} was not copied again: R rows at {copied_at:?}"
        );
    }
    for (t, point) in &after {
        if !before.contains_key(t) {
            assert!(*point > first_point, "{t} copied again at a new snapshot point");
        }
    }
    let trades = read_table(&open_lake(&config), "public", "trades").await;
    let chunks: std::collections::BTreeSet<i64> = trades
        .rows
        .iter()
        .filter(|r| r.op == "R")
        .map(|r| r.seq >> 32)
        .collect();
    assert!(chunks.len() > 10, "trades was copied in many chunks: {}", chunks.len());
    assert_all_tables_equal(&c, &config).await;
}

#[tokio::test]
async fn a_table_added_to_the_publication_while_streaming_is_copied_and_then_streamed() {
    let (_cluster, c, dir, config) = setup(1000).await;
    snapshot_keys(&config, "parallelism = 2\npoll_interval = \"300ms\"");
    c.batch_execute(
        "CREATE TABLE late (id int PRIMARY KEY, v text); INSERT INTO late SELECT i, 'v' || i FROM generate_series(1, 20000) i",
    )
    .await
    .unwrap();
    let child = spawn_run(&config);
    wait_until(Duration::from_secs(60), "the initial copy to commit", || {
        let config = config.clone();
        async move { copied_tables(&config).await.len() == 6 }
    })
    .await;
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(
        _cluster.connect("postgres").await.unwrap(),
        stop_writer.clone(),
        3,
        |i| {
            format!(
                "BEGIN; INSERT INTO late VALUES ({id}, 'new'); UPDATE late SET v = 'u{i}' WHERE id = {u};
                     DELETE FROM late WHERE id = {d}; UPDATE trades SET qty = qty + 1 WHERE id = {t}; COMMIT",
                id = 100_000 + i,
                u = 1 + i * 37 % 20_000,
                d = 2 + i * 91 % 20_000,
                t = 1 + i % 1000
            )
        },
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.batch_execute("ALTER PUBLICATION pub ADD TABLE late").await.unwrap();
    wait_until(Duration::from_secs(60), "the new table's copy to commit", || {
        let config = config.clone();
        async move { copied_tables(&config).await.contains_key("public.late") }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_writer.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 50, "the writer ran during the copy");
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("copying tables beside the stream"), "{stderr}");
    sync(&config);
    let point = copied_tables(&config).await["public.late"];
    let late = read_table(&open_lake(&config), "public", "late").await;
    assert_unique_positions(&late);
    assert!(late.rows.iter().all(|r| r.op != "T"), "a new table starts without T");
    let r: Vec<_> = late.rows.iter().filter(|r| r.op == "R").collect();
    assert!(
        !r.is_empty() && r.iter().all(|row| row.lsn as u64 == point.0),
        "R rows at the copy's point"
    );
    assert!(
        late.rows
            .iter()
            .filter(|r| r.op != "R")
            .all(|row| row.lsn as u64 >= point.0),
        "the stream's changes to the new table start at its snapshot point"
    );
    assert!(
        late.rows.iter().any(|row| row.op != "R"),
        "changes streamed after the copy"
    );
    assert_eq!(
        replay(&late, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM late").await,
        "late: lake replay differs from the source"
    );
    assert_all_tables_equal(&c, &config).await;
    let _ = dir;
}

#[tokio::test]
async fn resnapshot_copies_one_table_again_after_a_truncate_marker() {
    let (cluster, c, _dir, config) = setup(5000).await;
    snapshot_keys(&config, "parallelism = 2\npoll_interval = \"300ms\"");
    sync(&config);
    let first = copied_tables(&config).await["public.trades"];
    let out = walshore(&[
        "resnapshot",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "public.nosuch",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ALTER PUBLICATION pub ADD TABLE public.nosuch"),
        "{stderr}"
    );

    let child = spawn_run(&config);
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(
        cluster.connect("postgres").await.unwrap(),
        stop_writer.clone(),
        3,
        |i| {
            format!(
                    "BEGIN; INSERT INTO trades VALUES ({id}, 'NEW', 1, 1.00, now()); UPDATE trades SET qty = qty + 1 WHERE id = {u};
                     DELETE FROM trades WHERE id = {d}; UPDATE only_key SET id = -id WHERE id = {i} + 1; COMMIT",
                    id = 1_000_000 + i, u = 1 + i * 37 % 5000, d = 2 + i * 91 % 5000
        )
        },
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cfg = config.clone();
    let out = tokio::task::spawn_blocking(move || {
        walshore(&[
            "resnapshot",
            "--config",
            cfg.to_str().unwrap(),
            "--table",
            "public.trades",
            "--wait",
        ])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("copied again at snapshot point"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop_writer.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 50, "the writer ran during the copy");
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");
    sync(&config);
    let second = copied_tables(&config).await["public.trades"];
    assert!(second > first, "a new snapshot point");
    let out = walshore(&["status", "--config", config.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tables"]["public.trades"]["snapshot_lsn"], second.to_string(), "{v}");
    let trades = read_table(&open_lake(&config), "public", "trades").await;
    assert_unique_positions(&trades);
    let t: Vec<_> = trades.rows.iter().filter(|r| r.op == "T").collect();
    assert_eq!(t.len(), 1, "one T marker");
    assert_eq!((t[0].lsn as u64, t[0].seq), (second.0 - 1, 0), "T at point - 1");
    let r_after: Vec<_> = trades
        .rows
        .iter()
        .filter(|r| r.op == "R" && r.lsn as u64 == second.0)
        .collect();
    assert!(
        r_after.len() >= 4000,
        "the table copied again: {} R rows",
        r_after.len()
    );
    assert!(
        !std::fs::read_dir(_dir.path().join("lake/_walshore/requests"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "the request is removed once carried out"
    );
    assert_all_tables_equal(&c, &config).await;
}

#[tokio::test]
async fn a_copy_connection_lost_mid_copy_hands_its_chunk_to_the_other_connection() {
    let (_cluster, c, _dir, config) = setup(200_000).await;
    snapshot_keys(&config, "parallelism = 2\nchunk_size = \"256kB\"");
    let cfg = config.clone();
    let sync = tokio::task::spawn_blocking(move || walshore(&["sync", "--config", cfg.to_str().unwrap()]));
    // Terminate one of the two COPY backends while trades (copied last, in ~60 chunks)
    // is being read: the other connection still has chunks to take.
    let mut killed = false;
    // Time-based: on a loaded machine walshore may take a while to reach trades.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline && !sync.is_finished() {
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity
                 WHERE query LIKE 'COPY (SELECT % FROM ONLY \"public\".\"trades\"%' AND state = 'active'
                   AND pid <> pg_backend_pid() LIMIT 1) a",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 1 {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed, "no COPY backend to terminate: the copy ended too soon");
    let out = sync.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("its chunk goes back to the queue"),
        "the lost chunk was handed over: {stderr}"
    );
    // Not copied again from a new snapshot point: every table at the slot's point.
    let points: std::collections::BTreeSet<_> = copied_tables(&config).await.into_values().collect();
    assert_eq!(points.len(), 1, "one snapshot point for all tables: {points:?}");
    assert_all_tables_equal(&c, &config).await;
    let trades = read_table(&open_lake(&config), "public", "trades").await;
    assert_eq!(
        trades.rows.iter().filter(|r| r.op == "R").count(),
        200_000,
        "each row copied once"
    );
}
