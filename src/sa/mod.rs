//! Security associations: SPI, keys, sequence numbers (ESN), the
//! anti-replay window, lifetimes and counters. So far: [`replay`].

pub mod replay;
