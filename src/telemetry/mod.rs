//! What a running walshore tells the outside: Prometheus metrics (through the `metrics`
//! facade), liveness and readiness, and CloudWatch EMF lines.
//!
//! The stages record into the facade; with no `[metrics]` section no recorder is
//! installed and every call is a no-op. State that is not a plain counter (the commit
//! times behind the lag gauges, whether the stream is connected, which stage is busy
//! since when) lives in [`State`], read when `/metrics`, `/healthz` or `/readyz` is asked
//! and when an EMF line is written.
//!
//! Metric names follow Prometheus' conventions: `walshore_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` for counters. Labels never carry row values: table
//! names, operations, stages and kinds only.

pub mod emf;
pub mod server;
pub mod slot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric walshore records, with its help text (README's table says what to alert on).
pub mod names {
    pub const RECEIVED_LAG: &str = "walshore_received_lag_seconds";
    pub const COMMITTED_LAG: &str = "walshore_committed_lag_seconds";
    pub const RECEIVED_TS: &str = "walshore_received_commit_timestamp_seconds";
    pub const COMMITTED_TS: &str = "walshore_committed_commit_timestamp_seconds";
    pub const UNCOMMITTED: &str = "walshore_uncommitted_seconds";
    pub const CONNECTED: &str = "walshore_connected";
    pub const READY: &str = "walshore_ready";
    pub const SLOT_CONFIRMED_LAG: &str = "walshore_slot_confirmed_lag_bytes";
    pub const SLOT_RETAINED: &str = "walshore_slot_retained_bytes";
    pub const SLOT_SAFE_WAL: &str = "walshore_slot_safe_wal_size_bytes";
    pub const SLOT_WAL_STATUS: &str = "walshore_slot_wal_status";
    pub const SLOT_ACTIVE: &str = "walshore_slot_active";
    pub const SLOT_SAMPLED: &str = "walshore_slot_sampled_timestamp_seconds";
    pub const SLOT_SAMPLE_ERRORS: &str = "walshore_slot_sample_errors_total";
    pub const CHANGES_RECEIVED: &str = "walshore_changes_received_total";
    pub const TRANSACTIONS_RECEIVED: &str = "walshore_transactions_received_total";
    pub const ROWS_WRITTEN: &str = "walshore_rows_written_total";
    pub const BYTES_WRITTEN: &str = "walshore_written_bytes_total";
    pub const FILES_WRITTEN: &str = "walshore_files_written_total";
    pub const COMMITS: &str = "walshore_commits_total";
    pub const COMMIT_DURATION: &str = "walshore_commit_duration_seconds";
    pub const FLUSH_ROWS: &str = "walshore_flush_rows";
    pub const FLUSH_BYTES: &str = "walshore_flush_bytes";
    pub const COPY_ROWS: &str = "walshore_copy_rows";
    pub const COPY_ROWS_ESTIMATED: &str = "walshore_copy_rows_estimated";
    pub const RETRIES: &str = "walshore_retries_total";
    pub const ERRORS: &str = "walshore_errors_total";
    pub const GLUE_PARTITIONS: &str = "walshore_glue_partitions_registered_total";
    pub const SPILL_BYTES: &str = "walshore_spill_bytes";
    pub const BUFFERED_BYTES: &str = "walshore_buffered_bytes";
    pub const STAGE_BUSY: &str = "walshore_stage_busy_seconds";
    pub const NOTIFICATIONS_SENT: &str = "walshore_notifications_sent_total";
    pub const NOTIFICATION_FAILURES: &str = "walshore_notification_failures_total";
    pub const NOTIFICATIONS_SKIPPED: &str = "walshore_notifications_skipped_total";
    pub const NOTIFY_BACKLOG: &str = "walshore_notification_backlog_commits";
    pub const VERIFY_FINISHED: &str = "walshore_verify_finished_timestamp_seconds";
    pub const VERIFY_TABLES: &str = "walshore_verify_tables";
    pub const HOUSEKEEPING_ERRORS: &str = "walshore_housekeeping_errors_total";
    pub const ICEBERG_PROJECTED: &str = "walshore_iceberg_projected_timestamp_seconds";
    pub const ICEBERG_BEHIND: &str = "walshore_iceberg_behind_commits";
    pub const ICEBERG_FILES: &str = "walshore_iceberg_live_files";
    pub const ICEBERG_SNAPSHOTS: &str = "walshore_iceberg_snapshots";
    pub const ICEBERG_COMPACTIONS: &str = "walshore_iceberg_compactions_total";
    pub const ICEBERG_ERRORS: &str = "walshore_iceberg_errors_total";
    pub const PARTITIONS_WAITING: &str = "walshore_compaction_partitions_waiting";
    pub const PARTITIONS_COMPACTED: &str = "walshore_compaction_partitions_total";
    pub const BYTES_REWRITTEN: &str = "walshore_compaction_bytes_rewritten_total";
    pub const FILES_PER_PARTITION: &str = "walshore_compaction_files_per_partition_max";

    /// Every name above (docs and the dashboard are checked against it).
    pub const ALL: &[&str] = &[
        RECEIVED_LAG,
        COMMITTED_LAG,
        RECEIVED_TS,
        COMMITTED_TS,
        UNCOMMITTED,
        CONNECTED,
        READY,
        SLOT_CONFIRMED_LAG,
        SLOT_RETAINED,
        SLOT_SAFE_WAL,
        SLOT_WAL_STATUS,
        SLOT_ACTIVE,
        SLOT_SAMPLED,
        SLOT_SAMPLE_ERRORS,
        CHANGES_RECEIVED,
        TRANSACTIONS_RECEIVED,
        ROWS_WRITTEN,
        BYTES_WRITTEN,
        FILES_WRITTEN,
        COMMITS,
        COMMIT_DURATION,
        FLUSH_ROWS,
        FLUSH_BYTES,
        COPY_ROWS,
        COPY_ROWS_ESTIMATED,
        RETRIES,
        ERRORS,
        GLUE_PARTITIONS,
        SPILL_BYTES,
        BUFFERED_BYTES,
        STAGE_BUSY,
        NOTIFICATIONS_SENT,
        NOTIFICATION_FAILURES,
        NOTIFICATIONS_SKIPPED,
        NOTIFY_BACKLOG,
        VERIFY_FINISHED,
        VERIFY_TABLES,
        HOUSEKEEPING_ERRORS,
        ICEBERG_PROJECTED,
        ICEBERG_BEHIND,
        ICEBERG_FILES,
        ICEBERG_SNAPSHOTS,
        ICEBERG_COMPACTIONS,
        ICEBERG_ERRORS,
        PARTITIONS_WAITING,
        PARTITIONS_COMPACTED,
        BYTES_REWRITTEN,
        FILES_PER_PARTITION,
    ];
}

/// Bucket bounds of the commit duration histogram (seconds): a local commit takes
/// milliseconds, one waiting out a slow S3 or Glue seconds to minutes.
const COMMIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Rows per flush.
const ROW_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];
/// Bytes per flush (encoded Parquet).
const BYTE_BUCKETS: &[f64] = &[
    1024.0,
    16384.0,
    131072.0,
    1048576.0,
    8388608.0,
    33554432.0,
    134217728.0,
    536870912.0,
];

