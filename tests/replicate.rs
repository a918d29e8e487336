//! End to end: real PostgreSQL, real S3-protocol server, the walshore binary. Each test
//! replays the lake in `(_lsn, _seq)` order and compares with `SELECT` on the source.

mod support;

use std::time::Duration;

use support::trades::{Env, SELECT, env, insert_sql};
use support::*;

/// Inserts, updates, deletes, a key change, a truncate, a rollback and a savepoint
/// rollback, with a `sync` in the middle.
async fn mixed_workload(e: &Env, config: &std::path::Path) {
    let c = &e.client;
    c.batch_execute(&insert_sql(1, 300)).await.unwrap();
    c.batch_execute("UPDATE trades SET price = price + 1, symbol = NULL WHERE id % 10 = 0")
        .await
        .unwrap();
    c.batch_execute("DELETE FROM trades WHERE id % 7 = 0").await.unwrap();
    sync(config);
    c.batch_execute("UPDATE trades SET id = id + 10000 WHERE id IN (1, 2, 3)")
        .await
        .unwrap();
    c.batch_execute("BEGIN; DELETE FROM trades WHERE id > 100; ROLLBACK")
        .await
        .unwrap();
    c.batch_execute(&format!(
        "BEGIN; {}; SAVEPOINT s; {}; ROLLBACK TO s; UPDATE trades SET qty = -1 WHERE id = 4; COMMIT",
        insert_sql(400, 410),
        insert_sql(500, 510)
    ))
    .await
    .unwrap();
    c.batch_execute("TRUNCATE trades").await.unwrap();
    c.batch_execute(&insert_sql(1000, 1200)).await.unwrap();
    c.batch_execute("UPDATE trades SET tags = '{}', payload = NULL, active = NULL WHERE id < 1010")
        .await
        .unwrap();
    c.batch_execute("DELETE FROM trades WHERE id BETWEEN 1100 AND 1110")
        .await
        .unwrap();
    sync(config);
}

async fn assert_lake_equals_source(e: &Env, config: &std::path::Path) -> LakeTable {
    e.assert_lake_equals_source(config, SELECT).await
}

#[tokio::test]
async fn file_sink_replays_inserts_updates_deletes_truncate_and_rollbacks() {
    let e = env(&[]).await;
    let lake_dir = e.dir.path().join("lake");
    let config = e.file_config("", "");
    sync(&config); // creates the slot
    mixed_workload(&e, &config).await;
    let lake = assert_lake_equals_source(&e, &config).await;
    let ops: std::collections::BTreeSet<&str> = lake.rows.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(
        ops,
        ["D", "I", "T", "U"].into_iter().collect(),
        "every kind of change is in the lake"
    );
    // Key change: D of the old key, then I of the new, consecutive _seq.
    let d = lake
        .rows
        .iter()
        .position(|r| r.op == "D" && r.values["id"].as_deref() == Some("1"))
        .expect("delete of old key 1");
    let i = &lake.rows[d + 1];
    assert_eq!(
        (i.op.as_str(), i.values["id"].as_deref(), i.lsn, i.seq),
        ("I", Some("10001"), lake.rows[d].lsn, lake.rows[d].seq + 1)
    );
    // The rolled-back savepoint's rows never reach the lake.
    assert!(!lake.rows.iter().any(|r| r.values["id"].as_deref() == Some("505")));
    // Partitions are the commit date.
    let today = walshore::batch::date_partition(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
    );
    assert!(
        lake_dir.join("public/trades").join(&today).is_dir(),
        "partition {today} exists"
    );
}

#[tokio::test]
async fn s3_sink_replays_inserts_updates_deletes_truncate_and_rollbacks() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let e = env(&[]).await;
    let sink = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "cdc/trading",
    };
    let config = write_config(
        e.dir.path(),
        &e.cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &sink,
        "",
        "",
    );
    sync(&config);
    mixed_workload(&e, &config).await;
    let lake = assert_lake_equals_source(&e, &config).await;
    assert!(lake.files >= 2, "several flushes, several files");
}

