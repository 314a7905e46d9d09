//! The virtio-net header (`struct virtio_net_hdr`, Linux
//! `include/uapi/linux/virtio_net.h`) that a TUN device opened with
//! `IFF_VNET_HDR` puts in front of every packet, both ways.
//!
//! esptun keeps the default header size (`TUNSETVNETHDRSZ` left at 10
//! bytes: no `num_buffers`, no hash report), so every `read()` from the TUN
//! starts with [`VIRTIO_NET_HDR_LEN`] bytes of this header and every
//! `write()` must start with one. The fields are in the device's "virtio
//! endianness": little-endian on every host esptun runs on (x86-64,
//! aarch64); a big-endian host would have to ask for it with
//! `TUNSETVNETLE`, which this module assumes.
//!
//! On a read, [`flags::DATA_VALID`] means the kernel already trusts the
//! checksum; esptun ignores it and validates anyway. What the other fields
//! mean for splitting and coalescing is `wire::gso`'s business; this
//! module only parses and emits the ten bytes.

/// Bytes of the header esptun reads and writes (`sizeof(struct
/// virtio_net_hdr)`, the `TUNSETVNETHDRSZ` default).
pub const VIRTIO_NET_HDR_LEN: usize = 10;

/// `virtio_net_hdr.flags` bits.
pub mod flags {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
    /// csum_offset` holds only the pseudo-header sum (the kernel's
    /// `CHECKSUM_PARTIAL`); whoever sends the bytes on must finish it.
    pub const NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was already verified
    /// (`CHECKSUM_UNNECESSARY`). esptun never sets it.
    pub const DATA_VALID: u8 = 2;
}

/// `virtio_net_hdr.gso_type` values.
pub mod gso_type {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    /// UFO (IP fragmentation of one big UDP datagram): esptun never
    /// enables it (`TUN_F_UFO`), so it never arrives.
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    /// USO (`TUN_F_USO4`/`TUN_F_USO6`, Linux 6.2): UDP segmentation,
    /// each segment a datagram of its own.
    pub const UDP_L4: u8 = 5;
    /// Flag: the TCP super-packet had CWR set (`SKB_GSO_TCP_ECN`).
    pub const ECN: u8 = 0x80;
}

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
}

/// Why a virtio-net header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    #[error("buffer shorter than the 10-byte virtio-net header")]
    Truncated,
    #[error("unknown virtio-net GSO type {0:#04x}")]
    GsoType(u8),
}

/// What kind of segmentation a header asks for, the ECN flag aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    None,
    TcpV4,
    TcpV6,
    /// Legacy UFO; recognised only to be refused by name.
    Udp,
    UdpL4,
}

impl GsoType {
    /// The raw value without the ECN flag.
    pub fn raw(self) -> u8 {
        match self {
            GsoType::None => gso_type::NONE,
            GsoType::TcpV4 => gso_type::TCPV4,
            GsoType::TcpV6 => gso_type::TCPV6,
            GsoType::Udp => gso_type::UDP,
            GsoType::UdpL4 => gso_type::UDP_L4,
        }
    }
}

