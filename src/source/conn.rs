//! A PostgreSQL wire connection, in replication mode (the stream) or an ordinary session
//! (a table copy): startup, TLS, authentication (trust, cleartext, MD5, SCRAM-SHA-256),
//! simple queries, CopyBoth framing and COPY TO STDOUT. Frontend messages and the
//! SCRAM/MD5 arithmetic come from `postgres-protocol`; the few backend messages these
//! sessions see are parsed here, so the stream's CopyData bodies stay zero-copy slices
//! of the read buffer and a copy's are lent, a message (a row) at a time, from it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::wire::{STREAM_READ, Wire};
use super::{PgError, SourceError, auth_fix};
use crate::config::{ConnParams, SslMode};

enum Io {
    Plain(Wire),
    Tls(Box<tokio_rustls::client::TlsStream<Wire>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A TCP connection to PostgreSQL as every connection of walshore's makes it: no
/// Nagle delay, and keepalives, so that a link that goes silent under a session waiting
/// on the server without a timeout of its own (a copy) is noticed.
pub(crate) async fn tcp_connect(target: &str) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true).ok();
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive).ok();
    Ok(tcp)
}

/// One backend message: its tag and body.
pub(crate) struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

pub(crate) struct Conn {
    io: Io,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// `server_version_num`, e.g. 150004.
    pub server_version: u32,
    pub backend_pid: i32,
}

/// Bytes a COPY reads at once (PostgreSQL sends up to 64 KiB per socket write).
const COPY_READ: usize = 256 << 10;

/// GUCs set in the startup packet so that pgoutput's text output has one known form.
const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
];

impl Conn {
    /// Connects with `replication=database`.
    /// `connect_timeout` bounds the whole connection set-up (TCP, TLS, start-up and
    /// authentication), as in libpq: a link that accepts and then says nothing fails.
    pub(crate) async fn connect(params: &ConnParams) -> Result<Conn, SourceError> {
        Self::connect_as(params, true).await
    }

    /// An ordinary session (no walsender, not counted in `max_wal_senders`), with the
    /// same settings: what a table copy reads over (see [`Conn::copy_out`]).
    pub(crate) async fn connect_session(params: &ConnParams) -> Result<Conn, SourceError> {
        Self::connect_as(params, false).await
    }

