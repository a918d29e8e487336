//! COPY's text format: rows end with `\n`, columns are separated by tabs, `\N` is NULL,
//! and backslash escapes `\b \f \n \r \t \v \\`, octal `\NNN` and hex `\xHH` stand for
//! bytes. <https://www.postgresql.org/docs/current/sql-copy.html>
//!
//! [`LineCutter`] cuts a COPY stream into blocks of whole rows; [`fields`] splits one
//! row. Values are the same text pgoutput sends (same output functions, same session
//! settings), so the snapshot and the stream share one value parser.

use bytes::{Bytes, BytesMut};

/// Gathers a COPY data stream (PostgreSQL sends one message per row) into blocks of
/// whole rows of about `BLOCK_BYTES`.
#[derive(Default)]
pub struct LineCutter {
    pending: BytesMut,
}

/// Large enough to amortise a channel hand-over, small enough to stay in cache.
const BLOCK_BYTES: usize = 64 * 1024;

impl LineCutter {
    /// A block of whole rows once enough have gathered.
    pub fn push(&mut self, data: &[u8]) -> Option<Bytes> {
        self.pending.extend_from_slice(data);
        if self.pending.len() < BLOCK_BYTES {
            return None;
        }
        let last_nl = self.pending.iter().rposition(|&b| b == b'\n')?;
        Some(self.pending.split_to(last_nl + 1).freeze())
    }

    /// The rows left at the end of the stream. Data after the last row is an error:
    /// COPY ends every row with a newline.
    pub fn finish(self) -> Result<Bytes, String> {
        if self.pending.is_empty() || self.pending.ends_with(b"\n") {
            Ok(self.pending.freeze())
        } else {
            Err("data after the last row".into())
        }
    }
}

/// One field of a row: `None` is NULL. Escaped fields are decoded into `scratch`.
pub(crate) fn for_each_field<'a>(
    line: &'a [u8],
    scratch: &'a mut Vec<u8>,
    mut f: impl FnMut(usize, Option<&[u8]>) -> Result<(), String>,
) -> Result<usize, String> {
    let mut n = 0;
    let mut start = 0;
    loop {
        let end = line[start..].iter().position(|&b| b == b'\t').map_or(line.len(), |p| start + p);
        let field = &line[start..end];
        if field == b"\\N" {
            f(n, None)?;
        } else if field.contains(&b'\\') {
            scratch.clear();
            unescape(field, scratch)?;
            f(n, Some(scratch))?;
        } else {
            f(n, Some(field))?;
        }
        n += 1;
        if end == line.len() {
            return Ok(n);
        }
        start = end + 1;
    }
}

fn unescape(f: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'\\' {
            out.push(f[i]);
            i += 1;
            continue;
        }
        let c = *f.get(i + 1).ok_or("trailing backslash")?;
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    v = v * 8 + u32::from(f[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    v = v * 16 + (f[i] as char).to_digit(16).expect("hex digit");
                    i += 1;
                    n += 1;
                }
                out.push(if n == 0 { b'x' } else { v as u8 });
            }
            other => out.push(other),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        for_each_field(line, &mut scratch, |_, v| {
            out.push(v.map(<[u8]>::to_vec));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn blocks_end_on_row_boundaries_and_escapes_are_decoded() {
        let mut cut = LineCutter::default();
        assert!(cut.push(b"1\ta\\tb\\\\c\t\\N\n2\tline\\nbr").is_none());
        let big = vec![b'x'; BLOCK_BYTES];
        let block = cut.push(&big).expect("a block once enough gathered");
        assert_eq!(&block[..], b"1\ta\\tb\\\\c\t\\N\n");
        let second = cut.push(b"eak\t\\x41\\101\n").expect("the pending row is complete now");
        assert!(second.starts_with(b"2\tline") && second.ends_with(b"\\101\n"));
        assert!(cut.finish().unwrap().is_empty());
        assert_eq!(row(&block[..block.len() - 1]), vec![Some(b"1".to_vec()), Some(b"a\tb\\c".to_vec()), None]);
        assert_eq!(row(b"2\tline\\nbreak\t\\x41\\101"), vec![Some(b"2".to_vec()), Some(b"line\nbreak".to_vec()), Some(b"AA".to_vec())]);
        let mut cut = LineCutter::default();
        assert!(cut.push(b"1\t2").is_none());
        assert!(cut.finish().is_err());
    }
}
