//! Buffers streamed in-progress transactions (pgoutput protocol 2, `streaming 'on'`).
//!
//! PostgreSQL streams a large transaction in blocks (Stream Start … Stream Stop) before
//! it knows whether it commits. We keep each block's raw messages per top-level xid and
//! release them only on Stream Commit; Stream Abort discards them.
//!
//! Invariants:
//! - Memory is bounded: when the bytes held in memory by all buffered transactions pass
//!   `memory_limit`, the transaction being appended to moves to a spill file in
//!   `spill_dir` and every later message of it goes there too.
//! - Per-subtransaction bookkeeping is bounded too (`subxacts`): a million
//!   subtransactions in one transaction keep a fixed number of entries in memory.
//! - A subtransaction abort truncates the transaction at the first message of that
//!   subtransaction. Everything after that point in the stream belongs to the aborted
//!   subtransaction or to subtransactions nested in it, because a backend runs a
//!   transaction sequentially and PostgreSQL sends the abort as soon as it decodes it;
//!   this is what PostgreSQL's own apply worker does (`apply_handle_stream_abort`).
//!
//! This file does file IO but no network and no async: it is driven by the source task.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use bytes::Bytes;

use super::subxacts::Subxacts;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "cannot spill streamed transaction {xid} to {dir}: {source}; free disk space or set source.spill_dir to a larger volume"
    )]
    Spill {
        xid: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read back spilled transaction {xid}: {source}")]
    ReadBack {
        xid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "spill files would exceed source.spill_max_bytes ({limit} bytes) with streamed transaction {xid}; raise the limit or free disk space"
    )]
    SpillFull { xid: u32, limit: u64 },
}

struct Spill {
    file: BufWriter<File>,
    len: u64,
}

struct Txn {
    mem: Vec<Bytes>,
    mem_bytes: usize,
    spill: Option<Spill>,
    count: u64,
    /// Where each subtransaction starts (bounded: see `subxacts`).
    subxacts: Subxacts,
}

pub struct StreamBuffer {
    txns: HashMap<u32, Txn>,
    mem_bytes: usize,
    memory_limit: usize,
    spill_dir: PathBuf,
    spill_bytes: u64,
    spill_limit: u64,
}

impl StreamBuffer {
    pub fn new(spill_dir: PathBuf, memory_limit: usize, spill_limit: u64) -> Self {
        StreamBuffer {
            txns: HashMap::new(),
            mem_bytes: 0,
            memory_limit,
            spill_dir,
            spill_bytes: 0,
            spill_limit,
        }
    }

    /// True when some streamed transaction is neither committed nor aborted.
    pub fn spill_bytes(&self) -> u64 {
        self.spill_bytes
    }

    pub fn in_flight(&self) -> bool {
        !self.txns.is_empty()
    }

    pub fn memory_bytes(&self) -> usize {
        self.mem_bytes
    }

    /// Appends one raw message of top-level transaction `xid`, sent by `subxid`.
    pub fn push(&mut self, xid: u32, subxid: u32, raw: Bytes) -> Result<(), StreamError> {
        let dir = self.spill_dir.clone();
        let txn = self.txns.entry(xid).or_insert_with(|| Txn {
            mem: Vec::new(),
            mem_bytes: 0,
            spill: None,
            count: 0,
            subxacts: Subxacts::new(dir.clone()),
        });
        if subxid != xid {
            let offset = txn.spill.as_ref().map_or(0, |s| s.len);
            txn.subxacts
                .note(subxid, txn.count, offset, txn.spill.is_some())
                .map_err(|source| StreamError::Spill { xid, dir, source })?;
        }
        txn.count += 1;
        if let Some(spill) = txn.spill.as_mut() {
            let add = 4 + raw.len() as u64;
            if self.spill_bytes + add > self.spill_limit {
                return Err(StreamError::SpillFull {
                    xid,
                    limit: self.spill_limit,
                });
            }
            write_entry(spill, &raw).map_err(|source| StreamError::Spill {
                xid,
                dir: self.spill_dir.clone(),
                source,
            })?;
            self.spill_bytes += add;
            return Ok(());
        }
        txn.mem_bytes += raw.len();
        self.mem_bytes += raw.len();
        // Copied out: `raw` is a slice of the stream's read buffer, whose every gulp
        // (1 MiB and more) it would keep alive while the transaction stays open, beyond
        // what `memory_limit` counts.
        txn.mem.push(Bytes::copy_from_slice(&raw));
        if self.mem_bytes > self.memory_limit {
            self.spill(xid)?;
        }
        Ok(())
    }

