//! A day of an Iceberg table, compressed: correctness at every watermark through crashes,
//! files, storage, freshness, memory and query speed.
//!
//! A `prices` table of `--keys` rows (default 1,000,000; one in `--toast-every` (100)
//! carries a 3.2 kB `note` stored out of line) is copied into a file lake. Then
//! `walshore run` replicates, for `--seconds` (900), a writer paced to make `--changes`
//! (10,000,000) changes in that time: updates of 50 keys that leave `note` alone (so
//! PostgreSQL sends it as unchanged TOAST), `note` rewritten now and then, deletes and
//! re-inserts; at 40 % of the day one TRUNCATE and a refill of every key, at 60 % an
//! added column that later updates fill. The flush interval is set so that the day makes
//! `--commits` (17,280) walshore commits, as a day at `flush_interval = 5s` does; an
//! Iceberg snapshot every `--commit-interval` (5s), 16 buckets, snapshots kept
//! `--retention` (5m).
//!
//! `walshore run` is killed at least `--kills` (55) times: every other run with a crash
//! point of the projector's commit path chosen at random (`WALSHORE_FAULT=<point>@<n>`,
//! an abort as abrupt as SIGKILL), the others by SIGKILL at a random instant; each time
//! it is started again at once. Meanwhile `bench/iceberg_day.py` checks every watermark
//! with DuckDB (and every 25th with pyiceberg) against the change log folded to the same
//! commit record, and measures each commit's freshness. After the day a `walshore sync`
//! catches up, the last watermark is checked, `walshore verify` compares source, change
//! log and Iceberg table, and DuckDB times a count and a point lookup both ways.
//!
//! Targets (issue 26): 0 rows differ at every watermark; live data files ≤ 32 and delete
//! files ≤ 128; storage flat once expiry runs; query ≥ 20× faster; freshness p99 ≤
//! commit interval + 30 s; peak RSS within the bounds.
//!
//! `cargo bench --features fault-injection --bench iceberg_day [-- --keys N --changes N --commits N --seconds N --kills N --commit-interval 5s --retention 5m --keep 1]`

#[path = "common.rs"]
#[allow(dead_code)] // the S3 test server is not used here
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use walshore::cluster::{ClusterOptions, TempCluster};

/// A small deterministic generator (the bench repeats itself run to run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

/// Files and bytes under a directory, by whether the name ends with `suffix`.
fn tree(dir: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            tree(&p, out);
        } else if let Ok(m) = e.metadata() {
            out.push((p.to_string_lossy().into_owned(), m.len()));
        }
    }
}

/// The Iceberg table's files on disk: (data files, delete files, manifests and lists,
/// metadata JSON files, MiB in all).
fn storage(ice: &Path) -> (usize, usize, usize, usize, f64) {
    let mut files = Vec::new();
    tree(ice, &mut files);
    let n = |f: &dyn Fn(&str) -> bool| files.iter().filter(|(p, _)| f(p)).count();
    (
        n(&|p| p.contains("/data/") && p.ends_with(".parquet") && !p.ends_with("-deletes.parquet")),
        n(&|p| p.ends_with("-deletes.parquet")),
        n(&|p| p.ends_with(".avro")),
        n(&|p| p.ends_with(".metadata.json")),
        files.iter().map(|(_, b)| b).sum::<u64>() as f64 / (1 << 20) as f64,
    )
}

/// What the supervisor of `walshore run` saw.
#[derive(Default)]
struct Runs {
    started: u32,
    /// Ended at a crash point of the projector's commit path.
    aborted: u32,
    /// Ended by SIGKILL.
    killed: u32,
    /// Exited on its own with an error (each is a finding).
    failed: Vec<String>,
    peak_rss_mib: f64,
}

