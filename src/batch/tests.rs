use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bytes::Bytes;

use super::*;
use crate::change::TxInfo;
use crate::decode::{Column, ReplicaIdentity};
use std::collections::HashMap;

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

fn insert(b: &mut Batcher, rel_id: u32, id: &str) {
    b.push(Event::Change(Change::Insert {
        rel_id,
        new: vec![t(id), t("x")],
    }))
    .unwrap();
}

/// `(_lsn, _seq)` of a file's rows.
fn positions(f: &TableFile) -> Vec<(u64, u64)> {
    let lsn = f.batch.column(1).as_primitive::<Int64Type>().values().to_vec();
    let seq = f.batch.column(2).as_primitive::<Int64Type>().values().to_vec();
    lsn.into_iter().zip(seq).map(|(l, s)| (l as u64, s as u64)).collect()
}

fn ops(f: &TableFile) -> Vec<String> {
    let op = f.batch.column(0).as_string::<i32>();
    (0..f.batch.num_rows()).map(|i| op.value(i).to_owned()).collect()
}

#[test]
fn gates_write_a_table_from_its_point_and_hold_what_waits_for_a_copy() {
    let gates = HashMap::from([(
        "public.t".to_owned(),
        Gate::From {
            lsn: Lsn(200),
            copy: None,
        },
    )]);
    let mut b = Batcher::with_gates(gates, true);
    let mut other = (*rel(2)).clone();
    other.name = "new".into();
    for lsn in [100, 200, 300] {
        begin(&mut b, lsn);
        b.push(Event::Relation(rel(1))).unwrap();
        b.push(Event::Relation(Arc::new(other.clone()))).unwrap();
        insert(&mut b, 1, "1");
        insert(&mut b, 2, "1");
        b.push(Event::Commit { end_lsn: Lsn(lsn + 8) }).unwrap();
        if lsn == 200 {
            // The copy of the new table (copy 1) turns out to start at 300.
            b.push(Event::CopyStart(Arc::new(CopyStart {
                id: 1,
                from: Lsn(300),
                tables: vec![crate::change::CopyTable {
                    name: "public.new".into(),
                    identity: crate::change::TableIdentity {
                        oid: 2,
                        ..Default::default()
                    },
                    relation: Arc::new(other.clone()),
                    requests: Vec::new(),
                }],
                dropped: Vec::new(),
            })))
            .unwrap();
            assert!(b.copy_started(), "the point goes to the sink with what came before");
        }
    }
    let taken = b.take();
    type Positions = Vec<(u64, u64)>;
    let tables: Vec<(&str, Hold, Positions)> = taken
        .files
        .iter()
        .map(|f| (f.table.as_str(), f.hold, positions(f)))
        .collect();
    // public.t before 200 is in its copy; at 200 the transaction's changes follow the
    // copy's rows. public.new, never copied, is written but held (Due) until its point
    // is known; from the point on it waits for copy 1 (300 is a tie).
    assert_eq!(
        tables,
        [
            ("new", Hold::Due, vec![(100, 1), (200, SNAPSHOT_TIE_SEQ + 1)]),
            ("t", Hold::None, vec![(200, SNAPSHOT_TIE_SEQ), (300, SNAPSHOT_TIE_SEQ)]),
            ("new", Hold::Copy(1), vec![(300, SNAPSHOT_TIE_SEQ + 1)]),
        ]
    );
    assert_eq!(taken.copy_starts.len(), 1);
}

