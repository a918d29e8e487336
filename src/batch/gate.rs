//! Gates: which of a table's changes the batcher writes while and after the table is
//! copied, what its files wait for ([`Hold`]), and which table a name stands for (a new
//! OID under an old name is a new table).

use std::collections::HashMap;

use super::{Batcher, qualified};
use crate::change::CopyId;
use crate::decode::Relation;
use crate::lsn::Lsn;

/// Whether a file may be published at the next commit, or waits for a table copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hold {
    /// Published with the transactions it holds.
    None,
    /// Its table's copy is due and the copy's snapshot point not known: the sink keeps
    /// it back and sorts it out against the point (rows before it are in the copy).
    Due,
    /// Written after this copy's snapshot point: published with the copy, or at once if
    /// the copy has committed.
    Copy(CopyId),
}

/// Which of a table's changes the batcher writes, while and after it is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// A copy is due but its snapshot point is not known yet: everything is written,
    /// and the files are held back ([`Hold::Due`]) until the point sorts them out.
    Due,
    /// Copied at this snapshot point: only transactions committed at or after it are
    /// written (the earlier ones are in the copy). `copy`: the copy of this run that
    /// took the point, whose commit the files wait for.
    From { lsn: Lsn, copy: Option<CopyId> },
}

/// True when a change of `rel_id` in a transaction committed at `lsn` is in a copy of
/// its table (and not written).
pub(super) fn gated(gates: &HashMap<u32, Gate>, rel_id: u32, lsn: Lsn) -> bool {
    match gates.get(&rel_id) {
        Some(Gate::From { lsn: from, .. }) => lsn < *from,
        None | Some(Gate::Due) => false,
    }
}

/// What a table's files wait for under `gate`.
pub(super) fn hold_of(gate: Option<&Gate>) -> Hold {
    match gate {
        Some(Gate::From { copy: Some(id), .. }) => Hold::Copy(*id),
        Some(Gate::Due) => Hold::Due,
        Some(Gate::From { copy: None, .. }) | None => Hold::None,
    }
}

impl Batcher {
    /// A batcher that writes each table's changes only from its gate on; with
    /// `unknown_due`, tables it has no gate for are [`Gate::Due`].
    pub fn with_gates(gates: HashMap<String, Gate>, unknown_due: bool) -> Batcher {
        Batcher {
            points: gates
                .values()
                .filter_map(|g| match g {
                    Gate::From { lsn, .. } => Some(*lsn),
                    Gate::Due => None,
                })
                .collect(),
            gates,
            unknown_due,
            ..Batcher::default()
        }
    }

    /// The OID each table stands for, as recorded; with `record`, OIDs first seen and
    /// changed are handed over for recording, and a new table under an old name starts
    /// with a `T` row (there is no copy to do it).
    pub fn with_oids(mut self, oids: HashMap<String, u32>, record: bool) -> Batcher {
        self.oids = oids;
        self.record_oids = record;
        self
    }

    /// Sets the gate of `schema.table`. Rows buffered under the old gate are sealed
    /// into their own files: a file's [`Hold`] is one for all its rows.
    pub fn set_gate(&mut self, table: &str, gate: Gate) {
        self.gates.insert(table.to_owned(), gate);
        if let Gate::From { lsn, .. } = gate {
            self.points.insert(lsn);
        }
        let ids: Vec<u32> = self
            .layouts
            .iter()
            .filter(|(_, l)| qualified(&l.relation) == table)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.rel_gates.insert(id, gate);
            if let Some(mut buf) = self.tables.remove(&id) {
                buf.finish(&mut self.sealed);
            }
        }
    }

    pub(super) fn gate_of(&self, table: &str) -> Option<Gate> {
        self.gates.get(table).copied().or(self.unknown_due.then_some(Gate::Due))
    }

    pub(super) fn resolve_gate(&mut self, rel: &Relation) {
        match self.gate_of(&qualified(rel)) {
            Some(g) => self.rel_gates.insert(rel.id, g),
            None => self.rel_gates.remove(&rel.id),
        };
    }

    /// A Relation under a name that stood for another OID: a table dropped and created
    /// again (or another table renamed to it). Returns true when a `T` row is to start
    /// it (`record_oids`); with copies, its changes are held until its copy.
    pub(super) fn new_identity(&mut self, rel: &Relation, name: &str) -> bool {
        match self.oids.get(name) {
            Some(&oid) if oid == rel.id => false,
            None => {
                self.oids.insert(name.to_owned(), rel.id);
                if self.record_oids {
                    self.oid_changes.push((name.to_owned(), rel.id));
                }
                false
            }
            Some(&old) => {
                tracing::info!(table = %name, old_oid = old, new_oid = rel.id, "a new table under an old name (dropped and created again, or renamed to it)");
                self.oids.insert(name.to_owned(), rel.id);
                // The old table's state goes (a table renamed away gets a new Relation
                // before its next change): nothing here grows with every rebuild.
                if let Some(mut buf) = self.tables.remove(&old) {
                    buf.finish(&mut self.sealed);
                }
                self.layouts.remove(&old);
                self.rel_gates.remove(&old);
                self.snapshot_seq.remove(&old);
                if self.record_oids {
                    self.oid_changes.push((name.to_owned(), rel.id));
                    true
                } else {
                    // Its rows go to the lake through a copy; until then they are held.
                    if self.unknown_due {
                        self.set_gate(name, Gate::Due);
                    }
                    false
                }
            }
        }
    }
}
