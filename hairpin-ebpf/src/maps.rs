//! The maps, and the per-CPU counters kept in them.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use hairpin_common::{
    Counter, DEFAULT_CONNTRACK_CAPACITY, FlowEntry, FlowKey, FragmentEntry, FragmentKey,
    IcmpBucket, MAX_DENY_NETWORKS, MAX_EGRESS_DEVICES, MAX_FLOW_ADDRESSES, MAX_INTERFACES,
    MAX_LAN_NETWORKS, MAX_MAPPING_INTERFACES, MAX_MAPPING_RULES, MAX_MAPPING_SOURCES, MAX_MAPPINGS,
    MappingKey, MappingStats, MappingValue, QueuedFragment, QueuedFragmentKey, RouteCache,
    RuleInterface, RuleSource, Settings, TcHandoff,
    fragment::{MAX_FRAGMENTED_DATAGRAMS, MAX_QUEUED_FRAGMENTS, MAX_SPLIT_PAYLOAD},
    nat::FlowPair,
    tcp::MAX_OPTIONS_LEN,
};

#[map]
pub(crate) static MAPPINGS: HashMap<MappingKey, MappingValue> =
    HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Established flows. Not LRU: a flood of new flows cannot evict them; idle
/// ones are reclaimed by user space (and treated as absent once expired).
#[map]
pub(crate) static CONNTRACK: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// Flows not established yet; under pressure the least recently used go.
#[map]
pub(crate) static CONNTRACK_NEW: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// `ROLE_LAN` or `ROLE_WAN` by interface index.
#[map]
pub(crate) static INTERFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map]
pub(crate) static LAN_NETWORKS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_LAN_NETWORKS, 0);

#[map]
pub(crate) static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static EGRESS_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_DEVICES, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Flows, packets and bytes by mapping rule (`MappingValue::id`).
#[map]
pub(crate) static MAPPING_STATS: PerCpuArray<MappingStats> =
    PerCpuArray::with_max_entries(MAX_MAPPING_RULES, 0);

/// Whether the routes cached in conntrack entries may be used.
#[map]
pub(crate) static ROUTE_CACHE: Array<RouteCache> = Array::with_max_entries(1, 0);

/// Where a new flow's two entries are built: they do not fit the stack.
#[map]
pub(crate) static NEW_FLOW_SCRATCH: PerCpuArray<FlowPair> = PerCpuArray::with_max_entries(1, 0);

/// Sources from which no new WAN flow is taken (ban tools fill it).
#[map]
pub(crate) static DENY_NETWORKS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_DENY_NETWORKS, 0);

/// Allowlisted source networks of the mapping rules that have one.
#[map]
pub(crate) static MAPPING_SOURCES: LpmTrie<RuleSource, u8> =
    LpmTrie::with_max_entries(MAX_MAPPING_SOURCES, 0);

/// The interfaces an interface-bound mapping rule takes new flows from.
#[map]
pub(crate) static MAPPING_INTERFACES: HashMap<RuleInterface, u8> =
    HashMap::with_max_entries(MAX_MAPPING_INTERFACES, 0);

/// Where a SYN's TCP options are read to find its window scale.
#[map]
pub(crate) static TCP_OPTIONS_SCRATCH: PerCpuArray<[u8; MAX_OPTIONS_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// The hand-off the TC datapath leaves itself: what XDP would have put in
/// front of the packet for the TC program (see `tc::run_datapath`).
#[map]
pub(crate) static TC_PENDING: PerCpuArray<TcHandoff> = PerCpuArray::with_max_entries(1, 0);

/// Token buckets for the ICMP messages the datapath generates.
#[map]
pub(crate) static ICMP_RATE: PerCpuArray<IcmpBucket> = PerCpuArray::with_max_entries(1, 0);

/// How the later fragments of recently translated first fragments are
/// translated, by datagram.
#[map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry> =
    LruHashMap::with_max_entries(MAX_FRAGMENTED_DATAGRAMS, 0);

/// Later fragments held until their datagram's first fragment comes.
#[map]
pub(crate) static FRAGMENT_QUEUE: LruHashMap<QueuedFragmentKey, QueuedFragment> =
    LruHashMap::with_max_entries(MAX_QUEUED_FRAGMENTS, 0);

/// Where a fragment to hold is copied first: it does not fit the stack.
#[map]
pub(crate) static HOLD_SCRATCH: PerCpuArray<QueuedFragment> = PerCpuArray::with_max_entries(1, 0);

/// Where the TC program keeps the payload of a packet it cuts into
/// fragments (twice the payload bound, so that any piece read at any
/// offset below the bound stays inside).
#[map]
pub(crate) static SPLIT_SCRATCH: PerCpuArray<[u8; 2 * MAX_SPLIT_PAYLOAD]> =
    PerCpuArray::with_max_entries(1, 0);

/// The mapping rules' public and server addresses (`ADDRESS_*` bits): the
/// early fragments worth holding are those to or from them.
#[map]
pub(crate) static FLOW_ADDRESSES: HashMap<u32, u8> =
    HashMap::with_max_entries(MAX_FLOW_ADDRESSES, 0);

/// Which mapping rule ids user space may give out (`mapping_ids`); the
/// datapath never reads it.
#[map]
pub(crate) static MAPPING_IDS: Array<u64> = Array::with_max_entries(MAX_MAPPING_RULES, 0);

/// `LAYOUT_VERSION` of the user space that created the maps.
#[map]
pub(crate) static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}

/// Adds a packet (and a flow, when it opens one) to its mapping rule's traffic.
#[inline(always)]
pub(crate) fn account(mapping_id: u16, len: u32, new_flow: bool) {
    if let Some(stats) = MAPPING_STATS.get_ptr_mut(mapping_id as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*stats).flows += new_flow as u64;
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
        }
    }
}
