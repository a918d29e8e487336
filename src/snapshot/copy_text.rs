//! COPY's text format -> tuples of text values (the same text pgoutput sends).
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.2>: rows end
//! with `\n`, columns are separated by tabs, `\N` is NULL, and backslash escapes
//! `\b \f \n \r \t \v \\`, octal `\NNN` and hex `\xHH` stand for bytes.

use bytes::{Bytes, BytesMut};

use crate::decode::{Tuple, TupleValue};

pub(crate) struct Parser {
    columns: usize,
    pending: BytesMut,
}

impl Parser {
    pub(crate) fn new(columns: usize) -> Parser {
        Parser { columns, pending: BytesMut::new() }
    }

    /// Feeds a chunk; calls `row` for every complete row. Field values are slices of
    /// the chunk (no copy) unless they hold escapes.
    pub(crate) fn push(&mut self, data: Bytes, mut row: impl FnMut(Tuple)) -> Result<(), String> {
        let Some(last_nl) = data.iter().rposition(|&b| b == b'\n') else {
            self.pending.extend_from_slice(&data);
            return Ok(());
        };
        let complete = if self.pending.is_empty() {
            data.slice(..=last_nl)
        } else {
            self.pending.extend_from_slice(&data[..=last_nl]);
            std::mem::take(&mut self.pending).freeze()
        };
        self.pending.extend_from_slice(&data[last_nl + 1..]);
        let mut start = 0;
        while start < complete.len() {
            let end = start + complete[start..].iter().position(|&b| b == b'\n').expect("complete rows end with a newline");
            row(self.parse_line(&complete, start, end)?);
            start = end + 1;
        }
        Ok(())
    }

    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.pending.is_empty() { Ok(()) } else { Err("data after the last row".into()) }
    }

    fn parse_line(&self, buf: &Bytes, start: usize, end: usize) -> Result<Tuple, String> {
        let mut out = Vec::with_capacity(self.columns);
        if self.columns == 0 {
            return if start == end { Ok(out) } else { Err("a row for a table without columns has data".into()) };
        }
        let mut field_start = start;
        loop {
            let field_end = buf[field_start..end].iter().position(|&b| b == b'\t').map_or(end, |p| field_start + p);
            let field = &buf[field_start..field_end];
            out.push(if field == b"\\N" {
                TupleValue::Null
            } else if !field.contains(&b'\\') {
                TupleValue::Text(buf.slice(field_start..field_end))
            } else {
                TupleValue::Text(unescape(field)?.into())
            });
            if field_end == end {
                break;
            }
            field_start = field_end + 1;
        }
        if out.len() != self.columns {
            return Err(format!("row has {} columns, expected {}", out.len(), self.columns));
        }
        Ok(out)
    }
}

fn unescape(f: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(f.len());
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
                if n == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_across_chunks_and_escapes_are_decoded() {
        let mut p = Parser::new(3);
        let mut rows = Vec::new();
        p.push(Bytes::from_static(b"1\ta\\tb\\\\c\t\\N\n2\t"), |r| rows.push(r)).unwrap();
        assert_eq!(rows.len(), 1);
        p.push(Bytes::from_static(b"line\\nbreak\t\\x41\\101\n"), |r| rows.push(r)).unwrap();
        p.finish().unwrap();
        let text = |s: &'static [u8]| TupleValue::Text(Bytes::from_static(s));
        assert_eq!(rows[0], vec![text(b"1"), text(b"a\tb\\c"), TupleValue::Null]);
        assert_eq!(rows[1], vec![text(b"2"), text(b"line\nbreak"), text(b"AA")]);
        assert!(Parser::new(2).push(Bytes::from_static(b"1\n"), |_| {}).is_err());
    }
}
