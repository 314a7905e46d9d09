//! The control socket: a Unix stream socket, root-only by its file mode
//! (0600, in a 0700 directory), answering one request per connection.
//! Requests are one line: `status` gets the [`super::status::Status`] as
//! JSON, `reload` the [`super::status::ReloadOutcome`] once the main
//! thread has reloaded.
//!
//! [`Server`] serves this socket and the metrics endpoint on the control
//! thread (never the datapath's): one `poll` loop over both listeners and
//! every client, all non-blocking, so a slow or silent client costs a
//! slot and never delays another. Each listener holds at most
//! [`MAX_CLIENTS`]; a request must arrive whole within
//! [`REQUEST_DEADLINE`] and its reply be written within
//! [`REPLY_DEADLINE`]; the loop sees the stop flag at least every
//! [`TICK`].
//!
//! Only ever a socket is removed at the path: a stale one at start, and at
//! exit only the one this process bound (same device and inode). Anything
//! else there (say `control_socket` mistyped as the configuration file) is
//! refused, never deleted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use zeroize::Zeroizing;

use super::metrics::MetricsServer;
use super::status::ReloadOutcome;

/// Longest request line read; anything longer is refused.
const MAX_REQUEST: usize = 256;
/// Longest reply read by [`query`].
const MAX_REPLY: u64 = 16 << 20;
/// How long [`query`] waits for a reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `esptun reload` waits: the main thread's reload, including
/// up to [`RELOAD_SETTLE`] for the datapath to take the new SAs.
pub const RELOAD_CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the datapath threads get to confirm a reload's SAs.
pub const RELOAD_SETTLE: Duration = Duration::from_secs(2);
/// The whole request must arrive within this of the connection.
pub const REQUEST_DEADLINE: Duration = Duration::from_millis(500);
/// The whole reply must be written within this.
pub const REPLY_DEADLINE: Duration = Duration::from_millis(500);
/// How long a `reload` may keep its client waiting for the main thread.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// Clients each listener serves at once. Beyond it the one that has
/// waited longest without sending its whole request is closed (and
/// counted): a flood of idle connections cannot lock out the operator.
pub const MAX_CLIENTS: usize = 64;
/// The loop's longest sleep: a stop is seen within this.
pub const TICK: Duration = Duration::from_millis(100);
/// Connections taken from one listener per turn, so a flood of connects
/// cannot keep the loop from its other clients.
const ACCEPTS_PER_TURN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another esptun is already running with control socket {0} (stop it first, or give this \
         instance its own interface or control_socket)"
    )]
    InUse(PathBuf),
    #[error(
        "control socket path {path} exists and is {kind}, not a socket: refusing to delete it; \
         set control_socket to a path of its own (such as /run/esptun/NAME.sock), or remove \
         {path} yourself if it is a leftover"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the daemon at {path}: {source} (is `esptun run` running with this \
         configuration? status needs root)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// The listening socket; the file is removed on drop if it is still the
/// one bound.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file bound, recorded at bind.
    bound: (u64, u64),
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(bind_err)?;
        }
        // lstat: a link at the path is looked at, not followed.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_path_buf()));
                }
                // Left by a process that died without cleaning up.
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Ok(meta) => {
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                    kind: crate::fsperm::kind(&meta),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            bound: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == self.bound => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "removing the control socket: {e}");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "not removing the control socket path: something else replaced our socket there"
            ),
            Err(_) => {}
        }
    }
}

/// What the control thread answers with.
pub(crate) trait Backend {
    /// The `status` reply (JSON).
    fn status_json(&self) -> String;
    /// The metrics text for a scrape.
    fn metrics(&self) -> String;
    /// Hands a reload to the main thread; its outcome arrives on the
    /// receiver (dropped unanswered if the daemon stops first).
    fn reload(&self) -> Receiver<ReloadOutcome>;
    /// A client was closed because its listener was full.
    fn refused(&self);
    /// The `ike-keys` reply: the IKE SAs' keys as Wireshark's IKEv2
    /// decryption table, after a `#` comment line (secret: the socket is
    /// the owner's alone, mode 0600 in a 0700 directory).
    fn ike_keys(&self) -> Zeroizing<String> {
        Zeroizing::new("# no IKE SAs".into())
    }
    /// The `esp-keys` reply: the CHILD SAs' keys as Wireshark `esp_sa`
    /// records, after a `#` comment line and, per IKE peer, a line
    /// `# peer NAME: N record(s)` (secret, as [`Backend::ike_keys`]).
    fn esp_keys(&self) -> Zeroizing<String> {
        Zeroizing::new("# no CHILD SAs".into())
    }
}

/// Which listener a client came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Control,
    Metrics,
}

#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Reading the request.
    Reading,
    /// A reload runs on the main thread.
    Waiting(Receiver<ReloadOutcome>),
    /// Writing the reply; `sent` bytes are out. Zeroized when the client
    /// is done: a reply may carry keys (`ike-keys`, `esp-keys`).
    Writing {
        reply: Zeroizing<Vec<u8>>,
        sent: usize,
    },
}

