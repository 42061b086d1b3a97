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
    pub const CONNTRACK_NEW: &str = "CONNTRACK_NEW";
    pub const INTERFACES: &str = "INTERFACES";
    pub const LAN_NETWORKS: &str = "LAN_NETWORKS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const EGRESS_DEVICES: &str = "EGRESS_DEVICES";
    pub const COUNTERS: &str = "COUNTERS";
    pub const MAPPING_STATS: &str = "MAPPING_STATS";
    pub const LAYOUT: &str = "LAYOUT";
    pub const ROUTE_CACHE: &str = "ROUTE_CACHE";
    pub const DENY_NETWORKS: &str = "DENY_NETWORKS";
    pub const MAPPING_SOURCES: &str = "MAPPING_SOURCES";
    pub const MAPPING_INTERFACES: &str = "MAPPING_INTERFACES";
    pub const ICMP_RATE: &str = "ICMP_RATE";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const FRAGMENT_QUEUE: &str = "FRAGMENT_QUEUE";
    pub const FLOW_ADDRESSES: &str = "FLOW_ADDRESSES";
    pub const MAPPING_IDS: &str = "MAPPING_IDS";

    /// The maps a running instance keeps (pinned) and its tools share.
    pub const SHARED: [&str; 19] = [
        LAYOUT,
        SETTINGS,
        ROUTE_CACHE,
        LAN_NETWORKS,
        INTERFACES,
        EGRESS_DEVICES,
        MAPPINGS,
        CONNTRACK,
        CONNTRACK_NEW,
        COUNTERS,
        MAPPING_STATS,
        DENY_NETWORKS,
        MAPPING_SOURCES,
        MAPPING_INTERFACES,
        ICMP_RATE,
        FRAGMENTS,
        FRAGMENT_QUEUE,
        FLOW_ADDRESSES,
        MAPPING_IDS,
    ];
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    pub const XDP: &str = "hairpin";
    /// TC ingress next to XDP: sends what XDP handed over.
    pub const TC_INGRESS: &str = "hairpin_neigh_redirect";
    /// The whole datapath on skbs, for an interface attached in TC mode.
    pub const TC: &str = "hairpin_tc";
    /// The same on a device without an Ethernet header (tun, wireguard,
    /// ppp): an Ethernet header is pushed first.
    pub const TC_L3: &str = "hairpin_tc_l3";
}

pub const MAX_MAPPINGS: u32 = 65536;
/// Mapping rules (a rule may publish a range of ports), `MAPPING_STATS` slots.
pub const MAX_MAPPING_RULES: u32 = 4096;
pub const MAX_INTERFACES: u32 = 64;
pub const MAX_LAN_NETWORKS: u32 = 64;
pub const MAX_EGRESS_DEVICES: u32 = 64;
/// Networks in the global deny set (`DENY_NETWORKS`).
pub const MAX_DENY_NETWORKS: u32 = 65536;
/// Source networks over all mapping rules' allowlists (`MAPPING_SOURCES`).
pub const MAX_MAPPING_SOURCES: u32 = 16384;
/// (rule, interface) pairs over all interface-bound rules (`MAPPING_INTERFACES`).
pub const MAX_MAPPING_INTERFACES: u32 = 4096;
pub const DEFAULT_CONNTRACK_CAPACITY: u32 = 65536;
/// Public and server addresses of the mapping rules (`FLOW_ADDRESSES`).
pub const MAX_FLOW_ADDRESSES: u32 = 2 * MAX_MAPPING_RULES;

/// `FLOW_ADDRESSES` value bits: what an address is to the mapping rules.
pub const ADDRESS_PUBLIC: u8 = 1;
pub const ADDRESS_SERVER: u8 = 2;

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
        /// The mapping rule this port belongs to: its `MAPPING_STATS` slot.
        pub id: u16,
        /// `MAPPING_*` bits: which restrictions new flows must pass.
        pub flags: u8,
        pub _pad0: u8,
        pub _pad1: u16,
    }
}