/// A series with a `table` label goes this long after its last update: the series of
/// tables dropped, renamed or gone from the publication do not pile up for the life of
/// the process (a table's counters come back, from zero, with its next change; rate()
/// takes that as a reset). Every other series stays.
pub const TABLE_SERIES_IDLE: Duration = Duration::from_secs(3600);

static HANDLE: OnceLock<Handle> = OnceLock::new();

/// What renders the metrics: the series without a `table` label, then those with one.
#[derive(Clone)]
pub struct Handle {
    plain: PrometheusHandle,
    tables: PrometheusHandle,
}

impl Handle {
    /// The Prometheus text of every series.
    pub fn render(&self) -> String {
        let mut out = self.plain.render();
        out.push_str(&self.tables.render());
        out
    }

    pub fn run_upkeep(&self) {
        self.plain.run_upkeep();
        self.tables.run_upkeep();
    }
}

/// Routes each series to one of two Prometheus recorders: those with a `table` label
/// to the one that forgets idle series (see [`TABLE_SERIES_IDLE`]), the rest to one that
/// keeps them. Descriptions go to both.
struct SplitRecorder {
    plain: metrics_exporter_prometheus::PrometheusRecorder,
    tables: metrics_exporter_prometheus::PrometheusRecorder,
}

impl SplitRecorder {
    fn new(table_idle: Duration) -> SplitRecorder {
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(names::COMMIT_DURATION.into()), COMMIT_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::FLUSH_ROWS.into()), ROW_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::FLUSH_BYTES.into()), BYTE_BUCKETS))
                .expect("bucket lists are not empty")
        };
        SplitRecorder {
            plain: builder().build_recorder(),
            tables: builder()
                .idle_timeout(metrics_util::MetricKindMask::ALL, Some(table_idle))
                .build_recorder(),
        }
    }

    fn handle(&self) -> Handle {
        Handle {
            plain: self.plain.handle(),
            tables: self.tables.handle(),
        }
    }

    fn of(&self, key: &metrics::Key) -> &metrics_exporter_prometheus::PrometheusRecorder {
        if key.labels().any(|l| l.key() == "table") {
            &self.tables
        } else {
            &self.plain
        }
    }
}