#[derive(Debug)]
struct Client {
    kind: Kind,
    conn: Conn,
    request: Vec<u8>,
    phase: Phase,
    /// When the current phase must be over.
    deadline: Instant,
}

impl Client {
    fn max_request(&self) -> usize {
        match self.kind {
            Kind::Control => MAX_REQUEST,
            Kind::Metrics => super::metrics::MAX_REQUEST,
        }
    }

    fn complete(&self) -> bool {
        match self.kind {
            Kind::Control => self.request.contains(&b'\n'),
            Kind::Metrics => self.request.windows(4).any(|w| w == b"\r\n\r\n"),
        }
    }

    /// Moves the client on as far as it can go without blocking; false
    /// when it is done with (answered, gone or out of time).
    fn progress(&mut self, readable: bool, backend: &dyn Backend, now: Instant) -> bool {
        if let Phase::Reading = self.phase {
            if !readable {
                return now < self.deadline;
            }
            let mut chunk = [0u8; 1024];
            let mut closed = false;
            loop {
                let room = self.max_request() - self.request.len();
                if room == 0 || self.complete() {
                    break;
                }
                let want = room.min(chunk.len());
                match self.conn.read(&mut chunk[..want]) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => self.request.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("control client: {e}");
                        return false;
                    }
                }
            }
            let full = self.request.len() >= self.max_request();
            if !(self.complete() || full || closed) {
                return now < self.deadline;
            }
            if self.request.is_empty() {
                return false;
            }
            self.phase = self.answer(backend);
            self.deadline = match self.phase {
                Phase::Waiting(_) => now + RELOAD_DEADLINE,
                _ => now + REPLY_DEADLINE,
            };
        }
        if let Phase::Waiting(rx) = &self.phase {
            let reply = match rx.try_recv() {
                Ok(outcome) => {
                    serde_json::to_string(&outcome).unwrap_or_else(|e| error_json(&e.to_string()))
                }
                Err(TryRecvError::Empty) if now < self.deadline => return true,
                Err(TryRecvError::Empty) => error_json(&format!(
                    "the reload did not finish within {RELOAD_DEADLINE:?}; see the daemon's log"
                )),
                Err(TryRecvError::Disconnected) => {
                    error_json("the daemon stopped before the reload finished")
                }
            };
            self.phase = Phase::Writing {
                reply: line(reply),
                sent: 0,
            };
            self.deadline = now + REPLY_DEADLINE;
        }
        if let Phase::Writing { reply, sent } = &mut self.phase {
            // Non-blocking: a write that cannot go now waits for POLLOUT.
            while *sent < reply.len() {
                match self.conn.write(&reply[*sent..]) {
                    Ok(0) => return false,
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return now < self.deadline;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("control client: {e}");
                        return false;
                    }
                }
            }
            return false;
        }
        now < self.deadline
    }

    fn answer(&self, backend: &dyn Backend) -> Phase {
        let reply = match self.kind {
            Kind::Metrics => Zeroizing::new(super::metrics::respond(&self.request, &|| {
                backend.metrics()
            })),
            Kind::Control => {
                let text = String::from_utf8_lossy(&self.request);
                let request = text.lines().next().unwrap_or("").trim();
                match request {
                    "status" => line(backend.status_json()),
                    "reload" => return Phase::Waiting(backend.reload()),
                    "ike-keys" => secret_line(&backend.ike_keys()),
                    "esp-keys" => secret_line(&backend.esp_keys()),
                    other => line(error_json(&format!(
                        "unknown request {other:?}: try \"status\" or \"reload\""
                    ))),
                }
            }
        };
        Phase::Writing { reply, sent: 0 }
    }
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn line(mut text: String) -> Zeroizing<Vec<u8>> {
    text.push('\n');
    Zeroizing::new(text.into_bytes())
}

/// `text` and a newline in a buffer sized once, so that no reallocation
/// leaves a copy of a key behind (the caller's copy is zeroized on drop).
fn secret_line(text: &str) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() + 1));
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
    out
}

/// The control socket and the metrics endpoint, served by one loop.
pub(crate) struct Server {
    control: ControlSocket,
    metrics: Option<MetricsServer>,
    clients: Vec<Client>,
}

impl Server {
    pub fn new(control: ControlSocket, metrics: Option<MetricsServer>) -> Self {
        Server {
            control,
            metrics,
            clients: Vec::new(),
        }
    }