#[tokio::test]
async fn every_object_written_to_s3_is_encrypted_with_the_configured_kms_key() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let key = python_json("s3_encryption.py", &["key", &moto.endpoint()])["arn"]
        .as_str()
        .unwrap()
        .to_owned();
    let e = env(&[]).await;
    // 8 MiB of random bytes in one transaction: one file above the part size, uploaded
    // in parts.
    e.client
        .batch_execute("CREATE TABLE blobs (id int PRIMARY KEY, b bytea); ALTER PUBLICATION pub ADD TABLE blobs")
        .await
        .unwrap();
    let sink = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "enc",
    };
    let config = e.config(
        &e.cluster.url("postgres", "t"),
        &sink,
        &format!("sse = \"aws:kms\"\nkms_key_id = \"{key}\"\npart_size = \"5MiB\"\nmax_buffer = \"64MiB\""),
        "",
    );
    sync(&config);
    e.client.batch_execute(&insert_sql(1, 1000)).await.unwrap();
    e.client
        .batch_execute(
            "INSERT INTO blobs SELECT i, (SELECT decode(string_agg(md5(random()::text || g || i), ''), 'hex')
             FROM generate_series(1, 65536) g) FROM generate_series(1, 8) i",
        )
        .await
        .unwrap();
    sync(&config);
    assert_lake_equals_source(&e, &config).await;
    let objects = python_json("s3_encryption.py", &["objects", &moto.endpoint(), "lake", "enc/"]);
    let objects = objects.as_object().unwrap();
    for kind in [
        ".parquet",
        "_walshore/commits/",
        "_walshore/head.json",
        "_walshore/schemas/",
    ] {
        assert!(
            objects.keys().any(|k| k.contains(kind)),
            "no {kind} object in {:?}",
            objects.keys()
        );
    }
    let large = objects
        .iter()
        .filter(|(k, o)| k.contains("/blobs/") && o["size"].as_u64().unwrap() > 5 << 20)
        .count();
    assert!(large >= 1, "a blob file larger than the part size: {objects:?}");
    for (k, o) in objects {
        assert_eq!(o["sse"], "aws:kms", "{k}: {o}");
        assert_eq!(o["kms_key_id"], key.as_str(), "{k}: {o}");
        // moto keeps the bucket-key flag of a PUT only: a multipart upload made with
        // boto3 and BucketKeyEnabled=True reads back without it too.
        if o["size"].as_u64().unwrap() <= 5 << 20 {
            assert_eq!(o["bucket_key"], true, "{k}: {o}");
        }
    }
}

#[tokio::test]
async fn large_streamed_transaction_with_subtransaction_abort_is_replicated_whole() {
    let e = env(&["logical_decoding_work_mem = 64kB"]).await;
    let config = e.file_config("max_buffer = \"8MiB\"", "stream_memory = \"2MiB\"");
    sync(&config);
    e.client
        .batch_execute(&format!(
            "BEGIN; {}; SAVEPOINT s; {}; ROLLBACK TO s; {}; COMMIT",
            insert_sql(1, 500_000),
            insert_sql(600_000, 650_000),
            insert_sql(700_000, 700_999)
        ))
        .await
        .unwrap();
    sync(&config);
    let lake = assert_lake_equals_source(&e, &config).await;
    assert_eq!(lake.rows.len(), 501_000);
    assert!(
        lake.files > 1,
        "a transaction larger than max_buffer is written in several files"
    );
    assert!(
        lake.rows.iter().all(|r| r.lsn == lake.rows[0].lsn),
        "one transaction, one commit LSN"
    );
    let spill = e.dir.path().join("spill");
    assert!(spill.is_dir(), "the streamed transaction spilled to disk");
    assert_eq!(
        std::fs::read_dir(&spill).unwrap().count(),
        0,
        "spill files are removed after commit"
    );
}

#[tokio::test]
async fn replica_identity_full_table_without_key_replays_as_a_multiset() {
    let e = env(&[]).await;
    let c = &e.client;
    c.batch_execute("CREATE TABLE nokey (a integer, b text); ALTER TABLE nokey REPLICA IDENTITY FULL; ALTER PUBLICATION pub ADD TABLE nokey").await.unwrap();
    let config = e.file_config("", "");
    sync(&config);
    c.batch_execute("INSERT INTO nokey VALUES (1, 'x'), (1, 'x'), (2, 'y'), (3, NULL)")
        .await
        .unwrap();
    c.batch_execute("UPDATE nokey SET b = 'z' WHERE a = 2").await.unwrap();
    c.batch_execute("DELETE FROM nokey WHERE ctid = (SELECT min(ctid) FROM nokey WHERE a = 1)")
        .await
        .unwrap();
    c.batch_execute("UPDATE nokey SET a = 30 WHERE b IS NULL")
        .await
        .unwrap();
    sync(&config);
    let lake = read_table(&open_lake(&config), "public", "nokey").await;
    assert_unique_positions(&lake);
    let updates: Vec<_> = lake.rows.iter().filter(|r| r.op == "U").collect();
    assert!(updates.is_empty(), "updates without a key are written as D + I");
    assert_eq!(
        replay(&lake, None),
        source_rows(c, "SELECT a::text, b FROM nokey").await
    );
}

