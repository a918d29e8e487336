//! The sink task: encodes and uploads the batcher's files, commits them at transaction
//! boundaries, and publishes finished table copies with the stream's files that waited
//! for them ([`Handoff`], the one owner of that hand-off).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use super::batch_task::SinkMsg;
use super::handoff::{Handoff, Held, Placed};
use crate::batch::BatchError;
use crate::batch::schema::LakeSchema;
use crate::change::{CopyId, TableIdentity};
use crate::checkpoint::{Checkpoint, CommitExtras, Watermarks, write_schema};
use crate::lsn::Lsn;
use crate::sink::{Sink, WrittenObject};
use crate::snapshot::{CopyMsg, SnapshotError};

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

pub(super) struct SinkTask {
    pub sink: Arc<Sink>,
    pub checkpoint: Checkpoint,
    pub run_id: String,
    pub input: mpsc::Receiver<SinkMsg>,
    pub copies: mpsc::Receiver<CopyMsg>,
    /// Compactions of the change log, ready to commit (`[compaction]`).
    pub compactions: mpsc::Receiver<crate::compaction::Ready>,
    pub confirm: watch::Sender<Lsn>,
    pub handoff: Handoff,
    /// The lake schema of each table, as recorded under `_walshore/schemas/`.
    pub schemas: HashMap<String, LakeSchema>,
    /// `catalog.kind = "glue"`.
    pub catalog: Option<crate::catalog::Catalog>,
    /// Ends a wait for a busy Glue (the commit is then not made; nothing is lost).
    pub shutdown: CancellationToken,
    /// Tells the copier which copies are published.
    pub published: mpsc::UnboundedSender<(CopyId, String)>,
    /// Log housekeeping's progress, recorded with each commit.
    pub marks: watch::Receiver<Watermarks>,
    /// For the `T` row that starts a table copied again.
    pub partitions: Arc<crate::config::Partitions>,
    pub unrepresentable: crate::config::Unrepresentable,
    /// Reconcile the catalog with the lake before the first commit, and say so here once
    /// it succeeded (later attempts of the process skip it).
    pub reconcile: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Set while a flush is under way: compaction holds its requests back.
    pub flushing: crate::compaction::Flushing,
}

#[derive(Default)]
struct SinkState {
    summary: Summary,
    /// Uploaded, not yet committed: the open transactions' files.
    uncommitted: Vec<WrittenObject>,
    /// How many of `uncommitted` a commit between boundaries has announced again in a
    /// pending record of `carried` (their own records are completed by that commit).
    carried_upto: usize,
    /// Pending records announcing files of `uncommitted`: completed by the boundary
    /// commit that publishes them.
    carried: Vec<object_store::path::Path>,
    /// The end of the last transaction the sink has all files of: a commit between
    /// boundaries records this position (what it publishes lies before it).
    boundary: Lsn,
    /// Departures to record once a commit reaches their position (`CopyMsg::Left`).
    left: Vec<Departure>,
    adopted: Vec<(String, TableIdentity)>,
    oids: Vec<(String, u32)>,
    /// When the first flush of the next commit reached the sink (commit duration).
    flush_started: Option<std::time::Instant>,
    /// Compactions the next commit records.
    compactions: Vec<crate::compaction::Ready>,
}

/// A table that left the publication, recorded by the first commit at or past `at`.
struct Departure {
    table: String,
    at: Lsn,
    keep_oid: bool,
}

