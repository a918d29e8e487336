//! One table's rows being built: its layout (Arrow schema, column kinds, partitioning)
//! and the builders, cut into one file per partition when taken.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use super::{
    BatchError, Hold, METADATA_COLUMNS, PartSource, RowPos, TableFile, UNREPRESENTED_COLUMN, column_partition,
    copy_formats, qualified, value,
};
use crate::change::TxInfo;
use crate::config::{PartitionBy, Partitions};
use crate::decode::Relation;

pub(super) struct Layout {
    pub(super) relation: Arc<Relation>,
    pub(super) kinds: Vec<value::Kind>,
    pub(super) schema: SchemaRef,
    /// Files have `_unrepresented`.
    pub(super) marker: bool,
    /// Where the partition of a row comes from.
    pub(super) part: PartSource,
    /// Which columns a copy of this table reads in binary ([`copy_formats`]).
    pub(super) copy_binary: Vec<bool>,
}

pub(super) fn string_list() -> DataType {
    DataType::List(Arc::new(Field::new("element", DataType::Utf8, true)))
}

pub(super) fn string_list_builder() -> ListBuilder<StringBuilder> {
    ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new("element", DataType::Utf8, true)))
}

impl Layout {
    pub(super) fn new(relation: Arc<Relation>, marker: bool, partitions: &Partitions) -> Result<Layout, BatchError> {
        let part = match partitions.of(&qualified(&relation)) {
            PartitionBy::CommitDate => PartSource::CommitDate,
            PartitionBy::CommitHour => PartSource::CommitHour,
            PartitionBy::Column(name) => match relation.columns.iter().position(|c| &c.name == name) {
                Some(i) => PartSource::Column(i, name.clone()),
                None => {
                    return Err(BatchError::PartitionColumn {
                        table: qualified(&relation),
                        column: name.clone(),
                    });
                }
            },
        };
        let mut fields = vec![
            Field::new("_op", DataType::Utf8, false),
            Field::new("_lsn", DataType::Int64, false),
            Field::new("_seq", DataType::Int64, false),
            Field::new("_xid", DataType::Int64, true),
            Field::new(
                "_commit_ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("_unchanged", string_list(), true),
        ];
        if marker {
            fields.push(Field::new(UNREPRESENTED_COLUMN, string_list(), true));
        }
        let mut kinds = Vec::with_capacity(relation.columns.len());
        for c in &relation.columns {
            if METADATA_COLUMNS.contains(&c.name.as_str()) || c.name == UNREPRESENTED_COLUMN {
                return Err(BatchError::ReservedColumn {
                    schema: relation.namespace.clone(),
                    table: relation.name.clone(),
                    column: c.name.clone(),
                });
            }
            let kind = value::Kind::for_type(c.type_oid, c.type_modifier);
            fields.push(Field::new(&c.name, kind.data_type(), true));
            kinds.push(kind);
        }
        let copy_binary = copy_formats(&relation, partitions);
        Ok(Layout {
            relation,
            kinds,
            schema: Arc::new(Schema::new(fields)),
            marker,
            part,
            copy_binary,
        })
    }
}

pub(super) struct PartRange {
    pub(super) partition: String,
    pub(super) start_row: usize,
    pub(super) first: RowPos,
    pub(super) last: RowPos,
}

pub(super) struct TableBuf {
    pub(super) layout: Arc<Layout>,
    /// Fixed when the buffer is opened: a table whose gate changes is sealed first.
    pub(super) hold: Hold,
    pub(super) op: StringBuilder,
    pub(super) lsn: Int64Builder,
    pub(super) seq: Int64Builder,
    pub(super) xid: Int64Builder,
    pub(super) commit_ts: TimestampMicrosecondBuilder,
    pub(super) unchanged: ListBuilder<StringBuilder>,
    pub(super) unrepresented: Option<ListBuilder<StringBuilder>>,
    pub(super) columns: Vec<value::Builder>,
    pub(super) rows: usize,
    pub(super) parts: Vec<PartRange>,
    /// Rows and data bytes per column of the last file finished: see [`TableBuf::presize`].
    last: (usize, Vec<usize>),
}

impl TableBuf {
    pub(super) fn new(layout: Arc<Layout>, hold: Hold) -> TableBuf {
        let columns = layout.kinds.iter().map(value::Builder::new).collect();
        let unrepresented = layout.marker.then(string_list_builder);
        TableBuf {
            layout,
            hold,
            op: StringBuilder::new(),
            lsn: Int64Builder::new(),
            seq: Int64Builder::new(),
            xid: Int64Builder::new(),
            commit_ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            unchanged: string_list_builder(),
            unrepresented,
            columns,
            rows: 0,
            parts: Vec::new(),
            last: (0, Vec::new()),
        }
    }

    /// Sizes empty builders for as many rows as the last file held. A copy's files are
    /// alike, and a builder grown by doubling copies its values over and over. Only on
    /// the way to appending a row: an idle table holds no room.
    pub(super) fn presize(&mut self) {
        let (rows, bytes) = &self.last;
        if self.rows > 0 || *rows == 0 {
            return;
        }
        for ((b, kind), bytes) in self.columns.iter_mut().zip(&self.layout.kinds).zip(bytes) {
            *b = value::Builder::with_capacity(kind, *rows, *bytes);
        }
        self.op = StringBuilder::with_capacity(*rows, *rows);
        self.lsn = Int64Builder::with_capacity(*rows);
        self.seq = Int64Builder::with_capacity(*rows);
        self.xid = Int64Builder::with_capacity(*rows);
        self.commit_ts = TimestampMicrosecondBuilder::with_capacity(*rows).with_timezone("UTC");
    }

