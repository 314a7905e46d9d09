//! Tools around the tunnel, not part of it: the benchmark (`esptun bench`)
//! and the Wireshark key export (`esptun wireshark-keys`).

pub mod bench;
pub mod wireshark;
