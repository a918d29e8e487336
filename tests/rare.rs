//! Exactly once on rare paths, each found by reading the code and reproduced here before
//! it was mended: a commit between transaction boundaries during a copy, many tables
//! leaving (or adopted) while walshore is stopped, a failed read-back of our own commit
//! record, a source that fails in the middle of a large transaction, a start that fails
//! after a copy could have begun, a departure the stream had not reached yet, a table
//! created again without copies after leaving, a publication membership that
//! changes without the table leaving, and a signal while the copier asks the stream
//! for a copy. Each ends with the lake replayed and compared
//! with the source, `(_lsn, _seq)` unique, and no file outside the committed set.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::proxy::{Action, Proxy, Rule};
use support::*;

struct Lab {
    cluster: walshore::cluster::TempCluster,
    client: tokio_postgres::Client,
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// A cluster running `setup`, and a file lake with `extra_sink` and `extra_source`
/// lines (`snapshot.mode = "never"` until [`use_initial_snapshot`]).
async fn lab(settings: &[&str], setup: &str, extra_sink: &str, extra_source: &str) -> Lab {
    let cluster = cluster(settings);
    let client = cluster.connect("postgres").await.unwrap();
    client.batch_execute(setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        extra_sink,
        extra_source,
    );
    Lab {
        cluster,
        client,
        dir,
        config,
    }
}

/// [`lab`] with `trades` in the publication and the lake on the S3 test server: the
/// config reaching it directly, and one (`config`) through a fault proxy.
struct S3Lab {
    l: Lab,
    _moto: Moto,
    proxy: Proxy,
    direct: PathBuf,
    config: PathBuf,
}

async fn s3_lab(prefix: &str) -> S3Lab {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let proxy = Proxy::start(moto.port);
    let l = lab(
        &[],
        "CREATE TABLE trades (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE trades;",
        "",
        "",
    )
    .await;
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix,
    };
    let direct = write_config(
        l.dir.path(),
        &l.cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "",
        "",
    );
    let config = moto.through_proxy(&direct, proxy.port);
    S3Lab {
        l,
        _moto: moto,
        proxy,
        direct,
        config,
    }
}

