//! `numeric`: PostgreSQL's text and binary forms -> the unscaled `i128` of a
//! `Decimal128(p, s)`, exactly or not at all (never rounded, never overflowed).

use super::value::{Kind, ValueError, bad, unrepresentable};

/// numeric's binary form -> the unscaled value at `scale`, exactly, or an error.
///
/// The value arrives as base-10000 digit groups; a `numeric(38,10)` value with 38
/// significant digits spans ten groups (40 decimal places), more than an `i128` holds,
/// so the digits are placed one by one at their decimal position relative to `scale`:
/// a digit below the scale must be zero (never rounded), a digit at or above the
/// precision must be zero (no overflow), and the rest is accumulated exactly.
pub(crate) fn decimal_from_binary(raw: &[u8], precision: u8, scale: i8) -> Result<i128, ValueError> {
    match decimal_from_binary_fast(raw, precision, scale) {
        Some(v) => Ok(v),
        None => decimal_from_binary_by_digit(raw, precision, scale),
    }
}

/// 10^0 ..= 10^38: every power of ten an `i128` holds.
const POW10: [i128; 39] = {
    let mut t = [1i128; 39];
    let mut k = 1;
    while k < 39 {
        t[k] = t[k - 1] * 10;
        k += 1;
    }
    t
};

/// The common case in a few multiplications: up to nine groups (36 digits, within an
/// `i128`) taken whole, then shifted to `scale` at once. `None` for anything else,
/// including every error, which [`decimal_from_binary_by_digit`] then reports.
fn decimal_from_binary_fast(raw: &[u8], precision: u8, scale: i8) -> Option<i128> {
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    if raw.len() < 8 {
        return None;
    }
    let (ndigits, weight, sign) = (word(0) as usize, i64::from(word(2) as i16), word(4));
    if !matches!(sign, 0x0000 | 0x4000) || ndigits > 9 || raw.len() != 8 + 2 * ndigits {
        return None;
    }
    let mut digits: i128 = 0;
    for i in 0..ndigits {
        let group = word(8 + 2 * i);
        if group > 9999 {
            return None;
        }
        digits = digits * 10_000 + i128::from(group);
    }
    // The last group's unit sits at 10^(4 * (weight - ndigits + 1)); at `scale`, at
    // 10^shift.
    let shift = 4 * (weight - ndigits as i64 + 1) + i64::from(scale);
    let pow10 = |k: i64| usize::try_from(k).ok().and_then(|k| POW10.get(k).copied());
    let v = if digits == 0 {
        0
    } else if shift >= 0 {
        digits.checked_mul(pow10(shift)?)?
    } else {
        let unit = pow10(-shift)?;
        if digits % unit != 0 {
            return None; // more fraction digits than the scale: never rounded
        }
        digits / unit
    };
    if v >= pow10(i64::from(precision))? {
        return None;
    }
    Some(if sign == 0x4000 { -v } else { v })
}

