//! Transient or definite: every failure walshore meets is classified here, and the
//! backoff between attempts is chosen here.
//!
//! A transient failure (a lost connection, a server restarting, S3 answering 5xx or
//! throttling, a timeout) is retried: the pipeline reconnects and resumes from the
//! committed position, so nothing is lost or written twice. A definite failure (bad
//! configuration, a missing privilege, a value that cannot be written, a full disk,
//! another instance holding the pipeline) stops walshore with a message naming the fix,
//! because trying again cannot help.
//!
//! Errors are matched by kind (SQLSTATE, `io::ErrorKind`, object-store variant), never
//! by message text.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    Transient,
    Definite,
}

/// A SQLSTATE from PostgreSQL.
pub fn of_sqlstate(code: &str) -> Retry {
    match code.get(..2) {
        // connection exceptions, insufficient resources (disk full on the server, out of
        // memory, too many connections), system errors
        Some("08" | "53" | "58") => Retry::Transient,
        // operator intervention: shutdown, crash shutdown, cannot connect now; a query
        // cancelled on purpose (57014) is not retried
        Some("57") if code != "57014" => Retry::Transient,
        // serialization failure, deadlock
        Some("40") => Retry::Transient,
        _ => Retry::Definite,
    }
}

/// An error of a `tokio-postgres` client (the copy connections).
pub fn of_client(e: &tokio_postgres::Error) -> Retry {
    if e.is_closed() {
        return Retry::Transient;
    }
    match e.code() {
        Some(c) => of_sqlstate(c.code()),
        // no SQLSTATE: the connection failed underneath (I/O, TLS, protocol), or
        // walshore ended it (a password the policy would not send in clear)
        None => match std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>()) {
            Some(io) if io.kind() == std::io::ErrorKind::PermissionDenied => Retry::Definite,
            _ => Retry::Transient,
        },
    }
}

/// A local I/O error: a full or read-only disk and missing permissions are definite,
/// the rest (interrupted, reset, timed out, …) transient.
pub fn of_io(e: &std::io::Error) -> Retry {
    use std::io::ErrorKind::*;
    match e.kind() {
        StorageFull | QuotaExceeded | ReadOnlyFilesystem | PermissionDenied | InvalidInput | InvalidData
        | Unsupported | FileTooLarge => Retry::Definite,
        _ => Retry::Transient,
    }
}

/// Whether an I/O error means the disk is full (named as such in messages).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// An object-store error, after the store's own request retries (5xx, 429, timeouts of
/// idempotent requests) are exhausted.
pub fn of_store(e: &object_store::Error) -> Retry {
    match e {
        object_store::Error::Generic { .. } => match io_source(e) {
            // a local directory: the file system says what went wrong
            Some(io) => of_io(io),
            // S3: a transport failure or a server error the store gave up on
            None => Retry::Transient,
        },
        object_store::Error::JoinError { .. } => Retry::Transient,
        // not found (a missing bucket), permission denied, unauthenticated, invalid
        // path, not supported, precondition: configuration or a real conflict
        _ => Retry::Definite,
    }
}

/// An AWS service error (Glue) by its code, or by its HTTP status as text when the SDK
/// could not read a code; `None`: no answer at all (timeout, connection).
pub fn of_aws(code: Option<&str>) -> Retry {
    match code {
        None => Retry::Transient,
        Some(c) if c.len() == 3 && (c.starts_with('5') || c == "429") => Retry::Transient,
        Some(
            "ThrottlingException"
            | "ConcurrentModificationException"
            | "InternalServiceException"
            | "OperationTimeoutException"
            | "ResourceNotReadyException",
        ) => Retry::Transient,
        Some(_) => Retry::Definite,
    }
}

/// Whether an AWS error code says the service is busy rather than failing: throttling
/// or a concurrent change of the same resource. Such a call is worth repeating where it
/// is, without tearing the pipeline down.
pub fn is_aws_busy(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("ThrottlingException" | "ConcurrentModificationException" | "TooManyRequestsException" | "429")
    )
}

