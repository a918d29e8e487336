//! `Lsn`: a position in PostgreSQL's write-ahead log.
//!
//! Displayed the way PostgreSQL prints it (`16/B374D848`); in object keys it is written
//! as fixed-width upper-case hex (`00000016B374D848`) so that keys sort in LSN order.

use std::fmt;
use std::str::FromStr;

/// A WAL position. `Lsn(0)` is PostgreSQL's `InvalidXLogRecPtr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Fixed-width hex, for object keys: lexicographic order equals LSN order.
    pub fn to_key(self) -> String {
        format!("{:016X}", self.0)
    }

    pub fn from_key(s: &str) -> Option<Lsn> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid lsn {0:?}: expected PostgreSQL's form such as 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| ParseLsnError(s.to_owned()))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| ParseLsnError(s.to_owned()))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| ParseLsnError(s.to_owned()))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses_like_postgresql() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), lsn);
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn keys_sort_in_lsn_order() {
        let a = Lsn(0x9_FFFF_FFFF).to_key();
        let b = Lsn(0x10_0000_0000).to_key();
        assert!(a < b);
        assert_eq!(Lsn::from_key(&a), Some(Lsn(0x9_FFFF_FFFF)));
    }
}