/// `walshore sync`, which must end within `limit`: (success, stderr).
fn sync_within(config: &Path, limit: Duration, env: &[(&str, &str)]) -> (bool, String) {
    let mut child = std::process::Command::new(BIN)
        .args(["sync", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "walshore sync did not finish within {limit:?}:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), reader.join().unwrap())
}

/// The lake's head commit record.
async fn head(config: &Path) -> walshore::checkpoint::CommitRecord {
    walshore::checkpoint::read_head(open_lake(config).as_ref())
        .await
        .unwrap()
        .expect("a commit record")
}

/// Replays `table` (key `id`) and compares it with `select` on the source; checks
/// `(_lsn, _seq)` is unique.
async fn assert_table_equals(l: &Lab, table: &str, select: &str) -> LakeTable {
    let lake = read_table(&open_lake(&l.config), "public", table).await;
    assert_unique_positions(&lake);
    assert_eq!(
        replay_by_rule(&lake, &["id"]),
        source_rows(&l.client, select).await,
        "{table}: the lake replayed differs from the source"
    );
    lake
}

/// `walshore sync` through `config` succeeds, and then the lake's `trades` replays to the
/// source's, `(_lsn, _seq)` unique, with no file outside the committed set.
async fn sync_then_assert_trades_exact(l: &Lab, config: &Path) {
    let (ok, stderr) = sync_within(config, Duration::from_secs(60), &[]);
    assert!(ok, "{stderr}");
    let lake = read_table(&open_lake(config), "public", "trades").await;
    assert_unique_positions(&lake);
    assert_eq!(
        replay_by_rule(&lake, &["id"]),
        source_rows(&l.client, "SELECT id::text, v FROM trades").await
    );
    assert_no_orphans(config).await;
}

/// Waits for `child` to exit; returns whether it succeeded.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        assert!(
            Instant::now() < deadline,
            "walshore did not exit within {limit:?}:\n{}",
            stderr_of(child)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A copy is ready while a large transaction of its table, cut at `sink.max_buffer`, is
/// half handed to the sink; the copy's commit is followed by a crash. The transaction
/// is streamed again at the restart: had the copy's commit published its first part,
/// that part would be in the lake twice.
#[tokio::test]
async fn a_copy_committed_while_a_large_transaction_is_open_publishes_none_of_it() {
    let l = lab(
        &[],
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, 'copied' FROM generate_series(1, 5000) i;
         CREATE PUBLICATION pub FOR TABLE big;",
        "max_buffer = \"256KiB\"",
        "",
    )
    .await;
    use_initial_snapshot(&l.config, "");
    // The copy's upload waits until the transaction's first part is in the sink, and
    // the batcher waits after handing it over: the copy is ready in between.
    let mut run = spawn_run_with(
        &l.config,
        &[(
            "WALSHORE_FAULT",
            "after_copy_upload@1:sleep=6000,after_flush_in_transaction@1:sleep=12000,after_copy_commit",
        )],
    );
    let _log = LogOnPanic::new(&run);
    wait_until(Duration::from_secs(30), "the slot", || async {
        slot_count(&l.client, false).await == 1
    })
    .await;
    l.client
        .batch_execute("INSERT INTO big SELECT i, repeat('t', 200) FROM generate_series(100001, 110000) i")
        .await
        .unwrap();
    assert!(
        !wait_exit(&mut run, Duration::from_secs(90)),
        "walshore crashed after the copy's commit"
    );
    // The case arose: the transaction's first part was handed over (and the transaction
    // held open) before the copy could commit.
    let stderr = stderr_of(&run);
    let (Some(part), Some(copy)) = (
        stderr.find("fault injected at after_flush_in_transaction"),
        stderr.find("fault injected at after_copy_commit"),
    ) else {
        panic!("the faults were not reached:\n{stderr}");
    };
    assert!(
        part < copy,
        "the copy committed before the transaction's first part came:\n{stderr}"
    );
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(120), &[]);
    assert!(ok, "{stderr}");
    assert_table_equals(&l, "big", "SELECT id::text, v FROM big").await;
    assert_no_orphans(&l.config).await;
}

/// The source fails in the middle of a large transaction whose first part is uploaded,
/// and the commit made as the input closes (here: a new table's OID to record) must not
/// leave that part behind as a file no record names.
#[tokio::test]
async fn a_commit_as_the_input_closes_leaves_no_file_of_the_open_transaction() {
    let l = lab(
        &[],
        "CREATE TABLE base (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES;",
        "max_buffer = \"256KiB\"",
        "",
    )
    .await;
    let proxy = Proxy::start(l.cluster.port);
    let url = l.cluster.url("postgres", "postgres");
    let through = url.replace(&format!(":{}/", l.cluster.port), &format!(":{}/", proxy.port));
    edit_config(&l.config, &url, &through);
    sync(&l.config);
    l.client
        .batch_execute("CREATE TABLE fresh (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // The batcher holds on after the first part; the link is cut meanwhile, in the middle
    // of the transaction (larger than everything the queues hold).
    let run = spawn_run_with(
        &l.config,
        &[("WALSHORE_FAULT", "after_flush_in_transaction@1:sleep=4000")],
    );
    let _log = LogOnPanic::new(&run);
    l.client
        .batch_execute("INSERT INTO fresh SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 30000) i")
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "the batcher to hold", || {
        stderr_of(&run).contains("fault injected at after_flush_in_transaction")
    });
    proxy.cut();
    wait_for(Duration::from_secs(90), "the transaction in the lake", || {
        status(&l.config)["tables"]["public.fresh"]["rows"].as_u64() == Some(30_000)
    });
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert!(stderr.contains("transient failure"), "the cut was retried:\n{stderr}");
    assert_no_orphans(&l.config).await;
    sync(&l.config);
    assert_table_equals(&l, "fresh", "SELECT id::text, v FROM fresh").await;
    assert_no_orphans(&l.config).await;
}

/// 21 copied tables of a lake from before identities are adopted, then 20 of them leave
/// the publication while walshore is stopped (after changes): each start says so per
/// table, records it, and finishes. The departed tables keep every change made before
/// they left.
#[tokio::test]
async fn twenty_departures_or_adoptions_at_a_start_do_not_hang_it() {
    let mut setup = String::new();
    for i in 1..=20 {
        setup += &format!("CREATE TABLE m{i:02} (id int PRIMARY KEY, v text); INSERT INTO m{i:02} VALUES (1, 'a');");
    }
    let list: Vec<String> = (1..=20).map(|i| format!("m{i:02}")).collect();
    setup += &format!(
        "CREATE TABLE keep (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE keep, {};",
        list.join(", ")
    );
    // A hang shows in seconds: a look at the publication that gets no answer fails after
    // the receive timeout.
    let l = lab(&[], &setup, "", "status_interval = \"1s\"\nreceive_timeout = \"5s\"").await;
    use_initial_snapshot(&l.config, "");
    sync(&l.config);
    // As an older walshore left it: no identities.
    let h = head(&l.config).await;
    assert_eq!(h.identities.len(), 21);
    let record = l.dir.path().join(format!("lake/_walshore/commits/{:020}.json", h.seq));
    // The head written whole (as an older walshore writes every record), without them.
    let mut json = serde_json::to_value(&h).unwrap();
    for field in ["identities", "base", "dropped"] {
        json.as_object_mut().unwrap().remove(field);
    }
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(60), &[]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stderr
            .matches("recording the identity of a table copied by an older walshore")
            .count(),
        21,
        "{stderr}"
    );
    assert_eq!(head(&l.config).await.identities.len(), 21);

    let changes: String = list
        .iter()
        .map(|t| format!("INSERT INTO {t} VALUES (2, 'b'); UPDATE {t} SET v = 'last' WHERE id = 1;"))
        .collect();
    l.client.batch_execute(&changes).await.unwrap();
    l.client
        .batch_execute(&format!("ALTER PUBLICATION pub DROP TABLE {}", list.join(", ")))
        .await
        .unwrap();
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(60), &[]);
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("table left the publication").count(), 20, "{stderr}");
    let h = head(&l.config).await;
    assert_eq!(
        h.snapshots.keys().collect::<Vec<_>>(),
        ["public.keep"],
        "the departures are recorded"
    );
    assert_eq!(h.identities.keys().collect::<Vec<_>>(), ["public.keep"]);
    for t in &list {
        assert_table_equals(&l, t, &format!("SELECT id::text, v FROM {t}")).await;
    }
    assert_no_orphans(&l.config).await;
}