/// [`decimal_from_binary`] digit by digit: any number of groups, and the errors.
fn decimal_from_binary_by_digit(raw: &[u8], precision: u8, scale: i8) -> Result<i128, ValueError> {
    let bad = || ValueError("malformed binary numeric value".into());
    if raw.len() < 8 {
        return Err(bad());
    }
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    let (ndigits, weight, sign) = (word(0) as usize, word(2) as i16 as i64, word(4));
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => {
            return Err(ValueError(
                "numeric value \"NaN\" cannot be represented in Parquet".into(),
            ));
        }
        _ => {
            return Err(ValueError(
                "numeric value \"Infinity\" cannot be represented in Parquet".into(),
            ));
        }
    }
    if raw.len() != 8 + 2 * ndigits {
        return Err(bad());
    }
    let overflow = || ValueError(format!("numeric value exceeds precision {precision}"));
    let precision_i = i64::from(precision);
    let mut v: i128 = 0;
    // The decimal exponent (relative to `scale`) of the last digit added to `v`.
    let mut last: Option<i64> = None;
    for i in 0..ndigits {
        let group = word(8 + 2 * i);
        if group > 9999 {
            return Err(bad());
        }
        for (j, d) in [group / 1000, group / 100 % 10, group / 10 % 10, group % 10]
            .into_iter()
            .enumerate()
        {
            // 10^pos is this digit's place in the value times 10^scale.
            let pos = 4 * (weight - i as i64) + 3 - j as i64 + i64::from(scale);
            if pos < 0 {
                if d != 0 {
                    return Err(ValueError(format!(
                        "numeric value has more than {scale} fraction digits"
                    )));
                }
                continue;
            }
            if pos >= precision_i {
                if d != 0 {
                    return Err(overflow());
                }
                continue;
            }
            // Digits come in decreasing position; fill any skipped places with zeros.
            let gap = last.map_or(0, |l| l - pos - 1);
            v = (0..gap).try_fold(v, |v, _| v.checked_mul(10)).ok_or_else(overflow)?;
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(i128::from(d)))
                .ok_or_else(overflow)?;
            last = Some(pos);
        }
    }
    // The last digit sat at 10^last: shift it to 10^0.
    for _ in 0..last.unwrap_or(0) {
        v = v.checked_mul(10).ok_or_else(overflow)?;
    }
    if v >= 10i128.pow(u32::from(precision)) {
        return Err(overflow());
    }
    Ok(if sign == 0x4000 { -v } else { v })
}
/// numeric's typmod is `((precision << 16) | scale) + 4`; -1 means unconstrained.
pub(super) fn numeric_kind(typmod: i32) -> Kind {
    if typmod < 4 {
        return Kind::Utf8;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xFFFF;
    // The scale is an 11-bit signed field since PostgreSQL 15 (negative scales allowed).
    let scale = ((t & 0x7FF) ^ 1024) - 1024;
    if (1..=38).contains(&precision) && (0..=precision).contains(&scale) {
        Kind::Decimal {
            precision: precision as u8,
            scale: scale as i8,
        }
    } else {
        Kind::Utf8
    }
}

/// `-123.4500` with scale 4 -> -1234500. PostgreSQL prints a constrained numeric with
/// exactly `scale` fraction digits; fewer are padded, more are an error (never rounded).
pub(crate) fn parse_decimal(raw: &[u8], precision: u8, scale: i8) -> Result<i128, ValueError> {
    if raw == b"NaN" || raw == b"Infinity" || raw == b"-Infinity" {
        return Err(unrepresentable("numeric", raw));
    }
    let (neg, digits) = match raw.first() {
        Some(b'-') => (true, &raw[1..]),
        Some(b'+') => (false, &raw[1..]),
        _ => (false, raw),
    };
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(p) => (&digits[..p], &digits[p + 1..]),
        None => (digits, &digits[digits.len()..]),
    };
    let scale = scale as usize;
    if int.is_empty() && frac.is_empty() || frac.len() > scale {
        return Err(bad("numeric", raw));
    }
    // Significant digits are counted before they are accumulated, so that no input
    // (however long) can overflow: at most `precision` ≤ 38 of them reach `v`.
    let mut v: i128 = 0;
    let mut n_digits = 0usize;
    let padding = std::iter::repeat_n(&b'0', scale - frac.len());
    for &c in int.iter().chain(frac).chain(padding) {
        if !c.is_ascii_digit() {
            return Err(bad("numeric", raw));
        }
        if v != 0 || c != b'0' {
            n_digits += 1;
            if n_digits > precision as usize {
                return Err(bad("numeric", raw));
            }
        }
        v = v * 10 + i128::from(c - b'0');
    }
    Ok(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::value::oid;

    #[test]
    fn numeric_typmod_maps_to_decimal_or_text() {
        let typmod = |p: i32, s: i32| ((p << 16) | s) + 4;
        assert_eq!(
            Kind::for_type(oid::NUMERIC, typmod(12, 2)),
            Kind::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(Kind::for_type(oid::NUMERIC, typmod(39, 2)), Kind::Utf8);
        assert_eq!(Kind::for_type(oid::NUMERIC, -1), Kind::Utf8);
    }

    #[test]
    fn decimals_are_exact_and_never_rounded() {
        assert_eq!(parse_decimal(b"-123.45", 12, 2), Ok(-12345));
        assert_eq!(parse_decimal(b"7", 5, 3), Ok(7000));
        assert_eq!(
            parse_decimal(b"99999999999999999999999999999999999999", 38, 0),
            Ok(10i128.pow(38) - 1)
        );
        assert!(parse_decimal(b"1.234", 12, 2).is_err());
        assert_eq!(
            parse_decimal(b"1234567890123456789012345678.0123456789", 38, 10),
            Ok(12345678901234567890123456780123456789)
        );
        assert!(parse_decimal(&[b'9'; 60], 38, 0).is_err(), "too long, not a panic");
        assert_eq!(parse_decimal(b"-0.00", 5, 2), Ok(0));
        assert!(
            parse_decimal(b"NaN", 12, 2)
                .unwrap_err()
                .0
                .contains("cannot be represented")
        );
    }

    #[test]
    fn binary_numerics_are_exact() {
        // 12345.6789 = digits [1, 2345, 6789], weight 1, dscale 4
        let mut raw = vec![0, 3, 0, 1, 0, 0, 0, 4];
        for d in [1u16, 2345, 6789] {
            raw.extend(d.to_be_bytes());
        }
        assert_eq!(decimal_from_binary(&raw, 12, 6), Ok(12_345_678_900));
        assert!(decimal_from_binary(&raw, 12, 2).is_err(), "never rounded");
        assert!(decimal_from_binary(&raw, 8, 4).is_err(), "precision");
        raw[4] = 0x40; // negative
        assert_eq!(decimal_from_binary(&raw, 12, 4), Ok(-123_456_789));
        // The value: numeric(38,10) with 38 significant digits spans ten
        // groups; accumulating the groups first overflowed i128.
        let groups: [u16; 10] = [1234, 5678, 9012, 3456, 7890, 1234, 5678, 123, 4567, 8900];
        let mut raw = vec![0, 10, 0, 6, 0, 0, 0, 10];
        for g in groups {
            raw.extend(g.to_be_bytes());
        }
        assert_eq!(
            decimal_from_binary(&raw, 38, 10),
            Ok(12345678901234567890123456780123456789)
        );
        assert!(decimal_from_binary(&raw, 37, 10).is_err(), "one digit too many");
        assert!(decimal_from_binary(&raw, 38, 9).is_err(), "never rounded");
        // 0.05 = digits [500], weight -1
        let raw = [0, 1, 0xFF, 0xFF, 0, 0, 0, 2, 0x01, 0xF4];
        assert_eq!(decimal_from_binary(&raw, 5, 2), Ok(5));
        // 2000000 = digits [200], weight 1
        let raw = [0, 1, 0, 1, 0, 0, 0, 0, 0, 200];
        assert_eq!(decimal_from_binary(&raw, 10, 2), Ok(200_000_000));
        let nan = [0, 0, 0, 0, 0xC0, 0, 0, 0];
        assert!(decimal_from_binary(&nan, 10, 2).unwrap_err().0.contains("NaN"));
    }

    proptest::proptest! {
        /// The fast path agrees with the digit-by-digit one wherever it answers, and
        /// answers for ordinary values.
        #[test]
        fn the_fast_path_agrees_with_the_digits(
            groups in proptest::collection::vec(0u16..10_000, 0..12),
            weight in -12i16..12,
            negative: bool,
            precision in 1u8..=38,
            scale_share in 0u8..=100,
        ) {
            let scale = (u16::from(precision) * u16::from(scale_share) / 100) as i8;
            let mut raw = (groups.len() as u16).to_be_bytes().to_vec();
            raw.extend(weight.to_be_bytes());
            raw.extend(if negative { [0x40, 0] } else { [0, 0] });
            raw.extend([0, 0]);
            for g in &groups {
                raw.extend(g.to_be_bytes());
            }
            let slow = decimal_from_binary_by_digit(&raw, precision, scale);
            match decimal_from_binary_fast(&raw, precision, scale) {
                Some(v) => proptest::prop_assert_eq!(Ok(v), slow),
                None => proptest::prop_assert!(slow.is_err() || groups.len() > 9),
            }
        }
    }
}
