//! `walshore verify`: equal on a correct lake (every type, the trading schema, tables
//! without a key, unchanged TOAST, a truncate) while a writer runs; and each kind of
//! damage a real lake suffers is found and named.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::kinds::{ROWS, SCHEMA};
use support::*;

/// Runs `walshore verify` with `args`; returns the exit code, stdout and stderr.
fn verify(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["verify", "--config", config.to_str().unwrap()])
        .args(args)
        .env("WALSHORE_LOG", "info")
        .output()
        .expect("run walshore verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `verify --format json`, with its exit code.
fn verify_json(config: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = verify(config, &all);
    let report =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("verify printed no JSON report ({e}): {stderr}"));
    (code, report)
}

fn table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

const TRADING_EXTRA: &str = "
    CREATE TABLE ledger (account text, amount numeric(12,2));
    ALTER TABLE ledger REPLICA IDENTITY FULL;
    CREATE TABLE ticks (symbol text, price float8);
    ALTER PUBLICATION pub ADD TABLE trades, prices, fx_rates, news, ledger, ticks;
    INSERT INTO ledger VALUES ('a', 1), ('a', 1), ('b', 2);
    INSERT INTO ticks VALUES ('X', 'NaN'), ('X', '-0'), ('X', 0), ('X', 0), ('Y', NULL), ('', 1), ('a/b=%c', 2);
    INSERT INTO fx_rates (pair, rate) VALUES ('EURUSD', 1.1), ('GBPUSD', 1.3);
    INSERT INTO prices VALUES ('X', '2026-11-30 10:00+00', 1, 2), ('Y', '2026-11-30 10:00+00', 3, 4);
    -- Bodies past the TOAST threshold that do not compress: an update of the headline
    -- alone leaves them unchanged (not sent).
    INSERT INTO news (headline, body, tags)
        SELECT 'h' || i, (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 300) j), ARRAY['t' || i]
        FROM generate_series(1, 5) i;
    INSERT INTO trades (symbol, side, quantity, price, trader)
        SELECT 'SYM' || (i % 5), 'B', i, i * 1.5, 'T' || (i % 3) FROM generate_series(1, 500) i;";

/// Changes of every kind, streamed.
const CHANGES: &str = "
    UPDATE kinds SET t = t || '!' WHERE id = 1;
    UPDATE kinds SET s = s + 1, dt = dt + 1 WHERE id = 3;
    DELETE FROM kinds WHERE id = 2;
    UPDATE news SET headline = headline || ' (updated)' WHERE id <= 3;
    UPDATE news SET id = id + 100 WHERE id = 4;
    DELETE FROM ledger WHERE ctid = (SELECT min(ctid) FROM ledger WHERE account = 'a');
    UPDATE ledger SET amount = 5 WHERE account = 'b';
    INSERT INTO ticks VALUES ('X', 0);
    TRUNCATE prices;
    INSERT INTO prices VALUES ('Z', '2026-11-30 11:00+00', 5, 6);
    UPDATE fx_rates SET rate = rate * 2;
    DELETE FROM trades WHERE id % 10 = 0;
    UPDATE trades SET price = price + 0.000001 WHERE id % 7 = 0;
    ALTER TABLE fx_rates ADD COLUMN note text;
    UPDATE fx_rates SET note = 'n' WHERE pair = 'EURUSD';
    ALTER TABLE news DROP COLUMN tags;
    UPDATE news SET headline = 'after the drop' WHERE id = 5;";