pub(super) async fn sink_task(mut t: SinkTask) -> (Summary, Checkpoint, Result<(), PipelineError>) {
    let mut st = SinkState {
        boundary: t.checkpoint.position(),
        ..SinkState::default()
    };
    let result = t.run(&mut st).await;
    (st.summary, t.checkpoint, result)
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

impl SinkTask {
    /// Registers in the catalog what the lake holds and Glue lacks. The stream runs
    /// meanwhile; its flushes wait in the bounded channel.
    async fn reconcile(&mut self) -> Result<(), PipelineError> {
        let (Some(done), Some(c)) = (self.reconcile.take(), self.catalog.as_mut()) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let tables: Vec<String> = self.schemas.keys().cloned().collect();
        let lake = crate::catalog::lake_partitions(self.sink.store().as_ref(), &tables, &self.partitions).await?;
        let registered = c
            .reconcile(&lake, &self.schemas, &self.shutdown, self.sink.store().as_ref())
            .await?;
        tracing::info!(
            database = %c.database(),
            tables = lake.len(),
            partitions = lake.values().map(Vec::len).sum::<usize>(),
            registered_now = registered,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Glue catalog reconciled with the lake"
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn run(&mut self, st: &mut SinkState) -> Result<(), PipelineError> {
        self.confirm.send_replace(self.checkpoint.position());
        self.reconcile().await?;
        let (mut input_open, mut copies_open, mut compactions_open) = (true, true, true);
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
                msg = self.copies.recv(), if copies_open => match msg {
                    None => copies_open = false,
                    // Shutdown: the copy starts again at the next start.
                    Some(CopyMsg::Failed(SnapshotError::Interrupted)) => {}
                    Some(CopyMsg::Failed(e)) => return Err(e.into()),
                    Some(CopyMsg::Copied(c)) => {
                        self.handoff.copied(c);
                        if self.handoff.has_ready(false) {
                            self.commit(st, None).await?;
                        }
                    }
                    Some(CopyMsg::Left { table, at, keep_oid }) => st.left.push(Departure { table, at, keep_oid }),
                    Some(CopyMsg::Adopted(table, identity)) => st.adopted.push((table, identity)),
                },
                // Only while the stream or a copy runs: the sink's end is theirs.
                ready = self.compactions.recv(), if compactions_open && (input_open || copies_open) => match ready {
                    None => compactions_open = false,
                    // Committed at once, between boundaries if need be: its files hold
                    // only committed rows.
                    Some(r) => {
                        st.compactions.push(r);
                        self.commit(st, None).await?;
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
                // Nothing buffered or in flight up to `lsn`: every transaction before it
                // has ended.
                if st.uncommitted.is_empty() {
                    self.handoff.boundary();
                    st.boundary = st.boundary.max(lsn);
                    if st.left.iter().any(|d| d.at <= lsn) || !st.adopted.is_empty() {
                        // A departure the stream has now passed, or a membership to record:
                        // recorded without waiting for a change (an idle publication may
                        // not have one for long, and a restart would judge the table by
                        // what was recorded before).
                        return self.commit(st, Some((lsn, None))).await;
                    }
                    advance(&self.confirm, lsn);
                    crate::telemetry::STATE.committed(lsn.0, None);
                }
                return Ok(());
            }
            SinkMsg::Flush(t) => t,
        };
        let _busy = crate::telemetry::STATE.busy("sink");
        let _flushing = self.flushing.begin();
        st.flush_started.get_or_insert_with(std::time::Instant::now);
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
            let tags: Vec<(String, String, crate::batch::Hold)> = taken
                .files
                .iter()
                .map(|f| (f.schema.clone(), f.table.clone(), f.hold))
                .collect();
            let encoded = self.sink.encode_all(taken.files).await?;
            self.checkpoint
                .announce(&self.run_id, encoded.iter().map(|e| e.object.key.clone()).collect())
                .await?;
            let mut uploads =
                futures::stream::iter(encoded.into_iter().map(|e| self.sink.write(e))).buffered(UPLOAD_CONCURRENCY);
            let mut tags = tags.into_iter();
            while let Some(written) = uploads.next().await {
                let file = written?;
                crate::fault::point("after_upload");
                let (schema, name, hold) = tags.next().expect("one tag per file");
                let held = Held {
                    file,
                    schema,
                    name,
                    pending: None,
                    open: taken.end_lsn.is_none(),
                };
                if let Placed::Publish(f) = self.handoff.place(held, hold) {
                    st.uncommitted.push(f);
                }
            }
        }
        // A copy's point comes after every file written before it: sort those out now.
        for start in &taken.copy_starts {
            let floor = self.checkpoint.head().seq + 1;
            self.handoff.start(start, &self.sink, &self.run_id, floor).await?;
            tracing::debug!(copy = start.id, snapshot_point = %start.from, "copy point reached the sink");
        }
        st.oids.extend(taken.oids);
        match taken.end_lsn {
            Some(end_lsn) => {
                self.handoff.boundary();
                self.commit(st, Some((end_lsn, taken.commit_ts))).await
            }
            // A copy whose rows were uploaded before its point came is published now.
            None if self.handoff.has_ready(false) => self.commit(st, None).await,
            None => Ok(()),
        }
    }

    /// Commits at a transaction boundary (`boundary`: the end of the last transaction
    /// handed over, and its commit time), or between boundaries (None) with only the
    /// ready copies whose files belong to ended transactions; such a commit records the
    /// last boundary the sink has reached, and never a file of an open transaction.
    async fn commit(&mut self, st: &mut SinkState, boundary: Option<(Lsn, Option<i64>)>) -> Result<(), PipelineError> {
        let commit_started = std::time::Instant::now();
        let mut files = Vec::new();
        let mut extras = CommitExtras::default();
        if let Some((end_lsn, _)) = boundary {
            files = std::mem::take(&mut st.uncommitted);
            st.carried_upto = 0;
            extras.completes.extend(st.carried.drain(..).map(|p| p.to_string()));
            st.boundary = st.boundary.max(end_lsn);
        }
        let floor = self.checkpoint.head().seq + 1;
        // Held files outlive this commit's pending records: announce them again, so
        // that a crash before their copy commits still deletes them.
        self.handoff
            .announce_held(self.sink.store().as_ref(), &self.run_id, floor)
            .await?;
        let mut requests = Vec::new();
        let mut published = Vec::new();
        for ready in self.handoff.take_ready(boundary.is_some()) {
            let c = ready.copied;
            let recorded = self.schemas.get(&c.table).cloned().unwrap_or_default();
            if let Some(next) = recorded.merge(&c.relation).map_err(|e| retype(&c.table, e, c.lsn))? {
                write_schema(self.sink.store().as_ref(), &c.table, &next).await?;
                self.schemas.insert(c.table.clone(), next);
            }
            // Rows of the table already in the lake (or in this commit) go before the
            // copy: a T row at point − 1 empties the table for a reader replaying.
            let in_lake = self.checkpoint.head().tables.get(&c.table).is_some_and(|s| s.rows > 0)
                || files.iter().any(|f: &WrittenObject| f.table == c.table);
            if in_lake {
                let (marker, pending) = crate::snapshot::truncate_marker(
                    &self.sink,
                    &self.run_id,
                    floor,
                    self.partitions.clone(),
                    self.unrepresentable,
                    &c,
                )
                .await?;
                files.extend(marker);
                extras.completes.push(pending.to_string());
            }
            for h in ready.held {
                files.push(h.file);
                if let Some(p) = h.pending
                    && !extras.completes.contains(&p.to_string())
                {
                    extras.completes.push(p.to_string());
                }
            }
            files.extend(c.files);
            extras.completes.extend(c.pending.iter().map(|p| p.to_string()));
            extras.copied.push((c.table.clone(), c.lsn, ready.identity));
            requests.extend(ready.requests);
            published.push((c.id, c.table));
        }
        extras
            .completes
            .extend(self.handoff.take_retired().iter().map(|p| p.to_string()));
        let (end_lsn, commit_ts) = boundary.unwrap_or((st.boundary, None));
        // A copy published now starts its table over: a departure seen before it is
        // superseded. The others wait until the stream has passed them.
        st.left.retain(|d| !extras.copied.iter().any(|(t, ..)| *t == d.table));
        let recorded = end_lsn.max(self.checkpoint.position());
        for d in st.left.extract_if(.., |d| d.at <= recorded) {
            if d.keep_oid {
                extras.departed.push(d.table);
            } else {
                extras.left.push(d.table);
            }
        }
        extras.adopted = std::mem::take(&mut st.adopted);
        extras.oids = std::mem::take(&mut st.oids);
        let compactions = std::mem::take(&mut st.compactions);
        for c in &compactions {
            extras.compacted.push(c.compaction.clone());
            extras.completes.extend(c.pending.iter().cloned());
        }
        let nothing = files.is_empty()
            && extras.copied.is_empty()
            && extras.left.is_empty()
            && extras.departed.is_empty()
            && extras.adopted.is_empty()
            && extras.oids.is_empty()
            && extras.compacted.is_empty()
            && extras.completes.is_empty();
        if nothing {
            // Nothing to publish: the transactions touched no published rows.
            if boundary.is_some() {
                advance(&self.confirm, end_lsn);
                crate::telemetry::STATE.committed(end_lsn.0, commit_ts);
                st.flush_started = None;
            }
            return Ok(());
        }
        if boundary.is_none() && st.carried_upto < st.uncommitted.len() {
            // This commit completes the pending records of the files uploaded since the
            // last one, and some of those belong to open transactions: announce them
            // again, so that a crash before their own commit still deletes them.
            let keys = st.uncommitted[st.carried_upto..]
                .iter()
                .map(|f| f.key.clone())
                .collect();
            let pending =
                crate::checkpoint::announce_copy(self.sink.store().as_ref(), floor, &self.run_id, keys).await?;
            st.carried.push(pending);
            st.carried_upto = st.uncommitted.len();
        }
        let (n_files, rows, bytes) = (
            files.len(),
            files.iter().map(|f| f.rows).sum::<u64>(),
            files.iter().map(|f| f.bytes).sum::<u64>(),
        );
        for f in &files {
            *st.summary.rows.entry(f.table.clone()).or_default() += f.rows;
        }
        let observed = crate::telemetry::enabled().then(|| written_rows(&files));
        // Tables and partitions are in the catalog before the record that publishes
        // them: a committed partition is always registered.
        if let Some(catalog) = &mut self.catalog {
            catalog.register(&files, &self.schemas, &self.shutdown).await?;
            crate::fault::point("after_catalog_registration");
        }
        self.checkpoint.set_watermarks(*self.marks.borrow());
        let tables_copied: Vec<String> = extras.copied.iter().map(|(t, ..)| t.clone()).collect();
        let left: Vec<String> = extras.left.iter().chain(&extras.departed).cloned().collect();
        let compacted: Vec<String> = extras
            .compacted
            .iter()
            .map(|c| format!("{} {}", c.table, c.partition))
            .collect();
        let record = self
            .checkpoint
            .commit_files(&self.run_id, end_lsn, commit_ts, files, extras)
            .await?;
        // Lag: from the source commit of the newest transaction to durable in the lake.
        let lag_ms = record.commit_ts.map(|ts| (record.written_at - ts) / 1000);
        // From the first flush since the last commit (at a boundary; else from this
        // commit's start) to durable.
        let took = boundary
            .and_then(|_| st.flush_started.take())
            .unwrap_or(commit_started)
            .elapsed();
        let elapsed_ms = took.as_millis() as u64;
        tracing::info!(seq = record.seq, end_lsn = %record.end_lsn, files = n_files, rows, bytes, lag_ms, elapsed_ms, tables_copied = ?tables_copied, tables_left = ?left, compacted = ?compacted, "committed");
        if !compactions.is_empty() {
            crate::fault::point("after_compaction_commit");
        }
        for c in compactions {
            let _ = c.reply.send(record.seq);
        }
        crate::notify::committed(record);
        st.summary.commits += 1;
        st.summary.files += n_files as u64;
        st.summary.bytes += bytes;
        st.summary.end_lsn = record.end_lsn;
        let end = record.end_lsn;
        if !published.is_empty() {
            crate::fault::point("after_copy_commit");
        }
        for (id, table) in published {
            self.handoff.committed(id, &table);
            let _ = self.published.send((id, table));
        }
        for key in requests {
            let path = crate::sink::key_path(&key);
            if let Err(e) = self.sink.store().delete(&path).await
                && !matches!(e, object_store::Error::NotFound { .. })
            {
                tracing::warn!(request = %key, error = %e, "cannot delete a carried-out resnapshot request; it is carried out again");
            }
        }
        if let Some(rows_by_op) = observed {
            use crate::telemetry::names;
            for ((table, op), n) in rows_by_op {
                metrics::counter!(names::ROWS_WRITTEN, "table" => table, "op" => op).increment(n);
            }
            metrics::counter!(names::COMMITS).increment(1);
            metrics::counter!(names::FILES_WRITTEN).increment(n_files as u64);
            metrics::counter!(names::BYTES_WRITTEN).increment(bytes);
            metrics::histogram!(names::FLUSH_ROWS).record(rows as f64);
            metrics::histogram!(names::FLUSH_BYTES).record(bytes as f64);
            metrics::histogram!(names::COMMIT_DURATION).record(took.as_secs_f64());
        }
        crate::fault::point("after_commit_before_confirm");
        advance(&self.confirm, end);
        if boundary.is_some() {
            crate::telemetry::STATE.committed(end.0, record.commit_ts);
        }
        Ok(())
    }
}

/// Rows of `files` per table and `_op`.
fn written_rows(files: &[crate::sink::WrittenObject]) -> BTreeMap<(String, &'static str), u64> {
    let mut out = BTreeMap::new();
    for f in files {
        for (op, n) in crate::sink::OpCounts::OPS.iter().zip(f.ops.0) {
            if n > 0 {
                *out.entry((f.table.clone(), *op)).or_default() += n;
            }
        }
    }
    out
}
