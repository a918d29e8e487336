//! Tables over a lifetime: a table that leaves the publication and comes back, a table
//! dropped and created again under its name, a copy whose snapshot point waits for a
//! transaction somebody left open, a copy that finishes before the stream reaches its
//! point, and a resnapshot asked for while a copy of the table runs. Each ends with the
//! lake replayed by the documented rule and compared with the source.

mod support;

use std::time::Duration;

use support::*;

const SIDE: &str = "SELECT id::text, v FROM side";
const TRADES: &str = "SELECT id::text, qty::text FROM trades";

struct Lab {
    cluster: walshore::cluster::TempCluster,
    client: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

/// A cluster with `trades` and `side` (300 rows), the publication `publication`, and a
/// file lake copied initially, polling every `poll`.
async fn lab(publication: &str, poll: &str, settings: &[&str]) -> Lab {
    let cluster = cluster(settings);
    let client = cluster.connect("postgres").await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE trades (id bigint PRIMARY KEY, qty int);
             CREATE TABLE side (id int PRIMARY KEY, v text);
             INSERT INTO trades SELECT i, i FROM generate_series(1, 100) i;
             INSERT INTO side SELECT i, 'v' || i FROM generate_series(1, 300) i;
             {publication}"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, &format!("poll_interval = \"{poll}\""));
    Lab {
        cluster,
        client,
        _dir: dir,
        config,
    }
}

/// Inserts, updates and deletes in `side` and `trades`, every few milliseconds.
fn side_writer(l: &Lab) -> SqlLoop {
    SqlLoop::spawn(l.cluster.url("postgres", "postgres"), Duration::from_millis(5), |i| {
        format!(
            "INSERT INTO side VALUES ({id}, 'n{i}'); UPDATE side SET v = 'u{i}' WHERE id = {u};
             DELETE FROM side WHERE id = {d}; INSERT INTO trades VALUES ({t}, {i})",
            id = 1000 + i,
            u = 1 + i * 37 % 300,
            d = 2 + i * 91 % 300,
            t = 10_000 + i
        )
    })
}

fn snapshot_lsn(config: &std::path::Path, table: &str) -> Option<String> {
    status(config)["tables"][table]["snapshot_lsn"]
        .as_str()
        .map(str::to_owned)
}

async fn assert_side_and_trades_equal_the_source(l: &Lab) {
    let store = open_lake(&l.config);
    let side = read_table(&store, "public", "side").await;
    assert_unique_positions(&side);
    assert_eq!(
        replay_by_rule(&side, &["id"]),
        source_rows(&l.client, SIDE).await,
        "side: the lake replayed differs from the source"
    );
    let trades = read_table(&store, "public", "trades").await;
    assert_unique_positions(&trades);
    assert_eq!(
        replay(&trades, Some(&["id"])),
        source_rows(&l.client, TRADES).await,
        "trades: the lake replayed differs from the source"
    );
    assert_no_orphans(&l.config).await;
}

#[tokio::test]
async fn a_table_that_leaves_the_publication_and_comes_back_is_copied_again() {
    let l = lab("CREATE PUBLICATION pub FOR TABLE trades, side", "300ms", &[]).await;
    sync(&l.config);
    let first = snapshot_lsn(&l.config, "public.side").expect("side copied");

    // While walshore runs: the departure is seen, the return copies the table again.
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    let writer = side_writer(&l);
    wait_for(Duration::from_secs(30), "the writer to commit", || writer.rounds() > 20);
    l.client
        .batch_execute("ALTER PUBLICATION pub DROP TABLE side")
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "walshore to see side leave", || {
        stderr_of(&run).contains("table left the publication")
    });
    let out_at = writer.rounds();
    wait_for(Duration::from_secs(30), "changes while side is out", || {
        writer.rounds() > out_at + 50
    });
    l.client
        .batch_execute("ALTER PUBLICATION pub ADD TABLE side")
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "side to be copied again", || {
        snapshot_lsn(&l.config, "public.side").is_some_and(|p| p != first)
    });
    let back_at = writer.rounds();
    wait_for(Duration::from_secs(30), "changes after the copy", || {
        writer.rounds() > back_at + 50
    });
    writer.stop();
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    sync(&l.config);
    assert_side_and_trades_equal_the_source(&l).await;
    let second = snapshot_lsn(&l.config, "public.side").unwrap();

    // While walshore is stopped: the table leaves, changes, and comes back before the
    // next start. Only the publication's new membership row tells; that is enough.
    l.client
        .batch_execute(
            "ALTER PUBLICATION pub DROP TABLE side;
             UPDATE side SET v = 'while out' WHERE id % 10 = 0; DELETE FROM side WHERE id % 10 = 1;
             INSERT INTO side SELECT i, 'out' FROM generate_series(5000, 5100) i;
             ALTER PUBLICATION pub ADD TABLE side;
             UPDATE side SET v = 'back' WHERE id % 10 = 2",
        )
        .await
        .unwrap();
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("table came back to the publication"), "{stderr}");
    let third = snapshot_lsn(&l.config, "public.side").unwrap();
    assert_ne!(third, second, "copied again at a new point");
    assert_side_and_trades_equal_the_source(&l).await;
    // The copy starts with a T row just before its point.
    let side = read_table(&open_lake(&l.config), "public", "side").await;
    let point: walshore::lsn::Lsn = third.parse().unwrap();
    assert!(
        side.rows
            .iter()
            .any(|r| r.op == "T" && r.lsn as u64 == point.0 - 1 && r.seq == 0),
        "T row at the new point - 1"
    );
}

