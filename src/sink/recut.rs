//! Cutting an uploaded, uncommitted file at a copy's snapshot point: the stream may
//! write a table's changes before it knows where its copy's point is (the point waits
//! for open transactions; the stream does not), so the one file that straddles the point
//! is read back and written again with only its rows at or after the point.

use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::Int64Type;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{Encoded, Sink, SinkError, WrittenObject, key_path};
use crate::batch::{RowPos, TableFile};
use crate::lsn::Lsn;

/// `file` (of `schema`.`table`) without its rows before `from`; rows at `from` itself
/// have `tie` added to their `_seq`, so that they follow the copy's rows there. None
/// when no row is left.
pub async fn from_point(
    sink: &Sink,
    file: &WrittenObject,
    schema: &str,
    table: &str,
    from: Lsn,
    tie: u64,
) -> Result<Option<Encoded>, SinkError> {
    let path = key_path(&file.key);
    let read_err = |source| SinkError::Read {
        key: file.key.clone(),
        source,
    };
    let bytes = sink
        .store()
        .get(&path)
        .await
        .map_err(read_err)?
        .bytes()
        .await
        .map_err(read_err)?;
    let decode_err = |source| SinkError::Encode {
        table: file.table.clone(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(decode_err)?
        .build()
        .map_err(decode_err)?;
    let mut kept = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| decode_err(e.into()))?;
        if let Some(b) = cut(&batch, from, tie) {
            kept.push(b);
        }
    }
    let Some(schema_ref) = kept.first().map(RecordBatch::schema) else {
        return Ok(None);
    };
    let batch = arrow::compute::concat_batches(&schema_ref, &kept).map_err(|e| decode_err(e.into()))?;
    let position = |i: usize| RowPos {
        lsn: Lsn(batch.column(1).as_primitive::<Int64Type>().value(i) as u64),
        seq: batch.column(2).as_primitive::<Int64Type>().value(i) as u64,
    };
    let cut_file = TableFile {
        schema: schema.to_owned(),
        table: table.to_owned(),
        partition: file.partition.clone(),
        first: position(0),
        last: position(batch.num_rows() - 1),
        batch,
        hold: crate::batch::Hold::None,
    };
    let props = sink.props().clone();
    let writer = sink.writer().to_owned();
    let encoded = tokio::task::spawn_blocking(move || Sink::encode(&props, &writer, &cut_file));
    match encoded.await {
        Ok(r) => r.map(Some),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The rows of `batch` at or after `from` (column 1 is `_lsn`, 2 is `_seq`), the rows at
/// `from` moved up by `tie`.
fn cut(batch: &RecordBatch, from: Lsn, tie: u64) -> Option<RecordBatch> {
    let lsn = batch.column(1).as_primitive::<Int64Type>();
    let keep: BooleanArray = lsn.iter().map(|l| l.map(|l| l as u64 >= from.0)).collect();
    let kept = arrow::compute::filter_record_batch(batch, &keep).ok()?;
    if kept.num_rows() == 0 {
        return None;
    }
    let lsn = kept.column(1).as_primitive::<Int64Type>().clone();
    let seq = kept.column(2).as_primitive::<Int64Type>();
    let moved: Int64Array = (0..kept.num_rows())
        .map(|i| {
            let s = seq.value(i);
            if lsn.value(i) as u64 == from.0 && (s as u64) < tie {
                s + tie as i64
            } else {
                s
            }
        })
        .collect();
    let mut columns = kept.columns().to_vec();
    columns[2] = Arc::new(moved);
    RecordBatch::try_new(kept.schema(), columns).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn a_cut_keeps_rows_from_the_point_and_moves_those_at_it_past_the_copy() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("_op", DataType::Utf8, false),
            Field::new("_lsn", DataType::Int64, false),
            Field::new("_seq", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["I", "I", "U", "D"])),
                Arc::new(Int64Array::from(vec![100, 200, 200, 300])),
                Arc::new(Int64Array::from(vec![0, 0, 1, 0])),
            ],
        )
        .unwrap();
        let kept = cut(&batch, Lsn(200), 1 << 62).unwrap();
        let lsn: Vec<i64> = kept.column(1).as_primitive::<Int64Type>().values().to_vec();
        let seq: Vec<i64> = kept.column(2).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(lsn, [200, 200, 300]);
        assert_eq!(seq, [1 << 62, (1 << 62) + 1, 0]);
        assert!(cut(&batch, Lsn(400), 1 << 62).is_none());
    }
}
