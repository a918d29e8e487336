//! COPY's binary format: an 11-byte signature, flags, a header extension, then per
//! row an i16 field count and per field an i32 length (-1: NULL) and the value in the
//! type's binary send format; a count of -1 ends the data.
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>

use bytes::{Buf, Bytes, BytesMut};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Large enough to amortise a hand-over to the batcher, small enough to stay in cache.
const BLOCK_BYTES: usize = 64 * 1024;

/// Gathers a binary COPY stream into blocks of whole rows (header and trailer removed),
/// a CopyData message at a time. PostgreSQL puts exactly one row in each CopyData
/// message it sends (the header rides with the first, the trailer comes on its own), so
/// rows are not walked here: the decoder checks every row against its length.
#[derive(Default)]
pub struct RowCutter {
    pending: BytesMut,
    header_done: bool,
    trailer: bool,
    rows: u64,
    /// The first thing wrong with the stream, reported by the next `cut` or `finish`.
    error: Option<String>,
}

impl RowCutter {
    /// Takes the data of one CopyData message.
    pub fn message(&mut self, data: &[u8]) {
        if self.error.is_none() {
            self.error = self.append(data).err();
        }
    }

    fn append(&mut self, mut data: &[u8]) -> Result<(), String> {
        if self.trailer {
            return Err("binary COPY data goes on after its trailer".into());
        }
        if !self.header_done {
            if data.get(..11) != Some(&SIGNATURE[..]) || data.len() < 19 {
                return Err("binary COPY data has no PGCOPY signature".into());
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
            data = data.get(19 + ext..).ok_or("binary COPY header is cut short")?;
            self.header_done = true;
        }
        // A row begins with its field count; -1 is the trailer.
        if data == [0xff, 0xff] {
            self.trailer = true;
        } else if !data.is_empty() {
            self.pending.extend_from_slice(data);
            self.rows += 1;
        }
        Ok(())
    }

    /// A block of whole rows, once the data holds at least a block's worth.
    pub fn cut(&mut self) -> Result<Option<Bytes>, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        Ok((self.pending.len() >= BLOCK_BYTES).then(|| self.pending.split().freeze()))
    }

    /// Whole rows seen so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The rows left at the end; the stream must have ended with its trailer.
    pub fn finish(&mut self) -> Result<Bytes, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.trailer {
            return Err("binary COPY data ended without its trailer".into());
        }
        Ok(self.pending.split().freeze())
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
        let mut header = SIGNATURE.to_vec();
        header.extend([0, 0, 0, 0, 0, 0, 0, 0]);
        let r1 = row(&[Some(b"abc"), None]);
        let r2 = row(&[Some(&[0, 0, 0, 7]), Some(b"")]);
        // As PostgreSQL sends it: the header with the first row, the trailer alone.
        let mut cut = RowCutter::default();
        cut.message(&[header.clone(), r1.clone()].concat());
        cut.message(&r2);
        cut.message(&(-1i16).to_be_bytes());
        assert_eq!(cut.cut().unwrap(), None, "less than a block");
        assert_eq!(cut.rows(), 2);
        let all = cut.finish().unwrap();
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
        // An empty table: header and trailer in one message.
        let mut cut = RowCutter::default();
        cut.message(&[header.clone(), (-1i16).to_be_bytes().to_vec()].concat());
        assert_eq!((cut.finish().unwrap().len(), cut.rows()), (0, 0));
        // Blocks are cut once a block's worth is in, on message (row) boundaries.
        let mut cut = RowCutter::default();
        cut.message(&header);
        let big = row(&[Some(&[7; 1000])]);
        let mut blocks = Vec::new();
        for _ in 0..200 {
            cut.message(&big);
            blocks.extend(cut.cut().unwrap());
        }
        cut.message(&(-1i16).to_be_bytes());
        blocks.push(cut.finish().unwrap());
        assert!(blocks.len() > 2 && blocks.iter().all(|b| b.len() % big.len() == 0));
        assert_eq!(blocks.concat(), big.repeat(200));
        // A stream cut short, or going on after its trailer, or without a header.
        let mut cut = RowCutter::default();
        cut.message(&[header.clone(), r1.clone()].concat());
        assert!(cut.finish().is_err(), "no trailer");
        let mut cut = RowCutter::default();
        cut.message(&[header, (-1i16).to_be_bytes().to_vec()].concat());
        cut.message(&r1);
        assert!(cut.finish().is_err(), "data after the trailer");
        let mut cut = RowCutter::default();
        cut.message(&r1);
        assert!(cut.cut().is_err(), "no signature");
    }
}
