//! Changes -> per-table Arrow record batches with the metadata columns.
//!
//! Contract: [`Batcher`] is synchronous and pure (no IO, no tokio). `push` takes the
//! source's events in commit order; `take` hands over everything buffered as one
//! [`TableFile`] per (table, schema version, partition). Memory is bounded by the caller,
//! who reads [`Batcher::buffered_bytes`] and calls `take` when it passes the limit, even in
//! the middle of a transaction: a file then ends inside that transaction, at a row
//! position that depends only on the data ("a deterministic slice"). A file's rows are
//! exactly the table's rows in its partition between its `first` and `last` positions, so
//! two files with the same positions hold the same rows.
//!
//! Row semantics (DESIGN.md): an update whose key changed becomes `D` of the old key and
//! `I` of the new row; under REPLICA IDENTITY FULL every update does. A value PostgreSQL
//! did not send (unchanged TOAST) is taken from the old row when PostgreSQL sent it,
//! otherwise it is null and named in `_unchanged`.
//!
//! Also here, all pure: gates (a table's changes are written from its snapshot point
//! on, [`Gate`]), the lake schema each Relation is checked against ([`schema`]), the
//! `sink.unrepresentable` policy, and partitions (commit date, commit hour or a
//! column's escaped value; one file per partition).

pub mod copy_binary;
mod gate;
mod numeric;
mod partition;
pub mod schema;
mod table;
pub(crate) mod value;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;

use crate::change::{Change, CopyStart, Event};
use crate::config::{Partitions, Unrepresentable};
use crate::decode::{Relation, Tuple, TupleValue};
use crate::lsn::Lsn;
pub use gate::{Gate, Hold};
use gate::{gated, hold_of};
use partition::PartSource;
pub use partition::{NULL_PARTITION, column_partition, copy_formats, date_partition, hour_partition};
use table::{Layout, OpenTx, TableBuf};
pub use value::{civil_from_days, copies_binary, days_from_civil, is_array};

/// The metadata columns every row carries (DESIGN.md), in file order.
pub const METADATA_COLUMNS: [&str; 6] = ["_op", "_lsn", "_seq", "_xid", "_commit_ts", "_unchanged"];

/// With `sink.unrepresentable` = "null" or "clamp", files also have this column: the
/// names of the row's columns whose value was replaced; null when none.
pub const UNREPRESENTED_COLUMN: &str = "_unrepresented";

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(
        "column {schema}.{table}.{column} at lsn {lsn}: {reason}; nothing from this transaction on was written, and it is retried at every start (to skip it on purpose, losing it, advance the slot past it with pg_replication_slot_advance)"
    )]
    Value {
        schema: String,
        table: String,
        column: String,
        lsn: Lsn,
        reason: String,
    },
    #[error(
        "table {schema}.{table} has a column named {column}, which walshore reserves for its metadata; rename the column"
    )]
    ReservedColumn {
        schema: String,
        table: String,
        column: String,
    },
    #[error(
        "column {table}.{column} changed type from {from} to {to} at lsn {lsn}, which is not a widening: the lake's files hold {from} and a reader sees one type per column; nothing from this transaction on was written. Way out: stop walshore, move the folder of {table} in the sink aside (it keeps the old version) and delete _walshore/schemas/{table}.json, run walshore resnapshot --table {table}, and start walshore again: the table is copied anew with its new types while the stream goes on"
    )]
    Retype {
        table: String,
        column: String,
        from: String,
        to: String,
        lsn: Lsn,
    },
    #[error(
        "partitions.\"{table}\" = \"column:{column}\", but {table} has no column {column} (PostgreSQL sends no generated columns either); fix [partitions] in the config"
    )]
    PartitionColumn { table: String, column: String },
    #[error("protocol violation at lsn {lsn}: {what}")]
    Protocol { lsn: Lsn, what: String },
}

/// First `_seq` of a transaction committed exactly at a snapshot point: past every
/// `_seq` of the copy's rows (chunk `k` starts at `k << 32`).
pub const SNAPSHOT_TIE_SEQ: u64 = 1 << 62;

/// A position in the change stream: `(_lsn, _seq)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct RowPos {
    pub lsn: Lsn,
    pub seq: u64,
}

