//! The copier task: finds tables to copy while the stream runs and starts their copies.
//!
//! Due: a table never copied (`snapshot.mode = "initial"`), a table whose identity
//! changed (created again under its name, or back in the publication after leaving it:
//! see [`TableIdentity`]), and a table with a `walshore resnapshot` request. A table that
//! left the publication is reported to the sink, which drops its point and identity.
//! For each copy it asks the stream to mark the tables due, then takes a snapshot point
//! from a temporary slot (which waits for the transactions open at that moment: the
//! copier says which ones while it waits, and the stream goes on), then hands the point
//! to the stream and starts the copy. The stream never waits for any of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use super::source_task::{CopyRequest, within};
use crate::change::{CopyId, CopyStart, CopyTable, TableIdentity};
use crate::config::{Config, SnapshotMode};
use crate::lsn::Lsn;
use crate::snapshot::{self, CopyEnv, CopyMsg, Point, SnapshotError};
use crate::source::{Replication, SourceError};

/// How often a copy waiting for its snapshot point says what it waits for.
const WAIT_REPORT: Duration = Duration::from_secs(10);

pub(super) struct Copier {
    cfg: Config,
    env: CopyEnv,
    /// To the sink (copy results, departures, adopted identities).
    results: mpsc::Sender<CopyMsg>,
    /// To the stream.
    requests: mpsc::Sender<CopyRequest>,
    /// From the sink: copies published.
    published: mpsc::UnboundedReceiver<(CopyId, String)>,
    /// The stream has stopped: start nothing more.
    stop: CancellationToken,
    /// What each committed copy was a copy of.
    identities: BTreeMap<String, TableIdentity>,
    /// Tables with a committed copy.
    copied: BTreeSet<String>,
    /// Tables being copied by this run (or due), with their copy.
    running: BTreeMap<String, CopyId>,
    /// The next copy's number (the initial copy of a new lake is 0).
    next_id: CopyId,
    /// Copies due at start, already marked due in the stream from its first message
    /// (see [`Copier::due_at_start`]).
    first: Option<BTreeMap<String, Vec<String>>>,
    catalog: Catalog,
    /// Copies started and not yet published: their identity, recorded on publish.
    starting: HashMap<(CopyId, String), TableIdentity>,
    /// Departures and identities found by the last look, for the sink: sent by `run`,
    /// never while the sink that reads them may not be running yet.
    notes: Vec<CopyMsg>,
}

/// A catalog connection of the copier's own.
struct Catalog {
    client: Option<tokio_postgres::Client>,
    version: i32,
}

impl Catalog {
    async fn get(&mut self, conn: &crate::config::ConnParams) -> Result<&tokio_postgres::Client, PipelineError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = crate::source::sql::connect(conn).await.map_err(SnapshotError::from)?;
            self.version = client
                .query_one("SELECT current_setting('server_version_num')::int4", &[])
                .await
                .map_err(|source| SnapshotError::Sql {
                    what: "reading the server version".into(),
                    source,
                })?
                .get(0);
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }
}

/// What the copier starts from.
pub(super) struct CopierInit {
    pub cfg: Config,
    pub env: CopyEnv,
    pub results: mpsc::Sender<CopyMsg>,
    pub requests: mpsc::Sender<CopyRequest>,
    pub published: mpsc::UnboundedReceiver<(CopyId, String)>,
    pub stop: CancellationToken,
    pub identities: BTreeMap<String, TableIdentity>,
    pub copied: BTreeSet<String>,
    pub running: BTreeMap<String, CopyId>,
    pub next_id: CopyId,
}

impl Copier {
    pub(super) fn new(i: CopierInit) -> Copier {
        Copier {
            cfg: i.cfg,
            env: i.env,
            results: i.results,
            requests: i.requests,
            published: i.published,
            stop: i.stop,
            identities: i.identities,
            copied: i.copied,
            running: i.running,
            next_id: i.next_id,
            first: None,
            catalog: Catalog {
                client: None,
                version: 0,
            },
            starting: HashMap::new(),
            notes: Vec::new(),
        }
    }

