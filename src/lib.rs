//! esptun: a userspace IPsec ESP datapath (RFC 4303 transport mode, AES-GCM
//! per RFC 4106, NAT-T per RFC 3948) that never hands a corrupted packet to
//! an application. `docs/DESIGN.md` in the repository has the map.
//!
//! Dependencies point one way: `daemon -> {datapath, io} -> sa -> {wire,
//! crypto}`, with `packet` below both `io` and `datapath`; `io` never
//! imports the pipelines or the daemon, and `crypto` knows nothing of
//! packets or sockets.
//!
//! `unsafe` is denied everywhere but where it is allowed by name: the OS
//! edge (`io`), the SIMD register check (`crypto::simd_state`) and the
//! checksum's AVX2 loop (`wire::checksum`'s `simd`).
#![deny(unsafe_code)]

pub mod config;
pub mod crypto;
pub mod daemon;
pub mod datapath;
pub mod fsperm;
pub mod hex;
pub mod ike;
pub mod io;
pub mod keyfile;
pub mod lab;
pub mod packet;
pub mod sa;
pub mod tools;
pub mod wire;

#[cfg(test)]
mod testutil;