/// New flows of the rule need a source in its `MAPPING_SOURCES` allowlist.
pub const MAPPING_ALLOWLIST: u8 = 1;
/// New flows of the rule must arrive on one of its `MAPPING_INTERFACES`.
pub const MAPPING_INTERFACE_BOUND: u8 = 2;

pod! {
    /// Key data of `MAPPING_SOURCES`, an LPM trie: a rule's allowed source
    /// network, with prefix length 32 + the network's.
    pub struct RuleSource {
        /// `MappingValue::id`, big-endian (the trie matches bytes from the start).
        pub rule: u32,
        /// big-endian
        pub addr: u32,
    }
}

pod! {
    /// Key of `MAPPING_INTERFACES`: a rule new flows may arrive for on an
    /// interface.
    pub struct RuleInterface {
        pub ifindex: u32,
        pub rule: u16,
        pub _pad: u16,
    }
}

pod! {
    /// This CPU's token bucket for ICMP messages the datapath generates
    /// (`ICMP_RATE`, per CPU); see `crate::ratelimit`.
    pub struct IcmpBucket {
        /// Tokens left, in nanoseconds of credit.
        pub credit_ns: u64,
        /// When the credit was last topped up (CLOCK_MONOTONIC_COARSE, ns).
        pub updated_ns: u64,
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
        /// Padding as two aligned fields: zeroing `[u8; 3]` made LLVM call memset
        /// on the fast path.
        pub _pad0: u8,
        pub _pad1: u16,
    }
}

/// The entry describes the direction the connection was opened in.
pub const DIRECTION_ORIGINAL: u8 = 0;
/// The entry describes the server's replies.
pub const DIRECTION_REPLY: u8 = 1;

pod! {
    /// Conntrack entry: how a packet with the key's tuple is rewritten. Each
    /// flow has two, one per direction; the partner of an entry is found at
    /// the reverse of its `translated` tuple.
    pub struct FlowEntry {
        /// The tuple the packet leaves with.
        pub translated: FlowKey,
        /// Where the last packet of this direction was sent, for the next
        /// (8-byte aligned: zeroing it then takes three stores, not memset).
        pub route: CachedRoute,
        /// When this direction last saw a packet (CLOCK_MONOTONIC_COARSE, ns;
        /// refreshed at most once a second).
        pub last_seen_ns: u64,
        /// Bytes (IPv4 total length) and packets seen in this direction.
        pub bytes: u64,
        pub packets: u32,
        /// When the flow was created (CLOCK_MONOTONIC_COARSE, seconds).
        pub created_s: u32,
        /// The only interface this direction's packets are taken from: a
        /// packet with this tuple arriving elsewhere belongs to no flow.
        pub ingress: u32,
        /// The mapping rule of the flow (`MappingValue::id`).
        pub mapping_id: u16,
        /// `DIRECTION_ORIGINAL` or `DIRECTION_REPLY`.
        pub direction: u8,
        /// One of the `state` constants (kept the same in both entries).
        pub state: u8,
        /// `FIN_SEEN_*` bits.
        pub fin_seen: u8,
        /// `KIND_HAIRPIN` or `KIND_PORT_FORWARD`.
        pub kind: u8,
        pub _pad0: u16,
        pub _pad1: u32,
        /// TCP: both directions' sequence spaces, by `DIRECTION_*`. Kept in
        /// the original entry only (a reply packet reads them there, which
        /// is also the check that its partner still exists); zero in the
        /// reply entry and for UDP.
        pub tcp: [TcpWindow; 2],
    }
}

