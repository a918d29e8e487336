//! Lifetime benchmark: what the age of a lake costs a start, and memory under the loads
//! that used to grow it.
//!
//! `cargo bench --bench lifetime` runs all of it; `-- --log-only`, `-- --tables-only` or
//! `-- --memory-only` one part; `--records N` (local log, default 1,000,000),
//! `--s3-records N` (default 100,000), `--table-commits N` (default 100,000), `--runs N`
//! (default 3).
//!
//! - **Log**: a lake whose commit log holds N records (as walshore leaves it with a long
//!   `sink.log_retention`: every full thousand folded into a checkpoint, the records
//!   kept), on the local sink and on the S3 test server (moto). Times `walshore sync`
//!   with nothing to do and `walshore status`, and their peak RSS, against a log of
//!   1,000 records in the same run.
//! - **Tables**: a lake of 300 tables whose log grows to `--table-commits` records
//!   (default 100,000; each commit two files, as walshore's own `Checkpoint` writes
//!   them, every full thousand folded): start-up (`sync` with nothing to do), `status`
//!   and `verify` against the same lake at 1,000 records, with their peak RSS, and the
//!   size of a commit record and of a checkpoint early and late in the log.
//! - **Memory**: a backlog of 64 KiB jsonb rows drained to the S3 test server through a
//!   proxy that delays every answer (the sink is the bottleneck, so the queues fill);
//!   and one transaction of 1,000,000 subtransactions (a PL/pgSQL loop with an EXCEPTION
//!   block), streamed by PostgreSQL and spilled by walshore. Peak RSS of `walshore
//!   sync` for each (target ≤ 256 MiB).

#[path = "common.rs"]
#[allow(dead_code)] // the CPU time is not reported here
mod common;
#[path = "../tests/support/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Moto, median};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use walshore::checkpoint::record::{CheckpointRecord, CommitRecord, FORMAT, HeadHint};
use walshore::cluster::{ClusterOptions, TempCluster};

/// Runs a command, returning (seconds, peak RSS in MiB of that process).
fn timed(cmd: &mut Command) -> (f64, f64) {
    let t = common::timed(cmd);
    (t.secs, t.rss_mib)
}

fn walshore() -> &'static str {
    env!("CARGO_BIN_EXE_walshore")
}

fn config(dir: &Path, cluster: &TempCluster, slot: &str, sink: &str) -> PathBuf {
    let path = dir.join(format!("{slot}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"bench\"\nslot = \"{slot}\"\nspill_dir = \"{}\"\n[sink]\n{sink}\n[snapshot]\nmode = \"never\"\n",
            cluster.url("postgres", "postgres"),
            dir.join("spill").display()
        ),
    )
    .unwrap();
    path
}

fn main() {
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = common::arg::<u64>;
    let runs = arg("--runs", 3) as usize;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let only = |part: &str| {
        let flags = ["--log-only", "--tables-only", "--memory-only"];
        !flags.iter().any(|f| args.iter().any(|a| a == f)) || args.iter().any(|a| a == part)
    };
    if only("--log-only") {
        log_bench(&rt, runs, arg("--records", 1_000_000), arg("--s3-records", 100_000));
    }
    if only("--tables-only") {
        tables_bench(&rt, runs, arg("--table-commits", 100_000));
    }
    if only("--memory-only") {
        wide_rows_bench(&rt);
        subtransactions_bench(&rt);
    }
}

