//! Named network namespaces driven through iproute2's `ip`, threads that
//! enter them with setns(2), and the two-host veth pair built from them.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use super::{LabError, is_root, unique_prefix};

/// Where `ip netns add` pins namespaces; `setns` needs a descriptor of one.
const NETNS_DIR: &str = "/run/netns";
/// An `ip` invocation that takes longer than this is wedged, not slow.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly created veth may take to report carrier.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(3);

fn ip_binary() -> &'static str {
    // The test harness and sudo may run with a PATH that lacks /usr/sbin.
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

/// Runs `ip args...`, bounded by `IP_TIMEOUT`.
fn run_ip(args: &[&str]) -> Result<Output, LabError> {
    let joined = args.join(" ");
    let ip = ip_binary();
    let mut child = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::IpSpawn {
            ip: ip.to_string(),
            args: joined.clone(),
            source,
        })?;
    // `ip` prints a few lines at most, far below the pipe buffer, so it
    // cannot block on output while we poll for its exit.
    let step = Duration::from_millis(2);
    let started = Instant::now();
    for _ in 0..(IP_TIMEOUT.as_millis() / step.as_millis()) {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|source| LabError::IpSpawn {
                        ip: ip.to_string(),
                        args: joined,
                        source,
                    });
            }
            Ok(None) if started.elapsed() < IP_TIMEOUT => std::thread::sleep(step),
            Ok(None) => break,
            Err(source) => {
                return Err(LabError::IpSpawn {
                    ip: ip.to_string(),
                    args: joined,
                    source,
                });
            }
        }
    }
    // Only our own `ip` child is killed, never anything in the namespace.
    let _ = child.kill();
    let _ = child.wait();
    Err(LabError::IpTimeout {
        args: joined,
        after: IP_TIMEOUT,
    })
}

/// Runs `ip args...` and turns a non-zero exit into an error carrying stderr.
fn ip_checked(args: &[&str]) -> Result<Output, LabError> {
    let out = run_ip(args)?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let joined = args.join(" ");
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(LabError::NeedsRoot {
            action: format!("`ip {joined}`"),
        });
    }
    Err(LabError::IpFailed {
        args: joined,
        status: out.status.to_string(),
        stderr,
    })
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Netns, LabError> {
        // The name becomes a file under /run/netns and an argument to `ip`.
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with(['-', '.'])
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            return Err(LabError::Invalid(format!(
                "namespace name {name:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with - or ."
            )));
        }
        if !is_root() {
            return Err(LabError::NeedsRoot {
                action: format!("creating network namespace {name}"),
            });
        }
        {
            // iproute2 turns /run/netns into a shared bind mount on first
            // use; two concurrent first uses can stack two mounts and hide
            // a namespace file under the upper one. Serializing our own adds
            // removes that race within this process.
            static ADD_LOCK: Mutex<()> = Mutex::new(());
            let _guard = ADD_LOCK
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            ip_checked(&["netns", "add", name]).map_err(|e| match e {
                LabError::IpFailed { stderr, .. } if stderr.contains("File exists") => {
                    LabError::Invalid(format!(
                        "network namespace {name} already exists (left over from a killed run?): \
                         remove it with `ip netns del {name}`"
                    ))
                }
                other => other,
            })?;
        }
        // From here on, drop deletes the namespace whatever fails next.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that pins the namespace; opening it yields a namespace fd.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec NAME program`: add arguments, then spawn or run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip_binary());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// `ip -n NAME args...`; on failure the error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<(), LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip_checked(&full).map(|_| ())
    }

    /// Like [`Netns::ip`], returning stdout.
    pub fn ip_output(&self, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = ip_checked(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn open(&self) -> Result<File, LabError> {
        let path = self.path();
        File::open(&path).map_err(|source| LabError::NetnsOpen {
            name: self.name.clone(),
            path,
            source,
        })
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    /// Borrows work (scoped thread); a panic in `f` becomes an error.
    pub fn run<F, R>(&self, f: F) -> Result<R, LabError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            let handle = self.spawn_scoped(s, f)?;
            join_scoped(handle)
        })
    }

    /// Runs `f` on a new thread of `scope` inside this namespace, for code
    /// that must run concurrently with code in another namespace. Collect
    /// the result with [`join_scoped`].
    pub fn spawn_scoped<'scope, 'env, F, R>(
        &self,
        scope: &'scope Scope<'scope, 'env>,
        f: F,
    ) -> Result<ScopedJoinHandle<'scope, Result<R, LabError>>, LabError>
    where
        F: FnOnce() -> R + Send + 'scope,
        R: Send + 'scope,
    {
        // Opened here so a missing namespace is reported before a thread
        // exists.
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn_scoped(scope, move || {
                enter(&file, &name)?;
                drop(file);
                Ok(f())
            })
            .map_err(|source| LabError::Thread {
                name: self.name.clone(),
                source,
            })
    }

    /// Runs `f` on a new thread inside this namespace, for `'static` work
    /// such as a server that outlives the caller's frame.
    /// Collect the result with [`join`].
    pub fn spawn<F, R>(&self, f: F) -> Result<JoinHandle<Result<R, LabError>>, LabError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter(&file, &name)?;
                drop(file);
                Ok(f())
            })
            .map_err(|source| LabError::Thread {
                name: self.name.clone(),
                source,
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting unpins the namespace; it goes away once the last socket
        // or thread in it is gone. Processes inside are left alone on
        // purpose: whoever started them owns them.
        if let Err(e) = ip_checked(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}; remove it with `ip netns del {}`",
                self.name, self.name
            );
        }
    }
}