    /// Serves until `stop` is set (seen within [`TICK`]).
    pub fn run(&mut self, stop: &AtomicBool, backend: &dyn Backend) {
        let mut errors = 0u32;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.turn(backend, TICK) {
                // poll(2) fails only on a bug or no memory: say so now and
                // then, and do not spin.
                if errors.is_multiple_of(100) {
                    tracing::error!("control thread: poll: {e}");
                }
                errors = errors.wrapping_add(1);
                std::thread::sleep(TICK);
            }
        }
    }

    /// One round: waits (at most `wait`) for a listener or a client,
    /// then moves every client on and takes new ones.
    pub fn turn(&mut self, backend: &dyn Backend, wait: Duration) -> std::io::Result<()> {
        let now = Instant::now();
        let mut wait = wait;
        for c in &self.clients {
            wait = wait.min(c.deadline.saturating_duration_since(now));
            if let Phase::Waiting(_) = c.phase {
                // The reply comes on a channel, not a socket.
                wait = wait.min(Duration::from_millis(10));
            }
        }
        let listeners = 1 + usize::from(self.metrics.is_some());
        let revents: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(listeners + self.clients.len());
            fds.push(PollFd::new(
                self.control.listener.as_fd(),
                PollFlags::POLLIN,
            ));
            if let Some(m) = &self.metrics {
                fds.push(PollFd::new(m.listener().as_fd(), PollFlags::POLLIN));
            }
            for c in &self.clients {
                let events = match c.phase {
                    Phase::Reading => PollFlags::POLLIN,
                    Phase::Writing { .. } => PollFlags::POLLOUT,
                    Phase::Waiting(_) => PollFlags::empty(),
                };
                fds.push(PollFd::new(c.conn.fd(), events));
            }
            crate::io::poll_fds(&mut fds, wait)?;
            fds.iter()
                .map(|p| p.revents().unwrap_or(PollFlags::empty()))
                .collect()
        };
        let now = Instant::now();
        let mut i = 0;
        let mut clients = std::mem::take(&mut self.clients);
        clients.retain_mut(|c| {
            let ready = revents
                .get(listeners + i)
                .copied()
                .unwrap_or(PollFlags::empty());
            i += 1;
            let readable =
                ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR);
            c.progress(readable, backend, now)
        });
        self.clients = clients;
        if revents.first().is_some_and(|r| !r.is_empty()) {
            self.accept(Kind::Control, backend, now);
        }
        if listeners > 1 && revents.get(1).is_some_and(|r| !r.is_empty()) {
            self.accept(Kind::Metrics, backend, now);
        }
        Ok(())
    }

    fn accept(&mut self, kind: Kind, backend: &dyn Backend, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let conn = match kind {
                Kind::Control => self.control.listener.accept().map(|(s, _)| Conn::Unix(s)),
                Kind::Metrics => match &self.metrics {
                    Some(m) => m.listener().accept().map(|(s, _)| Conn::Tcp(s)),
                    None => return,
                },
            };
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::debug!("accepting a control client: {e}");
                    }
                    return;
                }
            };
            let nonblocking = match &conn {
                Conn::Unix(s) => s.set_nonblocking(true),
                Conn::Tcp(s) => s.set_nonblocking(true),
            };
            if let Err(e) = nonblocking {
                tracing::debug!("control client: {e}");
                continue;
            }
            if self.clients.iter().filter(|c| c.kind == kind).count() >= MAX_CLIENTS {
                // Full: the client that has sent the least for longest
                // goes; if every slot is mid-answer, the newcomer does.
                let oldest = self
                    .clients
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.kind == kind && matches!(c.phase, Phase::Reading))
                    .min_by_key(|(_, c)| c.deadline)
                    .map(|(i, _)| i);
                backend.refused();
                match oldest {
                    Some(i) => drop(self.clients.swap_remove(i)),
                    None => continue,
                }
            }
            self.clients.push(Client {
                kind,
                conn,
                request: Vec::new(),
                phase: Phase::Reading,
                deadline: now + REQUEST_DEADLINE,
            });
        }
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// Sends `request` to the daemon at `path` and returns its reply.
pub fn query(path: &Path, request: &str) -> Result<String, ControlError> {
    query_within(path, request, CLIENT_TIMEOUT)
}

/// [`query`], waiting up to `timeout` for the reply.
pub fn query_within(path: &Path, request: &str, timeout: Duration) -> Result<String, ControlError> {
    let connect_err = |source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(connect_err)?;
    let reply = read_reply(&mut stream.take(MAX_REPLY)).map_err(connect_err)?;
    if reply.trim().is_empty() {
        return Err(ControlError::Protocol {
            path: path.to_path_buf(),
            message: "empty reply".into(),
        });
    }
    Ok(reply)
}

/// Reads a reply to its end. The buffer grows by copying into a fresh one
/// and zeroizing the old: a key reply (`ike-keys`, `esp-keys`) leaves no
/// copy behind in freed memory, and the caller holds the only one.
fn read_reply(from: &mut impl Read) -> std::io::Result<String> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match from.read(&mut chunk[..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.len() + n > buf.capacity() {
            let mut bigger =
                Zeroizing::new(Vec::with_capacity((buf.capacity() * 2).max(buf.len() + n)));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(std::mem::take(&mut *buf))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "the reply is not UTF-8"))
}

#[cfg(test)]
mod tests;
