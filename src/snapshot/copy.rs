//! A prepared copy at work: connections take chunks in turn, parse, encode and upload
//! them, and each table is reported once all its chunks are uploaded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Chunk, CopyEnv, CopyMsg, Point, Prepared, SnapshotError, Table, TableCopied};
use crate::batch::copy_binary::RowCutter;
use crate::batch::{BatchError, Batcher, Taken, copy_formats};
use crate::change::{Change, Event, TxInfo};
use crate::checkpoint::announce_copy;
use crate::sink::WrittenObject;
use crate::source::{Conn, SourceError, quote_ident};

/// Uploads in flight at once for one flush of a chunk.
const UPLOAD_CONCURRENCY: usize = 4;
/// How often copy progress is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Per-table progress, shared by the connections copying its chunks.
struct Progress {
    rows: AtomicU64,
    bytes: AtomicU64,
    pages_done: AtomicU64,
    chunks_left: AtomicU64,
    files: std::sync::Mutex<(Vec<WrittenObject>, Vec<Path>)>,
}

impl Progress {
    /// Keeps a finished chunk's files until the table is done.
    fn hold(&self, files: Vec<WrittenObject>, pending: impl IntoIterator<Item = Path>) {
        let mut held = self.files.lock().expect("files lock");
        held.0.extend(files);
        held.1.extend(pending);
    }
}

impl Prepared {
    /// Copies every chunk, sending each table to `done` once all its chunks are
    /// uploaded. Stops at the first error (sent to `done` too) or on shutdown.
    pub(super) async fn run(self, env: CopyEnv, done: mpsc::Sender<CopyMsg>) {
        let Prepared {
            id,
            point,
            workers,
            user,
            tables,
            chunks,
        } = self;
        let started = Instant::now();
        let progress: Vec<Progress> = tables
            .iter()
            .enumerate()
            .map(|(i, _)| Progress {
                rows: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                pages_done: AtomicU64::new(0),
                chunks_left: AtomicU64::new(chunks.iter().filter(|c| c.table == i).count() as u64),
                files: std::sync::Mutex::new((Vec::new(), Vec::new())),
            })
            .collect();
        tracing::info!(
            tables = tables.len(),
            chunks = chunks.len(),
            snapshot_point = %point.lsn,
            "table copy started"
        );
        let shared = Arc::new(Shared {
            id,
            queue: std::sync::Mutex::new(Queue {
                chunks: chunks.into_iter().collect(),
                connections: workers.len(),
            }),
            stop: env.shutdown.child_token(),
            point,
            user,
            tables,
            progress,
            env,
            done,
        });
        // One task per connection: each parses and encodes its own chunks.
        let work = futures::future::join_all(workers.into_iter().map(|mut conn| {
            let shared = shared.clone();
            shared
                .env
                .tracker
                .clone()
                .spawn(async move { shared.worker(&mut conn).await })
        }));
        let mut work = std::pin::pin!(work);
        let mut log = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
        // A progress bar too when a person watches (stderr is a terminal).
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut redraw = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut work => break,
                _ = log.tick() => {
                    shared.log_progress(started);
                    shared.record_progress(false);
                }
                _ = redraw.tick(), if bar => shared.draw_bar(started),
            }
        }
        if bar {
            eprint!("\r\x1b[K");
        }
        shared.record_progress(true);
        // Every chunk is copied, or an error (or shutdown) said why not.
        if !shared.stop.is_cancelled()
            && shared
                .progress
                .iter()
                .any(|p| p.chunks_left.load(Ordering::Acquire) > 0)
        {
            let _ = shared
                .done
                .send(CopyMsg::Failed(SnapshotError::Task(
                    "the copy connections ended with chunks left".into(),
                )))
                .await;
        }
        tracing::info!(
            tables = shared.tables.len(),
            rows = shared
                .progress
                .iter()
                .map(|p| p.rows.load(Ordering::Relaxed))
                .sum::<u64>(),
            secs = started.elapsed().as_secs_f64(),
            "table copy read"
        );
    }
}