/// A table leaves the publication while walshore is stopped, after a backlog of changes;
/// the next start commits part of the backlog and crashes. The departure is not yet
/// recorded then (the stream has not passed it), so the restart still writes the rest of
/// the table's changes.
#[tokio::test]
async fn a_departure_is_recorded_only_once_the_stream_has_passed_it() {
    let l = lab(
        &[],
        "CREATE TABLE side (id int PRIMARY KEY, v text); CREATE TABLE trades (id int PRIMARY KEY, v text);
         INSERT INTO side SELECT i, 'v' FROM generate_series(1, 300) i;
         CREATE PUBLICATION pub FOR TABLE side, trades;",
        "max_buffer = \"8KiB\"",
        "",
    )
    .await;
    use_initial_snapshot(&l.config, "");
    sync(&l.config);
    // A statement of its own: a DO block commits only outside a transaction block.
    l.client
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..300 LOOP
                UPDATE side SET v = 'u' || i WHERE id = i; COMMIT;
             END LOOP; END $$",
        )
        .await
        .unwrap();
    l.client
        .batch_execute("ALTER PUBLICATION pub DROP TABLE side")
        .await
        .unwrap();
    // The first commit of the backlog is made, and the process dies right after it.
    let (ok, stderr) = sync_within(
        &l.config,
        Duration::from_secs(60),
        &[("WALSHORE_FAULT", "after_commit_record@2")],
    );
    assert!(
        !ok && stderr.contains("fault injected at after_commit_record"),
        "{stderr}"
    );
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(60), &[]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("table left the publication"), "{stderr}");
    assert!(!head(&l.config).await.snapshots.contains_key("public.side"));
    assert_table_equals(&l, "side", "SELECT id::text, v FROM side").await;
    assert_no_orphans(&l.config).await;
}

