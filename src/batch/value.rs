//! PostgreSQL text output -> Arrow values: the type mapping.
//!
//! The walsender runs with `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex` (set in the replication startup
//! packet), so every text form parsed here is the one those settings produce.
//!
//! | PostgreSQL | Arrow |
//! |---|---|
//! | bool | Boolean |
//! | int2 / int4 / int8 | Int16 / Int32 / Int64 |
//! | float4 / float8 | Float32 / Float64 (NaN, ±Infinity kept) |
//! | numeric(p,s), p ≤ 38, 0 ≤ s ≤ p | Decimal128(p,s) |
//! | numeric without typmod, or p > 38 | Utf8, PostgreSQL's text (NaN kept) |
//! | text, varchar, bpchar, name, uuid, json, jsonb, enums | Utf8 |
//! | bytea | Binary |
//! | date | Date32 |
//! | timestamp | Timestamp(µs) |
//! | timestamptz | Timestamp(µs, "UTC") |
//! | one-dimensional arrays of the above | List |
//! | every other type | Utf8, PostgreSQL's text output |

use std::sync::Arc;

use arrow::array::NullBufferBuilder;
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, ListArray, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, TimeUnit};

use super::numeric::{decimal_from_binary, numeric_kind, parse_decimal};

pub(crate) mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The Arrow-side kind of a PostgreSQL column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Decimal { precision: u8, scale: i8 },
    Utf8,
    Binary,
    Date32,
    Timestamp { utc: bool },
    List(Box<Kind>),
}

/// Whether walshore writes this type as a List (a one-dimensional array of a mapped type).
pub fn is_array(type_oid: u32) -> bool {
    element_oid(type_oid).is_some()
}

fn element_oid(array_oid: u32) -> Option<u32> {
    use oid::*;
    Some(match array_oid {
        1000 => BOOL,
        1001 => BYTEA,
        1003 => NAME,
        1005 => INT2,
        1007 => INT4,
        1009 => TEXT,
        1014 => BPCHAR,
        1015 => VARCHAR,
        1016 => INT8,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1182 => DATE,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1231 => NUMERIC,
        2951 => UUID,
        199 => JSON,
        3807 => JSONB,
        _ => return None,
    })
}

impl Kind {
    pub(crate) fn for_type(type_oid: u32, typmod: i32) -> Kind {
        use oid::*;
        match type_oid {
            BOOL => Kind::Bool,
            INT2 => Kind::Int16,
            INT4 => Kind::Int32,
            INT8 => Kind::Int64,
            FLOAT4 => Kind::Float32,
            FLOAT8 => Kind::Float64,
            NUMERIC => numeric_kind(typmod),
            BYTEA => Kind::Binary,
            DATE => Kind::Date32,
            TIMESTAMP => Kind::Timestamp { utc: false },
            TIMESTAMPTZ => Kind::Timestamp { utc: true },
            other => match element_oid(other) {
                Some(elem) => Kind::List(Box::new(Kind::for_type(elem, typmod))),
                None => Kind::Utf8,
            },
        }
    }

    pub(crate) fn data_type(&self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int16 => DataType::Int16,
            Kind::Int32 => DataType::Int32,
            Kind::Int64 => DataType::Int64,
            Kind::Float32 => DataType::Float32,
            Kind::Float64 => DataType::Float64,
            Kind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            Kind::Utf8 => DataType::Utf8,
            Kind::Binary => DataType::Binary,
            Kind::Date32 => DataType::Date32,
            Kind::Timestamp { utc } => DataType::Timestamp(TimeUnit::Microsecond, utc.then(|| Arc::from("UTC"))),
            Kind::List(elem) => DataType::List(Arc::new(Field::new("element", elem.data_type(), true))),
        }
    }
}

