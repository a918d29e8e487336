//! Test harness: a real PostgreSQL (throwaway cluster) and a real S3-protocol server
//! (moto) on loopback, the walshore binary, and a lake reader that replays a table.
//! A component that cannot start fails the test loudly; nothing is skipped.
#![allow(dead_code)]

pub mod kinds;
pub mod proxy;
pub mod trades;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use walshore::cluster::{ClusterOptions, TempCluster};
use walshore::config::Config;

pub const BIN: &str = env!("CARGO_BIN_EXE_walshore");

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn cluster(settings: &[&str]) -> TempCluster {
    cluster_with_env(settings, Vec::new())
}

fn cluster_with_env(settings: &[&str], env: Vec<(String, String)>) -> TempCluster {
    TempCluster::start(ClusterOptions {
        settings: settings.iter().map(|s| s.to_string()).collect(),
        dir: None,
        env,
    })
    .expect("start a throwaway PostgreSQL (is the `postgresql` Debian package installed?)")
}

/// The server's clock, shifted by libfaketime: commits on other days than today, so
/// that `_commit_ts` (PostgreSQL's commit time) spreads over several `dt` partitions.
/// walshore and the test keep the real clock.
pub struct Clock {
    _dir: tempfile::TempDir,
    file: PathBuf,
}

impl Clock {
    /// From now on the server's clock is `days` days ahead of the real one (read by
    /// the server at every clock call: `FAKETIME_NO_CACHE`).
    pub fn shift_days(&self, days: u32) {
        std::fs::write(&self.file, format!("+{days}d\n")).unwrap();
    }
}