/// Without copies, a table dropped while walshore runs and created again later under
/// its name starts over with a `T` row: its departure keeps its OID.
#[tokio::test]
async fn without_copies_a_table_that_left_and_is_created_again_starts_with_a_truncate() {
    let l = lab(
        &[],
        "CREATE TABLE nightly (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR ALL TABLES",
        "",
        "",
    )
    .await;
    sync(&l.config);
    l.client
        .batch_execute("INSERT INTO nightly SELECT i, 'first' FROM generate_series(1, 400) i")
        .await
        .unwrap();
    sync(&l.config);
    l.client.batch_execute("DROP TABLE nightly").await.unwrap();
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(60), &[]);
    assert!(ok && stderr.contains("table left the publication"), "{stderr}");
    l.client
        .batch_execute(
            "CREATE TABLE nightly (id int PRIMARY KEY, v text);
             INSERT INTO nightly SELECT i, 'second' FROM generate_series(350, 500) i",
        )
        .await
        .unwrap();
    sync(&l.config);
    // Once more, and nothing starts over.
    l.client
        .batch_execute("UPDATE nightly SET v = 'later' WHERE id % 3 = 0")
        .await
        .unwrap();
    sync(&l.config);
    let nightly = assert_table_equals(&l, "nightly", "SELECT id::text, v FROM nightly").await;
    assert_eq!(
        nightly.rows.iter().filter(|r| r.op == "T").count(),
        1,
        "one T row, for the second life"
    );
}

/// A start fails after the initial copy could have begun (looking for tables to copy);
/// no copy of that attempt may go on uploading beside the next one.
#[tokio::test]
async fn a_start_that_fails_leaves_no_copy_running() {
    let l = lab(
        &[],
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, repeat('b', 100) FROM generate_series(1, 2000) i;
         CREATE PUBLICATION pub FOR TABLE big;",
        "",
        "",
    )
    .await;
    use_initial_snapshot(&l.config, "");
    // The first attempt fails; a copy it had started would upload its file after the
    // next attempt cleared what the first one left (that attempt's own copy takes its
    // time, so the process is still there).
    let (ok, stderr) = sync_within(
        &l.config,
        Duration::from_secs(120),
        &[(
            "WALSHORE_FAULT",
            "before_copies_due@1:fail,after_copy_announce@1:sleep=4000,after_copy_announce@2:sleep=8000",
        )],
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("transient failure"), "{stderr}");
    // Whatever the first attempt's copy did has happened by now.
    std::thread::sleep(Duration::from_secs(2));
    assert_no_orphans(&l.config).await;
    assert_table_equals(&l, "big", "SELECT id::text, v FROM big").await;
}

/// A table listed by itself that is also added by its schema, then dropped from the
/// list (still in by its schema), never left the publication: PostgreSQL keeps its own
/// catalog row until it is dropped and streams its changes throughout, so it is not
/// copied again.
#[tokio::test]
async fn a_table_also_added_by_its_schema_is_not_copied_again() {
    let l = lab(
        &[],
        "CREATE SCHEMA s; CREATE TABLE s.a (id int PRIMARY KEY, v text); CREATE TABLE s.b (id int PRIMARY KEY, v text);
         INSERT INTO s.a SELECT i, 'a' FROM generate_series(1, 100) i;
         INSERT INTO s.b SELECT i, 'b' FROM generate_series(1, 100) i;
         CREATE PUBLICATION pub FOR TABLE s.a;",
        "",
        "",
    )
    .await;
    use_initial_snapshot(&l.config, "");
    sync(&l.config);
    let point = || async { head(&l.config).await.snapshots.get("s.a").copied() };
    let first = point().await.expect("s.a copied");
    for step in [
        "ALTER PUBLICATION pub ADD TABLES IN SCHEMA s",
        "ALTER PUBLICATION pub DROP TABLE s.a",
    ] {
        l.client.batch_execute(step).await.unwrap();
        l.client
            .batch_execute("UPDATE s.a SET v = v || '+' WHERE id % 7 = 0; INSERT INTO s.b VALUES (1000 + (random() * 1000)::int, 'n') ON CONFLICT DO NOTHING")
            .await
            .unwrap();
        let (ok, stderr) = sync_within(&l.config, Duration::from_secs(60), &[]);
        assert!(ok, "{stderr}");
        assert!(!stderr.contains("came back"), "{step}: s.a is copied again:\n{stderr}");
        assert_eq!(point().await, Some(first), "{step}: s.a keeps its snapshot point");
    }
    let store = open_lake(&l.config);
    for (t, select) in [
        ("a", "SELECT id::text, v FROM s.a"),
        ("b", "SELECT id::text, v FROM s.b"),
    ] {
        let lake = read_table(&store, "s", t).await;
        assert_unique_positions(&lake);
        assert_eq!(
            replay_by_rule(&lake, &["id"]),
            source_rows(&l.client, select).await,
            "s.{t}"
        );
    }
    assert_no_orphans(&l.config).await;
}

