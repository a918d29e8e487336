//! What the benchmarks share: timing a command with its peak RSS and CPU, and medians.

use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Instant;

/// A finished command: wall seconds, peak RSS (MiB) and CPU seconds (user + system).
pub struct Timed {
    pub secs: f64,
    pub rss_mib: f64,
    pub cpu_secs: f64,
}

/// `pg_recvlogical` draining `slot` (publication `bench`) up to `end` into /dev/null, with
/// the options walshore asks for (pgoutput protocol 2, streaming): the program (the
/// cluster's own, else the one on PATH) and its arguments.
pub fn recvlogical(
    cluster: &walshore::cluster::TempCluster,
    slot: &str,
    end: &str,
) -> (std::path::PathBuf, Vec<String>) {
    let own = cluster.bin().join("pg_recvlogical");
    let program = if own.exists() { own } else { "pg_recvlogical".into() };
    let port = cluster.port.to_string();
    let args = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "--slot",
        slot,
        "--start",
        "--endpos",
        end,
        "--no-loop",
        "-f",
        "/dev/null",
        "-o",
        "proto_version=2",
        "-o",
        "publication_names=bench",
        "-o",
        "streaming=on",
    ];
    (program, args.iter().map(|a| a.to_string()).collect())
}

/// Runs a command to its end; panics with its stderr unless it exits 0.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
pub fn timed(cmd: &mut Command) -> Timed {
    let start = Instant::now();
    // `BENCH_STDERR=FILE`: the commands' stderr appended to FILE (with
    // `WALSHORE_LOG=debug` in the environment, a timeline of each run).
    // Otherwise a file, read back only on failure: a pipe nobody reads while the
    // command runs fills at 64 KiB of log lines and stops it.
    let kept = tempfile::tempfile().expect("a temporary file for stderr");
    let stderr = match std::env::var_os("BENCH_STDERR") {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open BENCH_STDERR"),
        ),
        None => Stdio::from(kept.try_clone().expect("a second handle on the stderr file")),
    };
    let child = cmd.stdout(Stdio::null()).stderr(stderr).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4");
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let mut err = String::new();
        use std::io::{Read, Seek};
        let mut kept = kept;
        kept.rewind().ok();
        kept.read_to_string(&mut err).ok();
        drop(child);
        panic!("{cmd:?} failed (status {status}):\n{err}");
    }
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Timed {
        secs,
        rss_mib: usage.ru_maxrss as f64 / 1024.0,
        cpu_secs: cpu(usage.ru_utime) + cpu(usage.ru_stime),
    }
}

/// A file lake under `dir` replicating `cluster`'s publication `bench` through `slot`,
/// a flush every `flush`, with the `[iceberg]` section `iceberg`: the config's path.
#[allow(dead_code)] // the Iceberg benches'
pub fn iceberg_config(
    dir: &std::path::Path,
    cluster: &walshore::cluster::TempCluster,
    slot: &str,
    flush: &str,
    iceberg: &str,
) -> std::path::PathBuf {
    let config = dir.join(format!("{slot}.toml"));
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"{slot}\"\nspill_dir = \"{}/spill\"\n\
             [sink]\nurl = \"file://{}/lake\"\nflush_interval = \"{flush}\"\n[snapshot]\nmode = \"initial\"\n\
             [iceberg]\n{iceberg}",
            cluster.url("postgres", "postgres"),
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    config
}

/// `walshore sync --config config` (its log at warn), timed.
#[allow(dead_code)] // the Iceberg benches'
pub fn sync(walshore: &str, config: &std::path::Path) -> Timed {
    timed(
        Command::new(walshore)
            .args(["sync", "--config", config.to_str().unwrap()])
            .env("WALSHORE_LOG", "warn"),
    )
}

