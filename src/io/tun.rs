//! The TUN device, through the kernel's ioctl interface directly
//! (Documentation/networking/tuntap.rst) rather than a crate, so that it
//! can take the virtio-net header (IFF_VNET_HDR) and offloads
//! (TUNSETOFFLOAD): with them the kernel hands over TCP/UDP super-packets
//! of up to 64 KiB (TSO/USO) and packets whose checksum is left for us to
//! fill in (NEEDS_CSUM), and takes coalesced ones back.
//!
//! The device is not made persistent (no TUNSETPERSIST): it disappears
//! when the fd closes, which is our cleanup, also after a crash.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{IoSetupError, last_errno};
use crate::packet::{PacketBuf, VNET_HDR_LEN};

/// Longest interface name: IFNAMSIZ (16) less the terminating NUL
/// (include/uapi/linux/if.h).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Bytes of overflow space behind each read: a read that reaches into it
/// was longer than the buffer (see [`Tun::read_batch`]).
const OVERFLOW_PROBE: usize = 64;

/// Offloads a TUN device can be asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// NEEDS_CSUM packets: the kernel leaves the transport checksum to us
    /// (TUN_F_CSUM). Needed by the two below.
    pub csum: bool,
    /// TCP super-packets (TUN_F_TSO4 | TUN_F_TSO6).
    pub tso: bool,
    /// UDP super-packets (TUN_F_USO4 | TUN_F_USO6, Linux 6.2 and later).
    pub uso: bool,
}

impl TunOffloads {
    pub const NONE: TunOffloads = TunOffloads {
        csum: false,
        tso: false,
        uso: false,
    };

    /// Whether the device has the virtio-net header at all.
    pub fn any(self) -> bool {
        self.csum || self.tso || self.uso
    }

    fn flags(self) -> libc::c_uint {
        let mut f = 0;
        if self.csum || self.tso || self.uso {
            f |= libc::TUN_F_CSUM;
        }
        if self.tso {
            f |= libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        }
        if self.uso {
            f |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
        }
        f
    }
}

/// An open TUN interface (IFF_TUN | IFF_NO_PI: reads and writes are bare
/// IP packets, no packet-information prefix), with IFF_VNET_HDR when
/// offloads are on: then every read and write carries a virtio-net header
/// first.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    /// IFF_VNET_HDR: every read and write starts with the header.
    vnet: bool,
    offloads: TunOffloads,
}

impl Tun {
    /// Creates the TUN interface `name` (or attaches to an existing
    /// persistent one that no process holds); an empty name lets the
    /// kernel pick `tunN`.
    /// The fd is non-blocking and close-on-exec. The interface is down
    /// and has no addresses: configuring it is the caller's business.
    pub fn create(name: &str) -> Result<Tun, IoSetupError> {
        Self::create_with(name, TunOffloads::NONE)
    }