#[tokio::test]
async fn a_correct_lake_verifies_equal_for_every_type_and_the_trading_schema_under_a_writer() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(SCHEMA).await.unwrap();
    c.batch_execute(ROWS).await.unwrap();
    c.batch_execute(include_str!("../sql/trading.sql")).await.unwrap();
    c.batch_execute(TRADING_EXTRA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "poll_interval = \"500ms\"");
    // A table partitioned by a column's value; the metrics, for the verify gauges.
    let port = free_port();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[partitions]\n\"public.ticks\" = \"column:symbol\"\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    sync(&config);
    c.batch_execute(&format!("{}; {CHANGES}", ROWS.trim().trim_end_matches(';')))
        .await
        .unwrap();

    // Nothing runs now: the changes wait in the slot, so the lake cannot reach the
    // point, and verify says what to do.
    let (code, _, stderr) = verify(&config, &["--timeout", "2s"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("has not reached the verify point") && stderr.contains("start walshore"),
        "{stderr}"
    );

    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    let writer = SqlLoop::spawn(cluster.url("postgres", "postgres"), Duration::from_millis(20), |i| {
        format!(
            "INSERT INTO trades (symbol, side, quantity, price, trader) VALUES ('W{m}', 'S', {i}, {i}.25, 'w');
             UPDATE fx_rates SET rate = rate + 0.0000000001, updated_at = now();
             UPDATE news SET headline = 'w{i}' WHERE id = {n};
             INSERT INTO ledger VALUES ('w', {m}), ('w', {m});
             DELETE FROM ledger WHERE ctid = (SELECT min(ctid) FROM ledger WHERE account = 'w');
             INSERT INTO kinds (i, t) VALUES ({i}, 'w{i}')",
            m = i % 4,
            n = 1 + i % 3
        )
    });
    wait_for(Duration::from_secs(60), "the writer to get going", || {
        writer.rounds() > 20
    });
    for round in 0..2 {
        let (code, report) = verify_json(&config, &[]);
        assert_eq!(code, 0, "round {round}: {report:#}");
        assert_eq!(report["result"], "equal");
        for name in [
            "public.kinds",
            "public.trades",
            "public.prices",
            "public.fx_rates",
            "public.news",
            "public.ledger",
            "public.ticks",
        ] {
            let t = table(&report, name);
            assert_eq!(t["result"], "equal", "{name}: {t:#}");
            assert!(t["source_rows"].as_u64().unwrap() > 0, "{name}: {t:#}");
            assert_eq!(t["source_rows"], t["lake_rows"], "{name}");
        }
        // The writer moved on meanwhile: each round is its own point.
        assert!(table(&report, "public.trades")["lake_changes"].as_u64().unwrap() > 500);
    }
    // The running walshore shows the last verification in its metrics.
    wait_for(Duration::from_secs(30), "the verify gauges", || {
        let m = scrape(port);
        m.get("walshore_verify_tables{result=\"equal\"}") == Some(&7.0)
            && m.get("walshore_verify_tables{result=\"differs\"}") == Some(&0.0)
            && m.get("walshore_verify_finished_timestamp_seconds")
                .is_some_and(|t| *t > 1.7e9)
    });
    let rounds = writer.stop();
    assert!(rounds > 20);
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");

    // The lake did carry unchanged TOAST values forward, and across a key change.
    let store = open_lake(&config);
    let news = read_table(&store, "public", "news").await;
    assert!(
        news.rows.iter().any(|r| r.op == "U" && r.unchanged == ["body"]),
        "no update left the body unchanged: the test would not test carrying forward"
    );
    assert!(news.rows.iter().any(|r| r.op == "I" && r.unchanged == ["body"]));
    let ticks = committed(&config, "public.ticks").await;
    assert!(
        ticks.iter().any(|f| f.partition == "symbol=X"),
        "{:?}",
        ticks[0].partition
    );

    // status shows the last verification.
    let s = status_of(&config);
    assert_eq!(s["last_verify"]["result"], "equal", "{s:#}");
    assert!(s["last_verify"]["point"].as_str().unwrap().contains('/'));
}

fn status_of(config: &Path) -> Value {
    support::status(config)
}

/// The lake a sync leaves for `trades` (of the end-to-end tests) and a keyless table,
/// with several commits of streamed changes.
async fn damaged_lake_fixture() -> (walshore::cluster::TempCluster, tempfile::TempDir, std::path::PathBuf) {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(&format!(
        "{}; CREATE TABLE ledger (account text, amount int); ALTER TABLE ledger REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE trades, ledger; {};
         INSERT INTO ledger SELECT 'a' || (i % 10), i % 3 FROM generate_series(1, 100) i",
        support::trades::TABLE,
        support::trades::insert_sql(1, 2000)
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "");
    sync(&config);
    for k in 0..3 {
        c.batch_execute(&format!(
            "UPDATE trades SET qty = qty + 1 WHERE id % 50 = {k}; DELETE FROM trades WHERE id % 97 = {k};
             {}; DELETE FROM ledger WHERE ctid = (SELECT min(ctid) FROM ledger WHERE account = 'a{k}')",
            support::trades::insert_sql(3000 + k * 100, 3000 + k * 100 + 49)
        ))
        .await
        .unwrap();
        sync(&config);
    }
    (cluster, dir, config)
}

/// The committed files of `table`, in commit order.
async fn committed(config: &Path, table: &str) -> Vec<walshore::sink::WrittenObject> {
    let store = open_lake(config);
    walshore::checkpoint::committed_files(store.as_ref())
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.table == table)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to), "cp -a");
}