/// Whether a table copy reads this column in COPY's binary format (decoded by
/// [`Builder::append_binary`]); every other column is copied as its output function's
/// text (`format('%s', column)`), whose
/// binary form is its text, so both formats meet the same parsers.
pub fn copies_binary(type_oid: u32, typmod: i32) -> bool {
    use oid::*;
    match type_oid {
        BOOL | INT2 | INT4 | INT8 | FLOAT4 | FLOAT8 | DATE | TIMESTAMP | TIMESTAMPTZ | TEXT | VARCHAR | BPCHAR
        | NAME | BYTEA => true,
        NUMERIC => matches!(numeric_kind(typmod), Kind::Decimal { .. }),
        _ => false,
    }
}

/// Days between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

fn be<const N: usize>(raw: &[u8], kind: &str) -> Result<[u8; N], ValueError> {
    raw.try_into()
        .map_err(|_| ValueError(format!("binary {kind} value has {} bytes, expected {N}", raw.len())))
}

/// Digits of a date's or timestamp's year in PostgreSQL's ISO text.
fn year_digits(raw: &[u8]) -> usize {
    raw.iter().take_while(|c| c.is_ascii_digit()).count()
}

/// A value PostgreSQL holds that some Arrow types cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Special {
    PosInf,
    NegInf,
    NaN,
}

/// Why a value could not be represented. The caller adds table, column and LSN.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub(crate) struct ValueError(pub String);

pub(super) fn bad(kind: &str, raw: &[u8]) -> ValueError {
    ValueError(format!(
        "cannot read {kind} value {:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(64)])
    ))
}

pub(super) fn unrepresentable(kind: &str, raw: &[u8]) -> ValueError {
    ValueError(format!(
        "{kind} value {:?} cannot be represented in Parquet",
        String::from_utf8_lossy(&raw[..raw.len().min(64)])
    ))
}

pub(crate) enum Builder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, bool),
    List {
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        child: Box<Builder>,
        field: Arc<Field>,
    },
}

impl Builder {
    pub(crate) fn new(kind: &Kind) -> Builder {
        Builder::with_capacity(kind, 0, 0)
    }

