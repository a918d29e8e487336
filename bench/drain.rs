//! Drain benchmark: walshore `sync` (file sink, S3 sink, metrics on) against PostgreSQL's
//! own `pg_recvlogical` (pgoutput, same options) on the same backlog, in the same run.
//!
//! `cargo bench --bench drain` (optionally `-- --runs 5 --scale 0.1`). For each workload a
//! throwaway cluster gets one slot per drain *before* the backlog is written, so every
//! drain decodes exactly the same WAL. Every drain is reported with its wall time, its
//! own CPU, the CPU of the walsender that served it (PostgreSQL's side: on one machine
//! the two share the cores, and the walsender is usually the one at 100 %), its reads
//! and bytes per read, and its writes (feedback), then the medians, the spread and the
//! ratios against pg_recvlogical (targets: walshore ≥ 1.7× its speed, the walsender's CPU
//! serving walshore ≤ 0.7× what it spends serving pg_recvlogical). Beside them a *null
//! drain*: walshore's own replication client (this binary run with `--null-drain`) that
//! frames each message and drops it: a reference for our side of the wire, not a limit,
//! since how a client reads changes what the walsender spends. Then the initial copy
//! against binary COPY (`--snapshot-only`) and the freshness of `walshore run` under a
//! steady writer (`--freshness-only`).
//! `BENCH_STDERR=FILE` keeps every command's stderr in FILE (with `WALSHORE_LOG=debug`,
//! a timeline of each walshore run).

#[path = "common.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use walshore::cluster::{ClusterOptions, TempCluster};

struct Workload {
    name: &'static str,
    changes: u64,
    sql: Vec<String>,
}