/// What one chunk has uploaded so far.
#[derive(Default)]
struct ChunkOut {
    files: Vec<WrittenObject>,
    pending: Vec<Path>,
    /// Every key announced, uploaded or not: what a failed chunk deletes.
    announced: Vec<String>,
    /// Rows counted in the table's progress.
    rows: u64,
}

impl ChunkOut {
    fn absorb(&mut self, upload: Upload) -> Result<(), SnapshotError> {
        self.announced.extend(upload.announced);
        self.pending.extend(upload.pending);
        self.files.extend(upload.written?);
        Ok(())
    }
}

/// The chunks not taken yet, and the connections still there to take them (one lock:
/// a connection never leaves while another puts a chunk back).
struct Queue {
    chunks: VecDeque<Chunk>,
    connections: usize,
}

/// What the copy connections share.
struct Shared {
    id: crate::change::CopyId,
    point: Point,
    /// The role copying.
    user: String,
    tables: Vec<Table>,
    progress: Vec<Progress>,
    env: CopyEnv,
    done: mpsc::Sender<CopyMsg>,
    queue: std::sync::Mutex<Queue>,
    /// Cancelled on shutdown, or when one connection fails.
    stop: CancellationToken,
}

impl Shared {
    async fn worker(&self, conn: &mut Conn) {
        loop {
            let chunk = {
                let mut queue = self.queue.lock().expect("queue lock");
                match queue.chunks.pop_front() {
                    Some(c) => c,
                    None => {
                        queue.connections -= 1;
                        return;
                    }
                }
            };
            let Err(e) = self.chunk_then_table(conn, &chunk).await else {
                continue;
            };
            // A connection lost while others still hold the snapshot: they take its
            // chunk over (chunks already copied are not copied again).
            if e.connection_lost() && !self.stop.is_cancelled() {
                let table = self.tables[chunk.table].name.clone();
                let index = chunk.index;
                let mut queue = self.queue.lock().expect("queue lock");
                if queue.connections > 1 {
                    queue.connections -= 1;
                    queue.chunks.push_front(chunk);
                    drop(queue);
                    tracing::warn!(table = %table, chunk = index, error = %e, "copy connection lost; its chunk goes back to the queue for the other connections");
                    return;
                }
            }
            if !self.stop.is_cancelled() || matches!(e, SnapshotError::Interrupted) {
                self.stop.cancel();
                let _ = self.done.send(CopyMsg::Failed(e)).await;
            }
            return;
        }
    }

    async fn chunk_then_table(&self, conn: &mut Conn, chunk: &Chunk) -> Result<(), SnapshotError> {
        let table = &self.tables[chunk.table];
        let progress = &self.progress[chunk.table];
        let mut out = ChunkOut::default();
        if let Err(e) = self.copy_chunk(conn, table, chunk, progress, &mut out).await {
            // Its rows are copied again: take them out of the count and the lake. Every
            // upload of the chunk has ended (none is left running), so what it announced
            // is deleted for good; no commit names these files.
            progress.rows.fetch_sub(out.rows, Ordering::Relaxed);
            let store = self.env.sink.store();
            let files = out.announced.iter().map(|k| crate::sink::key_path(k)).collect();
            if let Err(err) = crate::checkpoint::log::delete_all(store.as_ref(), files).await {
                tracing::warn!(table = %table.name, error = %err, "cannot delete the files of a failed chunk; the next start deletes them");
            } else if let Err(err) = crate::checkpoint::log::delete_all(store.as_ref(), out.pending.clone()).await {
                tracing::warn!(table = %table.name, error = %err, "cannot delete the pending records of a failed chunk; the next start deletes them");
            }
            return Err(e);
        }
        progress.hold(out.files, out.pending);
        let pages = chunk.hi.unwrap_or(table.pages.max(chunk.lo)) - chunk.lo;
        progress.pages_done.fetch_add(pages, Ordering::Relaxed);
        if progress.chunks_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        // The table's last chunk: the table is ready to commit.
        let (files, pending) = std::mem::take(&mut *progress.files.lock().expect("files lock"));
        let rows = progress.rows.load(Ordering::Relaxed);
        tracing::info!(table = %table.name, rows, bytes = progress.bytes.load(Ordering::Relaxed), files = files.len(), snapshot_point = %self.point.lsn, "copied table");
        let copied = TableCopied {
            id: self.id,
            table: table.name.clone(),
            lsn: self.point.lsn,
            taken_at: self.point.taken_at,
            files,
            pending,
            rows,
            relation: table.relation.clone(),
        };
        if self.done.send(CopyMsg::Copied(copied)).await.is_err() {
            return Err(SnapshotError::Interrupted);
        }
        Ok(())
    }