    /// A builder with room for `rows` values and, for text and bytes, `bytes` of data.
    pub(crate) fn with_capacity(kind: &Kind, rows: usize, bytes: usize) -> Builder {
        match kind {
            Kind::Bool => Builder::Bool(BooleanBuilder::with_capacity(rows)),
            Kind::Int16 => Builder::Int16(Int16Builder::with_capacity(rows)),
            Kind::Int32 => Builder::Int32(Int32Builder::with_capacity(rows)),
            Kind::Int64 => Builder::Int64(Int64Builder::with_capacity(rows)),
            Kind::Float32 => Builder::Float32(Float32Builder::with_capacity(rows)),
            Kind::Float64 => Builder::Float64(Float64Builder::with_capacity(rows)),
            Kind::Decimal { precision, scale } => Builder::Decimal(
                Decimal128Builder::with_capacity(rows).with_data_type(DataType::Decimal128(*precision, *scale)),
                *precision,
                *scale,
            ),
            Kind::Utf8 => Builder::Utf8(StringBuilder::with_capacity(rows, bytes)),
            Kind::Binary => Builder::Binary(BinaryBuilder::with_capacity(rows, bytes)),
            Kind::Date32 => Builder::Date32(Date32Builder::with_capacity(rows)),
            Kind::Timestamp { utc } => Builder::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone_opt(utc.then(|| "UTC")),
                *utc,
            ),
            Kind::List(elem) => Builder::List {
                offsets: vec![0],
                nulls: NullBufferBuilder::new(0),
                child: Box::new(Builder::new(elem)),
                field: Arc::new(Field::new("element", elem.data_type(), true)),
            },
        }
    }

    pub(crate) fn append_null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::Int16(b) => b.append_null(),
            Builder::Int32(b) => b.append_null(),
            Builder::Int64(b) => b.append_null(),
            Builder::Float32(b) => b.append_null(),
            Builder::Float64(b) => b.append_null(),
            Builder::Decimal(b, ..) => b.append_null(),
            Builder::Utf8(b) => b.append_null(),
            Builder::Binary(b) => b.append_null(),
            Builder::Date32(b) => b.append_null(),
            Builder::Timestamp(b, _) => b.append_null(),
            Builder::List { offsets, nulls, .. } => {
                offsets.push(*offsets.last().expect("offsets start with 0"));
                nulls.append_null();
            }
        }
    }

    /// The infinity or NaN `raw` holds when this column's type cannot (dates,
    /// timestamps, numeric(p,s)); None for any other value or column.
    pub(crate) fn special(&self, raw: &[u8], binary: bool) -> Option<Special> {
        match (self, binary) {
            // Past what µs since 1970 can count (year 294247): PostgreSQL goes to 294276.
            (Builder::Timestamp(_, utc), false) if year_digits(raw) >= 6 && parse_timestamp(raw, *utc).is_err() => {
                Some(if raw.ends_with(b" BC") {
                    Special::NegInf
                } else {
                    Special::PosInf
                })
            }
            (Builder::Date32(_) | Builder::Timestamp(..), false) | (Builder::Decimal(..), false) => match raw {
                b"infinity" | b"Infinity" => Some(Special::PosInf),
                b"-infinity" | b"-Infinity" => Some(Special::NegInf),
                b"NaN" => Some(Special::NaN),
                _ => None,
            },
            (Builder::Date32(_), true) => match i32::from_be_bytes(raw.try_into().ok()?) {
                i32::MAX => Some(Special::PosInf),
                i32::MIN => Some(Special::NegInf),
                _ => None,
            },
            (Builder::Timestamp(..), true) => match i64::from_be_bytes(raw.try_into().ok()?) {
                i64::MAX => Some(Special::PosInf),
                i64::MIN => Some(Special::NegInf),
                us if us.checked_add(i64::from(PG_EPOCH_DAYS) * 86_400_000_000).is_none() => {
                    Some(if us > 0 { Special::PosInf } else { Special::NegInf })
                }
                _ => None,
            },
            (Builder::Decimal(..), true) => match u16::from_be_bytes([*raw.get(4)?, *raw.get(5)?]) {
                0xC000 => Some(Special::NaN),
                0xD000 => Some(Special::PosInf),
                0xF000 => Some(Special::NegInf),
                _ => None,
            },
            _ => None,
        }
    }

    /// Appends the value nearest to `s` that the column holds: 9999-12-31 (23:59:59.999999)
    /// and 0001-01-01 for dates and timestamps, ±99…9 for numeric(p,s). False for NaN,
    /// which has none.
    pub(crate) fn append_clamped(&mut self, s: Special) -> bool {
        let up = match s {
            Special::PosInf => true,
            Special::NegInf => false,
            Special::NaN => return false,
        };
        let (first, last) = (days_from_civil(1, 1, 1), days_from_civil(9999, 12, 31));
        match self {
            Builder::Date32(b) => b.append_value(if up { last } else { first } as i32),
            Builder::Timestamp(b, _) => b.append_value(if up {
                last * 86_400_000_000 + 86_399_999_999
            } else {
                first * 86_400_000_000
            }),
            Builder::Decimal(b, precision, _) => {
                let max = 10i128.pow(u32::from(*precision)) - 1;
                b.append_value(if up { max } else { -max })
            }
            _ => return false,
        }
        true
    }

    /// Appends a value given in PostgreSQL's text output format.
    pub(crate) fn append_text(&mut self, raw: &[u8]) -> Result<(), ValueError> {
        match self {
            Builder::Bool(b) => b.append_value(match raw {
                b"t" => true,
                b"f" => false,
                _ => return Err(bad("bool", raw)),
            }),
            Builder::Int16(b) => b.append_value(parse_str(raw, "int2")?),
            Builder::Int32(b) => b.append_value(parse_str(raw, "int4")?),
            Builder::Int64(b) => b.append_value(parse_str(raw, "int8")?),
            Builder::Float32(b) => b.append_value(parse_float(raw, "float4")? as f32),
            Builder::Float64(b) => b.append_value(parse_float(raw, "float8")?),
            Builder::Decimal(b, precision, scale) => b.append_value(parse_decimal(raw, *precision, *scale)?),
            Builder::Utf8(b) => b.append_value(utf8(raw)?),
            Builder::Binary(b) => b.append_value(parse_bytea(raw)?),
            Builder::Date32(b) => b.append_value(parse_date(raw)?),
            Builder::Timestamp(b, utc) => b.append_value(parse_timestamp(raw, *utc)?),
            Builder::List {
                offsets, nulls, child, ..
            } => {
                let n = parse_array(raw, child)?;
                let last = *offsets.last().expect("offsets start with 0");
                offsets.push(last + n as i32);
                nulls.append_non_null();
            }
        }
        Ok(())
    }

    /// Appends a value given in PostgreSQL's binary format; only for columns where
    /// [`copies_binary`] holds (text-like columns: their UTF-8 text).
    pub(crate) fn append_binary(&mut self, raw: &[u8]) -> Result<(), ValueError> {
        match self {
            Builder::Bool(b) => b.append_value(be::<1>(raw, "bool")?[0] != 0),
            Builder::Int16(b) => b.append_value(i16::from_be_bytes(be(raw, "int2")?)),
            Builder::Int32(b) => b.append_value(i32::from_be_bytes(be(raw, "int4")?)),
            Builder::Int64(b) => b.append_value(i64::from_be_bytes(be(raw, "int8")?)),
            Builder::Float32(b) => b.append_value(f32::from_be_bytes(be(raw, "float4")?)),
            Builder::Float64(b) => b.append_value(f64::from_be_bytes(be(raw, "float8")?)),
            Builder::Decimal(b, precision, scale) => b.append_value(decimal_from_binary(raw, *precision, *scale)?),
            Builder::Utf8(b) => b.append_value(utf8(raw)?),
            Builder::Binary(b) => b.append_value(raw),
            Builder::Date32(b) => {
                let days = i32::from_be_bytes(be(raw, "date")?);
                if days == i32::MAX || days == i32::MIN {
                    return Err(unrepresentable(
                        "date",
                        if days > 0 { b"infinity" } else { b"-infinity" },
                    ));
                }
                b.append_value(
                    days.checked_add(PG_EPOCH_DAYS)
                        .ok_or_else(|| unrepresentable("date", raw))?,
                )
            }
            Builder::Timestamp(b, utc) => {
                let kind = if *utc { "timestamptz" } else { "timestamp" };
                let us = i64::from_be_bytes(be(raw, kind)?);
                if us == i64::MAX || us == i64::MIN {
                    return Err(unrepresentable(kind, if us > 0 { b"infinity" } else { b"-infinity" }));
                }
                let epoch = i64::from(PG_EPOCH_DAYS) * 86_400_000_000;
                b.append_value(us.checked_add(epoch).ok_or_else(|| {
                    unrepresentable(kind, format!("{us} µs after 2000-01-01 (past year 294247)").as_bytes())
                })?)
            }
            Builder::List { .. } => return Err(ValueError("array values are copied as text".into())),
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Decimal(b, ..) => Arc::new(b.finish()),
            Builder::Utf8(b) => Arc::new(b.finish()),
            Builder::Binary(b) => Arc::new(b.finish()),
            Builder::Date32(b) => Arc::new(b.finish()),
            Builder::Timestamp(b, _) => Arc::new(b.finish()),
            Builder::List {
                offsets,
                nulls,
                child,
                field,
            } => {
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let values = child.finish();
                Arc::new(ListArray::new(field.clone(), offsets, values, nulls.finish()))
            }
        }
    }
}

