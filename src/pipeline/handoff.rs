//! The one owner of the hand-off from stream to copy: which of the stream's files wait
//! for which copy, and when a copy is ready to be published with them.
//!
//! It learns of copies in two ways only: through the stream, in order (each file tagged
//! by the batcher with what it waits for, and each copy's snapshot point after every
//! file written before it), and through the copies' results. A copy is published only
//! once its point has come through the stream, so a copy that finishes before the
//! stream reaches its point waits for it; and a file waits only for a copy whose point
//! the stream has brought (or that is due), so nothing waits for a copy that has already
//! been published. What waits for what follows from the order of events, never from
//! which task happened to be faster.

use std::collections::{HashMap, HashSet};

use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::batch::{Hold, SNAPSHOT_TIE_SEQ};
use crate::change::{CopyId, CopyStart, TableIdentity};
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError, WrittenObject};
use crate::snapshot::TableCopied;

/// A stream file held back: uploaded, not committed.
#[derive(Clone, Debug)]
pub(super) struct Held {
    pub file: WrittenObject,
    /// Its table's schema and name, apart (for a re-cut).
    pub schema: String,
    pub name: String,
    /// The pending record that announces it beyond the commit it was uploaded for (set
    /// by the sink before that commit).
    pub pending: Option<Path>,
    /// It holds rows of a transaction whose end has not reached the sink yet (a file
    /// cut at `sink.max_buffer`): it may be published only by a commit at or past that
    /// end, or a restart would stream the transaction, and write its rows, again.
    pub open: bool,
}

#[derive(Default)]
struct TableState {
    identity: TableIdentity,
    requests: Vec<String>,
    held: Vec<Held>,
    copied: Option<TableCopied>,
}

impl TableState {
    fn is_ready(&self, at_boundary: bool) -> bool {
        self.copied.is_some() && (at_boundary || self.held.iter().all(|h| !h.open))
    }
}

struct CopyState {
    tables: HashMap<String, TableState>,
}

/// A table copy ready to be published, with the stream's files that waited for it.
pub(super) struct Ready {
    pub copied: TableCopied,
    pub identity: TableIdentity,
    pub requests: Vec<String>,
    pub held: Vec<Held>,
}

#[derive(Default)]
pub(super) struct Handoff {
    /// Files of tables whose copy is due and whose point has not come yet.
    due: HashMap<String, Vec<Held>>,
    /// Copies whose point has come through the stream.
    copies: HashMap<CopyId, CopyState>,
    /// Copy results that came before their point did.
    early: HashMap<(CopyId, String), TableCopied>,
    /// Files tagged with a copy whose point has not come (cannot happen: the batcher
    /// tags a file with a copy only after the point; kept for that copy all the same).
    early_held: HashMap<(CopyId, String), Vec<Held>>,
    /// Copies published in this run: files that waited for them go out at once.
    committed: HashSet<(CopyId, String)>,
    /// Held files still listed by each pending record that announces held files. A
    /// record lists the files of one table only, so the copy that publishes them
    /// completes it whole; one whose every file was dropped is retired.
    refs: HashMap<Path, usize>,
    /// Pending records whose every file was dropped: completed by the next commit.
    retired: Vec<Path>,
}

/// What became of a file of the stream.
pub(super) enum Placed {
    /// Publish it at the next commit.
    Publish(WrittenObject),
    /// Held back (the sink announces it again before the next commit).
    Held,
}

impl Handoff {
    /// Registers a copy whose point is known before the stream starts (a new lake's
    /// first copy, under the slot's own snapshot).
    pub fn started(&mut self, start: &CopyStart) {
        self.copies.insert(
            start.id,
            CopyState {
                tables: start
                    .tables
                    .iter()
                    .map(|t| {
                        (
                            t.name.clone(),
                            TableState {
                                identity: t.identity.clone(),
                                requests: t.requests.clone(),
                                ..TableState::default()
                            },
                        )
                    })
                    .collect(),
            },
        );
    }

