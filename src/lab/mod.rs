//! A two-host test lab out of Linux network namespaces, for `esptun demo` and
//! the end-to-end tests.
//!
//! Everything lives inside namespaces this module creates: the veth pair is
//! created from inside the first namespace straight into the second, so no
//! interface, address, route or rule ever appears in the root namespace.
//! Addresses come only from the benchmarking range 198.18.0.0/15 (RFC 2544)
//! and the documentation range 2001:db8::/32 (RFC 3849), so a lab can never
//! collide with a real network. Namespaces are deleted on drop, unwinding
//! included.
//!
//! Code runs "inside" a namespace on a thread that has called `setns`: a
//! socket belongs to the namespace of the thread that created it, for its
//! whole life, whichever thread uses it later. The traffic helpers lean on
//! that: they bind the server socket inside the server namespace before the
//! client starts, so the client never races the server's `bind`.

pub mod demo;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

/// Where `ip netns add` pins namespaces; `setns` needs a descriptor of one.
const NETNS_DIR: &str = "/run/netns";
/// An `ip` invocation that takes longer than this is wedged, not slow.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly created veth may take to report carrier.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(3);
/// A tunnel under test may still be installing its state when the client
/// starts, so early refusals and unreachables are retried this long.
const CONNECT_RETRY_WINDOW: Duration = Duration::from_secs(3);
const TCP_CHUNK: usize = 64 * 1024;
/// Linux limits interface names to IFNAMSIZ - 1 bytes.
const IFNAME_MAX: usize = 15;
/// Prefix length that leaves room for the two-character suffixes `TwoHosts`
/// appends for its namespaces and veth ends.
const PREFIX_MAX: usize = IFNAME_MAX - 3;

/// Why a lab could not be built or a traffic run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{action} needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run as root")]
    NeedsRoot { action: String },
    #[error("cannot run {ip} for `ip {args}`: {source} (install iproute2)")]
    IpSpawn {
        ip: String,
        args: String,
        source: io::Error,
    },
    #[error("`ip {args}` failed ({status}): {stderr}")]
    IpFailed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`ip {args}` did not finish within {after:?}; killed it (is the system overloaded?)")]
    IpTimeout { args: String, after: Duration },
    #[error("invalid lab parameter: {0}")]
    Invalid(String),
    #[error(
        "cannot open {path} to enter network namespace {name}: {source} \
         (was the namespace deleted while in use?)"
    )]
    NetnsOpen {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "entering network namespace {name} with setns failed: {source} \
         (needs CAP_SYS_ADMIN: run as root)"
    )]
    Setns { name: String, source: io::Error },
    #[error("cannot start a thread for network namespace {name}: {source}")]
    Thread { name: String, source: io::Error },
    #[error("code running in network namespace {name} panicked: {message}")]
    Panicked { name: String, message: String },
    #[error("{what}: {source}")]
    Socket { what: String, source: io::Error },
    #[error("veth {dev} in network namespace {name} has no carrier after {after:?}: {state}")]
    LinkDown {
        name: String,
        dev: String,
        after: Duration,
        state: String,
    },
}

fn socket_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Socket { what, source }
}

/// A short name prefix unique within this process (counter) and, as far as
/// practical, across concurrent processes (pid), so parallel tests and test
/// binaries never fight over a namespace name.
///
/// At most 12 characters: `e`, the pid modulo 100000 as five digits (fixed
/// width so pid and counter cannot run together ambiguously), the counter,
/// then as much of `tag` (lowercase letters and digits only) as fits. That
/// leaves room for a three-character suffix within the 15-byte interface
/// name limit.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut prefix = format!("e{:05}{n}", std::process::id() % 100_000);
    let room = PREFIX_MAX.saturating_sub(prefix.len());
    prefix.extend(
        tag.chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            .take(room),
    );
    prefix
}

fn ip_binary() -> &'static str {
    // The test harness and sudo may run with a PATH that lacks /usr/sbin.
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `ip args...`, bounded by `IP_TIMEOUT`.
fn run_ip(args: &[&str]) -> Result<Output, LabError> {
    let joined = args.join(" ");
    let ip = ip_binary();
    let mut child = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::IpSpawn {
            ip: ip.to_string(),
            args: joined.clone(),
            source,
        })?;
    // `ip` prints a few lines at most, far below the pipe buffer, so it
    // cannot block on output while we poll for its exit.
    let step = Duration::from_millis(2);
    let started = Instant::now();
    for _ in 0..(IP_TIMEOUT.as_millis() / step.as_millis()) {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|source| LabError::IpSpawn {
                        ip: ip.to_string(),
                        args: joined,
                        source,
                    });
            }
            Ok(None) if started.elapsed() < IP_TIMEOUT => std::thread::sleep(step),
            Ok(None) => break,
            Err(source) => {
                return Err(LabError::IpSpawn {
                    ip: ip.to_string(),
                    args: joined,
                    source,
                });
            }
        }
    }
    // Only our own `ip` child is killed, never anything in the namespace.
    let _ = child.kill();
    let _ = child.wait();
    Err(LabError::IpTimeout {
        args: joined,
        after: IP_TIMEOUT,
    })
}