impl metrics::Recorder for SplitRecorder {
    fn describe_counter(&self, key: metrics::KeyName, unit: Option<metrics::Unit>, description: metrics::SharedString) {
        self.plain.describe_counter(key.clone(), unit, description.clone());
        self.tables.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: metrics::KeyName, unit: Option<metrics::Unit>, description: metrics::SharedString) {
        self.plain.describe_gauge(key.clone(), unit, description.clone());
        self.tables.describe_gauge(key, unit, description);
    }
    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.plain.describe_histogram(key.clone(), unit, description.clone());
        self.tables.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Counter {
        self.of(key).register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.of(key).register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Histogram {
        self.of(key).register_histogram(key, metadata)
    }
}

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> Handle {
    HANDLE
        .get_or_init(|| {
            let recorder = SplitRecorder::new(TABLE_SERIES_IDLE);
            let handle = recorder.handle();
            // Fails only if another recorder is installed, which walshore never does.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            ENABLED.store(true, Ordering::Relaxed);
            handle
        })
        .clone()
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether a recorder is installed: stages skip per-change bookkeeping otherwise.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        RECEIVED_LAG,
        Unit::Seconds,
        "now minus the commit time of the newest transaction received from PostgreSQL"
    );
    describe_gauge!(
        COMMITTED_LAG,
        Unit::Seconds,
        "now minus the commit time of the newest transaction whose changes are committed to the lake (or that had none to write)"
    );
    describe_gauge!(
        RECEIVED_TS,
        Unit::Seconds,
        "commit time (Unix seconds) of the newest transaction received"
    );
    describe_gauge!(
        COMMITTED_TS,
        Unit::Seconds,
        "commit time (Unix seconds) of the newest transaction committed to the lake"
    );
    describe_gauge!(
        UNCOMMITTED,
        Unit::Seconds,
        "how long received changes have waited without a commit to the lake; 0 when nothing waits"
    );
    describe_gauge!(CONNECTED, "1 while the replication stream is up");
    describe_gauge!(
        READY,
        "1 while /readyz answers 200: connected, and committing within metrics.ready_within or with nothing to commit"
    );
    describe_gauge!(
        SLOT_CONFIRMED_LAG,
        Unit::Bytes,
        "pg_current_wal_lsn() minus the slot's confirmed_flush_lsn"
    );
    describe_gauge!(
        SLOT_RETAINED,
        Unit::Bytes,
        "pg_current_wal_lsn() minus the slot's restart_lsn: WAL the slot keeps on the server's disk"
    );
    describe_gauge!(
        SLOT_SAFE_WAL,
        Unit::Bytes,
        "pg_replication_slots.safe_wal_size: WAL that can still be written before the slot is invalidated (absent with max_slot_wal_keep_size = -1)"
    );
    describe_gauge!(
        SLOT_WAL_STATUS,
        "1 for the slot's current pg_replication_slots.wal_status (label status: reserved, extended, unreserved, lost)"
    );
    describe_gauge!(SLOT_ACTIVE, "1 while a walsender holds the slot");
    describe_gauge!(
        VERIFY_FINISHED,
        Unit::Seconds,
        "when the last `walshore verify` of this lake finished (Unix seconds; absent until one ran)"
    );
    describe_gauge!(
        VERIFY_TABLES,
        "tables of the last `walshore verify` per result (label result: equal, differs, unverified)"
    );
    describe_gauge!(
        SLOT_SAMPLED,
        Unit::Seconds,
        "when the slot was last sampled (Unix seconds)"
    );
    describe_counter!(
        SLOT_SAMPLE_ERRORS,
        "slot samples that failed (the server unreachable, say)"
    );
    describe_counter!(
        CHANGES_RECEIVED,
        "row changes decoded from the stream, per table and operation (insert, update, delete, truncate)"
    );
    describe_counter!(TRANSACTIONS_RECEIVED, "transactions decoded from the stream");
    describe_counter!(
        ROWS_WRITTEN,
        "rows committed to the lake, per table and _op (I, U, D, T, R)"
    );
    describe_counter!(BYTES_WRITTEN, Unit::Bytes, "Parquet bytes committed to the lake");
    describe_counter!(FILES_WRITTEN, "Parquet files committed to the lake");
    describe_counter!(COMMITS, "commit records written");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "from a flush reaching the sink to its commit record written (uploads, Glue, record)"
    );
    describe_histogram!(FLUSH_ROWS, "rows per commit");
    describe_histogram!(FLUSH_BYTES, Unit::Bytes, "Parquet bytes per commit");
    describe_gauge!(COPY_ROWS, "rows the running (or last) copy of each table has read");
    describe_gauge!(
        COPY_ROWS_ESTIMATED,
        "rows the copy of each table is expected to read: extrapolated from its share of the table's pages, exact once done"
    );
    describe_counter!(
        RETRIES,
        "times the pipeline reconnected after a transient failure, per stage that failed"
    );
    describe_counter!(
        ERRORS,
        "failures per stage and kind (transient: retried; definite: walshore stops)"
    );
    describe_counter!(GLUE_PARTITIONS, "partitions registered in the Glue catalog");
    describe_gauge!(
        SPILL_BYTES,
        Unit::Bytes,
        "bytes of streamed in-progress transactions spilled to disk"
    );
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "decoded changes waiting in memory between source and sink"
    );
    describe_gauge!(
        STAGE_BUSY,
        "how long each stage has been inside its current unit of work (0 when waiting for input)"
    );
    describe_counter!(
        NOTIFICATIONS_SENT,
        "new-data notices delivered, per target (webhook, sns)"
    );
    describe_counter!(
        NOTIFICATION_FAILURES,
        "failed attempts to deliver a notice (each is retried), per target"
    );
    describe_counter!(
        NOTIFICATIONS_SKIPPED,
        "commits never announced: their records were pruned (sink.log_retention) before delivery"
    );
    describe_gauge!(NOTIFY_BACKLOG, "commits made and not yet announced to the target");
    describe_counter!(
        HOUSEKEEPING_ERRORS,
        "housekeeping passes that failed (sweep of other writers' files, folding, pruning); each is tried again at the next interval"
    );
    describe_gauge!(
        ICEBERG_PROJECTED,
        Unit::Seconds,
        "when the Iceberg projector last brought every table up to the head of the commit log"
    );
    describe_gauge!(
        ICEBERG_BEHIND,
        "commit records the Iceberg table did not hold yet when the projector last looked (0 once it caught up)"
    );
    describe_gauge!(
        ICEBERG_FILES,
        "live files of the Iceberg table, per content (data, deletes)"
    );
    describe_gauge!(ICEBERG_SNAPSHOTS, "snapshots the Iceberg table's metadata keeps");
    describe_counter!(
        ICEBERG_COMPACTIONS,
        "compactions of the Iceberg table (replace snapshots)"
    );
    describe_counter!(
        ICEBERG_ERRORS,
        "Iceberg projections that failed (each tried again the next commit_interval)"
    );
    describe_gauge!(
        PARTITIONS_WAITING,
        "change-log partitions with files to compact (closed or not yet)"
    );
    describe_counter!(PARTITIONS_COMPACTED, "change-log partitions compacted");
    describe_counter!(
        BYTES_REWRITTEN,
        "change-log bytes rewritten by compaction (as the replaced files held them)"
    );
    describe_gauge!(
        FILES_PER_PARTITION,
        "the most files not yet compacted in any one change-log partition (what a query of it opens)"
    );
}

