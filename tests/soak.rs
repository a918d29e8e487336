//! The lifecycle soak: `walshore run` under a writer while tables leave the publication
//! and come back, are dropped and created again, copied again on request, and altered,
//! while large transactions are cut at `sink.max_buffer` beside the copies, 21 tables
//! leave at once while walshore is down (and come back), and the S3 test server fails
//! commit PUTs (the reply lost) and the read-backs after them, with SIGKILLs at random
//! moments; then one `sync`, and every table replays exactly to the source, `(_lsn,
//! _seq)` is unique in every table of the lake, and no file lies outside the committed
//! set. `WALSHORE_SOAK_SECS` sets how long the chaos lasts (default 75 s);
//! `WALSHORE_SOAK_SEED` replays a run.

mod support;

use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use support::proxy::{Action, Proxy, Rule};
use support::*;

/// The tables that leave the publication together while walshore is down.
const MANY: usize = 21;

fn many() -> Vec<String> {
    (1..=MANY).map(|i| format!("m{i:02}")).collect()
}

/// S3 faults on the commit log for a moment: a commit record created whose reply is
/// lost (the client's retry finds it there), the read-back of it failing past the
/// client's own retries, and a few plain 503s on commit PUTs.
fn commit_faults() -> Vec<Rule> {
    vec![
        Rule {
            header: Some("if-none-match"),
            ..Rule::new("PUT", "/_walshore/commits/", Action::LoseReply(503))
        },
        Rule {
            times: 12,
            after: Some(0),
            ..Rule::new("GET", "/_walshore/commits/", Action::Answer(503))
        },
        Rule {
            skip: 2,
            times: 3,
            after: Some(1),
            ..Rule::new("PUT", "/_walshore/", Action::Answer(503))
        },
    ]
}

const SCHEMA: &str = "
CREATE TABLE trades (id bigint PRIMARY KEY, qty int, note text);
CREATE TABLE side (id int PRIMARY KEY, v text);
CREATE TABLE nightly (id int PRIMARY KEY, v text);
CREATE TABLE evo (id int PRIMARY KEY, v text);
CREATE TABLE big (id int PRIMARY KEY, v text);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
INSERT INTO side SELECT i, 's' || i FROM generate_series(1, 500) i;
INSERT INTO nightly SELECT i, 'n' || i FROM generate_series(1, 500) i;
INSERT INTO evo SELECT i, 'e' || i FROM generate_series(1, 500) i;
INSERT INTO big SELECT i, repeat('b', 100) FROM generate_series(1, 20000) i;
CREATE PUBLICATION pub FOR TABLE trades, side, nightly, evo, big, nokey;";

/// The tables of [`many`], each with rows, in the publication.
fn many_schema() -> String {
    let mut sql = String::new();
    for t in many() {
        sql.push_str(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} SELECT i, 'm' FROM generate_series(1, 50) i;"
        ));
    }
    sql.push_str(&format!("ALTER PUBLICATION pub ADD TABLE {};", many().join(", ")));
    sql
}

