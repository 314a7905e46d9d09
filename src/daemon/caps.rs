//! The privileges `esptun run` needs, checked as capabilities rather than
//! as "is root", so that a dedicated user holding exactly CAP_NET_ADMIN
//! (and CAP_NET_RAW for raw ESP) can run the tunnel (capabilities(7)).
//!
//! The sets are read from `/proc/thread-self/status` (proc(5): `CapEff`,
//! `CapAmb`), which needs no new dependency and no privilege.
//!
//! A non-root daemon must hold CAP_NET_ADMIN as an *ambient* capability:
//! it runs `ip` (iproute2, see [`super::netcfg`]) to configure the
//! interface, and across execve(2) a non-root process keeps only its
//! ambient capabilities (capabilities(7), "Transformation of capabilities
//! during execve()"). Root keeps everything its bounding set allows.

use std::path::Path;

/// A capability the daemon may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// TUN device, addresses, routes, policy rules, SO_MARK.
    NetAdmin,
    /// The raw IP socket of `outer = "esp"` (protocol 50).
    NetRaw,
    /// The same capability, needed for `[inner] ipv6_hop_by_hop = "carry"`
    /// in any outer mode: Linux sends an IPV6_HOPOPTS control message only
    /// for CAP_NET_RAW (`ip6_datagram_send_ctl`), UDP sockets included.
    NetRawForHopByHop,
}

impl Capability {
    /// Its bit in the capability sets (linux/capability.h).
    pub fn bit(self) -> u32 {
        match self {
            Capability::NetAdmin => 12,
            Capability::NetRaw | Capability::NetRawForHopByHop => 13,
        }
    }

    /// As capabilities(7) and systemd name it.
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::NetRaw | Capability::NetRawForHopByHop => "CAP_NET_RAW",
        }
    }

    /// What the daemon uses it for.
    pub fn purpose(self) -> &'static str {
        match self {
            Capability::NetAdmin => "the TUN device, its routes and policy rules, and SO_MARK",
            Capability::NetRaw => "the raw ESP socket of outer = \"esp\"",
            Capability::NetRawForHopByHop => {
                "[inner] ipv6_hop_by_hop = \"carry\": Linux sends the IPV6_HOPOPTS control \
                 message that puts the header on the outer packet only for CAP_NET_RAW, also on \
                 the UDP socket of NAT-T; grant it, or set ipv6_hop_by_hop = \"drop\" (the \
                 default) to run without it"
            }
        }
    }
}

/// The capability sets of the calling thread that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub ambient: u64,
}

impl CapSets {
    /// Reads the calling thread's sets.
    pub fn current() -> std::io::Result<CapSets> {
        let text = std::fs::read_to_string(Path::new("/proc/thread-self/status"))
            .or_else(|_| std::fs::read_to_string(Path::new("/proc/self/status")))?;
        Self::parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no CapEff/CapAmb lines in /proc/self/status",
            )
        })
    }

    /// Parses the `CapEff:` and `CapAmb:` lines of a proc status file
    /// (hex masks). Kernels before 4.3 have no ambient set: none then.
    pub fn parse(status: &str) -> Option<CapSets> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some(CapSets {
            effective: field("CapEff:")?,
            ambient: field("CapAmb:").unwrap_or(0),
        })
    }

    pub fn has(&self, cap: Capability) -> bool {
        self.effective & (1 << cap.bit()) != 0
    }

    pub fn has_ambient(&self, cap: Capability) -> bool {
        self.ambient & (1 << cap.bit()) != 0
    }
}

/// Why the process may not run the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lacking {
    /// Not in the effective set.
    Missing(Capability),
    /// Effective but not ambient in a non-root process: the `ip` child
    /// would not have it.
    NotAmbient(Capability),
}

/// Checks that a process with effective uid `euid` and `sets` may use
/// `caps`; `spawns_ip`: whether it runs `ip` children that need them.
pub fn check(
    euid: u32,
    sets: &CapSets,
    caps: &[Capability],
    spawns_ip: bool,
) -> Result<(), Lacking> {
    for &cap in caps {
        if !sets.has(cap) {
            return Err(Lacking::Missing(cap));
        }
        // Only CAP_NET_ADMIN is needed by `ip`.
        if spawns_ip && euid != 0 && cap == Capability::NetAdmin && !sets.has_ambient(cap) {
            return Err(Lacking::NotAmbient(cap));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tesptun\nUid:\t65534\t65534\t65534\t65534\n\
        CapInh:\t0000000000003000\nCapPrm:\t0000000000003000\n\
        CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000003000\n";

    #[test]
    fn the_sets_are_read_from_proc_status() {
        let sets = CapSets::parse(STATUS).expect("parse");
        assert!(sets.has(Capability::NetAdmin) && sets.has(Capability::NetRaw));
        assert!(sets.has_ambient(Capability::NetAdmin));
        let none =
            CapSets::parse(&STATUS.replace("0000000000003000", "0000000000001000")).expect("parse");
        assert!(none.has(Capability::NetAdmin) && !none.has(Capability::NetRaw));
        assert_eq!(CapSets::parse("Name:\tx\n"), None);
        // This process's own sets are readable.
        assert!(CapSets::current().is_ok());
    }

    #[test]
    fn a_non_root_process_needs_its_net_admin_ambient() {
        let both = CapSets {
            effective: 0x3000,
            ambient: 0x3000,
        };
        let all = [Capability::NetAdmin, Capability::NetRaw];
        assert_eq!(check(65534, &both, &all, true), Ok(()));
        let effective_only = CapSets {
            effective: 0x3000,
            ambient: 0,
        };
        assert_eq!(
            check(65534, &effective_only, &all, true),
            Err(Lacking::NotAmbient(Capability::NetAdmin))
        );
        // Root's children keep what root has.
        assert_eq!(check(0, &effective_only, &all, true), Ok(()));
        let admin = CapSets {
            effective: 0x1000,
            ambient: 0x1000,
        };
        assert_eq!(
            check(65534, &admin, &all, true),
            Err(Lacking::Missing(Capability::NetRaw))
        );
        assert_eq!(check(65534, &admin, &all[..1], true), Ok(()));
        // Carrying hop-by-hop headers needs the same bit, named for why.
        assert_eq!(
            check(65534, &admin, &[Capability::NetRawForHopByHop], true),
            Err(Lacking::Missing(Capability::NetRawForHopByHop))
        );
        assert_eq!(
            check(65534, &both, &[Capability::NetRawForHopByHop], true),
            Ok(())
        );
        assert_eq!(
            Capability::NetRawForHopByHop.bit(),
            Capability::NetRaw.bit()
        );
        assert!(
            Capability::NetRawForHopByHop
                .purpose()
                .contains("ipv6_hop_by_hop")
        );
        // Root without the capability (a container's bounding set) lacks it.
        let nothing = CapSets {
            effective: 0,
            ambient: 0,
        };
        assert_eq!(
            check(0, &nothing, &all, true),
            Err(Lacking::Missing(Capability::NetAdmin))
        );
    }
}
