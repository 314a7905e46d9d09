//! esptun: a userspace IPsec ESP datapath (RFC 4303 transport mode, AES-GCM
//! per RFC 4106, NAT-T per RFC 3948) that never hands a corrupted packet to
//! an application. See `../shared/DESIGN.md` for the map.
//!
//! Dependencies point one way: `datapath -> {sa, wire, crypto}`; `crypto`
//! knows nothing of packets or sockets.

pub mod config;
pub mod crypto;
pub mod daemon;
pub mod datapath;
pub mod fsperm;
pub mod hex;
pub mod io;
pub mod keyfile;
pub mod lab;
pub mod packet;
pub mod sa;
pub mod tools;
pub mod wire;

#[cfg(test)]
mod testutil;
