//! Brings the TUN interface all the way up, and takes down what it added.
//!
//! Through iproute2's `ip`, as wg-quick does: addresses, routes and rules
//! are a handful of one-time operations where a netlink client would be
//! more code than the datapath it serves. Every change that outlives the
//! TUN device (policy rules) is undone on drop; addresses and routes on
//! the device go with it when its file descriptor closes.
//!
//! Routing: the routes to the peers' inner addresses live in their own
//! table, consulted by a rule for every packet *not* carrying the daemon's
//! firewall mark. The daemon marks its outer sockets, so in classic
//! transport mode (inner address == outer endpoint) its own ESP packets
//! take the main table to the wire instead of looping back into the TUN.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use crate::config::Valid;

/// Where the rules sit: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 32000;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run `ip` (iproute2): {0}; install iproute2")]
    Spawn(std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error(
        "routing table {table} already holds routes ({routes}): another esptun with fwmark \
         {table:#x} is running; give each instance its own fwmark"
    )]
    TableInUse { table: u32, routes: String },
}

/// The interface configuration this daemon made, undone on drop.
#[derive(Debug)]
pub struct NetConfig {
    undo: Vec<Vec<String>>,
}

fn ip(args: &[String]) -> Result<(), NetError> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[String]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn host_prefix(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Packets the TUN device queues for the outbound thread.
const TUN_QUEUE_LEN: u32 = 5000;

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "-4" } else { "-6" }
}

impl NetConfig {
    /// MTU, link up, overlay addresses, routes to every peer's inner
    /// address, and the policy rules; on error, whatever was done is undone.
    pub fn apply(config: &Valid, interface: &str) -> Result<NetConfig, NetError> {
        let mut net = NetConfig { undo: Vec::new() };
        let mtu = config.interface.mtu.to_string();
        // The TUN queue holds what the kernel hands over while the outbound
        // thread seals the previous batch; the default 500 packets drops
        // under one TCP stream (the kernel's TX drops on the device).
        let queue = TUN_QUEUE_LEN.to_string();
        ip(&args(&[
            "link",
            "set",
            "dev",
            interface,
            "mtu",
            &mtu,
            "txqueuelen",
            &queue,
            "up",
        ]))?;

        // Overlay inner addresses are the TUN's own; classic ones already
        // belong to the outer interface.
        let overlay: BTreeSet<IpAddr> = config
            .peer_addrs()
            .iter()
            .filter(|p| p.inner_local != p.local)
            .map(|p| p.inner_local)
            .collect();
        for addr in &overlay {
            let mut a = args(&[
                family(*addr),
                "addr",
                "add",
                &host_prefix(*addr),
                "dev",
                interface,
            ]);
            if addr.is_ipv6() {
                a.push("nodad".into());
            }
            ip(&a)?;
        }

        let table = config.outer.fwmark.to_string();
        let mark = format!("{:#x}", config.outer.fwmark);
        let priority = RULE_PRIORITY.to_string();
        let families: BTreeSet<&str> = config
            .peer_addrs()
            .iter()
            .map(|p| family(p.inner_remote))
            .collect();
        for fam in families {
            // Routes in the table outlive only a live owner (a dead one's
            // vanished with its TUN device), so they mean a second instance.
            let routes = match ip_output(&args(&[fam, "route", "show", "table", &table])) {
                Err(NetError::Failed { stderr, .. }) if stderr.contains("does not exist") => {
                    String::new()
                }
                other => other?,
            };
            if !routes.trim().is_empty() {
                return Err(NetError::TableInUse {
                    table: config.outer.fwmark,
                    routes: routes.trim().replace('\n', "; "),
                });
            }
            let rule = |verb: &str| {
                args(&[
                    fam, "rule", verb, "not", "fwmark", &mark, "table", &table, "priority",
                    &priority,
                ])
            };
            // A rule left behind by a killed instance would be duplicated.
            for _ in 0..16 {
                if ip(&rule("del")).is_err() {
                    break;
                }
            }
            ip(&rule("add"))?;
            net.undo.push(rule("del"));
        }
        for peer in &config.peer_addrs() {
            ip(&args(&[
                family(peer.inner_remote),
                "route",
                "replace",
                &host_prefix(peer.inner_remote),
                "dev",
                interface,
                "src",
                &peer.inner_local.to_string(),
                "table",
                &table,
            ]))?;
        }
        Ok(net)
    }
}

impl Drop for NetConfig {
    fn drop(&mut self) {
        for a in self.undo.drain(..).rev() {
            if let Err(e) = ip(&a) {
                tracing::warn!("cleanup: {e}");
            }
        }
    }
}
