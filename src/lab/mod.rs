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
mod icmp;
mod netns;
mod traffic;
pub mod tunnel;

pub use icmp::{PingReport, ping};
pub use netns::{Netns, TwoHosts, is_lab_name, join, join_scoped, lab_namespace};
pub use traffic::{TcpZerosReport, UdpReport, tcp_zeros, udp_exchange};

use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

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

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A socket timeout of zero means "never" to std, so clamp to a minimum.
fn sock_timeout(deadline: Instant) -> Duration {
    remaining(deadline).max(Duration::from_millis(1))
}

/// Waits until `fd` is readable or `wait` passes; `Ok(false)` on timeout.
fn wait_readable(fd: BorrowedFd<'_>, wait: Duration) -> io::Result<bool> {
    let timeout = PollTimeout::try_from(wait.as_millis()).unwrap_or(PollTimeout::MAX);
    match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        // An interrupted wait is just a short one; callers re-check their
        // deadline.
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Root-only unit tests skip without root, saying so as
/// `SKIPPED <test>: <why>` on the real stderr, unless the run insists on
/// them with `ESPTUN_REQUIRE_NETNS=1`, which makes a skip a failure.
#[cfg(test)]
pub(crate) fn have_root() -> bool {
    const WHY: &str = "needs root (network namespaces)";
    if is_root() {
        return true;
    }
    if std::env::var("ESPTUN_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{WHY}, and ESPTUN_REQUIRE_NETNS=1 is set");
    }
    crate::testutil::skipped(WHY);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
