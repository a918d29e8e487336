//! A bounds-checked cursor over a message: every read returns an error instead of panicking.

use bytes::Bytes;

use super::DecodeError;

pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    pub(crate) kind: &'static str,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader {
            buf,
            pos: 0,
            kind: "unknown",
        }
    }

    pub(crate) fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            kind: self.kind,
            offset: self.pos,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format!(
                "truncated {what}: need {n} bytes, {} left",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    pub(crate) fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    /// A NUL-terminated UTF-8 string.
    pub(crate) fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(self.err(format!("unterminated {what}")));
        };
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.err(format!("{what} is not UTF-8")))?
            .to_owned();
        self.pos += end + 1;
        Ok(s)
    }

    /// `n` bytes as a zero-copy slice of the message.
    pub(crate) fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..start + n))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}