    /// [`Self::create`] with the virtio-net header and as many of `want`'s
    /// offloads as the kernel accepts (USO needs Linux 6.2; without it TSO
    /// alone is tried, then checksum offload alone). [`Self::offloads`]
    /// says what was granted.
    pub fn create_with(name: &str, want: TunOffloads) -> Result<Tun, IoSetupError> {
        check_name(name)?;

        // O_NONBLOCK: reads return EAGAIN instead of blocking, so a batch
        // read drains what is queued and stops. std adds O_CLOEXEC itself.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                    IoSetupError::TunDeviceMissing(e)
                }
                Some(libc::EACCES) | Some(libc::EPERM) => IoSetupError::TunPermission(e),
                _ => IoSetupError::Tun {
                    name: name.to_owned(),
                    source: e,
                },
            })?;
        let fd = OwnedFd::from(file);

        // SAFETY: ifreq is plain old data (a byte array and a union of
        // integers, sockaddrs and a pointer); all-zero is a valid value
        // and is what the kernel expects in the fields we do not set.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if want.any() {
            flags |= libc::IFF_VNET_HDR;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;

        // SAFETY: `fd` is an open /dev/net/tun descriptor, and TUNSETIFF
        // reads and writes one `struct ifreq`, which `req` is, exclusively
        // borrowed for the call. `ifr_name` is NUL-terminated: the name
        // was checked to be at most IFNAMSIZ - 1 bytes and the rest is 0.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let (e, code) = last_errno();
            return Err(match code {
                libc::EPERM | libc::EACCES => IoSetupError::TunPermission(e),
                // EBUSY: another fd has it attached; EINVAL: a name of
                // another device type (tun.c's tun_set_iff).
                libc::EBUSY | libc::EINVAL => IoSetupError::TunBusy {
                    name: name.to_owned(),
                    source: e,
                },
                _ => IoSetupError::Tun {
                    name: name.to_owned(),
                    source: e,
                },
            });
        }

        // The kernel writes back the actual name (e.g. for "" or "tun%d").
        let len = req
            .ifr_name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(req.ifr_name.len());
        let actual: Vec<u8> = req.ifr_name[..len].iter().map(|&c| c as u8).collect();
        let name = String::from_utf8_lossy(&actual).into_owned();
        let mut offloads = TunOffloads::NONE;
        if want.any() {
            // Most first; a kernel that refuses a flag refuses the call.
            let tries = [
                want,
                TunOffloads { uso: false, ..want },
                TunOffloads {
                    csum: true,
                    ..TunOffloads::NONE
                },
            ];
            for attempt in tries {
                if attempt.any() && set_offload(&fd, attempt.flags()).is_ok() {
                    offloads = attempt;
                    break;
                }
            }
            if !offloads.any() {
                // The header stays (IFF_VNET_HDR is fixed at creation):
                // every packet then carries an all-zero one.
                let _ = set_offload(&fd, 0);
            }
        }
        Ok(Tun {
            fd,
            name,
            vnet: want.any(),
            offloads,
        })
    }

    /// The offloads in force (all off without the virtio-net header).
    pub fn offloads(&self) -> TunOffloads {
        self.offloads
    }

    /// Whether every read and write carries a virtio-net header.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads queued packets, one per read(2), into `bufs` in order, until
    /// the queue is empty (EAGAIN) or every buffer holds one; returns how
    /// many buffers were filled. EINTR is retried.
    ///
    /// A packet longer than a buffer is never silently cut: each read has
    /// a little overflow space behind the buffer, and a read that reaches
    /// into it leaves that buffer at length 0 (it still counts, so the
    /// caller sees an empty packet and counts the drop). The TUN MTU keeps
    /// this from happening when the buffers are sized for it.
    ///
    /// An error after at least one packet ends the batch early and is
    /// returned by the next call, which hits it again.
    pub fn read_batch(&self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let mut probe = [0u8; OVERFLOW_PROBE];
        let mut filled = 0;
        for buf in bufs.iter_mut() {
            let mut vnet = [0u8; VNET_HDR_LEN];
            let area = buf.read_area();
            let area_len = area.len();
            let vnet_iov = libc::iovec {
                iov_base: vnet.as_mut_ptr().cast(),
                iov_len: VNET_HDR_LEN,
            };
            let iov = [
                vnet_iov,
                libc::iovec {
                    iov_base: area.as_mut_ptr().cast(),
                    iov_len: area_len,
                },
                libc::iovec {
                    iov_base: probe.as_mut_ptr().cast(),
                    iov_len: probe.len(),
                },
            ];
            // Without the virtio-net header the read starts at the packet.
            let (iov, head) = if self.vnet {
                (&iov[..], VNET_HDR_LEN)
            } else {
                (&iov[1..], 0)
            };
            let n = loop {
                // SAFETY: every iovec describes a live, exclusively
                // borrowed byte buffer of the stated length (`vnet` and
                // `probe` on the stack, `area` from `buf`), and readv(2)
                // writes only within them.
                let rc = unsafe {
                    libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
                };
                if rc >= 0 {
                    break Some(rc as usize);
                }
                let (e, code) = last_errno();
                match code {
                    libc::EINTR => continue,
                    libc::EAGAIN => break None,
                    _ if filled > 0 => break None,
                    _ => return Err(e),
                }
            };
            match n {
                // A read shorter than the header is not a packet.
                Some(n) if n < head || n - head > area_len => buf.set_len(0),
                Some(n) => buf.set_len(n - head),
                None => break,
            }
            buf.meta.vnet = vnet;
            filled += 1;
        }
        Ok(filled)
    }

    /// Writes one IP packet after the virtio-net header `vnet` (one
    /// writev(2), which the kernel takes whole or not at all); without the
    /// header the `vnet` bytes are not written. EINTR is retried.
    ///
    /// What the header claims is what the kernel trusts: NEEDS_CSUM over a
    /// coalesced packet means the kernel never checks its checksum again
    /// (virtio_net_hdr_to_skb), so only validated segments may go out that
    /// way.
    pub fn write_with_header(&self, vnet: &[u8; VNET_HDR_LEN], packet: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                // writev only reads through these pointers.
                iov_base: vnet.as_ptr().cast_mut().cast(),
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: packet.as_ptr().cast_mut().cast(),
                iov_len: packet.len(),
            },
        ];
        let (iov, total) = if self.vnet {
            (&iov[..], VNET_HDR_LEN + packet.len())
        } else {
            (&iov[1..], packet.len())
        };
        loop {
            // SAFETY: the iovecs describe live byte slices of the stated
            // lengths (`vnet` and `packet`), which writev(2) only reads.
            let rc = unsafe {
                libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
            };
            if rc >= 0 {
                if rc as usize != total {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("TUN took {rc} of {total} bytes"),
                    ));
                }
                return Ok(());
            }
            let (e, code) = last_errno();
            if code != libc::EINTR {
                return Err(e);
            }
        }
    }

    /// Writes one IP packet with no offload claims (an all-zero virtio-net
    /// header when the device has one: the kernel checks it as any other).
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        self.write_with_header(&[0; VNET_HDR_LEN], packet)
    }
}

