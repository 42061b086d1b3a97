//! Map names and the `#[repr(C)]` layouts of every map key and value.
//!
//! Addresses and ports marked "big-endian" hold the bytes exactly as they are
//! on the wire (`u32::from_ne_bytes(addr.octets())` in user space).

use bytemuck::{Pod, Zeroable};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Map names as they appear in the eBPF object.
pub mod names {
    pub const MAPPINGS: &str = "MAPPINGS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const LAN_NETWORKS: &str = "LAN_NETWORKS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const EGRESS_DEVICES: &str = "EGRESS_DEVICES";
    pub const COUNTERS: &str = "COUNTERS";
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    pub const XDP: &str = "hairpin";
    pub const TC_INGRESS: &str = "hairpin_neigh_redirect";
}

pub const MAX_MAPPINGS: u32 = 4096;
pub const MAX_LAN_NETWORKS: u32 = 64;
pub const MAX_EGRESS_DEVICES: u32 = 64;
pub const DEFAULT_CONNTRACK_CAPACITY: u32 = 65536;

macro_rules! pod {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
        pub struct $name { $($body)* }

        #[cfg(feature = "user")]
        // SAFETY: the type is `Pod` (checked by bytemuck's derive: no padding).
        unsafe impl aya::Pod for $name {}
    };
}

pod! {
    /// Key of the mapping table: a published (public address, port, protocol).
    pub struct MappingKey {
        /// big-endian
        pub public_addr: u32,
        /// big-endian
        pub public_port: u16,
        pub proto: u8,
        pub _pad: u8,
    }
}

pod! {
    /// Where a published port really lives.
    pub struct MappingValue {
        /// big-endian
        pub server_addr: u32,
        /// big-endian
        pub server_port: u16,
        pub _pad: [u8; 2],
    }
}

pod! {
    /// A connection tuple as it appears in a packet.
    pub struct FlowKey {
        /// big-endian
        pub src_addr: u32,
        /// big-endian
        pub dst_addr: u32,
        /// big-endian
        pub src_port: u16,
        /// big-endian
        pub dst_port: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
}

/// The entry describes the direction the connection was opened in.
pub const DIRECTION_ORIGINAL: u8 = 0;
/// The entry describes the server's replies.
pub const DIRECTION_REPLY: u8 = 1;

pod! {
    /// Conntrack entry: how a packet with the key's tuple is rewritten.
    pub struct FlowEntry {
        /// The tuple the packet leaves with.
        pub translated: FlowKey,
        /// `DIRECTION_ORIGINAL` or `DIRECTION_REPLY`.
        pub direction: u8,
        pub _pad: [u8; 7],
    }
}

pod! {
    /// Global settings, the only element of the `SETTINGS` array.
    pub struct Settings {
        /// The gateway's LAN address, source of the hairpin SNAT. big-endian
        pub lan_addr: u32,
        /// First port of the SNAT source-port range (host order).
        pub snat_port_first: u16,
        /// Last port of the SNAT source-port range, inclusive (host order).
        pub snat_port_last: u16,
    }
}

pod! {
    /// Written by the XDP program in front of a packet it hands to the kernel
    /// because the next hop's MAC address is not resolved yet; the TC ingress
    /// program then sends it on with `bpf_redirect_neigh`.
    pub struct NeighRedirect {
        pub magic: u32,
        pub ifindex: u32,
    }
}

pub const NEIGH_REDIRECT_MAGIC: u32 = 0x4850_4e52;

impl FlowKey {
    pub const fn new(
        src_addr: u32,
        dst_addr: u32,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }
}