    pub(super) fn extend_part(&mut self, partition: &str, pos: RowPos) {
        match self.parts.last_mut() {
            Some(p) if p.partition == partition => p.last = pos,
            _ => self.parts.push(PartRange {
                partition: partition.to_owned(),
                start_row: self.rows,
                first: pos,
                last: pos,
            }),
        }
    }

    /// `_op`, `_lsn`, `_seq`, `_xid` and `_commit_ts` of one row (`_unchanged` is the
    /// caller's).
    pub(super) fn append_meta(&mut self, op: &str, pos: RowPos, xid: Option<u32>, commit_ts: i64) {
        self.op.append_value(op);
        self.lsn.append_value(pos.lsn.0 as i64);
        self.seq.append_value(pos.seq as i64);
        // xid 0 is PostgreSQL's InvalidTransactionId: rows walshore writes itself (the
        // T marker before a re-snapshot) belong to no source transaction.
        self.xid.append_option(xid.filter(|x| *x != 0).map(i64::from));
        self.commit_ts.append_value(commit_ts);
    }

    /// [`TableBuf::append_meta`] and a null `_unchanged` for `n` rows of a copy (no
    /// `_xid`), whose `_seq` runs on from `first.seq`.
    pub(super) fn append_meta_run(&mut self, op: &str, first: RowPos, n: usize, commit_ts: i64) {
        for _ in 0..n {
            self.op.append_value(op);
            self.unchanged.append_null();
        }
        self.lsn.append_value_n(first.lsn.0 as i64, n);
        for seq in first.seq..first.seq + n as u64 {
            self.seq.append_value(seq as i64);
        }
        self.xid.append_nulls(n);
        self.commit_ts.append_value_n(commit_ts, n);
    }

    /// `_unrepresented` of one row: the names of the columns at `replaced`.
    pub(super) fn append_replaced(&mut self, replaced: &[usize]) {
        let Some(u) = self.unrepresented.as_mut() else { return };
        if replaced.is_empty() {
            u.append_null();
            return;
        }
        for &i in replaced {
            u.values().append_value(&self.layout.relation.columns[i].name);
        }
        u.append(true);
    }

    pub(super) fn finish(&mut self, out: &mut Vec<TableFile>) {
        if self.rows == 0 {
            return;
        }
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.op.finish()),
            Arc::new(self.lsn.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.xid.finish()),
            Arc::new(self.commit_ts.finish()),
            Arc::new(self.unchanged.finish()),
        ];
        arrays.extend(self.unrepresented.as_mut().map(|u| Arc::new(u.finish()) as ArrayRef));
        let values: Vec<ArrayRef> = self.columns.iter_mut().map(value::Builder::finish).collect();
        self.last = (self.rows, values.iter().map(|a| a.get_buffer_memory_size()).collect());
        arrays.extend(values);
        let batch =
            RecordBatch::try_new(self.layout.schema.clone(), arrays).expect("builders match the layout's schema");
        let rows = self.rows;
        let parts = std::mem::take(&mut self.parts);
        let ends: Vec<usize> = parts.iter().skip(1).map(|p| p.start_row).chain([rows]).collect();
        // One file per partition, holding all of its runs (a partition column's values
        // may alternate from row to row; commit-time partitions are one run each).
        struct Group {
            partition: String,
            runs: Vec<(usize, usize)>,
            first: RowPos,
            last: RowPos,
        }
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (p, end) in parts.into_iter().zip(ends) {
            match index.get(&p.partition) {
                Some(&g) => {
                    groups[g].runs.push((p.start_row, end));
                    groups[g].last = p.last;
                }
                None => {
                    index.insert(p.partition.clone(), groups.len());
                    groups.push(Group {
                        partition: p.partition,
                        runs: vec![(p.start_row, end)],
                        first: p.first,
                        last: p.last,
                    });
                }
            }
        }
        for Group {
            partition,
            runs,
            first,
            last,
        } in groups
        {
            let batch = match runs.as_slice() {
                [(start, end)] => batch.slice(*start, end - start),
                _ => {
                    let rows: arrow::array::UInt32Array = runs.iter().flat_map(|(s, e)| *s as u32..*e as u32).collect();
                    arrow::compute::take_record_batch(&batch, &rows).expect("row indices are in range")
                }
            };
            out.push(TableFile {
                schema: self.layout.relation.namespace.clone(),
                table: self.layout.relation.name.clone(),
                partition,
                first,
                last,
                batch,
                hold: self.hold,
            });
        }
        self.rows = 0;
    }
}

pub(super) struct OpenTx {
    pub(super) info: TxInfo,
    /// `dt=…` and `dt=…/hour=…` of the commit time.
    pub(super) partition: Arc<str>,
    pub(super) hour: Arc<str>,
    pub(super) seq: u64,
}

impl OpenTx {
    /// The partition of a row of `layout` whose partition column holds `value`.
    pub(super) fn partition_of<'a>(&'a self, layout: &Layout, value: Option<&[u8]>) -> std::borrow::Cow<'a, str> {
        match &layout.part {
            PartSource::CommitDate => (*self.partition).into(),
            PartSource::CommitHour => (*self.hour).into(),
            PartSource::Column(_, name) => column_partition(name, value).into(),
        }
    }
}