/// A throwaway PostgreSQL whose clock the test moves with [`Clock::shift_days`].
pub fn cluster_with_clock(settings: &[&str]) -> (TempCluster, Clock) {
    let lib = walshore::cluster::libfaketime()
        .expect("libfaketime not found under /usr/lib/*/faketime: install the Debian package `libfaketime`");
    let dir = tempfile::Builder::new().prefix("walshore-clock-").tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let clock = Clock {
        file: dir.path().join("offset"),
        _dir: dir,
    };
    clock.shift_days(0);
    std::fs::set_permissions(&clock.file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", clock.file.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    (cluster_with_env(settings, env), clock)
}

/// The moto server (S3 protocol) on a free loopback port, with one bucket.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start(bucket: &str) -> Moto {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto (pip install 'moto[server]')");
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(status) = m.http("PUT", &format!("/{bucket}")) {
                assert!(status == 200, "moto: creating bucket {bucket} answered {status}");
                return m;
            }
            assert!(Instant::now() < deadline, "moto server did not come up on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A bare HTTP request (moto needs no signature); returns the status code.
    pub fn http(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        resp.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad HTTP answer"))
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A copy of `config` (beside it, `through-proxy.toml`) that reaches this server
    /// through the fault proxy listening on `proxy_port`.
    pub fn through_proxy(&self, config: &std::path::Path, proxy_port: u16) -> std::path::PathBuf {
        let proxied = config.with_file_name("through-proxy.toml");
        let text = std::fs::read_to_string(config)
            .unwrap()
            .replace(&self.endpoint(), &format!("http://127.0.0.1:{proxy_port}"));
        std::fs::write(&proxied, text).unwrap();
        proxied
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credentials for moto (any value works; the AWS chain must find some).
pub fn set_fake_aws_env() {
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
}

pub enum SinkKind<'a> {
    File(PathBuf),
    S3 {
        moto: &'a Moto,
        bucket: &'a str,
        prefix: &'a str,
    },
}

/// Writes a config file and returns its path (inside `dir`).
pub fn write_config(
    dir: &std::path::Path,
    source_url: &str,
    publication: &str,
    slot: &str,
    sink: &SinkKind,
    extra_sink: &str,
    extra_source: &str,
) -> PathBuf {
    let sink_lines = match sink {
        SinkKind::File(p) => format!("url = \"file://{}\"", p.display()),
        SinkKind::S3 { moto, bucket, prefix } => {
            format!(
                "url = \"s3://{bucket}/{prefix}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"",
                moto.endpoint()
            )
        }
    };
    let text = format!(
        "[source]\nurl = \"{source_url}\"\npublication = \"{publication}\"\nslot = \"{slot}\"\nspill_dir = \"{}\"\n{extra_source}\n\n[sink]\n{sink_lines}\nflush_interval = \"200ms\"\n{extra_sink}\n\n[snapshot]\nmode = \"never\"\n",
        dir.join("spill").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The usual test config: publication `pub`, slot `walshore`, a file sink at
/// `dir/lake`, database `db` of `cluster` as `postgres`.
pub fn lake_config(dir: &std::path::Path, cluster: &TempCluster, db: &str) -> PathBuf {
    write_config(
        dir,
        &cluster.url("postgres", db),
        "pub",
        "walshore",
        &SinkKind::File(dir.join("lake")),
        "",
        "",
    )
}

/// Switches a config written by [`write_config`] to `snapshot.mode = "initial"`, with
/// `extra` lines in the `[snapshot]` table.
pub fn use_initial_snapshot(config: &std::path::Path, extra: &str) {
    edit_config(config, "mode = \"never\"", &format!("mode = \"initial\"\n{extra}"));
}

/// Replaces `from` with `to` in the config file, which must hold `from`.
pub fn edit_config(config: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", config.display());
    std::fs::write(config, text.replace(from, to)).unwrap();
}

pub fn walshore(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("WALSHORE_LOG", "info")
        .output()
        .expect("run walshore")
}

pub fn sync(config: &std::path::Path) {
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "walshore sync failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_pyarrow_reads(config);
}

/// Every Parquet file of a file-sink lake is read by pyarrow, an independent reader.
pub fn assert_pyarrow_reads(config: &std::path::Path) {
    let cfg = Config::load(config).unwrap();
    if cfg.sink.url.scheme() != "file" {
        return;
    }
    let out = Command::new("python3")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/read_lake.py"),
            cfg.sink.url.path(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pyarrow cannot read a file of the lake: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where each spawned `run` writes its stderr: a file, not a pipe, so that a long run
/// never blocks on a pipe nobody reads while it runs.
static STDERR_FILES: std::sync::Mutex<BTreeMap<u32, tempfile::NamedTempFile>> = std::sync::Mutex::new(BTreeMap::new());

pub fn spawn_run(config: &std::path::Path) -> Child {
    spawn_run_with(config, &[])
}

/// The log filter of the walshore processes a test starts: `WALSHORE_TEST_LOG` (say
/// `walshore=debug`, to see more of a failing test), or info.
pub fn test_log() -> String {
    std::env::var("WALSHORE_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// `walshore run` with extra environment variables (`WALSHORE_FAULT`, say).
pub fn spawn_run_with(config: &std::path::Path, env: &[(&str, &str)]) -> Child {
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("WALSHORE_LOG", test_log())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("spawn walshore run");
    STDERR_FILES.lock().unwrap().insert(child.id(), log);
    child
}

/// What a child started by [`spawn_run`] has written to stderr so far.
pub fn stderr_of(child: &Child) -> String {
    stderr_of_pid(child.id())
}

fn stderr_of_pid(pid: u32) -> String {
    let files = STDERR_FILES.lock().unwrap();
    files
        .get(&pid)
        .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
        .unwrap_or_default()
}

/// Prints a spawned walshore's stderr if the test panics while this is alive.
pub struct LogOnPanic(u32);

impl LogOnPanic {
    pub fn new(child: &Child) -> LogOnPanic {
        LogOnPanic(child.id())
    }
}

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- walshore (pid {}) stderr ---\n{}", self.0, stderr_of_pid(self.0));
        }
    }
}

/// SIGTERM and wait; returns the exit status and stderr.
pub fn stop(mut child: Child) -> (std::process::ExitStatus, String) {
    // A process that has logged has its signal handlers: before that, SIGTERM's
    // default action would end it abruptly, which is not what a test of a clean stop
    // (or a stop right after a start) means.
    let up = Instant::now() + Duration::from_secs(30);
    while stderr_of(&child).is_empty() && child.try_wait().unwrap().is_none() && Instant::now() < up {
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, stderr_of(&child));
        }
        assert!(
            Instant::now() < deadline,
            "walshore did not stop within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every row of one table in the lake, in `(_lsn, _seq)` order, values rendered as text.
pub struct LakeTable {
    pub columns: Vec<String>,
    /// (lsn, seq, op, unchanged columns, values by column name)
    pub rows: Vec<LakeRow>,
    pub files: usize,
}

#[derive(Clone, Debug)]
pub struct LakeRow {
    pub lsn: i64,
    pub seq: i64,
    pub op: String,
    pub unchanged: Vec<String>,
    /// `_unrepresented`, when the files have it.
    pub replaced: Vec<String>,
    pub values: BTreeMap<String, Option<String>>,
}

pub fn open_lake(config: &std::path::Path) -> Arc<dyn ObjectStore> {
    let cfg = Config::load(config).unwrap();
    walshore::sink::open_store(&cfg.sink).unwrap()
}

/// Every Parquet file in the table's folder (a reader that globs the folder).
pub async fn read_table(store: &Arc<dyn ObjectStore>, schema: &str, table: &str) -> LakeTable {
    let prefix = object_store::path::Path::from(format!("{schema}/{table}"));
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let paths = metas
        .into_iter()
        .map(|m| m.location)
        .filter(|l| l.as_ref().ends_with(".parquet"))
        .collect();
    read_paths(store, paths).await
}

/// The files of `schema.table` the commit log names and no compaction replaced (a
/// reader that follows the log).
pub async fn read_committed(store: &Arc<dyn ObjectStore>, schema: &str, table: &str) -> LakeTable {
    let name = format!("{schema}.{table}");
    let paths = walshore::checkpoint::committed_files(store.as_ref())
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.table == name)
        .map(|f| walshore::sink::key_path(&f.key))
        .collect();
    read_paths(store, paths).await
}

async fn read_paths(store: &Arc<dyn ObjectStore>, mut paths: Vec<object_store::path::Path>) -> LakeTable {
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    let mut files = 0;
    // Names sort in commit order: columns come out in the order they appeared.
    paths.sort_by(|a, b| a.as_ref().rsplit('/').next().cmp(&b.as_ref().rsplit('/').next()));
    for path in &paths {
        files += 1;
        let bytes = store.get(path).await.unwrap().bytes().await.unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            // Every column any file has (schemas change): a row without one reads null.
            for f in batch.schema().fields() {
                if !f.name().starts_with('_') && !columns.contains(f.name()) {
                    columns.push(f.name().clone());
                }
            }
            rows.extend(rows_of(&batch));
        }
    }
    rows.sort_by_key(|r| (r.lsn, r.seq));
    LakeTable { columns, rows, files }
}

fn rows_of(batch: &RecordBatch) -> Vec<LakeRow> {
    let col = |n: &str| batch.column_by_name(n).unwrap_or_else(|| panic!("column {n} missing"));
    let op = col("_op").as_string::<i32>().clone();
    let lsn = col("_lsn").as_primitive::<Int64Type>().clone();
    let seq = col("_seq").as_primitive::<Int64Type>().clone();
    let unchanged = col("_unchanged").as_list::<i32>().clone();
    let replaced = batch
        .column_by_name("_unrepresented")
        .map(|a| a.as_list::<i32>().clone());
    let names = |l: &arrow::array::ListArray, i: usize| -> Vec<String> {
        if l.is_null(i) {
            Vec::new()
        } else {
            l.value(i)
                .as_string::<i32>()
                .iter()
                .map(|s| s.unwrap().to_owned())
                .collect()
        }
    };
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|i| {
            let mut values = BTreeMap::new();
            for (f, a) in schema.fields().iter().zip(batch.columns()) {
                if !f.name().starts_with('_') {
                    values.insert(f.name().clone(), render(a.as_ref(), i));
                }
            }
            LakeRow {
                lsn: lsn.value(i),
                seq: seq.value(i),
                op: op.value(i).to_owned(),
                unchanged: names(&unchanged, i),
                replaced: replaced.as_ref().map(|l| names(l, i)).unwrap_or_default(),
                values,
            }
        })
        .collect()
}

/// Renders a value the way the test queries render PostgreSQL's (see `source_rows`).
pub fn render(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Utf8 => a.as_string::<i32>().value(i).to_owned(),
        DataType::Boolean => a.as_boolean().value(i).to_string(),
        DataType::Float32 => a.as_primitive::<arrow::datatypes::Float32Type>().value(i).to_string(),
        DataType::Float64 => a.as_primitive::<arrow::datatypes::Float64Type>().value(i).to_string(),
        DataType::Date32 => a.as_primitive::<arrow::datatypes::Date32Type>().value(i).to_string(),
        DataType::Decimal128(_, _) => a.as_primitive::<arrow::datatypes::Decimal128Type>().value_as_string(i),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            a.as_primitive::<TimestampMicrosecondType>().value(i).to_string()
        }
        DataType::Binary => hex(a.as_binary::<i32>().value(i)),
        DataType::List(_) => {
            let l = a.as_list::<i32>().value(i);
            let items: Vec<String> = (0..l.len())
                .map(|j| render(l.as_ref(), j).unwrap_or_else(|| "NULL".into()))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        other => panic!("test renderer does not handle {other}"),
    })
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("\\x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Replays a table's rows in `(_lsn, _seq)` order: `I`, `U`, `R` upsert by key, `D`
/// deletes by key, `T` clears. `key` None = the whole row is the key (a multiset).
pub fn replay(t: &LakeTable, key: Option<&[&str]>) -> Vec<Vec<Option<String>>> {
    type Row = BTreeMap<String, Option<String>>;
    // key -> (row, multiplicity)
    let mut state: BTreeMap<Vec<Option<String>>, (Row, usize)> = BTreeMap::new();
    let key_of = |v: &Row| -> Vec<Option<String>> {
        match key {
            Some(k) => k.iter().map(|c| v[*c].clone()).collect(),
            None => v.values().cloned().collect(),
        }
    };
    for r in &t.rows {
        match r.op.as_str() {
            "T" => state.clear(),
            "D" => {
                let k = key_of(&r.values);
                let entry = state
                    .get_mut(&k)
                    .unwrap_or_else(|| panic!("delete of a row not in the lake: {r:?}"));
                entry.1 -= 1;
                if entry.1 == 0 {
                    state.remove(&k);
                }
            }
            "I" | "U" | "R" => {
                let mut values = r.values.clone();
                let k = key_of(&values);
                for c in &r.unchanged {
                    let prev = state
                        .get(&k)
                        .map(|(row, _)| row[c].clone())
                        .unwrap_or_else(|| panic!("unchanged {c} without a previous row: {r:?}"));
                    values.insert(c.clone(), prev);
                }
                let k = key_of(&values);
                match state.get_mut(&k) {
                    Some(_) if r.op == "I" && key.is_some() => panic!("insert of a key already present: {r:?}"),
                    Some(e) if key.is_none() => e.1 += 1,
                    Some(e) => e.0 = values,
                    None if r.op == "U" => panic!("update of a row not in the lake: {r:?}"),
                    None => {
                        state.insert(k, (values, 1));
                    }
                }
            }
            other => panic!("unknown _op {other}"),
        }
    }
    let cols: Vec<String> = t.columns.clone();
    let mut out = Vec::new();
    for (row, n) in state.into_values() {
        for _ in 0..n {
            out.push(cols.iter().map(|c| row.get(c).cloned().flatten()).collect());
        }
    }
    out.sort();
    out
}

/// Asserts `(_lsn, _seq)` is unique.
pub fn assert_unique_positions(t: &LakeTable) {
    let mut seen = HashSet::new();
    for r in &t.rows {
        assert!(
            seen.insert((r.lsn, r.seq)),
            "duplicate (_lsn, _seq) = ({:X}, {}) in the lake",
            r.lsn,
            r.seq
        );
    }
}

/// The source table's rows rendered like [`render`]: `select` must produce text columns
/// in the lake's column order.
pub async fn source_rows(client: &tokio_postgres::Client, select: &str) -> Vec<Vec<Option<String>>> {
    let rows = client.simple_query(select).await.unwrap();
    let mut out: Vec<Vec<Option<String>>> = rows
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// How many replication slots the server has (`active_only`: in use by a walsender).
pub async fn slot_count(client: &tokio_postgres::Client, active_only: bool) -> i64 {
    let sql = if active_only {
        "SELECT count(*) FROM pg_replication_slots WHERE active"
    } else {
        "SELECT count(*) FROM pg_replication_slots"
    };
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Polls `f` until it returns true, failing after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Data files in the lake that no commit record (or checkpoint) names.
pub async fn orphans(config: &std::path::Path) -> Vec<String> {
    let store = open_lake(config);
    let all: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap();
    // Files a compaction replaced are named too: they stay for compaction.delete_after.
    let mut named = std::collections::HashSet::new();
    if let Some(head) = walshore::checkpoint::read_head(store.as_ref()).await.unwrap() {
        walshore::checkpoint::walk_manifest(store.as_ref(), &head, 1, |l| {
            named.insert(l.file.key);
            Ok(())
        })
        .await
        .unwrap();
    }
    all.iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet") && !named.contains(m.location.as_ref()))
        .map(|m| m.location.to_string())
        .collect()
}

/// Every file in the lake is named by a commit record.
pub async fn assert_no_orphans(config: &std::path::Path) {
    let orphans = orphans(config).await;
    assert!(
        orphans.is_empty(),
        "orphan files named by no commit record: {orphans:?}"
    );
}

/// Replays a table exactly by the documented rule (DESIGN, "Output layout"): in
/// `(_lsn, _seq)` order, `T` empties, `R`/`I`/`U` upsert by key, `D` deletes by key (a
/// key not present: nothing), an unchanged column takes the key's previous value. Unlike
/// [`replay`] it does not treat an update or delete of a missing key as a bug: the rows
/// a table writes between coming back to the publication and its new copy may touch
/// keys the lake never had, and the copy's `T` row supersedes them.
pub fn replay_by_rule(t: &LakeTable, key: &[&str]) -> Vec<Vec<Option<String>>> {
    type Row = BTreeMap<String, Option<String>>;
    let mut state: BTreeMap<Vec<Option<String>>, Row> = BTreeMap::new();
    let key_of = |v: &Row| -> Vec<Option<String>> { key.iter().map(|c| v.get(*c).cloned().flatten()).collect() };
    for r in &t.rows {
        match r.op.as_str() {
            "T" => state.clear(),
            "D" => {
                state.remove(&key_of(&r.values));
            }
            "I" | "U" | "R" => {
                let mut values = r.values.clone();
                let k = key_of(&values);
                for c in &r.unchanged {
                    let prev = state.get(&k).and_then(|row| row.get(c).cloned().flatten());
                    values.insert(c.clone(), prev);
                }
                state.insert(k, values);
            }
            other => panic!("unknown _op {other}"),
        }
    }
    let mut out: Vec<Vec<Option<String>>> = state
        .into_values()
        .map(|row| t.columns.iter().map(|c| row.get(c).cloned().flatten()).collect())
        .collect();
    out.sort();
    out
}

/// Runs `tests/py/{script}` with `args` and parses the JSON it prints.
pub fn python_json<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = run_ok(
        Command::new("python3").arg(&path).args(args),
        &format!("{script} (scripts/test installs its Python packages)"),
    );
    serde_json::from_str(&out.stdout).unwrap()
}

/// What a command that succeeded printed.
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end. The test fails, showing what it printed, if it cannot start
/// (`what` names it and how to install it) or exits with an error.
pub fn run_ok(cmd: &mut Command, what: &str) -> Printed {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let printed = Printed {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        printed.stdout,
        printed.stderr
    );
    printed
}

/// `walshore status` as JSON.
pub fn status(config: &std::path::Path) -> serde_json::Value {
    let out = walshore(&["status", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `sql(round)` against `url` on its own thread (a test blocked on a child process
/// does not pause it) every `pause` until stopped; a failed statement is retried on a
/// new connection, so it survives restarts.
pub struct SqlLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SqlLoop {
    pub fn spawn(url: String, pause: Duration, sql: impl Fn(u64) -> String + Send + 'static) -> SqlLoop {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut client: Option<tokio_postgres::Client> = None;
                let mut i = 0u64;
                while !s.load(Ordering::SeqCst) {
                    let c = match &client {
                        Some(c) if !c.is_closed() => c,
                        _ => {
                            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                                Ok((c, conn)) => {
                                    tokio::spawn(conn);
                                    client = Some(c);
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                            }
                            continue;
                        }
                    };
                    if c.batch_execute(&sql(i)).await.is_ok() {
                        i += 1;
                        r.store(i, Ordering::SeqCst);
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        });
        SqlLoop {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops and returns the rounds committed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.rounds()
    }
}

impl Drop for SqlLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (polling, blocking the thread) until `f` holds, failing after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A bare HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Every series of the Prometheus text: `name{labels}` → value.
pub fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http_get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