#[tokio::test]
async fn each_kind_of_damage_is_found_and_named() {
    let (cluster, dir, config) = damaged_lake_fixture().await;
    let lake = dir.path().join("lake");
    let good = dir.path().join("lake.good");

    // Nothing runs, and everything is in the lake: the slot holds no change before the
    // point, so verify needs no walshore.
    let (code, stdout, stderr) = verify(&config, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("public.trades") && stdout.lines().last().unwrap().contains("2 equal"),
        "{stdout}"
    );
    copy_dir(&lake, &good);
    let files = committed(&config, "public.trades").await;
    let copy_file = files.iter().find(|f| f.first.seq == 0 && f.rows > 100).unwrap().clone();
    let stream_file = files.last().unwrap().clone();
    assert!(stream_file.first.lsn > copy_file.first.lsn);

    // 1. A data file deleted.
    std::fs::remove_file(lake.join(&stream_file.key)).unwrap();
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 1);
    let t = table(&report, "public.trades");
    assert_eq!(t["result"], "differs", "{t:#}");
    assert_eq!(t["files_missing"], 1, "{t:#}");
    assert!(
        t["file_problems"][0].as_str().unwrap().contains(&stream_file.key),
        "{t:#}"
    );
    assert!(t["missing"].as_u64().unwrap() + t["extra"].as_u64().unwrap() + t["differing"].as_u64().unwrap() > 0);
    assert_eq!(table(&report, "public.ledger")["result"], "equal");
    copy_dir(&good, &lake);

    // 2. A file duplicated under another name (another writer's tag): the replay would
    // not see it, a query engine reads it twice.
    let twin = stream_file
        .key
        .replace(".parquet", "")
        .rsplit_once('-')
        .unwrap()
        .0
        .to_owned()
        + "-ffffffffffff.parquet";
    std::fs::copy(lake.join(&stream_file.key), lake.join(&twin)).unwrap();
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 1);
    let t = table(&report, "public.trades");
    assert_eq!(
        (t["result"].as_str(), t["files_stray"].as_u64()),
        (Some("differs"), Some(1)),
        "{t:#}"
    );
    assert!(t["file_problems"][0].as_str().unwrap().contains(&twin), "{t:#}");
    copy_dir(&good, &lake);

    // 3. One value edited in a Parquet file.
    let edited = python_json(
        "damage_lake.py",
        &[
            "edit",
            lake.join(&copy_file.key).to_str().unwrap(),
            "symbol",
            // Row 10: a row no later change rewrites (row 0, id 1, is updated later,
            // and the update's full row rightly hides the edit).
            "10",
            "\"EDITED\"",
            "id",
        ],
    );
    let id = edited["key"].as_i64().unwrap();
    let (code, stdout, _) = verify(&config, &["--table", "public.trades"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("DIFFERS") && stdout.contains("1 differing"), "{stdout}");
    assert!(
        stdout.contains(&format!("differing id={id}  columns: symbol")),
        "{stdout}"
    );
    assert!(!stdout.contains("EDITED"), "values only with --show-values: {stdout}");
    let (_, stdout, _) = verify(&config, &["--table", "public.trades", "--show-values"]);
    assert!(
        stdout.contains("symbol: source SYM") && stdout.contains("lake EDITED"),
        "{stdout}"
    );
    copy_dir(&good, &lake);

    // 4. A commit record removed.
    let records: Vec<_> = std::fs::read_dir(lake.join("_walshore/commits"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut records = records;
    records.sort();
    let middle = records[records.len() / 2].clone();
    std::fs::remove_file(&middle).unwrap();
    let (code, _, stderr) = verify(&config, &[]);
    assert_eq!(code, 1);
    let name = middle.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name) && stderr.contains("missing"), "{stderr}");
    copy_dir(&good, &lake);

    // A resnapshot asked for and not yet carried out: the table's changes would wait
    // for its copy, so it is not compared; the copy done, it is.
    run_ok(
        Command::new(BIN).args([
            "resnapshot",
            "--config",
            config.to_str().unwrap(),
            "--table",
            "public.ledger",
        ]),
        "resnapshot",
    );
    let (code, report) = verify_json(&config, &[]);
    assert_eq!((code, report["result"].as_str()), (1, Some("unverified")), "{report:#}");
    let t = table(&report, "public.ledger");
    assert!(t["reason"].as_str().unwrap().contains("resnapshot"), "{t:#}");
    assert_eq!(table(&report, "public.trades")["result"], "equal");
    sync(&config);
    assert_eq!(verify_json(&config, &[]).0, 0);

    // 5. A table whose changes were skipped: what walshore before the lifetime fix left
    // when a table left the publication and came back (no new copy; its changes while
    // out lost). Made here by removing the new copy from a correct lake.
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "ALTER PUBLICATION pub DROP TABLE trades;
         UPDATE trades SET qty = -1 WHERE id BETWEEN 101 AND 110; DELETE FROM trades WHERE id = 120;
         ALTER PUBLICATION pub ADD TABLE trades",
    )
    .await
    .unwrap();
    // Back in the publication, not copied again yet: not compared.
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 1);
    let t = table(&report, "public.trades");
    assert_eq!(t["result"], "unverified", "{t:#}");
    assert!(t["reason"].as_str().unwrap().contains("came back"), "{t:#}");
    sync(&config);
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 0, "the new build copies the table again: {report:#}");
    let point = status_of(&config)["tables"]["public.trades"]["snapshot_lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    let dropped = python_json(
        "damage_lake.py",
        &["drop-copy", lake.to_str().unwrap(), "public.trades", &point],
    );
    assert!(!dropped["removed"].as_array().unwrap().is_empty());
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 1);
    let t = table(&report, "public.trades");
    assert_eq!(
        (t["differing"].as_u64(), t["extra"].as_u64(), t["missing"].as_u64()),
        (Some(10), Some(1), Some(0)),
        "{t:#}"
    );
    let keys: Vec<&str> = t["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"id=120"), "{keys:?}");
    assert!(
        keys.iter().any(|k| k.starts_with("id=10") || k.starts_with("id=11")),
        "{keys:?}"
    );
    assert_eq!(report["result"], "differs");
    assert!(report["summary"].as_str().unwrap().contains("1 differ"));

    // status remembers it, counts only.
    let s = status_of(&config);
    assert_eq!(s["last_verify"]["result"], "differs", "{s:#}");
    assert_eq!(
        s["last_verify"]["tables_differing"],
        serde_json::json!(["public.trades"]),
        "{s:#}"
    );
}