/// Runs `ip args...` and turns a non-zero exit into an error carrying stderr.
fn ip_checked(args: &[&str]) -> Result<Output, LabError> {
    let out = run_ip(args)?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let joined = args.join(" ");
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(LabError::NeedsRoot {
            action: format!("`ip {joined}`"),
        });
    }
    Err(LabError::IpFailed {
        args: joined,
        status: out.status.to_string(),
        stderr,
    })
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Netns, LabError> {
        // The name becomes a file under /run/netns and an argument to `ip`.
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with(['-', '.'])
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            return Err(LabError::Invalid(format!(
                "namespace name {name:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with - or ."
            )));
        }
        if !is_root() {
            return Err(LabError::NeedsRoot {
                action: format!("creating network namespace {name}"),
            });
        }
        {
            // iproute2 turns /run/netns into a shared bind mount on first
            // use; two concurrent first uses can stack two mounts and hide
            // a namespace file under the upper one. Serializing our own adds
            // removes that race within this process.
            static ADD_LOCK: Mutex<()> = Mutex::new(());
            let _guard = ADD_LOCK
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ip_checked(&["netns", "add", name]).map_err(|e| match e {
                LabError::IpFailed { stderr, .. } if stderr.contains("File exists") => {
                    LabError::Invalid(format!(
                        "network namespace {name} already exists (left over from a killed run?): \
                         remove it with `ip netns del {name}`"
                    ))
                }
                other => other,
            })?;
        }
        // From here on, drop deletes the namespace whatever fails next.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that pins the namespace; opening it yields a namespace fd.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec NAME program`: add arguments, then spawn or run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip_binary());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `ip -n NAME args...`; on failure the error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<(), LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip_checked(&full).map(|_| ())
    }

    /// Like [`Netns::ip`], returning stdout.
    pub fn ip_output(&self, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = ip_checked(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn open(&self) -> Result<File, LabError> {
        let path = self.path();
        File::open(&path).map_err(|source| LabError::NetnsOpen {
            name: self.name.clone(),
            path,
            source,
        })
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    /// Borrows work (scoped thread); a panic in `f` becomes an error.
    pub fn run<F, R>(&self, f: F) -> Result<R, LabError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            let handle = self.spawn_scoped(s, f)?;
            join_scoped(handle)
        })
    }

    /// Runs `f` on a new thread of `scope` inside this namespace, for code
    /// that must run concurrently with code in another namespace. Collect
    /// the result with [`join_scoped`].
    pub fn spawn_scoped<'scope, 'env, F, R>(
        &self,
        scope: &'scope Scope<'scope, 'env>,
        f: F,
    ) -> Result<ScopedJoinHandle<'scope, Result<R, LabError>>, LabError>
    where
        F: FnOnce() -> R + Send + 'scope,
        R: Send + 'scope,
    {
        // Opened here so a missing namespace is reported before a thread
        // exists.
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn_scoped(scope, move || {
                enter(&file, &name)?;
                drop(file);
                Ok(f())
            })
            .map_err(|source| LabError::Thread {
                name: self.name.clone(),
                source,
            })
    }

    /// Runs `f` on a new thread inside this namespace, for `'static` work
    /// such as a server that outlives the caller's frame.
    /// Collect the result with [`join`].
    pub fn spawn<F, R>(&self, f: F) -> Result<JoinHandle<Result<R, LabError>>, LabError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter(&file, &name)?;
                drop(file);
                Ok(f())
            })
            .map_err(|source| LabError::Thread {
                name: self.name.clone(),
                source,
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting unpins the namespace; it goes away once the last socket
        // or thread in it is gone. Processes inside are left alone on
        // purpose: whoever started them owns them.
        if let Err(e) = ip_checked(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}; remove it with `ip netns del {}`",
                self.name, self.name
            );
        }
    }
}

