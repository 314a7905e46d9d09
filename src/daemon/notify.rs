//! sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`, so
//! a `Type=notify` unit is READY only after the boot self-tests passed and
//! the interface is up (see `deploy/esptun.service`).

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. "READY=1") to the service manager, if there is one;
/// returns whether a manager was told.
pub fn notify(state: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket at `path` (a leading '@'
/// names an abstract socket, as systemd passes it).
pub fn notify_to(path: &OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn reaches_a_path_socket_and_an_abstract_one() {
        let dir = TempDir::new("notify");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let path = dir.0.join("notify.sock");
        let manager = UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("esptun-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let manager = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
