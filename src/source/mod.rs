//! The replication connection: slot, START_REPLICATION, keepalives and feedback, and the
//! assembly of pgoutput messages into whole transactions.
//!
//! Contract:
//! - [`Replication::confirm`] MUST only ever be given an LSN that is durably committed in
//!   the sink (or, when nothing is in flight, a keepalive's position that holds no change
//!   for us). PostgreSQL frees WAL up to it; it is never moved backward.
//! - [`Assembler`] emits transactions whole, in commit order, never interleaved, and
//!   skips every transaction whose commit LSN is below the committed position, so a
//!   transaction PostgreSQL sends again after a restart is not written twice.

mod assemble;
mod conn;
mod guard;
pub mod iam;
mod replication;
pub mod sql;
pub mod tls;
pub mod types;
mod wire;

pub use assemble::{Assembler, Step};
pub(crate) use conn::Conn;
pub use replication::{Replication, SlotState, SystemInfo, WireStats, XLog};
pub(crate) use replication::{quote_ident, quote_literal};

/// An error PostgreSQL sent, with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct PgError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub(crate) fn parse(body: &[u8]) -> PgError {
        let mut e = PgError {
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut b = body;
        while let Some((&kind, rest)) = b.split_first() {
            if kind == 0 {
                break;
            }
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            let v = String::from_utf8_lossy(&rest[..end]).into_owned();
            match kind {
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
            b = rest.get(end + 1..).unwrap_or(&[]);
        }
        e
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

pub use crate::retry::Retry;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot connect to PostgreSQL at {target}: {source}; check source.url and that the server is running and reachable"
    )]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS to PostgreSQL at {target} failed: {message}")]
    Tls { target: String, message: String },
    #[error("PostgreSQL refused user {user:?}: {message}; {fix}")]
    Auth {
        user: String,
        message: String,
        fix: &'static str,
    },
    #[error("{0}")]
    IamToken(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[source] std::io::Error),
    #[error("PostgreSQL: {0}")]
    Server(PgError),
    #[error("{0}")]
    Setup(String),
    #[error(
        "replication slot {slot:?} is in use by another process ({holder}); another walshore may be running on this slot: stop it first"
    )]
    SlotInUse { slot: String, holder: String },
    #[error(
        "replication slot {slot:?} disappeared: {detail}; the position in the lake can no longer be continued from PostgreSQL, a new initial snapshot is needed"
    )]
    SlotGone { slot: String, detail: String },
    #[error("unexpected reply from PostgreSQL: {0}")]
    Protocol(String),
    #[error(transparent)]
    Decode(#[from] crate::decode::DecodeError),
    #[error(transparent)]
    Stream(#[from] crate::decode::StreamError),
}

/// What to check when the server refuses a login.
pub(crate) fn auth_fix(p: &crate::config::ConnParams) -> &'static str {
    match p.auth {
        crate::config::Auth::Password => "check the user and password in source.url and pg_hba.conf",
        crate::config::Auth::Iam { .. } => {
            "check that the database user was granted rds_iam, that walshore's AWS identity is allowed \
             rds-db:connect as that user, that source.region is the database's region, and that the clock is right"
        }
    }
}

impl SourceError {
    /// Network trouble and server shutdowns are worth retrying; configuration,
    /// permission and protocol problems are not (see `crate::retry`).
    pub fn retry(&self) -> Retry {
        match self {
            SourceError::Connect { .. } | SourceError::Io(_) => Retry::Transient,
            SourceError::Server(e) => crate::retry::of_sqlstate(&e.code),
            _ => Retry::Definite,
        }
    }
}
