//! COPY's binary format: an 11-byte signature, flags, a header extension, then per
//! row an i16 field count and per field an i32 length (-1: NULL) and the value in the
//! type's binary send format; a count of -1 ends the data.
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>

use bytes::{Buf, Bytes, BytesMut};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Large enough to amortise a channel hand-over, small enough to stay in cache.
const BLOCK_BYTES: usize = 64 * 1024;

/// Gathers a binary COPY stream into blocks of whole rows (header and trailer removed).
#[derive(Default)]
pub struct RowCutter {
    pending: BytesMut,
    header_done: bool,
    /// Bytes of `pending` already known to be whole rows.
    whole: usize,
    ended: bool,
    rows: u64,
}

impl RowCutter {
    /// Where the COPY data goes in; [`RowCutter::cut`] then.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.pending
    }

    /// A block of whole rows, once the data holds at least a block's worth.
    pub fn cut(&mut self) -> Result<Option<Bytes>, String> {
        if !self.header_done {
            if self.pending.len() < 19 {
                return Ok(None);
            }
            if &self.pending[..11] != SIGNATURE {
                return Err("binary COPY data has no PGCOPY signature".into());
            }
            let ext =
                u32::from_be_bytes([self.pending[15], self.pending[16], self.pending[17], self.pending[18]]) as usize;
            if self.pending.len() < 19 + ext {
                return Ok(None);
            }
            self.pending.advance(19 + ext);
            self.header_done = true;
        }
        self.scan()?;
        if self.whole >= BLOCK_BYTES {
            Ok(Some(self.take()))
        } else {
            Ok(None)
        }
    }

    /// Whole rows seen so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn take(&mut self) -> Bytes {
        let block = self.pending.split_to(self.whole).freeze();
        self.whole = 0;
        block
    }

    /// Advances `whole` over every complete row.
    fn scan(&mut self) -> Result<(), String> {
        while !self.ended {
            let p = &self.pending[self.whole..];
            if p.len() < 2 {
                return Ok(());
            }
            let n = i16::from_be_bytes([p[0], p[1]]);
            if n == -1 {
                self.ended = true;
                self.pending.truncate(self.whole);
                return Ok(());
            }
            let mut at = 2usize;
            for _ in 0..n.max(0) {
                if p.len() < at + 4 {
                    return Ok(());
                }
                let len = i32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
                at += 4 + len.max(0) as usize;
            }
            if p.len() < at {
                return Ok(());
            }
            self.whole += at;
            self.rows += 1;
        }
        Ok(())
    }

    /// The rows left at the end; the stream must have ended with its trailer.
    pub fn finish(&mut self) -> Result<Bytes, String> {
        if !self.ended || self.whole != self.pending.len() {
            return Err("binary COPY data ended inside a row or without its trailer".into());
        }
        Ok(self.take())
    }
}

/// Calls `f(index, value)` for each field of the row at the start of `data`, advancing
/// `data` past it; returns the number of fields.
pub(crate) fn for_each_field(
    data: &mut &[u8],
    mut f: impl FnMut(usize, Option<&[u8]>) -> Result<(), String>,
) -> Result<usize, String> {
    let short = || "binary COPY row is truncated".to_string();
    if data.len() < 2 {
        return Err(short());
    }
    let n = data.get_i16();
    for i in 0..n.max(0) as usize {
        if data.len() < 4 {
            return Err(short());
        }
        let len = data.get_i32();
        if len < 0 {
            f(i, None)?;
        } else {
            let len = len as usize;
            if data.len() < len {
                return Err(short());
            }
            f(i, Some(&data[..len]))?;
            data.advance(len);
        }
    }
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => v.extend((-1i32).to_be_bytes()),
                Some(b) => {
                    v.extend((b.len() as i32).to_be_bytes());
                    v.extend(*b);
                }
            }
        }
        v
    }

    #[test]
    fn rows_are_cut_whole_and_fields_read_back() {
        let mut stream = SIGNATURE.to_vec();
        stream.extend([0, 0, 0, 0, 0, 0, 0, 0]);
        let r1 = row(&[Some(b"abc"), None]);
        let r2 = row(&[Some(&[0, 0, 0, 7]), Some(b"")]);
        stream.extend(&r1);
        stream.extend(&r2);
        stream.extend((-1i16).to_be_bytes());
        let mut cut = RowCutter::default();
        // Fed a byte at a time, nothing is lost or split.
        let mut blocks = Vec::new();
        for b in &stream {
            cut.buffer().extend_from_slice(std::slice::from_ref(b));
            if let Some(block) = cut.cut().unwrap() {
                blocks.push(block);
            }
        }
        blocks.push(cut.finish().unwrap());
        let all: Vec<u8> = blocks.concat();
        assert_eq!(all, [r1.clone(), r2].concat());
        let mut data = &all[..];
        let mut seen = Vec::new();
        while !data.is_empty() {
            for_each_field(&mut data, |i, v| {
                seen.push((i, v.map(<[u8]>::to_vec)));
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(
            seen,
            vec![
                (0, Some(b"abc".to_vec())),
                (1, None),
                (0, Some(vec![0, 0, 0, 7])),
                (1, Some(vec![]))
            ]
        );
        let mut cut = RowCutter::default();
        cut.buffer().extend_from_slice(&stream[..stream.len() - 3]);
        cut.cut().unwrap();
        assert!(cut.finish().is_err(), "a stream cut short is an error");
    }
}
