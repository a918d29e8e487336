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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batcher, Gate};
use crate::checkpoint::record::Identity;
use crate::checkpoint::{Checkpoint, CheckpointError, read_head, read_schemas};
use crate::config::{Config, SnapshotMode};
use crate::decode::StreamBuffer;
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError, StoreError, open_store};
use crate::snapshot::{CopyEnv, Point, Selection};
use crate::source::{Assembler, Replication, Retry, SourceError, quote_ident};

pub use tasks::Summary;

/// Chunks of events in flight between source and batcher.
const EVENT_CHANNEL_CHUNKS: usize = 16;
/// Events per chunk: amortises channel overhead without holding much.
const EVENTS_PER_CHUNK: usize = 1024;
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
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("task failed: {0}")]
    Task(String),
}

impl PipelineError {
    pub fn retry(&self) -> Retry {
        match self {
            PipelineError::Source(e) => e.retry(),
            PipelineError::Sink(e) => e.retry(),
            PipelineError::Checkpoint(e) => e.retry(),
            PipelineError::Snapshot(e) => e.retry(),
            PipelineError::Catalog(e) => e.retry(),
            _ => Retry::Definite,
        }
    }
}

/// Runs the pipeline, retrying transient failures with backoff (`crate::retry`; in
/// `sync` mode at most a few times). Returns when done, on shutdown, or on a definite
/// error.
pub async fn run(cfg: &Config, mode: Mode, shutdown: CancellationToken) -> Result<Summary, PipelineError> {
    let attempts = (mode == Mode::Sync).then_some(SYNC_ATTEMPTS as usize - 1);
    let mut delays = crate::retry::backoff(attempts);
    let process = Process::new();
    let mut attempt = 0u32;
    let mut total = Summary::default();
    loop {
        attempt += 1;
        let started = Instant::now();
        match run_once(cfg, mode, shutdown.clone(), &process).await {
            Ok(s) => {
                total.absorb(s);
                return Ok(total);
            }
            Err((e, partial)) => {
                let progressed = partial.commits > 0;
                total.absorb(partial);
                // Right after a lost connection our own old walsender may still hold the
                // slot until PostgreSQL notices (wal_sender_timeout): wait for it. On a
                // first attempt the holder is someone else, and that is final.
                let own_walsender = attempt > 1 && matches!(e, PipelineError::Source(SourceError::SlotInUse { .. }));
                if (e.retry() == Retry::Definite && !own_walsender) || shutdown.is_cancelled() {
                    return Err(e);
                }
                // An attempt that committed, or went well for a while, starts the
                // backoff over: this failure is a new one, not a repeat.
                if progressed || started.elapsed() > crate::retry::MAX_DELAY * 2 {
                    delays = crate::retry::backoff(attempts);
                }
                let Some(delay) = delays.next() else {
                    tracing::error!(attempts = attempt, "giving up after repeated transient failures");
                    return Err(e);
                };
                tracing::warn!(attempt, retry_in = ?delay, error = %ErrorChain(&e), "transient failure; reconnecting from the committed position");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Err(e),
                }
            }
        }
    }
}

/// This process as a writer of the lake: every attempt's run id starts with its name,
/// and once an attempt has claimed the lake, a head written by anybody else means
/// another instance took over.
struct Process {
    name: String,
    claimed: std::sync::atomic::AtomicBool,
    /// The start-up catalog reconciliation succeeded once: later attempts (a lost
    /// connection, say) skip it, since every commit since registered its own partitions.
    reconciled: std::sync::atomic::AtomicBool,
}

impl Process {
    fn new() -> Process {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        Process {
            // host and pid name the process in messages; the nonce keeps two
            // containers with the same host name and pid apart
            name: format!("{}-{}-{:04x}", host.trim(), std::process::id(), rand::random::<u16>()),
            claimed: Default::default(),
            reconciled: Default::default(),
        }
    }

    fn run_id(&self) -> String {
        format!("{}-{:08x}", self.name, rand::random::<u32>())
    }