/// TUNSETOFFLOAD with `flags` (TUN_F_*).
fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: `fd` is an open TUN descriptor; TUNSETOFFLOAD takes its
    // argument by value (an unsigned int of flags), no pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Refuses names the kernel would refuse (net/core/dev.c dev_valid_name:
/// too long, "/", ":" or whitespace), with a message that says so, rather
/// than an EINVAL from the ioctl. NUL would cut the name short.
fn check_name(name: &str) -> Result<(), IoSetupError> {
    if name.len() > MAX_NAME_LEN {
        return Err(IoSetupError::TunNameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    let bad = |c: char| c == '\0' || c == '/' || c == ':' || c.is_whitespace();
    if name.contains(bad) || name == "." || name == ".." {
        return Err(IoSetupError::TunNameInvalid {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testns::{NetNs, have_root};
    use super::*;
    use crate::wire::inner::build;
    use crate::wire::ip::protocol;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn long_name_is_refused_before_any_syscall() {
        let e = Tun::create("esptun-sixteen-b").expect_err("16 bytes");
        assert!(
            matches!(e, IoSetupError::TunNameTooLong { len: 16, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("at most 15"), "{e}");
        for bad in ["a/b", "a b", "a:b", ".."] {
            let e = Tun::create(bad).expect_err(bad);
            assert!(
                matches!(e, IoSetupError::TunNameInvalid { .. }),
                "{bad}: {e}"
            );
        }
    }

    /// Waits until `tun` has something to read (the kernel queues packets
    /// asynchronously after the socket send returns).
    fn wait_readable(fd: BorrowedFd<'_>) {
        let r = super::super::poll_readable(&[fd], Duration::from_secs(2)).expect("poll");
        assert!(r.is_ready(0), "nothing arrived within 2 s");
    }

    /// Reads until a packet of `proto` turns up (the kernel may also send
    /// IPv6 router solicitations or MLD reports down a fresh interface).
    fn read_ipv4_packet(tun: &Tun, bufs: &mut [PacketBuf], proto: u8) -> Vec<u8> {
        for _ in 0..20 {
            wait_readable(tun.as_fd());
            let n = tun.read_batch(bufs).expect("read_batch");
            for b in &bufs[..n] {
                let p = b.data();
                if p.len() >= 20 && p[0] >> 4 == 4 && p[9] == proto {
                    return p.to_vec();
                }
            }
        }
        panic!("no IPv4 packet of protocol {proto} came out of the TUN");
    }

    fn setup(ns: &NetNs, name: &str) {
        ns.ip(&["addr", "add", "198.18.77.1/24", "dev", name]);
        ns.ip(&["link", "set", name, "up"]);
    }

    #[test]
    fn udp_sent_into_the_tun_subnet_is_read_as_ipv4() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        let tun = ns.run(|| Tun::create("esptun-t0").expect("create TUN"));
        assert_eq!(tun.name(), "esptun-t0");
        setup(&ns, "esptun-t0");
        let sock = ns.run(|| UdpSocket::bind("198.18.77.1:0").expect("bind"));
        let src_port = sock.local_addr().expect("addr").port();

        sock.send_to(b"through the tun", "198.18.77.2:9")
            .expect("send");
        let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(2048)).collect();
        let p = read_ipv4_packet(&tun, &mut bufs, protocol::UDP);
        assert_eq!(&p[12..16], &[198, 18, 77, 1], "source");
        assert_eq!(&p[16..20], &[198, 18, 77, 2], "destination");
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let udp = &p[ihl..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), src_port);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 9);
        assert_eq!(&udp[8..], b"through the tun");
        drop(tun);
    }

    #[test]
    fn offloads_hand_over_partial_checksums_and_udp_super_packets() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        let want = TunOffloads {
            csum: true,
            tso: true,
            uso: true,
        };
        let tun = ns.run(|| Tun::create_with("esptun-t5", want).expect("create TUN"));
        assert!(tun.has_vnet_hdr());
        assert!(
            tun.offloads().csum && tun.offloads().tso,
            "{:?}",
            tun.offloads()
        );
        setup(&ns, "esptun-t5");
        let sock = ns.run(|| UdpSocket::bind("198.18.77.1:0").expect("bind"));
        let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(65535)).collect();

        // A plain datagram: its checksum is left to us (NEEDS_CSUM), at
        // the UDP checksum field (csum_start = IP header, offset 6).
        sock.send_to(b"partial checksum", "198.18.77.2:9")
            .expect("send");
        let vnet = read_vnet_packet(&tun, &mut bufs, protocol::UDP, 16);
        assert_eq!(vnet[0] & 1, 1, "NEEDS_CSUM: {vnet:?}");
        assert_eq!(vnet[1], 0, "not GSO");
        assert_eq!(u16::from_le_bytes([vnet[6], vnet[7]]), 20, "csum_start");
        assert_eq!(u16::from_le_bytes([vnet[8], vnet[9]]), 6, "csum_offset");

        if !tun.offloads().uso {
            crate::testutil::skipped("USO part: this kernel refused TUN_F_USO4/6");
            return;
        }
        // A UDP GSO send (5 x 1000 bytes) arrives as one super-packet.
        let size: libc::c_int = 1000;
        // SAFETY: the option value is a live c_int whose size is passed;
        // setsockopt(2) only reads it.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT: {}", io::Error::last_os_error());
        sock.send_to(&[0x5a; 5000], "198.18.77.2:9").expect("send");
        let vnet = read_vnet_packet(&tun, &mut bufs, protocol::UDP, 5000);
        assert_eq!(vnet[1], 5, "GSO_UDP_L4: {vnet:?}");
        assert_eq!(u16::from_le_bytes([vnet[4], vnet[5]]), 1000, "gso_size");
        drop(tun);
    }

    /// The virtio-net header of the first IPv4 packet of `proto` with
    /// `payload` transport payload bytes.
    fn read_vnet_packet(
        tun: &Tun,
        bufs: &mut [PacketBuf],
        proto: u8,
        payload: usize,
    ) -> [u8; VNET_HDR_LEN] {
        for _ in 0..20 {
            wait_readable(tun.as_fd());
            let n = tun.read_batch(bufs).expect("read_batch");
            for b in &bufs[..n] {
                let p = b.data();
                if p.len() == 28 + payload && p[0] >> 4 == 4 && p[9] == proto {
                    return b.meta.vnet;
                }
            }
        }
        panic!("no IPv4 packet of protocol {proto} and {payload} bytes came out of the TUN");
    }

    #[test]
    fn packet_written_into_the_tun_reaches_a_socket() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        let tun = ns.run(|| Tun::create("esptun-t1").expect("create TUN"));
        setup(&ns, "esptun-t1");
        let sock = ns.run(|| UdpSocket::bind("198.18.77.1:53").expect("bind"));
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");

        // build::ipv4 uses source port 40000 and destination port 53.
        let packet = build::ipv4(
            [198, 18, 77, 2],
            [198, 18, 77, 1],
            protocol::UDP,
            b"from the tun",
        );
        tun.write(&packet).expect("write");

        let mut got = [0u8; 64];
        let (n, from) = sock.recv_from(&mut got).expect("recv");
        assert_eq!(&got[..n], b"from the tun");
        assert_eq!(from, "198.18.77.2:40000".parse().expect("addr"));
    }

    #[test]
    fn oversize_read_is_an_empty_packet_not_a_cut_one() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        let tun = ns.run(|| Tun::create("esptun-t2").expect("create TUN"));
        setup(&ns, "esptun-t2");
        let sock = ns.run(|| UdpSocket::bind("198.18.77.1:0").expect("bind"));
        sock.send_to(&[7u8; 1000], "198.18.77.2:9").expect("send");
        sock.send_to(&[8u8; 10], "198.18.77.2:9").expect("send");

        // 200-byte buffers: the 1028-byte packet does not fit.
        let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(200)).collect();
        let mut lens = Vec::new();
        for _ in 0..20 {
            wait_readable(tun.as_fd());
            let n = tun.read_batch(&mut bufs).expect("read_batch");
            for b in &bufs[..n] {
                let p = b.data();
                // Keep the empty entries and our small UDP packet; skip
                // the kernel's own IPv6 chatter.
                if p.is_empty() || (p[0] >> 4 == 4 && p[9] == protocol::UDP) {
                    lens.push(p.len());
                }
            }
            if lens.len() >= 2 {
                break;
            }
        }
        assert_eq!(lens, vec![0, 20 + 8 + 10]);
    }

    #[test]
    fn read_on_an_empty_queue_returns_zero() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        // Down, so the kernel sends nothing into it.
        let tun = ns.run(|| Tun::create("").expect("create TUN"));
        assert!(tun.name().starts_with("tun"), "{}", tun.name());
        let mut bufs: Vec<PacketBuf> = (0..2).map(|_| PacketBuf::new(1500)).collect();
        // Non-blocking: an empty queue is 0 packets, not a wait.
        assert_eq!(tun.read_batch(&mut bufs).expect("read_batch"), 0);
    }

    #[test]
    fn a_name_in_use_is_refused_with_advice() {
        if !have_root() {
            return;
        }
        let ns = NetNs::new();
        ns.run(|| {
            let _first = Tun::create("esptun-t3").expect("create TUN");
            let e = Tun::create("esptun-t3").expect_err("second");
            assert!(matches!(e, IoSetupError::TunBusy { .. }), "{e:?}");
            assert!(e.to_string().contains("set another `interface`"), "{e}");
        });
    }
}
