//! Iceberg's `bucket[N]` partition transform (spec, Appendix B):
//! `(murmur3_x86_32(bytes(v), seed 0) & i32::MAX) % N`, where `bytes` is 8 little-endian
//! bytes for every integer-like value (int and long hash alike, as do date and timestamp
//! as their day or microsecond counts), the minimal big-endian two's complement of a
//! decimal's unscaled value, and the bytes themselves for strings and binary.

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType,
};

/// MurmurHash3, x86 32-bit variant, seed 0 (what Iceberg's bucket transform hashes with).
pub fn murmur3_32(data: &[u8]) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let scramble = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h: u32 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h ^= scramble(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let k = tail
            .iter()
            .enumerate()
            .fold(0u32, |k, (i, b)| k | (u32::from(*b) << (8 * i)));
        h ^= scramble(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn bucket(hash: u32, n: u32) -> i32 {
    ((hash & i32::MAX as u32) % n) as i32
}

/// The bucket of an integer-like value (int, long, date, time, timestamp).
pub fn bucket_long(v: i64, n: u32) -> i32 {
    bucket(murmur3_32(&v.to_le_bytes()), n)
}

/// The bucket of a decimal, by its unscaled value.
pub fn bucket_decimal(unscaled: i128, n: u32) -> i32 {
    let bytes = unscaled.to_be_bytes();
    // Drop leading bytes that only repeat the sign of the next one.
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bucket(murmur3_32(&bytes[start..]), n)
}

/// The bucket of a string or binary value.
pub fn bucket_bytes(v: &[u8], n: u32) -> i32 {
    bucket(murmur3_32(v), n)
}

/// Whether Iceberg can bucket a column of this lake type (not boolean, float or list).
pub fn bucketable(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Decimal128(..)
            | DataType::Utf8
            | DataType::Binary
            | DataType::Date32
            | DataType::Timestamp(TimeUnit::Microsecond, _)
    )
}

/// The bucket of row `i` of `a`: `None` for a null (Iceberg's transform of null is
/// null). `a` must be of a [`bucketable`] type.
pub fn bucket_of(a: &dyn Array, i: usize, n: u32) -> Option<i32> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int16 => bucket_long(i64::from(a.as_primitive::<Int16Type>().value(i)), n),
        DataType::Int32 => bucket_long(i64::from(a.as_primitive::<Int32Type>().value(i)), n),
        DataType::Int64 => bucket_long(a.as_primitive::<Int64Type>().value(i), n),
        DataType::Date32 => bucket_long(i64::from(a.as_primitive::<Date32Type>().value(i)), n),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            bucket_long(a.as_primitive::<TimestampMicrosecondType>().value(i), n)
        }
        DataType::Decimal128(..) => bucket_decimal(a.as_primitive::<Decimal128Type>().value(i), n),
        DataType::Utf8 => bucket_bytes(a.as_string::<i32>().value(i).as_bytes(), n),
        DataType::Binary => bucket_bytes(a.as_binary::<i32>().value(i), n),
        other => panic!("bucket_of: {other} is not a bucketable type"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's Appendix B hashes, and buckets computed from them.
    #[test]
    fn the_specs_test_vectors() {
        let hash = |b: &[u8]| murmur3_32(b) as i32;
        assert_eq!(hash(&34i64.to_le_bytes()), 2017239379);
        assert_eq!(hash(&[0x05, 0x8c]), -500754589);
        assert_eq!(hash(&17486i64.to_le_bytes()), -653330422); // date 2017-11-16
        assert_eq!(hash(&81068000000i64.to_le_bytes()), -662762989); // time 22:31:08
        assert_eq!(hash(&1510871468000000i64.to_le_bytes()), -2047944441); // timestamp
        assert_eq!(hash(&1510871468000001i64.to_le_bytes()), -1207196810);
        assert_eq!(hash(b"iceberg"), 1210000089);
        assert_eq!(hash(b"34"), -427558391);
        assert_eq!(hash(&[0, 1, 2, 3]), -188683207);
        let uuid = hex::decode("f79c3e09677c4bbda4793f349cb785e7").unwrap();
        assert_eq!(hash(&uuid), 1488055340);

        assert_eq!(bucket_long(34, 16), 3);
        assert_eq!(bucket_long(34, 1024), 339);
        assert_eq!(bucket_decimal(1420, 16), 3);
        assert_eq!(bucket_decimal(1420, 1024), 867);
        assert_eq!(bucket_long(17486, 16), 10);
        assert_eq!(bucket_long(1510871468000000, 1024), 263);
        assert_eq!(bucket_bytes(b"iceberg", 1024), 729);
        assert_eq!(bucket_bytes(b"34", 16), 9);
        assert_eq!([0, 1, -1].map(|v| bucket_long(v, 16)), [12, 4, 8]);
        assert_eq!([0, 1, -1].map(|v| bucket_long(v, 1024)), [764, 324, 232]);
    }

    #[test]
    fn a_decimal_hashes_its_minimal_big_endian_bytes() {
        let same = |v: i128, bytes: &[u8]| assert_eq!(bucket_decimal(v, 1 << 30), bucket_bytes(bytes, 1 << 30), "{v}");
        same(0, &[0x00]);
        same(-1, &[0xff]);
        same(127, &[0x7f]);
        same(128, &[0x00, 0x80]);
        same(-128, &[0x80]);
        same(-129, &[0xff, 0x7f]);
        same(1420, &[0x05, 0x8c]);
        same(i128::MAX, &i128::MAX.to_be_bytes());
    }

    #[test]
    fn arrays_bucket_as_their_values() {
        use arrow::array::{Int16Array, Int64Array, StringArray};
        let ints = Int16Array::from(vec![Some(34), None]);
        assert_eq!(bucket_of(&ints, 0, 16), Some(3));
        assert_eq!(bucket_of(&ints, 1, 16), None);
        assert_eq!(bucket_of(&Int64Array::from(vec![34]), 0, 16), Some(3));
        assert_eq!(bucket_of(&StringArray::from(vec!["iceberg"]), 0, 1024), Some(729));
    }
}
