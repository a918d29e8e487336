//! The TCP connection under a PostgreSQL session (under its TLS too), and, once the
//! replication stream runs, the thread that reads it in gulps.
//!
//! A walsender sends every message on its own (one `send` per change). A reader woken
//! for each of them keeps the receive window open, so each message goes out as a
//! segment of its own, and on one host the walsender runs the reader's wake-up and TCP
//! receive path too: serving such a reader (pg_recvlogical) it spends twice the CPU it
//! spends serving one that lets data gather, for the same WAL. A reader that waits for
//! the window to fill holds the walsender to it, and what it sends meanwhile shares
//! segments. So the stream is read in gulps (`SO_RCVLOWAT`, see [`GULP`]).
//!
//! And it is read by a thread of its own, the moment a gulp is there, whatever the
//! decoder is doing. A read that comes late (after the decoding of the gulp before)
//! finds the window open and the buffer's memory filling with small segments; the
//! kernel then wakes the read early, on memory pressure, the window never closes, and
//! the walsender is never held back again (README "Benchmark": measured with `ss -tmi`,
//! and with a null drain made to spend 3 ms per MiB). Read by the decoder's task,
//! drains fell into that mode often enough that full-size medians missed 1.7×
//! pg_recvlogical; read by this thread, they reached it (README "Benchmark").

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How the replication stream is read while data flows: the socket wakes the reader only
/// once this much has arrived (`SO_RCVLOWAT`), once the receive window is used up (the
/// kernel then makes the socket readable whatever the mark), or [`GULP_WAIT`] after the
/// read began waiting, whichever comes first. Measured (README "Benchmark"): 64 KiB
/// gulps helped our own minimal reader but rarely walshore; 1 MiB gulps, which reach
/// the window, brought the walsender serving walshore to the minimal reader's cost.
/// Setting the mark also lets the kernel grow the receive buffer to hold it
/// (`tcp_set_rcvlowat`): a few MiB of kernel memory for this connection, and a window of
/// at least 1 MiB (20 MB/s at 50 ms RTT, more as the kernel's autotuning grows it).
const GULP: usize = 1 << 20;

/// The longest a read waits for a gulp: the stream's added latency under a trickle, far
/// below any flush interval. An idle stream waits for its next byte with no deadline.
/// Not shorter: a wait that ends before the gulp fills takes a part, and the walsender,
/// no longer held to its receive window, goes back to a segment per message; measured
/// with 64 KiB gulps, 2 and 5 ms settled there, 10 to 50 ms did not.
const GULP_WAIT: Duration = Duration::from_millis(20);

/// Space a read of the stream offers: a gulp and what arrives meanwhile.
pub(super) const STREAM_READ: usize = 2 * GULP;

/// Gulps read and not yet taken by the decoder. When they are all there, the thread
/// stops reading: the socket fills and the window holds the walsender back, as before.
const GULPS_AHEAD: usize = 4;

/// How often an idle reader looks whether its connection is still wanted (a backstop:
/// dropping the connection wakes it at once, see `Drop for Wire`).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// A TCP connection to PostgreSQL: read directly, or, once [`Wire::read_in_gulps`] is
/// called, from the gulps its reader thread hands over (written directly throughout).
pub(super) struct Wire {
    tcp: TcpStream,
    gulps: Option<Gulps>,
}

/// What the reader thread hands over, and what has been taken of it.
struct Gulps {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    /// The gulp being taken, what is left of it.
    current: Bytes,
    /// Gulps taken (each one read of the socket) and their bytes.
    reads: u64,
    bytes: u64,
}

impl Wire {
    pub(super) fn new(tcp: TcpStream) -> Wire {
        Wire { tcp, gulps: None }
    }

    /// The TCP stream, for what comes before any reading in gulps (the TLS request).
    pub(super) fn tcp_mut(&mut self) -> &mut TcpStream {
        debug_assert!(self.gulps.is_none(), "the reader thread reads the socket");
        &mut self.tcp
    }

    /// From now on the stream is read in gulps by a thread of its own (the replication
    /// stream, once started). The gulps are marked on Linux only: elsewhere the thread
    /// reads what has arrived whenever anything has.
    pub(super) fn read_in_gulps(&mut self) -> std::io::Result<()> {
        if self.gulps.is_some() {
            return Ok(());
        }
        // A descriptor of the thread's own: the socket stays open until both are closed,
        // so the thread never reads a descriptor number that was reused.
        let socket = socket2::SockRef::from(&self.tcp).try_clone()?;
        let (tx, rx) = mpsc::channel(GULPS_AHEAD);
        std::thread::Builder::new()
            .name("walshore-stream-reader".into())
            .spawn(move || read_gulps(&socket, &tx))?;
        self.gulps = Some(Gulps {
            rx,
            current: Bytes::new(),
            reads: 0,
            bytes: 0,
        });
        Ok(())
    }