#[tokio::test]
async fn a_table_dropped_and_created_again_under_its_name_starts_over() {
    let l = lab("CREATE PUBLICATION pub FOR ALL TABLES", "300ms", &[]).await;
    l.client
        .batch_execute("CREATE TABLE nightly (id int PRIMARY KEY, v text); INSERT INTO nightly SELECT i, 'first life' FROM generate_series(1, 400) i")
        .await
        .unwrap();
    sync(&l.config);
    let before = status(&l.config);
    let old_oid = before["tables"]["public.nightly"]["oid"]
        .as_u64()
        .expect("oid recorded");
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    let writer = side_writer(&l);
    wait_for(Duration::from_secs(30), "the writer to commit", || writer.rounds() > 20);
    // The nightly rebuild: dropped, created again, filled, then changed.
    l.client
        .batch_execute(
            "DROP TABLE nightly; CREATE TABLE nightly (id int PRIMARY KEY, v text);
             INSERT INTO nightly SELECT i, 'second life' FROM generate_series(301, 550) i;
             UPDATE nightly SET v = 'changed' WHERE id % 7 = 0",
        )
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "the new nightly to be copied", || {
        status(&l.config)["tables"]["public.nightly"]["oid"]
            .as_u64()
            .is_some_and(|o| o != old_oid)
    });
    l.client
        .batch_execute("DELETE FROM nightly WHERE id < 320; UPDATE nightly SET v = 'after' WHERE id % 11 = 0")
        .await
        .unwrap();
    writer.stop();
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert!(stderr.contains("table created again under its name"), "{stderr}");
    sync(&l.config);
    let nightly = read_table(&open_lake(&l.config), "public", "nightly").await;
    assert_unique_positions(&nightly);
    assert_eq!(
        replay_by_rule(&nightly, &["id"]),
        source_rows(&l.client, "SELECT id::text, v FROM nightly").await,
        "nightly: only its second life"
    );
    assert!(
        nightly.rows.iter().any(|r| r.op == "T"),
        "the second life starts with T"
    );
    assert_side_and_trades_equal_the_source(&l).await;
}

