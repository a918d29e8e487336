//! Where each subtransaction of a streamed transaction starts, so that its abort can cut
//! the transaction there (see `stream`).
//!
//! Bounded: one transaction may have a million subtransactions (a PL/pgSQL loop with an
//! EXCEPTION block opens one per iteration). The newest entries are kept in memory; once
//! the transaction itself is spilled, older ones go to a spill file of fixed-size
//! records. Looking a subtransaction up is needed only for its first message and for its
//! abort: a transaction's subtransactions get increasing xids (PostgreSQL gives a parent
//! its xid before any child), so a first message is usually of a newer xid than any
//! seen, and the few recently seen ones are remembered; only an ancestor that writes
//! after its descendants is searched for.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Entries kept in memory once the transaction is spilled (24 bytes each).
const MEMORY_ENTRIES: usize = 16 * 1024;
/// Subtransactions remembered as seen without a search.
const RECENT: usize = 32;
/// `subxid`, `index`, `offset`: little-endian u32, u64, u64.
const RECORD: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SubStart {
    pub subxid: u32,
    /// Ordinal of the subtransaction's first message within the transaction.
    pub index: u64,
    /// Byte offset of that message in the transaction's spill file, once spilled.
    pub offset: u64,
}

/// `a` was assigned after `b` (xids compare modulo 2^32, as PostgreSQL compares them).
fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

pub(super) struct Subxacts {
    /// The oldest entries, in index order, once memory holds too many.
    file: Option<(File, u64)>,
    /// The newest entries, in index order.
    mem: VecDeque<SubStart>,
    newest: Option<u32>,
    recent: VecDeque<u32>,
    dir: PathBuf,
}

impl Subxacts {
    pub fn new(dir: PathBuf) -> Subxacts {
        Subxacts {
            file: None,
            mem: VecDeque::new(),
            newest: None,
            recent: VecDeque::new(),
            dir,
        }
    }

    /// Entries held in memory.
    #[cfg(test)]
    pub fn in_memory(&self) -> usize {
        self.mem.len()
    }

    fn remember(&mut self, subxid: u32) {
        if let Some(i) = self.recent.iter().position(|s| *s == subxid) {
            self.recent.remove(i);
        }
        self.recent.push_back(subxid);
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// Records a message of `subxid` at `index` (and `offset`, when the transaction is
    /// spilled): its first message starts an entry. Once `spilled`, entries beyond the
    /// memory bound move to the file (their offsets are known then).
    pub fn note(&mut self, subxid: u32, index: u64, offset: u64, spilled: bool) -> std::io::Result<()> {
        if self.recent.back() == Some(&subxid) {
            return Ok(());
        }
        let first = match self.newest {
            None => true,
            Some(n) if newer(subxid, n) => true,
            // An older xid: seen already, unless it is an ancestor whose first message
            // comes after its descendants'.
            Some(_) => !self.recent.contains(&subxid) && self.find(subxid)?.is_none(),
        };
        self.remember(subxid);
        if !first {
            return Ok(());
        }
        if self.newest.is_none_or(|n| newer(subxid, n)) {
            self.newest = Some(subxid);
        }
        self.mem.push_back(SubStart { subxid, index, offset });
        if spilled && self.mem.len() > MEMORY_ENTRIES {
            self.spill(MEMORY_ENTRIES / 2)?;
        }
        Ok(())
    }

    /// Sets the offsets of the entries in memory once the transaction spills (all of
    /// them are in memory until then).
    pub fn set_offsets(&mut self, mut offset_of: impl FnMut(u64) -> u64) {
        debug_assert!(self.file.is_none(), "entries leave memory only once spilled");
        for s in &mut self.mem {
            s.offset = offset_of(s.index);
        }
    }

    fn spill(&mut self, n: usize) -> std::io::Result<()> {
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            self.file = Some((tempfile::tempfile_in(&self.dir)?, 0));
        }
        let (file, entries) = self.file.as_mut().expect("created above");
        file.seek(SeekFrom::End(0))?;
        let mut w = BufWriter::new(&mut *file);
        for s in self.mem.drain(..n) {
            w.write_all(&s.subxid.to_le_bytes())?;
            w.write_all(&s.index.to_le_bytes())?;
            w.write_all(&s.offset.to_le_bytes())?;
            *entries += 1;
        }
        w.flush()
    }