    /// The reader thread reads the stream (see [`Wire::read_in_gulps`]).
    pub(super) fn in_gulps(&self) -> bool {
        self.gulps.is_some()
    }

    /// Reads of the stream by the thread so far, and the bytes they brought.
    pub(super) fn stream_reads(&self) -> (u64, u64) {
        self.gulps.as_ref().map_or((0, 0), |g| (g.reads, g.bytes))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        // The reader's channel first: whatever it reads from now on it cannot hand over,
        // and it leaves. Then it is woken at once (the socket reads as ended once what is
        // queued is taken), so that it closes its descriptor, and with it the
        // connection, now and not at its next idle look.
        if self.gulps.take().is_some() {
            socket2::SockRef::from(&self.tcp)
                .shutdown(std::net::Shutdown::Read)
                .ok();
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(g) = this.gulps.as_mut() else {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !g.current.has_remaining() {
            match ready!(g.rx.poll_recv(cx)) {
                Some(Ok(gulp)) => {
                    g.reads += 1;
                    g.bytes += gulp.len() as u64;
                    g.current = gulp;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                // The thread has seen the end of the stream: so does the reader.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = g.current.len().min(buf.remaining());
        buf.put_slice(&g.current[..n]);
        g.current.advance(n);
        if !g.current.has_remaining() {
            // Let go of the gulp's allocation: the thread reuses it for the next one.
            g.current = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The reader thread: reads the socket in gulps and hands each over, until the end of
/// the stream, an error (handed over too), or the connection is no longer wanted.
fn read_gulps(socket: &socket2::Socket, tx: &mpsc::Sender<std::io::Result<Bytes>>) {
    // Gathering: the mark is at a gulp and a read waits at most until `deadline`.
    // Otherwise the mark is at one byte and an idle stream waits with no deadline.
    let mut gathering = false;
    let mut deadline = Instant::now();
    // The mark cannot be set here: read what has arrived whenever anything has.
    let mut marks = cfg!(target_os = "linux");
    let mut buf = BytesMut::new();
    loop {
        let wait = if gathering {
            deadline.saturating_duration_since(Instant::now())
        } else {
            IDLE_LOOK
        };
        match readable(socket, wait) {
            Ok(true) => {}
            Ok(false) if gathering => {
                // Less than a gulp arrived in time: take what did, or wait for the next
                // byte. A mark that stays up could hold a last message back: that
                // connection is not used further.
                if let Err(e) = set_low_water(socket, 1) {
                    let message = format!("lowering the replication socket's SO_RCVLOWAT failed: {e}");
                    let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), message)));
                    return;
                }
                gathering = false;
                continue;
            }
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        // A new buffer only once the one being filled has less than a gulp left: a
        // trickle of small reads takes them one after another from the same allocation
        // (each gulp handed over keeps its part of it alive until it is decoded).
        if buf.capacity() < GULP {
            buf = BytesMut::with_capacity(STREAM_READ);
        }
        let n = match socket.recv(buf.spare_capacity_mut()) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        // Every gulp handed over was split off: the buffer is empty here.
        debug_assert!(buf.is_empty());
        // SAFETY: `recv` initialised the first `n` bytes of the spare capacity, and the
        // buffer held nothing before them.
        unsafe { buf.set_len(n) };
        // Data flows: let the next read wait for a gulp. Again after every large read:
        // the kernel sizes the receive buffer for the mark by what the data queued now
        // costs it in memory, which a stream of small segments raises. Not after a small
        // read woken early while gathering (a full window, memory pressure, the end).
        if marks && (!gathering || n >= GULP / 16) {
            match set_low_water(socket, GULP) {
                Ok(()) => gathering = true,
                Err(e) => {
                    tracing::warn!(error = %e, "SO_RCVLOWAT cannot be set: the replication stream is read as it arrives");
                    marks = false;
                }
            }
        }
        if tx.blocking_send(Ok(buf.split().freeze())).is_err() {
            return;
        }
        deadline = Instant::now() + GULP_WAIT;
    }
}

/// Waits up to `wait` for the socket to be readable (at its mark, or at its end).
fn readable(socket: &socket2::Socket, wait: Duration) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: a wait of 0.3 ms is a wait, not a look.
    let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    let until = Instant::now() + wait;
    let mut ms = ms;
    loop {
        // SAFETY: one valid pollfd, for a descriptor this thread owns.
        match unsafe { libc::poll(&mut fd, 1, ms) } {
            n if n > 0 => return Ok(true),
            0 => return Ok(false),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
                // A signal is not the end of the wait: wait out the rest.
                let left = until.saturating_duration_since(Instant::now());
                ms = left.as_micros().div_ceil(1000) as libc::c_int;
            }
        }
    }
}

/// Sets the socket's `SO_RCVLOWAT`: readiness only once `bytes` have arrived, or the
/// receive window is used up.
fn set_low_water(socket: &socket2::Socket, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: a valid socket descriptor owned by `socket`, and an int option of the right
    // size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