    async fn copy_chunk(
        &self,
        conn: &mut Conn,
        table: &Table,
        chunk: &Chunk,
        progress: &Progress,
        out: &mut ChunkOut,
    ) -> Result<(), SnapshotError> {
        let sql = copy_sql(table, chunk, &self.env.partitions);
        let mut reader = CopyReader::start(conn, &sql, table, &self.user).await?;
        let mut batcher = batcher_for(table, &self.point, self.env.unrepresentable, &self.env.partitions)?;
        batcher.set_snapshot_seq(table.relation.id, u64::from(chunk.index) << 32);
        // One flush uploads while the next is read. The upload runs on the run's task
        // tracker and is always awaited, on an error too: no upload outlives its chunk.
        let mut uploading: Option<tokio::task::JoinHandle<Upload>> = None;
        let read = self
            .read_chunk(&mut reader, table, progress, out, &mut batcher, &mut uploading)
            .await;
        if let Some(h) = uploading.take() {
            out.absorb(h.await.map_err(|e| SnapshotError::Task(e.to_string()))?)?;
        }
        read
    }

    async fn read_chunk(
        &self,
        reader: &mut CopyReader<'_>,
        table: &Table,
        progress: &Progress,
        out: &mut ChunkOut,
        batcher: &mut Batcher,
        uploading: &mut Option<tokio::task::JoinHandle<Upload>>,
    ) -> Result<(), SnapshotError> {
        let mut read = 0;
        loop {
            let block = reader.next().await?;
            progress.bytes.fetch_add(reader.bytes() - read, Ordering::Relaxed);
            read = reader.bytes();
            progress.rows.fetch_add(reader.rows() - out.rows, Ordering::Relaxed);
            out.rows = reader.rows();
            if self.stop.is_cancelled() {
                return Err(SnapshotError::Interrupted);
            }
            let Some(block) = block else { break };
            if !block.is_empty() {
                batcher.push(Event::Change(Change::SnapshotBinaryRows {
                    rel_id: table.relation.id,
                    rows: block,
                }))?;
            }
            if batcher.buffered_bytes() >= self.env.buffer_bytes {
                self.upload_next(batcher, out, uploading).await?;
            }
        }
        self.upload_next(batcher, out, uploading).await
    }

    /// Waits for the upload under way, then starts uploading what `batcher` holds.
    async fn upload_next(
        &self,
        batcher: &mut Batcher,
        out: &mut ChunkOut,
        uploading: &mut Option<tokio::task::JoinHandle<Upload>>,
    ) -> Result<(), SnapshotError> {
        if let Some(h) = uploading.take() {
            out.absorb(h.await.map_err(|e| SnapshotError::Task(e.to_string()))?)?;
        }
        if batcher.has_data() {
            *uploading = Some(self.env.tracker.spawn(upload_owned(self.env.clone(), batcher.take())));
        }
        Ok(())
    }

    /// One line, redrawn in place: the whole copy's share of pages, rows, rate, ETA.
    fn draw_bar(&self, started: Instant) {
        let total: u64 = self.tables.iter().map(|t| t.pages).sum();
        let done: u64 = self.progress.iter().map(|p| p.pages_done.load(Ordering::Relaxed)).sum();
        let rows: u64 = self.progress.iter().map(|p| p.rows.load(Ordering::Relaxed)).sum();
        let bytes: u64 = self.progress.iter().map(|p| p.bytes.load(Ordering::Relaxed)).sum();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let share = if total > 0 {
            (done as f64 / total as f64).min(1.0)
        } else {
            0.0
        };
        let width = 30;
        let filled = (share * width as f64) as usize;
        let eta = if done > 0 && total > done {
            format!("ETA {:.0}s", secs * (total - done) as f64 / done as f64)
        } else {
            String::new()
        };
        eprint!(
            "\r\x1b[Kcopy [{}{}] {:>3.0}%  {rows} rows  {:.1} MiB/s  {eta}",
            "=".repeat(filled),
            " ".repeat(width - filled),
            share * 100.0,
            bytes as f64 / 1048576.0 / secs
        );
    }