    fn spill(&mut self, xid: u32) -> Result<(), StreamError> {
        let dir = self.spill_dir.clone();
        let io = |source| StreamError::Spill {
            xid,
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let file = tempfile::tempfile_in(&dir).map_err(io)?;
        let txn = self.txns.get_mut(&xid).expect("spilled transaction exists");
        let mut spill = Spill {
            file: BufWriter::with_capacity(1 << 16, file),
            len: 0,
        };
        let mut offsets = Vec::with_capacity(txn.mem.len());
        for raw in txn.mem.drain(..) {
            offsets.push(spill.len);
            if self.spill_bytes + 4 + raw.len() as u64 > self.spill_limit {
                return Err(StreamError::SpillFull {
                    xid,
                    limit: self.spill_limit,
                });
            }
            write_entry(&mut spill, &raw).map_err(io)?;
            self.spill_bytes += 4 + raw.len() as u64;
        }
        // Every message of the transaction was in memory: so are its subtransactions'
        // entries, whose offsets are known now.
        txn.subxacts.set_offsets(|index| offsets[index as usize]);
        self.mem_bytes -= txn.mem_bytes;
        txn.mem_bytes = 0;
        txn.spill = Some(spill);
        tracing::debug!(xid, "spilled streamed transaction to disk");
        Ok(())
    }

    /// Stream Abort: `subxid == xid` discards the whole transaction, otherwise the
    /// subtransaction and everything after its first message.
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), StreamError> {
        if xid == subxid {
            if let Some(txn) = self.txns.remove(&xid) {
                self.mem_bytes -= txn.mem_bytes;
                self.spill_bytes -= txn.spill.map_or(0, |s| s.len);
            }
            return Ok(());
        }
        let Some(txn) = self.txns.get_mut(&xid) else {
            return Ok(());
        };
        let cut = txn.subxacts.cut(subxid).map_err(|source| StreamError::Spill {
            xid,
            dir: self.spill_dir.clone(),
            source,
        })?;
        let Some(start) = cut else {
            return Ok(()); // nothing of this subtransaction was streamed
        };
        let (index, offset) = (start.index, start.offset);
        txn.count = index;
        if let Some(spill) = txn.spill.as_mut() {
            let io = |source| StreamError::Spill {
                xid,
                dir: self.spill_dir.clone(),
                source,
            };
            spill.file.flush().map_err(io)?;
            spill.file.get_mut().set_len(offset).map_err(io)?;
            spill.file.seek(SeekFrom::Start(offset)).map_err(io)?;
            self.spill_bytes -= spill.len - offset;
            spill.len = offset;
        } else {
            let dropped: usize = txn.mem.drain(index as usize..).map(|b| b.len()).sum();
            txn.mem_bytes -= dropped;
            self.mem_bytes -= dropped;
        }
        Ok(())
    }

    /// Stream Commit: hands over the transaction's messages, in order.
    pub fn commit(&mut self, xid: u32) -> Result<Committed, StreamError> {
        let Some(txn) = self.txns.remove(&xid) else {
            return Ok(Committed {
                mem: Vec::new().into_iter(),
                file: None,
                xid,
            });
        };
        self.mem_bytes -= txn.mem_bytes;
        let file = match txn.spill {
            Some(spill) => {
                self.spill_bytes -= spill.len;
                let mut file = spill.file.into_inner().map_err(|e| StreamError::ReadBack {
                    xid,
                    source: e.into_error(),
                })?;
                file.seek(SeekFrom::Start(0))
                    .map_err(|source| StreamError::ReadBack { xid, source })?;
                Some(BufReader::with_capacity(1 << 16, file))
            }
            None => None,
        };
        Ok(Committed {
            mem: txn.mem.into_iter(),
            file,
            xid,
        })
    }
}

fn write_entry(spill: &mut Spill, raw: &[u8]) -> std::io::Result<()> {
    spill.file.write_all(&(raw.len() as u32).to_be_bytes())?;
    spill.file.write_all(raw)?;
    spill.len += 4 + raw.len() as u64;
    Ok(())
}

/// The messages of a committed streamed transaction: memory first, then the spill file
/// (a transaction is either wholly in memory or wholly spilled).
pub struct Committed {
    mem: std::vec::IntoIter<Bytes>,
    file: Option<BufReader<File>>,
    xid: u32,
}

impl Committed {
    pub fn next_message(&mut self) -> Result<Option<Bytes>, StreamError> {
        if let Some(b) = self.mem.next() {
            return Ok(Some(b));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let xid = self.xid;
        let mut len = [0u8; 4];
        match file.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(source) => return Err(StreamError::ReadBack { xid, source }),
        }
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        file.read_exact(&mut buf)
            .map_err(|source| StreamError::ReadBack { xid, source })?;
        Ok(Some(Bytes::from(buf)))
    }
}