/// The rows of one table, schema version and partition taken from the batcher.
pub struct TableFile {
    pub schema: String,
    pub table: String,
    /// Partition path segment, e.g. `dt=2026-11-22`.
    pub partition: String,
    pub first: RowPos,
    pub last: RowPos,
    pub batch: RecordBatch,
    pub hold: Hold,
}

/// Everything `take` hands over, and whether it ends on a transaction boundary.
pub struct Taken {
    pub files: Vec<TableFile>,
    /// Set when no transaction is open: everything up to this LSN is in `files` or in
    /// earlier takes.
    pub end_lsn: Option<Lsn>,
    /// Commit time of the last committed transaction (µs since the Unix epoch).
    pub commit_ts: Option<i64>,
    /// Lake schemas changed by these files: recorded before they are committed.
    pub schemas: Vec<(String, schema::LakeSchema)>,
    /// Copies whose snapshot point became known after every file above was written:
    /// the sink sorts out the files it holds for them once these files are in.
    pub copy_starts: Vec<Arc<CopyStart>>,
    /// Table OIDs to record (`snapshot.mode = "never"`; with copies, each copy records
    /// its table's).
    pub oids: Vec<(String, u32)>,
}

/// A row walshore writes itself rather than a change's: a truncate's (all null), and a
/// new table's first `T`, placed just before its transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marker {
    No,
    InTransaction,
    BeforeTransaction,
}

/// After a value failed to append: with a policy other than "error", an infinity or NaN
/// the column's type cannot hold is written as null or clamped, and its column noted.
fn fallback(
    policy: Unrepresentable,
    b: &mut value::Builder,
    raw: &[u8],
    binary: bool,
    err: value::ValueError,
    replaced: &mut Vec<usize>,
    column: usize,
) -> Result<(), value::ValueError> {
    let Some(special) = b.special(raw, binary) else {
        return Err(err);
    };
    match policy {
        Unrepresentable::Error => return Err(err),
        Unrepresentable::Null => b.append_null(),
        Unrepresentable::Clamp => {
            if !b.append_clamped(special) {
                b.append_null();
            }
        }
    }
    replaced.push(column);
    Ok(())
}

/// `schema.table`, the name tables go by in the commit log and the config.
pub fn qualified(rel: &Relation) -> String {
    format!("{}.{}", rel.namespace, rel.name)
}

#[derive(Default)]
pub struct Batcher {
    layouts: HashMap<u32, Arc<Layout>>,
    /// Gates by `schema.table`.
    gates: HashMap<String, Gate>,
    /// Tables without a gate are due for a copy (`snapshot.mode = "initial"`).
    unknown_due: bool,
    /// The OID each table name stands for (recorded, from a copy, or first seen): a
    /// Relation under the name with another OID is a new table.
    oids: HashMap<String, u32>,
    /// Record OIDs and start a new table under an old name with a `T` row
    /// (`snapshot.mode = "never"`: no copy does it).
    record_oids: bool,
    oid_changes: Vec<(String, u32)>,
    copy_starts: Vec<Arc<CopyStart>>,
    /// Relations of tables whose copy is due, kept until the copy's point says which of
    /// them the lake schema takes (those at or after it).
    due_relations: HashMap<String, Vec<(Lsn, Arc<Relation>)>>,
    /// The gate of each relation id, resolved from `gates` by name.
    rel_gates: HashMap<u32, Gate>,
    /// The snapshot points of `gates`.
    points: std::collections::HashSet<Lsn>,
    /// What to do with values the column's type cannot hold.
    unrepresentable: Unrepresentable,
    partitions: Arc<Partitions>,
    /// Lake schemas by `schema.table`, and the ones changed since the last `take`.
    lake: HashMap<String, schema::LakeSchema>,
    schema_changes: Vec<(String, schema::LakeSchema)>,
    /// Open buffers, plus buffers of superseded schema versions waiting for `take`.
    tables: HashMap<u32, TableBuf>,
    sealed: Vec<TableFile>,
    tx: Option<OpenTx>,
    /// The commit-time partitions of the last transaction's hour (since the Unix
    /// epoch): a stream of small transactions formats them once an hour, not each time.
    commit_hour: Option<(i64, Arc<str>, Arc<str>)>,
    /// Next `_seq` of snapshot rows, per table.
    snapshot_seq: HashMap<u32, u64>,
    bytes: usize,
    last_end: Option<Lsn>,
    last_commit_ts: Option<i64>,
}

