//! The three long-lived tasks. Each ends when its input closes or its output is gone;
//! only a task's own failure is returned as an error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{EVENTS_PER_CHUNK, PipelineError};
use crate::batch::{Batcher, Taken};
use crate::change::Event;
use crate::checkpoint::Checkpoint;
use crate::lsn::Lsn;
use crate::sink::{Sink, WrittenObject};
use crate::source::{Assembler, Replication, Step, XLog};

/// Uploads in flight at once for one flush.
const UPLOAD_CONCURRENCY: usize = 4;

/// What a run wrote.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub commits: u64,
    pub files: u64,
    pub bytes: u64,
    pub end_lsn: Lsn,
    /// Rows per `schema.table`.
    pub rows: BTreeMap<String, u64>,
}

impl Summary {
    pub(super) fn absorb(&mut self, other: Summary) {
        self.commits += other.commits;
        self.files += other.files;
        self.bytes += other.bytes;
        self.end_lsn = self.end_lsn.max(other.end_lsn);
        for (t, n) in other.rows {
            *self.rows.entry(t).or_default() += n;
        }
    }
}

pub(super) struct SourceTask {
    pub repl: Replication,
    pub assembler: Assembler,
    pub events: mpsc::Sender<Vec<Event>>,
    pub confirm: watch::Receiver<Lsn>,
    pub shutdown: CancellationToken,
    /// `sync`: stop once everything before this LSN is delivered.
    pub target: Option<Lsn>,
    pub status_interval: Duration,
}

/// How often `sync` asks the server where it is while waiting to reach its target.
const SYNC_POLL: Duration = Duration::from_millis(200);

pub(super) async fn source_task(mut t: SourceTask) -> Result<(), PipelineError> {
    let mut out: Vec<Event> = Vec::with_capacity(EVENTS_PER_CHUNK);
    let mut position = Lsn::ZERO;
    let mut stopping = false;
    let mut status = tokio::time::interval(if t.target.is_some() {
        SYNC_POLL
    } else {
        t.status_interval
    });
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut downstream_gone = false;
    'read: loop {
        if (stopping || t.target.is_some_and(|target| position >= target)) && !t.assembler.in_transaction() {
            tracing::debug!(%position, target = ?t.target.map(|l| l.to_string()), stopping, "source reached its stop point");
            break;
        }
        tokio::select! {
            biased;
            _ = t.shutdown.cancelled(), if !stopping => {
                tracing::info!("shutdown requested; finishing the open transaction");
                stopping = true;
            }
            changed = t.confirm.changed() => {
                if changed.is_err() { break 'read; } // the sink stopped
                let lsn = *t.confirm.borrow_and_update();
                t.repl.confirm(lsn, false).await?;
            }
            _ = status.tick() => {
                let lsn = *t.confirm.borrow();
                t.repl.confirm(lsn, t.target.is_some()).await?;
            }
            msg = t.repl.next() => {
                let mut msg = Some(msg?);
                // Drain what is already received before handing a chunk over.
                while let Some(m) = msg.take() {
                    match m {
                        XLog::Data { wal_start, data } => {
                            tracing::trace!(%wal_start, kind = ?data.first().map(|b| *b as char), "xlogdata");
                            position = position.max(wal_start);
                            if let Step::Replay { mut messages, end_lsn } = t.assembler.on_message(data, &mut out)? {
                                while let Some(raw) = messages.next_message().map_err(crate::source::SourceError::from)? {
                                    t.assembler.replay(raw, &mut out)?;
                                    if out.len() >= EVENTS_PER_CHUNK && !t.send(&mut out, &mut status).await? {
                                        downstream_gone = true;
                                        break 'read;
                                    }
                                }
                                out.push(Event::Commit { end_lsn });
                            }
                        }
                        XLog::Keepalive { wal_end, reply_requested } => {
                            tracing::trace!(%wal_end, reply_requested, "keepalive");
                            position = position.max(wal_end);
                            if !t.assembler.in_flight() {
                                out.push(Event::Idle { lsn: wal_end });
                            }
                            if reply_requested {
                                let lsn = *t.confirm.borrow();
                                t.repl.confirm(lsn, false).await?;
                            }
                        }
                    }
                    if out.len() >= EVENTS_PER_CHUNK {
                        break;
                    }
                    msg = t.repl.try_next()?;
                }
                if !out.is_empty() && !t.send(&mut out, &mut status).await? {
                    downstream_gone = true;
                    break 'read;
                }
            }
        }
    }
    if !out.is_empty() && !downstream_gone {
        t.send(&mut out, &mut status).await?;
    }
    drop(t.events);
    // Confirm whatever the sink commits from what we handed over, then leave.
    while t.confirm.changed().await.is_ok() {
        let lsn = *t.confirm.borrow_and_update();
        t.repl.confirm(lsn, false).await?;
    }
    let last = *t.confirm.borrow();
    t.repl.confirm(last, false).await?;
    tracing::debug!(confirmed = %t.repl.confirmed(), "replication stream closed");
    t.repl.close().await;
    Ok(())
}

