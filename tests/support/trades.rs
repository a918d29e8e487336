//! The `trades` table of the end-to-end tests, and a writer that keeps changing it
//! from its own thread (so a test blocked on a child process does not pause it) and
//! survives server restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::*;

pub const TABLE: &str = "CREATE TABLE trades (
    id bigint PRIMARY KEY, symbol text, qty integer, price numeric(12,2), active boolean,
    ts timestamptz, tags text[], payload bytea)";
pub const SELECT: &str = "SELECT id::text, symbol, qty::text, price::text, active::text,
    (extract(epoch FROM ts) * 1000000)::bigint::text, tags::text, payload::text FROM trades";
/// [`SELECT`] after [`Workload::schema_change_at`] added `note`.
pub const SELECT_WITH_NOTE: &str = "SELECT id::text, symbol, qty::text, price::text, active::text,
    (extract(epoch FROM ts) * 1000000)::bigint::text, tags::text, payload::text, note FROM trades";

pub fn insert_sql(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO trades SELECT i, 'SYM' || (i % 7), (i % 1000)::int, (i * 1.25)::numeric(12,2), i % 2 = 0,
         timestamptz '2026-11-21 23:59:59.5+00' + i * interval '1 millisecond', ARRAY['a' || (i % 3), 'b'], decode(lpad(to_hex(i), 8, '0'), 'hex')
         FROM generate_series({from}, {to}) AS i"
    )
}

#[derive(Clone, Debug)]
pub struct Workload {
    /// Every n-th round inserts `large_rows` rows in one transaction.
    pub large_every: u64,
    pub large_rows: i64,
    /// At this round `note text` is added to the table; later inserts fill it.
    pub schema_change_at: Option<u64>,
    pub pause: Duration,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            large_every: 10,
            large_rows: 1000,
            schema_change_at: None,
            pause: Duration::from_millis(5),
        }
    }
}

/// Inserts, updates and deletes in `trades` until stopped; a failed statement (server
/// restarting, connection cut) is retried on a new connection.
pub struct Writer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(url: String, w: Workload) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (s, r, e) = (stop.clone(), rounds.clone(), errors.clone());
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
                        _ => match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                            Ok((c, conn)) => {
                                tokio::spawn(conn);
                                client = Some(c);
                                continue;
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        },
                    };
                    let base = (i as i64) * 100_000;
                    let n = if i % w.large_every == w.large_every - 1 {
                        w.large_rows
                    } else {
                        9
                    };
                    let mut sql = vec![];
                    if w.schema_change_at == Some(i) {
                        sql.push("ALTER TABLE trades ADD COLUMN IF NOT EXISTS note text".to_owned());
                    }
                    sql.push(insert_sql(base, base + n - 1));
                    if w.schema_change_at.is_some_and(|at| i >= at) {
                        sql.push(format!(
                            "UPDATE trades SET note = 'round ' || {i} WHERE id BETWEEN {base} AND {}",
                            base + 4
                        ));
                    }
                    sql.push(format!("UPDATE trades SET qty = qty + 1 WHERE id = {}", base + 3));
                    sql.push(format!("DELETE FROM trades WHERE id = {}", base + 5));
                    let mut ok = true;
                    for q in &sql {
                        // Each statement is its own transaction; one that already ran
                        // before an error is not run again (inserts would collide).
                        if let Err(err) = c.batch_execute(q).await {
                            if err.as_db_error().is_some_and(|d| d.code().code() == "23505") {
                                continue;
                            }
                            e.fetch_add(1, Ordering::SeqCst);
                            ok = false;
                            break;
                        }
                    }
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    i += 1;
                    r.store(i, Ordering::SeqCst);
                    tokio::time::sleep(w.pause).await;
                }
            });
        });
        Writer {
            stop,
            rounds,
            errors,
            thread: Some(thread),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Statements that failed and were tried again (server down, link cut).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    /// Stops after the current round; returns the rounds committed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.rounds()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A throwaway cluster with database `t`, table `trades` in publication `pub`, and a
/// directory for configs and file-sink lakes.
pub struct Env {
    pub cluster: walshore::cluster::TempCluster,
    pub client: tokio_postgres::Client,
    pub dir: tempfile::TempDir,
}

pub async fn env(settings: &[&str]) -> Env {
    env_on(cluster(settings)).await
}

/// [`env`] on a cluster the caller started.
pub async fn env_on(cluster: walshore::cluster::TempCluster) -> Env {
    let admin = cluster.connect("postgres").await.unwrap();
    admin.batch_execute("CREATE DATABASE t").await.unwrap();
    let client = cluster.connect("t").await.unwrap();
    client.batch_execute(TABLE).await.unwrap();
    client
        .batch_execute("CREATE PUBLICATION pub FOR TABLE trades")
        .await
        .unwrap();
    Env {
        cluster,
        client,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    /// A config for this environment's database with a file sink under its directory.
    pub fn file_config(&self, extra_sink: &str, extra_source: &str) -> std::path::PathBuf {
        let lake = SinkKind::File(self.dir.path().join("lake"));
        self.config(&self.cluster.url("postgres", "t"), &lake, extra_sink, extra_source)
    }

    /// A config for this environment's database at `source_url` (a proxy, say).
    pub fn config(
        &self,
        source_url: &str,
        sink: &SinkKind,
        extra_sink: &str,
        extra_source: &str,
    ) -> std::path::PathBuf {
        write_config(
            self.dir.path(),
            source_url,
            "pub",
            "walshore",
            sink,
            extra_sink,
            extra_source,
        )
    }

    /// Replays `trades` from the lake and compares it with `select` on the source;
    /// `(_lsn, _seq)` must be unique.
    pub async fn assert_lake_equals_source(&self, config: &std::path::Path, select: &str) -> LakeTable {
        let store = open_lake(config);
        let lake = read_table(&store, "public", "trades").await;
        assert_unique_positions(&lake);
        let replayed = replay(&lake, Some(&["id"]));
        let source = source_rows(&self.client, select).await;
        assert_eq!(replayed.len(), source.len(), "row count: lake replay vs source");
        assert_eq!(replayed, source, "lake replay differs from the source");
        lake
    }
}