impl Batcher {
    pub fn new() -> Batcher {
        Batcher::default()
    }

    /// Sets `[partitions]`.
    pub fn with_partitions(mut self, partitions: Arc<Partitions>) -> Batcher {
        self.partitions = partitions;
        self
    }

    /// Sets `sink.unrepresentable`.
    pub fn with_unrepresentable(mut self, policy: Unrepresentable) -> Batcher {
        self.unrepresentable = policy;
        self
    }

    /// The lake schemas recorded so far, to check Relation messages against.
    pub fn with_lake_schemas(mut self, lake: HashMap<String, schema::LakeSchema>) -> Batcher {
        self.lake = lake;
        self
    }

    /// Starts `_seq` of the snapshot rows of `rel_id` at `seq` (a chunk's base).
    pub fn set_snapshot_seq(&mut self, rel_id: u32, seq: u64) {
        self.snapshot_seq.insert(rel_id, seq);
    }

    /// Approximate bytes of row data buffered.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// True when something is buffered that `take` would hand over.
    pub fn has_data(&self) -> bool {
        !self.sealed.is_empty()
            || self.tables.values().any(|t| t.rows > 0)
            || self.last_end.is_some()
            || !self.copy_starts.is_empty()
            || !self.oid_changes.is_empty()
    }

    pub fn push(&mut self, event: Event) -> Result<(), BatchError> {
        match event {
            Event::Begin(info) => {
                let hour = info.commit_ts.div_euclid(3_600_000_000);
                let (_, partition, hour) = match &self.commit_hour {
                    Some(cached) if cached.0 == hour => cached,
                    _ => self.commit_hour.insert((
                        hour,
                        date_partition(info.commit_ts).into(),
                        hour_partition(info.commit_ts).into(),
                    )),
                };
                self.tx = Some(OpenTx {
                    info,
                    partition: partition.clone(),
                    hour: hour.clone(),
                    // The rare transaction whose commit record starts exactly at a
                    // snapshot point shares `_lsn` with that copy's `R` rows; its
                    // changes come after the copy, so their positions follow all of
                    // its rows.
                    seq: if self.points.contains(&info.commit_lsn) {
                        SNAPSHOT_TIE_SEQ
                    } else {
                        0
                    },
                });
            }
            Event::Relation(rel) => self.relation(rel)?,
            Event::Change(change) => self.change(change)?,
            Event::Commit { end_lsn } => {
                let tx = self.tx.take().ok_or(BatchError::Protocol {
                    lsn: end_lsn,
                    what: "commit without begin".into(),
                })?;
                self.last_end = Some(end_lsn);
                self.last_commit_ts = Some(tx.info.commit_ts);
            }
            Event::CopyDue { tables } => {
                for t in tables {
                    self.set_gate(&t, Gate::Due);
                }
            }
            Event::CopyStart(start) => {
                for t in &start.tables {
                    self.set_gate(
                        &t.name,
                        Gate::From {
                            lsn: start.from,
                            copy: Some(start.id),
                        },
                    );
                    self.oids.insert(t.name.clone(), t.identity.oid);
                    // The table as copied, then as the stream changed it after the
                    // point while the point was not known.
                    self.merge_schema(&t.name, &t.relation, start.from)?;
                    for (lsn, rel) in self.due_relations.remove(&t.name).unwrap_or_default() {
                        if lsn >= start.from {
                            self.merge_schema(&t.name, &rel, lsn)?;
                        }
                    }
                }
                for t in &start.dropped {
                    self.due_relations.remove(t);
                }
                self.copy_starts.push(start);
            }
            Event::Idle { .. } => {}
        }
        Ok(())
    }

