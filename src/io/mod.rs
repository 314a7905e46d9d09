//! The OS edge: the TUN device ([`tun::Tun`]), the outer sockets
//! ([`socket::OuterSocket`]) and readiness waiting ([`poll_readable`]).
//!
//! This is the only module with `unsafe` (besides the SIMD code in
//! `crypto::simd_state` and `wire::checksum`), allowed per submodule where
//! a system call has no safe wrapper (the TUN ioctl and reads, the
//! mmsg batches, raw socket options): each block wraps one system call
//! (or one plain-data initialisation for one) and says why it is sound.
//! Waiting (poll(2)) goes through nix's safe wrapper.
//! Everything here moves whole packets between the kernel and
//! [`crate::packet::PacketBuf`]s; nothing here parses beyond what the
//! kernel forces on us (the IPv4 header a raw socket prepends).
//!
//! Errors on the packet path are plain [`std::io::Error`]s. Failures while
//! setting up, which an operator has to fix, are [`IoSetupError`]s whose
//! messages say what to do.

pub mod ike_socket;
pub mod socket;
#[allow(unsafe_code)]
pub mod tun;

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// A setup failure an operator can act on. Each message names the likely
/// cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum IoSetupError {
    #[error(
        "TUN interface name `{name}` is {len} bytes, but Linux allows at most 15 (IFNAMSIZ - 1): set a shorter `interface` in the config"
    )]
    TunNameTooLong { name: String, len: usize },

    #[error(
        "TUN interface name `{name}` contains a NUL, '/', ':' or whitespace, which Linux refuses: set another `interface` in the config"
    )]
    TunNameInvalid { name: String },

    #[error(
        "/dev/net/tun does not exist: load the tun module (`modprobe tun`), or in a container pass the device through (e.g. `--device /dev/net/tun`)"
    )]
    TunDeviceMissing(#[source] io::Error),

    #[error(
        "opening /dev/net/tun needs CAP_NET_ADMIN: run as root or grant the capability (e.g. `setcap cap_net_admin+ep` or AmbientCapabilities=CAP_NET_ADMIN)"
    )]
    TunPermission(#[source] io::Error),

    #[error(
        "interface `{name}` already exists and cannot be attached as our TUN (another process holds it, or it is not a TUN device): remove it or set another `interface` in the config"
    )]
    TunBusy {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("creating TUN interface `{name}` failed: {source}")]
    Tun {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "UDP port {} on {} is already in use (another IPsec daemon such as charon/strongSwan?): stop it or set `port` in the config",
        .addr.port(), .addr.ip()
    )]
    PortInUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "binding UDP port {} on {} needs CAP_NET_BIND_SERVICE (ports below 1024): run as root, grant the capability, or set a `port` of 1024 or above",
        .addr.port(), .addr.ip()
    )]
    PrivilegedPort {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "raw ESP socket (IP protocol 50) needs CAP_NET_RAW: run as root, grant the capability, or use `outer = \"udp\"`"
    )]
    RawNeedsCapNetRaw(#[source] io::Error),

    #[error(
        "setting SO_MARK {mark:#x} on the outer socket needs CAP_NET_ADMIN: run as root, grant the capability, or remove the fwmark setting"
    )]
    MarkNeedsCapNetAdmin {
        mark: u32,
        #[source]
        source: io::Error,
    },

    #[error(
        "IPv6 sockets are not available on this host (IPv6 disabled, e.g. ipv6.disable=1?): enable IPv6 or use IPv4 peers only"
    )]
    Ipv6Unavailable(#[source] io::Error),

    #[error("{what} failed: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The most descriptors [`poll_readable`] takes at once (the loop polls the
/// TUN, one or two outer sockets and a wake-up fd).
pub const MAX_POLL_FDS: usize = 8;

/// Which of the descriptors given to [`poll_readable`] are ready, as a
/// bitmask by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready(u8);

impl Ready {
    /// Whether the descriptor at position `index` is ready.
    pub fn is_ready(self, index: usize) -> bool {
        index < MAX_POLL_FDS && self.0 & (1 << index) != 0
    }

    pub fn any(self) -> bool {
        self.0 != 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }
}

/// Waits up to `timeout` until at least one of `fds` is readable, with
/// poll(2); allocation-free. An fd with an error or hang-up pending
/// (POLLERR, POLLHUP) counts as ready, so that the next read reports it.
/// An interrupted wait (EINTR) returns "nothing ready" rather than an
/// error: the caller's loop comes round again anyway.
///
/// The timeout is rounded up to whole milliseconds (poll's unit) so that a
/// short non-zero wait never becomes a busy loop.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Ready> {
    if fds.len() > MAX_POLL_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("poll_readable takes at most {MAX_POLL_FDS} fds"),
        ));
    }
    // Unused slots repeat the first fd; only `..fds.len()` is polled.
    let Some(&first) = fds.first() else {
        poll_fds(&mut [], timeout)?;
        return Ok(Ready(0));
    };
    let mut pollfds: [PollFd<'_>; MAX_POLL_FDS] = std::array::from_fn(|i| {
        PollFd::new(fds.get(i).copied().unwrap_or(first), PollFlags::POLLIN)
    });
    let n = poll_fds(&mut pollfds[..fds.len()], timeout)?;
    let mut ready = 0u8;
    if n > 0 {
        for (i, p) in pollfds[..fds.len()].iter().enumerate() {
            let revents = p.revents().unwrap_or(PollFlags::empty());
            // POLLNVAL: the fd is not open, a bug in the caller.
            if revents.contains(PollFlags::POLLNVAL) {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            if revents.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
                ready |= 1 << i;
            }
        }
    }
    Ok(Ready(ready))
}

