//! Wiring: the source, batch and sink tasks, the bounded channels between them, the
//! shutdown order and the retry policy. No stage logic lives here.
//!
//! ```text
//!            copy due / copy point (between transactions)
//!   copier ─────────────────────────────┐
//!     │ copies ──────────────────────┐   ▼
//!     │                              │ source ──events──► batch ──files──► sink
//!     │                              │   ▲    (bytes)          (1 flush)   │  │
//!     │                              └───┼─────── copy results ───────────┘  │
//!     ◄──────────── copies published ────┼──────────────────────────────────┘
//!                                        └──── watch: confirmable LSN ◄─────┘
//! housekeeping: sweeps other writers' pending records, folds and prunes the log,
//!   compacts closed partitions (`run` with [compaction]) ──compactions──► sink
//! ```
//! The stream never waits for the copier: a copy is due in the stream first, and its
//! snapshot point follows in the stream when PostgreSQL has given it (see
//! `snapshot` and `handoff`). Shutdown (signal, or `sync` reaching its target): the
//! source stops at a transaction boundary and closes its channel; the batch task hands
//! over what it holds; the sink commits it (and, for `sync`, the copies under way) and
//! closes the watch; the source confirms the final LSN and disconnects. Every task of
//! an attempt, the copies' included, has ended before the next attempt starts.

mod batch_task;
mod copier;
mod handoff;
mod housekeeping;
mod queue;
mod sink_task;
mod source_task;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batcher, Gate};
use crate::change::{CopyStart, CopyTable};
use crate::checkpoint::record::Identity;
use crate::checkpoint::{Checkpoint, CheckpointError, Watermarks, read_head, read_schemas};
use crate::config::{Config, SnapshotMode};
use crate::decode::StreamBuffer;
use crate::lsn::Lsn;
use crate::retry::ErrorChain;
use crate::retry::Retry;
use crate::sink::{Sink, SinkError, StoreError, open_store};
use crate::snapshot::{CopyEnv, Point};
use crate::source::{Assembler, Replication, SourceError, quote_ident};

pub use sink_task::Summary;

/// Events per chunk from source to batcher (a chunk is also handed over at
/// `queue::CHUNK_BYTES` of messages): amortises channel overhead without holding much.
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

impl From<crate::decode::StreamError> for PipelineError {
    fn from(e: crate::decode::StreamError) -> PipelineError {
        PipelineError::Source(e.into())
    }
}

impl PipelineError {
    /// The part that failed, as the `stage` label of the error metrics.
    pub fn stage(&self) -> &'static str {
        match self {
            PipelineError::Source(_) => "source",
            PipelineError::Batch(_) => "batch",
            PipelineError::Sink(_) | PipelineError::Store(_) => "sink",
            PipelineError::Checkpoint(_) => "checkpoint",
            PipelineError::Snapshot(_) => "copy",
            PipelineError::Catalog(_) => "catalog",
            PipelineError::Task(_) => "pipeline",
        }
    }

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
        let outcome = run_once(cfg, mode, shutdown.clone(), &process).await;
        crate::telemetry::STATE.set_connected(false);
        match outcome {
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
                crate::telemetry::failed(e.stage(), e.retry());
                if e.retry() == Retry::Definite && !own_walsender {
                    return Err(e);
                }
                if shutdown.is_cancelled() {
                    return stopped_while_failing(mode, e, total);
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
                crate::telemetry::retried(e.stage());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return stopped_while_failing(mode, e, total),
                }
            }
        }
    }
}

/// A signal while an attempt failed for a transient reason (S3 or PostgreSQL out of
/// reach): `run` stops as asked, and exits 0 with a warning, since the changes it
/// could not commit are still in the slot and the next start writes them. `sync` did
/// not reach its target: that stays an error.
fn stopped_while_failing(mode: Mode, e: PipelineError, total: Summary) -> Result<Summary, PipelineError> {
    if mode == Mode::Sync {
        return Err(e);
    }
    tracing::warn!(error = %ErrorChain(&e), "stopped on a signal during a transient failure; what was not committed is still in the slot, and the next start writes it");
    Ok(total)
}

/// Whether `run_id` is an attempt of the process named `process`.
fn is_run_of(process: &str, run_id: &str) -> bool {
    run_id.strip_prefix(process).is_some_and(|rest| rest.starts_with('-'))
}

