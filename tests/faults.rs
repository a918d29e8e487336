//! Exactly once under faults: links to PostgreSQL and S3 cut, stalled and blackholed
//! through a TCP proxy, S3 answering 500 and 503, PostgreSQL restarted, a full disk,
//! a second instance, a paused instance that wakes up after a takeover, a slot that
//! PostgreSQL invalidated, and a loop of SIGKILLs under a write load. Each test replays
//! the lake and compares it with the source, and checks `(_lsn, _seq)` is unique.

mod support;

use std::time::{Duration, Instant};

use support::proxy::{Mode, Proxy};
use support::trades::{Env, SELECT, SELECT_WITH_NOTE, Workload, Writer, env, insert_sql};
use support::*;

/// Rows committed to the lake for `public.trades`, from `walshore status`.
fn committed_rows(config: &std::path::Path) -> u64 {
    let out = walshore(&["status", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tables"]["public.trades"]["rows"].as_u64().unwrap_or(0)
}

/// Waits until a change made now reaches the lake through a running instance: it
/// recovered from whatever the test did to it.
async fn assert_run_catches_up(e: &Env, status_config: &std::path::Path, run: &mut std::process::Child) {
    static MARKERS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let to = MARKERS.fetch_sub(10, std::sync::atomic::Ordering::SeqCst) - 1;
    let before = committed_rows(status_config);
    e.client.batch_execute(&insert_sql(to - 9, to)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while committed_rows(status_config) < before + 10 {
        if let Some(status) = run.try_wait().unwrap() {
            let stderr = stderr_of(run);
            panic!("walshore run exited ({status}) instead of recovering:\n{stderr}");
        }
        assert!(Instant::now() < deadline, "walshore run did not catch up within 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn through(url: &str, from: u16, to: u16) -> String {
    let out = url.replace(&format!(":{from}/"), &format!(":{to}/"));
    assert_ne!(out, url, "the port of {url} was not replaced");
    out
}

#[tokio::test]
async fn postgres_link_cut_stalled_and_blackholed_mid_stream() {
    let e = env(&["wal_sender_timeout = 5s"]).await;
    let proxy = Proxy::start(e.cluster.port);
    let url = through(&e.cluster.url("postgres", "t"), e.cluster.port, proxy.port);
    let lake = SinkKind::File(e.dir.path().join("lake"));
    let config = e.config(&url, &lake, "", "status_interval = \"1s\"\nreceive_timeout = \"4s\"");
    sync(&config);
    let writer = Writer::spawn(e.cluster.url("postgres", "t"), Workload::default());
    let mut run = spawn_run(&config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connections = proxy.connections();
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(proxy.connections() > connections, "walshore reconnected after the cut");
    proxy.set(Mode::Stall);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Mode::Forward);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_secs(9)).await;
    proxy.set(Mode::Forward);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rounds = writer.stop();
    assert!(rounds > 50, "the writer kept committing ({rounds} rounds)");
    assert_run_catches_up(&e, &config, &mut run).await;
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.matches("transient failure").count() >= 2,
        "the cut and the blackhole were retried:\n{stderr}"
    );
    assert!(
        stderr.contains("source.receive_timeout"),
        "the blackhole was noticed by the receive timeout:\n{stderr}"
    );
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

#[tokio::test]
async fn s3_errors_slow_answers_cuts_and_a_blackhole_mid_stream() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let proxy = Proxy::start(moto.port);
    let e = env(&[]).await;
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "faults",
    };
    // The direct config reads the lake and checks status; walshore runs through the proxy.
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
    let config = e.config(
        &e.cluster.url("postgres", "t"),
        &s3,
        "request_timeout = \"3s\"\nmax_buffer = \"256KiB\"",
        "",
    );
    edit_config(&config, &moto.endpoint(), &format!("http://127.0.0.1:{}", proxy.port));
    sync(&config);
    let writer = Writer::spawn(e.cluster.url("postgres", "t"), Workload::default());
    let mut run = spawn_run(&config);
    let phases = [
        (Mode::HttpStatus(503), 5),
        (Mode::Forward, 2),
        (Mode::HttpStatus(500), 5),
        (Mode::Forward, 2),
        (Mode::Delay(Duration::from_millis(300)), 4),
        (Mode::Forward, 1),
        (Mode::Stall, 2),
        (Mode::Forward, 2),
        (Mode::Blackhole, 6),
        (Mode::Forward, 2),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (mode, secs) in phases {
        let retried = stderr_of(&run).matches("transient failure").count();
        proxy.set(mode);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        if mode == Mode::Blackhole {
            // Held until the pipeline has noticed: a request timed out and the store's own
            // retries gave up, or a conditional write timed out (how long that takes
            // depends on what was in flight when the link went silent, and when the next
            // request met the silence: the store retries for up to 120 s, each attempt
            // up to its 3 s timeout, so 120 s from here was too close and failed once).
            let deadline = Instant::now() + Duration::from_secs(240);
            while stderr_of(&run).matches("transient failure").count() <= retried {
                assert!(Instant::now() < deadline, "the blackhole was not noticed within 240 s");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if mode == Mode::Forward {
            proxy.cut();
        }
    }
    let rounds = writer.stop();
    assert!(rounds > 50, "the writer kept committing ({rounds} rounds)");
    assert!(
        proxy.errors_served() >= 4,
        "S3 errors were served ({})",
        proxy.errors_served()
    );
    assert_run_catches_up(&e, &direct, &mut run).await;
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("transient failure"),
        "the blackhole (a request timeout) was retried by the pipeline:\n{stderr}"
    );
    sync(&direct);
    e.assert_lake_equals_source(&direct, SELECT).await;
}

#[tokio::test]
async fn postgres_restarted_fast_and_immediate_mid_stream() {
    let mut e = env(&[]).await;
    let config = e.file_config("", "status_interval = \"1s\"");
    sync(&config);
    let writer = Writer::spawn(e.cluster.url("postgres", "t"), Workload::default());
    let mut run = spawn_run(&config);
    for mode in ["fast", "immediate", "fast", "immediate"] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        e.cluster.restart(mode).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rounds = writer.stop();
    assert!(rounds > 50, "the writer kept committing ({rounds} rounds)");
    e.client = e.cluster.connect("t").await.unwrap();
    assert_run_catches_up(&e, &config, &mut run).await;
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.matches("transient failure").count() >= 4,
        "each restart was retried:\n{stderr}"
    );
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

/// Kills `run` at random moments (at least 30 times) while a writer inserts, updates,
/// deletes, commits large transactions (streamed: `logical_decoding_work_mem` is tiny)
/// and adds a column.
#[tokio::test]
async fn thirty_random_sigkills_under_load_with_large_transactions_and_a_schema_change() {
    let e = env(&["logical_decoding_work_mem = 64kB"]).await;
    let config = e.file_config("max_buffer = \"512KiB\"", "stream_memory = \"1MiB\"");
    sync(&config);
    let writer = Writer::spawn(
        e.cluster.url("postgres", "t"),
        Workload {
            large_every: 25,
            large_rows: 20_000,
            schema_change_at: Some(60),
            pause: Duration::from_millis(10),
        },
    );
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut kills = 0;
    for _ in 0..32 {
        let mut child = spawn_run(&config);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 1500)).await;
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        if !status.success() {
            kills += 1;
        }
    }
    let rounds = writer.stop();
    assert!(kills >= 30, "{kills} of 32 runs were killed");
    assert!(rounds > 60, "the writer passed the schema change ({rounds} rounds)");
    sync(&config);
    let lake = e.assert_lake_equals_source(&config, SELECT_WITH_NOTE).await;
    assert!(
        lake.rows
            .iter()
            .any(|r| r.values.get("note").is_some_and(|v| v.is_some())),
        "the added column reached the lake"
    );
}

#[tokio::test]
async fn two_instances_started_together_one_runs_the_other_is_refused() {
    let e = env(&[]).await;
    let config = e.file_config("", "");
    use_initial_snapshot(&config, "");
    e.client.batch_execute(&insert_sql(1, 5000)).await.unwrap();
    let mut a = spawn_run(&config);
    let mut b = spawn_run(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (loser, winner, status) = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break (a, b, s);
        }
        if let Some(s) = b.try_wait().unwrap() {
            break (b, a, s);
        }
        assert!(Instant::now() < deadline, "neither instance was refused within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = stderr_of(&loser);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another process") || stderr.contains("another walshore"),
        "the refused instance names the other holder:\n{stderr}"
    );
    e.client.batch_execute(&insert_sql(6000, 6100)).await.unwrap();
    let mut winner = winner;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(winner.try_wait().unwrap().is_none(), "the first instance still runs");
    let (status, stderr) = stop(winner);
    assert!(status.success(), "{stderr}");
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

#[tokio::test]
async fn a_paused_instance_that_wakes_after_a_takeover_stops_without_writing() {
    let e = env(&["wal_sender_timeout = 2s"]).await;
    let config = e.file_config("", "status_interval = \"1s\"");
    sync(&config);
    let mut a = spawn_run(&config);
    e.client.batch_execute(&insert_sql(1, 100)).await.unwrap();
    assert_run_catches_up(&e, &config, &mut a).await;
    unsafe { libc::kill(a.id() as i32, libc::SIGSTOP) };
    // PostgreSQL drops the paused instance's walsender after wal_sender_timeout.
    e.client.batch_execute(&insert_sql(200, 300)).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the paused instance's walsender to time out",
        || async { slot_count(&e.client, true).await == 0 },
    )
    .await;
    let mut b = spawn_run(&config);
    assert_run_catches_up(&e, &config, &mut b).await;
    unsafe { libc::kill(a.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the woken instance did not stop within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = stderr_of(&a);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another walshore"), "{stderr}");
    e.client.batch_execute(&insert_sql(400, 500)).await.unwrap();
    assert_run_catches_up(&e, &config, &mut b).await;
    let (status, stderr) = stop(b);
    assert!(status.success(), "{stderr}");
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

/// Whether a process is stopped (SIGSTOP): `T` in /proc/<pid>/stat.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_fenced_writers_late_upload_is_removed_by_the_running_writer() {
    let e = env(&["wal_sender_timeout = 2s"]).await;
    let config = e.file_config("", "status_interval = \"1s\"");
    // The running writer sweeps other writers' pending records every poll interval.
    edit_config(
        &config,
        "mode = \"never\"",
        "mode = \"never\"\npoll_interval = \"500ms\"",
    );
    sync(&config);
    // A stops after announcing its first flush and before uploading it; woken, it
    // uploads and stops again before it could commit.
    let mut a = spawn_run_with(
        &config,
        &[("WALSHORE_FAULT", "after_pending_record:stop,after_upload:stop")],
    );
    let _log_a = LogOnPanic::new(&a);
    e.client.batch_execute(&insert_sql(1, 100)).await.unwrap();
    wait_until(Duration::from_secs(30), "A to stop after announcing", || async {
        is_stopped(a.id())
    })
    .await;
    wait_until(Duration::from_secs(30), "A's walsender to time out", || async {
        slot_count(&e.client, true).await == 0
    })
    .await;
    let mut b = spawn_run(&config);
    let _log_b = LogOnPanic::new(&b);
    assert_run_catches_up(&e, &config, &mut b).await;
    assert!(orphans(&config).await.is_empty(), "nothing of A's is in the lake yet");
    // A wakes after B took over, finishes its upload: a file no commit will ever name.
    unsafe { libc::kill(a.id() as i32, libc::SIGCONT) };
    wait_until(Duration::from_secs(30), "A's late upload", || async {
        !orphans(&config).await.is_empty()
    })
    .await;
    let late = orphans(&config).await;
    // ... and dies before it could take it back itself.
    wait_until(Duration::from_secs(30), "A to stop after its upload", || async {
        is_stopped(a.id())
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();
    let swept = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the running writer to remove A's late file",
        || async { orphans(&config).await.is_empty() },
    )
    .await;
    eprintln!("A's late file {late:?} was removed {:?} after A died", swept.elapsed());
    e.client.batch_execute(&insert_sql(400, 500)).await.unwrap();
    assert_run_catches_up(&e, &config, &mut b).await;
    let (status, stderr) = stop(b);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("deleted files another writer uploaded but never committed"),
        "{stderr}"
    );
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
    assert_no_orphans(&config).await;
}

#[tokio::test]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_a_definite_error() {
    let e = env(&[
        "max_slot_wal_keep_size = 1MB",
        "max_wal_size = 32MB",
        "min_wal_size = 32MB",
    ])
    .await;
    let config = e.file_config("", "");
    e.client.batch_execute(&insert_sql(1, 100)).await.unwrap();
    sync(&config);
    let committed = committed_rows(&config);
    // Push WAL past the slot's allowance while walshore is stopped.
    for i in 0..6 {
        e.client
            .batch_execute(&format!(
                "{}; SELECT pg_switch_wal(); CHECKPOINT",
                insert_sql(1000 + i * 10_000, 1000 + i * 10_000 + 9_999)
            ))
            .await
            .unwrap();
    }
    let status: String = e
        .client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walshore'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the slot was invalidated");
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("max_slot_wal_keep_size") && stderr.contains("initial snapshot"),
        "the error says why and what to do:\n{stderr}"
    );
    assert_eq!(
        committed_rows(&config),
        committed,
        "nothing was committed that claims continuity"
    );
}

/// The spill directory on a 1 MiB file system: a streamed transaction that does not
/// fit stops walshore with a disk-full error naming `source.spill_dir`; nothing is
/// committed for it, and with room again the lake is exact.
#[tokio::test]
async fn a_full_spill_disk_is_a_definite_error_and_nothing_is_lost() {
    let e = env(&["logical_decoding_work_mem = 64kB"]).await;
    let small = Tmpfs::mount(e.dir.path().join("small"), "1m");
    let config = e.file_config(
        "",
        &format!(
            "stream_memory = \"64KiB\"\nspill_dir = \"{}\"",
            small.0.join("spill").display()
        ),
    );
    // write_config sets its own spill_dir first; the last one wins only if we drop it.
    let text = std::fs::read_to_string(&config).unwrap();
    let first = text.lines().find(|l| l.starts_with("spill_dir")).unwrap().to_owned();
    std::fs::write(&config, text.replacen(&format!("{first}\n"), "", 1)).unwrap();
    sync(&config);
    e.client.batch_execute(&insert_sql(1000, 60_000)).await.unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("source.spill_dir") && stderr.contains("No space left"),
        "the error names the disk and the key:\n{stderr}"
    );
    assert!(
        !stderr.contains("transient failure"),
        "a full disk is not retried:\n{stderr}"
    );
    assert_eq!(
        committed_rows(&config),
        0,
        "nothing of the stuck transaction was committed"
    );
    // Room again: the same transaction replicates whole.
    small.resize("256m");
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
}

