//! Operating walshore: `/metrics`, `/healthz`, `/readyz` and `walshore health` against a
//! running `walshore run` under a writer, with the sink stalled by the fault proxy and
//! PostgreSQL stopped and started again.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::proxy::{Mode, Proxy};
use support::trades::*;
use support::*;

/// The sum of every series of `name` whose labels contain each of `labels`.
fn sum(m: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for (series, v) in m {
        let bare = series.split('{').next().unwrap_or_default();
        if bare == name && labels.iter().all(|l| series.contains(l)) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn health(config: &std::path::Path, ready: bool) -> bool {
    let mut args = vec!["health", "--config", config.to_str().unwrap()];
    if ready {
        args.push("--ready");
    }
    walshore(&args).status.success()
}

#[tokio::test]
async fn metrics_health_and_readiness_follow_a_running_pipeline() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let proxy = Proxy::start(moto.port);
    let mut e = env(&[]).await;
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "metrics",
    };
    let direct_dir = e.dir.path().join("direct");
    std::fs::create_dir_all(&direct_dir).unwrap();
    let direct = write_config(
        &direct_dir,
        &e.cluster.url("postgres", "t"),
        "pub",
        "walshore",
        &s3,
        "",
        "",
    );
    let port = free_port();
    let config = e.config(&e.cluster.url("postgres", "t"), &s3, "request_timeout = \"120s\"", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&moto.endpoint(), &format!("http://127.0.0.1:{}", proxy.port));
    std::fs::write(
        &config,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nready_within = \"4s\"\nslot_interval = \"500ms\"\n"),
    )
    .unwrap();

    use_initial_snapshot(&config, "");

    // Not running: the health check says so.
    assert!(!health(&config, false), "nothing listens yet");

    e.client.batch_execute(&insert_sql(1, 500)).await.unwrap();
    let run = spawn_run(&config);
    let _log = LogOnPanic::new(&run);
    let writer = Writer::spawn(
        e.cluster.url("postgres", "t"),
        Workload {
            large_every: 25,
            large_rows: 200,
            pause: Duration::from_millis(20),
            ..Workload::default()
        },
    );
    wait_for(Duration::from_secs(60), "/readyz answers 200", || {
        http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert!(health(&config, false), "walshore health: /healthz");
    assert!(health(&config, true), "walshore health --ready: /readyz");
    wait_for(
        Duration::from_secs(60),
        "commits, changes and slot samples in /metrics",
        || {
            let m = scrape(port);
            sum(&m, "walshore_commits_total", &[]).unwrap_or(0.0) >= 3.0
                && sum(
                    &m,
                    "walshore_changes_received_total",
                    &["table=\"public.trades\"", "op=\"insert\""],
                )
                .unwrap_or(0.0)
                    >= 100.0
                && sum(&m, "walshore_copy_rows", &["table=\"public.trades\""]).unwrap_or(0.0) >= 500.0
                && sum(&m, "walshore_slot_active", &[]) == Some(1.0)
                && sum(&m, "walshore_slot_wal_status", &["status=\"reserved\""]) == Some(1.0)
                && sum(&m, "walshore_slot_retained_bytes", &[]).is_some()
        },
    );
    let m = scrape(port);
    // The writer runs from before the copy: the copy holds at least the first 500 rows,
    // and once done, the rows expected are the rows copied.
    assert_eq!(
        sum(&m, "walshore_copy_rows_estimated", &["table=\"public.trades\""]),
        sum(&m, "walshore_copy_rows", &["table=\"public.trades\""])
    );
    assert_eq!(sum(&m, "walshore_connected", &[]), Some(1.0));
    assert!(sum(&m, "walshore_commit_duration_seconds_count", &[]).unwrap() >= 3.0);
    assert!(sum(&m, "walshore_written_bytes_total", &[]).unwrap() > 0.0);
    assert!(
        sum(&m, "walshore_committed_lag_seconds", &[]).unwrap() < 10.0,
        "lake lag while flowing"
    );

    // The sink stalls: the lake falls behind, the lag rises and readiness fails; then
    // it recovers.
    proxy.set(Mode::Stall);
    wait_for(
        Duration::from_secs(60),
        "lag to rise and /readyz to fail while S3 stalls",
        || {
            let m = scrape(port);
            sum(&m, "walshore_uncommitted_seconds", &[]).unwrap_or(0.0) > 5.0
                && sum(&m, "walshore_committed_lag_seconds", &[]).unwrap_or(0.0) > 5.0
                && http_get(port, "/readyz").is_some_and(|(s, _)| s == 503)
        },
    );
    let (_, why) = http_get(port, "/readyz").unwrap();
    assert!(why.contains("not committed"), "readyz says why: {why}");
    assert!(
        health(&config, false),
        "a stalled S3 for seconds is not a stuck process"
    );
    assert!(!health(&config, true));
    proxy.set(Mode::Forward);
    wait_for(
        Duration::from_secs(90),
        "lag to fall and /readyz to pass after S3 recovers",
        || {
            let m = scrape(port);
            sum(&m, "walshore_uncommitted_seconds", &[]).unwrap_or(99.0) < 3.0
                && sum(&m, "walshore_committed_lag_seconds", &[]).unwrap_or(99.0) < 5.0
                && http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
        },
    );

    // PostgreSQL goes away: not ready (but alive), errors counted; back: ready again.
    writer.stop();
    e.cluster.stop().unwrap();
    wait_for(
        Duration::from_secs(60),
        "/readyz to fail while PostgreSQL is down",
        || http_get(port, "/readyz").is_some_and(|(s, b)| s == 503 && b.contains("not connected")),
    );
    assert!(health(&config, false), "alive while PostgreSQL is down");
    let m = scrape(port);
    assert_eq!(sum(&m, "walshore_connected", &[]), Some(0.0));
    assert!(sum(&m, "walshore_errors_total", &["kind=\"transient\""]).unwrap_or(0.0) >= 1.0);
    e.cluster.start_again().unwrap();
    wait_for(
        Duration::from_secs(120),
        "/readyz to pass after PostgreSQL is back",
        || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200),
    );
    assert!(sum(&scrape(port), "walshore_retries_total", &["stage=\"source\""]).unwrap_or(0.0) >= 1.0);

    // Everything is committed: the rows counters are what the lake holds, per op.
    let client = e.cluster.connect("t").await.unwrap();
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(Duration::from_secs(60), "the slot to confirm everything", || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'walshore'",
                &[&end],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let m = scrape(port);
    let (status, stderr) = stop(run);
    assert!(status.success(), "run stopped cleanly: {stderr}");
    let lake = read_table(&open_lake(&direct), "public", "trades").await;
    for op in ["I", "U", "D", "R"] {
        let in_lake = lake.rows.iter().filter(|r| r.op == op).count() as f64;
        let counted = sum(
            &m,
            "walshore_rows_written_total",
            &["table=\"public.trades\"", &format!("op=\"{op}\"")],
        )
        .unwrap_or(0.0);
        assert_eq!(counted, in_lake, "rows written with _op {op}: metric vs lake");
    }
    assert!(lake.rows.len() > 1000, "the writer wrote: {} rows", lake.rows.len());
    e.client = client;
    e.assert_lake_equals_source(&direct, SELECT).await;
}

#[test]
fn health_without_a_listen_address_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "postgres://u@127.0.0.1:1/db",
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        "",
        "",
    );
    let out = walshore(&["health", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[metrics] listen"));
}

#[tokio::test]
async fn emf_lines_on_stdout_parse_and_carry_the_dimensions() {
    let e = env(&[]).await;
    let config = e.file_config("", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[metrics]\nemf = true\nemf_interval = \"1s\"\nemf_namespace = \"walshore-test\"\n"),
    )
    .unwrap();
    sync(&config);
    e.client.batch_execute(&insert_sql(1, 300)).await.unwrap();
    e.client
        .batch_execute("UPDATE trades SET qty = 0 WHERE id <= 10; DELETE FROM trades WHERE id > 290")
        .await
        .unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "at least the line written at the stop");
    let mut rows = 0.0;
    for l in &lines {
        let spec = &l["_aws"]["CloudWatchMetrics"][0];
        assert!(
            l["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000,
            "milliseconds"
        );
        assert_eq!(spec["Namespace"], "walshore-test");
        assert_eq!(spec["Dimensions"], serde_json::json!([["Database", "Slot"]]));
        assert_eq!(l["Database"], "t");
        assert_eq!(l["Slot"], "walshore");
        for m in spec["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(l[name].is_number(), "{name} has a value: {l}");
            assert!(["Seconds", "Bytes", "Count", "None"].contains(&m["Unit"].as_str().unwrap()));
        }
        rows += l["RowsWritten"].as_f64().unwrap_or(0.0);
    }
    // Counters are per line: summed over the lines, they are what this sync wrote.
    assert_eq!(rows, 300.0 + 10.0 + 10.0, "300 inserts, 10 updates, 10 deletes");
}