#[tokio::test]
async fn usage_errors_exit_2_and_a_missing_lake_is_named() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    let (code, _, stderr) = verify(&config, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("has no commit yet") && stderr.contains("run walshore"),
        "{stderr}"
    );
    sync(&config);
    let (code, _, stderr) = verify(&config, &["--table", "public.nope"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("public.nope is not a table of publication"), "{stderr}");
    let (code, _, stderr) = verify(&config, &["--format", "yaml"]);
    assert_eq!(code, 2, "{stderr}");

    // A running walshore on an idle publication: the slot's confirmed position passes
    // the point without any change to commit.
    c.batch_execute("INSERT INTO t VALUES (1), (2)").await.unwrap();
    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    wait_for(Duration::from_secs(60), "the run to commit the rows and idle", || {
        let s = status_of(&config);
        s["tables"]["public.t"]["rows"] == 2 && s["slot"]["active"] == true
    });
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = verify(&config, &["--timeout", "60s"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 rows in the source, 2 in the lake"), "{stdout}");
    eprintln!("verify beside an idle run took {:?}", started.elapsed());
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
}

#[tokio::test]
async fn a_lake_on_s3_verifies_equal_and_an_object_copied_beside_its_files_is_named() {
    use object_store::ObjectStoreExt;
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(&format!(
        "{}; CREATE PUBLICATION pub FOR TABLE trades; {}",
        support::trades::TABLE,
        support::trades::insert_sql(1, 500)
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "verify",
    };
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "",
        "",
    );
    use_initial_snapshot(&config, "");
    // Partitioned by a text column whose values need escaping in an object key.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[partitions]\n\"public.trades\" = \"column:symbol\"\n");
    std::fs::write(&config, text).unwrap();
    sync(&config);
    c.batch_execute(
        "UPDATE trades SET symbol = 'a/b=%' || (id % 2) WHERE id % 3 = 0; DELETE FROM trades WHERE id % 11 = 0",
    )
    .await
    .unwrap();
    sync(&config);
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 0, "{report:#}");
    let t = table(&report, "public.trades");
    assert!(t["lake_files"].as_u64().unwrap() > 3, "{t:#}");
    assert_eq!(t["files_stray"], 0);

    let store = open_lake(&config);
    let file = committed(&config, "public.trades").await.pop().unwrap();
    let from = walshore::sink::key_path(&file.key);
    let to = object_store::path::Path::from(file.key.replace(".parquet", "-copy.parquet"));
    store.copy(&from, &to).await.unwrap();
    let (code, report) = verify_json(&config, &[]);
    assert_eq!(code, 1);
    let t = table(&report, "public.trades");
    assert_eq!(t["files_stray"], 1, "{t:#}");
    assert!(
        t["file_problems"][0].as_str().unwrap().contains("-copy.parquet"),
        "{t:#}"
    );
}