/// Starts `walshore run` again and again until `stop`: every other run with a random
/// crash point of the Iceberg commit (at its n-th time, n up to twice the commit
/// intervals in `every`), the others killed at a random instant around `every`; the
/// last is stopped with SIGTERM.
fn supervise(
    walshore: &str,
    config: &Path,
    log: &Path,
    every: Duration,
    interval: Duration,
    stop: &AtomicBool,
) -> Runs {
    let mut runs = Runs::default();
    let mut rng = Lcg(7);
    let points = walshore::fault::ICEBERG_POINTS;
    while !stop.load(Ordering::SeqCst) {
        let mut cmd = Command::new(walshore);
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env("WALSHORE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap());
        let fault = runs.started % 2 == 0;
        let mut deadline = if fault {
            let point = points[rng.next(points.len() as u64) as usize];
            let hits = (2.0 * every.as_secs_f64() / interval.as_secs_f64()).max(1.0) as u64;
            cmd.env("WALSHORE_FAULT", format!("{point}@{}", 1 + rng.next(hits)));
            Instant::now() + every * 3
        } else {
            Instant::now() + every.mul_f64(0.5 + rng.next(1000) as f64 / 1000.0)
        };
        #[allow(clippy::zombie_processes)] // reaped by wait4 below
        let child = cmd.spawn().expect("spawn walshore run");
        runs.started += 1;
        let pid = child.id() as libc::pid_t;
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let mut signalled = None;
        loop {
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                break;
            }
            let now = Instant::now();
            if signalled.is_none() && stop.load(Ordering::SeqCst) {
                unsafe { libc::kill(pid, libc::SIGTERM) };
                signalled = Some(libc::SIGTERM);
                deadline = now + Duration::from_secs(120);
            } else if signalled == Some(libc::SIGTERM) && now >= deadline {
                // Not stopped in two minutes: a finding, and the bench goes on.
                runs.failed
                    .push(format!("run {} ignored SIGTERM for 120 s", runs.started));
                unsafe { libc::kill(pid, libc::SIGKILL) };
                signalled = Some(libc::SIGKILL);
            } else if signalled.is_none() && now >= deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                signalled = Some(libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        runs.peak_rss_mib = runs.peak_rss_mib.max(usage.ru_maxrss as f64 / 1024.0);
        if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT {
            runs.aborted += 1;
        } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
            runs.killed += 1;
        } else if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            runs.failed
                .push(format!("run {} ended with status {status}", runs.started));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    runs
}

fn main() {
    let arg = common::arg::<u64>;
    let text = |name: &str, default: &str| {
        std::env::args()
            .skip_while(|a| a != name)
            .nth(1)
            .unwrap_or_else(|| default.to_owned())
    };
    let keys = arg("--keys", 1_000_000);
    let changes = arg("--changes", 10_000_000);
    let commits = arg("--commits", 17_280);
    let seconds = arg("--seconds", 900);
    let kills = arg("--kills", 55);
    let toast_every = arg("--toast-every", 100);
    let commit_interval = text("--commit-interval", "5s");
    let retention = text("--retention", "5m");
    let flush_ms = (seconds * 1000 / commits).max(1);
    let walshore = env!("CARGO_BIN_EXE_walshore");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    let note =
        |g: &str| format!("CASE WHEN {g} % {toast_every} = 0 THEN repeat(md5({g}::text || random()::text), 100) END");
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE prices (sym text PRIMARY KEY, px numeric(18,6) NOT NULL, qty integer NOT NULL, venue text, note text);
         ALTER TABLE prices ALTER COLUMN note SET STORAGE EXTERNAL;
         INSERT INTO prices SELECT 'S' || g, g * 0.01, g % 1000, 'XLON', {} FROM generate_series(1, {keys}) g;
         CREATE PUBLICATION bench FOR TABLE prices;",
        note("g")
    )))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let ice = lake.join("_iceberg/public/prices");
    let config = common::iceberg_config(
        dir.path(),
        &cluster,
        "day",
        &format!("{flush_ms}ms"),
        &format!("commit_interval = \"{commit_interval}\"\nbuckets = 16\nsnapshot_retention = \"{retention}\"\n"),
    );
    let sync = || common::sync(walshore, &config);
    println!(
        "walshore Iceberg day: {keys} keys, {changes} changes in {seconds} s, flush every {flush_ms} ms \
         (~{commits} commits), an Iceberg snapshot every {commit_interval}, retention {retention}, >= {kills} kills"
    );
    let copy = sync();
    println!(
        "  copy and first Iceberg build: {:.1} s, peak RSS {:.0} MiB",
        copy.secs, copy.rss_mib
    );

    let stop_file = dir.path().join("final-watermark");
    let checker = common::follow(&lake, &stop_file, false);

    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_secs(seconds).div_f64(kills as f64);
    let interval = humantime::parse_duration(&commit_interval).expect("--commit-interval: a duration such as 5s");
    let supervisor = {
        let (stop, config, log) = (stop.clone(), config.clone(), dir.path().join("run.log"));
        std::thread::spawn(move || supervise(walshore, &config, &log, every, interval, &stop))
    };

    // The writer, paced to the day. Each commit is flushed (the test cluster's default
    // is off: the walwriter then flushes every 200 ms, and the walsender sends what is
    // flushed only, so walshore would see the changes in 200 ms bursts).
    rt.block_on(client.batch_execute("SET synchronous_commit = on"))
        .unwrap();
    let start = Instant::now();
    let day = Duration::from_secs(seconds);
    let mut rng = Lcg(1);
    let mut done = 0u64;
    let mut transactions = 0u64;
    let (mut truncated, mut added) = (false, false);
    let mut refill: Option<u64> = None;
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= day {
            break;
        }
        if elapsed >= next_sample {
            samples.push((elapsed.as_secs(), storage(&ice)));
            next_sample += day / 10;
        }
        if done as f64 >= changes as f64 * elapsed.as_secs_f64() / seconds as f64 {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let at = elapsed.as_secs_f64() / seconds as f64;
        let sql = if !truncated && at >= 0.4 {
            truncated = true;
            refill = Some(1);
            "TRUNCATE prices".to_owned()
        } else if let Some(from) = refill {
            let to = (from + 49_999).min(keys);
            refill = (to < keys).then_some(to + 1);
            format!(
                "INSERT INTO prices SELECT 'S' || g, g * 0.01, g % 1000, 'XPAR', {} FROM generate_series({from}, {to}) g",
                note("g")
            )
        } else if !added && at >= 0.6 {
            added = true;
            "ALTER TABLE prices ADD COLUMN extra text".to_owned()
        } else {
            let first = 1 + rng.next(keys.saturating_sub(50));
            match transactions % 20 {
                0 => format!(
                    "DELETE FROM prices WHERE sym IN (SELECT 'S' || g FROM generate_series({first}, {}) g)",
                    first + 19
                ),
                1 => format!(
                    "INSERT INTO prices SELECT 'S' || g, g * 0.01, g % 1000, 'XNYS', {} FROM generate_series({first}, {}) g \
                     ON CONFLICT (sym) DO UPDATE SET venue = 'XNYS'",
                    note("g"),
                    first + 19
                ),
                2 => {
                    let k = toast_every * (1 + rng.next(keys / toast_every));
                    format!("UPDATE prices SET note = repeat(md5(random()::text), 100) WHERE sym = 'S{k}'")
                }
                _ => format!(
                    "UPDATE prices SET px = px + 0.01, qty = qty + 1{} WHERE sym IN (SELECT 'S' || g FROM generate_series({first}, {}) g)",
                    if added { ", extra = 'e' || qty" } else { "" },
                    first + 49
                ),
            }
        };
        done += rt.block_on(client.execute(sql.as_str(), &[])).unwrap();
        transactions += 1;
    }
    let wrote = start.elapsed();
    samples.push((wrote.as_secs(), storage(&ice)));
    stop.store(true, Ordering::SeqCst);
    let runs = supervisor.join().unwrap();
    let last = sync();
    println!(
        "  the day: {transactions} transactions, {done} changes in {:.0} s; the last sync (catching up): {:.1} s",
        wrote.as_secs_f64(),
        last.secs
    );

    let status = Command::new(walshore)
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let t = &status["iceberg"]["public.prices"];
    let final_seq = t["watermark_seq"].as_u64().expect("a watermark after the sync");
    let head = status["committed"]["seq"].as_u64();
    let check = common::follower_report(checker, &stop_file, final_seq, &commit_interval);

    println!(
        "  walshore run: started {} times, {} ended at a crash point of the Iceberg commit, {} by SIGKILL, {} failed on their own {:?}",
        runs.started,
        runs.aborted,
        runs.killed,
        runs.failed.len(),
        runs.failed
    );
    println!(
        "  commit log head {head:?}, Iceberg watermark {final_seq}: {} watermarks seen, {} checked with DuckDB ({} differing), \
         {} with pyiceberg ({} differing), {} expired before they were checked; {} rows at the last",
        check["watermarks"],
        check["checked"],
        check["differing"].as_array().map_or(0, Vec::len),
        check["pyiceberg_checked"],
        check["pyiceberg_differing"].as_array().map_or(0, Vec::len),
        check["expired_unchecked"],
        check["rows_last"]
    );
    if check["differing"].as_array().is_some_and(|d| !d.is_empty()) {
        println!("  DIFFERING: {}", check["differing"]);
    }
    println!(
        "  storage of the Iceberg table over the day (data files, delete files, manifests, metadata files, MiB on disk):"
    );
    for (s, (d, x, m, j, mib)) in &samples {
        println!("    {s:>5} s  {d:>5} {x:>5} {m:>5} {j:>5}  {mib:>8.1}");
    }
    let live = (
        t["data_files"].as_u64().unwrap_or(0),
        t["delete_files"].as_u64().unwrap_or(0),
    );
    println!(
        "  after the day: {} live data files (target <= 32), {} live delete files (target <= 128), {} snapshots; on disk {:?}",
        live.0,
        live.1,
        t["snapshots"],
        storage(&ice)
    );
    println!(
        "  peak RSS: copy {:.0} MiB, run {:.0} MiB, last sync {:.0} MiB",
        copy.rss_mib, runs.peak_rss_mib, last.rss_mib
    );

    let verify = Command::new(walshore)
        .args(["verify", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", "warn")
        .output()
        .unwrap();
    let verdict = String::from_utf8_lossy(&verify.stdout);
    println!("  walshore verify: exit {:?}", verify.status.code());
    for line in verdict.lines().take(8) {
        println!("    {line}");
    }

    common::query_current_state(&rt, &client, &lake, "sym,px,qty,venue,extra,_lsn,_commit_ts", 3);
    assert!(
        check["differing"].as_array().is_some_and(Vec::is_empty),
        "every checked watermark equals the fold"
    );
    assert!(
        check["checked"].as_u64().unwrap_or(0) > 0 && check["expired_unchecked"] == 0,
        "every watermark was checked: {check}"
    );
    assert!(
        check["pyiceberg_differing"].as_array().is_some_and(Vec::is_empty),
        "pyiceberg agrees"
    );
    assert!(runs.failed.is_empty(), "no run failed on its own: {:?}", runs.failed);
    assert!(
        verify.status.success(),
        "walshore verify finds the lake equal:\n{verdict}"
    );
    if arg("--keep", 0) == 1 {
        println!("  the lake is kept at {}", dir.keep().join("lake").display());
    }
}
