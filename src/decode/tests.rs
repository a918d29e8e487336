use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::lsn::Lsn;

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

#[test]
fn decodes_relation_and_insert_with_all_value_kinds() {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(16384);
    cstr(&mut b, "public");
    cstr(&mut b, "trades");
    b.put_u8(b'd');
    b.put_i16(2);
    b.put_u8(1);
    cstr(&mut b, "id");
    b.put_u32(20);
    b.put_i32(-1);
    b.put_u8(0);
    cstr(&mut b, "note");
    b.put_u32(25);
    b.put_i32(-1);
    let m = decode(b.freeze(), Framing::default()).unwrap();
    let Message::Relation { xid: None, relation } = m else {
        panic!("{m:?}")
    };
    assert_eq!(relation.name, "trades");
    assert!(relation.columns[0].key && !relation.columns[1].key);

    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(77); // xid, inside a stream block
    b.put_u32(16384);
    b.put_u8(b'N');
    b.put_i16(4);
    b.put_u8(b't');
    b.put_i32(2);
    b.put_slice(b"42");
    b.put_u8(b'n');
    b.put_u8(b'u');
    b.put_u8(b'b');
    b.put_i32(1);
    b.put_u8(9);
    let m = decode(b.freeze(), Framing { in_stream: true }).unwrap();
    assert_eq!(
        m,
        Message::Insert {
            xid: Some(77),
            rel_id: 16384,
            new: vec![
                TupleValue::Text(Bytes::from_static(b"42")),
                TupleValue::Null,
                TupleValue::Unchanged,
                TupleValue::Binary(Bytes::from_static(&[9])),
            ],
        }
    );
}

#[test]
fn decodes_begin_commit_and_stream_control() {
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(0x10);
    b.put_u64(0x20);
    b.put_i64(5);
    assert_eq!(
        decode(b.freeze(), Framing::default()).unwrap(),
        Message::Commit {
            flags: 0,
            commit_lsn: Lsn(0x10),
            end_lsn: Lsn(0x20),
            commit_ts: 5
        }
    );
    let mut b = BytesMut::new();
    b.put_u8(b'A');
    b.put_u32(7);
    b.put_u32(8);
    assert_eq!(
        decode(b.freeze(), Framing::default()).unwrap(),
        Message::StreamAbort { xid: 7, subxid: 8 }
    );
}

#[test]
fn truncated_message_names_kind_and_offset() {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(1);
    let e = decode(b.freeze(), Framing::default()).unwrap_err();
    assert_eq!(e.kind, "Begin");
    assert_eq!(e.offset, 9);
    assert!(e.to_string().contains("Begin"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]
    /// The decoder never panics, whatever the bytes.
    #[test]
    fn decode_never_panics(tag in prop::sample::select(b"BCORYIUDTMSEcAxN".to_vec()),
                           body in prop::collection::vec(any::<u8>(), 0..64),
                           in_stream in any::<bool>()) {
        let mut v = vec![tag];
        v.extend(body);
        let _ = decode(Bytes::from(v), Framing { in_stream });
    }
}

fn msgs(c: &mut stream::Committed) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(b) = c.next_message().unwrap() {
        out.push(b);
    }
    out
}

fn check_subxact_abort(memory_limit: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = StreamBuffer::new(dir.path().to_owned(), memory_limit, u64::MAX);
    let m = |s: &'static str| Bytes::from_static(s.as_bytes());
    sb.push(100, 100, m("top-1")).unwrap();
    sb.push(100, 101, m("sub101-1")).unwrap();
    sb.push(100, 101, m("sub101-2")).unwrap();
    sb.push(100, 100, m("top-2")).unwrap();
    sb.push(100, 102, m("sub102-1")).unwrap();
    sb.push(100, 103, m("sub103-1")).unwrap();
    sb.abort(100, 102).unwrap(); // drops 102 and its nested 103
    sb.abort(100, 999).unwrap(); // unknown subxact: nothing to drop
    sb.push(100, 104, m("sub104-1")).unwrap();
    sb.push(200, 200, m("other")).unwrap();
    sb.abort(200, 200).unwrap();
    let mut c = sb.commit(100).unwrap();
    assert_eq!(
        msgs(&mut c),
        vec![m("top-1"), m("sub101-1"), m("sub101-2"), m("top-2"), m("sub104-1")]
    );
    assert!(!sb.in_flight());
    assert_eq!(sb.memory_bytes(), 0);
}

#[test]
fn subtransaction_abort_discards_exactly_the_subtransaction_in_memory() {
    check_subxact_abort(usize::MAX);
}

#[test]
fn subtransaction_abort_discards_exactly_the_subtransaction_when_spilled() {
    check_subxact_abort(1);
}

#[test]
fn spill_limit_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = StreamBuffer::new(dir.path().to_owned(), 1, 10);
    let e = sb.push(1, 1, Bytes::from_static(b"0123456789abc")).unwrap_err();
    assert!(e.to_string().contains("spill_max_bytes"), "{e}");
}