pod! {
    /// What one direction of a TCP connection has shown of its sequence
    /// space, as netfilter's `ip_ct_tcp_state` (see `crate::tcp`). Host order.
    pub struct TcpWindow {
        /// The highest sequence number sent, plus one (`td_end`).
        pub end: u32,
        /// The highest sequence number the peer's window lets this side
        /// send (`td_maxend`).
        pub max_end: u32,
        /// The largest window this side advertised, scaled (`td_maxwin`);
        /// 0: nothing seen from this side yet.
        pub max_win: u32,
        /// The highest acknowledgment this side sent (`td_maxack`): the
        /// next sequence number it expects, valid with `tcp::ACK_SEEN`.
        pub max_ack: u32,
        /// The sequence number after this side's SYN flag (its ISN + 1);
        /// for a client's SYN seen while the flow was open (`tcp::RESYNC`),
        /// that SYN's.
        pub isn_end: u32,
        /// The window scale this side announced in its SYN, or
        /// `tcp::NO_WINDOW_SCALE`; after the handshake, the one in use.
        pub scale: u8,
        /// `tcp::ACK_SEEN`, `tcp::RESYNC`.
        pub flags: u8,
        /// With `tcp::RESYNC`: the window scale of that SYN.
        pub resync_scale: u8,
        pub _pad: u8,
    }
}

pod! {
    /// A `bpf_fib_lookup` result kept in a conntrack entry, so that the
    /// packets after it need none (see `crate::route`).
    pub struct CachedRoute {
        /// `RouteCache::generation` at the lookup; 0: nothing cached.
        pub generation: u16,
        /// The largest IPv4 total length the lookup allowed.
        pub mtu: u16,
        /// The lookup's input interface (routing may depend on it).
        pub ingress: u32,
        pub egress: u32,
        /// The Ethernet header's first 12 bytes, destination then source
        /// MAC address, as 32-bit words: byte arrays made LLVM call memset
        /// and memmove.
        pub eth_addrs: [u32; 3],
    }
}

pod! {
    /// The only element of `ROUTE_CACHE`: whether the forwarding results
    /// cached in conntrack entries may be used.
    pub struct RouteCache {
        /// Moved on by the daemon whenever a route, rule, neighbour, address
        /// or link changes, which makes every cached result stale. Never 0.
        pub generation: u16,
        pub _pad0: u16,
        pub _pad1: u32,
        /// Cached results are used only before this time
        /// (CLOCK_MONOTONIC_COARSE, ns). The daemon keeps moving it ahead;
        /// without a daemon to watch for changes, it passes and every packet
        /// is looked up again.
        pub valid_until_ns: u64,
    }
}

/// Flow states. TCP follows the connection; UDP becomes `UDP_REPLIED` with
/// the server's first answer (and is promoted to the established table only
/// once it is a stream, see `nat::should_promote`).
pub mod state {
    pub const TCP_SYN_SENT: u8 = 1;
    pub const TCP_SYN_RECV: u8 = 2;
    pub const TCP_ESTABLISHED: u8 = 3;
    pub const TCP_FIN_WAIT: u8 = 4;
    pub const TCP_CLOSE_WAIT: u8 = 5;
    pub const TCP_TIME_WAIT: u8 = 6;
    pub const TCP_CLOSE: u8 = 7;
    pub const UDP_UNREPLIED: u8 = 8;
    pub const UDP_REPLIED: u8 = 9;

    pub const fn name(state: u8) -> &'static str {
        match state {
            TCP_SYN_SENT => "SYN_SENT",
            TCP_SYN_RECV => "SYN_RECV",
            TCP_ESTABLISHED => "ESTABLISHED",
            TCP_FIN_WAIT => "FIN_WAIT",
            TCP_CLOSE_WAIT => "CLOSE_WAIT",
            TCP_TIME_WAIT => "TIME_WAIT",
            TCP_CLOSE => "CLOSE",
            UDP_UNREPLIED => "UNREPLIED",
            UDP_REPLIED => "REPLIED",
            _ => "UNKNOWN",
        }
    }
}

pub const FIN_SEEN_ORIGINAL: u8 = 1;
pub const FIN_SEEN_REPLY: u8 = 2;

/// A LAN client through the public address: DNAT and SNAT.
pub const KIND_HAIRPIN: u8 = 0;
/// From the WAN to a published port: DNAT only, the client address kept.
pub const KIND_PORT_FORWARD: u8 = 1;

