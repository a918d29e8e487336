//! A TCP fault proxy for the link between walshore and PostgreSQL or the S3-protocol
//! server: it forwards, delays, stalls, cuts, blackholes, or (for HTTP) answers requests
//! with an error status itself. It runs on its own thread and runtime, so tests that
//! block on a child process do not stall it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pass bytes through.
    Forward,
    /// Pass bytes through, each read held back this long (slow responses).
    Delay(Duration),
    /// Hold bytes (both ways) until the mode changes; nothing is lost.
    Stall,
    /// Swallow bytes (both ways) and never answer; new connections are accepted and
    /// swallowed too. A connection that lost bytes stays dead when the mode changes
    /// back (as after a real partition, the peer must notice by a timeout).
    Blackhole,
    /// HTTP only: answer each request on a new connection with this status, without
    /// forwarding it. Connections open when the mode is set are cut.
    HttpStatus(u16),
    /// HTTP only, AWS JSON protocol (Glue): answer each request on a new connection
    /// with `400` and this error type (`ThrottlingException`, say), without forwarding
    /// it. Connections open when the mode is set are cut.
    AwsJsonError(&'static str),
}

/// What an HTTP [`Rule`] does to a request it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer with this S3 error status; the server never sees the request.
    Answer(u16),
    /// Forward the request, then answer with this S3 error status instead of the
    /// server's reply: the request took effect and its reply was lost.
    LoseReply(u16),
}

/// A fault for some HTTP requests only: those whose method is `method`, whose path
/// contains `path`, and (when given) that carry the header `header`. The first `skip`
/// matches pass; the next `times` get `action`; the rest pass again. With `after`, the
/// rule counts matches only once the rule of that index has acted.
#[derive(Clone, Debug)]
pub struct Rule {
    pub method: &'static str,
    pub path: String,
    pub header: Option<&'static str>,
    pub skip: u64,
    pub times: u64,
    pub action: Action,
    pub after: Option<usize>,
}

impl Rule {
    /// A rule acting on the first match of `method` and `path`, once; the other fields
    /// are set with struct update syntax.
    pub fn new(method: &'static str, path: &str, action: Action) -> Rule {
        Rule {
            method,
            path: path.to_owned(),
            header: None,
            skip: 0,
            times: 1,
            action,
            after: None,
        }
    }
}

struct Armed {
    rule: Rule,
    seen: u64,
    acted: u64,
}

struct Shared {
    mode: Mutex<Mode>,
    /// With rules, every connection is handled a request at a time.
    rules: Mutex<Vec<Armed>>,
    /// Requests a rule acted on.
    pub ruled: AtomicU64,
    /// Bumped by every mode change; stalled pumps wait on it.
    changed: watch::Sender<u64>,
    /// Bumped by `cut`: every open connection closes.
    cuts: watch::Sender<u64>,
    pub connections: AtomicU64,
    pub errors_served: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub fn start(upstream: u16) -> Proxy {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Forward),
            rules: Mutex::new(Vec::new()),
            ruled: AtomicU64::new(0),
            changed: watch::channel(0).0,
            cuts: watch::channel(0).0,
            connections: AtomicU64::new(0),
            errors_served: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        s.connections.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(connection(client, upstream, s.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_background();
        });
        Proxy {
            port,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Entering or leaving a mode that answers HTTP itself cuts the open connections,
    /// so that a kept-alive connection does not stay in the mode it was accepted in.
    pub fn set(&self, mode: Mode) {
        let answering = |m: Mode| matches!(m, Mode::HttpStatus(_) | Mode::AwsJsonError(_));
        let old = std::mem::replace(&mut *self.shared.mode.lock().unwrap(), mode);
        self.shared.changed.send_modify(|g| *g += 1);
        if answering(mode) || answering(old) {
            self.cut();
        }
    }

    /// Handles HTTP a request at a time from now on (every connection is cut: a new one
    /// is read request by request), applying `rules`; an empty list goes back to
    /// forwarding bytes.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        *self.shared.rules.lock().unwrap() = rules
            .into_iter()
            .map(|rule| Armed {
                rule,
                seen: 0,
                acted: 0,
            })
            .collect();
        self.cut();
    }

    /// Requests a rule has acted on so far.
    pub fn ruled(&self) -> u64 {
        self.shared.ruled.load(Ordering::SeqCst)
    }

