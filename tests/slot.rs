//! The slot never holds WAL for nothing: while the published tables are idle and
//! other tables, or another database, write WAL, walshore keeps confirming, so the
//! slot's retained WAL stays bounded. And `check` warns before max_slot_wal_keep_size
//! would invalidate the slot.

mod support;

use std::time::Duration;

use support::trades::*;
use support::*;

/// (pg_current_wal_lsn − confirmed_flush_lsn, pg_current_wal_lsn − restart_lsn).
async fn held(client: &tokio_postgres::Client) -> (i64, i64) {
    let r = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = 'walshore'",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn wal_written_while(client: &tokio_postgres::Client, work: impl std::future::Future<Output = ()>) -> i64 {
    let before: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    work.await;
    client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&before],
        )
        .await
        .unwrap()
        .get(0)
}

/// The slot's confirmed position follows the server at once; its restart_lsn follows
/// once PostgreSQL logs its next running-transactions record (every 15 s while WAL is
/// written, and at checkpoints) and walshore confirms past it.
async fn settles(client: &tokio_postgres::Client, what: &str, written: i64) {
    let started = std::time::Instant::now();
    let (confirmed, _) = held(client).await;
    eprintln!(
        "{what}: {} MiB written; confirmed_flush_lsn {confirmed} B behind",
        written >> 20
    );
    assert!(
        confirmed < 1 << 20,
        "{what}: confirmed_flush_lsn follows the server: {confirmed} B behind"
    );
    // A checkpoint of its own would log one at once; waiting shows the ordinary course.
    wait_until(
        Duration::from_secs(90),
        &format!("{what}: the slot's restart_lsn to follow"),
        || async { held(client).await.1 < 1 << 20 },
    )
    .await;
    eprintln!(
        "{what}: restart_lsn within 1 MiB of the server after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// About 40 MiB of WAL into `table` (through `client`), in 40 transactions over 4 s.
async fn pad(client: &tokio_postgres::Client, table: &str) {
    for i in 0..40 {
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT g, repeat('x', 500) FROM generate_series({}, {}) g",
                i * 2000,
                i * 2000 + 1999
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_idle_publication_holds_no_wal_while_other_tables_and_databases_write() {
    let e = env(&[]).await;
    e.client
        .batch_execute("CREATE TABLE unpublished (id bigint, pad text)")
        .await
        .unwrap();
    let admin = e.cluster.connect("postgres").await.unwrap();
    admin.batch_execute("CREATE DATABASE elsewhere").await.unwrap();
    let elsewhere = e.cluster.connect("elsewhere").await.unwrap();
    elsewhere
        .batch_execute("CREATE TABLE heartbeat (id bigint, pad text)")
        .await
        .unwrap();
    let config = e.file_config("", "status_interval = \"1s\"\nreceive_timeout = \"10s\"");
    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    wait_until(Duration::from_secs(60), "the slot", || async {
        slot_count(&e.client, true).await == 1
    })
    .await;
    e.client.batch_execute(&insert_sql(1, 10)).await.unwrap();

    // (a) Only an unpublished table of the same database changes.
    let written = wal_written_while(&e.client, pad(&e.client, "unpublished")).await;
    assert!(written > 32 << 20, "the test wrote enough WAL: {written}");
    settles(&e.client, "unpublished table", written).await;

    // (b) Another database writes, this one is idle (RDS's rdsadmin heartbeat, say).
    let written = wal_written_while(&e.client, pad(&elsewhere, "heartbeat")).await;
    assert!(written > 32 << 20, "the test wrote enough WAL: {written}");
    settles(&e.client, "other database", written).await;

    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

#[tokio::test]
async fn check_warns_before_max_slot_wal_keep_size_invalidates_the_slot() {
    let e = env(&["max_slot_wal_keep_size = 64MB"]).await;
    e.client
        .batch_execute("CREATE TABLE unpublished (id bigint, pad text)")
        .await
        .unwrap();
    let config = e.file_config("", "");
    sync(&config);
    let check = |expect: &str| {
        let out = walshore(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(expect), "check should say {expect:?}:\n{text}");
        text
    };
    check("before max_slot_wal_keep_size (64 MiB) invalidates it");
    // walshore is stopped and the server writes on: the slot nears its limit.
    for i in 0..12 {
        e.client
            .batch_execute(&format!(
                "INSERT INTO unpublished SELECT g, repeat('x', 500) FROM generate_series({}, {}) g",
                i * 10_000,
                i * 10_000 + 9_999
            ))
            .await
            .unwrap();
    }
    e.client.batch_execute("CHECKPOINT").await.unwrap();
    let text = check("slot WAL");
    eprintln!("{text}");
    assert!(
        text.contains("away from being invalidated")
            || text.contains("wal_status unreserved")
            || text.contains("lost WAL"),
        "check warns about the slot's WAL:\n{text}"
    );
}
