//! pgoutput bytes -> typed messages.
//!
//! Contract: [`decode`] is pure (no IO, no tokio), never panics on any input, and every
//! error names the message kind and the byte offset where decoding failed. Tuple values
//! are zero-copy slices of the input buffer (`Bytes`).
//!
//! Covers every message of pgoutput protocol versions 1 and 2:
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//! In protocol 2, messages sent inside a Stream Start/Stop block carry the transaction id
//! of their top-level transaction (or subtransaction) right after the message byte; the
//! caller says whether a block is open with [`Framing::in_stream`].

mod message;
mod reader;
pub mod stream;
mod subxacts;

pub use message::{Column, Message, Relation, ReplicaIdentity, Tuple, TupleValue};
pub use stream::{StreamBuffer, StreamError};

use reader::Reader;

/// Decoding state the caller tracks: whether a Stream Start/Stop block is open.
#[derive(Clone, Copy, Debug, Default)]
pub struct Framing {
    pub in_stream: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pgoutput {kind} message at byte {offset}: {what}")]
pub struct DecodeError {
    /// The message kind, as PostgreSQL names it (`Insert`, `Relation`, …).
    pub kind: &'static str,
    pub offset: usize,
    pub what: String,
}

/// Decodes one pgoutput message (the payload of an XLogData message).
pub fn decode(buf: bytes::Bytes, framing: Framing) -> Result<Message, DecodeError> {
    message::decode_message(Reader::new(buf), framing)
}

#[cfg(test)]
mod tests;