/// Our own commit record is created, its reply is lost (S3 answers 503, and the client's
/// retry finds the record there), and reading it back fails: that is not fencing, and
/// nothing the record names may be deleted.
#[tokio::test]
async fn a_failed_read_back_of_our_own_commit_deletes_nothing() {
    let S3Lab {
        l,
        proxy,
        config,
        _moto,
        ..
    } = s3_lab("readback").await;
    sync(&config);
    l.client
        .batch_execute("INSERT INTO trades SELECT i, 'x' FROM generate_series(1, 1000) i")
        .await
        .unwrap();
    // The run's first commit record is its claim; the second publishes the rows.
    let key = format!("/_walshore/commits/{:020}.json", head(&config).await.seq + 2);
    proxy.set_rules(vec![
        Rule {
            header: Some("if-none-match"),
            ..Rule::new("PUT", &key, Action::LoseReply(503))
        },
        Rule {
            after: Some(0),
            ..Rule::new("GET", &key, Action::Answer(403))
        },
    ]);
    let (_, stderr) = sync_within(&config, Duration::from_secs(120), &[]);
    assert_eq!(proxy.ruled(), 2, "both faults were met:\n{stderr}");
    assert!(!stderr.contains("another walshore"), "taken for fencing:\n{stderr}");
    proxy.set_rules(Vec::new());
    sync_then_assert_trades_exact(&l, &config).await;
}

/// A housekeeping pass fails (the store refuses to list the pending records once); the
/// next pass, an interval later, sweeps as ever: here, another writer's late file.
#[tokio::test]
async fn housekeeping_goes_on_after_a_failed_pass() {
    let S3Lab {
        l: _l,
        proxy,
        direct,
        config,
        _moto,
    } = s3_lab("housekeeping").await;
    let port = free_port();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("mode = \"never\"", "mode = \"never\"\npoll_interval = \"500ms\"")
            + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    sync(&config);
    // The start lists the pending records once (recovery); housekeeping's first pass
    // lists them next, and is refused.
    proxy.set_rules(vec![Rule {
        skip: 1,
        ..Rule::new("GET", "_walshore%2Fpending", Action::Answer(403))
    }]);
    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    wait_for(Duration::from_secs(30), "the refused pass", || proxy.ruled() == 1);
    // Another writer's upload that no commit will name, announced by its own record.
    let store = open_lake(&direct);
    let late = object_store::path::Path::from("public/trades/dt=2026-01-01/late.parquet");
    let record = serde_json::json!({
        "seq": 1,
        "run_id": "otherhost-1-abcd-000000000001",
        "keys": [late.to_string()],
    });
    use object_store::ObjectStoreExt;
    store
        .put(
            &object_store::path::Path::from("_walshore/pending/00000000000000000001-copy-00000000deadbeef.json"),
            serde_json::to_vec(&record).unwrap().into(),
        )
        .await
        .unwrap();
    store.put(&late, b"not committed".to_vec().into()).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the next pass to delete the late file",
        || async { store.head(&late).await.is_err() },
    )
    .await;
    let errors = scrape(port)
        .get("walshore_housekeeping_errors_total")
        .copied()
        .unwrap_or(0.0);
    assert_eq!(errors, 1.0, "the failed pass is counted");
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert!(
        stderr.contains("log housekeeping failed; it runs again at the next interval"),
        "{stderr}"
    );
}