/// Whether `name` has the shape [`TwoHosts`] gives its namespaces: the
/// [`unique_prefix`] (`e`, five pid digits, a counter, the tag) and `a` or
/// `b`.
pub fn is_lab_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() > 7
        && bytes.len() <= super::PREFIX_MAX + 1
        && bytes[0] == b'e'
        && bytes[1..7].iter().all(u8::is_ascii_digit)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && matches!(bytes[bytes.len() - 1], b'a' | b'b')
}

/// The name of the lab namespace this process runs in, or why it is not
/// in one: its network namespace (`/proc/self/ns/net`) must be the one
/// pinned under `/run/netns/NAME`, with NAME of the lab's shape
/// ([`is_lab_name`]). Used to keep lab-only behaviour (fault injection)
/// out of real deployments.
pub fn lab_namespace() -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;

    // thread-self: setns(2) moves one thread, and the lab's helpers run
    // code in a namespace on a thread of their own.
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| format!("cannot read /proc/thread-self/ns/net: {e}"))?;
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) => return Err(format!("no named network namespaces ({NETNS_DIR}: {e})")),
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // A namespace pinned by `ip netns add` is a bind mount of its nsfs
        // inode: the same device and inode as /proc/self/ns/net inside it.
        let same = std::fs::metadata(entry.path())
            .is_ok_and(|m| m.dev() == own.dev() && m.ino() == own.ino());
        if same {
            names.push(name);
        }
    }
    if let Some(name) = names.iter().find(|n| is_lab_name(n)) {
        return Ok(name.clone());
    }
    Err(match names.first() {
        Some(name) => format!("network namespace {name}, which the lab did not create"),
        None => "a network namespace with no name under /run/netns (the host's own?)".into(),
    })
}