#[tokio::test]
async fn without_copies_a_table_created_again_under_its_name_starts_with_a_truncate() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE nightly (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    sync(&config);
    c.batch_execute("INSERT INTO nightly SELECT i, 'first' FROM generate_series(1, 400) i")
        .await
        .unwrap();
    sync(&config);
    c.batch_execute(
        "DROP TABLE nightly; CREATE TABLE nightly (id int PRIMARY KEY, v text);
         INSERT INTO nightly SELECT i, 'second' FROM generate_series(350, 500) i",
    )
    .await
    .unwrap();
    sync(&config);
    // A restart must not start it over again.
    c.batch_execute("UPDATE nightly SET v = 'later' WHERE id % 3 = 0")
        .await
        .unwrap();
    sync(&config);
    let nightly = read_table(&open_lake(&config), "public", "nightly").await;
    assert_unique_positions(&nightly);
    let truncates: Vec<_> = nightly.rows.iter().filter(|r| r.op == "T").collect();
    assert_eq!(truncates.len(), 1, "one T row, for the second life");
    assert_eq!(
        replay(&nightly, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM nightly").await,
        "nightly: the second life only"
    );
}

/// Seconds since the Unix epoch of a log line's timestamp (`2026-11-30T19:17:51.38Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let clean: String = strip_ansi(line);
    let ts = clean.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s): (f64, f64, f64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let days = walshore::batch::days_from_civil(y, m as u32, day as u32);
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + s)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn a_copy_waiting_for_an_open_transaction_stops_no_other_table() {
    let l = lab("CREATE PUBLICATION pub FOR TABLE trades", "300ms", &[]).await;
    edit_config(&l.config, "flush_interval = \"200ms\"", "flush_interval = \"500ms\"");
    sync(&l.config);
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    let writer = SqlLoop::spawn(l.cluster.url("postgres", "postgres"), Duration::from_millis(20), |i| {
        format!("INSERT INTO trades VALUES ({}, {i})", 10_000 + i)
    });
    wait_for(Duration::from_secs(30), "the writer to commit", || writer.rounds() > 20);
    // Somebody leaves a transaction open (it has written, so it holds a transaction id).
    let idle = l.cluster.connect("postgres").await.unwrap();
    idle.batch_execute("BEGIN; UPDATE side SET v = 'held' WHERE id = 1")
        .await
        .unwrap();
    let idle_pid: i32 = idle.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let held_from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    l.client
        .batch_execute("ALTER PUBLICATION pub ADD TABLE side")
        .await
        .unwrap();
    // The copy of side waits for its point; walshore says so, and status shows who.
    wait_for(Duration::from_secs(30), "the wait to be reported", || {
        stderr_of(&run).contains("a table copy waits for its snapshot point")
    });
    let s = status(&l.config);
    let waiting = s["copies_waiting"].as_array().expect("copies_waiting");
    assert_eq!(waiting.len(), 1, "{s}");
    let blockers = waiting[0]["waits_for"].as_array().expect("waits_for");
    assert!(
        blockers
            .iter()
            .any(|b| b["pid"] == idle_pid && b["state"] == "idle in transaction"),
        "status names the open transaction: {s}"
    );
    assert!(stderr_of(&run).contains(&format!("pid {idle_pid} (idle in transaction")));
    std::thread::sleep(Duration::from_secs(6));
    let held_until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    idle.batch_execute("COMMIT").await.unwrap();
    wait_for(Duration::from_secs(60), "side's copy to commit", || {
        snapshot_lsn(&l.config, "public.side").is_some()
    });
    writer.stop();
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    // trades kept committing while the copy waited: no gap between two commits longer
    // than flush_interval + 1 s.
    let commits: Vec<f64> = stderr
        .lines()
        .filter(|l| l.contains(" committed ") || strip_ansi(l).contains(": committed"))
        .filter_map(log_time)
        .filter(|t| *t >= held_from && *t <= held_until)
        .collect();
    assert!(
        commits.len() >= 8,
        "trades committed while the copy waited ({} commits)",
        commits.len()
    );
    let mut bounds = vec![held_from];
    bounds.extend(&commits);
    bounds.push(held_until);
    let gap = bounds.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(
        gap <= 1.5,
        "a gap of {gap:.2} s between commits while the copy waited (flush_interval 500 ms)"
    );
    sync(&l.config);
    assert_side_and_trades_equal_the_source(&l).await;
}