/// Appends `commits` records to the lake at `root` as walshore's `Checkpoint` writes
/// them, each naming two files of two of the 300 tables (beyond `verify`'s point, so it
/// lists them and does not fetch them), and folds every full thousand.
async fn grow_log(root: &Path, commits: u64) {
    use walshore::checkpoint::{Checkpoint, CommitExtras, FOLD, Watermarks, fold_or_prune, read_head};
    use walshore::lsn::Lsn;
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root).unwrap());
    let head = read_head(store.as_ref()).await.unwrap().unwrap();
    let identity = walshore::checkpoint::record::Identity {
        system_id: head.system_id.clone(),
        slot: head.slot.clone(),
        publication: head.publication.clone(),
    };
    let mut c = Checkpoint::load(store.clone(), &identity).await.unwrap();
    let far = Lsn(u64::MAX / 4);
    let started = Instant::now();
    let mut marks = Watermarks {
        folded: head.folded,
        pruned: head.pruned,
    };
    for i in 0..commits {
        // Two tables of a hot twenty, one of the others now and then.
        let tables = [i % 20, if i % 10 == 0 { 20 + i / 10 % 280 } else { (i + 7) % 20 }];
        let files = tables
            .iter()
            .map(|t| walshore::sink::WrittenObject {
                key: format!("public/t{t:03}/dt=2026-12-01/fabricated-{i:08}-{t:03}.parquet"),
                table: format!("public.t{t:03}"),
                partition: "dt=2026-12-01".into(),
                rows: 10,
                bytes: 4096,
                first: walshore::batch::RowPos { lsn: far, seq: 2 * i },
                last: walshore::batch::RowPos {
                    lsn: far,
                    seq: 2 * i + 1,
                },
                ops: Default::default(),
            })
            .collect();
        let end = c.position();
        c.set_watermarks(marks);
        c.commit_files(
            "bench-1-aaaa-000000000001",
            end,
            Some(1_764_000_000_000_000),
            files,
            CommitExtras::default(),
        )
        .await
        .unwrap();
        if c.head().seq % FOLD == 1 {
            while let Some(next) = fold_or_prune(&store, c.head(), marks, Duration::from_secs(365 * 86_400))
                .await
                .unwrap()
            {
                marks = next;
            }
        }
    }
    eprintln!(
        "  grew the log by {commits} commits in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn tables_bench(rt: &tokio::runtime::Runtime, runs: usize, commits: u64) {
    println!(
        "== tables: 300 tables, start-up, status and verify against the age of the log ({runs} runs, medians; RSS = max)"
    );
    // Commits flushed as they are made: `sync` stops at the flushed position it finds at
    // its start, which asynchronous commits can leave inside a record for seconds.
    let cluster = TempCluster::start(ClusterOptions {
        settings: vec!["synchronous_commit = on".into()],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    let c = rt.block_on(cluster.connect("postgres")).unwrap();
    let mut setup = String::new();
    for t in 0..300 {
        setup.push_str(&format!(
            "CREATE TABLE t{t:03} (id int PRIMARY KEY, v text); INSERT INTO t{t:03} SELECT i, 'v' || i FROM generate_series(1, 20) i;"
        ));
    }
    setup.push_str("CREATE PUBLICATION bench FOR ALL TABLES;");
    rt.block_on(c.batch_execute(&setup)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for (i, size) in [1_000u64, commits].into_iter().enumerate() {
        let slot = format!("tables_{i}");
        let lake = dir.path().join(format!("tables-{i}"));
        let cfg = config(
            dir.path(),
            &cluster,
            &slot,
            &format!("url = \"file://{}\"", lake.display()),
        );
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("mode = \"never\"", "mode = \"initial\"");
        std::fs::write(&cfg, text).unwrap();
        let walshore_cmd = |args: &[&str]| {
            let mut cmd = Command::new(walshore());
            cmd.args(args).args(["--config", cfg.to_str().unwrap()]);
            cmd
        };
        timed(&mut walshore_cmd(&["sync"]));
        rt.block_on(grow_log(&lake, size));
        let record_bytes = |seq: u64| {
            std::fs::metadata(lake.join(format!("_walshore/commits/{seq:020}.json")))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let head = rt
            .block_on(walshore::checkpoint::read_head(
                walshore::sink::open_store(&walshore::config::Config::load(&cfg).unwrap().sink)
                    .unwrap()
                    .as_ref(),
            ))
            .unwrap()
            .unwrap();
        let mut recent: Vec<f64> = (head.seq - 200..head.seq).map(|s| record_bytes(s) as f64).collect();
        recent.retain(|b| *b > 0.0);
        let checkpoints: Vec<u64> = std::fs::read_dir(lake.join("_walshore/checkpoints"))
            .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).collect())
            .unwrap_or_default();
        let (mut s, mut st, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let (mut s_rss, mut st_rss, mut v_rss): (f64, f64, f64) = (0.0, 0.0, 0.0);
        for _ in 0..runs {
            let (secs, rss) = timed(&mut walshore_cmd(&["sync"]));
            s.push(secs);
            s_rss = s_rss.max(rss);
            let (secs, rss) = timed(&mut walshore_cmd(&["status"]));
            st.push(secs);
            st_rss = st_rss.max(rss);
            let (secs, rss) = timed(&mut walshore_cmd(&["verify", "--timeout", "60s"]));
            v.push(secs);
            v_rss = v_rss.max(rss);
        }
        let row = (
            head.seq,
            median(s),
            s_rss,
            median(st),
            st_rss,
            median(v),
            v_rss,
            median(recent),
            checkpoints.iter().copied().max().unwrap_or(0),
        );
        println!(
            "  {:>7} records: sync {:.3}s {:.0} MiB, status {:.3}s {:.0} MiB, verify {:.2}s {:.0} MiB; a recent record {:.0} bytes (median of 200), largest checkpoint {} bytes",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8
        );
        rows.push(row);
    }
    let (a, b) = (rows[0], rows[1]);
    println!(
        "  RATIO {} / {} records: sync time {:.2}, sync RSS {:.2}, status time {:.2}, status RSS {:.2}, verify RSS {:.2}, record size {:.2}, checkpoint size {:.2} (flat = about 1; verify's time reads the whole log: {:.2})",
        b.0,
        a.0,
        b.1 / a.1,
        b.2 / a.2,
        b.3 / a.3,
        b.4 / a.4,
        b.6 / a.6,
        b.7 / a.7,
        b.8 as f64 / a.8.max(1) as f64,
        b.5 / a.5
    );
}

/// Appends records to the log after its head up to `records`, as walshore leaves a log
/// with a long retention: every full thousand folded into a checkpoint.
async fn fabricate_log(store: Arc<dyn ObjectStore>, records: u64, local: Option<&Path>) {
    let head = walshore::checkpoint::read_head(store.as_ref()).await.unwrap().unwrap();
    let fold = walshore::checkpoint::FOLD;
    let folded = (records - 1) / fold * fold;
    let now = walshore::checkpoint::record::now_micros();
    let record = |seq: u64| {
        let mut r: CommitRecord = head.clone();
        r.seq = seq;
        r.written_at = now;
        r.files = Vec::new();
        r.completes = Vec::new();
        r.folded = if seq == records { folded } else { 0 };
        serde_json::to_vec(&r).unwrap()
    };
    let put = |key: String, body: Vec<u8>| {
        let store = store.clone();
        async move {
            match local {
                Some(root) => {
                    let p = root.join(&key);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(p, body).unwrap();
                }
                None => {
                    store
                        .put(&ObjectPath::from(key.as_str()), PutPayload::from(body))
                        .await
                        .unwrap();
                }
            }
        }
    };
    let started = Instant::now();
    futures::stream::iter(head.seq + 1..=records)
        .map(|seq| put(format!("_walshore/commits/{seq:020}.json"), record(seq)))
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    // The real records before the fabricated ones carry files: the first checkpoint names them.
    let mut first_files = Vec::new();
    for seq in 1..=head.seq {
        if let Ok(r) = store
            .get(&ObjectPath::from(format!("_walshore/commits/{seq:020}.json")))
            .await
        {
            let r: CommitRecord = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            first_files.extend(r.files);
        }
    }
    futures::stream::iter((1..=folded / fold).map(|k| {
        let files = if k == 1 { first_files.clone() } else { Vec::new() };
        let cp = CheckpointRecord {
            format: FORMAT,
            first: (k - 1) * fold + 1,
            last: k * fold,
            last_written_at: now,
            files,
            counts: Vec::new(),
            compacted: Vec::new(),
        };
        put(
            format!("_walshore/checkpoints/{:020}.json", k * fold),
            serde_json::to_vec(&cp).unwrap(),
        )
    }))
    .buffer_unordered(64)
    .collect::<Vec<()>>()
    .await;
    put(
        "_walshore/head.json".into(),
        serde_json::to_vec(&HeadHint { seq: records }).unwrap(),
    )
    .await;
    eprintln!(
        "  fabricated {} records in {:.1}s",
        records - head.seq,
        started.elapsed().as_secs_f64()
    );
}

fn log_bench(rt: &tokio::runtime::Runtime, runs: usize, local_records: u64, s3_records: u64) {
    println!("== log: start-up and status against the age of the log ({runs} runs, medians; RSS = max)");
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let c = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION bench FOR TABLE t;"))
        .unwrap();
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut i = 0;
    for (kind, sizes) in [("local", [1_000, local_records]), ("s3", [1_000, s3_records])] {
        let mut rows = Vec::new();
        for records in sizes {
            i += 1;
            let slot = format!("log_{i}");
            let sink = match kind {
                "local" => format!("url = \"file://{}/lake-{i}\"", dir.path().display()),
                _ => format!(
                    "url = \"s3://lake/log-{i}\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"",
                    moto.port
                ),
            };
            let cfg_path = config(dir.path(), &cluster, &slot, &sink);
            let sync = || timed(Command::new(walshore()).args(["sync", "--config", cfg_path.to_str().unwrap()]));
            sync();
            rt.block_on(c.batch_execute(&format!("INSERT INTO t VALUES ({i}, 'x')")))
                .unwrap();
            sync();
            let cfg = walshore::config::Config::load(&cfg_path).unwrap();
            let store = walshore::sink::open_store(&cfg.sink).unwrap();
            let local = (kind == "local").then(|| dir.path().join(format!("lake-{i}")));
            rt.block_on(fabricate_log(store, records, local.as_deref()));
            let mut s = Vec::new();
            let mut s_rss: f64 = 0.0;
            let mut st = Vec::new();
            let mut st_rss: f64 = 0.0;
            for _ in 0..runs {
                let (secs, rss) = sync();
                s.push(secs);
                s_rss = s_rss.max(rss);
                let (secs, rss) =
                    timed(Command::new(walshore()).args(["status", "--config", cfg_path.to_str().unwrap()]));
                st.push(secs);
                st_rss = st_rss.max(rss);
            }
            let row = (records, median(s), s_rss, median(st), st_rss);
            println!(
                "  {kind:>5} {records:>9} records: sync {:.3}s {:.0} MiB, status {:.3}s {:.0} MiB",
                row.1, row.2, row.3, row.4
            );
            rows.push(row);
        }
        let (a, b) = (rows[0], rows[1]);
        println!(
            "  RATIO {kind} {} / {} records: sync time {:.2}, sync RSS {:.2}, status time {:.2}, status RSS {:.2} (flat = about 1)",
            b.0,
            a.0,
            b.1 / a.1,
            b.2 / a.2,
            b.3 / a.3,
            b.4 / a.4
        );
    }
}

fn wide_rows_bench(rt: &tokio::runtime::Runtime) {
    println!("== memory: a backlog of 64 KiB jsonb rows into a slow S3 (every answer delayed 50 ms)");
    let cluster = TempCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
    let c = rt.block_on(cluster.connect("postgres")).unwrap();
    let rows = 8_000;
    rt.block_on(
        c.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body jsonb); CREATE PUBLICATION bench FOR TABLE docs;"),
    )
    .unwrap();
    let moto = Moto::start();
    let proxy = proxy::Proxy::start(moto.port);
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "url = \"s3://lake/wide\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"",
        proxy.port
    );
    let cfg = config(dir.path(), &cluster, "wide", &sink);
    timed(Command::new(walshore()).args(["sync", "--config", cfg.to_str().unwrap()]));
    // 64 KiB of distinct text per row (jsonb is not compressed on the wire).
    let started = Instant::now();
    rt.block_on(c.batch_execute(&format!(
        "DO $$ BEGIN FOR t IN 0..{} LOOP
            INSERT INTO docs SELECT i, jsonb_build_object('k', i, 'pad',
                (SELECT string_agg(md5((i * 1000 + j)::text), '') FROM generate_series(1, 2048) j))
            FROM generate_series(t * 20 + 1, t * 20 + 20) i; COMMIT; END LOOP; END $$",
        rows / 20 - 1
    )))
    .unwrap();
    eprintln!("  backlog written in {:.1}s", started.elapsed().as_secs_f64());
    proxy.set(proxy::Mode::Delay(Duration::from_millis(50)));
    let (secs, rss) = timed(Command::new(walshore()).args(["sync", "--config", cfg.to_str().unwrap()]));
    proxy.set(proxy::Mode::Forward);
    let wire: f64 = rows as f64 * 64.0 / 1024.0;
    println!(
        "  {rows} rows (~{wire:.0} MiB of row data) drained in {secs:.1}s; walshore peak RSS {rss:.0} MiB (target <= 256)"
    );
}

fn subtransactions_bench(rt: &tokio::runtime::Runtime) {
    println!("== memory: one transaction of 1,000,000 subtransactions (PL/pgSQL loop with EXCEPTION)");
    let cluster = TempCluster::start(ClusterOptions {
        settings: vec!["logical_decoding_work_mem = 64kB".into()],
        ..ClusterOptions::default()
    })
    .expect("start PostgreSQL");
    let c = rt.block_on(cluster.connect("postgres")).unwrap();
    rt.block_on(c.batch_execute("CREATE TABLE s (id int PRIMARY KEY, v text); CREATE PUBLICATION bench FOR TABLE s;"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = format!("url = \"file://{}/lake\"", dir.path().display());
    let cfg = config(dir.path(), &cluster, "subx", &sink);
    timed(Command::new(walshore()).args(["sync", "--config", cfg.to_str().unwrap()]));
    // PostgreSQL's own client reads the same WAL from a slot of its own: how long the
    // decoder itself takes over a million subtransactions.
    rt.block_on(c.batch_execute("SELECT pg_create_logical_replication_slot('recv', 'pgoutput')"))
        .unwrap();
    let n = 1_000_000;
    let started = Instant::now();
    rt.block_on(c.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{n} LOOP
            BEGIN INSERT INTO s VALUES (i, 'row ' || i); EXCEPTION WHEN unique_violation THEN NULL; END;
         END LOOP; END $$"
    )))
    .unwrap();
    eprintln!("  transaction written in {:.1}s", started.elapsed().as_secs_f64());
    let end: String = rt
        .block_on(c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]))
        .unwrap()
        .get(0);
    let (recvlogical, args) = common::recvlogical(&cluster, "recv", &end);
    let (recv_secs, _) = timed(Command::new(recvlogical).args(args));
    println!("  pg_recvlogical (pgoutput, streaming) read it in {recv_secs:.1}s");
    let (secs, rss) = timed(Command::new(walshore()).args(["sync", "--config", cfg.to_str().unwrap()]));
    let out = Command::new(walshore())
        .args(["status", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = status["tables"]["public.s"]["rows"].as_u64().unwrap_or(0);
    assert_eq!(rows, n, "every row of the transaction is in the lake");
    println!(
        "  {n} subtransactions, {rows} rows drained in {secs:.1}s; RATIO walshore / pg_recvlogical time {:.2} (the decoder is the limit when about 1); walshore peak RSS {rss:.0} MiB (target <= 256)",
        secs / recv_secs
    );
}