    /// Where a file the batcher wrote goes, by its tag.
    pub fn place(&mut self, held: Held, hold: Hold) -> Placed {
        let table = held.file.table.clone();
        match hold {
            Hold::None => Placed::Publish(held.file),
            Hold::Copy(id) if self.committed.contains(&(id, table.clone())) => Placed::Publish(held.file),
            Hold::Copy(id) => {
                match self.copies.get_mut(&id).and_then(|c| c.tables.get_mut(&table)) {
                    Some(t) => t.held.push(held),
                    None => self.early_held.entry((id, table)).or_default().push(held),
                }
                Placed::Held
            }
            Hold::Due => {
                self.due.entry(table).or_default().push(held);
                Placed::Held
            }
        }
    }

    /// Announces the held files not yet announced beyond the commit they were uploaded
    /// for: before that commit, whose own pending records it completes. One record per
    /// table, so that the copy that publishes a table's files completes all of them.
    pub async fn announce_held(
        &mut self,
        store: &dyn object_store::ObjectStore,
        run_id: &str,
        floor: u64,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        let mut groups: Vec<&mut Vec<Held>> = Vec::new();
        groups.extend(self.due.values_mut());
        for c in self.copies.values_mut() {
            groups.extend(c.tables.values_mut().map(|t| &mut t.held));
        }
        groups.extend(self.early_held.values_mut());
        for held in groups {
            let keys: Vec<String> = held
                .iter()
                .filter(|h| h.pending.is_none())
                .map(|h| h.file.key.clone())
                .collect();
            if keys.is_empty() {
                continue;
            }
            let n = keys.len();
            let key = crate::checkpoint::announce_copy(store, floor, run_id, keys).await?;
            *self.refs.entry(key.clone()).or_default() += n;
            for h in held.iter_mut().filter(|h| h.pending.is_none()) {
                h.pending = Some(key.clone());
            }
        }
        Ok(())
    }

    /// Every transaction of the files held so far has ended (the stream reached a
    /// boundary): none of them is open any more.
    pub fn boundary(&mut self) {
        let mut groups: Vec<&mut Vec<Held>> = Vec::new();
        groups.extend(self.due.values_mut());
        for c in self.copies.values_mut() {
            groups.extend(c.tables.values_mut().map(|t| &mut t.held));
        }
        groups.extend(self.early_held.values_mut());
        for h in groups.into_iter().flatten() {
            h.open = false;
        }
    }

    /// A copy's point came through the stream, after every file written before it: the
    /// files held for its tables while it was due are sorted out against the point.
    /// Those wholly before it are in the copy and are deleted; those after it wait for
    /// the copy; one that straddles it is cut (and its rows at the point follow the
    /// copy's, see [`SNAPSHOT_TIE_SEQ`]).
    pub async fn start(
        &mut self,
        start: &CopyStart,
        sink: &Sink,
        run_id: &str,
        floor: u64,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        self.started(start);
        for t in &start.tables {
            let mut kept = Vec::new();
            for held in self.due.remove(&t.name).unwrap_or_default() {
                kept.extend(self.sort_out(held, start.from, sink, run_id, floor).await?);
            }
            if let Some(early) = self.early_held.remove(&(start.id, t.name.clone())) {
                kept.extend(early);
            }
            let state = self
                .copies
                .get_mut(&start.id)
                .and_then(|c| c.tables.get_mut(&t.name))
                .expect("registered above");
            state.held.extend(kept);
            if let Some(copied) = self.early.remove(&(start.id, t.name.clone())) {
                state.copied = Some(copied);
            }
        }
        for t in &start.dropped {
            for held in self.due.remove(t).unwrap_or_default() {
                self.drop_file(&held, sink).await?;
            }
        }
        Ok(())
    }