    fn relation(&mut self, rel: Arc<Relation>) -> Result<(), BatchError> {
        self.resolve_gate(&rel);
        let name = qualified(&rel);
        let lsn = self.tx.as_ref().map_or(Lsn::ZERO, |t| t.info.commit_lsn);
        // Changes a copy holds are not written: whose they are does not matter. Nor do a
        // skipped resend's (its Relation comes outside a transaction): what it held is
        // committed, with the OID it recorded.
        let starts_with_truncate =
            self.tx.is_some() && !gated(&self.rel_gates, rel.id, lsn) && self.new_identity(&rel, &name);
        self.resolve_gate(&rel);
        // A table whose changes here are held by a copy has the copy's schema; the
        // columns of this (skipped) transaction do not matter to the lake. Nor do those
        // of a table whose copy is due, until its point says which of them count.
        if gated(&self.rel_gates, rel.id, lsn) {
        } else if self.rel_gates.get(&rel.id) == Some(&Gate::Due) {
            self.due_relations
                .entry(name.clone())
                .or_default()
                .push((lsn, rel.clone()));
        } else {
            self.merge_schema(&name, &rel, lsn)?;
        }
        if let Some(old) = self.layouts.get(&rel.id)
            && old.relation.columns == rel.columns
            && old.relation.name == rel.name
            && old.relation.namespace == rel.namespace
        {
            return Ok(());
        }
        let marker = self.unrepresentable != Unrepresentable::Error;
        let layout = Arc::new(Layout::new(rel.clone(), marker, &self.partitions)?);
        // Rows buffered under the old schema keep it: seal them into their own files.
        if let Some(mut buf) = self.tables.remove(&rel.id) {
            buf.finish(&mut self.sealed);
        }
        self.layouts.insert(rel.id, layout);
        if starts_with_truncate {
            // Just before this transaction: no transaction commits at commit LSN - 1
            // (WAL records start on 8-byte boundaries), and the old table's rows of
            // earlier transactions sort before it.
            self.row(rel.id, "T", &Vec::new(), None, Marker::BeforeTransaction)?;
        }
        Ok(())
    }

    /// Brings the lake schema of `name` up to `rel` (a change is handed over with the
    /// next `take`); a type change that is not a widening is an error at `lsn`.
    fn merge_schema(&mut self, name: &str, rel: &Relation, lsn: Lsn) -> Result<(), BatchError> {
        match self.lake.get(name).cloned().unwrap_or_default().merge(rel) {
            Ok(None) => Ok(()),
            Ok(Some(next)) => {
                self.lake.insert(name.to_owned(), next.clone());
                self.schema_changes.push((name.to_owned(), next));
                Ok(())
            }
            Err(e) => Err(BatchError::Retype {
                table: name.to_owned(),
                column: e.column,
                from: e.from,
                to: e.to,
                lsn,
            }),
        }
    }

    fn change(&mut self, change: Change) -> Result<(), BatchError> {
        match change {
            Change::Insert { rel_id, new } => self.row(rel_id, "I", &new, None, Marker::No),
            Change::Update {
                rel_id,
                old,
                old_is_full_row,
                new,
            } => match old {
                None => self.row(rel_id, "U", &new, None, Marker::No),
                Some(old) => {
                    let full = old_is_full_row.then_some(&old);
                    self.row(rel_id, "D", &old, None, Marker::No)?;
                    self.row(rel_id, "I", &new, full, Marker::No)
                }
            },
            Change::Delete { rel_id, old, .. } => self.row(rel_id, "D", &old, None, Marker::No),
            Change::SnapshotBinaryRows { rel_id, rows } => self.snapshot_binary_rows(rel_id, &rows),
            Change::Truncate { rel_ids } => {
                for rel_id in rel_ids {
                    self.row(rel_id, "T", &Vec::new(), None, Marker::InTransaction)?;
                }
                Ok(())
            }
        }
    }