/// Runs `run` with `WALSHORE_FAULT=spec` and waits for it to crash there.
async fn crash_at(config: &std::path::Path, spec: &str) {
    let mut child = spawn_run_with(config, &[("WALSHORE_FAULT", spec)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let (_, stderr) = stop(child);
            panic!("{spec}: walshore never reached the fault point:\n{stderr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = stderr_of(&child);
    let name = spec.split('@').next().unwrap();
    assert!(
        !status.success() && stderr.contains(&format!("fault injected at {name}")),
        "{spec}: the process did not crash there (built without --features fault-injection?):\n{stderr}"
    );
}

/// A crash at each named fault point (`walshore::fault::POINTS`) while a writer
/// changes `trades` (adding a column on the way) and a table added to the publication
/// is copied in chunks beside the stream; then `sync` with other file boundaries.
#[tokio::test]
async fn a_crash_at_every_fault_point_under_a_writer_leaves_the_lake_exact() {
    // A multipart upload needs files of megabytes, the catalog a Glue server, a copy
    // asked for while running a table that joins then: their own tests (below,
    // tests/catalog.rs and tests/rare.rs).
    for point in walshore::fault::POINTS.iter().filter(|p| {
        ![
            "mid_multipart_upload",
            "after_catalog_registration",
            "before_copy_request",
        ]
        .contains(*p)
    }) {
        let e = env(&[]).await;
        let config = e.file_config("max_buffer = \"128KiB\"", "");
        use_initial_snapshot(&config, "chunk_size = \"64KiB\"\npoll_interval = \"1s\"");
        e.client.batch_execute(&insert_sql(1, 3000)).await.unwrap();
        sync(&config);
        e.client
            .batch_execute(
                "CREATE TABLE prices (symbol text, ts bigint, px numeric, PRIMARY KEY (symbol, ts));
                 INSERT INTO prices SELECT 'S' || (i % 50), i, i * 0.01 FROM generate_series(1, 20000) i;
                 ALTER PUBLICATION pub ADD TABLE prices",
            )
            .await
            .unwrap();
        let writer = Writer::spawn(
            e.cluster.url("postgres", "t"),
            Workload {
                schema_change_at: Some(3),
                ..Workload::default()
            },
        );
        if *point == "during_recovery" {
            // Orphans first, so that recovery has files to delete.
            crash_at(&config, "after_upload@2").await;
        }
        crash_at(&config, point).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rounds = writer.stop();
        assert!(rounds > 3, "{point}: the writer passed its schema change");
        let config = e.file_config("max_buffer = \"200KiB\"", "");
        use_initial_snapshot(&config, "chunk_size = \"64KiB\"");
        sync(&config);
        e.assert_lake_equals_source(&config, SELECT_WITH_NOTE).await;
        let store = open_lake(&config);
        let prices = read_table(&store, "public", "prices").await;
        assert_unique_positions(&prices);
        assert_eq!(
            replay(&prices, Some(&["symbol", "ts"])),
            source_rows(&e.client, "SELECT symbol, ts::text, px::text FROM prices").await,
            "{point}: prices"
        );
        assert_no_orphans(&config).await;
    }
}

/// A tmpfs of a given size (the tests run as root), unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a {size} tmpfs at {}", path.display());
        Tmpfs(path)
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "resize the tmpfs at {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A file-sink lake on a full disk: a definite error that says so, nothing committed
/// that is not whole, and with room again the lake is exact without orphans.
#[tokio::test]
async fn a_full_lake_disk_is_a_definite_error_and_nothing_is_lost() {
    let e = env(&[]).await;
    let disk = Tmpfs::mount(e.dir.path().join("disk"), "1m");
    let lake = SinkKind::File(disk.0.join("lake"));
    let config = e.config(&e.cluster.url("postgres", "t"), &lake, "max_buffer = \"256KiB\"", "");
    sync(&config);
    e.client.batch_execute(&insert_sql(1, 100_000)).await.unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("No space left") && stderr.contains("the disk is full"),
        "the error names the full disk:\n{stderr}"
    );
    assert!(
        !stderr.contains("transient failure"),
        "a full disk is not retried:\n{stderr}"
    );
    disk.resize("256m");
    sync(&config);
    e.assert_lake_equals_source(&config, SELECT).await;
    assert_no_orphans(&config).await;
}

/// Files larger than `sink.part_size` go up in parts (to moto's S3); a crash between
/// parts leaves no object, and the next run uploads the file again, whole.
#[tokio::test]
async fn a_crash_in_the_middle_of_a_multipart_upload_leaves_no_object() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let e = env(&[]).await;
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "multipart",
    };
    let config = e.config(
        &e.cluster.url("postgres", "t"),
        &s3,
        "part_size = \"5MiB\"\nmax_buffer = \"64MiB\"\ncompression = \"none\"",
        "",
    );
    sync(&config);
    // About 24 MiB of incompressible payload in one transaction: one file of 5 parts.
    e.client
        .batch_execute(&format!(
            "{}; UPDATE trades SET payload = decode(repeat(md5(id::text) || md5((id + 1)::text), 64), 'hex')",
            insert_sql(1, 6000)
        ))
        .await
        .unwrap();
    crash_at(&config, "mid_multipart_upload@2").await;
    sync(&config);
    let lake = e.assert_lake_equals_source(&config, SELECT).await;
    assert_no_orphans(&config).await;
    let store = open_lake(&config);
    let biggest = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet"))
        .map(|m| m.size)
        .max()
        .unwrap();
    assert!(
        biggest > 10 << 20,
        "a file of several parts was written ({biggest} bytes, {} files)",
        lake.files
    );
}