/// Moves the calling thread into the namespace `file` refers to.
fn enter(file: &File, name: &str) -> Result<(), LabError> {
    // SAFETY: the descriptor is open for the duration of the call (borrowed
    // from `file`); setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(LabError::Setns {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Waits for a thread from [`Netns::spawn_scoped`]; a panic becomes an error.
pub fn join_scoped<R>(handle: ScopedJoinHandle<'_, Result<R, LabError>>) -> Result<R, LabError> {
    let name = handle
        .thread()
        .name()
        .and_then(|n| n.strip_prefix("netns-"))
        .unwrap_or("?")
        .to_string();
    handle.join().unwrap_or_else(|payload| {
        Err(LabError::Panicked {
            name,
            message: panic_message(payload.as_ref()),
        })
    })
}

/// Waits for a thread from [`Netns::spawn`]; a panic becomes an error.
pub fn join<R>(handle: JoinHandle<Result<R, LabError>>) -> Result<R, LabError> {
    let name = handle
        .thread()
        .name()
        .and_then(|n| n.strip_prefix("netns-"))
        .unwrap_or("?")
        .to_string();
    handle.join().unwrap_or_else(|payload| {
        Err(LabError::Panicked {
            name,
            message: panic_message(payload.as_ref()),
        })
    })
}

/// Two namespaces `a` and `b` joined by a veth pair, with one IPv4 and one
/// IPv6 address on each end. Dropping it deletes both namespaces, which
/// removes the veth pair with them.
#[derive(Debug)]
pub struct TwoHosts {
    pub a: Netns,
    pub b: Netns,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
    /// The veth end in `a`.
    pub veth_a: String,
    /// The veth end in `b`.
    pub veth_b: String,
}

impl TwoHosts {
    /// Builds the pair on 198.18.`subnet_index`.0/24 (a is .1, b is .2)
    /// and 2001:db8:`subnet_index`::/64 (a is ::1, b is ::2). Concurrent
    /// labs should use distinct `subnet_index` values for readable captures,
    /// though separate namespaces would not actually collide.
    pub fn create(tag: &str, subnet_index: u8) -> Result<TwoHosts, LabError> {
        let prefix = unique_prefix(tag);
        let a = Netns::create(&format!("{prefix}a"))?;
        let b = Netns::create(&format!("{prefix}b"))?;
        let hosts = TwoHosts {
            a,
            b,
            a_v4: Ipv4Addr::new(198, 18, subnet_index, 1),
            b_v4: Ipv4Addr::new(198, 18, subnet_index, 2),
            a_v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(subnet_index), 0, 0, 0, 0, 1),
            b_v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(subnet_index), 0, 0, 0, 0, 2),
            veth_a: format!("{prefix}va"),
            veth_b: format!("{prefix}vb"),
        };
        // Created in a and moved to b in one step, so neither end is ever
        // visible in the root namespace.
        hosts.a.ip(&[
            "link",
            "add",
            &hosts.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.veth_b,
            "netns",
            hosts.b.name(),
        ])?;
        for (ns, dev, v4, v6) in [
            (&hosts.a, &hosts.veth_a, hosts.a_v4, hosts.a_v6),
            (&hosts.b, &hosts.veth_b, hosts.b_v4, hosts.b_v6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            // nodad: usable at once instead of tentative for a second or so.
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for (ns, dev) in [(&hosts.a, &hosts.veth_a), (&hosts.b, &hosts.veth_b)] {
            wait_carrier(ns, dev)?;
        }
        Ok(hosts)
    }
}

/// Waits until `dev` reports carrier, so the first packet is not dropped.
fn wait_carrier(ns: &Netns, dev: &str) -> Result<(), LabError> {
    let step = Duration::from_millis(10);
    let started = Instant::now();
    let mut state = String::new();
    for _ in 0..(LINK_UP_TIMEOUT.as_millis() / step.as_millis()) {
        state = ns.ip_output(&["-o", "link", "show", "dev", dev])?;
        if state.contains("LOWER_UP") {
            return Ok(());
        }
        if started.elapsed() >= LINK_UP_TIMEOUT {
            break;
        }
        std::thread::sleep(step);
    }
    Err(LabError::LinkDown {
        name: ns.name().to_string(),
        dev: dev.to_string(),
        after: LINK_UP_TIMEOUT,
        state: state.trim().to_string(),
    })
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A socket timeout of zero means "never" to std, so clamp to a minimum.
fn sock_timeout(deadline: Instant) -> Duration {
    remaining(deadline).max(Duration::from_millis(1))
}

/// Waits until `fd` is readable or `wait` passes; `Ok(false)` on timeout.
fn wait_readable(fd: RawFd, wait: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the
    // count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        -1 => {
            let e = io::Error::last_os_error();
            // An interrupted wait is just a short one; callers re-check
            // their deadline.
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Outcome of [`tcp_zeros`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpZerosReport {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Received bytes that were not zero: corruption that got past every
    /// check on the path.
    pub nonzero_bytes: u64,
    pub first_nonzero_offset: Option<u64>,
    /// From the client's connection being established until the server saw
    /// end of stream (or gave up).
    pub elapsed: Duration,
    /// Why the transfer ended early (timeout, reset, ...), if it did.
    pub interrupted: Option<String>,
}

impl TcpZerosReport {
    pub fn mbit_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs == 0.0 {
            return 0.0;
        }
        self.bytes_received as f64 * 8.0 / secs / 1e6
    }

    /// Everything sent arrived, intact, and both sides finished normally.
    pub fn is_clean(&self) -> bool {
        self.interrupted.is_none()
            && self.bytes_received == self.bytes_sent
            && self.nonzero_bytes == 0
    }
}

struct SinkResult {
    received: u64,
    nonzero: u64,
    first_nonzero: Option<u64>,
    finished_at: Instant,
    error: Option<String>,
}

struct SourceResult {
    connected_at: Instant,
    sent: u64,
    error: Option<String>,
}

/// Sends `bytes` zero bytes over TCP from `client` to a server in `server`
/// listening on `server_addr`, which checks every byte it receives. Nothing
/// blocks past `timeout`; a transfer cut short is reported in
/// [`TcpZerosReport::interrupted`], not as an error.
pub fn tcp_zeros(
    server: &Netns,
    client: &Netns,
    server_addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<TcpZerosReport, LabError> {
    let deadline = Instant::now() + timeout;
    let listener = server
        .run(|| TcpListener::bind(server_addr))?
        .map_err(socket_error(format!(
            "binding TCP server to {server_addr} in namespace {}",
            server.name()
        )))?;
    let client_gave_up = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sink =
            server.spawn_scoped(s, || tcp_sink(&listener, bytes, deadline, &client_gave_up))?;
        let source = client.run(|| tcp_source(server_addr, bytes, deadline));
        if !matches!(source, Ok(Ok(_))) {
            client_gave_up.store(true, Ordering::Relaxed);
        }
        let sink = join_scoped(sink)?;
        let source = source?.map_err(socket_error(format!(
            "connecting from namespace {} to TCP {server_addr} in namespace {}",
            client.name(),
            server.name()
        )))?;
        let sink = sink.map_err(socket_error(format!(
            "TCP server on {server_addr} in namespace {}",
            server.name()
        )))?;
        let interrupted = match (source.error, sink.error) {
            (None, None) => None,
            (Some(c), None) => Some(format!("client: {c}")),
            (None, Some(s)) => Some(format!("server: {s}")),
            (Some(c), Some(s)) => Some(format!("client: {c}; server: {s}")),
        };
        Ok(TcpZerosReport {
            bytes_sent: source.sent,
            bytes_received: sink.received,
            nonzero_bytes: sink.nonzero,
            first_nonzero_offset: sink.first_nonzero,
            elapsed: sink
                .finished_at
                .saturating_duration_since(source.connected_at),
            interrupted,
        })
    })
}

/// Accepts one connection and reads it to end of stream, checking bytes.
/// `Err` only when no connection was accepted.
fn tcp_sink(
    listener: &TcpListener,
    expected: u64,
    deadline: Instant,
    client_gave_up: &AtomicBool,
) -> io::Result<SinkResult> {
    let poll_step = Duration::from_millis(50);
    let mut accepted = None;
    for _ in 0..(sock_timeout(deadline).as_millis() / poll_step.as_millis() + 2) {
        if client_gave_up.load(Ordering::Relaxed) || remaining(deadline).is_zero() {
            break;
        }
        if wait_readable(listener.as_raw_fd(), poll_step.min(sock_timeout(deadline)))? {
            accepted = Some(listener.accept()?.0);
            break;
        }
    }
    let Some(mut stream) = accepted else {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no connection arrived before the deadline",
        ));
    };
    let mut result = SinkResult {
        received: 0,
        nonzero: 0,
        first_nonzero: None,
        finished_at: Instant::now(),
        error: None,
    };
    let mut buf = vec![0u8; TCP_CHUNK];
    // Each read that is not end of stream yields at least one byte, so a
    // peer sending what it promised needs at most expected + 1 reads; a
    // little more lets surplus bytes show up in the count.
    let max_reads = expected.saturating_add(2);
    let mut reads = 0u64;
    loop {
        if reads >= max_reads {
            result.error = Some(format!("more than {expected} bytes arrived"));
            break;
        }
        reads += 1;
        if let Err(e) = stream.set_read_timeout(Some(sock_timeout(deadline))) {
            result.error = Some(format!("setting read timeout: {e}"));
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                if let Some(pos) = chunk.iter().position(|&b| b != 0) {
                    result
                        .first_nonzero
                        .get_or_insert(result.received + pos as u64);
                    result.nonzero += chunk[pos..].iter().filter(|&&b| b != 0).count() as u64;
                }
                result.received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                result.error = Some(format!(
                    "read after {} bytes: {e}{}",
                    result.received,
                    if remaining(deadline).is_zero() {
                        " (overall timeout reached)"
                    } else {
                        ""
                    }
                ));
                break;
            }
        }
    }
    result.finished_at = Instant::now();
    Ok(result)
}