/// `bench/iceberg_day.py` following `public.prices`'s Iceberg table in the lake at
/// `lake` until `stop_file` names the last watermark ([`follower_report`]): checking
/// every watermark, or with `freshness_only` measuring freshness alone.
#[allow(dead_code)] // the Iceberg benches'
pub fn follow(lake: &std::path::Path, stop_file: &std::path::Path, freshness_only: bool) -> std::process::Child {
    Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/iceberg_day.py"))
        .args([
            lake.to_str().unwrap(),
            "public.prices",
            "sym",
            stop_file.to_str().unwrap(),
        ])
        .args(freshness_only.then_some("--freshness-only"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

/// Tells the follower the last watermark, waits for its report and prints the
/// freshness in it (target: p99 within `interval` + 30 s).
#[allow(dead_code)] // the Iceberg benches'
pub fn follower_report(
    follower: std::process::Child,
    stop_file: &std::path::Path,
    watermark: u64,
    interval: &str,
) -> serde_json::Value {
    std::fs::write(stop_file, watermark.to_string()).unwrap();
    let out = follower.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Iceberg follower (bench/iceberg_day.py) failed"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &report["freshness"];
    println!(
        "  freshness, commit record to the timestamp of the first snapshot holding it, over {} commits: p50 {:.1} s, p99 {:.1} s, max {:.1} s (target p99 <= {interval} + 30 s)",
        f["records"],
        f["p50"].as_f64().unwrap_or(f64::NAN),
        f["p99"].as_f64().unwrap_or(f64::NAN),
        f["max"].as_f64().unwrap_or(f64::NAN)
    );
    report
}

/// DuckDB's full count and point lookup of `public.prices`, from the change log and
/// from the Iceberg table (`bench/iceberg_query.py`, `runs` times each), on a key in
/// the middle of PostgreSQL's table: prints the medians and the ratios, checks the two
/// lookups alike, and returns the script's report.
#[allow(dead_code)] // the Iceberg benches'
pub fn query_current_state(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    lake: &std::path::Path,
    columns: &str,
    runs: u64,
) -> serde_json::Value {
    // A key that is there (the writers delete some).
    let point: String = rt
        .block_on(client.query_one(
            "SELECT sym FROM prices ORDER BY sym OFFSET (SELECT count(*) / 2 FROM prices) LIMIT 1",
            &[],
        ))
        .unwrap()
        .get(0);
    let out = Command::new("python3")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/bench/iceberg_query.py"),
            lake.to_str().unwrap(),
            "public.prices",
            "sym",
            &point,
            columns,
            &runs.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let median = |k: &str| q[k]["median"].as_f64().unwrap();
    for k in ["fold count", "iceberg count", "fold point", "iceberg point"] {
        println!("  {k:<14} median {:.4} s  {}", median(k), q[k]["result"]);
    }
    println!(
        "  RATIO count fold/iceberg = {:.1} (target >= 20); point fold/iceberg = {:.1} (target >= 20)",
        median("fold count") / median("iceberg count"),
        median("fold point") / median("iceberg point")
    );
    assert_eq!(
        q["fold point"]["result"], q["iceberg point"]["result"],
        "both answer the point lookup alike"
    );
    q
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The value after `--name` on the command line, or `default`.
pub fn arg<T: FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `psql -c sql` as the cluster's superuser, over TCP, output to be discarded: the
/// reference reads (`COPY … TO STDOUT`).
pub fn psql(cluster: &walshore::cluster::TempCluster, sql: &str) -> Command {
    let bin = cluster.bin().join("psql");
    let mut cmd = Command::new(if bin.exists() { bin } else { "psql".into() });
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-X",
        "-q",
        "-c",
        sql,
    ]);
    cmd
}

/// The S3 test server (moto) on a free loopback port, with bucket `lake`.
pub struct Moto {
    child: std::process::Child,
    pub port: u16,
}

impl Moto {
    #[allow(clippy::zombie_processes)] // a failed start panics the benchmark; Drop reaps otherwise
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto server (pip install 'moto[server]')");
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::{Read, Write};
                write!(
                    s,
                    "PUT /lake HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .is_ok()
                    && s.read_to_string(&mut String::new()).is_ok()
            });
            if ok {
                return Moto { child, port };
            }
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Moto {
    /// CPU seconds (user + system) the server has used so far: on a 2-core machine it
    /// competes with PostgreSQL and walshore.
    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are
        // the 12th and 13th, in clock ticks.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
