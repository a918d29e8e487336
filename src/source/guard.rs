//! The password policy for ordinary SQL sessions. tokio-postgres answers every
//! authentication request itself, a request for the password in clear text included;
//! walshore's own client refuses that request unless the server was verified
//! (`tls::cleartext_allowed`). [`AuthGuard`] gives the SQL sessions the same policy: it
//! reads the server's messages as they pass, until authentication is over, and ends the
//! connection with an error at a cleartext request, before tokio-postgres sees it.
//!
//! Over TLS it watches the decrypted stream ([`GuardedTls`] wraps the TLS stream and
//! stands the raw socket's guard down once the handshake starts); without TLS, the raw
//! stream. The reply to the SSL request (one byte) is not a message and is skipped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// Where the guard is in the server's message stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Authentication is over (or the policy allows anything): bytes pass unread.
    Off,
    /// A cleartext request was seen: every read fails from here on.
    Refused,
    /// Bytes that are not messages (the SSL request's one-byte answer).
    Skip(usize),
    /// A message's tag and length, `have` of its 5 bytes read.
    Header { buf: [u8; 5], have: usize },
    /// A message body, `left` bytes to go; an authentication request's first 4 (its
    /// kind) are collected in `code`.
    Body {
        tag: u8,
        left: usize,
        code: [u8; 4],
        have: usize,
    },
}

/// A stream from the server, watched until authentication ends.
pub(crate) struct AuthGuard<S> {
    inner: S,
    state: State,
    /// The error a cleartext request ends the connection with.
    refusal: String,
}

impl<S> AuthGuard<S> {
    /// Watches `inner`, skipping its first `skip` bytes; `refusal` None: off.
    pub(crate) fn new(inner: S, skip: usize, refusal: Option<String>) -> AuthGuard<S> {
        let state = match (&refusal, skip) {
            (None, _) => State::Off,
            (Some(_), 0) => State::Header { buf: [0; 5], have: 0 },
            (Some(_), n) => State::Skip(n),
        };
        AuthGuard {
            inner,
            state,
            refusal: refusal.unwrap_or_default(),
        }
    }

    /// Reads `bytes` from the server: false at a request for the password in clear.
    fn inspect(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return true,
                State::Refused => return false,
                State::Skip(n) => {
                    let k = (*n).min(bytes.len());
                    bytes = &bytes[k..];
                    *n -= k;
                    if *n == 0 {
                        self.state = State::Header { buf: [0; 5], have: 0 };
                    }
                }
                State::Header { buf, have } => {
                    let k = (5 - *have).min(bytes.len());
                    buf[*have..*have + k].copy_from_slice(&bytes[..k]);
                    *have += k;
                    bytes = &bytes[k..];
                    if *have == 5 {
                        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]).max(4) as usize;
                        self.state = State::Body {
                            tag: buf[0],
                            left: len - 4,
                            code: [0; 4],
                            have: 0,
                        };
                        if len == 4 {
                            self.state = State::Header { buf: [0; 5], have: 0 };
                        }
                    }
                }
                State::Body { tag, left, code, have } => {
                    let k = (*left).min(bytes.len());
                    if *tag == b'R' && *have < 4 {
                        let c = k.min(4 - *have);
                        code[*have..*have + c].copy_from_slice(&bytes[..c]);
                        *have += c;
                        if *have == 4 {
                            match i32::from_be_bytes(*code) {
                                // AuthenticationCleartextPassword
                                3 => {
                                    self.state = State::Refused;
                                    return false;
                                }
                                // AuthenticationOk: what follows is the session's.
                                0 => {
                                    self.state = State::Off;
                                    return true;
                                }
                                _ => {}
                            }
                        }
                    }
                    *left -= k;
                    bytes = &bytes[k..];
                    if *left == 0 {
                        self.state = State::Header { buf: [0; 5], have: 0 };
                    }
                }
            }
        }
        true
    }

    /// Stands down (the stream under a TLS session, whose decrypted side is watched).
    fn disarm(&mut self) {
        self.state = State::Off;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if matches!(this.state, State::Off) || this.inspect(&buf.filled()[before..]) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        this.refusal.clone(),
                    )))
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// TLS over a guarded socket: the socket's guard stands down for the handshake, and a
/// new one watches the decrypted stream.
pub(crate) struct GuardedTls<T> {
    pub tls: T,
    pub refusal: Option<String>,
}

impl<S, T> TlsConnect<AuthGuard<S>> for GuardedTls<T>
where
    T: TlsConnect<AuthGuard<S>>,
    T::Future: Send + 'static,
    T::Stream: Send,
{
    type Stream = AuthGuard<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<AuthGuard<T::Stream>, T::Error>> + Send>>;

    fn connect(self, mut stream: AuthGuard<S>) -> Self::Future {
        stream.disarm();
        let refusal = self.refusal;
        let handshake = self.tls.connect(stream);
        Box::pin(async move { handshake.await.map(|s| AuthGuard::new(s, 0, refusal)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend(((body.len() + 4) as i32).to_be_bytes());
        m.extend(body);
        m
    }

    fn guard(skip: usize) -> AuthGuard<()> {
        AuthGuard::new((), skip, Some("refused".into()))
    }

    /// Fed in every split into two reads.
    fn passes(skip: usize, bytes: &[u8]) -> bool {
        (0..=bytes.len()).all(|cut| {
            let mut g = guard(skip);
            g.inspect(&bytes[..cut]) && g.inspect(&bytes[cut..])
        }) && {
            // ... and a byte at a time.
            let mut g = guard(skip);
            bytes.chunks(1).all(|b| g.inspect(b))
        }
    }

    #[test]
    fn a_cleartext_request_is_caught_in_any_split_and_nothing_else_is() {
        let notice = message(b'N', b"SFATAL\0");
        let md5 = message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
        let sasl = message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        let ok = message(b'R', &[0, 0, 0, 0]);
        let cleartext = message(b'R', &[0, 0, 0, 3]);
        let after = message(b'S', b"server_version\x0015.4\0");
        // The SSL request's answer comes first when TLS was asked for.
        let mut allowed = b"N".to_vec();
        for m in [&notice, &md5, &sasl, &ok] {
            allowed.extend(m);
        }
        assert!(passes(1, &allowed));
        // After AuthenticationOk nothing is read: a 3 in a later message is data.
        let mut later = ok.clone();
        later.extend(&cleartext);
        assert!(passes(0, &later));
        let mut refused = notice.clone();
        refused.extend(&cleartext);
        refused.extend(&after);
        assert!(!passes(0, &refused));
        assert!((0..=refused.len()).all(|cut| {
            let mut g = guard(0);
            !(g.inspect(&refused[..cut]) && g.inspect(&refused[cut..]))
        }));
        // Once refused, always refused.
        let mut g = guard(0);
        assert!(!g.inspect(&refused));
        assert!(!g.inspect(&after));
        // Off: nothing is looked at.
        let mut off = AuthGuard::new((), 0, None);
        assert!(off.inspect(&cleartext));
    }
}