fn is_retryable_connect_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::Interrupted
    )
}

/// Connects (retrying while a tunnel may still be coming up), writes
/// `bytes` zeros, shuts down writing and waits for the server to close.
/// `Err` only when no connection could be made.
fn tcp_source(addr: SocketAddr, bytes: u64, deadline: Instant) -> io::Result<SourceResult> {
    let retry_until = deadline.min(Instant::now() + CONNECT_RETRY_WINDOW);
    let pause = Duration::from_millis(50);
    let attempt_limit = Duration::from_millis(500);
    let max_attempts = CONNECT_RETRY_WINDOW.as_millis() / pause.as_millis() + 1;
    let mut last_error = io::Error::new(io::ErrorKind::TimedOut, "no connection attempt made");
    let mut connected = None;
    for _ in 0..max_attempts {
        let wait = attempt_limit.min(sock_timeout(retry_until));
        match TcpStream::connect_timeout(&addr, wait) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) if is_retryable_connect_error(&e) => last_error = e,
            Err(e) => return Err(e),
        }
        if remaining(retry_until) <= pause {
            break;
        }
        std::thread::sleep(pause);
    }
    let Some(mut stream) = connected else {
        return Err(last_error);
    };
    let mut result = SourceResult {
        connected_at: Instant::now(),
        sent: 0,
        error: None,
    };
    let chunk = vec![0u8; TCP_CHUNK];
    let chunks = bytes.div_ceil(TCP_CHUNK as u64);
    for _ in 0..chunks {
        let n = (bytes - result.sent).min(TCP_CHUNK as u64) as usize;
        let written = stream
            .set_write_timeout(Some(sock_timeout(deadline)))
            .and_then(|()| stream.write_all(&chunk[..n]));
        if let Err(e) = written {
            // write_all may have sent part of the chunk; the server's count
            // is the authoritative one.
            result.error = Some(format!("write after {} bytes: {e}", result.sent));
            return Ok(result);
        }
        result.sent += n as u64;
    }
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        result.error = Some(format!("shutdown: {e}"));
        return Ok(result);
    }
    // Waiting for the server's close keeps the socket (and its unsent data)
    // alive until the server has seen everything.
    let mut sink = [0u8; 512];
    for _ in 0..64 {
        let read = stream
            .set_read_timeout(Some(sock_timeout(deadline)))
            .and_then(|()| stream.read(&mut sink));
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                result.error = Some(format!("waiting for the server to close: {e}"));
                break;
            }
        }
    }
    Ok(result)
}