/// `struct virtio_net_hdr`, fields in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers to copy in front of every segment. The kernel
    /// may report the whole first packet here on a forwarded skb
    /// (wireguard-go `handleVirtioRead`), so `wire::gso` derives the
    /// header length from the packet and uses this only as a bound.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start` (16 TCP, 6 UDP).
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Parses the first [`VIRTIO_NET_HDR_LEN`] bytes of `bytes`. Every bit
    /// pattern is a header; what it asks for is checked by its users.
    pub fn parse(bytes: &[u8]) -> Result<Self, VnetError> {
        let b = bytes
            .get(..VIRTIO_NET_HDR_LEN)
            .ok_or(VnetError::Truncated)?;
        let le16 = |r: std::ops::Range<usize>| u16::from_le_bytes([b[r.start], b[r.start + 1]]);
        Ok(VirtioNetHdr {
            flags: b[field::FLAGS],
            gso_type: b[field::GSO_TYPE],
            hdr_len: le16(field::HDR_LEN),
            gso_size: le16(field::GSO_SIZE),
            csum_start: le16(field::CSUM_START),
            csum_offset: le16(field::CSUM_OFFSET),
        })
    }

    /// Writes the header into the first [`VIRTIO_NET_HDR_LEN`] bytes of
    /// `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<(), VnetError> {
        let out = out
            .get_mut(..VIRTIO_NET_HDR_LEN)
            .ok_or(VnetError::Truncated)?;
        out.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    pub fn to_bytes(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[field::FLAGS] = self.flags;
        b[field::GSO_TYPE] = self.gso_type;
        b[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_le_bytes());
        b[field::CSUM_START].copy_from_slice(&self.csum_start.to_le_bytes());
        b[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & flags::NEEDS_CSUM != 0
    }

    /// Whether the ECN flag is set on the GSO type.
    pub fn ecn(&self) -> bool {
        self.gso_type & gso_type::ECN != 0
    }

    /// The GSO type without the ECN flag.
    pub fn gso(&self) -> Result<GsoType, VnetError> {
        match self.gso_type & !gso_type::ECN {
            gso_type::NONE => Ok(GsoType::None),
            gso_type::TCPV4 => Ok(GsoType::TcpV4),
            gso_type::TCPV6 => Ok(GsoType::TcpV6),
            gso_type::UDP => Ok(GsoType::Udp),
            gso_type::UDP_L4 => Ok(GsoType::UdpL4),
            _ => Err(VnetError::GsoType(self.gso_type)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_emits_little_endian_fields() {
        // A TSO/IPv4 header as the kernel hands it over: NEEDS_CSUM, TCPV4,
        // hdr_len 54 (0x36), gso_size 1448 (0x5a8), csum_start 20,
        // csum_offset 16.
        let bytes = [0x01, 0x01, 0x36, 0x00, 0xa8, 0x05, 0x14, 0x00, 0x10, 0x00];
        let hdr = VirtioNetHdr::parse(&bytes).expect("ten bytes");
        assert_eq!(
            hdr,
            VirtioNetHdr {
                flags: flags::NEEDS_CSUM,
                gso_type: gso_type::TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert!(hdr.needs_csum() && !hdr.ecn());
        assert_eq!(hdr.gso(), Ok(GsoType::TcpV4));
        assert_eq!(hdr.to_bytes(), bytes);
        let mut out = [0xEEu8; 12];
        hdr.emit(&mut out).expect("room");
        assert_eq!(out[..10], bytes);
        assert_eq!(out[10..], [0xEE, 0xEE], "nothing written past the header");
    }

    #[test]
    fn short_buffers_and_unknown_types_are_typed_errors() {
        for len in 0..VIRTIO_NET_HDR_LEN {
            assert_eq!(
                VirtioNetHdr::parse(&[0u8; 10][..len]),
                Err(VnetError::Truncated)
            );
            assert_eq!(
                VirtioNetHdr::default().emit(&mut [0u8; 10][..len]),
                Err(VnetError::Truncated)
            );
        }
        let mut hdr = VirtioNetHdr {
            gso_type: gso_type::TCPV6 | gso_type::ECN,
            ..VirtioNetHdr::default()
        };
        assert_eq!(hdr.gso(), Ok(GsoType::TcpV6));
        assert!(hdr.ecn());
        for (raw, kind) in [
            (0, GsoType::None),
            (1, GsoType::TcpV4),
            (3, GsoType::Udp),
            (4, GsoType::TcpV6),
            (5, GsoType::UdpL4),
        ] {
            hdr.gso_type = raw;
            assert_eq!(hdr.gso(), Ok(kind));
            assert_eq!(kind.raw(), raw);
        }
        hdr.gso_type = 2;
        assert_eq!(hdr.gso(), Err(VnetError::GsoType(2)));
        assert_eq!(VirtioNetHdr::default().to_bytes(), [0u8; 10]);
    }
}