#[tokio::test]
async fn a_copy_that_finishes_before_the_stream_brings_its_point_strands_nothing() {
    // The sink is slowed (every S3 answer late) so that the stream backs up behind it,
    // while a small table's copy finishes fast: the copy's result reaches the sink long
    // before the stream's events about that table do.
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let proxy = support::proxy::Proxy::start(moto.port);
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE trades (id bigint PRIMARY KEY, qty int, pad text);
         CREATE TABLE late (id int PRIMARY KEY, v text);
         INSERT INTO late SELECT i, 'v' || i FROM generate_series(1, 50) i;
         CREATE PUBLICATION pub FOR TABLE trades",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "race",
    };
    let direct = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "",
        "",
    );
    use_initial_snapshot(&direct, "poll_interval = \"300ms\"");
    let slow_dir = dir.path().join("slow");
    std::fs::create_dir_all(&slow_dir).unwrap();
    let slow = write_config(
        &slow_dir,
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "max_buffer = \"128KiB\"",
        "",
    );
    use_initial_snapshot(&slow, "poll_interval = \"300ms\"");
    edit_config(&slow, &moto.endpoint(), &format!("http://127.0.0.1:{}", proxy.port));
    sync(&direct);
    let run = spawn_run(&slow);
    let _log = LogOnPanic::new(&run);
    let writer = SqlLoop::spawn(cluster.url("postgres", "postgres"), Duration::from_millis(5), |i| {
        format!(
            "INSERT INTO trades SELECT {i} * 100 + g, g, repeat('p', 200) FROM generate_series(0, 19) g;
             INSERT INTO late VALUES ({}, 'w{i}'); UPDATE late SET v = 'u{i}' WHERE id = {};",
            1000 + i,
            1 + i % 50
        )
    });
    wait_for(Duration::from_secs(30), "the writer to commit", || writer.rounds() > 20);
    proxy.set(support::proxy::Mode::Delay(Duration::from_millis(150)));
    std::thread::sleep(Duration::from_secs(2));
    c.batch_execute("ALTER PUBLICATION pub ADD TABLE late").await.unwrap();
    wait_for(Duration::from_secs(120), "late to be copied", || {
        status(&direct)["tables"]["public.late"]["snapshot_lsn"].is_string()
    });
    std::thread::sleep(Duration::from_secs(2));
    proxy.set(support::proxy::Mode::Forward);
    let copied_at = writer.rounds();
    wait_for(Duration::from_secs(30), "changes to late after its copy", || {
        writer.rounds() > copied_at + 100
    });
    writer.stop();
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert!(
        stderr.contains("copy uploaded before the stream reached its point"),
        "the race this test is about took place: {stderr}"
    );
    sync(&direct);
    let lake = read_table(&open_lake(&direct), "public", "late").await;
    assert_unique_positions(&lake);
    assert_eq!(
        replay(&lake, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM late").await,
        "late: every change after its copy is in the lake"
    );
    assert_no_orphans(&direct).await;
}

#[tokio::test]
async fn a_resnapshot_asked_for_while_a_copy_of_the_table_runs_waits_for_a_copy_of_its_own() {
    let l = lab("CREATE PUBLICATION pub FOR TABLE trades, side", "300ms", &[]).await;
    sync(&l.config);
    // The first copy of this run holds on after its upload, long enough to ask again.
    let run = spawn_run_with(&l.config, &[("WALSHORE_FAULT", "after_copy_upload:sleep=4000")]);
    let _log = LogOnPanic::new(&run);
    let config = l.config.to_str().unwrap().to_owned();
    let out = walshore(&["resnapshot", "--config", &config, "--table", "public.side"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(30), "the first copy to start", || {
        stderr_of(&run).contains("copying tables beside the stream")
    });
    let first: String = {
        let log = strip_ansi(&stderr_of(&run));
        let line = log
            .lines()
            .find(|l| l.contains("copying tables beside the stream"))
            .unwrap()
            .to_owned();
        line.split("snapshot_point=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert!(
        snapshot_lsn(&l.config, "public.side").unwrap() != first,
        "the first copy is still running"
    );
    l.client
        .batch_execute("UPDATE side SET v = 'after the first copy began' WHERE id < 50")
        .await
        .unwrap();
    let waited =
        std::thread::spawn(move || walshore(&["resnapshot", "--config", &config, "--table", "public.side", "--wait"]));
    let out = waited.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reported: walshore::lsn::Lsn = stdout
        .split("snapshot point ")
        .nth(1)
        .unwrap_or_else(|| panic!("no point in {stdout:?}"))
        .trim()
        .parse()
        .unwrap();
    let first: walshore::lsn::Lsn = first.parse().unwrap();
    assert!(
        reported > first,
        "--wait reported {reported}, the point of a copy taken before the request ({first})"
    );
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert_eq!(
        strip_ansi(&stderr).matches("copying tables beside the stream").count(),
        2,
        "two copies: {stderr}"
    );
    sync(&l.config);
    assert_side_and_trades_equal_the_source(&l).await;
}