    /// The position (in file records, or in memory) of `subxid`'s entry.
    fn find(&mut self, subxid: u32) -> std::io::Result<Option<Place>> {
        if let Some(i) = self.mem.iter().rposition(|s| s.subxid == subxid) {
            return Ok(Some(Place::Mem(i)));
        }
        let Some((file, entries)) = self.file.as_mut() else {
            return Ok(None);
        };
        file.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::with_capacity(1 << 16, &mut *file);
        let mut rec = [0u8; RECORD];
        for i in 0..*entries {
            r.read_exact(&mut rec)?;
            if u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) == subxid {
                let s = SubStart {
                    subxid,
                    index: u64::from_le_bytes(rec[4..12].try_into().expect("8 bytes")),
                    offset: u64::from_le_bytes(rec[12..20].try_into().expect("8 bytes")),
                };
                return Ok(Some(Place::File(i, s)));
            }
        }
        Ok(None)
    }

    /// Removes `subxid`'s entry and every later one (the subtransactions it aborts with
    /// it, and any that began after it); returns where it started, or None when nothing
    /// of it was streamed.
    pub fn cut(&mut self, subxid: u32) -> std::io::Result<Option<SubStart>> {
        self.recent.clear();
        match self.find(subxid)? {
            None => Ok(None),
            Some(Place::Mem(i)) => {
                let s = self.mem[i];
                self.mem.truncate(i);
                Ok(Some(s))
            }
            Some(Place::File(i, s)) => {
                self.mem.clear();
                let (file, entries) = self.file.as_mut().expect("found in it");
                file.set_len(i * RECORD as u64)?;
                *entries = i;
                Ok(Some(s))
            }
        }
    }
}

enum Place {
    Mem(usize),
    File(u64, SubStart),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_subtransactions_keep_a_bounded_index_and_any_one_can_still_be_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Subxacts::new(dir.path().to_owned());
        // Messages of the top-level transaction are not noted; each loop iteration is a
        // subtransaction with one message, its xid one more than the last.
        for i in 0..1_000_000u64 {
            s.note(1000 + i as u32, i, i * 40, true).unwrap();
        }
        assert!(s.in_memory() <= MEMORY_ENTRIES, "{} entries in memory", s.in_memory());
        // Seen ones are not noted twice, recent or not.
        s.note(1000 + 999_999, 1_000_000, 0, true).unwrap();
        s.note(1000 + 5, 1_000_001, 0, true).unwrap();
        assert_eq!(
            s.cut(1000 + 999_999).unwrap(),
            Some(SubStart {
                subxid: 1000 + 999_999,
                index: 999_999,
                offset: 999_999 * 40
            })
        );
        // One spilled long ago: the cut reaches into the file.
        assert_eq!(
            s.cut(1000 + 7).unwrap(),
            Some(SubStart {
                subxid: 1000 + 7,
                index: 7,
                offset: 280
            })
        );
        assert_eq!(s.cut(1000 + 8).unwrap(), None, "cut with the earlier one");
        assert!(s.cut(1000 + 6).unwrap().is_some());
    }

    #[test]
    fn an_ancestor_writing_after_its_descendants_gets_an_entry_at_its_first_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Subxacts::new(dir.path().to_owned());
        s.note(10, 0, 0, false).unwrap(); // child 10 writes first...
        s.note(11, 1, 0, false).unwrap();
        s.note(9, 2, 0, false).unwrap(); // ... then its parent 9 (older xid)
        s.note(10, 3, 0, false).unwrap(); // seen
        assert_eq!(s.cut(9).unwrap().map(|e| e.index), Some(2));
        assert_eq!(s.cut(10).unwrap().map(|e| e.index), Some(0));
    }
}
