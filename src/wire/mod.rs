//! Zero-copy views and builders for the bytes on the wire (after smoltcp's
//! `wire`): pure functions over `&[u8]` / `&mut [u8]`, no I/O, no
//! allocation per packet. `wire` knows nothing of `crypto`.

pub mod checksum;
pub mod ecn;
pub mod esp;
pub mod gso;
pub mod hop_by_hop;
pub mod icmp;
pub mod inner;
pub mod ip;
pub mod outer;
pub mod vnet;
