//! SIGTERM, SIGINT and SIGHUP as values the main thread waits for, not
//! handlers: blocked in every thread (the mask is inherited by threads
//! spawned afterwards) and taken synchronously with `sigtimedwait(2)`, so
//! no code runs in signal context.

use std::io;
use std::time::Duration;

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
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset initializes it
        // before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the
        // signal numbers are valid constants.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Signals { set })
    }

    /// Waits up to `timeout` for one of the blocked signals.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `self.set` is an initialized sigset_t, `ts` a valid
        // timespec; a null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        match signal {
            libc::SIGTERM | libc::SIGINT => Some(Signal::Stop),
            libc::SIGHUP => Some(Signal::Reload),
            _ => None, // timeout (EAGAIN) or EINTR
        }
    }
}
