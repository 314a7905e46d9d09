//! TCP and UDP traffic between two namespaces, checked byte for byte.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{LabError, Netns, join_scoped, remaining, sock_timeout, socket_error, wait_readable};

/// A tunnel under test may still be installing its state when the client
/// starts, so early refusals and unreachables are retried this long.
const CONNECT_RETRY_WINDOW: Duration = Duration::from_secs(3);
const TCP_CHUNK: usize = 64 * 1024;

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
        if wait_readable(listener.as_fd(), poll_step.min(sock_timeout(deadline)))? {
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
        if !wait_readable(socket.as_fd(), step.min(sock_timeout(deadline)))? {
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
            if !wait_readable(socket.as_fd(), remaining(wait_until))? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{TwoHosts, have_root, unique_prefix};

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn udp_payloads_differ() {
        assert_ne!(udp_payload(1, 64), udp_payload(2, 64));
        assert_eq!(&udp_payload(0x01020304, 4)[..], &[1, 2, 3, 4]);
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
}