    fn owns(&self, run_id: &str) -> bool {
        run_id
            .strip_prefix(self.name.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }

    /// Refuses to go on when another instance committed since this process claimed
    /// the lake: it took over (this one was paused or cut off), and two writers must
    /// never alternate.
    fn check_not_taken_over(&self, head: Option<&crate::checkpoint::CommitRecord>) -> Result<(), PipelineError> {
        match head {
            Some(h) if self.claimed.load(std::sync::atomic::Ordering::SeqCst) && !self.owns(&h.run_id) => {
                Err(CheckpointError::Fenced {
                    seq: h.seq,
                    holder: h.run_id.clone(),
                }
                .into())
            }
            _ => Ok(()),
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

async fn run_once(
    cfg: &Config,
    mode: Mode,
    shutdown: CancellationToken,
    process: &Process,
) -> Result<Summary, (PipelineError, Summary)> {
    let fail = |e: PipelineError| (e, Summary::default());
    let store = open_store(&cfg.sink).map_err(|e| fail(e.into()))?;
    // A lake that does not yet continue a stream (new, or a first start that failed
    // before it claimed) takes its slot and its first copies from one consistent point.
    let head = read_head(store.as_ref()).await.map_err(|e| fail(e.into()))?;
    process.check_not_taken_over(head.as_ref()).map_err(fail)?;
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
    let run_id = process.run_id();
    let mut catalog = match &cfg.glue {
        Some(g) => Some(crate::catalog::Catalog::open(g, &cfg.sink, &cfg.partitions).await),
        None => None,
    };
    let sink = Arc::new(Sink::new(store, &cfg.sink));

    // A new lake copies every published table under the slot's exported snapshot:
    // the copy connections import it before the stream starts (which ends it).
    let initial = match (slot.snapshot.clone(), export) {
        (Some(name), true) => Some(
            crate::snapshot::prepare(
                &cfg.source,
                Point::new(name, slot.confirmed_flush),
                cfg.snapshot_parallelism,
                cfg.snapshot_chunk_bytes,
                Selection {
                    only: None,
                    reset: &BTreeSet::new(),
                },
            )
            .await
            .map_err(|e| fail(e.into()))?,
        ),
        _ => None,
    };

    let start = checkpoint.position();
    repl.start(&cfg.source, start)
        .await
        .map_err(|e| match e {
            // The slot this start has just created is gone: another instance starting
            // on the same new lake recreated it.
            SourceError::SlotGone { slot: name, .. } if slot.created => SourceError::SlotInUse {
                slot: name,
                holder: "another process dropped the slot this instance had just created: another walshore is starting on the same configuration".into(),
            },
            e => e,
        })
        .map_err(|e| fail(e.into()))?;
    // From here the lake continues this slot's stream (copies run beside it).
    let deleted = checkpoint
        .claim_and_recover(&run_id, true)
        .await
        .map_err(|e| fail(e.into()))?;
    process.claimed.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        slot = %cfg.source.slot,
        publication = %cfg.source.publication,
        resume_lsn = %start.max(slot.confirmed_flush),
        committed_seq = checkpoint.head().seq,
        uncommitted_files_removed = deleted,
        server_version = repl.server_version,
        "replication started"
    );

    // Each table's changes are written from its snapshot point on; a table never copied
    // waits for its copy (snapshot.mode = "initial").
    let head = checkpoint.head().clone();
    let schemas = read_schemas(sink.store().as_ref()).await.map_err(|e| fail(e.into()))?;
    if let Some(c) = catalog
        .as_mut()
        .filter(|_| !process.reconciled.load(std::sync::atomic::Ordering::SeqCst))
    {
        let started = std::time::Instant::now();
        // Only committed files are left (recovery ran): whatever of them Glue lacks is
        // registered before anything new commits.
        let lake = crate::catalog::lake_partitions(sink.store().as_ref(), schemas.keys(), &cfg.partitions)
            .await
            .map_err(|e| fail(e.into()))?;
        let registered = c
            .reconcile(&lake, &schemas, &shutdown)
            .await
            .map_err(|e| fail(e.into()))?;
        tracing::info!(
            database = %c.database(),
            tables = lake.len(),
            partitions = lake.values().map(Vec::len).sum::<usize>(),
            registered_now = registered,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Glue catalog reconciled with the lake"
        );
        process.reconciled.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let mut gates: HashMap<String, Gate> = head
        .snapshots
        .iter()
        .map(|(t, l)| (t.clone(), Gate::From(*l)))
        .collect();
    let initial_tables = initial.as_ref().map(|p| p.tables()).unwrap_or_default();
    if let Some(p) = &initial {
        gates.extend(initial_tables.iter().map(|t| (t.clone(), Gate::From(p.lsn()))));
    }
    let in_flight = Arc::new(std::sync::Mutex::new(
        initial_tables.iter().cloned().collect::<BTreeSet<_>>(),
    ));
    let (copy_tx, copy_rx) = mpsc::channel(16);
    let env = CopyEnv {
        sink: sink.clone(),
        run_id: run_id.clone(),
        floor: head.seq + 1,
        buffer_bytes: (cfg.sink.max_buffer_bytes / cfg.snapshot_parallelism).max(1 << 20),
        shutdown: shutdown.child_token(),
        tracker: tokio_util::task::TaskTracker::new(),
        user: cfg.source.conn.user.clone(),
        unrepresentable: cfg.sink.unrepresentable,
        partitions: Arc::new(cfg.partitions.clone()),
    };
    if let Some(p) = initial {
        p.spawn(&env, copy_tx.clone());
    }
    let copies = (env.shutdown.clone(), env.tracker.clone());

    let target = (mode == Mode::Sync).then_some(system.xlogpos);
    let buffer = StreamBuffer::new(
        cfg.source.spill_dir.clone(),
        cfg.source.stream_memory_bytes,
        cfg.source.spill_max_bytes,
    );
    let assembler = Assembler::new(start, buffer);

    let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CHUNKS);
    let (sink_tx, sink_rx) = mpsc::channel(1);
    let (confirm_tx, confirm_rx) = watch::channel(Lsn::ZERO);
    let batch = tokio::spawn(tasks::batch_task(
        event_rx,
        sink_tx,
        cfg.sink.flush_interval,
        cfg.sink.max_buffer_bytes,
        Batcher::with_gates(gates, cfg.snapshot == SnapshotMode::Initial)
            .with_lake_schemas(schemas.clone())
            .with_unrepresentable(cfg.sink.unrepresentable)
            .with_partitions(Arc::new(cfg.partitions.clone())),
    ));
    let sink_task = tokio::spawn(tasks::sink_task(tasks::SinkTask {
        sink,
        checkpoint,
        run_id,
        input: sink_rx,
        copies: copy_rx,
        confirm: confirm_tx,
        withheld: initial_tables.iter().map(|t| (t.clone(), Default::default())).collect(),
        in_flight: in_flight.clone(),
        schemas,
        catalog,
        shutdown: shutdown.clone(),
    }));
    let copier = tasks::Copier {
        cfg: cfg.clone(),
        env,
        results: copy_tx,
        in_flight,
        copied: head.snapshots.keys().chain(&initial_tables).cloned().collect(),
        in_lake: head
            .tables
            .iter()
            .filter(|(_, s)| s.rows > 0)
            .map(|(t, _)| t.clone())
            .collect(),
        client: None,
        polled: false,
        resolved: HashMap::new(),
    };
    let source = tokio::spawn(tasks::source_task(tasks::SourceTask {
        repl,
        assembler,
        events: event_tx,
        confirm: confirm_rx,
        shutdown,
        target,
        status_interval: cfg.source.status_interval,
        receive_timeout: cfg.source.receive_timeout,
        copier,
    }));
    let task = |e: tokio::task::JoinError| PipelineError::Task(e.to_string());
    let (s, b, d) = tokio::join!(source, batch, sink_task);
    // Copies still running belong to this run: stop them and wait, so that none
    // uploads after the next attempt has cleaned up.
    copies.0.cancel();
    copies.1.close();
    copies.1.wait().await;
    let batch = b.unwrap_or_else(|e| Err(task(e)));
    let (summary, _, sunk) = d.map_err(|e| (task(e), Summary::default()))?;
    // The first real error wins; a stage that stopped because its neighbour did is Ok.
    if let Err(e) = sunk.and(batch) {
        return Err((e, summary));
    }
    match s.unwrap_or_else(|e| Err(task(e))) {
        Ok(()) => Ok(summary),
        Err(e) => Err((e, summary)),
    }
}