/// A signal while `run` retries a transient failure (S3 answering 503 to everything):
/// it stops at once and exits 0 with a warning, since what it could not commit is
/// still in the slot; the next start writes it.
#[tokio::test]
async fn a_signal_while_retrying_a_transient_failure_stops_cleanly() {
    let S3Lab {
        l,
        proxy,
        config,
        _moto,
        ..
    } = s3_lab("signal").await;
    sync(&config);
    l.client
        .batch_execute("INSERT INTO trades SELECT i, 'x' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    proxy.set(support::proxy::Mode::HttpStatus(503));
    let run = spawn_run(&config);
    wait_for(Duration::from_secs(120), "a transient failure", || {
        stderr_of(&run).contains("transient failure; reconnecting")
    });
    let (code, stderr) = stop(run);
    assert!(
        code.success(),
        "run exits 0 on a signal during a transient failure:\n{stderr}"
    );
    assert!(
        stderr.contains("stopped on a signal during a transient failure"),
        "{stderr}"
    );
    proxy.set(support::proxy::Mode::Forward);
    sync_then_assert_trades_exact(&l, &config).await;
}

/// A table joins the publication while walshore runs, and the copier, about to ask the
/// stream to mark it due, is held there while a signal stops the stream. The stream
/// reads no more requests: the copier's is refused at once and the run stops (it
/// waited for an answer for ever, holding the sink open). The table is copied at the
/// next start.
#[tokio::test]
async fn a_signal_while_the_copier_asks_for_a_copy_stops_cleanly() {
    let l = lab(
        &[],
        "CREATE TABLE trades (id int PRIMARY KEY, v text);
         CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT i, repeat('b', 100) FROM generate_series(1, 2000) i;
         CREATE PUBLICATION pub FOR TABLE trades;",
        "",
        "",
    )
    .await;
    use_initial_snapshot(&l.config, "poll_interval = \"1s\"");
    sync(&l.config);
    let run = spawn_run_with(&l.config, &[("WALSHORE_FAULT", "before_copy_request@1:sleep=6000")]);
    wait_for(Duration::from_secs(60), "the replication stream", || {
        stderr_of(&run).contains("replication started")
    });
    l.client
        .batch_execute("ALTER PUBLICATION pub ADD TABLE big")
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "the copier at its request", || {
        stderr_of(&run).contains("fault injected at before_copy_request")
    });
    let (code, stderr) = stop(run);
    assert!(code.success(), "run exits 0 on a signal:\n{stderr}");
    assert!(
        !stderr.contains("copying tables beside the stream"),
        "the copy was not started after the signal:\n{stderr}"
    );
    sync(&l.config);
    assert_table_equals(&l, "big", "SELECT id::text, v FROM big").await;
    assert_no_orphans(&l.config).await;
}