    /// The copy gauges: rows read per table, and the rows expected (from the share of
    /// pages read so far; the count itself once done).
    fn record_progress(&self, done: bool) {
        if !crate::telemetry::enabled() {
            return;
        }
        for (table, p) in self.tables.iter().zip(&self.progress) {
            let rows = p.rows.load(Ordering::Relaxed);
            let pages_done = p.pages_done.load(Ordering::Relaxed);
            let finished = done || p.chunks_left.load(Ordering::Relaxed) == 0;
            metrics::gauge!(crate::telemetry::names::COPY_ROWS, "table" => table.name.clone()).set(rows as f64);
            let expected = if finished || table.pages == 0 || pages_done == 0 {
                rows as f64
            } else {
                rows as f64 * table.pages as f64 / pages_done.min(table.pages) as f64
            };
            metrics::gauge!(crate::telemetry::names::COPY_ROWS_ESTIMATED, "table" => table.name.clone()).set(expected);
        }
    }

    fn log_progress(&self, started: Instant) {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        for (table, p) in self.tables.iter().zip(&self.progress) {
            let rows = p.rows.load(Ordering::Relaxed);
            let left = p.chunks_left.load(Ordering::Relaxed);
            if rows == 0 || left == 0 {
                continue;
            }
            let done = p.pages_done.load(Ordering::Relaxed);
            // ETA from the finished chunks' share of the table's pages.
            let eta_secs =
                (done > 0 && table.pages > done).then(|| (secs * (table.pages - done) as f64 / done as f64) as u64);
            tracing::info!(
                table = %table.name,
                rows,
                bytes = p.bytes.load(Ordering::Relaxed),
                percent = (table.pages > 0).then(|| (done * 100 / table.pages).min(100)),
                rows_per_sec = (rows as f64 / secs) as u64,
                eta_secs,
                "copying"
            );
        }
    }
}

/// A running `COPY … TO STDOUT (FORMAT binary)`, read as blocks of whole rows.
pub(super) struct CopyReader<'a> {
    conn: &'a mut Conn,
    table: &'a Table,
    cutter: RowCutter,
    /// Bytes of COPY data read.
    bytes: u64,
    /// The server has sent all of it; `done`: and the last block is handed out.
    ended: bool,
    done: bool,
}

