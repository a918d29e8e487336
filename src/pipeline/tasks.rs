//! The three long-lived tasks. Each ends when its input closes or its output is gone;
//! only a task's own failure is returned as an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{EVENTS_PER_CHUNK, PipelineError};
use crate::batch::schema::LakeSchema;
use crate::batch::{BatchError, Batcher, Taken};
use crate::change::Event;
use crate::checkpoint::{Checkpoint, announce_copy, write_schema};
use crate::config::Config;
use crate::decode::Relation;
use crate::lsn::Lsn;
use crate::sink::{Sink, WrittenObject};
use crate::snapshot::{self, CopyEnv, Point, Selection, SnapshotError, TableCopied};
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
    /// Silence from the server after which the connection counts as lost.
    pub receive_timeout: Duration,
    pub copier: Copier,
}

/// Finds tables to copy while the stream runs (added to the publication, asked for by
/// `walshore resnapshot`) and starts their copies.
pub(super) struct Copier {
    pub cfg: Config,
    pub env: CopyEnv,
    pub results: mpsc::Sender<Result<TableCopied, SnapshotError>>,
    /// Tables whose copy runs; the sink removes them once committed.
    pub in_flight: Arc<Mutex<BTreeSet<String>>>,
    /// Tables copied (committed, or running in this run).
    pub copied: BTreeSet<String>,
    /// Tables with rows in the lake: a copy of one starts with a `T` row.
    pub in_lake: BTreeSet<String>,
    pub client: Option<tokio_postgres::Client>,
    pub polled: bool,
    /// Relations as PostgreSQL sent them and as resolved against the catalog.
    pub resolved: HashMap<u32, (Arc<Relation>, Arc<Relation>)>,
}

impl Copier {
    async fn client(&mut self) -> Result<&tokio_postgres::Client, PipelineError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(
                crate::source::sql::connect(&self.cfg.source.conn)
                    .await
                    .map_err(SnapshotError::from)?,
            );
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// `rel` with what the catalog adds (see `source::types`), cached per version.
    async fn resolve(&mut self, rel: &Arc<Relation>) -> Result<Arc<Relation>, PipelineError> {
        if let Some((sent, resolved)) = self.resolved.get(&rel.id)
            && sent == rel
        {
            return Ok(resolved.clone());
        }
        let resolved = crate::source::types::resolve(self.client().await?, rel)
            .await
            .map_err(|source| SnapshotError::Sql {
                what: format!("reading the column types of {}.{}", rel.namespace, rel.name),
                source,
            })?;
        let resolved = Arc::new(resolved);
        self.resolved.insert(rel.id, (rel.clone(), resolved.clone()));
        Ok(resolved)
    }