    async fn sort_out(
        &mut self,
        held: Held,
        from: Lsn,
        sink: &Sink,
        run_id: &str,
        floor: u64,
    ) -> Result<Option<Held>, crate::snapshot::SnapshotError> {
        let (first, last) = (held.file.first, held.file.last);
        if last.lsn < from {
            self.drop_file(&held, sink).await?;
            return Ok(None);
        }
        if first.lsn > from {
            return Ok(Some(held));
        }
        // Straddles the point, or starts at it with positions the copy's rows take.
        let recut =
            crate::sink::recut::from_point(sink, &held.file, &held.schema, &held.name, from, SNAPSHOT_TIE_SEQ).await?;
        let kept = match recut {
            Some(encoded) => {
                let pending = crate::checkpoint::announce_copy(
                    sink.store().as_ref(),
                    floor,
                    run_id,
                    vec![encoded.object.key.clone()],
                )
                .await?;
                self.refs.insert(pending.clone(), 1);
                let file = sink.write(encoded).await?;
                Some(Held {
                    file,
                    schema: held.schema.clone(),
                    name: held.name.clone(),
                    pending: Some(pending),
                    open: held.open,
                })
            }
            None => None,
        };
        self.drop_file(&held, sink).await?;
        Ok(kept)
    }

    /// Deletes a held file that will never be published (our own, uncommitted, and
    /// named by this writer alone).
    async fn drop_file(&mut self, held: &Held, sink: &Sink) -> Result<(), SinkError> {
        let key = crate::sink::key_path(&held.file.key);
        match sink.store().delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(SinkError::Put {
                    key: held.file.key.clone(),
                    source,
                });
            }
        }
        if let Some(pending) = &held.pending
            && let Some(n) = self.refs.get_mut(pending)
        {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(pending);
                self.retired.push(pending.clone());
            }
        }
        Ok(())
    }

    /// A table's copy is uploaded.
    pub fn copied(&mut self, c: TableCopied) {
        match self.copies.get_mut(&c.id).and_then(|s| s.tables.get_mut(&c.table)) {
            Some(t) => t.copied = Some(c),
            None => {
                tracing::info!(table = %c.table, snapshot_point = %c.lsn, "copy uploaded before the stream reached its point; it is published once the stream does");
                self.early.insert((c.id, c.table.clone()), c);
            }
        }
    }

    /// Copies whose point has come and whose rows are uploaded: publish them now. Not
    /// at a transaction boundary (`at_boundary` false), a copy that holds a file of a
    /// transaction still open waits for the boundary.
    pub fn take_ready(&mut self, at_boundary: bool) -> Vec<Ready> {
        let mut out = Vec::new();
        for state in self.copies.values_mut() {
            let ready: Vec<String> = state
                .tables
                .iter()
                .filter(|(_, t)| t.is_ready(at_boundary))
                .map(|(n, _)| n.clone())
                .collect();
            for name in ready {
                let t = state.tables.remove(&name).expect("listed");
                for h in &t.held {
                    if let Some(p) = &h.pending {
                        self.refs.remove(p);
                    }
                }
                out.push(Ready {
                    copied: t.copied.expect("filtered"),
                    identity: t.identity,
                    requests: t.requests,
                    held: t.held,
                });
            }
        }
        self.copies.retain(|_, c| !c.tables.is_empty());
        out
    }

    /// Whether any copy result is waiting to be published (see [`Handoff::take_ready`]).
    pub fn has_ready(&self, at_boundary: bool) -> bool {
        self.copies
            .values()
            .any(|c| c.tables.values().any(|t| t.is_ready(at_boundary)))
    }

    /// The copy of `table` is published: what waits for it from now on goes out at once.
    pub fn committed(&mut self, id: CopyId, table: &str) {
        self.committed.insert((id, table.to_owned()));
    }

    /// Pending records of dropped files, to be completed by the next commit.
    pub fn take_retired(&mut self) -> Vec<Path> {
        std::mem::take(&mut self.retired)
    }
}