/// Seconds since the Unix epoch, now.
/// The last verification's gauges, from its record in the lake.
pub fn verified(report: &crate::verify::Report) {
    if !enabled() {
        return;
    }
    metrics::gauge!(names::VERIFY_FINISHED).set(report.finished_at_seconds);
    for (result, label) in [
        (crate::verify::Outcome::Equal, "equal"),
        (crate::verify::Outcome::Differs, "differs"),
        (crate::verify::Outcome::Unverified, "unverified"),
    ] {
        let n = report.tables.iter().filter(|t| t.result == result).count();
        metrics::gauge!(names::VERIFY_TABLES, "result" => label).set(n as f64);
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What is read at request time: lag sources, connection, stage activity.
pub struct State {
    /// Commit time of the newest transaction received, µs since the epoch (0: none yet).
    received_ts: AtomicI64,
    /// Of the newest transaction committed to the lake (or confirmed with nothing to write).
    committed_ts: AtomicI64,
    /// End LSN of the newest transaction received and of the newest one committed.
    received_end: AtomicU64,
    committed_end: AtomicU64,
    /// Since when received changes wait for a commit.
    waiting_since: Mutex<Option<Instant>>,
    connected: AtomicBool,
    /// Stage → since when it is busy with its current unit of work.
    busy: Mutex<HashMap<&'static str, Instant>>,
}

pub static STATE: LazyLock<State> = LazyLock::new(State::new);

/// A stage inside a unit of work; dropping it ends the unit.
/// None when no recorder is installed (nobody asks `/healthz`).
pub struct Busy(Option<&'static str>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(stage) = self.0 {
            STATE.busy.lock().expect("not poisoned").remove(stage);
        }
    }
}

