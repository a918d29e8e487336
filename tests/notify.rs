//! New-data notifications from a running `walshore run`: every commit that stored data
//! is announced at least once to a webhook (a receiver in this test, answering, failing
//! and hanging on command) across a SIGKILL while the receiver hung, and to an SNS topic
//! of the moto server, read back from an SQS queue subscribed to it.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use support::trades::*;
use support::*;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// Read the request, never answer (until the mode changes).
    Hang,
}

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Request {
    target: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on loopback: records every request, answers as told.
struct Hook {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    got: Arc<Mutex<Vec<Request>>>,
}

impl Hook {
    fn start() -> Hook {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (a, g) = (answer.clone(), got.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (a, g) = (a.clone(), g.clone());
                std::thread::spawn(move || serve(conn, &a, &g));
            }
        });
        Hook { port, answer, got }
    }

    fn answer(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn requests(&self) -> Vec<Request> {
        self.got.lock().unwrap().clone()
    }
}

fn serve(conn: std::net::TcpStream, answer: &Mutex<Answer>, got: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if *answer.lock().unwrap() == Answer::Hang {
            // Never answered, never recorded: the connection closes once the mode changes.
            while *answer.lock().unwrap() == Answer::Hang {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        got.lock().unwrap().push(Request { target, headers, body });
        if conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// Commit records of a file-sink lake that published files: seq → (files, rows).
fn commits_with_files(lake: &std::path::Path) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(lake.join("_walshore/commits")).unwrap() {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        let files = r["files"].as_array().unwrap();
        if !files.is_empty() {
            let rows = files.iter().map(|f| f["rows"].as_u64().unwrap()).sum();
            out.insert(r["seq"].as_u64().unwrap(), (files.len() as u64, rows));
        }
    }
    out
}

/// Notices received, by seq; a seq received twice must have had the same body.
fn notices(requests: &[Request]) -> BTreeMap<u64, serde_json::Value> {
    let mut out: BTreeMap<u64, (Vec<u8>, serde_json::Value)> = BTreeMap::new();
    for r in requests {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        if let Some((body, _)) = out.get(&seq) {
            assert_eq!(body, &r.body, "a notice sent again is the same notice (seq {seq})");
        }
        out.insert(seq, (r.body.clone(), v));
    }
    out.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn metric(port: u16, series: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn insert_batch(e: &Env, from: i64, rows: i64) {
    e.client
        .batch_execute(&insert_sql(from, from + rows - 1))
        .await
        .unwrap();
}

fn lake_rows(config: &std::path::Path) -> u64 {
    status(config)["tables"]["public.trades"]["rows"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn every_commit_reaches_the_webhook_at_least_once_across_a_hang_and_a_kill() {
    let e = env(&[]).await;
    let hook = Hook::start();
    let metrics_port = free_port();
    let lake = e.dir.path().join("lake");
    let config = e.file_config("", "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[notify]\nwebhook = \"http://127.0.0.1:{}/in?token=abc\"\nwebhook_secret = \"s3cret\"\ntimeout = \"1s\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        hook.port
    ));
    std::fs::write(&config, text).unwrap();

    // Answered: each commit is announced, signed, with what it stored.
    sync(&config);
    let mut run = spawn_run(&config);
    let guard = LogOnPanic::new(&run);
    for i in 0..3 {
        insert_batch(&e, 1 + i * 10, 10).await;
    }
    wait_for(Duration::from_secs(60), "30 rows in the lake", || {
        lake_rows(&config) == 30
    });
    let announced = || {
        let want = commits_with_files(&lake);
        let got = notices(&hook.requests());
        want.keys().all(|s| got.contains_key(s))
    };
    wait_for(Duration::from_secs(60), "every commit announced", announced);
    let requests = hook.requests();
    for r in &requests {
        assert_eq!(r.target, "/in?token=abc");
        // Signed with the secret, over the time it was sent and the body: a receiver
        // that refuses old timestamps is not open to replays.
        let ts: u64 = r.headers["x-walshore-timestamp"].parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts <= now && now - ts < 300, "a recent timestamp: {ts}");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&r.body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            r.headers.get("x-walshore-signature"),
            Some(&want),
            "signed with the secret"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(r.headers["x-walshore-seq"], v["seq"].to_string());
        assert_eq!(
            r.headers["idempotency-key"],
            format!("{}-walshore-{}", v["system_id"].as_str().unwrap(), v["seq"])
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let got = notices(&requests);
    for (seq, (files, rows)) in commits_with_files(&lake) {
        let n = &got[&seq];
        assert_eq!(
            (n["files"].as_u64(), n["rows"].as_u64()),
            (Some(files), Some(rows)),
            "notice {seq}: {n}"
        );
        let t = &n["tables"][0];
        assert_eq!(t["table"], "public.trades");
        assert_eq!(t["location"], format!("file://{}/public/trades/", lake.display()));
        assert_eq!(t["rows"].as_u64(), Some(rows));
        assert!(n["source_commit_time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(n["slot"], "walshore");
        assert_eq!(n["publication"], "pub");
    }

    // A second instance on the same lake is refused the slot, and sends nothing.
    let standby = e.dir.path().join("standby.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&standby, text.split("\n[metrics]").next().unwrap()).unwrap();
    let sent = hook.requests().len();
    let out = walshore(&["run", "--config", standby.to_str().unwrap()]);
    assert!(!out.status.success(), "the second instance is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("notifications") || stderr.contains("slot"), "{stderr}");
    assert_eq!(
        hook.requests().len(),
        sent,
        "a refused instance announced nothing:\n{stderr}"
    );

    // Hung: commits go on; the backlog and the failures show.
    hook.answer(Answer::Hang);
    let before_hang = hook.requests().len();
    insert_batch(&e, 31, 10).await;
    wait_for(
        Duration::from_secs(60),
        "40 rows in the lake while the hook hangs",
        || lake_rows(&config) == 40,
    );
    insert_batch(&e, 41, 10).await;
    wait_for(
        Duration::from_secs(60),
        "50 rows in the lake while the hook hangs",
        || lake_rows(&config) == 50,
    );
    wait_for(Duration::from_secs(60), "a failed delivery counted", || {
        metric(metrics_port, "walshore_notification_failures_total{target=\"webhook\"}") >= 1.0
    });
    wait_for(Duration::from_secs(30), "a backlog while the hook hangs", || {
        metric(
            metrics_port,
            "walshore_notification_backlog_commits{target=\"webhook\"}",
        ) >= 2.0
    });
    assert_eq!(
        hook.requests().len(),
        before_hang,
        "nothing was delivered while it hung"
    );
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    drop(guard);

    // Answering again, a new process sends what the killed one could not.
    hook.answer(Answer::Ok);
    let run = spawn_run(&config);
    let guard = LogOnPanic::new(&run);
    wait_for(
        Duration::from_secs(60),
        "every commit announced after the kill",
        announced,
    );
    let got = notices(&hook.requests());
    let total: u64 = commits_with_files(&lake)
        .keys()
        .map(|s| got[s]["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 50, "the notices count every row the lake holds");
    wait_for(Duration::from_secs(30), "the backlog gauge back to 0", || {
        metric(
            metrics_port,
            "walshore_notification_backlog_commits{target=\"webhook\"}",
        ) == 0.0
            && metric(metrics_port, "walshore_notifications_sent_total{target=\"webhook\"}") >= 1.0
    });
    let (status, stderr) = stop(run);
    drop(guard);
    assert!(status.success(), "{stderr}");
    let marks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lake.join("_walshore/notified.json")).unwrap()).unwrap();
    let last = *commits_with_files(&lake).keys().last().unwrap();
    assert!(marks["targets"]["webhook"]["seq"].as_u64().unwrap() >= last, "{marks}");
    assert_eq!(
        marks["targets"]["webhook"]["target"],
        format!("http://127.0.0.1:{}/in", hook.port)
    );

    // A clean stop kept its place: the next start resends nothing.
    let sent = hook.requests().len();
    let run = spawn_run(&config);
    let guard = LogOnPanic::new(&run);
    wait_for(Duration::from_secs(60), "the restarted run serving metrics", || {
        std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_ok()
    });
    insert_batch(&e, 51, 10).await;
    wait_for(Duration::from_secs(60), "the new commit announced", || {
        notices(&hook.requests())
            .values()
            .map(|n| n["rows"].as_u64().unwrap())
            .sum::<u64>()
            == 60
    });
    assert_eq!(hook.requests().len(), sent + 1, "only the new commit was sent");
    let (status, stderr) = stop(run);
    drop(guard);
    assert!(status.success(), "{stderr}");
}

#[tokio::test]
async fn notices_reach_an_sqs_queue_through_an_sns_topic() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let e = env(&[]).await;
    let made = python_json("sns_sqs.py", &["setup", &moto.endpoint(), "new-data"]);
    let (topic, queue) = (made["topic"].as_str().unwrap(), made["queue"].as_str().unwrap());
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "sns",
    };
    let config = e.config(&e.cluster.url("postgres", "t"), &s3, "", "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[notify]\nsns_topic_arn = \"{topic}\"\nsns_endpoint = \"{}\"\n",
        moto.endpoint()
    ));
    std::fs::write(&config, text).unwrap();
    sync(&config);
    let run = spawn_run(&config);
    let guard = LogOnPanic::new(&run);
    insert_batch(&e, 1, 25).await;
    insert_batch(&e, 26, 5).await;
    let mut messages = Vec::new();
    wait_for(Duration::from_secs(60), "notices for 30 rows in the queue", || {
        messages.extend(
            python_json("sns_sqs.py", &["receive", &moto.endpoint(), queue])
                .as_array()
                .unwrap()
                .clone(),
        );
        let mut rows = BTreeMap::new();
        for m in &messages {
            let n: serde_json::Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
            rows.insert(n["seq"].as_u64().unwrap(), n["rows"].as_u64().unwrap());
        }
        rows.values().sum::<u64>() == 30
    });
    for m in &messages {
        let n: serde_json::Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
        assert_eq!(n["tables"][0]["table"], "public.trades");
        assert_eq!(n["lake"], "s3://lake/sns/");
        assert_eq!(n["tables"][0]["location"], "s3://lake/sns/public/trades/");
        assert_eq!(m["attributes"]["tables"], r#"["public.trades"]"#, "{m}");
        assert_eq!(m["attributes"]["seq"], n["seq"].to_string());
    }
    let (status, stderr) = stop(run);
    drop(guard);
    assert!(status.success(), "{stderr}");
    assert_eq!(lake_rows(&config), 30);
}
