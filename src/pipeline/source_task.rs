//! The source task: reads the replication stream, assembles whole transactions, hands
//! them downstream in chunks, confirms what the sink committed, and puts the copier's
//! events (a copy due, a copy's snapshot point) into the stream between transactions.
//! It never waits for a copy: a snapshot point that waits for an open transaction
//! delays nothing but that copy.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{EVENTS_PER_CHUNK, PipelineError, queue::EventSender};
use crate::change::{CopyStart, Event};
use crate::decode::Relation;
use crate::lsn::Lsn;
use crate::source::{Assembler, Replication, SourceError, Step, XLog};

/// Relations whose resolved column types are cached.
const RESOLVED_CACHE: usize = 4096;

/// How often `sync` asks the server where it is while waiting to reach its target.
const SYNC_POLL: Duration = Duration::from_millis(200);

/// Transaction boundaries between looks for a stop or a copy request while draining
/// what is already received (the loop's own `select!` looks each time it waits).
const BOUNDARIES_PER_CHECK: u32 = 64;

/// What the copier asks of the stream.
pub(super) enum CopyRequest {
    /// Copies of these tables are due: put `Event::CopyDue` into the stream, then answer
    /// true (false: the stream is stopping, take no point).
    Due {
        tables: Vec<String>,
        reply: oneshot::Sender<bool>,
    },
    /// A due copy's point is known: put `Event::CopyStart` into the stream.
    Start(Arc<CopyStart>),
    /// The copier has looked for due copies once (`sync` waits for that).
    Polled,
}

pub(super) struct SourceTask {
    pub repl: Replication,
    pub assembler: Assembler,
    /// Dropped when the stream stops: the batcher then hands over what it holds.
    pub events: Option<EventSender>,
    pub confirm: watch::Receiver<Lsn>,
    pub shutdown: CancellationToken,
    /// `sync`: stop once everything before this LSN is delivered.
    pub target: Option<Lsn>,
    pub status_interval: Duration,
    /// Silence from the server after which the connection counts as lost.
    pub receive_timeout: Duration,
    pub copy_requests: mpsc::Receiver<CopyRequest>,
    /// Copies due (in the stream) whose point is not in it yet: one when the stream
    /// starts with copies due.
    pub outstanding: usize,
    /// Cancelled when this task stops: the copier starts no copy after that.
    pub copier_stop: CancellationToken,
    pub types: TypeResolver,
    /// Commit time of the transaction whose events are being handed over (metrics).
    pub open_commit_ts: i64,
    /// Counter handles per (relation, operation): registered once, not per chunk, and
    /// again after a quarter of `telemetry::TABLE_SERIES_IDLE` (a handle held past its
    /// series' removal would count into nothing).
    pub counters: std::collections::HashMap<(u32, u8), metrics::Counter>,
    pub counters_since: std::time::Instant,
    pub transactions: metrics::Counter,
    pub spill: metrics::Gauge,
}

/// Relations as PostgreSQL sent them, and as resolved against the catalog (domains as
/// their base type, declared array dimensions; see `source::types`).
pub(super) struct TypeResolver {
    pub conn: crate::config::ConnParams,
    pub client: Option<tokio_postgres::Client>,
    pub resolved: std::collections::HashMap<u32, (Arc<Relation>, Arc<Relation>)>,
}

impl TypeResolver {
    async fn resolve(&mut self, rel: &Arc<Relation>) -> Result<Arc<Relation>, PipelineError> {
        if let Some((sent, resolved)) = self.resolved.get(&rel.id)
            && sent == rel
        {
            return Ok(resolved.clone());
        }
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(
                crate::source::sql::connect(&self.conn)
                    .await
                    .map_err(crate::snapshot::SnapshotError::from)?,
            );
        }
        let client = self.client.as_ref().expect("connected above");
        let resolved =
            crate::source::types::resolve(client, rel)
                .await
                .map_err(|source| crate::snapshot::SnapshotError::Sql {
                    what: format!("reading the column types of {}.{}", rel.namespace, rel.name),
                    source,
                })?;
        let resolved = Arc::new(resolved);
        // Tables dropped and created again leave entries behind: start over at a bound
        // (entries are read again on demand).
        if self.resolved.len() >= RESOLVED_CACHE {
            self.resolved.clear();
        }
        self.resolved.insert(rel.id, (rel.clone(), resolved.clone()));
        Ok(resolved)
    }
}