/// This process as a writer of the lake: every attempt's run id starts with its name,
/// and once an attempt has claimed the lake, a head written by anybody else means
/// another instance took over.
struct Process {
    name: String,
    claimed: std::sync::atomic::AtomicBool,
    /// The start-up catalog reconciliation succeeded once: later attempts (a lost
    /// connection, say) skip it, since every commit since registered its own partitions.
    reconciled: Arc<std::sync::atomic::AtomicBool>,
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

    /// A new attempt's run id and its writer tag (in data file names).
    fn run_id(&self) -> (String, String) {
        let tag = format!("{:012x}", rand::random::<u64>() >> 16);
        (format!("{}-{tag}", self.name), tag)
    }

    fn owns(&self, run_id: &str) -> bool {
        is_run_of(&self.name, run_id)
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
    let (run_id, writer) = process.run_id();
    let catalog = match &cfg.glue {
        Some(g) => Some(
            crate::catalog::Catalog::open(g, &cfg.sink, &cfg.partitions)
                .await
                .with_iceberg(cfg.iceberg.clone()),
        ),
        None => None,
    };
    let sink = Arc::new(Sink::new(store, &cfg.sink, &writer));

    // A new lake copies every published table under the slot's exported snapshot:
    // the copy connections import it before the stream starts (which ends it).
    let initial = match (slot.snapshot.clone(), export) {
        (Some(name), true) => Some(
            crate::snapshot::prepare(
                &cfg.source,
                Point::new(name, slot.confirmed_flush),
                cfg.snapshot_parallelism,
                cfg.snapshot_chunk_bytes,
                0,
                None,
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
    let owns: Arc<dyn Fn(&str) -> bool + Send + Sync> = {
        let name = process.name.clone();
        Arc::new(move |run: &str| is_run_of(&name, run))
    };
    let cleared = checkpoint
        .claim_and_recover(&run_id, true, owns.as_ref())
        .await
        .map_err(|e| fail(e.into()))?;
    process.claimed.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::notify::claimed();
    crate::telemetry::STATE.set_connected(true);
    tracing::info!(
        slot = %cfg.source.slot,
        publication = %cfg.source.publication,
        resume_lsn = %start.max(slot.confirmed_flush),
        committed_seq = checkpoint.head().seq,
        uncommitted_files_removed = cleared.files,
        server_version = repl.server_version,
        "replication started"
    );

    let result = stream(
        cfg,
        shutdown,
        process,
        Attempt {
            repl,
            checkpoint,
            sink: sink.clone(),
            run_id: run_id.clone(),
            catalog,
            initial,
            start,
            target: (mode == Mode::Sync).then_some(system.xlogpos),
            owns,
        },
    )
    .await;
    if let Err((PipelineError::Checkpoint(CheckpointError::Fenced { .. }), _)) = &result {
        // Nothing of this attempt can be committed any more, and its file names are its
        // own: take back what it announced, so no reader sees it.
        match crate::checkpoint::pending::withdraw(sink.store().as_ref(), &run_id).await {
            Ok(n) => tracing::info!(
                files = n,
                "fenced off: deleted the files this instance uploaded and could not commit"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "fenced off: cannot delete the files this instance uploaded; the running instance deletes them")
            }
        }
    }
    result
}

/// Runs a stage; if it fails, cancels `copies`.
async fn stop_copies_on_error(
    copies: CancellationToken,
    stage: impl std::future::Future<Output = Result<(), PipelineError>>,
) -> Result<(), PipelineError> {
    let r = stage.await;
    if r.is_err() {
        copies.cancel();
    }
    r
}

/// What an attempt has set up before its tasks start.
struct Attempt {
    repl: Replication,
    checkpoint: Checkpoint,
    sink: Arc<Sink>,
    run_id: String,
    catalog: Option<crate::catalog::Catalog>,
    initial: Option<crate::snapshot::Prepared>,
    start: Lsn,
    target: Option<Lsn>,
    owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// Starts the tasks of an attempt and waits for all of them.
async fn stream(
    cfg: &Config,
    shutdown: CancellationToken,
    process: &Process,
    a: Attempt,
) -> Result<Summary, (PipelineError, Summary)> {
    let fail = |e: PipelineError| (e, Summary::default());
    let Attempt {
        repl,
        checkpoint,
        sink,
        run_id,
        catalog,
        initial,
        start,
        target,
        owns,
    } = a;
    // Each table's changes are written from its snapshot point on; a table never copied
    // waits for its copy (snapshot.mode = "initial").
    let head = checkpoint.head().clone();
    let schemas = read_schemas(sink.store().as_ref()).await.map_err(|e| fail(e.into()))?;
    // Only committed files are left (recovery ran): whatever of them Glue lacks is
    // registered before anything new commits, by the sink task, while the stream runs
    // (the walsender hears from us however long the catalog takes).
    let flushing = crate::compaction::Flushing::default();
    let reconcile = (catalog.is_some() && !process.reconciled.load(std::sync::atomic::Ordering::SeqCst))
        .then(|| process.reconciled.clone());
    let mut gates: HashMap<String, Gate> = head
        .snapshots
        .iter()
        .map(|(t, l)| (t.clone(), Gate::From { lsn: *l, copy: None }))
        .collect();
    let mut handoff = handoff::Handoff::default();
    let mut running = std::collections::BTreeMap::new();
    let mut oids: HashMap<String, u32> = head.identities.iter().map(|(t, i)| (t.clone(), i.oid)).collect();
    if let Some(p) = &initial {
        // The first copy of a new lake (copy 0), at the slot's own point: known before
        // the stream starts, so its tables are gated from the first message.
        let first = CopyStart {
            id: 0,
            from: p.lsn(),
            tables: p
                .tables()
                .into_iter()
                .map(|(name, identity, relation)| CopyTable {
                    name,
                    identity,
                    relation,
                    requests: Vec::new(),
                })
                .collect(),
            dropped: Vec::new(),
        };
        for t in &first.tables {
            gates.insert(
                t.name.clone(),
                Gate::From {
                    lsn: first.from,
                    copy: Some(0),
                },
            );
            oids.insert(t.name.clone(), t.identity.oid);
            running.insert(t.name.clone(), 0);
        }
        handoff.started(&first);
    }
    let (copy_tx, copy_rx) = mpsc::channel(16);
    let tracker = tokio_util::task::TaskTracker::new();
    let env = CopyEnv {
        sink: sink.clone(),
        run_id: run_id.clone(),
        floor: head.seq + 1,
        buffer_bytes: (cfg.sink.max_buffer_bytes / cfg.snapshot_parallelism).max(1 << 20),
        shutdown: shutdown.child_token(),
        tracker: tracker.clone(),
        unrepresentable: cfg.sink.unrepresentable,
        partitions: Arc::new(cfg.partitions.clone()),
    };
    let copies_stop = env.shutdown.clone();

    let buffer = StreamBuffer::new(
        cfg.source.spill_dir.clone(),
        cfg.source.stream_memory_bytes,
        cfg.source.spill_max_bytes,
    );
    let assembler = Assembler::new(start, buffer);

    let (event_tx, event_rx) = queue::channel();
    let (sink_tx, sink_rx) = mpsc::channel(1);
    let (confirm_tx, confirm_rx) = watch::channel(Lsn::ZERO);
    let (requests_tx, requests_rx) = mpsc::channel(4);
    let (published_tx, published_rx) = mpsc::unbounded_channel();
    let (compactions_tx, compactions_rx) = mpsc::channel(1);
    let (marks_tx, marks_rx) = watch::channel(Watermarks {
        folded: head.folded,
        pruned: head.pruned,
    });
    let copier_stop = CancellationToken::new();
    let housekeeping_stop = CancellationToken::new();
    let initial_mode = cfg.snapshot == SnapshotMode::Initial;
    let mut copier = copier::Copier::new(copier::CopierInit {
        cfg: cfg.clone(),
        env: env.clone(),
        results: copy_tx.clone(),
        requests: requests_tx,
        published: published_rx,
        stop: copier_stop.clone(),
        identities: head.identities.clone(),
        copied: head.snapshots.keys().cloned().collect::<BTreeSet<_>>(),
        running,
        next_id: 1,
    });
    // Copies due now are due from the stream's first message on. The last step that
    // may fail before the tasks start: from the initial copy's spawn on, every task of
    // the attempt is waited for on every path.
    let due_now = copier.due_at_start().await.map_err(fail)?;
    let outstanding = usize::from(!due_now.is_empty());
    for t in due_now {
        gates.insert(t, Gate::Due);
    }
    // A table that left while walshore was stopped is recorded as gone once the stream
    // has passed its departure: `sync` streams that far.
    let target = target.map(|t| t.max(copier.departures_before().unwrap_or(Lsn::ZERO)));
    if let Some(p) = initial {
        p.spawn(&env, copy_tx);
    } else {
        drop(copy_tx);
    }
    drop(env);
    // A stage that fails stops the copies at once: the attempt is over, and a copy of an
    // hour must not hold the retry (or the error) back.
    let batch = tokio::spawn(stop_copies_on_error(
        copies_stop.clone(),
        batch_task::batch_task(
            event_rx,
            sink_tx,
            cfg.sink.flush_interval,
            cfg.sink.max_buffer_bytes,
            Batcher::with_gates(gates, initial_mode)
                .with_oids(oids, !initial_mode)
                .with_lake_schemas(schemas.clone())
                .with_unrepresentable(cfg.sink.unrepresentable)
                .with_partitions(Arc::new(cfg.partitions.clone())),
        ),
    ));
    let housekeeping = tokio::spawn(
        housekeeping::Housekeeping {
            store: sink.store().clone(),
            run_id: run_id.clone(),
            claim_seq: head.seq,
            owns,
            interval: cfg.snapshot_poll_interval,
            retention: cfg.sink.log_retention,
            marks: marks_tx,
            stop: housekeeping_stop.clone(),
            // `run` only: a `sync` ends before a compaction would be committed.
            compacting: cfg
                .compaction
                .clone()
                .filter(|_| target.is_none())
                .map(|c| housekeeping::Compacting {
                    cfg: c,
                    sink: sink.clone(),
                    partitions: Arc::new(cfg.partitions.clone()),
                    commits: compactions_tx,
                    iceberg: cfg.iceberg.clone().map(|i| (i, cfg.sink.url.to_string())),
                    glue: cfg.glue.clone().map(|g| (g, cfg.sink.clone())),
                    spill: cfg.source.spill_dir.join("compaction"),
                    reconciled: reconcile.clone(),
                    flushing: flushing.clone(),
                }),
        }
        .run(),
    );
    let sink_task = tokio::spawn(sink_task::sink_task(sink_task::SinkTask {
        sink: sink.clone(),
        checkpoint,
        run_id,
        input: sink_rx,
        copies: copy_rx,
        compactions: compactions_rx,
        confirm: confirm_tx,
        handoff,
        schemas,
        catalog,
        shutdown: shutdown.clone(),
        published: published_tx,
        marks: marks_rx,
        partitions: Arc::new(cfg.partitions.clone()),
        unrepresentable: cfg.sink.unrepresentable,
        reconcile,
        flushing,
    }));
    let copier = tokio::spawn(copier.run());
    let source = tokio::spawn(stop_copies_on_error(
        copies_stop.clone(),
        source_task::source_task(source_task::SourceTask {
            repl,
            assembler,
            events: Some(event_tx),
            confirm: confirm_rx,
            shutdown,
            target,
            status_interval: cfg.source.status_interval,
            receive_timeout: cfg.source.receive_timeout,
            copy_requests: requests_rx,
            outstanding,
            copier_stop,
            types: source_task::TypeResolver {
                conn: cfg.source.conn.clone(),
                client: None,
                resolved: HashMap::new(),
            },
            open_commit_ts: 0,
            counters: HashMap::new(),
            counters_since: Instant::now(),
            transactions: metrics::counter!(crate::telemetry::names::TRANSACTIONS_RECEIVED),
            spill: metrics::gauge!(crate::telemetry::names::SPILL_BYTES),
        }),
    ));
    let task = |e: tokio::task::JoinError| PipelineError::Task(e.to_string());
    let (s, b, d, c) = tokio::join!(source, batch, sink_task, copier);
    // Copies still running belong to this run: stop them and wait, so that none
    // uploads after the next attempt has cleaned up.
    copies_stop.cancel();
    tracker.close();
    tracker.wait().await;
    housekeeping_stop.cancel();
    let kept = housekeeping.await;
    let batch = b.unwrap_or_else(|e| Err(task(e)));
    let copier = c.unwrap_or_else(|e| Err(task(e)));
    let (summary, _, sunk) = d.map_err(|e| (task(e), Summary::default()))?;
    // The first real error wins; a stage that stopped because its neighbour did is Ok.
    if let Err(e) = sunk.and(batch).and(copier) {
        return Err((e, summary));
    }
    if let Err(e) = s.unwrap_or_else(|e| Err(task(e))) {
        return Err((e, summary));
    }
    if let Err(e) = kept {
        tracing::warn!(error = %e, "log housekeeping ended abnormally");
    }
    Ok(summary)
}