/// Whether an AWS error code says the credentials or permissions are wrong.
pub fn is_aws_auth(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "InvalidSignatureException"
                | "401"
                | "403"
        )
    )
}

/// Displays an error with its whole `source()` chain: where an error is logged or
/// printed (a `Display` shows its own layer only).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    /// URLs in it are shown without credentials or query (`redact`): a layer's message
    /// may quote a URL with a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let top = self.0.to_string();
        let mut text = top.clone();
        let mut cur = self.0.source();
        while let Some(e) = cur {
            let s = e.to_string();
            // thiserror messages often embed their source already.
            if !top.contains(&s) {
                text.push_str(": ");
                text.push_str(&s);
            }
            cur = e.source();
        }
        f.write_str(&crate::redact::scrub(&text))
    }
}

/// The first `std::io::Error` in an error's source chain.
pub fn io_source<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// First delay between attempts of the pipeline.
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// Largest delay between attempts: a service waiting for PostgreSQL or S3 to come back
/// tries at least once a minute.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The delays between attempts of the whole pipeline: exponential from one second,
/// with jitter (so that several pipelines do not reconnect in step), capped at a
/// minute. `attempts` bounds the number of retries (`None`: until stopped).
pub fn backoff(attempts: Option<usize>) -> impl Iterator<Item = Duration> + Send {
    // backon's jitter adds up to the current delay again, so the exponential part
    // stops at half the cap: late delays fall between 30 s and 60 s.
    let b = ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY / 2)
        .with_factor(2.0)
        .with_jitter();
    match attempts {
        Some(n) => b.with_max_times(n),
        None => b.without_max_times(),
    }
    .build()
    .map(|d| d.min(MAX_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(of_sqlstate("08006"), Retry::Transient);
        assert_eq!(of_sqlstate("57P01"), Retry::Transient);
        assert_eq!(of_sqlstate("53100"), Retry::Transient);
        assert_eq!(of_sqlstate("40001"), Retry::Transient);
        assert_eq!(of_sqlstate("57014"), Retry::Definite);
        assert_eq!(of_sqlstate("42501"), Retry::Definite);
        assert_eq!(of_sqlstate("55000"), Retry::Definite);
    }

    #[test]
    fn io_errors() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(of_io(&full), Retry::Definite);
        assert!(is_disk_full(&full));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(of_io(&reset), Retry::Transient);
        let store = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        assert_eq!(of_store(&store), Retry::Definite);
        let http = object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        assert_eq!(of_store(&http), Retry::Transient);
    }

    #[test]
    fn aws_codes() {
        assert_eq!(of_aws(None), Retry::Transient);
        assert_eq!(of_aws(Some("ThrottlingException")), Retry::Transient);
        assert_eq!(of_aws(Some("503")), Retry::Transient);
        assert_eq!(of_aws(Some("AccessDeniedException")), Retry::Definite);
        assert_eq!(of_aws(Some("403")), Retry::Definite);
        assert!(is_aws_auth(Some("403")) && !is_aws_auth(Some("ThrottlingException")));
        assert!(is_aws_busy(Some("ThrottlingException")) && is_aws_busy(Some("ConcurrentModificationException")));
        assert!(!is_aws_busy(Some("InternalServiceException")) && !is_aws_busy(None));
    }

    #[test]
    fn backoff_grows_to_the_cap_and_is_bounded_when_asked() {
        let delays: Vec<_> = backoff(Some(10)).collect();
        assert_eq!(delays.len(), 10);
        assert!(delays[0] >= MIN_DELAY && delays[0] <= MIN_DELAY * 2, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= MAX_DELAY), "{delays:?}");
        assert!(delays[9] >= MAX_DELAY / 2, "{delays:?}");
        assert!(backoff(None).take(100).count() == 100);
    }
}
