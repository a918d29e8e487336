//! Wiring: the source, batch and sink tasks, the bounded channels between them, the
//! shutdown order and the retry policy. No stage logic lives here.
//!
//! ```text
//! source task ──Vec<Event>──► batch task ──SinkMsg──► sink task
//!      ▲          (bounded)                 (bounded)     │
//!      └──────────────── watch: confirmable LSN ◄─────────┘
//! ```
//! Shutdown (signal, or `sync` reaching its target): the source stops at a transaction
//! boundary and closes its channel; the batch task hands over what it holds; the sink
//! commits it and closes the watch; the source confirms the final LSN and disconnects.

mod tasks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::record::Identity;
use crate::checkpoint::{Checkpoint, CheckpointError, read_head};
use crate::config::{Config, SnapshotMode};
use crate::decode::StreamBuffer;
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError, StoreError, open_store};
use crate::source::{Assembler, Replication, Retry, SourceError, quote_ident};

pub use tasks::Summary;

/// Chunks of events in flight between source and batcher.
const EVENT_CHANNEL_CHUNKS: usize = 16;
/// Events per chunk: amortises channel overhead without holding much.
const EVENTS_PER_CHUNK: usize = 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// `sync` runs from cron and tests: a few quick retries, then report the failure.
const SYNC_ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Replicate until the shutdown token fires.
    Run,
    /// Replicate everything committed before start, then stop.
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("task failed: {0}")]
    Task(String),
}

impl PipelineError {
    pub fn retry(&self) -> Retry {
        match self {
            PipelineError::Source(e) => e.retry(),
            PipelineError::Sink(e) => e.retry(),
            PipelineError::Checkpoint(e) => e.retry(),
            _ => Retry::Definite,
        }
    }
}

/// Runs the pipeline, retrying transient failures with exponential backoff (in `sync`
/// mode at most a few times). Returns when done, on shutdown, or on a definite error.
pub async fn run(cfg: &Config, mode: Mode, shutdown: CancellationToken) -> Result<Summary, PipelineError> {
    let mut backoff = Duration::from_secs(1);
    let mut attempt = 0u32;
    let mut total = Summary::default();
    loop {
        attempt += 1;
        let started = Instant::now();
        match run_once(cfg, mode, shutdown.clone()).await {
            Ok(s) => {
                total.absorb(s);
                return Ok(total);
            }
            Err((PipelineError::Snapshot(crate::snapshot::SnapshotError::Interrupted), partial)) => {
                total.absorb(partial);
                tracing::info!("initial copy interrupted by shutdown; it starts again at the next start");
                return Ok(total);
            }
            Err((e, partial)) => {
                total.absorb(partial);
                // Right after a lost connection our own old walsender may still hold the
                // slot until PostgreSQL notices (wal_sender_timeout): wait for it. On a
                // first attempt the holder is someone else, and that is final.
                let own_walsender = attempt > 1 && matches!(e, PipelineError::Source(SourceError::SlotInUse { .. }));
                if (e.retry() == Retry::Definite && !own_walsender)
                    || shutdown.is_cancelled()
                    || (mode == Mode::Sync && attempt >= SYNC_ATTEMPTS)
                {
                    return Err(e);
                }
                if started.elapsed() > MAX_BACKOFF * 2 {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(attempt, retry_in = ?backoff, error = %ErrorChain(&e), "transient failure; reconnecting from the committed position");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Err(e),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Displays an error with its whole `source()` chain.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            let s = e.to_string();
            // thiserror messages often embed their source already.
            if !self.0.to_string().contains(&s) {
                write!(f, ": {s}")?;
            }
            cur = e.source();
        }
        Ok(())
    }
}

fn new_run_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{}-{}-{:08x}", host.trim(), std::process::id(), rand::random::<u32>())
}

async fn run_once(cfg: &Config, mode: Mode, shutdown: CancellationToken) -> Result<Summary, (PipelineError, Summary)> {
    let fail = |e: PipelineError| (e, Summary::default());
    let store = open_store(&cfg.sink).map_err(|e| fail(e.into()))?;
    // A lake without its starting state (new, or an initial copy that never finished)
    // takes its copy and its slot from one consistent point.
    let head = read_head(store.as_ref()).await.map_err(|e| fail(e.into()))?;
    let initialized = head.as_ref().is_some_and(|h| h.initialized);
    let export = !initialized && cfg.snapshot == SnapshotMode::Initial;
    let (mut repl, slot, system) = Replication::open(&cfg.source, export)
        .await
        .map_err(|e| fail(e.into()))?;
    let identity = Identity {
        system_id: system.system_id.clone(),
        slot: cfg.source.slot.clone(),
        publication: cfg.source.publication.clone(),
    };
    let prepared = async {
        let checkpoint = Checkpoint::load(store.clone(), &identity).await?;
        if slot.created && checkpoint.head().initialized {
            // The lake continues a slot that no longer exists: what was committed while
            // it was gone is not in the new slot, and claiming continuity would be a lie.
            return Err(SourceError::Setup(format!(
                "replication slot {:?} was missing and has just been created, but the lake at {} continues an earlier slot (commit {}, lsn {}): changes made in between cannot be recovered from PostgreSQL; start a new lake (new sink.url) with an initial snapshot",
                cfg.source.slot, cfg.sink.url, checkpoint.head().seq, checkpoint.head().end_lsn
            ))
            .into());
        }
        Ok::<_, PipelineError>(checkpoint)
    }
    .await;
    let mut checkpoint = match prepared {
        Ok(c) => c,
        Err(e) => {
            if slot.created {
                // Do not leave behind a slot nobody will read: it would hold WAL forever.
                if let Err(drop_err) = repl
                    .query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(&cfg.source.slot)))
                    .await
                {
                    tracing::warn!(slot = %cfg.source.slot, error = %drop_err, "cannot drop the slot created by this failed start; drop it by hand");
                }
            }
            return Err(fail(e));
        }
    };
    let run_id = new_run_id();
    let sink = Arc::new(Sink::new(store, &cfg.sink));
    let mut total = Summary::default();
    let mut copied_now = false;

    if let (Some(name), true) = (slot.snapshot.clone(), export) {
        // The replication connection stays idle here: it holds the exported snapshot.
        checkpoint
            .claim_and_recover(&run_id, false)
            .await
            .map_err(|e| fail(e.into()))?;
        let exported = crate::snapshot::Exported {
            name,
            consistent_point: slot.confirmed_flush,
            taken_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
        };
        tracing::info!(consistent_point = %exported.consistent_point, "initial copy started");
        let (events, _confirm, downstream) = spawn_downstream(cfg, sink.clone(), checkpoint, run_id.clone());
        let copied = crate::snapshot::copy(
            &cfg.source,
            &exported,
            cfg.snapshot_parallelism,
            events,
            shutdown.clone(),
        )
        .await;
        let (summary, back) = match downstream.join().await {
            Ok(done) => done,
            Err((e, summary)) => {
                total.absorb(summary);
                return Err((e, total));
            }
        };
        total.absorb(summary);
        checkpoint = back;
        if let Err(e) = copied {
            return Err((e.into(), total));
        }
        tracing::info!(committed_seq = checkpoint.head().seq, "initial copy committed");
        copied_now = true;
    }

    let start = checkpoint.position();
    repl.start(&cfg.source, start)
        .await
        .map_err(|e| (e.into(), total.clone()))?;
    // The starting state is established once the copy is committed (even an empty
    // one: the stream continues from its consistent point), or without a copy.
    let mark_initialized = copied_now || cfg.snapshot == SnapshotMode::Never;
    let deleted = checkpoint
        .claim_and_recover(&run_id, mark_initialized)
        .await
        .map_err(|e| (e.into(), total.clone()))?;
    tracing::info!(
        slot = %cfg.source.slot,
        publication = %cfg.source.publication,
        resume_lsn = %start.max(slot.confirmed_flush),
        committed_seq = checkpoint.head().seq,
        uncommitted_files_removed = deleted,
        server_version = repl.server_version,
        "replication started"
    );

    let target = (mode == Mode::Sync).then_some(system.xlogpos);
    let buffer = StreamBuffer::new(
        cfg.source.spill_dir.clone(),
        cfg.source.stream_memory_bytes,
        cfg.source.spill_max_bytes,
    );
    let assembler = Assembler::new(start, buffer);

    let (events, confirm, downstream) = spawn_downstream(cfg, sink, checkpoint, run_id);
    let source = tokio::spawn(tasks::source_task(tasks::SourceTask {
        repl,
        assembler,
        events,
        confirm,
        shutdown,
        target,
        status_interval: cfg.source.status_interval,
    }));
    let (s, d) = tokio::join!(source, downstream.join());
    // The first real error wins; a stage that stopped because its neighbour did is Ok.
    match d {
        Ok((summary, _)) => total.absorb(summary),
        Err((e, summary)) => {
            total.absorb(summary);
            return Err((e, total));
        }
    }
    match s.unwrap_or_else(|e| Err(PipelineError::Task(e.to_string()))) {
        Ok(()) => Ok(total),
        Err(e) => Err((e, total)),
    }
}

