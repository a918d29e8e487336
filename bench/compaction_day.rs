//! A day of the change log, compressed, with compaction (issue 27): readers through
//! Glue never see a duplicate or a gap, each closed partition ends in
//! ⌈size / target⌉ files, `verify` is equal before and after, a fold over the
//! compacted day is faster, and commits are not slower while compaction runs.
//!
//! PostgreSQL runs on a clock `86400 / --seconds` times faster than the real one
//! (libfaketime, `x` rate), so that its commit times, and with them the `commit_hour`
//! and `commit_date` partitions, cover a day in `--seconds` (2700) of real time. Two
//! tables: `trades` (inserts, partitioned by `commit_hour`) and `prices` (`--keys`
//! (10,000) rows updated, `commit_date`). A writer makes `--tps` (25) transactions a
//! second, each inserting 10 trades and updating 20 prices; `walshore run` flushes
//! every `--seconds * 1000 / --commits` ms (17,280 commits, as a day at 5 s), writes
//! to S3 (moto), registers partitions in Glue (moto) and compacts with `grace` 60 s,
//! `target_file_size` `--target` (2MB) and `delete_after` 15 minutes (real time: the
//! grace's "nothing committed for" is walshore's clock).
//!
//! Meanwhile `bench/compaction_day.py watch` reads, in a loop, the closed partitions
//! Glue registers (their files as Athena lists them) with DuckDB and records what each
//! read saw. After the day a light load goes on until the day's `prices` partition is
//! compacted; then a DuckDB fold is timed over its replaced files and over its
//! compacted ones, `walshore verify` runs again, and every read of the day is
//! compared with the final contents of its partition.
//!
//! Targets (issue 27): no read sees a duplicate `(_lsn, _seq)` or misses one; each
//! closed partition has ⌈size / target⌉ files; verify equal before and after; the fold
//! ≥ 20× faster; commit time p99 while a compaction runs within 10 % of without.
//!
//! `cargo bench --bench compaction_day [-- --seconds N --commits N --flush-ms N --tps N --keys N --target 2MB]`

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use walshore::cluster::{ClusterOptions, TempCluster};