impl<'a> CopyReader<'a> {
    /// Starts `sql` on `conn` (in its snapshot's transaction); `user` is named in a
    /// permission error's GRANT.
    pub(super) async fn start(
        conn: &'a mut Conn,
        sql: &str,
        table: &'a Table,
        user: &str,
    ) -> Result<CopyReader<'a>, SnapshotError> {
        conn.copy_out(sql).await.map_err(|source| match source {
            SourceError::Server(e) if e.code == "42501" => SnapshotError::Permission {
                table: table.from.trim_start_matches("ONLY ").to_owned(),
                user: quote_ident(user),
            },
            source => SnapshotError::Source {
                what: format!("COPY {}", table.name),
                source,
            },
        })?;
        Ok(CopyReader {
            conn,
            table,
            cutter: RowCutter::default(),
            bytes: 0,
            ended: false,
            done: false,
        })
    }

    /// The next block of whole rows (perhaps empty); `None` once the COPY has ended,
    /// which it must with its trailer.
    pub(super) async fn next(&mut self) -> Result<Option<bytes::Bytes>, SnapshotError> {
        let format_err = |what| SnapshotError::Format {
            table: self.table.name.clone(),
            what,
        };
        loop {
            if self.done {
                return Ok(None);
            }
            if self.ended {
                self.done = true;
                return self.cutter.finish().map(Some).map_err(format_err);
            }
            let (cutter, bytes) = (&mut self.cutter, &mut self.bytes);
            let more = self
                .conn
                .read_copy_data(|data| {
                    *bytes += data.len() as u64;
                    cutter.message(data);
                })
                .await
                .map_err(|source| SnapshotError::Source {
                    what: format!("COPY {}", self.table.name),
                    source,
                })?;
            self.ended = !more;
            if let Some(block) = self.cutter.cut().map_err(format_err)? {
                return Ok(Some(block));
            }
        }
    }

    /// Whole rows seen so far.
    pub(super) fn rows(&self) -> u64 {
        self.cutter.rows()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A batcher inside a copy's transaction at `point`, which has seen the table's
/// columns. Fails on a table walshore cannot write (a reserved column name, a missing
/// partition column).
pub(super) fn batcher_for(
    table: &Table,
    point: &Point,
    unrepresentable: crate::config::Unrepresentable,
    partitions: &Arc<crate::config::Partitions>,
) -> Result<Batcher, BatchError> {
    let mut b = Batcher::new()
        .with_unrepresentable(unrepresentable)
        .with_partitions(partitions.clone());
    b.push(Event::Begin(TxInfo {
        xid: 0,
        commit_lsn: point.lsn,
        commit_ts: point.taken_at,
    }))?;
    b.push(Event::Relation(table.relation.clone()))?;
    Ok(b)
}

/// The COPY that reads `chunk` of `table`: binary where walshore decodes the binary
/// form (cheaper for PostgreSQL and for us), the output function's text for the rest
/// (its binary COPY form is that text, the same pgoutput sends).
pub(super) fn copy_sql(table: &Table, chunk: &Chunk, partitions: &crate::config::Partitions) -> String {
    let binary = copy_formats(&table.relation, partitions);
    let cols: Vec<String> = table
        .relation
        .columns
        .iter()
        .zip(&binary)
        .map(|(c, binary)| {
            let q = quote_ident(&c.name);
            // The type's output function, which pgoutput uses too (a cast to text
            // differs for some types: inet adds its netmask). num_nulls: a composite
            // whose fields are all null is not itself null.
            if *binary {
                q
            } else {
                format!("CASE WHEN num_nulls({q}) = 0 THEN format('%s', {q}) END")
            }
        })
        .collect();
    let mut range = Vec::new();
    if chunk.lo > 0 {
        range.push(format!("ctid >= '({},0)'::tid", chunk.lo));
    }
    if let Some(hi) = chunk.hi {
        range.push(format!("ctid < '({hi},0)'::tid"));
    }
    let filter = if range.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", range.join(" AND "))
    };
    format!(
        "COPY (SELECT {} FROM {}{filter}) TO STDOUT (FORMAT binary)",
        cols.join(", "),
        table.from
    )
}

/// One upload of a chunk's flush: what it announced (whether or not it got written).
struct Upload {
    announced: Vec<String>,
    pending: Option<Path>,
    written: Result<Vec<WrittenObject>, SnapshotError>,
}

async fn upload_owned(env: CopyEnv, taken: Taken) -> Upload {
    let mut announced = Vec::new();
    let mut pending = None;
    let written = upload(&env, taken, &mut announced, &mut pending).await;
    Upload {
        announced,
        pending,
        written,
    }
}

/// Encodes, announces and uploads what a copy's batcher holds.
async fn upload(
    env: &CopyEnv,
    taken: Taken,
    announced: &mut Vec<String>,
    pending: &mut Option<Path>,
) -> Result<Vec<WrittenObject>, SnapshotError> {
    if taken.files.is_empty() {
        return Ok(Vec::new());
    }
    let encoded = env.sink.encode_all(taken.files).await?;
    let keys: Vec<String> = encoded.iter().map(|e| e.object.key.clone()).collect();
    *pending = Some(announce_copy(env.sink.store().as_ref(), env.floor, &env.run_id, keys.clone()).await?);
    announced.extend(keys);
    crate::fault::point("after_copy_announce");
    let written = futures::stream::iter(encoded.into_iter().map(|e| env.sink.write(e)))
        .buffered(UPLOAD_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    crate::fault::point("after_copy_upload");
    Ok(written)
}
