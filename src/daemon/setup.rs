//! Start-up steps of `esptun run` before any thread runs: the checks that
//! turn a missing capability or an unusable TUN device into a clear error
//! rather than EPERM later, and the opening of the outer sockets.

use super::caps::{self, Capability};
use super::{DaemonError, workers};
use crate::config::Valid;
use crate::io::IoSetupError;
use crate::io::socket::{OuterSocket, SocketOffloads};

/// How to give a non-root daemon what it needs: capabilities(7).
pub(super) const HOW_TO_GRANT: &str = "run it as root; or from the systemd unit (deploy/esptun.service: \
     User=esptun with AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW); or under `setpriv \
     --inh-caps=+net_admin,+net_raw --ambient-caps=+net_admin,+net_raw` (or `capsh \
     --addamb=cap_net_admin,cap_net_raw`). A non-root daemon needs them ambient, because the \
     `ip` child it runs keeps only ambient capabilities";

/// Refuses to go on without `needed` (see [`caps`]): a clear message now
/// rather than EPERM from some later system call.
pub(super) fn require(needed: &[Capability]) -> Result<(), DaemonError> {
    let uid = nix::unistd::geteuid().as_raw();
    let sets = match caps::CapSets::current() {
        Ok(sets) => sets,
        // Root without /proc: nothing to tell, the system calls decide.
        Err(_) if uid == 0 => return Ok(()),
        Err(source) => return Err(DaemonError::Capabilities { uid, source }),
    };
    caps::check(uid, &sets, needed, true).map_err(|lacking| match lacking {
        caps::Lacking::Missing(cap) => DaemonError::MissingCapability { cap, uid },
        caps::Lacking::NotAmbient(cap) => DaemonError::CapabilityNotAmbient { cap, uid },
    })
}

pub(super) const TUN_DEVICE: &str = "/dev/net/tun";

/// A non-root daemon must be able to open the TUN clone device itself
/// (root passes by CAP_DAC_OVERRIDE); otherwise the open fails with EACCES
/// and looks like a missing capability.
pub(super) fn require_tun_device() -> Result<(), DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return Ok(());
    }
    let access = nix::unistd::faccessat(
        nix::fcntl::AT_FDCWD,
        TUN_DEVICE,
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    );
    match (access, std::fs::metadata(TUN_DEVICE)) {
        (Err(nix::errno::Errno::EACCES), Ok(meta)) => Err(DaemonError::TunDevice {
            uid,
            mode: meta.mode() & 0o7777,
            owner: meta.uid(),
        }),
        // Missing or fine: opening it says what is wrong, if anything.
        _ => Ok(()),
    }
}

pub(super) fn outer_sockets(config: &Valid) -> Result<workers::Sockets, DaemonError> {
    let encap = config.outer.encap;
    let needs = |v6: bool| {
        config
            .peer_addrs()
            .iter()
            .any(|p| p.endpoint.is_ipv6() == v6)
    };
    let open = |v6: bool| -> Result<Option<OuterSocket>, DaemonError> {
        if needs(v6) {
            let mut socket = OuterSocket::open(encap, v6, Some(config.outer.fwmark))?;
            let on = socket.enable_offloads(SocketOffloads {
                gso: config.offloads.udp_gso,
                gro: config.offloads.udp_gro,
            });
            tracing::debug!(v6, gso = on.gso, gro = on.gro, "outer socket offloads");
            // Each datagram's hop-by-hop header is reported
            // (IPV6_RECVHOPOPTS): carrying, to be put back on the inner
            // packet; dropping, to be counted (the kernel adds the message
            // only to datagrams that have one: cheap).
            if v6 {
                socket
                    .enable_hop_by_hop_receive()
                    .map_err(|source| IoSetupError::Socket {
                        what: "IPV6_RECVHOPOPTS on the IPv6 outer socket",
                        source,
                    })?;
            }
            Ok(Some(socket))
        } else {
            Ok(None)
        }
    };
    Ok(workers::Sockets {
        v4: open(false)?,
        v6: open(true)?,
        encap,
    })
}