/// What an interface is to hairpin (`INTERFACES` map value).
pub const ROLE_LAN: u8 = 1;
pub const ROLE_WAN: u8 = 2;

pod! {
    /// Global settings, the only element of the `SETTINGS` array.
    pub struct Settings {
        /// The gateway's LAN address, source of the hairpin SNAT. big-endian
        pub lan_addr: u32,
        /// First port of the SNAT source-port range (host order).
        pub snat_port_first: u16,
        /// Last port of the SNAT source-port range, inclusive (host order).
        pub snat_port_last: u16,
        /// Idle timeouts in nanoseconds: established TCP, closing TCP
        /// (FIN_WAIT to CLOSE), UDP, and opening TCP (SYN_SENT, SYN_RECV).
        pub tcp_established_ns: u64,
        pub tcp_transitory_ns: u64,
        pub udp_ns: u64,
        pub tcp_opening_ns: u64,
    }
}

impl Settings {
    /// How long a flow in `state` may stay idle.
    pub const fn timeout_ns(&self, flow_state: u8) -> u64 {
        match flow_state {
            state::TCP_ESTABLISHED => self.tcp_established_ns,
            state::UDP_UNREPLIED | state::UDP_REPLIED => self.udp_ns,
            state::TCP_SYN_SENT | state::TCP_SYN_RECV => self.tcp_opening_ns,
            _ => self.tcp_transitory_ns,
        }
    }

    /// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`.
    pub const fn expired(&self, flow_state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) > self.timeout_ns(flow_state)
    }

    /// Whether a flow in `flow_state` has expired at `now_ns`, one entry
    /// last seen at `last_seen_ns`, its partner (the other direction) at
    /// `partner_last_seen_ns` (`None`: gone). A flow is idle only when both
    /// directions are, so that a one-way stream keeps it alive; an entry
    /// without its partner expires on its own.
    #[inline(always)]
    pub const fn flow_expired(
        &self,
        flow_state: u8,
        last_seen_ns: u64,
        partner_last_seen_ns: Option<u64>,
        now_ns: u64,
    ) -> bool {
        if !self.expired(flow_state, last_seen_ns, now_ns) {
            return false;
        }
        match partner_last_seen_ns {
            Some(partner) => self.expired(flow_state, partner, now_ns),
            None => true,
        }
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
    /// The same connection seen from the other side.
    pub const fn reversed(&self) -> Self {
        Self::new(self.dst_addr, self.src_addr, self.dst_port, self.src_port, self.proto)
    }

    pub const fn new(
        src_addr: u32,
        dst_addr: u32,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self { src_addr, dst_addr, src_port, dst_port, proto, _pad0: 0, _pad1: 0 }
    }
}

pod! {
    /// A fragmented datagram (`FRAGMENTS` key): its sender, destination,
    /// protocol and IP ID, as in its fragments' headers.
    pub struct FragmentKey {
        /// big-endian
        pub src_addr: u32,
        /// big-endian
        pub dst_addr: u32,
        /// big-endian
        pub id: u16,
        pub proto: u8,
        pub _pad: u8,
    }
}

pod! {
    /// What becomes of the later fragments of a datagram (`FRAGMENTS`
    /// value): translated and sent as its first fragment was
    /// (`FRAGMENT_TRANSLATED`), passed to the kernel as it was
    /// (`FRAGMENT_PASSED`), or, until the first fragment comes
    /// (`FRAGMENT_HELD`), held in `FRAGMENT_QUEUE`, `queued` of them.
    pub struct FragmentEntry {
        /// When the first fragment was translated, or the first later one
        /// held (CLOCK_MONOTONIC_COARSE, ns).
        pub created_ns: u64,
        /// The addresses the fragments leave with. big-endian
        pub src_addr: u32,
        pub dst_addr: u32,
        /// The interface the datagram arrives on: fragments arriving
        /// elsewhere are not translated.
        pub ingress: u32,
        /// The interface it leaves through, and the MAC addresses to send it
        /// with when `resolved` (else the kernel resolves the next hop).
        pub egress: u32,
        pub eth_addrs: [u32; 3],
        /// The egress MTU: a later fragment larger than it is not sent.
        pub mtu: u16,
        /// The flow's mapping rule, for its traffic counters.
        pub mapping_id: u16,
        pub resolved: u8,
        pub verdict: u8,
        pub _pad0: u16,
        /// Slots of `FRAGMENT_QUEUE` claimed (atomically; may pass the
        /// most a datagram may hold, which is what counts).
        pub queued: u32,
    }
}