    // `i` indexes the tuple, the builders and the relation's columns alike.
    #[allow(clippy::needless_range_loop)]
    fn row(
        &mut self,
        rel_id: u32,
        op: &'static str,
        tuple: &Tuple,
        old_full: Option<&Tuple>,
        marker: Marker,
    ) -> Result<(), BatchError> {
        let all_null = marker != Marker::No;
        let tx = self.tx.as_mut().ok_or(BatchError::Protocol {
            lsn: Lsn::ZERO,
            what: "row change outside a transaction".into(),
        })?;
        let lsn = tx.info.commit_lsn;
        let Some(layout) = self.layouts.get(&rel_id) else {
            return Err(BatchError::Protocol {
                lsn,
                what: format!("change for relation {rel_id} before its Relation message"),
            });
        };
        if gated(&self.rel_gates, rel_id, lsn) {
            // Positions stay those of the transaction's changes, gated or not.
            tx.seq += 1;
            return Ok(());
        }
        let hold = hold_of(self.rel_gates.get(&rel_id));
        let buf = self
            .tables
            .entry(rel_id)
            .or_insert_with(|| TableBuf::new(layout.clone(), hold));
        let layout = buf.layout.clone();
        let ncols = layout.kinds.len();
        let policy = self.unrepresentable;
        if !all_null && tuple.len() != ncols {
            return Err(BatchError::Protocol {
                lsn,
                what: format!(
                    "{}.{}: tuple has {} columns, relation has {ncols}",
                    layout.relation.namespace,
                    layout.relation.name,
                    tuple.len()
                ),
            });
        }
        let pos = match marker {
            Marker::BeforeTransaction => RowPos {
                lsn: Lsn(lsn.0.saturating_sub(1)),
                seq: 0,
            },
            _ => RowPos { lsn, seq: tx.seq },
        };
        let part_value = match &layout.part {
            PartSource::Column(i, _) if !all_null => match &tuple[*i] {
                TupleValue::Text(raw) => Some(&raw[..]),
                TupleValue::Unchanged => match old_full.and_then(|o| o.get(*i)) {
                    Some(TupleValue::Text(raw)) => Some(&raw[..]),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        buf.extend_part(&tx.partition_of(&layout, part_value), pos);
        // Values first: a value error must leave no half-appended row behind, so the
        // builders are checked before the metadata columns are appended.
        let mut bytes = 48;
        let mut unchanged = false;
        let mut replaced = Vec::new();
        for i in 0..ncols {
            let mut v = if all_null { &TupleValue::Null } else { &tuple[i] };
            if let (TupleValue::Unchanged, Some(old)) = (v, old_full) {
                v = old.get(i).unwrap_or(&TupleValue::Null);
            }
            let res = match v {
                TupleValue::Null => {
                    buf.columns[i].append_null();
                    Ok(())
                }
                TupleValue::Unchanged => {
                    unchanged = true;
                    buf.columns[i].append_null();
                    Ok(())
                }
                TupleValue::Text(raw) => {
                    bytes += raw.len() + 8;
                    let b = &mut buf.columns[i];
                    b.append_text(raw)
                        .or_else(|e| fallback(policy, b, raw, false, e, &mut replaced, i))
                        .map_err(|e| e.0)
                }
                TupleValue::Binary(_) => Err("binary value received, but text format was requested".into()),
            };
            if let Err(reason) = res {
                return Err(BatchError::Value {
                    schema: layout.relation.namespace.clone(),
                    table: layout.relation.name.clone(),
                    column: layout.relation.columns[i].name.clone(),
                    lsn,
                    reason,
                });
            }
        }
        buf.append_meta(op, pos, Some(tx.info.xid), tx.info.commit_ts);
        buf.append_replaced(&replaced);
        if unchanged {
            for (i, v) in tuple.iter().enumerate() {
                if matches!(v, TupleValue::Unchanged) {
                    buf.unchanged.values().append_value(&layout.relation.columns[i].name);
                }
            }
            buf.unchanged.append(true);
        } else {
            buf.unchanged.append_null();
        }
        buf.rows += 1;
        if marker != Marker::BeforeTransaction {
            tx.seq += 1;
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Rows of a table copy in COPY's binary format: columns where [`copy_formats`]
    /// says binary carry their binary value, the others their output text.
    fn snapshot_binary_rows(&mut self, rel_id: u32, mut rows: &[u8]) -> Result<(), BatchError> {
        let tx = self.tx.as_mut().ok_or(BatchError::Protocol {
            lsn: Lsn::ZERO,
            what: "snapshot rows outside the snapshot transaction".into(),
        })?;
        let lsn = tx.info.commit_lsn;
        let Some(layout) = self.layouts.get(&rel_id) else {
            return Err(BatchError::Protocol {
                lsn,
                what: format!("snapshot rows for relation {rel_id} before its Relation"),
            });
        };
        let buf = self
            .tables
            .entry(rel_id)
            .or_insert_with(|| TableBuf::new(layout.clone(), Hold::None));
        buf.presize();
        let seq = self.snapshot_seq.entry(rel_id).or_insert(0);
        let relation = buf.layout.relation.clone();
        let layout = buf.layout.clone();
        let binary = &layout.copy_binary;
        let part_col = match &layout.part {
            PartSource::Column(i, _) => Some(*i),
            _ => None,
        };
        let ncols = relation.columns.len();
        let policy = self.unrepresentable;
        // The block's rows share `_op`, `_lsn`, `_xid`, `_commit_ts` and (unless a column
        // partitions the table) the partition: those go in once for the whole run, after
        // it. An error leaves the buffer uneven, but an error ends the copy and its
        // batcher with it.
        let first = RowPos { lsn, seq: *seq };
        if part_col.is_none() && !rows.is_empty() {
            buf.extend_part(&tx.partition_of(&layout, None), first);
        }
        while !rows.is_empty() {
            let before = rows.len();
            let columns = &mut buf.columns;
            let mut failed_column = 0;
            let mut replaced = Vec::new();
            let mut part_value: Option<Vec<u8>> = None;
            let n = copy_binary::for_each_field(&mut rows, |i, v| {
                failed_column = i;
                if Some(i) == part_col {
                    part_value = v.map(<[u8]>::to_vec);
                }
                let Some(builder) = columns.get_mut(i) else {
                    return Err(format!("COPY row has more than {ncols} columns"));
                };
                match v {
                    None => {
                        builder.append_null();
                        Ok(())
                    }
                    Some(raw) => if binary[i] {
                        builder.append_binary(raw)
                    } else {
                        builder.append_text(raw)
                    }
                    .or_else(|e| fallback(policy, builder, raw, binary[i], e, &mut replaced, i))
                    .map_err(|e| e.0),
                }
            })
            .map_err(|reason| BatchError::Value {
                schema: relation.namespace.clone(),
                table: relation.name.clone(),
                column: relation
                    .columns
                    .get(failed_column)
                    .map_or_else(|| "(copy row)".into(), |c| c.name.clone()),
                lsn,
                reason,
            })?;
            if n != ncols {
                return Err(BatchError::Protocol {
                    lsn,
                    what: format!(
                        "{}.{}: COPY row has {n} columns, expected {ncols}",
                        relation.namespace, relation.name
                    ),
                });
            }
            let pos = RowPos { lsn, seq: *seq };
            if part_col.is_some() {
                buf.extend_part(&tx.partition_of(&layout, part_value.as_deref()), pos);
            }
            buf.append_replaced(&replaced);
            buf.rows += 1;
            *seq += 1;
            self.bytes += before - rows.len() + 48;
        }
        let n = (*seq - first.seq) as usize;
        if n > 0 {
            let last = RowPos { lsn, seq: *seq - 1 };
            if part_col.is_none() {
                buf.extend_part(&tx.partition_of(&layout, None), last);
            }
            buf.append_meta_run("R", first, n, tx.info.commit_ts);
        }
        Ok(())
    }

    /// Hands over everything buffered. When no transaction is open the result ends on a
    /// transaction boundary and carries its `end_lsn`.
    pub fn take(&mut self) -> Taken {
        let mut files = std::mem::take(&mut self.sealed);
        let mut ids: Vec<u32> = self.tables.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.tables.get_mut(&id).expect("listed").finish(&mut files);
        }
        self.bytes = 0;
        let (end_lsn, commit_ts) = if self.tx.is_none() {
            (self.last_end.take(), self.last_commit_ts.take())
        } else {
            (None, None)
        };
        Taken {
            files,
            end_lsn,
            commit_ts,
            schemas: std::mem::take(&mut self.schema_changes),
            copy_starts: std::mem::take(&mut self.copy_starts),
            oids: std::mem::take(&mut self.oid_changes),
        }
    }

    /// A copy's snapshot point arrived since the last `take`: hand everything over now,
    /// so that the sink sorts out the files held for it with all of them in.
    pub fn copy_started(&self) -> bool {
        !self.copy_starts.is_empty()
    }
}

#[cfg(test)]
mod tests;
