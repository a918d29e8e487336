//! Bad input: each case gives a clear message naming the fix, the documented exit code,
//! and writes nothing to the lake.

mod support;

use support::*;

fn assert_fails(config: &std::path::Path, code: i32, needles: &[&str]) -> String {
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "exit code; stderr:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "message should mention {n:?}:\n{stderr}");
    }
    stderr
}

fn lake_files(dir: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

async fn db(cluster: &walshore::cluster::TempCluster) -> tokio_postgres::Client {
    let admin = cluster.connect("postgres").await.unwrap();
    admin.batch_execute("CREATE DATABASE t").await.unwrap();
    let c = cluster.connect("t").await.unwrap();
    c.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE a")
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn missing_publication_wrong_password_and_unreachable_host_are_named() {
    let cluster = cluster(&[]);
    let c = db(&cluster).await;
    c.batch_execute("CREATE ROLE rep LOGIN REPLICATION PASSWORD 'right'")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let sink = SinkKind::File(lake.clone());

    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "nope",
        "walshore",
        &sink,
        "",
        "",
    );
    assert_fails(
        &config,
        1,
        &["publication \"nope\" does not exist", "CREATE PUBLICATION"],
    );

    let url = format!("postgres://rep:wrong@127.0.0.1:{}/t?sslmode=disable", cluster.port);
    let config = write_config(dir.path(), &url, "pub", "walshore", &sink, "", "");
    let stderr = assert_fails(&config, 1, &["refused user \"rep\"", "password"]);
    assert!(
        !stderr.contains("wrong"),
        "the password never appears in messages:\n{stderr}"
    );

    let url = format!(
        "postgres://rep:right@127.0.0.1:{}/t?sslmode=disable&connect_timeout=2",
        free_port()
    );
    let config = write_config(dir.path(), &url, "pub", "walshore", &sink, "", "");
    assert_fails(
        &config,
        1,
        &["cannot connect to PostgreSQL at 127.0.0.1", "check source.url"],
    );

    // The right password with SCRAM works.
    let url = format!("postgres://rep:right@127.0.0.1:{}/t?sslmode=disable", cluster.port);
    let config = write_config(dir.path(), &url, "pub", "walshore", &sink, "", "");
    sync(&config);
    assert_eq!(
        lake_files(&lake.join("public")),
        0,
        "nothing but the commit log was written"
    );
}

#[tokio::test]
async fn wal_level_other_than_logical_is_named_with_the_fix() {
    let cluster = cluster(&["wal_level = replica"]);
    let _c = db(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &SinkKind::File(lake.clone()),
        "",
        "",
    );
    assert_fails(
        &config,
        1,
        &[
            "wal_level is \"replica\"",
            "wal_level = logical",
            "rds.logical_replication",
        ],
    );
    assert_eq!(lake_files(&lake), 0, "nothing written");
}

#[tokio::test]
async fn invalid_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\npublication = \"p\"\nslot = \"s\"\n[sink]\nurl = \"file:///tmp/x\"\n";
    let cases = [
        (format!("{base}flush_interval = \"often\"\n"), "sink.flush_interval"),
        (format!("{base}colour = \"blue\"\n"), "colour"),
        (base.replace("file:///tmp/x", "ftp://host/x"), "sink.url"),
        (base.replace("slot = \"s\"", "slot = \"Has-Caps\""), "source.slot"),
        (base.replace("postgres://u@127.0.0.1:1/db", "mysql://x"), "source.url"),
        ("[source]\n".to_string(), "missing field"),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        assert_fails(&path, 2, &[needle]);
    }
    let out = walshore(&["sync", "--config", "/nonexistent/walshore.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/walshore.toml"));
    let out = walshore(&["sync"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[tokio::test]
async fn unwritable_sink_is_named_and_nothing_is_written() {
    let cluster = cluster(&[]);
    let _c = db(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &SinkKind::File(blocker.join("lake")),
        "",
        "",
    );
    assert_fails(&config, 1, &["sink.url", "cannot create directory"]);
    assert_eq!(
        slot_count(&_c, false).await,
        0,
        "no slot was created for a pipeline that cannot write"
    );
}

#[tokio::test]
async fn a_slot_dropped_behind_walshores_back_is_a_definite_error_not_a_silent_gap() {
    let cluster = cluster(&[]);
    let c = db(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &SinkKind::File(lake.clone()),
        "",
        "",
    );
    sync(&config);
    c.batch_execute("INSERT INTO a VALUES (1)").await.unwrap();
    sync(&config);
    // The walsender of the last sync may take a moment to exit and release the slot.
    wait_until(
        std::time::Duration::from_secs(30),
        "the slot to be released",
        || async {
            !c.query_one("SELECT active FROM pg_replication_slots", &[])
                .await
                .unwrap()
                .get::<_, bool>(0)
        },
    )
    .await;
    c.batch_execute("SELECT pg_drop_replication_slot('walshore'); INSERT INTO a VALUES (2)")
        .await
        .unwrap();
    let files_before = lake_files(&lake.join("public"));
    assert_fails(
        &config,
        1,
        &["was missing and has just been created", "initial snapshot"],
    );
    assert_eq!(
        lake_files(&lake.join("public")),
        files_before,
        "nothing written that claims continuity"
    );
    assert_eq!(
        slot_count(&c, false).await,
        0,
        "the slot created by the failed start is dropped again"
    );
}

#[tokio::test]
async fn an_unrepresentable_value_stops_with_table_column_and_lsn_and_is_never_nulled() {
    let cluster = cluster(&[]);
    let c = db(&cluster).await;
    c.batch_execute("CREATE TABLE ev (id int PRIMARY KEY, at timestamptz); ALTER PUBLICATION pub ADD TABLE ev")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &SinkKind::File(lake.clone()),
        "",
        "",
    );
    sync(&config);
    c.batch_execute("INSERT INTO ev VALUES (1, now())").await.unwrap();
    sync(&config);
    c.batch_execute("INSERT INTO ev VALUES (2, 'infinity')").await.unwrap();
    let stderr = assert_fails(
        &config,
        1,
        &["column public.ev.at at lsn", "\"infinity\" cannot be represented"],
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The failing transaction is not in the lake, and it is still there to retry.
    assert_eq!(lake_files(&lake.join("public/ev")), 1);
    assert_fails(&config, 1, &["column public.ev.at"]);
}

#[tokio::test]
async fn two_pipelines_cannot_share_one_sink() {
    let cluster = cluster(&[]);
    let _c = db(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = SinkKind::File(dir.path().join("lake"));
    let config = write_config(dir.path(), &cluster.url("postgres", "t"), "pub", "first", &sink, "", "");
    sync(&config);
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "t"),
        "pub",
        "second",
        &sink,
        "",
        "",
    );
    assert_fails(&config, 1, &["holds the lake of slot \"first\"", "separate sink.url"]);
}
