//! SIGTERM, SIGINT and SIGHUP as values the main thread waits for, not
//! handlers: blocked in every thread (the mask is inherited by threads
//! spawned afterwards) and read synchronously from a signalfd(2), so no
//! code runs in signal context. A blocked signal sent to the process stays
//! pending until read; signalfd(2) hands out those pending for the process
//! or the reading thread, like sigtimedwait(2) would.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{self as nsig, SigSet, SigmaskHow, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop cleanly.
    Stop,
    /// SIGHUP: reload SAs from the configuration.
    Reload,
}

/// The blocked set; create before spawning any thread.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread.
    pub fn block() -> io::Result<Signals> {
        let mut set = SigSet::empty();
        set.add(nsig::SIGTERM);
        set.add(nsig::SIGINT);
        set.add(nsig::SIGHUP);
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        // Non-blocking: `wait` polls with the timeout, then reads without
        // waiting. Close-on-exec: children must not see our signals.
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// Waits up to `timeout` (rounded up to whole milliseconds) for one of
    /// the blocked signals.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        let ms = timeout.as_nanos().div_ceil(1_000_000);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) if n > 0 => {}
            _ => return None, // timeout or EINTR
        }
        let info = self.fd.read_signal().ok()??;
        let signo = i32::try_from(info.ssi_signo).ok()?;
        match nsig::Signal::try_from(signo).ok()? {
            nsig::SIGTERM | nsig::SIGINT => Some(Signal::Stop),
            nsig::SIGHUP => Some(Signal::Reload),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn blocked_signals_become_values() {
        // On a thread of its own, so the mask changes nowhere else;
        // raise(3) sends to the calling thread only, where it is blocked
        // and stays pending until the signalfd reads it.
        std::thread::spawn(|| {
            let signals = Signals::block().expect("block");
            let started = Instant::now();
            assert_eq!(signals.wait(Duration::from_millis(30)), None);
            assert!(started.elapsed() >= Duration::from_millis(29));
            for (sent, got) in [
                (nsig::SIGHUP, Signal::Reload),
                (nsig::SIGTERM, Signal::Stop),
                (nsig::SIGINT, Signal::Stop),
            ] {
                nsig::raise(sent).expect("raise");
                assert_eq!(signals.wait(Duration::from_secs(2)), Some(got), "{sent}");
            }
            assert_eq!(signals.wait(Duration::ZERO), None, "each is read once");
        })
        .join()
        .expect("signal test thread");
    }
}
