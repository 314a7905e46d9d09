//! IKEv2 (RFC 7296), sans-IO: received bytes and the time go in; bytes to
//! send, the next timer and key-manager actions come out. Nothing here
//! opens a socket, reads a clock or draws randomness on its own: time is an
//! argument and randomness comes through `sa::Randomness`, so every
//! exchange can be replayed in a unit test.
//!
//! - [`wire`]: the IKE header, the payload chain and every payload we use,
//!   parsed from untrusted bytes with each length checked.
//! - `crypto`: Diffie-Hellman (groups 19 and 31), the PRFs, prf+, the
//!   key schedule (RFC 7296 sections 2.13, 2.14, 2.17) and PSK AUTH.
//! - `sk`: the Encrypted payload with AES-GCM (RFC 5282).
//! - `proposal`: what we offer and accept, and the choice among offers.
//! - `sa`: the IKE SA state machine for IKE_SA_INIT and IKE_AUTH.
//! - [`cookie`]: responder protection, stateless cookies and a bounded
//!   half-open table (RFC 7296 section 2.6).

pub mod cookie;
pub mod crypto;
pub mod proposal;
pub mod sa;
pub mod sk;
pub mod wire;
