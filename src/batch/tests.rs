use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bytes::Bytes;

use super::*;
use crate::decode::{Column, ReplicaIdentity};

fn rel(id: u32) -> Arc<Relation> {
    Arc::new(Relation {
        id,
        namespace: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            },
            Column {
                key: false,
                name: "body".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    })
}

fn t(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn begin(b: &mut Batcher, lsn: u64) {
    b.push(Event::Begin(TxInfo {
        xid: 7,
        commit_lsn: Lsn(lsn),
        commit_ts: 0,
    }))
    .unwrap();
}

#[test]
fn key_change_becomes_delete_then_insert_with_consecutive_seq() {
    let mut b = Batcher::new();
    begin(&mut b, 100);
    b.push(Event::Relation(rel(1))).unwrap();
    b.push(Event::Change(Change::Insert {
        rel_id: 1,
        new: vec![t("1"), t("a")],
    }))
    .unwrap();
    b.push(Event::Change(Change::Update {
        rel_id: 1,
        old: Some(vec![t("1"), TupleValue::Null]),
        old_is_full_row: false,
        new: vec![t("2"), TupleValue::Unchanged],
    }))
    .unwrap();
    b.push(Event::Commit { end_lsn: Lsn(120) }).unwrap();
    let taken = b.take();
    assert_eq!(taken.end_lsn, Some(Lsn(120)));
    assert_eq!(taken.files.len(), 1);
    let f = &taken.files[0];
    assert_eq!(f.partition, "dt=1970-01-01");
    assert_eq!((f.first.seq, f.last.seq), (0, 2));
    let batch = &f.batch;
    let ops: Vec<_> = batch.column(0).as_string::<i32>().iter().map(|o| o.unwrap()).collect();
    assert_eq!(ops, ["I", "D", "I"]);
    let seqs: Vec<_> = batch.column(2).as_primitive::<Int64Type>().values().to_vec();
    assert_eq!(seqs, [0, 1, 2]);
    let unchanged = batch.column(5).as_list::<i32>();
    assert!(unchanged.is_null(0) && unchanged.is_null(1));
    assert_eq!(unchanged.value(2).as_string::<i32>().value(0), "body");
    assert!(batch.column(7).is_null(2), "an unchanged value is never invented");
}

#[test]
fn full_old_row_fills_unchanged_toast() {
    let mut b = Batcher::new();
    begin(&mut b, 100);
    b.push(Event::Relation(rel(1))).unwrap();
    b.push(Event::Change(Change::Update {
        rel_id: 1,
        old: Some(vec![t("1"), t("big")]),
        old_is_full_row: true,
        new: vec![t("1"), TupleValue::Unchanged],
    }))
    .unwrap();
    b.push(Event::Commit { end_lsn: Lsn(120) }).unwrap();
    let f = &b.take().files[0];
    assert_eq!(f.batch.column(7).as_string::<i32>().value(1), "big");
    assert!(f.batch.column(5).is_null(1));
}

#[test]
fn bad_value_names_table_column_and_lsn() {
    let mut b = Batcher::new();
    begin(&mut b, 0x1_0000_0010);
    b.push(Event::Relation(rel(1))).unwrap();
    let e = b
        .push(Event::Change(Change::Insert {
            rel_id: 1,
            new: vec![t("x"), t("a")],
        }))
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("public.t.id") && msg.contains("1/10"), "{msg}");
}

#[test]
fn take_inside_a_transaction_has_no_end_lsn() {
    let mut b = Batcher::new();
    begin(&mut b, 100);
    b.push(Event::Relation(rel(1))).unwrap();
    b.push(Event::Change(Change::Insert {
        rel_id: 1,
        new: vec![t("1"), t("a")],
    }))
    .unwrap();
    let taken = b.take();
    assert_eq!(taken.end_lsn, None);
    assert_eq!(taken.files.len(), 1);
    b.push(Event::Change(Change::Insert {
        rel_id: 1,
        new: vec![t("2"), t("b")],
    }))
    .unwrap();
    b.push(Event::Commit { end_lsn: Lsn(120) }).unwrap();
    let taken = b.take();
    assert_eq!(taken.end_lsn, Some(Lsn(120)));
    assert_eq!(taken.files[0].first, RowPos { lsn: Lsn(100), seq: 1 });
}

#[test]
fn date_partition_is_utc_commit_date() {
    assert_eq!(date_partition(0), "dt=1970-01-01");
    assert_eq!(date_partition(1_795_305_600_000_000 - 1), "dt=2026-11-21");
    assert_eq!(date_partition(1_795_305_600_000_000), "dt=2026-11-22");
}