/// The batch and sink tasks of one phase (initial copy or streaming).
struct Downstream {
    batch: tokio::task::JoinHandle<Result<(), PipelineError>>,
    sink: tokio::task::JoinHandle<(Summary, Checkpoint, Result<(), PipelineError>)>,
}

/// Starts batch and sink; returns the channel into the batcher and the watch of the
/// confirmable LSN.
fn spawn_downstream(
    cfg: &Config,
    sink: Arc<Sink>,
    checkpoint: Checkpoint,
    run_id: String,
) -> (
    mpsc::Sender<Vec<crate::change::Event>>,
    watch::Receiver<Lsn>,
    Downstream,
) {
    let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CHUNKS);
    let (sink_tx, sink_rx) = mpsc::channel(1);
    let (confirm_tx, confirm_rx) = watch::channel(Lsn::ZERO);
    let batch = tokio::spawn(tasks::batch_task(
        event_rx,
        sink_tx,
        cfg.sink.flush_interval,
        cfg.sink.max_buffer_bytes,
    ));
    let sink = tokio::spawn(tasks::sink_task(sink, checkpoint, run_id, sink_rx, confirm_tx));
    (event_tx, confirm_rx, Downstream { batch, sink })
}

impl Downstream {
    /// Waits for both once their input has closed: the sink's error first, then the
    /// batcher's; on success the checkpoint comes back for the next phase.
    async fn join(self) -> Result<(Summary, Checkpoint), (PipelineError, Summary)> {
        let task = |e: tokio::task::JoinError| PipelineError::Task(e.to_string());
        let batch = self.batch.await.unwrap_or_else(|e| Err(task(e)));
        let (summary, checkpoint, sunk) = self.sink.await.map_err(|e| (task(e), Summary::default()))?;
        match sunk.and(batch) {
            Ok(()) => Ok((summary, checkpoint)),
            Err(e) => Err((e, summary)),
        }
    }
}
