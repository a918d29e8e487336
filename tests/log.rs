//! The commit log over a long life: start-up reads its head, not its history; old
//! records are folded into checkpoints and pruned after `sink.log_retention`, and the
//! manifest of committed files stays whole.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn a_long_commit_log_is_read_from_its_head_then_folded_and_pruned() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        "log_retention = \"1h\"",
        "",
    );
    edit_config(
        &config,
        "mode = \"never\"",
        "mode = \"never\"\npoll_interval = \"300ms\"",
    );
    sync(&config);
    c.batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    sync(&config);
    // Ten days of commits that published nothing: records as walshore writes them.
    let commits = dir.path().join("lake/_walshore/commits");
    // The head, whole (as each is written every `BASE_EVERY` records).
    let mut head = serde_json::to_value(
        walshore::checkpoint::read_head(open_lake(&config).as_ref())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    head.as_object_mut().unwrap().remove("base");
    let first = head["seq"].as_u64().unwrap() + 1;
    let last = first + 2400;
    let ten_days_ago = (std::time::SystemTime::now() - Duration::from_secs(10 * 86_400))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    for seq in first..=last {
        let mut r = head.clone();
        r["seq"] = seq.into();
        r["written_at"] = ten_days_ago.into();
        r["files"] = serde_json::json!([]);
        r["completes"] = serde_json::json!([]);
        std::fs::write(commits.join(format!("{seq:020}.json")), serde_json::to_vec(&r).unwrap()).unwrap();
    }
    std::fs::write(
        dir.path().join("lake/_walshore/head.json"),
        format!("{{\"seq\":{last}}}"),
    )
    .unwrap();
    assert_eq!(status(&config)["committed"]["seq"], last);

    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    let writer = SqlLoop::spawn(cluster.url("postgres", "postgres"), Duration::from_millis(20), |i| {
        format!(
            "INSERT INTO t VALUES ({}, 'w{i}'); UPDATE t SET v = 'u{i}' WHERE id = {}",
            1000 + i,
            1 + i % 100
        )
    });
    wait_for(
        Duration::from_secs(90),
        "two chunks of records folded and pruned",
        || {
            status(&config)["committed"]["log"]["pruned_through"]
                .as_u64()
                .is_some_and(|p| p >= 2000)
        },
    );
    writer.stop();
    let (code, stderr) = stop(run);
    assert!(code.success(), "{stderr}");
    assert!(stderr.contains("folded commit records into a checkpoint"), "{stderr}");
    sync(&config);
    let mut left: Vec<u64> = std::fs::read_dir(&commits)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".json")?.parse().ok())
        .collect();
    left.sort();
    assert!(
        left.first().is_some_and(|s| *s > 2000),
        "records up to 2000 are pruned: {left:?}"
    );
    for cp in [1000u64, 2000] {
        assert!(
            dir.path()
                .join(format!("lake/_walshore/checkpoints/{cp:020}.json"))
                .exists(),
            "checkpoint {cp}"
        );
    }
    // The rows committed before the fabricated records are named by a checkpoint now.
    assert_no_orphans(&config).await;
    assert_eq!(
        replay(&read_table(&open_lake(&config), "public", "t").await, Some(&["id"])),
        source_rows(&c, "SELECT id::text, v FROM t").await
    );
}