fn utf8(raw: &[u8]) -> Result<&str, ValueError> {
    std::str::from_utf8(raw).map_err(|_| ValueError("text value is not valid UTF-8".into()))
}

fn parse_str<T: std::str::FromStr>(raw: &[u8], kind: &str) -> Result<T, ValueError> {
    utf8(raw)?.parse().map_err(|_| bad(kind, raw))
}

fn parse_float(raw: &[u8], kind: &str) -> Result<f64, ValueError> {
    match raw {
        b"NaN" => Ok(f64::NAN),
        b"Infinity" => Ok(f64::INFINITY),
        b"-Infinity" => Ok(f64::NEG_INFINITY),
        _ => parse_str(raw, kind),
    }
}

fn parse_bytea(raw: &[u8]) -> Result<Vec<u8>, ValueError> {
    let hex = raw.strip_prefix(b"\\x").ok_or_else(|| bad("bytea", raw))?;
    hex::decode(hex).map_err(|_| bad("bytea", raw))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year may be ≤ 0).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn digits(s: &[u8], kind: &str, raw: &[u8]) -> Result<i64, ValueError> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) || s.len() > 9 {
        return Err(bad(kind, raw));
    }
    Ok(s.iter().fold(0i64, |a, &c| a * 10 + i64::from(c - b'0')))
}

