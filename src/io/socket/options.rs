//! Socket options socket2 does not wrap, through setsockopt(2).

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use socket2::Socket;

use super::SOCKET_BUFFER;

/// Asks for [`SOCKET_BUFFER`]-byte socket buffers: first with the FORCE
/// options, which may exceed net.core.{r,w}mem_max but need CAP_NET_ADMIN
/// (socket(7)), then the ordinary ones, which the kernel caps at those
/// limits. Best effort: the defaults work, just with less slack.
pub(super) fn set_buffer_sizes(sock: &Socket) {
    let size = SOCKET_BUFFER as libc::c_int;
    if set_int_option(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if set_int_option(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size).is_err() {
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    }
}

/// setsockopt(2) with an int value, for options socket2 does not wrap.
pub(super) fn set_int_option(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and the length passed is
    // its size; setsockopt(2) only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// getsockopt(2) of an int value, for options socket2 does not wrap.
pub(super) fn get_int_option(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the value and length point at live locals of the sizes
    // stated; getsockopt(2) writes at most `len` bytes and the new length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
