//! The lifecycle soak: `walshore run` under a writer while tables leave the publication
//! and come back, are dropped and created again, copied again on request, and altered,
//! with SIGKILLs at random moments; then one `sync`, and every table replays exactly to
//! the source. `WALSHORE_SOAK_SECS` sets how long the chaos lasts (default 75 s);
//! `WALSHORE_SOAK_SEED` replays a run.

mod support;

use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use support::*;

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
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "poll_interval = \"500ms\"\nchunk_size = \"256kB\"");
    sync(&config);
    let url = cluster.url("postgres", "postgres");
    // Every round changes every table that stays put; side's and evo's changes fail
    // while they are away or being altered, and are retried.
    let writer = SqlLoop::spawn(url.clone(), Duration::from_millis(5), |i| {
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
             UPDATE evo SET v = 'u{i}' WHERE id = {eu};",
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
        )
    });
    let mut run = spawn_run(&config);
    let mut side_out = false;
    let mut nightly_life = 0;
    let mut evo_columns = 0;
    let mut kills = 0;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2500)));
        let event = rng.random_range(0..6);
        match event {
            0 => {
                unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
                run.wait().unwrap();
                kills += 1;
                run = spawn_run(&config);
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
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    sync(&config);
    let store = open_lake(&config);
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
    ] {
        let lake = read_table(&store, "public", table).await;
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
    assert_no_orphans(&config).await;
    // walshore verify, a second oracle, says the same of the lake after its lifetime.
    let out = walshore(&["verify", "--config", config.to_str().unwrap(), "--format", "json"]);
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
    assert_eq!(report["tables"].as_array().unwrap().len(), 6, "{report:#}");
    eprintln!(
        "soak passed: {kills} kills, {nightly_life} rebuilds, {evo_columns} columns added, {rounds} writer rounds"
    );
}