const DATABASE: &str = "bench";
const GRACE: &str = "60s";
const DELETE_AFTER: &str = "15m";

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A throwaway PostgreSQL whose clock runs `rate` times faster than the real one,
/// from `offset` seconds ahead of it at the server's start. Its timeouts are counted
/// in its own time, so those that would end a connection are turned off or raised.
fn fast_cluster(rate: f64, offset: i64) -> TempCluster {
    let lib = walshore::cluster::libfaketime()
        .expect("libfaketime not found under /usr/lib/*/faketime: install the Debian package `libfaketime`");
    let env = [
        ("LD_PRELOAD".to_owned(), lib.to_string_lossy().into_owned()),
        ("FAKETIME".to_owned(), format!("{offset:+} x{rate:.3}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
    ];
    TempCluster::start(ClusterOptions {
        settings: [
            "wal_sender_timeout = 0",
            "authentication_timeout = 600s",
            "checkpoint_timeout = 1d",
            "max_wal_size = 4GB",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        dir: None,
        env: env.into_iter().collect(),
    })
    .expect("start PostgreSQL")
}

/// A line of `walshore run --log-format json`: its time (Unix seconds) and fields.
fn events(log: &Path) -> Vec<(f64, serde_json::Value)> {
    let Ok(f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter_map(|v| {
            let at = humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some((at.duration_since(UNIX_EPOCH).ok()?.as_secs_f64(), v["fields"].clone()))
        })
        .collect()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn python(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/compaction_day.py"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    assert!(out.status.success(), "bench/compaction_day.py {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("its JSON")
}

fn verify(walshore: &str, config: &Path) -> (bool, String) {
    let out = Command::new(walshore)
        .args(["verify", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout)
        .lines()
        .take(6)
        .collect::<Vec<_>>()
        .join("\n    ");
    (out.status.success(), text)
}

fn status(walshore: &str, config: &Path) -> serde_json::Value {
    let out = Command::new(walshore)
        .args(["status", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "warn")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The Glue location of a partition, by `glue_check`'s means (boto3).
fn glue_location(endpoint: &str, table: &str, values: &[&str]) -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import boto3\ntry:\n    p = boto3.client('glue', endpoint_url='{endpoint}', region_name='us-east-1').get_partition(DatabaseName='{DATABASE}', TableName='{table}', PartitionValues={values:?})\n    print(p['Partition']['StorageDescriptor']['Location'])\nexcept Exception:\n    pass"
            ),
        ])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let arg = common::arg::<u64>;
    let seconds = arg("--seconds", 2700);
    let commits = arg("--commits", 17_280);
    let tps = arg("--tps", 25);
    let keys = arg("--keys", 10_000);
    let target_text = std::env::args()
        .skip_while(|a| a != "--target")
        .nth(1)
        .unwrap_or_else(|| "2MB".to_owned());
    let target = walshore::config::parse_size(&target_text).expect("--target: a size such as 2MB");
    // A commit takes some 40 ms beyond the flush interval on 2 cores: `--flush-ms`
    // shortens the interval so that the day makes `--commits`.
    let flush_ms = arg("--flush-ms", (seconds * 1000 / commits).max(1));
    let rate = 86_400.0 / seconds as f64;
    let walshore = env!("CARGO_BIN_EXE_walshore");
    // SAFETY: no other thread yet.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    println!(
        "walshore compaction day: a day of server time in {seconds} s (x{rate:.1}), {tps} transactions a second \
         (10 trades inserted, 20 of {keys} prices updated), a flush every {flush_ms} ms (~{commits} commits), \
         grace {GRACE}, target {target_text}, delete_after {DELETE_AFTER}"
    );

    // The server's day starts at the next midnight UTC, a minute of real time after
    // its start.
    let midnight = ((unix_now() / 86_400.0).floor() + 1.0) * 86_400.0;
    let cluster = fast_cluster(rate, (midnight - unix_now() - 60.0 * rate) as i64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE trades (id bigserial PRIMARY KEY, sym text NOT NULL, px numeric(18,6) NOT NULL, qty integer NOT NULL);
         CREATE TABLE prices (sym text PRIMARY KEY, px numeric(18,6) NOT NULL, qty integer NOT NULL, venue text);
         INSERT INTO prices SELECT 'S' || g, g * 0.01, g % 1000, 'XLON' FROM generate_series(1, {keys}) g;
         CREATE PUBLICATION bench FOR TABLE trades, prices;"
    )))
    .unwrap();

    let moto = common::Moto::start();
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walshore.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"day\"\nspill_dir = \"{}/spill\"\n\n\
             [sink]\nurl = \"s3://lake/cdc\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nflush_interval = \"{flush_ms}ms\"\n\n\
             [snapshot]\nmode = \"initial\"\npoll_interval = \"5s\"\n\n\
             [partitions]\ndefault = \"commit_date\"\n\"public.trades\" = \"commit_hour\"\n\n\
             [catalog]\nkind = \"glue\"\ndatabase = \"{DATABASE}\"\nendpoint = \"{endpoint}\"\n\n\
             [compaction]\ngrace = \"{GRACE}\"\ntarget_file_size = \"{target_text}\"\ndelete_after = \"{DELETE_AFTER}\"\n",
            cluster.url("postgres", "postgres"),
            dir.path().display()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    #[allow(clippy::zombie_processes)] // stopped and reaped below
    let mut run = Command::new(walshore)
        .args(["--log-format", "json", "run", "--config", config.to_str().unwrap()])
        .env(
            "WALSHORE_LOG",
            "warn,walshore::pipeline::sink_task=info,walshore::pipeline::housekeeping=info",
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("walshore run");

    let stop_file = dir.path().join("stop");
    let watched = dir.path().join("reads.jsonl");
    #[allow(clippy::zombie_processes)] // waited for below
    let mut watcher = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/compaction_day.py"))
        .args(["watch", &endpoint, "lake", "cdc", DATABASE])
        .args([&stop_file, &watched])
        .spawn()
        .expect("python3");

    // The day begins when the server's clock says midnight.
    let fake_now: f64 = rt
        .block_on(client.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]))
        .unwrap()
        .get(0);
    let wait = (midnight - fake_now) / rate;
    println!("  setup done; the server's day begins in {wait:.1} s");
    std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
    rt.block_on(client.batch_execute("SET synchronous_commit = on"))
        .unwrap();

    let mut rng = 1u64;
    let mut next = |below: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) % below.max(1)
    };
    let mut transaction = |client: &tokio_postgres::Client| {
        let first = 1 + next(keys.saturating_sub(20));
        let sql = format!(
            "INSERT INTO trades (sym, px, qty) SELECT 'S' || ({first} + g), g * 0.5, g FROM generate_series(1, 10) g;
             UPDATE prices SET px = px + 0.01, qty = qty + 1 WHERE sym IN (SELECT 'S' || g FROM generate_series({first}, {}) g);",
            first + 19
        );
        rt.block_on(client.batch_execute(&sql)).unwrap();
    };
    let day_start = unix_now();
    let start = Instant::now();
    let day = Duration::from_secs(seconds);
    let mut done = 0u64;
    while start.elapsed() < day {
        if done as f64 >= tps as f64 * start.elapsed().as_secs_f64() {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        transaction(&client);
        done += 1;
    }
    let day_end = unix_now();
    println!("  the day: {done} transactions in {:.0} s", day_end - day_start);

    // The tail: a transaction a second, so that the stream passes the day's end, until
    // the day's `prices` partition is compacted.
    let day_of = |t: f64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs_f64(t)).to_string()[..10].to_owned()
    };
    let the_day = day_of(midnight);
    let (before_ok, before_text) = verify(walshore, &config);
    println!(
        "  walshore verify at the end of the day (the last hours and the day's prices not compacted): ok {before_ok}\n    {before_text}"
    );
    let tail = Instant::now();
    let compacted = loop {
        transaction(&client);
        std::thread::sleep(Duration::from_secs(1));
        if let Some(l) = glue_location(&endpoint, "prices_changes", &[&the_day])
            && l.contains("/_c")
        {
            break l;
        }
        assert!(
            tail.elapsed() < Duration::from_secs(900),
            "the day's prices partition was not compacted in 15 minutes after the day"
        );
    };
    println!(
        "  the day's prices partition compacted {:.0} s after the day",
        tail.elapsed().as_secs_f64()
    );
    let root = format!("cdc/public/prices/dt={the_day}");
    let compacted_prefix = compacted
        .trim_start_matches("s3://lake/")
        .trim_end_matches('/')
        .to_owned();
    let fold = python(&["fold", &endpoint, "lake", &root, &compacted_prefix, "sym", "3"]);
    // Every hour of the day compacted too.
    let hours_done = Instant::now();
    loop {
        let pending = (0..24)
            .filter(|h| {
                glue_location(&endpoint, "trades_changes", &[&the_day, &format!("{h:02}")])
                    .is_none_or(|l| !l.contains("/_c"))
            })
            .count();
        if pending == 0 {
            break;
        }
        assert!(
            hours_done.elapsed() < Duration::from_secs(600),
            "{pending} hours of the day not compacted 10 minutes later"
        );
        transaction(&client);
        std::thread::sleep(Duration::from_secs(2));
    }
    let (after_ok, after_text) = verify(walshore, &config);
    println!("  walshore verify after compaction: ok {after_ok}\n    {after_text}");
    std::fs::write(&stop_file, "stop").unwrap();
    let _ = watcher.wait();
    let st = status(walshore, &config);
    unsafe { libc::kill(run.id() as libc::pid_t, libc::SIGTERM) };
    let _ = run.wait();

    // Every read compared with its partition's final contents.
    let last = python(&["final", &endpoint, "lake", "cdc", DATABASE]);
    let mut reads = 0;
    let mut skipped = 0;
    let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
    let mut wrong = Vec::new();
    let f = std::fs::File::open(&watched).unwrap();
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let o: serde_json::Value = serde_json::from_str(&line).unwrap();
        if o["skipped"] == true {
            skipped += 1;
            continue;
        }
        reads += 1;
        let key = format!("{} {}", o["table"].as_str().unwrap(), o["partition"].as_str().unwrap());
        *by_kind
            .entry(if o["location"].as_str().unwrap_or("").contains("/_c") {
                "compacted"
            } else {
                "root"
            })
            .or_default() += 1;
        let fin = &last[&key];
        if o.get("error").is_some() {
            wrong.push(format!("{key}: read failed: {}", o["error"]));
        } else if o["rows"] != o["distinct"] {
            wrong.push(format!(
                "{key}: {} rows, {} distinct (_lsn, _seq)",
                o["rows"], o["distinct"]
            ));
        } else if o["rows"] != fin["rows"] || o["hash"] != fin["hash"] {
            wrong.push(format!(
                "{key}: read {} rows (hash {}), the partition holds {} (hash {})",
                o["rows"], o["hash"], fin["rows"], fin["hash"]
            ));
        }
    }
    println!(
        "  readers through Glue: {reads} reads of closed partitions ({by_kind:?} locations), {skipped} skipped (over 3,000 files), {} saw a duplicate, a gap or an error",
        wrong.len()
    );
    for w in wrong.iter().take(10) {
        println!("    {w}");
    }

    // Files of each closed partition of the day against ⌈size / target⌉.
    let mut off = Vec::new();
    let mut fills = Vec::new();
    let mut parts = 0;
    for (key, p) in last.as_object().unwrap() {
        if !key.contains(&the_day) {
            continue;
        }
        parts += 1;
        let sizes: Vec<u64> = p["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let size: u64 = sizes.iter().sum();
        let want = size.div_ceil(target);
        let mut sorted = sizes.clone();
        sorted.sort_unstable();
        sorted.pop();
        fills.extend(sorted.iter().map(|s| *s as f64 / target as f64));
        if sizes.len() as u64 != want || !p["location"].as_str().unwrap_or("").contains("/_c") {
            off.push(format!(
                "{key}: {} files of {size} bytes (want {want}) at {}",
                sizes.len(),
                p["location"]
            ));
        }
    }
    println!(
        "  files: {} of {parts} partitions of the day have ⌈size / target⌉ files; files but the last are {:.0}–{:.0} % of the target",
        parts - off.len(),
        fills.iter().cloned().fold(f64::NAN, f64::min) * 100.0,
        fills.iter().cloned().fold(f64::NAN, f64::max) * 100.0
    );
    for o in off.iter().take(10) {
        println!("    {o}");
    }

    let (u, c) = (&fold["uncompacted"], &fold["compacted"]);
    assert_eq!(
        u["rows"], c["rows"],
        "the fold over the replaced files and over the compacted ones agree"
    );
    assert_eq!(u["rows_local"], c["rows"], "the local copies agree");
    let ratio = |k: &str| u[k].as_f64().unwrap() / c[k].as_f64().unwrap();
    println!(
        "  fold of the day's prices (current state of {} keys): {} files {:.3} s over S3, {:.3} s local; compacted {} files {:.3} s over S3, {:.3} s local: {:.0}× over S3, {:.0}× local (target ≥ 20×)",
        c["rows"],
        u["files"],
        u["s3"].as_f64().unwrap(),
        u["local"].as_f64().unwrap(),
        c["files"],
        c["s3"].as_f64().unwrap(),
        c["local"].as_f64().unwrap(),
        ratio("s3"),
        ratio("local")
    );

    // Commit time (flush start to durable) while a compaction runs and while none does.
    let ev = events(&log);
    let windows: Vec<(f64, f64)> = ev
        .iter()
        .filter(|(_, f)| f["message"] == "compacted a closed partition")
        .map(|(t, f)| (t - f["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0, *t))
        .collect();
    let (mut during, mut without) = (Vec::new(), Vec::new());
    let mut day_commits = 0;
    for (t, f) in &ev {
        if f["message"] != "committed" || *t < day_start || *t > day_end {
            continue;
        }
        day_commits += 1;
        let ms = f["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
        let began = t - ms / 1000.0;
        if windows.iter().any(|(a, b)| began < *b && *t > *a) {
            during.push(ms);
        } else {
            without.push(ms);
        }
    }
    let busy: f64 = windows.iter().map(|(a, b)| b - a).sum();
    let (p99_during, p99_without) = (percentile(during.clone(), 0.99), percentile(without.clone(), 0.99));
    println!(
        "  commits in the day: {day_commits}; {} compactions, {busy:.0} s in all; commit time p50/p99 while one runs {:.0}/{:.0} ms over {} commits, \
         while none does {:.0}/{:.0} ms over {}: p99 {:+.1} % (target within 10 %)",
        windows.len(),
        percentile(during.clone(), 0.5),
        p99_during,
        during.len(),
        percentile(without.clone(), 0.5),
        p99_without,
        without.len(),
        (p99_during / p99_without - 1.0) * 100.0
    );
    // The readers load the same S3 server, most right after an hour closes, as
    // compaction does: commit time by both, so that one is not taken for the other.
    let heavy: Vec<(f64, f64)> = std::io::BufReader::new(std::fs::File::open(&watched).unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|o| o["files"].as_u64().unwrap_or(0) > 100 && o["skipped"] != true)
        .filter_map(|o| {
            let t = o["t"].as_f64()?;
            Some((t, t + o["seconds"].as_f64()?))
        })
        .collect();
    let overlaps = |a: f64, b: f64, w: &[(f64, f64)]| w.iter().any(|(x, y)| a < *y && b > *x);
    let mut strata: BTreeMap<(bool, bool), Vec<f64>> = BTreeMap::new();
    for (t, f) in &ev {
        if f["message"] != "committed" || *t < day_start || *t > day_end {
            continue;
        }
        let ms = f["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
        let began = t - ms / 1000.0;
        strata
            .entry((overlaps(began, *t, &windows), overlaps(began, *t, &heavy)))
            .or_default()
            .push(ms);
    }
    for ((compacting, reading), v) in &strata {
        println!(
            "    compaction running {compacting:5}, a reader of over 100 files running {reading:5}: {} commits, p50/p90/p99 {:.0}/{:.0}/{:.0} ms",
            v.len(),
            percentile(v.clone(), 0.5),
            percentile(v.clone(), 0.9),
            percentile(v.clone(), 0.99)
        );
    }
    println!(
        "  status at the end: {}",
        serde_json::to_string(&st["compaction"]).unwrap_or_default()
    );

    assert!(wrong.is_empty(), "every read through Glue saw each row once");
    assert!(before_ok && after_ok, "walshore verify equal before and after");
    if arg("--keep", 0) == 1 {
        println!("  kept: {}", dir.keep().display());
    }
}