    async fn connect_as(params: &ConnParams, replication: bool) -> Result<Conn, SourceError> {
        let target = format!("{}:{}", params.host, params.port);
        tokio::time::timeout(params.connect_timeout, Self::establish(params, &target, replication))
            .await
            .map_err(|_| SourceError::Connect {
                target: target.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within connect_timeout ({:?})", params.connect_timeout),
                ),
            })?
    }

    async fn establish(params: &ConnParams, target: &str, replication: bool) -> Result<Conn, SourceError> {
        let target = target.to_owned();
        let tcp = tcp_connect(&target).await.map_err(|source| SourceError::Connect {
            target: target.clone(),
            source,
        })?;
        let io = Self::negotiate_tls(tcp, params, &target).await?;
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(1 << 16),
            wbuf: BytesMut::new(),
            server_version: 0,
            backend_pid: 0,
        };
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("database", &params.dbname),
            ("application_name", &params.application_name),
        ];
        if replication {
            startup.push(("replication", "database"));
        }
        startup.extend(SESSION_SETTINGS);
        frontend::startup_message(startup, &mut conn.wbuf).map_err(SourceError::Io)?;
        conn.flush().await?;
        conn.authenticate(params).await?;
        Ok(conn)
    }

    async fn negotiate_tls(tcp: TcpStream, params: &ConnParams, target: &str) -> Result<Io, SourceError> {
        let mut wire = Wire::new(tcp);
        let Some(config) = super::tls::client_config(params).map_err(|message| SourceError::Tls {
            target: target.into(),
            message,
        })?
        else {
            return Ok(Io::Plain(wire));
        };
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        let tcp = wire.tcp_mut();
        tcp.write_all(&buf).await.map_err(SourceError::Io)?;
        let answer = tcp.read_u8().await.map_err(SourceError::Io)?;
        if answer != b'S' {
            if params.sslmode == SslMode::Prefer {
                return Ok(Io::Plain(wire));
            }
            return Err(SourceError::Tls {
                target: target.into(),
                message: "the server does not accept SSL connections; enable ssl on the server or set sslmode=prefer/disable in source.url".into(),
            });
        }
        let name = super::tls::server_name(&params.host).map_err(|message| SourceError::Tls {
            target: target.into(),
            message,
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, wire)
            .await
            .map_err(|e| SourceError::Tls {
                target: target.into(),
                message: e.to_string(),
            })?;
        Ok(Io::Tls(Box::new(tls)))
    }

    async fn authenticate(&mut self, params: &ConnParams) -> Result<(), SourceError> {
        // Signed now, for this connection alone: an IAM token is good for one login.
        let secret = super::iam::password(params).await.map_err(SourceError::IamToken)?;
        let password = || {
            secret.as_deref().ok_or_else(|| SourceError::Auth {
                user: params.user.clone(),
                fix: auth_fix(params),
                message: "the server asks for a password and none was given; put it in source.url or PGPASSWORD".into(),
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'R' => {
                    let mut body = f.body.clone();
                    if body.len() < 4 {
                        return Err(SourceError::Protocol("short authentication message".into()));
                    }
                    match body.get_i32() {
                        0 => {}
                        3 => {
                            super::tls::cleartext_allowed(params).map_err(SourceError::Setup)?;
                            frontend::password_message(password()?.as_bytes(), &mut self.wbuf)
                                .map_err(SourceError::Io)?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(SourceError::Protocol("short MD5 salt".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                params.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(SourceError::Io)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechanisms: Vec<&[u8]> = body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                                return Err(SourceError::Auth {
                                    user: params.user.clone(),
                                    fix: auth_fix(params),
                                    message: "the server offers no SASL mechanism walshore supports (SCRAM-SHA-256)"
                                        .into(),
                                });
                            }
                            let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.wbuf)
                                .map_err(SourceError::Io)?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| SourceError::Protocol("SASL continue before SASL start".into()))?;
                            s.update(&body).map_err(|e| SourceError::Auth {
                                user: params.user.clone(),
                                fix: auth_fix(params),
                                message: e.to_string(),
                            })?;
                            frontend::sasl_response(s.message(), &mut self.wbuf).map_err(SourceError::Io)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| SourceError::Protocol("SASL final before SASL start".into()))?;
                            s.finish(&body).map_err(|e| SourceError::Auth {
                                user: params.user.clone(),
                                fix: auth_fix(params),
                                message: format!("server signature did not verify: {e}"),
                            })?;
                        }
                        other => {
                            return Err(SourceError::Auth {
                                user: params.user.clone(),
                                fix: auth_fix(params),
                                message: format!(
                                    "authentication method {other} is not supported; use trust, password, md5 or scram-sha-256 in pg_hba.conf"
                                ),
                            });
                        }
                    }
                }
                b'S' => {
                    let mut parts = f.body.split(|&b| b == 0);
                    if let (Some(b"server_version"), Some(v)) = (parts.next(), parts.next()) {
                        self.server_version = parse_server_version(&String::from_utf8_lossy(v));
                    }
                }
                b'K' => {
                    let mut body = f.body.clone();
                    if body.len() >= 4 {
                        self.backend_pid = body.get_i32();
                    }
                }
                b'E' => {
                    let e = PgError::parse(&f.body);
                    return Err(if e.code == "28P01" || e.code == "28000" {
                        SourceError::Auth {
                            user: params.user.clone(),
                            fix: auth_fix(params),
                            message: e.message,
                        }
                    } else {
                        SourceError::Server(e)
                    });
                }
                b'N' => {}
                b'Z' => return Ok(()),
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        other as char
                    )));
                }
            }
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), SourceError> {
        self.io.write_all(&self.wbuf).await.map_err(SourceError::Io)?;
        self.wbuf.clear();
        self.io.flush().await.map_err(SourceError::Io)
    }

    /// Reads the next whole backend message. Cancel-safe: a partly read message stays
    /// in the buffer for the next call.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, SourceError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            if self.wire().in_gulps() && self.rbuf.capacity() - self.rbuf.len() < STREAM_READ / 2 {
                self.rbuf.reserve(STREAM_READ);
            }
            let n = self.io.read_buf(&mut self.rbuf).await.map_err(SourceError::Io)?;
            if n == 0 {
                return Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// From now on the stream is read in gulps by a thread of its own (the replication
    /// stream, once started; see [`super::wire`]).
    pub(crate) fn read_in_gulps(&mut self) -> Result<(), SourceError> {
        self.wire_mut().read_in_gulps().map_err(SourceError::Io)
    }

    fn wire(&self) -> &Wire {
        match &self.io {
            Io::Plain(w) => w,
            Io::Tls(s) => s.get_ref().0,
        }
    }

    fn wire_mut(&mut self) -> &mut Wire {
        match &mut self.io {
            Io::Plain(w) => w,
            Io::Tls(s) => s.get_mut().0,
        }
    }

    /// Reads of the stream so far and the bytes they brought.
    pub(crate) fn stream_reads(&self) -> (u64, u64) {
        self.wire().stream_reads()
    }

    /// A message already in the buffer, without waiting for the network.
    pub(crate) fn try_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]) as usize;
        if len < 4 {
            return Err(SourceError::Protocol(format!("invalid message length {len}")));
        }
        if self.rbuf.len() < len + 1 {
            self.rbuf.reserve(len + 1 - self.rbuf.len());
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(len + 1);
        let tag = frame[0];
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }

    /// Runs a simple query and returns its rows as text. Server errors come back as
    /// [`SourceError::Server`] with their SQLSTATE.
    pub(crate) async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(SourceError::Io)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'D' => rows.push(parse_data_row(&f.body)?),
                b'E' => error = Some(PgError::parse(&f.body)),
                b'Z' => break,
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} in query response",
                        other as char
                    )));
                }
            }
        }
        match error {
            Some(e) => Err(SourceError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Sends a command that switches to CopyBoth (START_REPLICATION).
    pub(crate) async fn start_copy_both(&mut self, sql: &str) -> Result<(), SourceError> {
        self.start_copy(sql, b'W', "START_REPLICATION").await
    }

    /// Starts `COPY … TO STDOUT`; the data follows through [`Conn::read_copy_data`].
    pub(crate) async fn copy_out(&mut self, sql: &str) -> Result<(), SourceError> {
        self.start_copy(sql, b'H', "COPY").await
    }

    /// Sends `sql` and waits for `tag`, the response that starts its copy mode. A server
    /// error is returned as it comes: the session is not used again after one.
    async fn start_copy(&mut self, sql: &str, tag: u8, what: &str) -> Result<(), SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(SourceError::Io)?;
        self.flush().await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                t if t == tag => return Ok(()),
                b'N' | b'S' => {}
                b'E' => return Err(SourceError::Server(PgError::parse(&f.body))),
                other => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected message {:?} after {what}",
                        other as char
                    )));
                }
            }
        }
    }

    /// Hands `each` the data of every CopyData message received so far, in order,
    /// waiting for one if none is. Returns false once the COPY has ended: CopyDone, then
    /// ReadyForQuery, came (the session is ready for the next query). A server error, as
    /// in [`Conn::start_copy`], ends the session. PostgreSQL sends a message per row, and
    /// a row is often smaller than the bookkeeping of handing it over on its own: `each`
    /// borrows it from the read buffer.
    pub(crate) async fn read_copy_data(&mut self, mut each: impl FnMut(&[u8])) -> Result<bool, SourceError> {
        let (mut any, mut copy_done) = (false, false);
        loop {
            let mut at = 0;
            while self.rbuf.len() - at >= 5 {
                let b = &self.rbuf[at..];
                let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
                if len < 4 {
                    return Err(SourceError::Protocol(format!("invalid message length {len}")));
                }
                if b.len() < len + 1 {
                    break;
                }
                let (tag, body) = (b[0], &b[5..len + 1]);
                at += len + 1;
                match tag {
                    b'd' if !copy_done => {
                        each(body);
                        any = true;
                    }
                    b'c' => copy_done = true,
                    // CommandComplete, notices.
                    b'C' | b'N' | b'S' => {}
                    b'Z' if copy_done => {
                        self.rbuf.advance(at);
                        return Ok(false);
                    }
                    b'E' => return Err(SourceError::Server(PgError::parse(body))),
                    other => {
                        return Err(SourceError::Protocol(format!(
                            "unexpected message {:?} in COPY data",
                            other as char
                        )));
                    }
                }
            }
            self.rbuf.advance(at);
            if any && !copy_done {
                return Ok(true);
            }
            // Room for a large read, or for the whole of a message larger than that.
            let wanted = match self.rbuf.get(1..5) {
                Some(l) => (u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize + 1).max(COPY_READ),
                None => COPY_READ,
            };
            self.rbuf.reserve(wanted.saturating_sub(self.rbuf.len()));
            let n = self.io.read_buf(&mut self.rbuf).await.map_err(SourceError::Io)?;
            if n == 0 {
                return Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    pub(crate) async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), SourceError> {
        let len = (data.len() + 4) as u32;
        self.wbuf.extend_from_slice(b"d");
        self.wbuf.extend_from_slice(&len.to_be_bytes());
        self.wbuf.extend_from_slice(data);
        self.flush().await
    }

    pub(crate) async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

fn parse_server_version(v: &str) -> u32 {
    // "15.4 (Debian 15.4-1)" -> 150004; "9.6.24" -> 90624.
    let nums: Vec<u32> = v
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [major, minor, ..] if *major >= 10 => major * 10_000 + minor,
        [major] if *major >= 10 => major * 10_000,
        [major, minor, patch, ..] => major * 10_000 + minor * 100 + patch,
        _ => 0,
    }
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, SourceError> {
    let short = || SourceError::Protocol("truncated DataRow".into());
    let mut b = body;
    if b.len() < 2 {
        return Err(short());
    }
    let n = b.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(short());
        }
        let len = b.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return Err(short());
            }
            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_versions_parse() {
        assert_eq!(super::parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"), 150004);
        assert_eq!(super::parse_server_version("17beta1"), 170000);
        assert_eq!(super::parse_server_version("9.6.24"), 90624);
    }

    /// A stream connection over loopback reading in gulps, and its server end as a
    /// blocking socket for a writer thread of its own (a walsender: one `send` per
    /// message, no Nagle delay).
    async fn stream_pair() -> (super::Conn, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let (client, server) = tokio::join!(super::tcp_connect(&target), listener.accept());
        let mut conn = super::Conn {
            io: super::Io::Plain(super::Wire::new(client.unwrap())),
            rbuf: bytes::BytesMut::with_capacity(1 << 16),
            wbuf: bytes::BytesMut::new(),
            server_version: 150000,
            backend_pid: 0,
        };
        conn.read_in_gulps().unwrap();
        let server = server.unwrap().0.into_std().unwrap();
        server.set_nonblocking(false).unwrap();
        server.set_nodelay(true).unwrap();
        (conn, server)
    }

    /// A CopyData message of `size` bytes, as a walsender frames it.
    fn message(size: usize) -> Vec<u8> {
        let mut out = vec![b'd'];
        out.extend_from_slice(&((size + 4) as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(b'x', size));
        out
    }

    /// Messages that trickle in (one every millisecond) are read about every 20 ms, a
    /// few dozen at a time, not one by one; each within a read's bounded wait.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_trickle_is_read_in_bounded_gulps() {
        use std::io::Write;
        let (mut conn, mut server) = stream_pair().await;
        server.write_all(&message(100)).unwrap();
        conn.read_frame().await.unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..300 {
                server.write_all(&message(100)).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            server
        });
        let mut longest = std::time::Duration::ZERO;
        for _ in 0..300 {
            let t = std::time::Instant::now();
            let frame = conn.read_frame().await.unwrap();
            assert_eq!((frame.tag, frame.body.len()), (b'd', 100));
            longest = longest.max(t.elapsed());
        }
        let _server = writer.join().unwrap();
        let (reads, bytes) = conn.stream_reads();
        assert_eq!(bytes, 301 * 105);
        // Read as they come, 300 messages a millisecond apart take ~300 reads.
        assert!(reads <= 100, "300 trickling messages took {reads} reads");
        assert!(
            longest < std::time::Duration::from_secs(5),
            "a message waited {longest:?} for its read"
        );
    }

    /// Dropping a connection whose stream the reader thread reads closes it at once
    /// (the thread holds a descriptor of its own), and a server that closes its end
    /// ends the stream after its last message.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_stream_ends_with_either_side() {
        use std::io::{Read, Write};
        let (conn, mut server) = stream_pair().await;
        drop(conn);
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let t = std::time::Instant::now();
        let read = server.read(&mut [0u8; 1]);
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the server's end after the drop: {read:?}"
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "closed after {:?}",
            t.elapsed()
        );

        let (mut conn, mut server) = stream_pair().await;
        server.write_all(&message(100)).unwrap();
        drop(server);
        let within = std::time::Duration::from_secs(5);
        let frame = tokio::time::timeout(within, conn.read_frame()).await.unwrap().unwrap();
        assert_eq!(frame.body.len(), 100);
        let end = tokio::time::timeout(within, conn.read_frame()).await.unwrap();
        assert!(
            matches!(&end, Err(super::SourceError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{:?}",
            end.err()
        );
    }

    /// A burst sent a message at a time is read in large gulps, its last, short part
    /// included.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_burst_is_read_in_large_gulps_to_its_end() {
        use std::io::Write;
        let (mut conn, mut server) = stream_pair().await;
        // One message first: the stream is flowing, the next reads gather.
        server.write_all(&message(100)).unwrap();
        conn.read_frame().await.unwrap();
        let burst = 40_000;
        let writer = std::thread::spawn(move || {
            let m = message(200);
            for _ in 0..burst {
                server.write_all(&m).unwrap();
            }
            server
        });
        for _ in 0..burst {
            conn.read_frame().await.unwrap();
        }
        let _server = writer.join().unwrap();
        let (reads, bytes) = conn.stream_reads();
        assert_eq!(bytes, 105 + burst as u64 * 205);
        // 8 MB in 40,000 sends: read as they come, thousands of reads.
        assert!(reads <= 200, "an 8 MB burst took {reads} reads");
    }
}