/// Outcome of [`udp_exchange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReport {
    pub sent: u32,
    /// Replies identical to a datagram sent, counted once each.
    pub echoed_ok: u32,
    /// Replies that match nothing sent: corrupted, truncated or foreign.
    pub mismatched: u32,
    /// Second and later copies of an already counted reply.
    pub duplicates: u32,
    /// Datagrams the server received; with `echoed_ok` it tells which
    /// direction lost traffic.
    pub server_received: u32,
}

impl UdpReport {
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.echoed_ok)
    }

    pub fn is_clean(&self, count: u32) -> bool {
        self.sent == count
            && self.echoed_ok == count
            && self.mismatched == 0
            && self.duplicates == 0
    }
}

/// Datagram `index` of `size` bytes: the index, then a pattern derived from
/// it, so every datagram differs and a misplaced byte shows.
fn udp_payload(index: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|j| {
            (j as u32)
                .wrapping_mul(7)
                .wrapping_add(index.wrapping_mul(31)) as u8
        })
        .collect();
    p[..4].copy_from_slice(&index.to_be_bytes());
    p
}

/// Sends `count` distinct datagrams of `size` bytes from `client` to an
/// echo server in `server` on `server_addr`, one at a time (each waits for
/// its echo, briefly), and checks every echo byte for byte.
pub fn udp_exchange(
    server: &Netns,
    client: &Netns,
    server_addr: SocketAddr,
    count: u32,
    size: usize,
    timeout: Duration,
) -> Result<UdpReport, LabError> {
    if !(4..=65_000).contains(&size) {
        return Err(LabError::Invalid(format!(
            "UDP datagram size {size}: use 4..=65000 bytes (4 carry the index)"
        )));
    }
    let deadline = Instant::now() + timeout;
    let socket = server
        .run(|| UdpSocket::bind(server_addr))?
        .map_err(socket_error(format!(
            "binding UDP echo server to {server_addr} in namespace {}",
            server.name()
        )))?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let echo = server.spawn_scoped(s, || udp_echo(&socket, count, deadline, &stop))?;
        let report = client.run(|| udp_client(server_addr, count, size, timeout, deadline));
        stop.store(true, Ordering::Relaxed);
        let server_received = join_scoped(echo)?.map_err(socket_error(format!(
            "UDP echo server on {server_addr} in namespace {}",
            server.name()
        )))?;
        let mut report = report?.map_err(socket_error(format!(
            "UDP client in namespace {} to {server_addr}",
            client.name()
        )))?;
        report.server_received = server_received;
        Ok(report)
    })
}