    /// Closes every open connection (new ones are handled by the current mode).
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|g| *g += 1);
    }

    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests answered with an error by [`Mode::HttpStatus`] or [`Mode::AwsJsonError`].
    pub fn errors_served(&self) -> u64 {
        self.shared.errors_served.load(Ordering::SeqCst)
    }

    /// Bytes forwarded (both ways).
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, s: Arc<Shared>) {
    let mode = *s.mode.lock().unwrap();
    let mut cut = s.cuts.subscribe();
    if !s.rules.lock().unwrap().is_empty() {
        tokio::select! {
            _ = by_request(&mut client, upstream, &s) => {}
            _ = cut.changed() => {}
        }
        return;
    }
    match mode {
        Mode::HttpStatus(_) | Mode::AwsJsonError(_) => {
            let reply = match mode {
                Mode::HttpStatus(status) => s3_error(status),
                Mode::AwsJsonError(kind) => aws_json_error(kind),
                _ => unreachable!(),
            };
            tokio::select! {
                _ = answer_http(&mut client, &reply, &s) => {}
                _ = cut.changed() => {}
            }
            return;
        }
        Mode::Blackhole => {
            let mut buf = vec![0u8; 64 * 1024];
            tokio::select! {
                _ = async { while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
                _ = cut.changed() => {}
            }
            return;
        }
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::select! {
        _ = pump(cr, sw, s.clone(), dead.clone()) => {}
        _ = pump(sr, cw, s.clone(), dead) => {}
        _ = cut.changed() => {}
    }
}

/// One direction; returns when either side closes. The mode is looked at for every
/// read, so a change applies to open connections at once.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: Arc<Shared>,
    dead: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut changed = s.changed.subscribe();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let mode = *s.mode.lock().unwrap();
            match mode {
                Mode::Forward | Mode::HttpStatus(_) | Mode::AwsJsonError(_) => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Stall => {
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Blackhole => break,
            }
        }
        if *s.mode.lock().unwrap() == Mode::Blackhole {
            dead.store(true, Ordering::SeqCst);
        }
        if dead.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        s.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One HTTP request (head and Content-Length body) read from `client`, or None at its
/// end. Requests with a chunked body are not read (the S3 client sends lengths).
async fn read_request(client: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("transfer-encoding: chunked"),
        "the test proxy's rules read Content-Length bodies only"
    );
    let body_len: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + body_len].to_vec();
    buf.drain(..head_end + body_len);
    Some((head, body))
}

/// What the rules say of a request: the first rule it matches counts it.
fn ruling(s: &Shared, head: &str) -> Option<Action> {
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
    let lower = head.to_ascii_lowercase();
    let mut rules = s.rules.lock().unwrap();
    let acted: Vec<u64> = rules.iter().map(|a| a.acted).collect();
    let armed = rules.iter_mut().find(|a| {
        a.rule.method == method
            && path.contains(a.rule.path.as_str())
            && a.rule
                .header
                .is_none_or(|h| lower.contains(&format!("\r\n{}:", h.to_ascii_lowercase())))
            && a.rule.after.is_none_or(|i| acted[i] > 0)
    })?;
    armed.seen += 1;
    let acts = armed.seen > armed.rule.skip && armed.seen <= armed.rule.skip + armed.rule.times;
    if acts {
        armed.acted += 1;
    }
    acts.then_some(armed.rule.action)
}

/// Serves a client a request at a time: each is forwarded on a connection of its own
/// (asked to close, so that the reply ends with it) unless a rule answers it; the
/// client's connection is closed after each reply.
async fn by_request(client: &mut TcpStream, upstream: SocketAddr, s: &Shared) {
    let mut buf = Vec::new();
    let Some((head, body)) = read_request(client, &mut buf).await else {
        return;
    };
    let action = ruling(s, &head);
    if let Some(Action::Answer(status)) = action {
        s.ruled.fetch_add(1, Ordering::SeqCst);
        let _ = client.write_all(s3_error(status).as_bytes()).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let head: String = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    if server
        .write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .await
        .is_err()
        || server.write_all(&body).await.is_err()
    {
        return;
    }
    let mut reply = Vec::new();
    if server.read_to_end(&mut reply).await.is_err() {
        return;
    }
    s.bytes
        .fetch_add((head.len() + body.len() + reply.len()) as u64, Ordering::Relaxed);
    let reply = match action {
        Some(Action::LoseReply(status)) => {
            s.ruled.fetch_add(1, Ordering::SeqCst);
            s3_error(status).into_bytes()
        }
        _ => reply,
    };
    let _ = client.write_all(&reply).await;
}

/// S3's answer when it is unavailable or failing: `status` with an XML error body.
fn s3_error(status: u16) -> String {
    let (code, reason) = match status {
        403 => ("AccessDenied", "Forbidden"),
        500 => ("InternalError", "Internal Server Error"),
        503 => ("SlowDown", "Service Unavailable"),
        _ => ("InternalError", "Error"),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// An AWS JSON-protocol service's error answer (as Glue throttles): `400` with the
/// error type in the header and the body.
fn aws_json_error(kind: &str) -> String {
    let body = format!("{{\"__type\":\"{kind}\",\"message\":\"injected by the test proxy\"}}");
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {kind}\r\nx-amzn-RequestId: test-proxy\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads HTTP requests (head and Content-Length body) and answers each with `reply`.
async fn answer_http(client: &mut TcpStream, reply: &str, s: &Shared) {
    let mut buf = Vec::new();
    while read_request(client, &mut buf).await.is_some() {
        s.errors_served.fetch_add(1, Ordering::SeqCst);
        if client.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