/// A catalog query bounded by `source.receive_timeout`: on a link that went silent it
/// fails (and the client is dropped) instead of hanging.
pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(SourceError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within source.receive_timeout ({limit:?}) while {what}"),
        ))
        .into()),
    }
}

/// The chunk being filled, with the bytes of the messages it was decoded from.
struct Out {
    events: Vec<Event>,
    bytes: usize,
}

impl Out {
    fn new() -> Out {
        Out {
            events: Vec::with_capacity(EVENTS_PER_CHUNK),
            bytes: 0,
        }
    }

    /// Full: hand it over before reading more.
    fn full(&self) -> bool {
        self.events.len() >= EVENTS_PER_CHUNK || self.bytes >= super::queue::CHUNK_BYTES
    }
}

pub(super) async fn source_task(mut t: SourceTask) -> Result<(), PipelineError> {
    let result = t.stream().await;
    drop(t.events.take());
    // The copier starts nothing once the stream stops (or failed). A copy it asks for
    // now, or asked for while the stream was ending, is refused at once (a reply
    // dropped unanswered is a no): it must not wait on a stream that reads no more
    // requests, and hold the sink open (and the stop) for ever.
    t.copier_stop.cancel();
    t.copy_requests.close();
    while t.copy_requests.try_recv().is_ok() {}
    result?;
    // The sink finishes once the copies under way have reported. Confirm whatever it
    // commits from what we handed over, then leave. PostgreSQL hears from us meanwhile,
    // however long that takes (a slow store, a busy catalog): a walsender that hears
    // nothing for wal_sender_timeout ends the connection, and the last confirmation with
    // it.
    let mut status = tokio::time::interval(t.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = t.confirm.changed() => {
                if changed.is_err() {
                    break;
                }
                let lsn = *t.confirm.borrow_and_update();
                t.repl.confirm(lsn, false).await?;
            }
            _ = status.tick() => {
                let lsn = *t.confirm.borrow();
                t.repl.confirm(lsn, false).await?;
            }
        }
    }
    let last = *t.confirm.borrow();
    t.repl.confirm(last, false).await?;
    let wire = t.repl.wire_stats();
    tracing::debug!(
        confirmed = %t.repl.confirmed(),
        reads = wire.reads,
        bytes_per_read = wire.bytes / wire.reads.max(1),
        status_updates = wire.status_updates,
        "replication stream closed"
    );
    t.repl.close().await;
    Ok(())
}