/// `walshore verify` with no walshore streaming peeks for changes waiting in the slot;
/// a walshore that starts while the peek decodes a large backlog takes the slot and
/// streams, and verify then finds the lake equal.
#[tokio::test]
async fn a_walshore_started_during_verifys_peek_streams_as_ever() {
    let l = lab(
        &[],
        "CREATE TABLE trades (id int PRIMARY KEY, v text); CREATE TABLE noise (id int, v text);
         CREATE PUBLICATION pub FOR TABLE trades;",
        "",
        "",
    )
    .await;
    sync(&l.config);
    // Seconds of WAL to decode (of a table outside the publication), and a few changes.
    l.client
        .batch_execute(
            "INSERT INTO noise SELECT i, 'x' FROM generate_series(1, 3000000) i;
             INSERT INTO trades SELECT i, 'x' || i FROM generate_series(1, 1000) i",
        )
        .await
        .unwrap();
    let mut verify = std::process::Command::new(BIN)
        .args([
            "verify",
            "--config",
            l.config.to_str().unwrap(),
            "--format",
            "json",
            "--timeout",
            "5m",
        ])
        .env("WALSHORE_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "verify's peek", || async {
        let n: i64 = l
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walshore verify'
                 AND state = 'active' AND query LIKE '%peek_binary_changes%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    let (ok, stderr) = sync_within(&l.config, Duration::from_secs(120), &[]);
    assert!(ok, "a sync started during the peek: {stderr}");
    let out = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while verify.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "verify did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        verify.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["result"], "equal", "{report:#}");
    assert_eq!(
        slot_count(&l.client, false).await,
        1,
        "verify's copy of the slot is gone"
    );
    assert_table_equals(&l, "trades", "SELECT id::text, v FROM trades").await;
}

/// A URL's credentials, query or token never show in a log line, an error or a metric
/// label, whichever target it belongs to: the webhook and the SNS endpoint (deliveries
/// failing), the S3 and Glue endpoints and the source URL (starts failing).
#[tokio::test]
async fn secrets_in_urls_never_reach_a_log_line_an_error_or_a_metric() {
    set_fake_aws_env();
    let l = lab(
        &[],
        "CREATE TABLE trades (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE trades;",
        "",
        "",
    )
    .await;
    let closed = free_port();
    let metrics = free_port();
    let secrets = [
        "hookpw-S3CR3T",
        "token-S3CR3T",
        "snspw-S3CR3T",
        "sig-S3CR3T",
        "s3pw-S3CR3T",
        "gluepw-S3CR3T",
        "pgpw-S3CR3T",
    ];
    let notify = format!(
        "\n[notify]\nwebhook = \"http://hook:hookpw-S3CR3T@127.0.0.1:{closed}/in?token=token-S3CR3T\"\n\
         sns_topic_arn = \"arn:aws:sns:us-east-1:123456789012:t\"\n\
         sns_endpoint = \"http://127.0.0.1:{closed}\"\ntimeout = \"1s\"\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
    );
    let text = std::fs::read_to_string(&l.config).unwrap() + &notify;
    std::fs::write(&l.config, &text).unwrap();
    sync(&l.config);
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    l.client
        .batch_execute("INSERT INTO trades VALUES (1, 'a')")
        .await
        .unwrap();
    wait_for(Duration::from_secs(60), "failed deliveries to both targets", || {
        let s = stderr_of(&run);
        s.contains("cannot deliver a notification") && s.contains("error sending request") && s.contains("SNS Publish")
    });
    let scraped = http_get(metrics, "/metrics").unwrap().1;
    let (_, mut printed) = stop(run);
    printed.push_str(&scraped);
    // Starts that fail on each endpoint and on the source.
    let broken = |from: &str, to: String| {
        let path = l.dir.path().join(format!("broken-{}.toml", rand::random::<u32>()));
        let base = std::fs::read_to_string(&l.config).unwrap();
        assert!(base.contains(from), "{from}");
        std::fs::write(&path, base.replace(from, &to)).unwrap();
        path
    };
    let lake_url = format!("url = \"file://{}\"", l.dir.path().join("lake").display());
    let pg_url = l.cluster.url("postgres", "postgres");
    let configs = [
        broken(
            &lake_url,
            format!(
                "url = \"s3://lake/x\"\nregion = \"us-east-1\"\nendpoint = \"http://s3:s3pw-S3CR3T@127.0.0.1:{closed}/?q=s3pw-S3CR3T\"\nrequest_timeout = \"1s\""
            ),
        ),
        broken(
            "[notify]",
            format!(
                "[catalog]\nkind = \"glue\"\ndatabase = \"d\"\nregion = \"us-east-1\"\nendpoint = \"http://glue:gluepw-S3CR3T@127.0.0.1:{closed}/?q=gluepw-S3CR3T\"\n[notify]"
            ),
        ),
        broken(
            &pg_url,
            format!("postgres://postgres:pgpw-S3CR3T@127.0.0.1:{closed}/postgres?sslmode=disable"),
        ),
    ];
    let sns = broken(
        &format!("sns_endpoint = \"http://127.0.0.1:{closed}\""),
        format!("sns_endpoint = \"http://sns:snspw-S3CR3T@127.0.0.1:{closed}/?sig=sig-S3CR3T\""),
    );
    for config in configs.iter().chain([&sns]) {
        for command in ["check", "sync"] {
            let out = walshore(&[command, "--config", config.to_str().unwrap()]);
            // (A start does not wait for notifications: only the configuration may
            // refuse an SNS endpoint.)
            assert!(
                !out.status.success() || *config == sns,
                "{command} with {} succeeded",
                config.display()
            );
            printed.push_str(&String::from_utf8_lossy(&out.stdout));
            printed.push_str(&String::from_utf8_lossy(&out.stderr));
        }
    }
    for secret in secrets {
        assert!(
            !printed.contains(secret),
            "{secret} was printed:\n{}",
            printed
                .lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // What was printed is what went wrong, all the same.
    assert!(printed.contains("127.0.0.1"), "{printed}");
}