    /// The copies due when the pipeline starts, found before the stream's first message:
    /// their tables are due from the start, so that nothing of theirs before the copy's
    /// point is taken for the lake (a requested copy after a type change, say). What it
    /// found for the sink (departures, identities) is sent once `run` runs.
    pub(super) async fn due_at_start(&mut self) -> Result<BTreeSet<String>, PipelineError> {
        let mut catalog = std::mem::replace(
            &mut self.catalog,
            Catalog {
                client: None,
                version: 0,
            },
        );
        let limit = self.cfg.source.receive_timeout;
        let due = if crate::fault::fails("before_copies_due") {
            Err(SourceError::Io(std::io::Error::other("fault injected while looking for tables to copy")).into())
        } else {
            within(limit, "looking for tables to copy", self.due(&mut catalog)).await
        };
        self.catalog = catalog;
        let due = due?;
        let tables = due.keys().cloned().collect();
        if !due.is_empty() {
            self.first = Some(due);
        }
        Ok(tables)
    }

    pub(super) async fn run(mut self) -> Result<(), PipelineError> {
        let mut catalog = std::mem::replace(
            &mut self.catalog,
            Catalog {
                client: None,
                version: 0,
            },
        );
        if !self.send_notes().await {
            return Ok(());
        }
        if let Some(due) = self.first.take() {
            // `start` itself ends when the stream stops.
            let started = self.start(due, true, &mut catalog).await?;
            self.starting.extend(started);
        }
        let mut poll = tokio::time::interval(self.cfg.snapshot_poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut polled = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                Some((id, table)) = self.published.recv() => {
                    if self.running.get(&table) == Some(&id) {
                        self.running.remove(&table);
                    }
                    self.copied.insert(table.clone());
                    if let Some(identity) = self.starting.remove(&(id, table.clone())) {
                        self.identities.insert(table, identity);
                    }
                }
                _ = poll.tick() => {
                    let limit = self.cfg.source.receive_timeout;
                    let due = within(limit, "looking for tables to copy", self.due(&mut catalog)).await?;
                    if !self.send_notes().await {
                        return Ok(());
                    }
                    if !due.is_empty() {
                        let started = self.start(due, false, &mut catalog).await?;
                        self.starting.extend(started);
                    }
                    if !polled {
                        polled = true;
                        let _ = self.requests.send(CopyRequest::Polled).await;
                    }
                }
            }
        }
    }

    /// Hands what the last look found to the sink; false when the sink is gone (the
    /// attempt is ending).
    async fn send_notes(&mut self) -> bool {
        for note in std::mem::take(&mut self.notes) {
            if self.results.send(note).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The newest position a departure found at start must be streamed to before it is
    /// recorded (`sync` streams that far).
    pub(super) fn departures_before(&self) -> Option<Lsn> {
        self.notes
            .iter()
            .filter_map(|n| match n {
                CopyMsg::Left { at, .. } => Some(*at),
                _ => None,
            })
            .max()
    }

    /// The tables due for a copy, each with the requests it carries out. Departures
    /// and identities to record are left in `notes`.
    async fn due(&mut self, catalog: &mut Catalog) -> Result<BTreeMap<String, Vec<String>>, PipelineError> {
        let publication = self.cfg.source.publication.clone();
        let version = {
            catalog.get(&self.cfg.source.conn).await?;
            catalog.version
        };
        let client = catalog.get(&self.cfg.source.conn).await?;
        let members = snapshot::publication::members(client, &publication, version)
            .await
            .map_err(|source| SnapshotError::Sql {
                what: "listing the publication's tables".into(),
                source,
            })?;
        let store = self.env.sink.store().clone();
        let requested =
            snapshot::requested(store.as_ref())
                .await
                .map_err(|source| crate::checkpoint::CheckpointError::Store {
                    key: "_walshore/requests".into(),
                    source,
                })?;
        let mut due: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // Gone from the publication: the lake keeps the rows it has, and a return is a
        // new start for the table.
        let never = self.cfg.snapshot == SnapshotMode::Never;
        if never {
            // Back in the publication: a later departure is one again.
            for (t, i) in self.identities.iter_mut() {
                if i.departed && members.contains_key(t) {
                    i.departed = false;
                }
            }
        }
        let gone: Vec<String> = self
            .copied
            .iter()
            .chain(self.identities.iter().filter(|(_, i)| !i.departed).map(|(t, _)| t))
            .filter(|t| !members.contains_key(*t) && !self.running.contains_key(*t))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !gone.is_empty() {
            // The stream may still be behind the departure: the sink records it only
            // once the stream has passed a position after it.
            let at = departure_position(catalog.get(&self.cfg.source.conn).await?)
                .await
                .map_err(|source| SnapshotError::Sql {
                    what: "reading the server's WAL position".into(),
                    source,
                })?;
            for t in gone {
                if never {
                    tracing::info!(table = %t, publication = %publication, "table left the publication (or was dropped); the lake keeps its rows as they were, and its OID, so that a table created again under its name starts with a truncate");
                    if let Some(i) = self.identities.get_mut(&t) {
                        i.departed = true;
                    }
                } else {
                    tracing::info!(table = %t, publication = %publication, "table left the publication (or was dropped); the lake keeps its rows as they were, and it is copied again if it comes back");
                    self.identities.remove(&t);
                }
                self.copied.remove(&t);
                self.notes.push(CopyMsg::Left {
                    table: t,
                    at,
                    keep_oid: never,
                });
            }
        }
        if !never {
            for (t, identity) in &members {
                if self.running.contains_key(t) {
                    continue;
                }
                match self.identities.get(t) {
                    None if !self.copied.contains(t) => {
                        due.entry(t.clone()).or_default();
                    }
                    // A lake from before identities: take the table as it is now.
                    None => {
                        tracing::info!(table = %t, oid = identity.oid, "recording the identity of a table copied by an older walshore");
                        self.identities.insert(t.clone(), identity.clone());
                        self.notes.push(CopyMsg::Adopted(t.clone(), identity.clone()));
                    }
                    Some(recorded) if recorded.oid != identity.oid => {
                        tracing::info!(table = %t, old_oid = recorded.oid, new_oid = identity.oid, "table created again under its name; copying it again");
                        due.entry(t.clone()).or_default();
                    }
                    Some(recorded) if recorded.departed || !recorded.continues_as(identity) => {
                        tracing::info!(table = %t, "table came back to the publication; copying it again (its changes while it was out are not in the stream)");
                        due.entry(t.clone()).or_default();
                    }
                    // In the publication throughout, by other catalog rows now (added by
                    // its schema as well, say): recorded as it is, not copied again.
                    Some(recorded) if recorded.membership != identity.membership => {
                        tracing::info!(table = %t, "table's publication membership changed without it leaving; recording it, no copy");
                        self.identities.insert(t.clone(), identity.clone());
                        self.notes.push(CopyMsg::Adopted(t.clone(), identity.clone()));
                    }
                    Some(_) => {}
                }
            }
        }
        for (t, keys) in requested {
            if self.running.contains_key(&t) {
                // A request made while a copy runs is for a later copy.
                continue;
            }
            if !members.contains_key(&t) {
                tracing::warn!(table = %t, publication = %publication, "resnapshot request for a table outside the publication; ignored and removed");
                for k in keys {
                    store.delete(&crate::sink::key_path(&k)).await.ok();
                }
                continue;
            }
            due.entry(t).or_default().extend(keys);
        }
        Ok(due)
    }

    /// Marks the tables due in the stream, takes a snapshot point, hands it to the
    /// stream and starts the copy. Returns the identities to record once published.
    /// `marked`: the tables are due in the stream already (from its start).
    async fn start(
        &mut self,
        due: BTreeMap<String, Vec<String>>,
        marked: bool,
        catalog: &mut Catalog,
    ) -> Result<Vec<((CopyId, String), TableIdentity)>, PipelineError> {
        let id = self.next_id;
        self.next_id += 1;
        let tables: BTreeSet<String> = due.keys().cloned().collect();
        if !marked {
            crate::fault::point("before_copy_request");
            let (reply, accepted) = oneshot::channel();
            let asked = CopyRequest::Due {
                tables: tables.iter().cloned().collect(),
                reply,
            };
            if self.requests.send(asked).await.is_err() || !accepted.await.unwrap_or(false) {
                return Ok(Vec::new());
            }
        }
        for t in &tables {
            self.running.insert(t.clone(), id);
        }
        let prepared = tokio::select! {
            p = self.take_point(id, &tables, catalog) => p?,
            // The stream stopped on a signal: the copy starts again at the next start.
            _ = self.stop.cancelled() => return Ok(Vec::new()),
        };
        let copying = prepared.tables();
        let names: BTreeSet<&String> = copying.iter().map(|(n, ..)| n).collect();
        let dropped: Vec<String> = tables.iter().filter(|t| !names.contains(t)).cloned().collect();
        for t in &dropped {
            self.running.remove(t);
        }
        let mut due = due;
        let start = CopyStart {
            id,
            from: prepared.lsn(),
            tables: copying
                .iter()
                .map(|(name, identity, relation)| CopyTable {
                    name: name.clone(),
                    identity: identity.clone(),
                    relation: relation.clone(),
                    requests: due.remove(name).unwrap_or_default(),
                })
                .collect(),
            dropped,
        };
        if self.requests.send(CopyRequest::Start(Arc::new(start))).await.is_err() {
            return Ok(Vec::new());
        }
        if !copying.is_empty() {
            let names: Vec<&String> = copying.iter().map(|(n, ..)| n).collect();
            tracing::info!(tables = ?names, snapshot_point = %prepared.lsn(), "copying tables beside the stream");
            prepared.spawn(&self.env, self.results.clone());
        }
        Ok(copying.into_iter().map(|(n, i, _)| ((id, n), i)).collect())
    }

    /// A snapshot point from a temporary slot, imported by the copy connections. While
    /// PostgreSQL waits for the transactions open now to end, says which they are.
    async fn take_point(
        &self,
        id: CopyId,
        tables: &BTreeSet<String>,
        catalog: &mut Catalog,
    ) -> Result<snapshot::Prepared, PipelineError> {
        let started = Instant::now();
        let export = Replication::export_temporary(&self.cfg.source);
        let mut export = std::pin::pin!(export);
        let mut report = tokio::time::interval_at(tokio::time::Instant::now() + WAIT_REPORT, WAIT_REPORT);
        let (exporter, name, lsn) = loop {
            tokio::select! {
                r = &mut export => break r?,
                _ = report.tick() => self.report_wait(tables, started, catalog).await,
            }
        };
        if started.elapsed() > WAIT_REPORT {
            tracing::info!(tables = ?tables, waited_secs = started.elapsed().as_secs(), snapshot_point = %lsn, "snapshot point taken after waiting for open transactions");
        }
        crate::fault::point("after_snapshot_point");
        let prepared = snapshot::prepare(
            &self.cfg.source,
            Point::new(name, lsn),
            self.cfg.snapshot_parallelism,
            self.cfg.snapshot_chunk_bytes,
            id,
            Some(tables),
        )
        .await;
        // Imported (or failed): the temporary slot has served its purpose.
        exporter.close().await;
        Ok(prepared?)
    }

    async fn report_wait(&self, tables: &BTreeSet<String>, started: Instant, catalog: &mut Catalog) {
        let open = match catalog.get(&self.cfg.source.conn).await {
            Ok(client) => crate::source::sql::open_transactions(client).await,
            Err(e) => Err(e.to_string()),
        };
        let blocking = match open {
            Ok(list) if list.is_empty() => {
                "no transaction with a transaction id is open now; the point follows shortly".to_owned()
            }
            Ok(list) => list.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            Err(e) => format!("cannot read pg_stat_activity: {e}"),
        };
        tracing::warn!(
            tables = ?tables,
            waiting_secs = started.elapsed().as_secs(),
            blocking = %blocking,
            "a table copy waits for its snapshot point: PostgreSQL takes it once the transactions open when it was asked for have ended; the other tables keep streaming"
        );
    }
}

/// A position in the stream after every departure seen so far. A departure seen is
/// committed, so its commit record lies before the insert position now; it is flushed
/// by a commit of our own after that position (a transaction id and nothing else,
/// committed with `synchronous_commit` on, which flushes the WAL before it too even
/// where the departure was committed asynchronously). The stream thus reaches the
/// position. A session that cannot commit (read-only; a standby) gives the flushed
/// (replayed) position instead.
async fn departure_position(client: &tokio_postgres::Client) -> Result<Lsn, tokio_postgres::Error> {
    // pg_lsn's text always parses; were it not to, the position furthest away is the
    // safe one (the departure waits), not zero.
    let lsn = |row: tokio_postgres::Row| -> Lsn { row.get::<_, String>(0).parse().unwrap_or(Lsn(u64::MAX)) };
    client.batch_execute("BEGIN; SET LOCAL synchronous_commit = on").await?;
    let marked = client
        .query_one(
            "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, pg_catalog.pg_current_xact_id()",
            &[],
        )
        .await;
    match marked {
        Ok(row) => {
            client.batch_execute("COMMIT").await?;
            Ok(lsn(row))
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            tracing::debug!(error = %e, "cannot commit a position mark; taking the flushed position");
            client
                .query_one(
                    "SELECT (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                                  ELSE pg_catalog.pg_current_wal_flush_lsn() END)::text",
                    &[],
                )
                .await
                .map(lsn)
        }
    }
}