/// Moves the calling thread into the namespace `file` refers to.
fn enter(file: &File, name: &str) -> Result<(), LabError> {
    // setns(2) changes only the calling thread's network namespace.
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|errno| LabError::Setns {
        name: name.to_string(),
        source: errno.into(),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Waits for a thread from [`Netns::spawn_scoped`]; a panic becomes an error.
pub fn join_scoped<R>(handle: ScopedJoinHandle<'_, Result<R, LabError>>) -> Result<R, LabError> {
    let name = handle
        .thread()
        .name()
        .and_then(|n| n.strip_prefix("netns-"))
        .unwrap_or("?")
        .to_string();
    handle.join().unwrap_or_else(|payload| {
        Err(LabError::Panicked {
            name,
            message: panic_message(payload.as_ref()),
        })
    })
}

/// Waits for a thread from [`Netns::spawn`]; a panic becomes an error.
pub fn join<R>(handle: JoinHandle<Result<R, LabError>>) -> Result<R, LabError> {
    let name = handle
        .thread()
        .name()
        .and_then(|n| n.strip_prefix("netns-"))
        .unwrap_or("?")
        .to_string();
    handle.join().unwrap_or_else(|payload| {
        Err(LabError::Panicked {
            name,
            message: panic_message(payload.as_ref()),
        })
    })
}

/// Two namespaces `a` and `b` joined by a veth pair, with one IPv4 and one
/// IPv6 address on each end. Dropping it deletes both namespaces, which
/// removes the veth pair with them.
#[derive(Debug)]
pub struct TwoHosts {
    pub a: Netns,
    pub b: Netns,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
    /// The veth end in `a`.
    pub veth_a: String,
    /// The veth end in `b`.
    pub veth_b: String,
    /// With [`TwoHosts::create_routed`]: the router between them.
    pub router: Option<Netns>,
}

impl TwoHosts {
    /// Builds the pair on 198.18.`subnet_index`.0/24 (a is .1, b is .2)
    /// and 2001:db8:`subnet_index`::/64 (a is ::1, b is ::2). Concurrent
    /// labs should use distinct `subnet_index` values for readable captures,
    /// though separate namespaces would not actually collide.
    pub fn create(tag: &str, subnet_index: u8) -> Result<TwoHosts, LabError> {
        let prefix = unique_prefix(tag);
        let a = Netns::create(&format!("{prefix}a"))?;
        let b = Netns::create(&format!("{prefix}b"))?;
        let hosts = TwoHosts {
            a,
            b,
            a_v4: Ipv4Addr::new(198, 18, subnet_index, 1),
            b_v4: Ipv4Addr::new(198, 18, subnet_index, 2),
            a_v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(subnet_index), 0, 0, 0, 0, 1),
            b_v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(subnet_index), 0, 0, 0, 0, 2),
            veth_a: format!("{prefix}va"),
            veth_b: format!("{prefix}vb"),
            router: None,
        };
        // Created in a and moved to b in one step, so neither end is ever
        // visible in the root namespace.
        hosts.a.ip(&[
            "link",
            "add",
            &hosts.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.veth_b,
            "netns",
            hosts.b.name(),
        ])?;
        for (ns, dev, v4, v6) in [
            (&hosts.a, &hosts.veth_a, hosts.a_v4, hosts.a_v6),
            (&hosts.b, &hosts.veth_b, hosts.b_v4, hosts.b_v6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            // nodad: usable at once instead of tentative for a second or so.
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for (ns, dev) in [(&hosts.a, &hosts.veth_a), (&hosts.b, &hosts.veth_b)] {
            wait_carrier(ns, dev)?;
        }
        Ok(hosts)
    }
}

impl TwoHosts {
    /// Three namespaces: `a` — router — `b`, with forwarding on in the
    /// router's namespace only, and the router's link to `b` at MTU
    /// `middle_mtu` (both ends, so neither drops what the other sends):
    /// packets from `a` larger than that meet a real router, which answers
    /// DF IPv4 packets with ICMP Fragmentation Needed and IPv6 ones with
    /// Packet Too Big. Addresses: a is 198.18.`subnet_index`.1/25 and
    /// 2001:db8:`subnet_index`::1/64, b is 198.18.`subnet_index`.130/25 and
    /// 2001:db8:`subnet_index`:1::2/64, the router .126/.254 and ::fe on
    /// each side; a and b route the other's subnet through the router.
    pub fn create_routed(
        tag: &str,
        subnet_index: u8,
        middle_mtu: u16,
    ) -> Result<TwoHosts, LabError> {
        let prefix = unique_prefix(tag);
        let s = u16::from(subnet_index);
        let a = Netns::create(&format!("{prefix}a"))?;
        let b = Netns::create(&format!("{prefix}b"))?;
        let router = Netns::create(&format!("{prefix}r"))?;
        let hosts = TwoHosts {
            a,
            b,
            a_v4: Ipv4Addr::new(198, 18, subnet_index, 1),
            b_v4: Ipv4Addr::new(198, 18, subnet_index, 130),
            a_v6: Ipv6Addr::new(0x2001, 0xdb8, s, 0, 0, 0, 0, 1),
            b_v6: Ipv6Addr::new(0x2001, 0xdb8, s, 1, 0, 0, 0, 2),
            veth_a: format!("{prefix}va"),
            veth_b: format!("{prefix}vb"),
            router: Some(router),
        };
        let Some(router) = &hosts.router else {
            unreachable!("set just above");
        };
        let (ra, rb) = (format!("{prefix}ra"), format!("{prefix}rb"));
        let r_a4 = Ipv4Addr::new(198, 18, subnet_index, 126);
        let r_b4 = Ipv4Addr::new(198, 18, subnet_index, 254);
        let r_a6 = Ipv6Addr::new(0x2001, 0xdb8, s, 0, 0, 0, 0, 0xfe);
        let r_b6 = Ipv6Addr::new(0x2001, 0xdb8, s, 1, 0, 0, 0, 0xfe);
        // Each pair is created in the router and its far end moved at once.
        for (host, dev, rdev) in [
            (&hosts.a, &hosts.veth_a, &ra),
            (&hosts.b, &hosts.veth_b, &rb),
        ] {
            router.ip(&[
                "link",
                "add",
                rdev,
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                host.name(),
            ])?;
        }
        let mtu = middle_mtu.to_string();
        for (ns, dev) in [(router, &rb), (&hosts.b, &hosts.veth_b)] {
            ns.ip(&["link", "set", dev, "mtu", &mtu])?;
        }
        for (ns, dev, v4, v6) in [
            (
                &hosts.a,
                &hosts.veth_a,
                format!("{}/25", hosts.a_v4),
                hosts.a_v6,
            ),
            (router, &ra, format!("{r_a4}/25"), r_a6),
            (router, &rb, format!("{r_b4}/25"), r_b6),
            (
                &hosts.b,
                &hosts.veth_b,
                format!("{}/25", hosts.b_v4),
                hosts.b_v6,
            ),
        ] {
            ns.ip(&["addr", "add", &v4, "dev", dev])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // Forwarding in the router's namespace only: the write goes
        // through a thread inside it, and /proc/sys/net is per namespace.
        router
            .run(|| -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            })?
            .map_err(|e| LabError::Invalid(format!("turning forwarding on in the router: {e}")))?;
        let (b_net4, a_net4) = (
            format!("198.18.{subnet_index}.128/25"),
            format!("198.18.{subnet_index}.0/25"),
        );
        let (b_net6, a_net6) = (
            format!("2001:db8:{s:x}:1::/64"),
            format!("2001:db8:{s:x}::/64"),
        );
        hosts
            .a
            .ip(&["route", "add", &b_net4, "via", &r_a4.to_string()])?;
        hosts
            .a
            .ip(&["-6", "route", "add", &b_net6, "via", &r_a6.to_string()])?;
        hosts
            .b
            .ip(&["route", "add", &a_net4, "via", &r_b4.to_string()])?;
        hosts
            .b
            .ip(&["-6", "route", "add", &a_net6, "via", &r_b6.to_string()])?;
        for (ns, dev) in [
            (&hosts.a, &hosts.veth_a),
            (&hosts.b, &hosts.veth_b),
            (router, &ra),
            (router, &rb),
        ] {
            wait_carrier(ns, dev)?;
        }
        Ok(hosts)
    }
}

/// Waits until `dev` reports carrier, so the first packet is not dropped.
fn wait_carrier(ns: &Netns, dev: &str) -> Result<(), LabError> {
    let step = Duration::from_millis(10);
    let started = Instant::now();
    let mut state = String::new();
    for _ in 0..(LINK_UP_TIMEOUT.as_millis() / step.as_millis()) {
        state = ns.ip_output(&["-o", "link", "show", "dev", dev])?;
        if state.contains("LOWER_UP") {
            return Ok(());
        }
        if started.elapsed() >= LINK_UP_TIMEOUT {
            break;
        }
        std::thread::sleep(step);
    }
    Err(LabError::LinkDown {
        name: ns.name().to_string(),
        dev: dev.to_string(),
        after: LINK_UP_TIMEOUT,
        state: state.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::have_root;

    fn netns_names() -> String {
        let out = run_ip(&["netns", "list"]).expect("ip netns list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn listed(names: &str, ns: &str) -> bool {
        names
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
    }

    #[test]
    fn lab_names_are_recognised_and_others_are_not() {
        let prefix = unique_prefix("demo");
        for side in ["a", "b"] {
            assert!(is_lab_name(&format!("{prefix}{side}")), "{prefix}{side}");
        }
        for other in [
            "",
            "ea",
            "e1234a",
            "eabcdefa",
            "prod",
            "e123450democ",
            "E123450a",
        ] {
            assert!(!is_lab_name(other), "{other}");
        }
    }

    #[test]
    fn only_a_lab_namespace_counts_as_one() {
        if !have_root() {
            return;
        }
        let hosts = TwoHosts::create("ident", 201).expect("lab");
        let inside = hosts.a.run(lab_namespace).expect("run");
        assert_eq!(inside.as_deref(), Ok(hosts.a.name()));
        // A namespace with another name is not the lab's.
        let other = Netns::create(&format!("{}-prod", unique_prefix("x"))).expect("netns");
        let why = other
            .run(lab_namespace)
            .expect("run")
            .expect_err("not a lab");
        assert!(why.contains(other.name()), "{why}");
        assert!(lab_namespace().is_err(), "the test's own namespace");
    }

    #[test]
    fn panic_inside_namespace_is_an_error() {
        if !have_root() {
            return;
        }
        let ns = Netns::create(&format!("{}p", unique_prefix("panic"))).expect("netns");
        let r: Result<(), _> = ns.run(|| panic!("deliberate"));
        match r {
            Err(LabError::Panicked { name, message }) => {
                assert_eq!(name, ns.name());
                assert!(message.contains("deliberate"), "{message}");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        let h = ns.spawn(|| 7).expect("spawn");
        assert_eq!(join(h).expect("join"), 7);
    }

    #[test]
    fn command_and_ip_act_inside_the_namespace() {
        if !have_root() {
            return;
        }
        let ns = Netns::create(&format!("{}x", unique_prefix("cmd"))).expect("netns");
        let out = ns
            .command(ip_binary())
            .args(["-o", "link", "show"])
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{out:?}");
        let links = String::from_utf8_lossy(&out.stdout);
        // A fresh namespace holds only its loopback, which create brought up.
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");
        match ns.ip(&["link", "set", "nosuchdev", "up"]) {
            Err(LabError::IpFailed { stderr, .. }) => assert!(!stderr.is_empty()),
            other => panic!("expected IpFailed with stderr, got {other:?}"),
        }
        assert!(matches!(
            Netns::create(ns.name()),
            Err(LabError::Invalid(m)) if m.contains("already exists")
        ));
        assert!(matches!(Netns::create("../x"), Err(LabError::Invalid(_))));
    }

    #[test]
    fn drop_removes_namespaces_even_when_unwinding() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("drop", 244).expect("lab");
        let names = [lab.a.name().to_string(), lab.b.name().to_string()];
        let before = netns_names();
        assert!(names.iter().all(|n| listed(&before, n)), "{before}");
        drop(lab);
        let after = netns_names();
        assert!(!names.iter().any(|n| listed(&after, n)), "{after}");

        let mut names = Vec::new();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let lab = TwoHosts::create("unwind", 245).expect("lab");
            names.push(lab.a.name().to_string());
            names.push(lab.b.name().to_string());
            panic!("deliberate, to test cleanup while unwinding");
        }));
        assert!(unwound.is_err());
        let after = netns_names();
        assert_eq!(names.len(), 2);
        assert!(!names.iter().any(|n| listed(&after, n)), "{after}");
    }

    #[test]
    fn a_routed_lab_forwards_in_the_router_only_over_a_small_link() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create_routed("route", 247, 1280).expect("lab");
        let router = lab.router.as_ref().expect("a router");
        let forwarding = |ns: &Netns| {
            ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default())
                .expect("run")
        };
        assert_eq!(forwarding(router).trim(), "1");
        assert_eq!(forwarding(&lab.a).trim(), "0");
        assert_eq!(forwarding(&lab.b).trim(), "0");
        let b_link = lab
            .b
            .ip_output(&["-o", "link", "show", "dev", &lab.veth_b])
            .expect("link");
        assert!(b_link.contains("mtu 1280"), "{b_link}");
        let a_link = lab
            .a
            .ip_output(&["-o", "link", "show", "dev", &lab.veth_a])
            .expect("link");
        assert!(a_link.contains("mtu 1500"), "{a_link}");
        // a reaches b through the router, in both versions.
        for (dst, family) in [(lab.b_v4.to_string(), "-4"), (lab.b_v6.to_string(), "-6")] {
            let route = lab
                .a
                .ip_output(&[family, "route", "get", &dst])
                .expect("route");
            assert!(route.contains(" via "), "{route}");
        }
        let names = [router.name().to_string()];
        drop(lab);
        let after = netns_names();
        assert!(!names.iter().any(|n| listed(&after, n)), "{after}");
    }

    #[test]
    fn nothing_appears_in_the_root_namespace() {
        if !have_root() {
            return;
        }
        let lab = TwoHosts::create("root", 246).expect("lab");
        let out = run_ip(&["-o", "link", "show"]).expect("ip link");
        let links = String::from_utf8_lossy(&out.stdout);
        assert!(
            !links.contains(&lab.veth_a) && !links.contains(&lab.veth_b),
            "{links}"
        );
    }
}