/// `YYYY-MM-DD` (any number of year digits), with an optional ` BC` suffix handled by
/// the caller. Returns days since the Unix epoch.
fn parse_ymd(s: &[u8], bc: bool, kind: &str, raw: &[u8]) -> Result<i64, ValueError> {
    let mut parts = s.splitn(3, |&c| c == b'-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(kind, raw));
    };
    let (y, m, d) = (digits(y, kind, raw)?, digits(m, kind, raw)?, digits(d, kind, raw)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad(kind, raw));
    }
    // 1 BC is astronomical year 0.
    let year = if bc { 1 - y } else { y };
    Ok(days_from_civil(year, m as u32, d as u32))
}

fn strip_bc(raw: &[u8]) -> (&[u8], bool) {
    match raw.strip_suffix(b" BC") {
        Some(s) => (s, true),
        None => (raw, false),
    }
}

pub(crate) fn parse_date(raw: &[u8]) -> Result<i32, ValueError> {
    if raw == b"infinity" || raw == b"-infinity" {
        return Err(unrepresentable("date", raw));
    }
    let (s, bc) = strip_bc(raw);
    let days = parse_ymd(s, bc, "date", raw)?;
    i32::try_from(days).map_err(|_| unrepresentable("date", raw))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]` -> microseconds since the epoch.
pub(crate) fn parse_timestamp(raw: &[u8], with_zone: bool) -> Result<i64, ValueError> {
    let kind = if with_zone { "timestamptz" } else { "timestamp" };
    if raw == b"infinity" || raw == b"-infinity" {
        return Err(unrepresentable(kind, raw));
    }
    let (s, bc) = strip_bc(raw);
    let sp = s.iter().position(|&c| c == b' ').ok_or_else(|| bad(kind, raw))?;
    let days = parse_ymd(&s[..sp], bc, kind, raw)?;
    let mut t = &s[sp + 1..];
    let mut offset_secs = 0i64;
    if with_zone {
        let p = t
            .iter()
            .rposition(|&c| c == b'+' || c == b'-')
            .ok_or_else(|| bad(kind, raw))?;
        let sign = if t[p] == b'-' { -1 } else { 1 };
        let mut f = [0i64; 3];
        for (i, part) in t[p + 1..].split(|&c| c == b':').enumerate() {
            if i > 2 {
                return Err(bad(kind, raw));
            }
            f[i] = digits(part, kind, raw)?;
        }
        offset_secs = sign * (f[0] * 3600 + f[1] * 60 + f[2]);
        t = &t[..p];
    }
    let (hms, frac) = match t.iter().position(|&c| c == b'.') {
        Some(p) => (&t[..p], &t[p + 1..]),
        None => (t, &t[t.len()..]),
    };
    let mut parts = hms.split(|&c| c == b':');
    let (Some(h), Some(mi), Some(se), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad(kind, raw));
    };
    let (h, mi, se) = (digits(h, kind, raw)?, digits(mi, kind, raw)?, digits(se, kind, raw)?);
    if frac.len() > 6 {
        return Err(bad(kind, raw));
    }
    let mut micros = if frac.is_empty() { 0 } else { digits(frac, kind, raw)? };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    let secs = days
        .checked_mul(86_400)
        .and_then(|d| d.checked_add(h * 3600 + mi * 60 + se - offset_secs))
        .ok_or_else(|| unrepresentable(kind, raw))?;
    secs.checked_mul(1_000_000)
        .and_then(|v| v.checked_add(micros))
        .ok_or_else(|| unrepresentable(kind, raw))
}

/// Parses a one-dimensional array literal (`{1,NULL,"a b"}`) into `child`, returning the
/// number of elements. Multi-dimensional arrays and explicit bounds are refused rather
/// than flattened (that would lose their shape).
fn parse_array(raw: &[u8], child: &mut Builder) -> Result<usize, ValueError> {
    let inner = raw
        .strip_prefix(b"{")
        .and_then(|s| s.strip_suffix(b"}"))
        .ok_or_else(|| {
            ValueError(format!(
                "array value {:?} has explicit bounds, which a Parquet list cannot keep",
                String::from_utf8_lossy(&raw[..raw.len().min(64)])
            ))
        })?;
    if inner.is_empty() {
        return Ok(0);
    }
    if inner.first() == Some(&b'{') {
        return Err(ValueError(
            "multi-dimensional array values are not supported yet; they would lose their shape".into(),
        ));
    }
    let mut n = 0;
    let mut i = 0;
    let mut elem = Vec::new();
    loop {
        elem.clear();
        let quoted = inner.get(i) == Some(&b'"');
        if quoted {
            i += 1;
            loop {
                match inner.get(i) {
                    Some(b'\\') => {
                        elem.push(*inner.get(i + 1).ok_or_else(|| bad("array", raw))?);
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        elem.push(c);
                        i += 1;
                    }
                    None => return Err(bad("array", raw)),
                }
            }
        } else {
            while let Some(&c) = inner.get(i) {
                if c == b',' {
                    break;
                }
                elem.push(c);
                i += 1;
            }
        }
        if !quoted && elem == b"NULL" {
            child.append_null();
        } else {
            child.append_text(&elem)?;
        }
        n += 1;
        match inner.get(i) {
            None => return Ok(n),
            Some(b',') => i += 1,
            Some(_) => return Err(bad("array", raw)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int32Type;

    #[test]
    fn dates_and_timestamps_follow_the_proleptic_calendar() {
        assert_eq!(parse_date(b"1970-01-01"), Ok(0));
        assert_eq!(parse_date(b"2000-03-01"), Ok(11017));
        assert_eq!(parse_date(b"0001-01-01 BC"), Ok(days_from_civil(0, 1, 1) as i32));
        assert!(parse_date(b"infinity").is_err());
        assert_eq!(parse_timestamp(b"1970-01-01 00:00:01.5", false), Ok(1_500_000));
        assert_eq!(parse_timestamp(b"1970-01-01 02:00:00+02", true), Ok(0));
        assert_eq!(parse_timestamp(b"1969-12-31 23:59:59.999999+00", true), Ok(-1));
        assert_eq!(
            parse_timestamp(b"12345-01-01 00:00:00", false).unwrap(),
            days_from_civil(12345, 1, 1) * 86_400_000_000
        );
        assert!(
            parse_timestamp(b"-infinity", true)
                .unwrap_err()
                .0
                .contains("cannot be represented")
        );
        for d in [-800_000i64, -1, 0, 59, 60, 11017, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn one_dimensional_arrays_become_lists_and_others_are_refused() {
        let mut b = Builder::new(&Kind::for_type(1007, -1));
        b.append_text(b"{1,NULL,3}").unwrap();
        b.append_text(b"{}").unwrap();
        b.append_null();
        assert!(b.append_text(b"{{1,2},{3,4}}").is_err());
        let a = b.finish();
        let list = a.as_list::<i32>();
        assert_eq!(list.len(), 3);
        assert!(list.is_null(2));
        let first = list.value(0);
        let first = first.as_primitive::<Int32Type>();
        assert_eq!(first.iter().collect::<Vec<_>>(), vec![Some(1), None, Some(3)]);
        let mut t = Builder::new(&Kind::for_type(1009, -1));
        t.append_text(br#"{"a,b","q\"x",NULL,"NULL"}"#).unwrap();
        let a = t.finish();
        let v = a.as_list::<i32>().value(0);
        let v = v.as_string::<i32>();
        assert_eq!(v.value(0), "a,b");
        assert_eq!(v.value(1), "q\"x");
        assert!(v.is_null(2));
        assert_eq!(v.value(3), "NULL");
    }
}