    /// Tables due for a copy, and which of them start with a `T` row.
    async fn due(&mut self) -> Result<(BTreeSet<String>, BTreeSet<String>), PipelineError> {
        let sql_err = |source| SnapshotError::Sql {
            what: "listing the publication's tables".into(),
            source,
        };
        let publication = self.cfg.source.publication.clone();
        let client = self.client().await?;
        let published: BTreeSet<String> = client
            .query(
                "SELECT schemaname::text || '.' || tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(sql_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let store = self.env.sink.store().clone();
        let requested =
            snapshot::requested(store.as_ref())
                .await
                .map_err(|source| crate::checkpoint::CheckpointError::Store {
                    key: "_walshore/requests".into(),
                    source,
                })?;
        let in_flight = self.in_flight.lock().expect("in-flight lock").clone();
        let mut tables = BTreeSet::new();
        if self.cfg.snapshot == crate::config::SnapshotMode::Initial {
            tables.extend(
                published
                    .iter()
                    .filter(|t| !self.copied.contains(*t) && !in_flight.contains(*t))
                    .cloned(),
            );
        }
        let mut reset: BTreeSet<String> = tables.intersection(&self.in_lake).cloned().collect();
        for t in requested {
            if in_flight.contains(&t) {
                continue;
            }
            if !published.contains(&t) {
                tracing::warn!(table = %t, publication = %self.cfg.source.publication, "resnapshot request for a table outside the publication; ignored and removed");
                self.env.sink.store().delete(&snapshot::request_key(&t)).await.ok();
                continue;
            }
            tables.insert(t.clone());
            reset.insert(t);
        }
        self.polled = true;
        Ok((tables, reset))
    }

    /// Takes a snapshot point from a temporary slot, imports it and starts the copy.
    /// Returns the tables being copied and their point.
    async fn start(
        &mut self,
        tables: BTreeSet<String>,
        reset: BTreeSet<String>,
    ) -> Result<(Vec<String>, Lsn), PipelineError> {
        let (exporter, name, lsn) = Replication::export_temporary(&self.cfg.source).await?;
        crate::fault::point("after_snapshot_point");
        let prepared = snapshot::prepare(
            &self.cfg.source,
            Point::new(name, lsn),
            self.cfg.snapshot_parallelism,
            self.cfg.snapshot_chunk_bytes,
            Selection {
                only: Some(&tables),
                reset: &reset,
            },
        )
        .await;
        // Imported (or failed): the temporary slot has served its purpose.
        exporter.close().await;
        let prepared = prepared?;
        let names = prepared.tables();
        if !names.is_empty() {
            self.in_flight
                .lock()
                .expect("in-flight lock")
                .extend(names.iter().cloned());
            self.copied.extend(names.iter().cloned());
            tracing::info!(tables = ?names, snapshot_point = %lsn, "copying tables beside the stream");
            prepared.spawn(&self.env, self.results.clone());
        }
        Ok((names, lsn))
    }
}

/// A catalog query on the copier's connection, bounded by `source.receive_timeout`:
/// on a link that went silent it fails (and the client is dropped) instead of hanging.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(crate::source::SourceError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within source.receive_timeout ({limit:?}) while {what}"),
        ))
        .into()),
    }
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
    // Copies due at start (requests, tables never copied) gate their tables before
    // the first message is read; an interval's first tick may come after it.
    if let Some(event) = t.copy_due(&mut status).await? {
        out.push(event);
    }
    let period = t.copier.cfg.snapshot_poll_interval;
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut downstream_gone = false;
    // Silence while waiting for PostgreSQL: reset whenever a message arrives or the
    // source stops waiting on it (a slow sink is not a silent server).
    let mut heard = tokio::time::Instant::now();
    'read: loop {
        if (stopping || (t.copier.polled && t.target.is_some_and(|target| position >= target)))
            && !t.assembler.in_transaction()
        {
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
                if heard.elapsed() > t.receive_timeout {
                    return Err(crate::source::SourceError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "nothing received from PostgreSQL for {:?} (source.receive_timeout), although walshore asked for a reply every {:?}; the connection counts as lost",
                            heard.elapsed(),
                            t.status_interval
                        ),
                    ))
                    .into());
                }
                // Ask for a reply: a live server answers at once, so silence means a
                // dead link even when nothing changes.
                let lsn = *t.confirm.borrow();
                t.repl.confirm(lsn, true).await?;
            }
            // Between transactions only: a copy's gate applies to whole transactions.
            _ = poll.tick(), if !t.assembler.in_transaction() && !stopping => {
                if let Some(event) = t.copy_due(&mut status).await? {
                    out.push(event);
                }
                heard = tokio::time::Instant::now();
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
                heard = tokio::time::Instant::now();
            }
        }
    }
    if !out.is_empty() && !downstream_gone {
        t.send(&mut out, &mut status).await?;
    }
    drop(t.events);
    // The sink finishes once the copies under way have reported.
    drop(t.copier.results);
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
    /// Starts the copies that are due; returns the event that gates their tables.
    /// PostgreSQL keeps hearing from us while the temporary slot waits for a consistent
    /// point (it waits for running transactions to end).
    async fn copy_due(&mut self, status: &mut tokio::time::Interval) -> Result<Option<Event>, PipelineError> {
        let (tables, reset) = within(self.receive_timeout, "listing the publication", self.copier.due()).await?;
        if tables.is_empty() {
            return Ok(None);
        }
        let started = self.copier.start(tables, reset);
        let mut started = std::pin::pin!(started);
        let (tables, from) = loop {
            tokio::select! {
                r = &mut started => break r?,
                _ = status.tick() => {
                    let lsn = *self.confirm.borrow();
                    self.repl.confirm(lsn, false).await?;
                }
            }
        };
        Ok((!tables.is_empty()).then_some(Event::CopyStart { tables, from }))
    }

    /// Hands a chunk downstream, waiting for room (backpressure). While it waits,
    /// PostgreSQL keeps hearing from us, so a slow sink never trips wal_sender_timeout.
    /// Returns false when downstream is gone.
    async fn send(&mut self, out: &mut Vec<Event>, status: &mut tokio::time::Interval) -> Result<bool, PipelineError> {
        let mut chunk = std::mem::replace(out, Vec::with_capacity(EVENTS_PER_CHUNK));
        for event in &mut chunk {
            if let Event::Relation(rel) = event {
                *rel = within(self.receive_timeout, "reading column types", self.copier.resolve(rel)).await?;
            }
        }
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
    /// Copies of these tables started: hold their files back until each is committed.
    Withhold(Vec<String>),
}