impl SourceTask {
    /// Reads until the stop point; the event channel is closed when this returns.
    async fn stream(&mut self) -> Result<(), PipelineError> {
        let mut out = Out::new();
        let mut position = Lsn::ZERO;
        let mut stopping = false;
        let mut outstanding = self.outstanding;
        let mut copier_polled = false;
        let mut copier_gone = false;
        let mut status = tokio::time::interval(if self.target.is_some() {
            SYNC_POLL
        } else {
            self.status_interval
        });
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Silence while waiting for PostgreSQL: reset whenever a message arrives or the
        // source stops waiting on it (a slow sink is not a silent server).
        let mut heard = tokio::time::Instant::now();
        let mut boundaries = 0u32;
        'read: loop {
            // `sync` stops at its target once the copier has looked for due copies and
            // every due copy's point is in the stream; a signal stops at once (a due
            // copy starts again at the next start).
            let at_target = self.target.is_some_and(|target| position >= target)
                && (copier_polled || copier_gone)
                && outstanding == 0;
            if (stopping || at_target || copier_gone) && !self.assembler.in_transaction() {
                tracing::debug!(%position, target = ?self.target.map(|l| l.to_string()), stopping, copier_gone, "source reached its stop point");
                break;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if !stopping => {
                    tracing::info!("shutdown requested; finishing the open transaction");
                    stopping = true;
                }
                changed = self.confirm.changed() => {
                    if changed.is_err() { return Ok(()); } // the sink stopped
                    let lsn = *self.confirm.borrow_and_update();
                    self.repl.confirm(lsn, false).await?;
                }
                _ = status.tick() => {
                    if heard.elapsed() > self.receive_timeout {
                        return Err(SourceError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "nothing received from PostgreSQL for {:?} (source.receive_timeout), although walshore asked for a reply every {:?}; the connection counts as lost",
                                heard.elapsed(),
                                self.status_interval
                            ),
                        ))
                        .into());
                    }
                    // Ask for a reply: a live server answers at once, so silence means a
                    // dead link even when nothing changes.
                    let lsn = *self.confirm.borrow();
                    self.repl.confirm(lsn, true).await?;
                }
                // Between transactions only: a copy's gate applies to whole transactions.
                request = self.copy_requests.recv(), if !self.assembler.in_transaction() && !copier_gone => {
                    match request {
                        None => copier_gone = true,
                        Some(CopyRequest::Polled) => copier_polled = true,
                        Some(CopyRequest::Due { tables, reply }) => {
                            let accepted = !stopping;
                            if accepted {
                                tracing::debug!(tables = ?tables, %position, "copies due");
                                out.events.push(Event::CopyDue { tables });
                                outstanding += 1;
                            }
                            let _ = reply.send(accepted);
                        }
                        Some(CopyRequest::Start(start)) => {
                            outstanding = outstanding.saturating_sub(1);
                            out.events.push(Event::CopyStart(start));
                        }
                    }
                    if !out.events.is_empty() && !self.send(&mut out, &mut status).await? {
                        return Ok(());
                    }
                }
                msg = self.repl.next() => {
                    let mut msg = Some(msg?);
                    // Drain what is already received before handing a chunk over.
                    while let Some(m) = msg.take() {
                        match m {
                            XLog::Data { wal_start, data } => {
                                tracing::trace!(%wal_start, kind = ?data.first().map(|b| *b as char), "xlogdata");
                                position = position.max(wal_start);
                                out.bytes += data.len();
                                if let Step::Replay { mut messages, end_lsn } = self.assembler.on_message(data, &mut out.events)? {
                                    while let Some(raw) = messages.next_message().map_err(SourceError::from)? {
                                        out.bytes += raw.len();
                                        self.assembler.replay(raw, &mut out.events)?;
                                        if out.full() && !self.send(&mut out, &mut status).await? {
                                            break 'read;
                                        }
                                    }
                                    out.events.push(Event::Commit { end_lsn });
                                }
                            }
                            XLog::Keepalive { wal_end, reply_requested } => {
                                tracing::trace!(%wal_end, reply_requested, "keepalive");
                                position = position.max(wal_end);
                                if !self.assembler.in_flight() {
                                    out.events.push(Event::Idle { lsn: wal_end });
                                }
                                if reply_requested {
                                    let lsn = *self.confirm.borrow();
                                    self.repl.confirm(lsn, false).await?;
                                }
                            }
                        }
                        if out.full() {
                            break;
                        }
                        // Between transactions, a copy request or a stop goes first: under
                        // a backlog the loop might otherwise seldom reach a boundary. Asked
                        // every few boundaries: the token's answer takes a lock, and a
                        // backlog of one-row transactions has a boundary every third
                        // message.
                        if !self.assembler.in_transaction() {
                            boundaries = boundaries.wrapping_add(1);
                            if boundaries.is_multiple_of(BOUNDARIES_PER_CHECK)
                                && (self.shutdown.is_cancelled() || !self.copy_requests.is_empty())
                            {
                                break;
                            }
                        }
                        msg = self.repl.try_next()?;
                    }
                    if !out.events.is_empty() && !self.send(&mut out, &mut status).await? {
                        break 'read;
                    }
                    heard = tokio::time::Instant::now();
                }
            }
        }
        if !out.events.is_empty() {
            self.send(&mut out, &mut status).await?;
        }
        Ok(())
    }

    /// Counts what a chunk carries: transactions received (and their commit times, for
    /// the lag), changes per table and operation.
    fn observe(&mut self, events: &[Event]) {
        use crate::change::Change;
        use crate::telemetry::names;
        // Names may change (a table renamed): start over at a bound, like the types,
        // and before an idle table's series can have been removed.
        if self.counters.len() >= RESOLVED_CACHE
            || self.counters_since.elapsed() > crate::telemetry::TABLE_SERIES_IDLE / 4
        {
            self.counters.clear();
            self.counters_since = std::time::Instant::now();
        }
        let resolved = &self.types.resolved;
        let counters = &mut self.counters;
        let mut add = |(rel_id, op): (u32, u8), n: u64| {
            counters
                .entry((rel_id, op))
                .or_insert_with(|| {
                    let table = resolved
                        .get(&rel_id)
                        .map_or_else(|| rel_id.to_string(), |(_, r)| format!("{}.{}", r.namespace, r.name));
                    metrics::counter!(names::CHANGES_RECEIVED, "table" => table, "op" => crate::telemetry::op_label(op))
                })
                .increment(n);
        };
        // Runs of one table and operation are counted first: a chunk is mostly a few
        // long runs.
        let mut run: Option<((u32, u8), u64)> = None;
        let mut count = |key: (u32, u8)| match &mut run {
            Some((k, n)) if *k == key => *n += 1,
            _ => {
                if let Some((k, n)) = run.replace((key, 1)) {
                    add(k, n);
                }
            }
        };
        let mut transactions = 0u64;
        // The chunk's newest transaction stands for all of it (one update per chunk).
        let mut newest = None;
        for event in events {
            match event {
                Event::Begin(info) => self.open_commit_ts = info.commit_ts,
                Event::Commit { end_lsn } => {
                    transactions += 1;
                    newest = Some((self.open_commit_ts, end_lsn.0));
                }
                Event::Change(change) => match change {
                    Change::Insert { rel_id, .. } => count((*rel_id, b'I')),
                    Change::Update { rel_id, .. } => count((*rel_id, b'U')),
                    Change::Delete { rel_id, .. } => count((*rel_id, b'D')),
                    Change::Truncate { rel_ids } => rel_ids.iter().for_each(|r| count((*r, b'T'))),
                    Change::SnapshotBinaryRows { .. } => {}
                },
                _ => {}
            }
        }
        if let Some((k, n)) = run {
            add(k, n);
        }
        if let Some((commit_ts, end)) = newest {
            crate::telemetry::STATE.received(commit_ts, end);
        }
        self.transactions.increment(transactions);
        self.spill.set(self.assembler.spill_bytes() as f64);
    }

    /// Hands a chunk downstream, waiting for room (backpressure, in bytes). While it
    /// waits, PostgreSQL keeps hearing from us, so a slow sink never trips
    /// wal_sender_timeout. Returns false when downstream is gone.
    async fn send(&mut self, out: &mut Out, status: &mut tokio::time::Interval) -> Result<bool, PipelineError> {
        let mut chunk = std::mem::replace(out, Out::new());
        for event in &mut chunk.events {
            if let Event::Relation(rel) = event {
                *rel = within(self.receive_timeout, "reading column types", self.types.resolve(rel)).await?;
            }
        }
        if crate::telemetry::enabled() {
            self.observe(&chunk.events);
        }
        let Some(events) = &self.events else { return Ok(false) };
        let _busy = crate::telemetry::STATE.busy("source");
        let send = events.send(chunk.events, chunk.bytes);
        let mut send = std::pin::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => return Ok(sent),
                _ = status.tick() => {
                    let lsn = *self.confirm.borrow();
                    self.repl.confirm(lsn, false).await?;
                }
            }
        }
    }
}