/// Starts `run` several times while a writer commits, ending each run with `end`.
async fn restarts_under_load(end: fn(std::process::Child) -> bool) {
    let e = env(&[]).await;
    let config = e.file_config("max_buffer = \"256KiB\"", "");
    sync(&config);
    let writer_client = e.cluster.connect("t").await.unwrap();
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop_flag.clone();
    let writer = tokio::spawn(async move {
        let mut i = 0i64;
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let base = i * 1000;
            let n = if i % 10 == 0 { 999 } else { 9 };
            writer_client.batch_execute(&insert_sql(base, base + n)).await.unwrap();
            writer_client
                .batch_execute(&format!("UPDATE trades SET qty = qty + 1 WHERE id = {}", base + 3))
                .await
                .unwrap();
            writer_client
                .batch_execute(&format!("DELETE FROM trades WHERE id = {}", base + 5))
                .await
                .unwrap();
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    });
    let mut rng = 0x2545F4914F6CDD1Du64;
    for _ in 0..5 {
        let child = spawn_run(&config);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(400 + rng % 1200)).await;
        assert!(end(child), "run ended as expected");
    }
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.await.unwrap();
    assert!(batches > 20, "the writer kept committing ({batches} rounds)");
    sync(&config);
    assert_lake_equals_source(&e, &config).await;
}

#[tokio::test]
async fn restarts_while_a_writer_commits_leave_no_duplicate_and_no_gap() {
    restarts_under_load(|child| {
        let (status, stderr) = support::stop(child);
        assert!(status.success(), "run exits 0 on SIGTERM: {status}\n{stderr}");
        stderr.contains("stopped cleanly")
    })
    .await;
}

#[tokio::test]
async fn sigkill_at_random_moments_under_load_leaves_no_duplicate_and_no_gap() {
    restarts_under_load(|mut child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        !child.wait().unwrap().success()
    })
    .await;
}

#[tokio::test]
async fn a_second_instance_on_the_same_slot_is_refused() {
    let e = env(&[]).await;
    let config = e.file_config("", "");
    sync(&config);
    let first = spawn_run(&config);
    wait_until(
        Duration::from_secs(30),
        "the first instance to hold the slot",
        || async { slot_count(&e.client, true).await == 1 },
    )
    .await;
    let out = walshore(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    e.client.batch_execute(&insert_sql(1, 10)).await.unwrap();
    let (status, stderr) = stop(first);
    assert!(status.success(), "{stderr}");
    sync(&config);
    assert_lake_equals_source(&e, &config).await;
}

#[tokio::test]
async fn status_and_check_report_the_pipeline() {
    let e = env(&[]).await;
    let config = e.file_config("", "");
    let out = walshore(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "wal_level",
        "replication",
        "publication",
        "replica identity",
        "slot",
        "copy slots",
        "object store",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with("ok") && l.contains(check)),
            "check {check} missing:\n{text}"
        );
    }
    sync(&config);
    e.client.batch_execute(&insert_sql(1, 42)).await.unwrap();
    sync(&config);
    let out = walshore(&["status", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tables"]["public.trades"]["rows"], 42);
    assert_eq!(v["slot"]["exists"], true);
    assert!(v["slot"]["retained_wal_bytes"].is_i64(), "{v}");
    let committed: walshore::lsn::Lsn = v["committed"]["lsn"].as_str().unwrap().parse().unwrap();
    let confirmed: walshore::lsn::Lsn = v["slot"]["confirmed_flush_lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        confirmed >= committed,
        "the slot is confirmed up to the committed position: {v}"
    );

    // A table without key or replica identity fails the check, with the fix.
    e.client
        .batch_execute("CREATE TABLE bare (a int); ALTER PUBLICATION pub ADD TABLE bare")
        .await
        .unwrap();
    let out = walshore(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("REPLICA IDENTITY FULL")),
        "{text}"
    );
}

#[tokio::test]
async fn a_crash_at_every_step_of_a_commit_leaves_the_lake_exact() {
    // point@n: crash the n-th time the point is reached (the start-up claim is the
    // first commit record of every run).
    for point in [
        "after_upload@1",
        "after_upload@3",
        "before_commit_record@2",
        "after_commit_record@2",
        "after_commit_before_confirm@1",
    ] {
        let e = env(&[]).await;
        let config = e.file_config("max_buffer = \"64KiB\"", "");
        sync(&config);
        e.client.batch_execute(&insert_sql(1, 3000)).await.unwrap();
        e.client
            .batch_execute("UPDATE trades SET qty = 0 WHERE id % 3 = 0")
            .await
            .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["sync", "--config", config.to_str().unwrap()])
            .env("WALSHORE_FAULT", point)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("fault injected"),
            "{point}: the process did not crash there (built without --features fault-injection?):\n{stderr}"
        );
        e.client
            .batch_execute("DELETE FROM trades WHERE id % 5 = 0")
            .await
            .unwrap();
        // Recover with other file boundaries, so that what the crashed run uploaded is
        // not simply overwritten by identical files.
        let config = e.file_config("max_buffer = \"100KiB\"", "");
        sync(&config);
        assert_lake_equals_source(&e, &config).await;
        assert_no_orphans(&config).await;
    }
}