pub(super) async fn batch_task(
    mut events: mpsc::Receiver<Vec<Event>>,
    sink: mpsc::Sender<SinkMsg>,
    flush_interval: Duration,
    max_bytes: usize,
    mut batcher: Batcher,
) -> Result<(), PipelineError> {
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
                    if let Event::CopyStart { tables, .. } = &event
                        && sink.send(SinkMsg::Withhold(tables.clone())).await.is_err()
                    {
                        return Ok(());
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

/// Moves the confirmable LSN forward (never back).
fn advance(confirm: &watch::Sender<Lsn>, lsn: Lsn) {
    confirm.send_if_modified(|c| {
        let forward = lsn > *c;
        if forward {
            *c = lsn;
        }
        forward
    });
}

fn retype(table: &str, e: crate::batch::schema::Incompatible, lsn: Lsn) -> PipelineError {
    BatchError::Retype {
        table: table.to_owned(),
        column: e.column,
        from: e.from,
        to: e.to,
        lsn,
    }
    .into()
}

/// The sink task: encodes and uploads the batcher's files, commits them at transaction
/// boundaries, and commits finished table copies with the stream's files of those
/// tables that it held back since their snapshot points.
pub(super) struct SinkTask {
    pub sink: Arc<Sink>,
    pub checkpoint: Checkpoint,
    pub run_id: String,
    pub input: mpsc::Receiver<SinkMsg>,
    pub copies: mpsc::Receiver<Result<TableCopied, SnapshotError>>,
    pub confirm: watch::Sender<Lsn>,
    /// Tables whose copy runs: their files wait here, with the pending records that
    /// announce them, until the copy commits.
    pub withheld: HashMap<String, (Vec<WrittenObject>, Vec<object_store::path::Path>)>,
    pub in_flight: Arc<Mutex<BTreeSet<String>>>,
    /// The lake schema of each table, as recorded under `_walshore/schemas/`.
    pub schemas: HashMap<String, LakeSchema>,
    /// `catalog.kind = "glue"`.
    pub catalog: Option<crate::catalog::Catalog>,
    /// Ends a wait for a busy Glue (the commit is then not made; nothing is lost).
    pub shutdown: CancellationToken,
}

struct SinkState {
    summary: Summary,
    /// Uploaded, not yet committed: the open transactions' files.
    uncommitted: Vec<WrittenObject>,
    /// Copies uploaded, waiting for a transaction boundary.
    ready: Vec<TableCopied>,
}

pub(super) async fn sink_task(mut t: SinkTask) -> (Summary, Checkpoint, Result<(), PipelineError>) {
    let mut st = SinkState {
        summary: Summary::default(),
        uncommitted: Vec::new(),
        ready: Vec::new(),
    };
    let result = t.run(&mut st).await;
    (st.summary, t.checkpoint, result)
}

impl SinkTask {
    async fn run(&mut self, st: &mut SinkState) -> Result<(), PipelineError> {
        self.confirm.send_replace(self.checkpoint.position());
        let (mut input_open, mut copies_open) = (true, true);
        loop {
            tokio::select! {
                msg = self.input.recv(), if input_open => match msg {
                    None => {
                        input_open = false;
                        // The source stopped at a boundary (or failed, and the open
                        // transaction is streamed again): copies commit on their own now.
                        self.commit(st, None).await?;
                    }
                    Some(msg) => self.on_msg(st, msg).await?,
                },
                copied = self.copies.recv(), if copies_open => match copied {
                    None => copies_open = false,
                    // Shutdown: the copy starts again at the next start.
                    Some(Err(SnapshotError::Interrupted)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(c)) => {
                        st.ready.push(c);
                        if st.uncommitted.is_empty() || !input_open {
                            self.commit(st, None).await?;
                        }
                    }
                },
                else => break,
            }
        }
        Ok(())
    }

    async fn on_msg(&mut self, st: &mut SinkState, msg: SinkMsg) -> Result<(), PipelineError> {
        let taken = match msg {
            SinkMsg::Idle(lsn) => {
                if st.uncommitted.is_empty() {
                    advance(&self.confirm, lsn);
                }
                return Ok(());
            }
            SinkMsg::Withhold(tables) => {
                for table in tables {
                    self.withheld.entry(table).or_default();
                }
                return Ok(());
            }
            SinkMsg::Flush(t) => t,
        };
        // The schema first: a committed file is always covered by its table's schema.
        for (table, schema) in &taken.schemas {
            let recorded = self.schemas.get(table).cloned().unwrap_or_default();
            let merged = recorded.merge_schema(schema).map_err(|e| retype(table, e, Lsn::ZERO))?;
            if let Some(next) = merged {
                write_schema(self.sink.store().as_ref(), table, &next).await?;
                crate::fault::point("after_schema_record");
                self.schemas.insert(table.clone(), next);
            }
        }
        if !taken.files.is_empty() {
            let encoded = self.sink.encode_all(taken.files).await?;
            self.checkpoint
                .announce(&self.run_id, encoded.iter().map(|e| e.object.key.clone()).collect())
                .await?;
            let mut uploads =
                futures::stream::iter(encoded.into_iter().map(|e| self.sink.write(e))).buffered(UPLOAD_CONCURRENCY);
            while let Some(written) = uploads.next().await {
                st.uncommitted.push(written?);
                crate::fault::point("after_upload");
            }
        }
        match taken.end_lsn {
            Some(end_lsn) => self.commit(st, Some((end_lsn, taken.commit_ts))).await,
            None => Ok(()),
        }
    }

    /// Commits at a transaction boundary (`boundary`: the end of the last transaction
    /// handed over, and its commit time), or with only the ready copies (None).
    async fn commit(&mut self, st: &mut SinkState, boundary: Option<(Lsn, Option<i64>)>) -> Result<(), PipelineError> {
        let mut files = Vec::new();
        if boundary.is_some() {
            let mut held: HashMap<String, Vec<WrittenObject>> = HashMap::new();
            for f in std::mem::take(&mut st.uncommitted) {
                if self.withheld.contains_key(&f.table) {
                    held.entry(f.table.clone()).or_default().push(f);
                } else {
                    files.push(f);
                }
            }
            // Held files outlive this commit's pending records: announce them again, so
            // that a crash before their copy commits still deletes them.
            for (table, held) in held {
                let floor = self.checkpoint.head().seq + 1;
                let keys = held.iter().map(|f| f.key.clone()).collect();
                let pending = announce_copy(self.sink.store().as_ref(), floor, &self.run_id, keys).await?;
                let w = self.withheld.get_mut(&table).expect("withheld table");
                w.0.extend(held);
                w.1.push(pending);
            }
        }
        let mut copied = Vec::new();
        let mut cleanup = Vec::new();
        for c in &st.ready {
            let recorded = self.schemas.get(&c.table).cloned().unwrap_or_default();
            if let Some(next) = recorded.merge(&c.relation).map_err(|e| retype(&c.table, e, c.lsn))? {
                write_schema(self.sink.store().as_ref(), &c.table, &next).await?;
                self.schemas.insert(c.table.clone(), next);
            }
        }
        for c in std::mem::take(&mut st.ready) {
            let (held, pending) = self.withheld.remove(&c.table).unwrap_or_default();
            files.extend(held);
            files.extend(c.files);
            cleanup.extend(pending);
            cleanup.extend(c.pending);
            if c.reset {
                cleanup.push(snapshot::request_key(&c.table));
            }
            copied.push((c.table, c.lsn));
        }
        let (end_lsn, commit_ts) = boundary.unwrap_or((Lsn::ZERO, None));
        if files.is_empty() && copied.is_empty() {
            // Nothing to publish: the transactions touched no published rows.
            if boundary.is_some() {
                advance(&self.confirm, end_lsn);
            }
            return Ok(());
        }
        let (n_files, rows, bytes) = (
            files.len(),
            files.iter().map(|f| f.rows).sum::<u64>(),
            files.iter().map(|f| f.bytes).sum::<u64>(),
        );
        for f in &files {
            *st.summary.rows.entry(f.table.clone()).or_default() += f.rows;
        }
        // Tables and partitions are in the catalog before the record that publishes
        // them: a committed partition is always registered.
        if let Some(catalog) = &mut self.catalog {
            catalog.register(&files, &self.schemas, &self.shutdown).await?;
            crate::fault::point("after_catalog_registration");
        }
        let record = self
            .checkpoint
            .commit_files(&self.run_id, end_lsn, commit_ts, files, &copied)
            .await?;
        // Lag: from the source commit of the newest transaction to durable in the lake.
        let lag_ms = record.commit_ts.map(|ts| (record.written_at - ts) / 1000);
        let tables_copied: Vec<&str> = copied.iter().map(|(t, _)| t.as_str()).collect();
        tracing::info!(seq = record.seq, end_lsn = %record.end_lsn, files = n_files, rows, bytes, lag_ms, tables_copied = ?tables_copied, "committed");
        st.summary.commits += 1;
        st.summary.files += n_files as u64;
        st.summary.bytes += bytes;
        st.summary.end_lsn = record.end_lsn;
        let end = record.end_lsn;
        if !copied.is_empty() {
            crate::fault::point("after_copy_commit");
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            for (t, _) in &copied {
                in_flight.remove(t);
            }
        }
        for key in cleanup {
            self.checkpoint.delete_quietly(&key).await;
        }
        crate::fault::point("after_commit_before_confirm");
        advance(&self.confirm, end);
        Ok(())
    }
}
