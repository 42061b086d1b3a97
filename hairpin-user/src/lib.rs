//! hairpin's user space: configuration, loading and attaching the datapath,
//! and typed access to its maps.

pub mod attach;
pub mod batch;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod entry_count;
pub mod explain;
pub mod flows;
pub mod import;
pub mod lock;
pub mod maps;
pub mod metrics;
pub mod netlink;
pub mod render;
pub mod routes;
pub mod stats;

/// The eBPF object built by `build.rs`; empty when the eBPF toolchain was
/// missing at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hairpin"));

/// The benchmark's programs (`cargo xtask bench`): generator, sink, empty
/// program and forwarder; empty like [`EBPF_OBJECT`] without the toolchain.
pub static BENCH_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hairpin-bench"));

/// The program that counts the conntrack tables' entries in the kernel
/// ([`entry_count`]); empty like [`EBPF_OBJECT`] without the toolchain.
pub static COUNT_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hairpin-count"));
