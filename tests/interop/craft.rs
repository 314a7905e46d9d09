//! Crafting inner segments and ESP packets by hand, for the corrupted-block
//! checks: shared by the kernel interop test and the strongSwan daemon
//! test (which includes this file by path). Pure: no I/O.

use std::net::IpAddr;

use esptun::crypto::{IcvLen, soft};
use esptun::sa::KeyMaterial;
use esptun::wire::checksum::{combine, finish, is_valid, pseudo_header_v4, pseudo_header_v6, sum};
use esptun::wire::esp;

pub const UDP: u8 = 17;
pub const TCP: u8 = 6;
/// The closed port the crafted TCP segments go to: any valid segment there
/// is answered with a reset (RFC 9293 3.10.7.1), so the receiving stack's
/// `OutRsts` tells that it accepted the segment.
pub const CLOSED_TCP_PORT: u16 = 7002;

/// The pseudo-header sum of a transport segment of `len` bytes.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u16 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo_header_v4(s.octets(), d.octets(), protocol, len as u16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo_header_v6(&s.octets(), &d.octets(), protocol, len as u32)
        }
        _ => panic!("mixed address families {src} {dst}"),
    }
}

/// Whether `segment`'s checksum (UDP or TCP) is right.
pub fn checksum_ok(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> bool {
    is_valid(combine(
        pseudo_header(src, dst, protocol, segment.len()),
        sum(segment),
    ))
}

/// Fills in the checksum field at `at` of `segment`.
pub fn set_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &mut [u8], at: usize) {
    segment[at..at + 2].fill(0);
    let pseudo = pseudo_header(src, dst, protocol, segment.len());
    let mut c = finish(combine(pseudo, sum(segment)));
    if c == 0 && protocol == UDP {
        c = 0xffff;
    }
    segment[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An inner UDP segment (header with a correct checksum, then payload).
pub fn udp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = vec![0u8; len];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    s[8..].copy_from_slice(payload);
    set_checksum(src, dst, UDP, &mut s, 6);
    s
}

/// An inner TCP segment: 20-byte header (ACK|PSH, no options) with a
/// correct checksum, then payload. Sent to a closed port, a receiver whose
/// TCP accepts it answers with a reset.
pub fn tcp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 20 + payload.len()];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&0x4553_5054u32.to_be_bytes()); // seq "ESPT"
    s[8..12].copy_from_slice(&0x0000_0001u32.to_be_bytes()); // ack
    s[12] = 5 << 4; // data offset: 5 words
    s[13] = 0x18; // ACK | PSH
    s[14..16].copy_from_slice(&1024u16.to_be_bytes()); // window
    s[20..].copy_from_slice(payload);
    set_checksum(src, dst, TCP, &mut s, 16);
    s
}

/// The payload of the crafted datagrams: 64 bytes, every 16-byte block
/// different, so a block replaced by its neighbour changes the data.
pub fn crafted_payload() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(0x41))
        .collect()
}

/// An ESP packet (SPI onwards) carrying `segment` (next header
/// `protocol`), sealed with `key`: with `corrupt`, plaintext block 2 (bytes
/// 32..48 of the ESP payload) is replaced by block 1 before sealing, as the
/// field hardware did, so the ICV is valid over wrong data. Returns the
/// packet and the segment as sealed (what a receiver decrypts).
pub fn craft(
    key: &KeyMaterial,
    spi: u32,
    seq: u64,
    esn: bool,
    protocol: u8,
    segment: &[u8],
    corrupt: bool,
) -> (Vec<u8>, Vec<u8>) {
    let pad = esp::pad_len(segment.len());
    let mut plaintext = segment.to_vec();
    plaintext.resize(segment.len() + pad + esp::TRAILER_LEN, 0);
    esp::emit_trailer(&mut plaintext[segment.len()..], protocol);
    if corrupt {
        let (head, tail) = plaintext.split_at_mut(32);
        tail[..16].copy_from_slice(&head[16..32]);
    }
    let sealed = plaintext[..segment.len()].to_vec();
    let mut header = [0u8; esp::HEADER_LEN + esp::IV_LEN];
    esp::emit_header(&mut header, spi, seq);
    let nonce = esp::nonce(*key.salt(), seq.to_be_bytes());
    let (aad, aad_len) = esp::aad(spi, seq, esn);
    let sealer = soft::provider()
        .new_key(key.key(), IcvLen::Icv16)
        .expect("soft provider key");
    let mut tag = [0u8; 16];
    sealer
        .seal_in_place(&nonce, &aad[..aad_len], &mut plaintext, &mut tag)
        .expect("seal");
    let mut packet = header.to_vec();
    packet.extend_from_slice(&plaintext);
    packet.extend_from_slice(&tag);
    (packet, sealed)
}
