//! Everything hairpin's eBPF programs and user space must agree on: the map
//! key/value layouts, the counters, and the pure NAT and checksum logic, so
//! that it can be tested on the host.
#![cfg_attr(not(test), no_std)]

pub mod bench;
pub mod checksum;
pub mod counters;
pub mod fragment;
pub mod icmp;
pub mod mapping_ids;
pub mod maps;
pub mod nat;
pub mod packet;
pub mod ratelimit;
pub mod route;
pub mod tcp;
pub mod test_run;

pub use counters::Counter;
pub use maps::*;