impl State {
    fn new() -> State {
        State {
            received_ts: AtomicI64::new(0),
            committed_ts: AtomicI64::new(0),
            received_end: AtomicU64::new(0),
            committed_end: AtomicU64::new(0),
            waiting_since: Mutex::new(None),
            connected: AtomicBool::new(false),
            busy: Mutex::new(HashMap::new()),
        }
    }

    /// A transaction was received: its commit time (µs) and end LSN.
    pub fn received(&self, commit_ts: i64, end: u64) {
        self.received_ts.fetch_max(commit_ts, Ordering::Relaxed);
        self.received_end.fetch_max(end, Ordering::Relaxed);
        let mut w = self.waiting_since.lock().expect("not poisoned");
        if w.is_none() && end > self.committed_end.load(Ordering::Relaxed) {
            *w = Some(Instant::now());
        }
    }

    /// Everything up to `end` is in the lake (committed, or confirmed with nothing to
    /// write); `commit_ts`: the newest such transaction's commit time, if known.
    pub fn committed(&self, end: u64, commit_ts: Option<i64>) {
        self.committed_end.fetch_max(end, Ordering::Relaxed);
        if let Some(ts) = commit_ts {
            self.committed_ts.fetch_max(ts, Ordering::Relaxed);
        }
        let mut w = self.waiting_since.lock().expect("not poisoned");
        if end >= self.received_end.load(Ordering::Relaxed) {
            *w = None;
        } else if w.is_some() {
            // What remains arrived after this commit's transactions.
            *w = Some(Instant::now());
        }
    }