#[tokio::test]
async fn a_lifecycle_of_leaves_returns_rebuilds_resnapshots_alters_and_kills_ends_exact() {
    let secs: u64 = std::env::var("WALSHORE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(75);
    let seed: u64 = std::env::var("WALSHORE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("soak: {secs} s, seed {seed} (WALSHORE_SOAK_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cluster = cluster(&["logical_decoding_work_mem = 64kB"]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(SCHEMA).await.unwrap();
    c.batch_execute(&many_schema()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The lake on the S3 test server; walshore reaches it through a proxy that fails
    // requests of the commit log now and then, the checks at the end directly.
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let proxy = Proxy::start(moto.port);
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "soak",
    };
    // Large transactions are cut into several files at max_buffer.
    let direct = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "max_buffer = \"256KiB\"\nrequest_timeout = \"5s\"",
        "",
    );
    use_initial_snapshot(&direct, "poll_interval = \"500ms\"\nchunk_size = \"256kB\"");
    let config = moto.through_proxy(&direct, proxy.port);
    sync(&config);
    let url = cluster.url("postgres", "postgres");
    // Every round changes every table that stays put; side's and evo's changes fail
    // while they are away or being altered, and are retried.
    let writer = SqlLoop::spawn(url.clone(), Duration::from_millis(5), |i| {
        let m = format!("m{:02}", 1 + i % MANY as u64);
        // Now and then a transaction of several MiB: files cut mid-way at max_buffer,
        // held for copies when its tables are being copied.
        let large = if i % 40 == 39 {
            format!(
                "BEGIN; UPDATE big SET v = repeat('L', 200) || '{i}' WHERE id % 4 = {r}; INSERT INTO trades SELECT 10000000 + {i} * 1000 + g, g, 'large' FROM generate_series(1, 500) g; COMMIT;",
                r = i / 40 % 4
            )
        } else {
            String::new()
        };
        format!(
            "BEGIN;
             INSERT INTO trades VALUES ({i}, {q}, 'n') ON CONFLICT (id) DO NOTHING; UPDATE trades SET qty = qty + 1 WHERE id = {u};
             DELETE FROM trades WHERE id = {d};
             INSERT INTO big VALUES ({b}, 'new') ON CONFLICT (id) DO UPDATE SET v = 'again';
             UPDATE big SET v = 'u{i}' WHERE id = {bu};
             INSERT INTO nokey VALUES ({k}, 'x'); DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a = {kd} LIMIT 1);
             COMMIT;
             INSERT INTO side VALUES ({s}, 'w') ON CONFLICT (id) DO UPDATE SET v = 'w{i}';
             UPDATE side SET v = 'u{i}' WHERE id = {su}; DELETE FROM side WHERE id = {sd};
             UPDATE evo SET v = 'u{i}' WHERE id = {eu};
             INSERT INTO {m} VALUES ({mi}, 'w{i}') ON CONFLICT (id) DO UPDATE SET v = 'again{i}';
             {large}",
            q = i % 100,
            u = i.saturating_sub(7),
            d = i.saturating_sub(13),
            b = 20_000 + i % 3000,
            bu = 1 + i * 7 % 20_000,
            k = i % 50,
            kd = (i + 25) % 50,
            s = 1000 + i,
            su = 1 + i * 37 % 500,
            sd = 2 + i * 91 % 500,
            eu = 1 + i % 500,
            mi = 100 + i % 200,
        )
    });
    let mut run = spawn_run(&config);
    // Whichever run is the current one shows its log if the soak fails.
    let mut _log = LogOnPanic::new(&run);
    let mut side_out = false;
    let mut many_out = false;
    let mut faults = 0;
    let mut nightly_life = 0;
    let mut evo_columns = 0;
    let mut kills = 0;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2500)));
        let event = rng.random_range(0..9);
        match event {
            0 => {
                unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
                run.wait().unwrap();
                kills += 1;
                run = spawn_run(&config);
                _log = LogOnPanic::new(&run);
                events.push("kill");
            }
            1 => {
                let op = if side_out { "ADD" } else { "DROP" };
                c.batch_execute(&format!("ALTER PUBLICATION pub {op} TABLE side"))
                    .await
                    .unwrap();
                side_out = !side_out;
                events.push(if side_out { "side leaves" } else { "side returns" });
            }
            2 => {
                nightly_life += 1;
                c.batch_execute(&format!(
                    "DROP TABLE nightly; CREATE TABLE nightly (id int PRIMARY KEY, v text);
                     INSERT INTO nightly SELECT i, 'life {nightly_life}' FROM generate_series({f}, {f} + 400) i;
                     ALTER PUBLICATION pub ADD TABLE nightly;",
                    f = nightly_life * 100
                ))
                .await
                .unwrap();
                events.push("nightly rebuilt");
            }
            3 => {
                let out = walshore(&[
                    "resnapshot",
                    "--config",
                    config.to_str().unwrap(),
                    "--table",
                    "public.big",
                ]);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                events.push("big resnapshot");
            }
            5 => {
                if many_out {
                    c.batch_execute(&format!("ALTER PUBLICATION pub ADD TABLE {}", many().join(", ")))
                        .await
                        .unwrap();
                    events.push("many return");
                } else {
                    // All at once while walshore is down.
                    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
                    run.wait().unwrap();
                    kills += 1;
                    c.batch_execute(&format!("ALTER PUBLICATION pub DROP TABLE {}", many().join(", ")))
                        .await
                        .unwrap();
                    run = spawn_run(&config);
                    _log = LogOnPanic::new(&run);
                    events.push("many leave while down");
                }
                many_out = !many_out;
            }
            6 | 7 => {
                proxy.set_rules(commit_faults());
                std::thread::sleep(Duration::from_millis(rng.random_range(1000..4000)));
                proxy.set_rules(Vec::new());
                faults = proxy.ruled();
                events.push("s3 faults on the commit log");
            }
            4 => {
                evo_columns += 1;
                c.batch_execute(&format!(
                    "ALTER TABLE evo ADD COLUMN c{evo_columns} text; UPDATE evo SET c{evo_columns} = 'c' || id WHERE id % 3 = 0"
                ))
                .await
                .unwrap();
                events.push("evo altered");
            }
            _ => events.push("quiet"),
        }
        if let Some(status) = run.try_wait().unwrap() {
            panic!("walshore run exited ({status}) during the soak:\n{}", stderr_of(&run));
        }
    }
    eprintln!("soak events: {events:?}");
    let rounds = writer.stop();
    assert!(rounds > 100, "the writer kept committing ({rounds} rounds)");
    if side_out {
        c.batch_execute("ALTER PUBLICATION pub ADD TABLE side").await.unwrap();
    }
    if many_out {
        c.batch_execute(&format!("ALTER PUBLICATION pub ADD TABLE {}", many().join(", ")))
            .await
            .unwrap();
    }
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    sync(&config);
    let store = open_lake(&direct);
    let evo_cols: Vec<String> = (1..=evo_columns).map(|k| format!("c{k}")).collect();
    let mut evo_select = vec!["id::text".to_owned(), "v".to_owned()];
    evo_select.extend(evo_cols.iter().cloned());
    for (table, key, select) in [
        (
            "trades",
            Some(&["id"][..]),
            "SELECT id::text, qty::text, note FROM trades".to_owned(),
        ),
        ("side", Some(&["id"][..]), "SELECT id::text, v FROM side".to_owned()),
        (
            "nightly",
            Some(&["id"][..]),
            "SELECT id::text, v FROM nightly".to_owned(),
        ),
        ("big", Some(&["id"][..]), "SELECT id::text, v FROM big".to_owned()),
        (
            "evo",
            Some(&["id"][..]),
            format!("SELECT {} FROM evo", evo_select.join(", ")),
        ),
        ("nokey", None, "SELECT a::text, b FROM nokey".to_owned()),
    ]
    .into_iter()
    .map(|(t, k, q)| (t.to_owned(), k, q))
    .chain(many().into_iter().map(|t| {
        let q = format!("SELECT id::text, v FROM {t}");
        (t, Some(&["id"][..]), q)
    })) {
        let lake = read_table(&store, "public", &table).await;
        assert_unique_positions(&lake);
        let replayed = match key {
            Some(k) => replay_by_rule(&lake, k),
            None => replay(&lake, None),
        };
        assert_eq!(
            replayed,
            source_rows(&c, &select).await,
            "{table} differs from the source after the soak (seed {seed}; events {events:?})"
        );
    }
    // Every table of the lake, whatever the publication holds now.
    let tables: std::collections::BTreeSet<String> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet"))
        .map(|m| m.location.as_ref().split('/').take(2).collect::<Vec<_>>().join("/"))
        .collect();
    assert!(tables.len() >= 6 + MANY, "{tables:?}");
    for t in &tables {
        let (schema, table) = t.split_once('/').unwrap();
        assert_unique_positions(&read_table(&store, schema, table).await);
    }
    assert_no_orphans(&direct).await;
    // walshore verify, a second oracle, says the same of the lake after its lifetime.
    let out = walshore(&["verify", "--config", direct.to_str().unwrap(), "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["result"] == "equal",
        "verify after the soak (seed {seed}): {report:#}"
    );
    assert_eq!(report["tables"].as_array().unwrap().len(), 6 + MANY, "{report:#}");
    eprintln!(
        "soak passed: {kills} kills, {nightly_life} rebuilds, {evo_columns} columns added, {faults} S3 faults served, {rounds} writer rounds"
    );
}