/// `FragmentEntry::verdict` values.
pub const FRAGMENT_HELD: u8 = 0;
pub const FRAGMENT_TRANSLATED: u8 = 1;
pub const FRAGMENT_PASSED: u8 = 2;

pod! {
    /// A fragment held until its datagram's first fragment comes
    /// (`FRAGMENT_QUEUE` key): the datagram, and its place in the queue.
    pub struct QueuedFragmentKey {
        pub datagram: FragmentKey,
        pub slot: u32,
    }
}

/// The largest frame a held fragment may be (Ethernet header included).
pub const MAX_QUEUED_FRAME: usize = 1538;

/// A held fragment: the whole frame as it arrived (`FRAGMENT_QUEUE` value).
/// The frame starts 2 bytes in, so its IPv4 header is 4-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct QueuedFragment {
    pub len: u16,
    pub frame: [u8; MAX_QUEUED_FRAME],
}

#[cfg(feature = "user")]
// SAFETY: the type is `Pod` (checked by bytemuck's derive: no padding).
unsafe impl aya::Pod for QueuedFragment {}

pod! {
    /// Written by the XDP program in front of a translated packet it cannot
    /// send itself: the TC ingress program sends it to `ifindex` (through the
    /// kernel's neighbour resolution with `HANDOFF_NEIGH`), cut into
    /// fragments when it is larger than `mtu`, and after it the `queued`
    /// fragments held for `datagram` (translated by XDP in the queue); or,
    /// with `HANDOFF_TO_KERNEL`, hands them all to the kernel as they came.
    pub struct TcHandoff {
        pub magic: u32,
        pub ifindex: u32,
        pub datagram: FragmentKey,
        pub mtu: u16,
        pub queued: u8,
        pub flags: u8,
        pub _pad: u32,
    }
}

pub const TC_HANDOFF_MAGIC: u32 = 0x4850_4648;
/// `TcHandoff::flags`.
pub const HANDOFF_NEIGH: u8 = 1;
pub const HANDOFF_TO_KERNEL: u8 = 2;

/// The TC program's packets that go out through the kernel's neighbour
/// resolution come back into it first, marked with this in the upper half
/// of `skb->mark` and the egress interface in the lower (the helpers that
/// rewrite a packet drop its metadata, not its mark).
pub const NEIGH_MARK_TAG: u32 = 0x4850_0000;
pub const NEIGH_MARK_MASK: u32 = 0xffff_0000;

pod! {
    /// Traffic of one mapping rule (`MAPPING_STATS`, per CPU).
    pub struct MappingStats {
        pub flows: u64,
        pub packets: u64,
        pub bytes: u64,
    }
}

/// Changes whenever a map's layout or meaning changes, so that a running
/// instance's pinned maps are never used with another layout.
pub const LAYOUT_VERSION: u64 = 10 << 48
    | (core::mem::size_of::<FlowKey>() as u64) << 40
    | (core::mem::size_of::<FlowEntry>() as u64) << 32
    | (core::mem::size_of::<MappingKey>() as u64) << 24
    | (core::mem::size_of::<MappingValue>() as u64) << 16
    | (core::mem::size_of::<Settings>() as u64) << 8
    | core::mem::size_of::<MappingStats>() as u64;