    /// The stream went up or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if !up {
            // What was received and not committed is streamed again after a reconnect.
            let committed = self.committed_end.load(Ordering::Relaxed);
            self.received_end.store(committed, Ordering::Relaxed);
            *self.waiting_since.lock().expect("not poisoned") = None;
            self.busy.lock().expect("not poisoned").clear();
        }
    }

    /// `stage` starts a unit of work (ended when the guard drops).
    /// Nothing is kept while metrics are off: the stages call this per chunk.
    pub fn busy(&self, stage: &'static str) -> Busy {
        if !enabled() {
            return Busy(None);
        }
        self.busy.lock().expect("not poisoned").insert(stage, Instant::now());
        Busy(Some(stage))
    }

    /// How long changes have waited for a commit (zero when none wait).
    pub fn uncommitted_for(&self) -> Duration {
        self.waiting_since
            .lock()
            .expect("not poisoned")
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Liveness: no stage has been inside one unit of work for longer than `stuck_after`.
    pub fn health(&self, stuck_after: Duration) -> Result<(), String> {
        let busy = self.busy.lock().expect("not poisoned");
        let mut stuck: Vec<String> = busy
            .iter()
            .filter(|(_, since)| since.elapsed() > stuck_after)
            .map(|(stage, since)| format!("{stage} busy for {:.0} s", since.elapsed().as_secs_f64()))
            .collect();
        if stuck.is_empty() {
            return Ok(());
        }
        stuck.sort();
        Err(format!(
            "stuck (metrics.stuck_after = {stuck_after:?}): {}",
            stuck.join(", ")
        ))
    }

    /// Readiness: connected, and changes received wait no longer than `within`.
    pub fn readiness(&self, within: Duration) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("not connected to PostgreSQL (starting, or reconnecting after a failure)".into());
        }
        let waited = self.uncommitted_for();
        if waited > within {
            return Err(format!(
                "changes received {:.0} s ago are not committed yet (metrics.ready_within = {within:?})",
                waited.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Sets the gauges that are computed rather than recorded (before a scrape or an
    /// EMF line).
    pub fn refresh(&self, ready_within: Duration) {
        let now = unix_now();
        for (ts, lag, at) in [
            (names::RECEIVED_TS, names::RECEIVED_LAG, &self.received_ts),
            (names::COMMITTED_TS, names::COMMITTED_LAG, &self.committed_ts),
        ] {
            let micros = at.load(Ordering::Relaxed);
            if micros > 0 {
                let secs = micros as f64 / 1e6;
                metrics::gauge!(ts).set(secs);
                metrics::gauge!(lag).set((now - secs).max(0.0));
            }
        }
        metrics::gauge!(names::UNCOMMITTED).set(self.uncommitted_for().as_secs_f64());
        metrics::gauge!(names::CONNECTED).set(f64::from(u8::from(self.connected.load(Ordering::Relaxed))));
        metrics::gauge!(names::READY).set(f64::from(u8::from(self.readiness(ready_within).is_ok())));
        let busy = self.busy.lock().expect("not poisoned");
        for stage in STAGES {
            let secs = busy.get(stage).map_or(0.0, |t| t.elapsed().as_secs_f64());
            metrics::gauge!(names::STAGE_BUSY, "stage" => *stage).set(secs);
        }
    }
}

/// The stages that report when they are busy.
pub const STAGES: &[&str] = &["source", "batch", "sink"];

/// A failure of `stage`, of the kind `retry` says.
pub fn failed(stage: &'static str, retry: crate::retry::Retry) {
    let kind = match retry {
        crate::retry::Retry::Transient => "transient",
        crate::retry::Retry::Definite => "definite",
    };
    metrics::counter!(names::ERRORS, "stage" => stage, "kind" => kind).increment(1);
}

/// The pipeline starts again after a failure of `stage`.
pub fn retried(stage: &'static str) {
    metrics::counter!(names::RETRIES, "stage" => stage).increment(1);
}

/// The operation label of a change.
pub fn op_label(op: u8) -> &'static str {
    match op {
        b'I' => "insert",
        b'U' => "update",
        b'D' => "delete",
        b'T' => "truncate",
        _ => "other",
    }
}

/// The endpoint, slot sampler and EMF writer of a `run` or `sync`.
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts what `[metrics]` asks for; None when it asks for nothing. Fails only when the
/// endpoint cannot listen.
pub async fn start(cfg: &crate::config::Config) -> std::io::Result<Option<Running>> {
    let m = &cfg.metrics;
    if !m.enabled() {
        return Ok(None);
    }
    let handle = install();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(listen) = m.listen {
        tasks.push(server::serve(m, listen, handle.clone(), stop.clone()).await?);
    }
    tasks.push(tokio::spawn(slot::sampler(
        cfg.source.conn.clone(),
        cfg.source.slot.clone(),
        m.slot_interval,
        stop.clone(),
    )));
    if m.emf {
        let dimensions = vec![
            ("Database".to_owned(), cfg.source.conn.dbname.clone()),
            ("Slot".to_owned(), cfg.source.slot.clone()),
        ];
        tasks.push(tokio::spawn(emf::writer(
            handle,
            m.emf_namespace.clone(),
            dimensions,
            m.emf_interval,
            m.ready_within,
            stop.clone(),
        )));
    }
    Ok(Some(Running { stop, tasks }))
}

impl Running {
    /// Stops everything (the EMF writer writes a last line).
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's series goes after a while without updates, the others stay, and a
    /// table's counter comes back with its next change.
    #[test]
    fn series_of_idle_tables_go_and_the_others_stay() {
        let recorder = SplitRecorder::new(Duration::from_millis(200));
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(names::COMMITS).increment(1);
            metrics::counter!(names::ROWS_WRITTEN, "table" => "public.gone", "op" => "I").increment(5);
            metrics::counter!(names::ROWS_WRITTEN, "table" => "public.busy", "op" => "I").increment(5);
        });
        let text = handle.render();
        assert!(
            text.contains("public.gone") && text.contains("public.busy") && text.contains(names::COMMITS),
            "{text}"
        );
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            metrics::with_local_recorder(&recorder, || {
                metrics::counter!(names::ROWS_WRITTEN, "table" => "public.busy", "op" => "I").increment(1);
            });
        }
        let text = handle.render();
        assert!(!text.contains("public.gone"), "{text}");
        assert!(
            text.contains("walshore_rows_written_total{table=\"public.busy\",op=\"I\"} 15"),
            "{text}"
        );
        assert!(text.contains(&format!("{} 1", names::COMMITS)), "{text}");
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(names::ROWS_WRITTEN, "table" => "public.gone", "op" => "I").increment(2);
        });
        assert!(
            handle
                .render()
                .contains("walshore_rows_written_total{table=\"public.gone\",op=\"I\"} 2")
        );
    }

    #[test]
    fn a_stage_busy_past_the_bound_fails_liveness_until_it_finishes() {
        install();
        let busy = STATE.busy("sink");
        assert!(STATE.health(Duration::from_secs(60)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        let why = STATE.health(Duration::from_millis(10)).unwrap_err();
        assert!(why.contains("sink busy for"), "{why}");
        drop(busy);
        assert!(
            STATE.health(Duration::from_millis(10)).is_ok(),
            "waiting for input is not stuck"
        );
    }

    #[test]
    fn readiness_follows_connection_and_waiting_changes() {
        let s = State::new();
        assert!(s.readiness(Duration::from_secs(60)).is_err(), "not connected");
        s.connected.store(true, Ordering::Relaxed);
        assert!(s.readiness(Duration::from_secs(60)).is_ok(), "idle");
        s.received(1_000_000, 100);
        assert!(s.uncommitted_for() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(s.readiness(Duration::from_millis(10)).is_err(), "waited past the bound");
        s.committed(50, Some(500_000));
        assert!(
            s.readiness(Duration::from_millis(10)).is_ok(),
            "the rest arrived after this commit"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(s.readiness(Duration::from_millis(10)).is_err());
        s.committed(100, Some(1_000_000));
        assert_eq!(s.uncommitted_for(), Duration::ZERO);
        assert!(s.readiness(Duration::from_millis(10)).is_ok());
    }
}