/// poll(2) over `pollfds`; EINTR is 0 ("nothing ready").
pub(crate) fn poll_fds(pollfds: &mut [PollFd<'_>], timeout: Duration) -> io::Result<usize> {
    // timeout_ms is never negative, the only value PollTimeout refuses.
    let timeout = PollTimeout::try_from(timeout_ms(timeout)).unwrap_or(PollTimeout::MAX);
    match poll(pollfds, timeout) {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        Err(Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Milliseconds for poll(2), rounded up, capped at `c_int::MAX`.
fn timeout_ms(timeout: Duration) -> libc::c_int {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    ms.min(libc::c_int::MAX as u128) as libc::c_int
}

/// The errno of the last failed call, for matching.
fn last_errno() -> (io::Error, i32) {
    let e = io::Error::last_os_error();
    let code = e.raw_os_error().unwrap_or(0);
    (e, code)
}

/// Tests that need real kernel objects in a private network namespace,
/// on [`crate::lab::Netns`].
#[cfg(test)]
pub(crate) mod testns {
    pub(crate) use crate::lab::have_root;

    /// A network namespace with `lo` up, deleted on drop (also when the
    /// test panics).
    pub(crate) struct NetNs(crate::lab::Netns);

    impl NetNs {
        pub(crate) fn new() -> NetNs {
            let name = crate::lab::unique_prefix("io");
            NetNs(crate::lab::Netns::create(&name).unwrap_or_else(|e| panic!("{e}")))
        }

        /// `ip -n <ns> args...`, panicking with its stderr on failure.
        pub(crate) fn ip(&self, args: &[&str]) {
            self.0.ip(args).unwrap_or_else(|e| panic!("{e}"));
        }

        /// Runs `body` on a thread inside this namespace, so the sockets
        /// and TUN it creates live there; a panic in `body` fails the test.
        pub(crate) fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
            self.0.run(body).unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Instant;

    #[test]
    fn poll_reports_the_readable_fd_only() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
        let t = Instant::now();
        let r = poll_readable(&[a.as_fd(), b.as_fd()], Duration::from_millis(20)).expect("poll");
        assert!(!r.any(), "nothing sent yet");
        assert!(
            t.elapsed() >= Duration::from_millis(19),
            "waited the timeout"
        );

        a.send_to(b"x", b.local_addr().expect("addr"))
            .expect("send");
        let r = poll_readable(&[a.as_fd(), b.as_fd()], Duration::from_secs(2)).expect("poll");
        assert!(!r.is_ready(0) && r.is_ready(1), "{r:?}");
    }

    #[test]
    fn poll_refuses_too_many_fds() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let fds = [a.as_fd(); MAX_POLL_FDS + 1];
        let e = poll_readable(&fds, Duration::ZERO).expect_err("too many");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn timeout_rounds_up() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(timeout_ms(Duration::from_millis(10)), 10);
        assert_eq!(timeout_ms(Duration::MAX), libc::c_int::MAX);
    }
}