#[test]
fn a_new_table_under_an_old_name_waits_for_a_copy_or_starts_with_a_truncate() {
    // With copies: held until the copier copies the new table.
    let gates = HashMap::from([(
        "public.t".to_owned(),
        Gate::From {
            lsn: Lsn(50),
            copy: None,
        },
    )]);
    let mut b = Batcher::with_gates(gates.clone(), true).with_oids(HashMap::from([("public.t".to_owned(), 1)]), false);
    for (lsn, oid) in [(100, 1), (200, 2)] {
        begin(&mut b, lsn);
        b.push(Event::Relation(rel(oid))).unwrap();
        insert(&mut b, oid, "1");
        b.push(Event::Commit { end_lsn: Lsn(lsn + 8) }).unwrap();
    }
    let taken = b.take();
    let holds: Vec<(Hold, Vec<(u64, u64)>)> = taken.files.iter().map(|f| (f.hold, positions(f))).collect();
    assert_eq!(holds, [(Hold::None, vec![(100, 0)]), (Hold::Due, vec![(200, 0)])]);
    assert!(taken.oids.is_empty(), "a copy records the identity");

    // Without copies: a T row just before the new table's first transaction, and its
    // OID recorded with it.
    let mut b = Batcher::with_gates(HashMap::new(), false).with_oids(HashMap::from([("public.t".to_owned(), 1)]), true);
    for (lsn, oid) in [(100, 1), (200, 2), (300, 2)] {
        begin(&mut b, lsn);
        b.push(Event::Relation(rel(oid))).unwrap();
        insert(&mut b, oid, "1");
        b.push(Event::Commit { end_lsn: Lsn(lsn + 8) }).unwrap();
    }
    let taken = b.take();
    type Rows = Vec<(Vec<String>, Vec<(u64, u64)>)>;
    let rows: Rows = taken.files.iter().map(|f| (ops(f), positions(f))).collect();
    assert_eq!(
        rows,
        [
            (vec!["I".to_owned()], vec![(100, 0)]),
            (
                vec!["T".to_owned(), "I".to_owned(), "I".to_owned()],
                vec![(199, 0), (200, 0), (300, 0)]
            ),
        ]
    );
    assert_eq!(taken.oids, [("public.t".to_owned(), 2)]);
}

fn relation_of(cols: &[(&str, u32, i32)]) -> Relation {
    Relation {
        id: 1,
        namespace: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: cols
            .iter()
            .map(|(name, type_oid, type_modifier)| Column {
                key: false,
                name: (*name).into(),
                type_oid: *type_oid,
                type_modifier: *type_modifier,
            })
            .collect(),
    }
}

#[test]
fn lake_schema_adds_keeps_dropped_widens_and_refuses_other_retypes() {
    use schema::LakeSchema;
    // numeric(10,2): typmod = ((10 << 16) | 2) + 4
    let n = |p: i32, s: i32| ((p << 16) | s) + 4;
    let v1 = LakeSchema::default()
        .merge(&relation_of(&[
            ("id", 23, -1),
            ("price", 1700, n(10, 2)),
            ("gone", 25, -1),
        ]))
        .unwrap()
        .unwrap();
    let v2 = v1
        .merge(&relation_of(&[
            ("id", 20, -1),
            ("price", 1700, n(12, 2)),
            ("note", 25, -1),
        ]))
        .unwrap()
        .unwrap();
    let col = |s: &LakeSchema, name: &str| s.columns.iter().find(|c| c.name == name).cloned().unwrap();
    assert_eq!(col(&v2, "id").arrow_type, "Int64", "int4 -> int8 widens");
    assert_eq!(col(&v2, "price").arrow_type, "Decimal128(12, 2)");
    assert!(col(&v2, "gone").dropped, "a dropped column stays, marked");
    assert!(!col(&v2, "note").dropped);
    assert_eq!(
        v2.merge(&relation_of(&[
            ("id", 20, -1),
            ("price", 1700, n(12, 2)),
            ("note", 25, -1)
        ]))
        .unwrap(),
        None
    );
    let e = v2
        .merge(&relation_of(&[("id", 23, -1), ("price", 1700, n(12, 2))]))
        .unwrap_err();
    assert_eq!(
        (e.column.as_str(), e.from.as_str(), e.to.as_str()),
        ("id", "Int64", "Int32"),
        "no narrowing"
    );
    let e = v2.merge(&relation_of(&[("price", 1700, n(12, 3))])).unwrap_err();
    assert_eq!(e.column, "price", "a scale change is not a widening");
    // A schema from elsewhere merges by its live columns.
    let merged = v1.merge_schema(&v2).unwrap().unwrap();
    assert_eq!(merged, v2);
}