impl SourceTask {
    /// Hands a chunk downstream, waiting for room (backpressure). While it waits,
    /// PostgreSQL keeps hearing from us, so a slow sink never trips wal_sender_timeout.
    /// Returns false when downstream is gone.
    async fn send(&mut self, out: &mut Vec<Event>, status: &mut tokio::time::Interval) -> Result<bool, PipelineError> {
        let chunk = std::mem::replace(out, Vec::with_capacity(EVENTS_PER_CHUNK));
        loop {
            tokio::select! {
                permit = self.events.reserve() => {
                    let Ok(permit) = permit else { return Ok(false) };
                    permit.send(chunk);
                    return Ok(true);
                }
                _ = status.tick() => {
                    let lsn = *self.confirm.borrow();
                    self.repl.confirm(lsn, false).await?;
                }
            }
        }
    }
}

pub(super) enum SinkMsg {
    Flush(Taken),
    /// Nothing is buffered or in flight up to this LSN.
    Idle(Lsn),
}

pub(super) async fn batch_task(
    mut events: mpsc::Receiver<Vec<Event>>,
    sink: mpsc::Sender<SinkMsg>,
    flush_interval: Duration,
    max_bytes: usize,
) -> Result<(), PipelineError> {
    let mut batcher = Batcher::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = events.recv() => {
                let Some(chunk) = chunk else { break };
                for event in chunk {
                    if let Event::Idle { lsn } = event {
                        if !batcher.has_data() && sink.send(SinkMsg::Idle(lsn)).await.is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                    let commit = matches!(event, Event::Commit { .. });
                    batcher.push(event)?;
                    if deadline.is_none() && batcher.has_data() {
                        deadline = Some(Instant::now() + flush_interval);
                    }
                    // Bounded memory: hand over at the limit, inside a transaction too.
                    if batcher.buffered_bytes() >= max_bytes || (commit && deadline.is_some_and(|d| Instant::now() >= d)) {
                        if sink.send(SinkMsg::Flush(batcher.take())).await.is_err() {
                            return Ok(());
                        }
                        if !batcher.in_transaction() {
                            deadline = None;
                        }
                    }
                }
            }
            _ = sleep => {
                if batcher.in_transaction() {
                    // Flushed at this transaction's commit: files never end mid-way
                    // for want of time, only for want of memory.
                    deadline = Some(Instant::now() + Duration::from_millis(50));
                    continue;
                }
                deadline = None;
                if batcher.has_data() && sink.send(SinkMsg::Flush(batcher.take())).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    // Input closed: the source stopped at a transaction boundary (or failed, in which
    // case an open transaction is dropped here and streamed again after the restart).
    if batcher.has_data() && !batcher.in_transaction() {
        let _ = sink.send(SinkMsg::Flush(batcher.take())).await;
    }
    Ok(())
}

pub(super) async fn sink_task(
    sink: Arc<Sink>,
    mut checkpoint: Checkpoint,
    run_id: String,
    mut input: mpsc::Receiver<SinkMsg>,
    confirm: watch::Sender<Lsn>,
) -> (Summary, Checkpoint, Result<(), PipelineError>) {
    let mut summary = Summary::default();
    let mut uncommitted: Vec<WrittenObject> = Vec::new();
    let result = async {
        confirm.send_replace(checkpoint.position());
        while let Some(msg) = input.recv().await {
            let taken = match msg {
                SinkMsg::Idle(lsn) => {
                    if uncommitted.is_empty() {
                        confirm.send_if_modified(|c| if lsn > *c { *c = lsn; true } else { false });
                    }
                    continue;
                }
                SinkMsg::Flush(t) => t,
            };
            if !taken.files.is_empty() {
                let props = sink.props().clone();
                let files = taken.files;
                let encoded = tokio::task::spawn_blocking(move || {
                    files.iter().map(|f| Sink::encode(&props, f)).collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| PipelineError::Task(e.to_string()))??;
                checkpoint.announce(&run_id, encoded.iter().map(|e| e.object.key.clone()).collect()).await?;
                let mut uploads = futures::stream::iter(encoded.into_iter().map(|e| sink.write(e))).buffered(UPLOAD_CONCURRENCY);
                while let Some(written) = uploads.next().await {
                    uncommitted.push(written?);
                    crate::fault::point("after_upload");
                }
            }
            let Some(end_lsn) = taken.end_lsn else { continue };
            if uncommitted.is_empty() {
                // Nothing to publish: the transactions touched no published rows.
                confirm.send_if_modified(|c| if end_lsn > *c { *c = end_lsn; true } else { false });
                continue;
            }
            let files = std::mem::take(&mut uncommitted);
            let (n_files, rows, bytes) = (files.len(), files.iter().map(|f| f.rows).sum::<u64>(), files.iter().map(|f| f.bytes).sum::<u64>());
            for f in &files {
                *summary.rows.entry(f.table.clone()).or_default() += f.rows;
            }
            let record = checkpoint.commit_files(&run_id, end_lsn, taken.commit_ts, files).await?;
            // Lag: from the source commit of the newest transaction to durable in the lake.
            let lag_ms = record.commit_ts.map(|ts| (record.written_at - ts) / 1000);
            tracing::info!(seq = record.seq, end_lsn = %record.end_lsn, files = n_files, rows, bytes, lag_ms, "committed");
            summary.commits += 1;
            summary.files += n_files as u64;
            summary.bytes += bytes;
            summary.end_lsn = record.end_lsn;
            crate::fault::point("after_commit_before_confirm");
            confirm.send_replace(record.end_lsn);
        }
        Ok(())
    }
    .await;
    (summary, checkpoint, result)
}