fn workloads(scale: f64) -> Vec<Workload> {
    let n = |x: f64| ((x * scale).round() as u64).max(1);
    let (trades, prices, updates, deletes, singles) =
        (n(1_000_000.0), n(500_000.0), n(200_000.0), n(50_000.0), n(1_000_000.0));
    vec![
        Workload {
            name: "batched (1000-row transactions)",
            changes: trades + prices + updates + deletes,
            sql: vec![
                format!("DO $$ BEGIN FOR t IN 0..{} LOOP
                    INSERT INTO trades (id, symbol, side, quantity, price, trader, traded_at)
                    SELECT i, (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], CASE WHEN i % 2 = 0 THEN 'B' ELSE 'S' END,
                           100 + i % 900, round((100 + (i * 7919 % 10000) / 100.0)::numeric, 6), 'trader' || (i % 17),
                           timestamptz '2026-11-20 09:30:00+00' + i * interval '1 millisecond'
                    FROM generate_series((t * 1000 + 1)::bigint, least((t + 1) * 1000, {trades})) AS i; COMMIT; END LOOP; END $$", (trades - 1) / 1000),
                format!("DO $$ BEGIN FOR t IN 0..{} LOOP
                    INSERT INTO prices (symbol, ts, bid, ask)
                    SELECT (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], timestamptz '2026-11-20 09:30:00+00' + i * interval '1 millisecond',
                           100 + i / 1000.0, 100.01 + i / 1000.0
                    FROM generate_series((t * 1000 + 1)::bigint, least((t + 1) * 1000, {prices})) AS i; COMMIT; END LOOP; END $$", (prices - 1) / 1000),
                format!("DO $$ BEGIN FOR t IN 0..{} LOOP
                    UPDATE trades SET price = price + 0.01 WHERE id BETWEEN t * 1000 + 1 AND least((t + 1) * 1000, {updates}); COMMIT; END LOOP; END $$", (updates - 1) / 1000),
                format!("DO $$ BEGIN FOR t IN 0..{} LOOP
                    DELETE FROM trades WHERE id BETWEEN {trades} - (t + 1) * 1000 + 1 AND {trades} - t * 1000 AND id > {trades} - {deletes}; COMMIT; END LOOP; END $$", (deletes - 1) / 1000),
            ],
        },
        Workload {
            name: "one-row transactions",
            changes: singles,
            sql: vec![format!("DO $$ BEGIN FOR i IN 1..{singles} LOOP
                INSERT INTO trades (id, symbol, side, quantity, price, trader, traded_at)
                VALUES (10000000 + i, 'AAPL', 'B', i % 900, 101.25, 'trader1', now()); COMMIT; END LOOP; END $$")],
        },
    ]
}

const SCHEMA: &str = "
CREATE TABLE trades (id bigint PRIMARY KEY, symbol text NOT NULL, side char(1) NOT NULL, quantity integer NOT NULL,
    price numeric(18,6) NOT NULL, trader text NOT NULL, traded_at timestamptz NOT NULL);
CREATE TABLE prices (symbol text NOT NULL, ts timestamptz NOT NULL, bid numeric(18,6), ask numeric(18,6), PRIMARY KEY (symbol, ts));
CREATE PUBLICATION bench FOR TABLE trades, prices;";

/// Runs a command, returning (seconds, peak RSS in KiB of that process).
fn timed(cmd: &mut Command) -> (f64, i64) {
    let t = common::timed(cmd);
    *LAST_CPU.lock().unwrap() = t.cpu_secs;
    (t.secs, (t.rss_mib * 1024.0) as i64)
}

/// CPU seconds (user + system) of the last command [`timed`] ran: steadier than wall
/// time on a noisy machine.
static LAST_CPU: std::sync::Mutex<f64> = std::sync::Mutex::new(0.0);

fn median(v: &mut [f64]) -> f64 {
    common::median(v.to_vec())
}

/// `--null-drain CONFIG END STATS`: walshore's replication client reads the config's
/// slot up to END, frames each message and drops it (answering the server's reply
/// requests), then writes its reads, the bytes they brought and its status updates to
/// STATS.
fn null_drain(config: &str, end: &str, stats: &str) {
    use walshore::source::{Replication, XLog};
    let cfg = walshore::config::Config::load(Path::new(config)).expect("config");
    let end: walshore::lsn::Lsn = end.parse().expect("an LSN");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut repl, slot, _) = Replication::open(&cfg.source, false).await.expect("open");
        repl.start(&cfg.source, slot.confirmed_flush).await.expect("start");
        let mut position = slot.confirmed_flush;
        loop {
            match repl.next().await.expect("next") {
                XLog::Data { wal_start, .. } => position = position.max(wal_start),
                XLog::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    position = position.max(wal_end);
                    if reply_requested {
                        repl.confirm(position, false).await.expect("confirm");
                    }
                }
            }
            if position >= end {
                break;
            }
        }
        let wire = repl.wire_stats();
        std::fs::write(stats, format!("{} {} {}", wire.reads, wire.bytes, wire.status_updates)).expect("stats");
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--null-drain") {
        return null_drain(&args[i + 1], &args[i + 2], &args[i + 3]);
    }
    let arg = common::arg::<f64>;
    let runs = arg("--runs", 3.0) as usize;
    let scale = arg("--scale", 1.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let walshore = env!("CARGO_BIN_EXE_walshore");
    println!("walshore drain benchmark: {runs} runs per tool, scale {scale}");
    // `--drain-only`, `--snapshot-only`, `--freshness-only`: that part alone.
    let only = ["--drain-only", "--snapshot-only", "--freshness-only"]
        .into_iter()
        .find(|o| args.iter().any(|a| a == o));
    let part = |name: &str| only.is_none_or(|o| o == name);
    if part("--drain-only") {
        drain_benches(&rt, walshore, runs, scale);
    }
    if part("--snapshot-only") {
        snapshot_bench(&rt, walshore, runs, (1_000_000.0 * scale) as u64);
    }
    if part("--freshness-only") {
        freshness_bench(&rt, walshore);
    }
}

/// Freshness under a steady writer: `walshore run` (file sink, `flush_interval` 1 s)
/// beside a writer committing a one-row transaction every 20 ms, its
/// `walshore_committed_lag_seconds` (now minus the commit time of the newest
/// transaction in the lake) read every 100 ms for 20 s. The contract: a commit is in the
/// lake within `flush_interval` + 1 s.
fn freshness_bench(rt: &tokio::runtime::Runtime, walshore: &str) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(client.batch_execute(SCHEMA)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = config_for_slot(
        dir.path(),
        &cluster,
        "fresh",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[snapshot]", "flush_interval = \"1s\"\n[snapshot]"),
    )
    .unwrap();
    let mut run = Command::new(walshore)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", log_level())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        let client = rt.block_on(cluster.connect("postgres")).unwrap();
        rt.spawn(async move {
            let mut i = 50_000_000i64;
            while writing.load(Ordering::Relaxed) {
                i += 1;
                client
                    .batch_execute(&format!(
                        "INSERT INTO trades VALUES ({i}, 'AAPL', 'B', 1, 101.25, 'trader1', now())"
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while metric(port, "walshore_committed_lag_seconds").is_none() {
        assert!(Instant::now() < deadline, "walshore committed nothing within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut lags = Vec::new();
    let until = Instant::now() + std::time::Duration::from_secs(20);
    while Instant::now() < until {
        lags.extend(metric(port, "walshore_committed_lag_seconds"));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    writing.store(false, Ordering::Relaxed);
    rt.block_on(writer).unwrap();
    unsafe { libc::kill(run.id() as libc::pid_t, libc::SIGTERM) };
    assert!(run.wait().unwrap().success(), "walshore run stopped cleanly");
    let max = lags.iter().cloned().fold(0.0, f64::max);
    println!(
        "\n== freshness : a one-row transaction every 20 ms, flush_interval 1 s, {} samples\n  committed lag median {:.2} s, max {max:.2} s (target: max <= 2.00)",
        lags.len(),
        median(&mut lags)
    );
}

/// A metric's value from walshore's endpoint (summed over its series), if it has one.
fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut body = String::new();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    s.read_to_string(&mut body).ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// What one drain cost: wall time, the drain's own CPU, the CPU of the walsender(s) that
/// served it, and the drain's socket calls (`recvfrom` reads and `sendto` writes, counted
/// by `perf stat` where it works; a drain's writes are its feedback messages, plus for
/// walshore a few catalog queries and, into S3, its requests).
#[derive(Default, Clone, Copy)]
struct Drain {
    secs: f64,
    cpu: f64,
    walsender: f64,
    reads: Option<u64>,
    sends: Option<u64>,
    rss_mib: f64,
}

/// The drains of one tool over the runs, and how to print them.
struct Tool {
    name: &'static str,
    runs: Vec<Drain>,
}

impl Tool {
    fn new(name: &'static str) -> Tool {
        Tool { name, runs: Vec::new() }
    }

    fn median(&self, f: impl Fn(&Drain) -> f64) -> f64 {
        common::median(self.runs.iter().map(f).collect())
    }

    /// Prints run `i` (`bytes`: the stream's size, for bytes per read) and keeps it.
    fn push(&mut self, i: usize, d: Drain, changes: u64, bytes: Option<u64>, extra: &str) {
        let reads = match (d.reads, bytes) {
            (Some(r), Some(b)) => format!("  reads {r} ({:.0} B/read)", b as f64 / r.max(1) as f64),
            (Some(r), None) => format!("  reads {r}"),
            _ => String::new(),
        };
        let sends = d.sends.map(|s| format!("  sends {s}")).unwrap_or_default();
        println!(
            "  {:<26} run {i}: {:.2}s  {:.0} changes/s  CPU {:.2}s  walsender CPU {:.2}s{reads}{sends}  peak RSS {:.0} MiB{extra}",
            self.name,
            d.secs,
            changes as f64 / d.secs,
            d.cpu,
            d.walsender,
            d.rss_mib
        );
        self.runs.push(d);
    }

    /// The medians, per million changes: wall, walsender CPU, own CPU.
    fn summary(&self, changes: u64) -> String {
        let m = 1e6 / changes as f64;
        let spread = {
            let secs: Vec<f64> = self.runs.iter().map(|d| d.secs).collect();
            let (lo, hi) = secs
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            format!("{lo:.2}-{hi:.2}s")
        };
        format!(
            "  {:<26} median {:.2}s ({spread}), {:.0} changes/s; per million changes: walsender CPU {:.2}s, own CPU {:.2}s",
            self.name,
            self.median(|d| d.secs),
            changes as f64 / self.median(|d| d.secs),
            self.median(|d| d.walsender) * m,
            self.median(|d| d.cpu) * m,
        )
    }
}

/// Runs a drain command under the walsender watch (and `perf stat` when `perf` counts
/// system calls here).
fn drain(cluster: &TempCluster, perf: bool, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Drain {
    let counts = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = if perf {
        let mut c = Command::new("perf");
        c.args(["stat", "-x", ",", "-o"])
            .arg(counts.path())
            .args(["-e", "syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let watch = Walsenders::watch(cluster);
    let t = common::timed(&mut cmd);
    let walsender = watch.stop();
    let text = std::fs::read_to_string(counts.path()).unwrap_or_default();
    let count = |event: &str| {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next()?.trim().parse().ok())
    };
    Drain {
        secs: t.secs,
        cpu: t.cpu_secs,
        walsender,
        reads: count("sys_enter_recvfrom"),
        sends: count("sys_enter_sendto"),
        rss_mib: t.rss_mib,
    }
}

/// Whether `perf stat` can count system calls on this machine.
fn perf_counts_syscalls() -> bool {
    Command::new("perf")
        .args(["stat", "-x", ",", "-e", "syscalls:sys_enter_recvfrom", "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The CPU of every walsender that runs while a drain does: each child of the
/// postmaster titled `postgres: … walsender …`, its `utime + stime` read from
/// `/proc/<pid>/stat` every 5 ms until it exits (so at most 5 ms of a walsender's last
/// CPU goes uncounted; one that was already running counts from the first reading).
/// Other processes are looked at once.
struct Walsenders {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl Walsenders {
    fn watch(cluster: &TempCluster) -> Walsenders {
        let pid = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid")).unwrap();
        let postmaster: u32 = pid.lines().next().unwrap().trim().parse().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
                // Now, in clock ticks since boot (the unit of a process's start time).
                let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
                let started: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
                let began = (started * tick) as u64;
                // Each walsender's CPU ticks: (first reading, last reading). One that was
                // running before the watch began (the last drain's, still exiting)
                // counts only from the first reading.
                let mut seen = std::collections::HashMap::<u32, (u64, u64)>::new();
                // Processes found not to be walsenders, not read again.
                let mut others = std::collections::HashSet::<u32>::new();
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::Relaxed);
                    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                            continue;
                        };
                        if others.contains(&pid) {
                            continue;
                        }
                        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                            continue;
                        };
                        // Fields after the command name: state(3) ppid(4) … utime(14)
                        // stime(15) … starttime(22).
                        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
                        if fields.len() < 20 {
                            continue;
                        }
                        let ticks = fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
                        if let Some(entry) = seen.get_mut(&pid) {
                            entry.1 = ticks;
                            continue;
                        }
                        if fields[1].parse() != Ok(postmaster) {
                            others.insert(pid);
                            continue;
                        }
                        // A new backend carries the postmaster's command line until it
                        // sets its title (`postgres: [cluster_name: ]walsender …`):
                        // looked at again until then.
                        let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        if !title.starts_with(b"postgres: ") {
                            continue;
                        }
                        if !title.windows(11).any(|w| w == b" walsender ") {
                            others.insert(pid);
                            continue;
                        }
                        let start = fields[19].parse::<u64>().unwrap_or(0);
                        seen.insert(pid, (if start + 1 >= began { 0 } else { ticks }, ticks));
                    }
                    if last {
                        return seen.values().map(|(first, last)| last - first).sum::<u64>() as f64 / tick;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
        };
        Walsenders { stop, thread }
    }

    /// The walsenders' CPU seconds.
    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn drain_benches(rt: &tokio::runtime::Runtime, walshore: &str, runs: usize, scale: f64) {
    let moto = common::Moto::start();
    let perf = perf_counts_syscalls();
    if !perf {
        println!("(perf cannot count system calls here: reads and sends are not shown)");
    }
    // `--one-row-only`: the one-row workload alone (for a profiler).
    let one_row_only = std::env::args().any(|a| a == "--one-row-only");
    for w in workloads(scale)
        .into_iter()
        .filter(|w| !one_row_only || w.name.starts_with("one-row"))
    {
        // A slot per drain and run, made before the backlog.
        let cluster = TempCluster::start(ClusterOptions {
            settings: vec![format!("max_replication_slots = {}", 6 * runs + 4)],
            ..ClusterOptions::default()
        })
        .expect("start PostgreSQL");
        let client = rt.block_on(cluster.connect("postgres")).unwrap();
        rt.block_on(client.batch_execute(SCHEMA)).unwrap();
        for i in 0..runs {
            for tool in ["recv", "bin", "null", "ws", "wsm", "wss3"] {
                rt.block_on(client.batch_execute(&format!(
                    "SELECT pg_create_logical_replication_slot('{tool}_{i}', 'pgoutput')"
                )))
                .unwrap();
            }
        }
        let t = Instant::now();
        for sql in &w.sql {
            rt.block_on(client.batch_execute(sql)).unwrap();
        }
        // As the drains find it after a busy day: vacuumed and checkpointed.
        rt.block_on(client.batch_execute("VACUUM")).unwrap();
        rt.block_on(client.batch_execute("CHECKPOINT")).unwrap();
        let end: String = rt
            .block_on(client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]))
            .unwrap()
            .get(0);
        let wal: i64 = rt.block_on(client.query_one("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), (SELECT restart_lsn FROM pg_replication_slots LIMIT 1))::bigint", &[])).unwrap().get(0);
        println!(
            "\n== {} : {} changes, {:.0} MiB of WAL, written in {:.1}s",
            w.name,
            w.changes,
            wal as f64 / 1048576.0,
            t.elapsed().as_secs_f64()
        );

        let dir = tempfile::tempdir().unwrap();
        let mut recv_t = Tool::new("pg_recvlogical");
        let mut bin_t = Tool::new("pg_recvlogical binary=true");
        let mut null_t = Tool::new("null drain");
        let mut ws_t = Tool::new("walshore sync");
        let mut s3_t = Tool::new("walshore sync into S3");
        let mut wsm_t = Tool::new("walshore sync with metrics");
        let mut s3_moto = Vec::new();
        // The stream's size in bytes (pgoutput's text output), as the null drain counts it.
        let mut stream_bytes = None;
        let walshore_log = log_level();
        for i in 0..runs {
            // pgoutput's text output (what walshore reads) and its binary output.
            let recv = |slot: String, binary: bool| {
                let (program, mut args) = common::recvlogical(&cluster, &slot, &end);
                if binary {
                    args.extend(["-o".into(), "binary=true".into()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                drain(&cluster, perf, &program, &args, &[])
            };
            // `walshore sync` on `config`, with `env` beside the log filter.
            let sync = |config: &Path, env: &[(&str, &str)]| {
                let mut env = env.to_vec();
                env.push(("WALSHORE_LOG", &walshore_log));
                drain(
                    &cluster,
                    perf,
                    Path::new(walshore),
                    &["sync", "--config", config.to_str().unwrap()],
                    &env,
                )
            };
            recv_t.push(i, recv(format!("recv_{i}"), false), w.changes, stream_bytes, "");
            bin_t.push(i, recv(format!("bin_{i}"), true), w.changes, None, "");
            // walshore's own replication client, each message framed and dropped.
            let null_config = config_for_slot(dir.path(), &cluster, &format!("null_{i}"), "", "");
            let stats = dir.path().join(format!("null-{i}.stats"));
            let d = drain(
                &cluster,
                perf,
                &std::env::current_exe().unwrap(),
                &[
                    "--null-drain",
                    null_config.to_str().unwrap(),
                    &end,
                    stats.to_str().unwrap(),
                ],
                &[],
            );
            let wire: Vec<u64> = std::fs::read_to_string(&stats)
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            stream_bytes = Some(wire[1]);
            null_t.push(
                i,
                d,
                w.changes,
                stream_bytes,
                &format!("  (its own count: {} reads, {} status updates)", wire[0], wire[2]),
            );
            let config = write_config(dir.path(), &cluster, i);
            let d = sync(&config, &[]);
            ws_t.push(i, d, w.changes, stream_bytes, "");
            // The same into the S3 test server.
            let sink = format!(
                "url = \"s3://lake/{}-{i}\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"",
                if w.name.starts_with("one-row") {
                    "one-row"
                } else {
                    "batched"
                },
                moto.port
            );
            let config = config_for_slot(dir.path(), &cluster, &format!("wss3_{i}"), &sink, "");
            let moto_before = moto.cpu_secs();
            let d = sync(
                &config,
                &[("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")],
            );
            let moto_cpu = moto.cpu_secs() - moto_before;
            s3_moto.push(moto_cpu);
            s3_t.push(i, d, w.changes, None, &format!("  (S3 test server CPU {moto_cpu:.2}s)"));
            // The same with the metrics endpoint on, scraped every 500 ms, and the slot
            // sampled every second.
            let (config, port) = write_metrics_config(dir.path(), &cluster, i);
            let scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let scraper = {
                let scraping = scraping.clone();
                std::thread::spawn(move || {
                    let mut scrapes = 0u64;
                    while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                        if scrape(port) {
                            scrapes += 1;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                    scrapes
                })
            };
            let d = sync(&config, &[]);
            scraping.store(false, std::sync::atomic::Ordering::Relaxed);
            let scrapes = scraper.join().unwrap();
            wsm_t.push(i, d, w.changes, None, &format!("  ({scrapes} scrapes)"));
        }
        for t in [&recv_t, &bin_t, &null_t, &ws_t, &s3_t, &wsm_t] {
            println!("{}", t.summary(w.changes));
        }
        let r = recv_t.median(|d| d.secs);
        let ws_cpu_ratio = ws_t.median(|d| d.walsender) / recv_t.median(|d| d.walsender);
        println!(
            "  RATIO walshore/pg_recvlogical = {:.2} (target >= 1.70); walsender CPU serving walshore / serving pg_recvlogical = {ws_cpu_ratio:.2} (target <= 0.70); walshore peak RSS {:.0} MiB (target <= 256)",
            r / ws_t.median(|d| d.secs),
            ws_t.runs.iter().map(|d| d.rss_mib).fold(0.0, f64::max),
        );
        println!(
            "  RATIO into S3/pg_recvlogical = {:.2}, with metrics/pg_recvlogical = {:.2} (targets >= 1.70); the S3 test server's own CPU {:.2}s per run (it shares the 2 cores)",
            r / s3_t.median(|d| d.secs),
            r / wsm_t.median(|d| d.secs),
            median(&mut s3_moto)
        );
        println!(
            "  RATIO walshore/null drain = {:.2}; walsender CPU serving the null drain / serving pg_recvlogical = {:.2}",
            null_t.median(|d| d.secs) / ws_t.median(|d| d.secs),
            null_t.median(|d| d.walsender) / recv_t.median(|d| d.walsender),
        );
        println!(
            "  pgoutput binary=true vs text, PostgreSQL side: {:.0} vs {:.0} changes/s (binary/text = {:.2})",
            w.changes as f64 / bin_t.median(|d| d.secs),
            w.changes as f64 / r,
            r / bin_t.median(|d| d.secs)
        );
    }
}

/// The initial copy of `rows` trade rows: walshore `sync` on a new lake against
/// `COPY trades TO STDOUT (FORMAT binary)` into /dev/null, same table, same run.
fn snapshot_bench(rt: &tokio::runtime::Runtime, walshore: &str, runs: usize, rows: u64) {
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let client = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(client.batch_execute(SCHEMA)).unwrap();
    rt.block_on(client.batch_execute(&format!(
        "INSERT INTO trades (id, symbol, side, quantity, price, trader, traded_at)
         SELECT i, (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], CASE WHEN i % 2 = 0 THEN 'B' ELSE 'S' END,
                100 + i % 900, round((100 + (i * 7919 % 10000) / 100.0)::numeric, 6), 'trader' || (i % 17),
                timestamptz '2026-11-20 09:30:00+00' + i * interval '1 millisecond'
         FROM generate_series(1::bigint, {rows}) AS i"
    )))
    .unwrap();
    rt.block_on(client.batch_execute("VACUUM ANALYZE trades")).unwrap();
    let size: i64 = rt
        .block_on(client.query_one("SELECT pg_table_size('trades')", &[]))
        .unwrap()
        .get(0);
    println!(
        "\n== initial copy : {rows} trade rows, {:.0} MiB table",
        size as f64 / 1048576.0
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut copy_t, mut ws_t, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (secs, _) = timed(&mut common::psql(&cluster, "COPY trades TO STDOUT (FORMAT binary)"));
        copy_t.push(secs);
        println!(
            "  COPY binary    run {i}: {secs:.2}s  {:.0} rows/s  psql CPU {:.2}s",
            rows as f64 / secs,
            *LAST_CPU.lock().unwrap()
        );
        let path = dir.path().join(format!("snap-{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"snap_{i}\"\n[sink]\nurl = \"file://{}/snap-lake-{i}\"\n[snapshot]\nmode = \"initial\"\nparallelism = 2\n",
                cluster.url("postgres", "postgres"),
                dir.path().display()
            ),
        )
        .unwrap();
        let (secs, maxrss) = timed(
            Command::new(walshore)
                .args(["sync", "--config", path.to_str().unwrap()])
                .env("WALSHORE_LOG", log_level()),
        );
        ws_t.push(secs);
        rss.push(maxrss as f64 / 1024.0);
        println!(
            "  walshore sync  run {i}: {secs:.2}s  {:.0} rows/s  CPU {:.2}s  peak RSS {:.0} MiB",
            rows as f64 / secs,
            *LAST_CPU.lock().unwrap(),
            maxrss as f64 / 1024.0
        );
        rt.block_on(client.batch_execute(&format!("SELECT pg_drop_replication_slot('snap_{i}')")))
            .unwrap();
    }
    // Each run's COPY and walshore follow each other: the ratio within a run shares the
    // machine's mood of the moment, which drifts on a shared 2-core machine.
    let mut paired: Vec<f64> = copy_t.iter().zip(&ws_t).map(|(c, w)| c / w).collect();
    let paired = median(&mut paired);
    let (c, s) = (median(&mut copy_t), median(&mut ws_t));
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    println!(
        "  median: COPY binary {:.0} rows/s, walshore {:.0} rows/s",
        rows as f64 / c,
        rows as f64 / s
    );
    println!(
        "  RATIO walshore/COPY = {:.2} (target >= 0.90), median of the runs' own ratios {paired:.2}; walshore peak RSS {peak:.0} MiB (target <= 256)",
        c / s
    );
}

/// walshore's log filter in the runs: `WALSHORE_LOG` if set, else warnings only.
fn log_level() -> String {
    std::env::var("WALSHORE_LOG").unwrap_or_else(|_| "warn".into())
}

/// One GET /metrics; true when it answered.
fn scrape(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut body = Vec::new();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_end(&mut body).is_ok()
        && body.starts_with(b"HTTP/1.1 200")
}

/// [`write_config`] for slot `wsm_{i}` with the metrics endpoint on a free port.
fn write_metrics_config(dir: &Path, cluster: &TempCluster, i: usize) -> (std::path::PathBuf, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\nslot_interval = \"1s\"\n");
    (config_for_slot(dir, cluster, &format!("wsm_{i}"), "", &extra), port)
}

fn write_config(dir: &Path, cluster: &TempCluster, i: usize) -> std::path::PathBuf {
    config_for_slot(dir, cluster, &format!("ws_{i}"), "", "")
}

/// A config draining publication `bench` through `slot` into its own file lake, with
/// `extra` sections.
fn config_for_slot(dir: &Path, cluster: &TempCluster, slot: &str, sink: &str, extra: &str) -> std::path::PathBuf {
    let local;
    let sink = if sink.is_empty() {
        local = format!("url = \"file://{}/lake-{slot}\"", dir.display());
        &local
    } else {
        sink
    };
    let path = dir.join(format!("bench-{slot}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"{slot}\"\n[sink]\n{sink}\n[snapshot]\nmode = \"never\"\n{extra}",
            cluster.url("postgres", "postgres"),
        ),
    )
    .unwrap();
    path
}