/// Echoes datagrams until told to stop or the deadline passes; returns how
/// many it received.
fn udp_echo(
    socket: &UdpSocket,
    count: u32,
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<u32> {
    let step = Duration::from_millis(20);
    let mut buf = vec![0u8; 65_536];
    let mut received = 0u32;
    // One iteration per datagram or per idle poll step; a few times the
    // expected datagrams leaves room for duplicates and strays.
    let max_iters =
        u128::from(count) * 4 + sock_timeout(deadline).as_millis() / step.as_millis() + 16;
    for _ in 0..max_iters {
        if stop.load(Ordering::Relaxed) || remaining(deadline).is_zero() {
            break;
        }
        if !wait_readable(socket.as_raw_fd(), step.min(sock_timeout(deadline)))? {
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                received = received.saturating_add(1);
                // A lost echo shows up in the client's count; nothing to
                // do about it here.
                let _ = socket.send_to(&buf[..n], from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(received)
}

fn udp_client(
    addr: SocketAddr,
    count: u32,
    size: usize,
    timeout: Duration,
    deadline: Instant,
) -> io::Result<UdpReport> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected, so the kernel drops datagrams from anyone else.
    socket.connect(addr)?;
    let per_datagram =
        (timeout / count.max(1)).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut report = UdpReport {
        sent: 0,
        echoed_ok: 0,
        mismatched: 0,
        duplicates: 0,
        server_received: 0,
    };
    let mut seen = vec![false; count as usize];
    let mut buf = vec![0u8; 65_536];
    for index in 0..count {
        if remaining(deadline).is_zero() {
            break;
        }
        let payload = udp_payload(index, size);
        match socket.send(&payload) {
            Ok(_) => report.sent += 1,
            // ICMP unreachable for an earlier datagram surfaces here; the
            // datagram itself was not sent and counts as lost.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
        let wait_until = deadline.min(Instant::now() + per_datagram);
        // Each iteration consumes a datagram or ends the wait; replies to
        // earlier, delayed datagrams may arrive first.
        for _ in 0..(count as usize + 8) {
            if !wait_readable(socket.as_raw_fd(), remaining(wait_until))? {
                break;
            }
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let reply = &buf[..n];
            let claimed = reply
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes);
            match claimed {
                Some(i) if i <= index && reply == udp_payload(i, size).as_slice() => {
                    let slot = &mut seen[i as usize];
                    if *slot {
                        report.duplicates += 1;
                    } else {
                        *slot = true;
                        report.echoed_ok += 1;
                    }
                    if i == index {
                        break;
                    }
                }
                _ => report.mismatched += 1,
            }
        }
    }
    Ok(report)
}

/// Outcome of [`ping`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingReport {
    /// Echo requests the kernel accepted for sending.
    pub sent: u32,
    /// Distinct echo replies from the target matching our identifier, a
    /// sequence number we sent and the payload.
    pub received: u32,
    /// The last error from sending, if any (e.g. no route).
    pub last_send_error: Option<String>,
}

/// RFC 1071 Internet checksum, from the datapath's own implementation.
fn internet_checksum(data: &[u8]) -> u16 {
    crate::wire::checksum::finish(crate::wire::checksum::sum(data))
}

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const PING_PAYLOAD: &[u8; 24] = b"esptun lab echo payload!";

fn ping_identifier() -> u16 {
    // Raw ICMP sockets see every echo reply in the namespace; a per-call
    // identifier keeps concurrent pings from counting each other's replies.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() as u16) ^ (n as u16).rotate_left(8)
}

fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut msg = vec![
        if v6 {
            ICMP6_ECHO_REQUEST
        } else {
            ICMP_ECHO_REQUEST
        },
        0,
        0,
        0,
    ];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(PING_PAYLOAD);
    if !v6 {
        // ICMPv6 raw sockets have the kernel fill in the checksum (it
        // covers a pseudo-header we do not see); ICMPv4 ones do not.
        let sum = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    msg
}

/// A raw ICMP or ICMPv6 socket aimed at one address.
struct RawIcmp {
    fd: OwnedFd,
    to: IpAddr,
}

impl RawIcmp {
    fn open(to: IpAddr) -> io::Result<RawIcmp> {
        let (family, proto) = match to {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
        };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawIcmp { fd, to })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let rc = match self.to {
            IpAddr::V4(a) => {
                // SAFETY: sockaddr_in is plain old data; all-zero is valid.
                let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                // SAFETY: `msg` and `sa` are valid for the lengths passed
                // for the duration of the call.
                unsafe {
                    libc::sendto(
                        self.fd.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        0,
                        (&raw const sa).cast(),
                        mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            IpAddr::V6(a) => {
                // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
                let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = a.octets();
                // SAFETY: `msg` and `sa` are valid for the lengths passed
                // for the duration of the call.
                unsafe {
                    libc::sendto(
                        self.fd.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        0,
                        (&raw const sa).cast(),
                        mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one packet without blocking; returns the ICMP message if it
    /// came from the target.
    fn recv_from_target<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
        match self.to {
            IpAddr::V4(target) => {
                // SAFETY: `buf` is valid for writes of its length; a null
                // source address is allowed.
                let n = unsafe {
                    libc::recvfrom(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                };
                let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
                // IPv4 raw sockets deliver the IP header too; the source is
                // in it.
                let packet = &buf[..n];
                let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
                if n < 20 || ihl < 20 || n < ihl || packet[0] >> 4 != 4 {
                    return Ok(None);
                }
                let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                Ok((src == target).then(|| &packet[ihl..]))
            }
            IpAddr::V6(target) => {
                // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
                let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
                let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                // SAFETY: `buf`, `sa` and `len` are valid for writes of the
                // sizes passed for the duration of the call.
                let n = unsafe {
                    libc::recvfrom(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        (&raw mut sa).cast(),
                        &mut len,
                    )
                };
                let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
                let src = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                Ok((src == target).then(|| &buf[..n]))
            }
        }
    }
}

/// Sends `count` ICMP echo requests from namespace `from` to `to`, one at a
/// time, and counts matching replies. Gives up at `timeout`.
pub fn ping(
    from: &Netns,
    to: IpAddr,
    count: u32,
    timeout: Duration,
) -> Result<PingReport, LabError> {
    let count = u16::try_from(count)
        .map_err(|_| LabError::Invalid(format!("ping count {count}: at most 65535")))?;
    let deadline = Instant::now() + timeout;
    from.run(|| ping_inner(to, count, timeout, deadline))?
        .map_err(socket_error(format!(
            "ping {to} from namespace {}",
            from.name()
        )))
}

fn ping_inner(
    to: IpAddr,
    count: u16,
    timeout: Duration,
    deadline: Instant,
) -> io::Result<PingReport> {
    let v6 = to.is_ipv6();
    let (reply_type, id) = (
        if v6 {
            ICMP6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        },
        ping_identifier(),
    );
    let sock = RawIcmp::open(to).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            io::Error::new(
                e.kind(),
                format!("raw ICMP socket needs CAP_NET_RAW (run as root): {e}"),
            )
        } else {
            e
        }
    })?;
    let per_echo = (timeout / u32::from(count.max(1)))
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut report = PingReport {
        sent: 0,
        received: 0,
        last_send_error: None,
    };
    let mut seen = vec![false; usize::from(count)];
    let mut buf = [0u8; 1500];
    for seq in 0..count {
        if remaining(deadline).is_zero() {
            break;
        }
        match sock.send(&echo_request(v6, id, seq)) {
            Ok(()) => report.sent += 1,
            Err(e) => {
                report.last_send_error = Some(e.to_string());
                continue;
            }
        }
        let wait_until = deadline.min(Instant::now() + per_echo);
        // A raw socket also sees unrelated ICMP (neighbour discovery,
        // other pings); bound how many strays one wait may consume.
        for _ in 0..256 {
            if !wait_readable(sock.fd.as_raw_fd(), remaining(wait_until))? {
                break;
            }
            let msg = match sock.recv_from_target(&mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if msg.len() != 8 + PING_PAYLOAD.len()
                || msg[0] != reply_type
                || msg[1] != 0
                || msg[4..6] != id.to_be_bytes()
                || &msg[8..] != PING_PAYLOAD
                || (!v6 && internet_checksum(msg) != 0)
            {
                continue;
            }
            let got = u16::from_be_bytes([msg[6], msg[7]]);
            if got > seq || seen[usize::from(got)] {
                continue;
            }
            seen[usize::from(got)] = true;
            report.received += 1;
            if got == seq {
                break;
            }
        }
    }
    Ok(report)
}

/// Root-only unit tests skip without root (saying why), unless the run
/// insists on them with `ESPTUN_REQUIRE_NETNS=1`.
#[cfg(test)]
pub(crate) fn have_root() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("ESPTUN_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("needs root (network namespaces), and ESPTUN_REQUIRE_NETNS=1 is set");
    }
    eprintln!("skipped: needs root (network namespaces)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_names() -> String {
        let out = run_ip(&["netns", "list"]).expect("ip netns list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn listed(names: &str, ns: &str) -> bool {
        names
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: these bytes sum to 0xddf2.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let req = echo_request(false, 0x1234, 7);
        assert_eq!(
            internet_checksum(&req),
            0,
            "a checksummed message sums to zero"
        );
        // Odd length pads with a zero byte.
        assert_eq!(internet_checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn prefixes_are_unique_and_short() {
        let a = unique_prefix("averyveryverylongtag");
        let b = unique_prefix("averyveryverylongtag");
        assert_ne!(a, b);
        assert!(a.len() <= PREFIX_MAX && b.len() <= PREFIX_MAX, "{a} {b}");
        assert!(
            unique_prefix("X/y z")
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn udp_payloads_differ() {
        assert_ne!(udp_payload(1, 64), udp_payload(2, 64));
        assert_eq!(&udp_payload(0x01020304, 4)[..], &[1, 2, 3, 4]);
    }

    #[test]
    fn ping_across_veth_v4_and_v6() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("ping", 240).expect("lab");
        for to in [IpAddr::V4(lab.b_v4), IpAddr::V6(lab.b_v6)] {
            let r = ping(&lab.a, to, 3, T).expect("ping");
            assert_eq!((r.sent, r.received), (3, 3), "{to}: {r:?}");
        }
        let r = ping(&lab.b, IpAddr::V6(lab.a_v6), 2, T).expect("ping back");
        assert_eq!((r.sent, r.received), (2, 2), "{r:?}");
        // Nobody answers here: replies must not be invented.
        let r = ping(
            &lab.a,
            IpAddr::V4(Ipv4Addr::new(198, 18, 240, 99)),
            1,
            Duration::from_millis(500),
        )
        .expect("ping nobody");
        assert_eq!(r.received, 0, "{r:?}");
    }

    #[test]
    fn tcp_zeros_8mib_across_veth() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("tcp", 241).expect("lab");
        let bytes = 8 << 20;
        for addr in [
            SocketAddr::new(lab.b_v4.into(), 5001),
            SocketAddr::new(lab.b_v6.into(), 5001),
        ] {
            let r = tcp_zeros(&lab.b, &lab.a, addr, bytes, T).expect("tcp_zeros");
            assert_eq!(r.bytes_sent, bytes, "{r:?}");
            assert_eq!(r.bytes_received, r.bytes_sent, "{r:?}");
            assert_eq!(r.nonzero_bytes, 0, "{r:?}");
            assert_eq!(r.first_nonzero_offset, None);
            assert!(r.is_clean(), "{r:?}");
            eprintln!("{addr}: {:.0} Mbit/s", r.mbit_per_s());
        }
    }

    #[test]
    fn unreachable_server_is_an_error_not_a_hang() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("unr", 242).expect("lab");
        // A namespace with no links at all: every connect is unreachable.
        let lonely = Netns::create(&format!("{}c", unique_prefix("unr"))).expect("netns");
        let addr = SocketAddr::new(lab.b_v4.into(), 5002);
        let started = Instant::now();
        let r = tcp_zeros(&lab.b, &lonely, addr, 1 << 20, Duration::from_secs(1));
        assert!(matches!(r, Err(LabError::Socket { .. })), "{r:?}");
        let r = udp_exchange(&lab.b, &lonely, addr, 3, 100, Duration::from_secs(1));
        assert!(r.is_err(), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn udp_exchange_v4_and_v6() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("udp", 243).expect("lab");
        for addr in [
            SocketAddr::new(lab.b_v4.into(), 5004),
            SocketAddr::new(lab.b_v6.into(), 5004),
        ] {
            let r = udp_exchange(&lab.b, &lab.a, addr, 20, 1200, T).expect("udp_exchange");
            assert!(r.is_clean(20), "{addr}: {r:?}");
            assert_eq!(r.server_received, 20, "{r:?}");
        }
    }

    #[test]
    fn panic_inside_namespace_is_an_error() {
        if !have_root() {
            return;
        }
        let ns = Netns::create(&format!("{}p", unique_prefix("panic"))).expect("netns");
        let r: Result<(), _> = ns.run(|| panic!("deliberate"));
        match r {
            Err(LabError::Panicked { name, message }) => {
                assert_eq!(name, ns.name());
                assert!(message.contains("deliberate"), "{message}");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        let h = ns.spawn(|| 7).expect("spawn");
        assert_eq!(join(h).expect("join"), 7);
    }

    #[test]
    fn command_and_ip_act_inside_the_namespace() {
        if !have_root() {
            return;
        }
        let ns = Netns::create(&format!("{}x", unique_prefix("cmd"))).expect("netns");
        let out = ns
            .command(ip_binary())
            .args(["-o", "link", "show"])
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{out:?}");
        let links = String::from_utf8_lossy(&out.stdout);
        // A fresh namespace holds only its loopback, which create brought up.
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");
        match ns.ip(&["link", "set", "nosuchdev", "up"]) {
            Err(LabError::IpFailed { stderr, .. }) => assert!(!stderr.is_empty()),
            other => panic!("expected IpFailed with stderr, got {other:?}"),
        }
        assert!(matches!(
            Netns::create(ns.name()),
            Err(LabError::Invalid(m)) if m.contains("already exists")
        ));
        assert!(matches!(Netns::create("../x"), Err(LabError::Invalid(_))));
    }

    #[test]
    fn drop_removes_namespaces_even_when_unwinding() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("drop", 244).expect("lab");
        let names = [lab.a.name().to_string(), lab.b.name().to_string()];
        let before = netns_names();
        assert!(names.iter().all(|n| listed(&before, n)), "{before}");
        drop(lab);
        let after = netns_names();
        assert!(!names.iter().any(|n| listed(&after, n)), "{after}");

        let mut names = Vec::new();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let lab = TwoHosts::create("unwind", 245).expect("lab");
            names.push(lab.a.name().to_string());
            names.push(lab.b.name().to_string());
            panic!("deliberate, to test cleanup while unwinding");
        }));
        assert!(unwound.is_err());
        let after = netns_names();
        assert_eq!(names.len(), 2);
        assert!(!names.iter().any(|n| listed(&after, n)), "{after}");
    }

    #[test]
    fn nothing_appears_in_the_root_namespace() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("root", 246).expect("lab");
        let out = run_ip(&["-o", "link", "show"]).expect("ip link");
        let links = String::from_utf8_lossy(&out.stdout);
        assert!(
            !links.contains(&lab.veth_a) && !links.contains(&lab.veth_b),
            "{links}"
        );
    }
}
