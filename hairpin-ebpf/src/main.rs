#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write types; the
// intrinsic compiles to BPF's atomic add (the crate is built with
// RUSTC_BOOTSTRAP=1 for build-std already).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_NOEXIST, TC_ACT_OK, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect_neigh,
        bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use hairpin_common::{
    CachedRoute, Counter, DEFAULT_CONNTRACK_CAPACITY, DIRECTION_ORIGINAL, FlowEntry, FlowKey,
    IPPROTO_TCP, IPPROTO_UDP, IcmpBucket, KIND_HAIRPIN, MAPPING_ALLOWLIST, MAPPING_INTERFACE_BOUND,
    MAX_DENY_NETWORKS, MAX_EGRESS_DEVICES, MAX_INTERFACES, MAX_LAN_NETWORKS,
    MAX_MAPPING_INTERFACES, MAX_MAPPING_RULES, MAX_MAPPING_SOURCES, MAX_MAPPINGS, MappingKey,
    MappingStats, MappingValue, NEIGH_REDIRECT_MAGIC, NeighRedirect, RouteCache, RuleInterface,
    RuleSource, Settings, checksum,
    icmp::{self, ICMP_HEADER_LEN, IPPROTO_ICMP},
    nat::{self, FlowPair, SNAT_PORT_ATTEMPTS, Sides},
    packet::{
        ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, IPV4_HEADER_LEN, IcmpHeader, Ipv4Header, L4_OFFSET,
        TCP_SYN, TcpHeader, UdpHeader,
    },
    ratelimit, route,
    tcp::{self, MAX_OPTIONS_LEN, NO_WINDOW_SCALE, Segment},
};

#[map]
static MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

/// Established flows. Not LRU: a flood of new flows cannot evict them; idle
/// ones are reclaimed by user space (and treated as absent once expired).
#[map]
static CONNTRACK: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// Flows not established yet; under pressure the least recently used go.
#[map]
static CONNTRACK_NEW: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// `ROLE_LAN` or `ROLE_WAN` by interface index.
#[map]
static INTERFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map]
static LAN_NETWORKS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_LAN_NETWORKS, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static EGRESS_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_DEVICES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Flows, packets and bytes by mapping rule (`MappingValue::id`).
#[map]
static MAPPING_STATS: PerCpuArray<MappingStats> =
    PerCpuArray::with_max_entries(MAX_MAPPING_RULES, 0);

/// Whether the routes cached in conntrack entries may be used.
#[map]
static ROUTE_CACHE: Array<RouteCache> = Array::with_max_entries(1, 0);

/// Where a new flow's two entries are built: they do not fit the stack.
#[map]
static NEW_FLOW_SCRATCH: PerCpuArray<FlowPair> = PerCpuArray::with_max_entries(1, 0);

/// Sources from which no new WAN flow is taken (ban tools fill it).
#[map]
static DENY_NETWORKS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_DENY_NETWORKS, 0);

/// Allowlisted source networks of the mapping rules that have one.
#[map]
static MAPPING_SOURCES: LpmTrie<RuleSource, u8> = LpmTrie::with_max_entries(MAX_MAPPING_SOURCES, 0);

/// The interfaces an interface-bound mapping rule takes new flows from.
#[map]
static MAPPING_INTERFACES: HashMap<RuleInterface, u8> =
    HashMap::with_max_entries(MAX_MAPPING_INTERFACES, 0);

/// Where a SYN's TCP options are read to find its window scale.
#[map]
static TCP_OPTIONS_SCRATCH: PerCpuArray<[u8; MAX_OPTIONS_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Token buckets for the ICMP messages the datapath generates.
#[map]
static ICMP_RATE: PerCpuArray<IcmpBucket> = PerCpuArray::with_max_entries(1, 0);

/// `LAYOUT_VERSION` of the user space that created the maps.
#[map]
static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

const AF_INET: u8 = 2;
const IP_DONT_FRAGMENT: u16 = 0x4000;

#[xdp(frags)]
pub fn hairpin(ctx: XdpContext) -> u32 {
    let (action, counter) = match try_hairpin(&ctx) {
        Ok(forwarded) => forwarded,
        Err(pass_reason) => (xdp_action::XDP_PASS, pass_reason),
    };
    count(counter);
    action
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}

/// Adds a packet (and a flow, when it opens one) to its mapping rule's traffic.
#[inline(always)]
fn account(mapping_id: u16, len: u16, new_flow: bool) {
    if let Some(stats) = MAPPING_STATS.get_ptr_mut(mapping_id as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*stats).flows += new_flow as u64;
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
        }
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Counter> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

/// Where the checksum and ports of the packet's L4 header are.
struct L4 {
    check: *mut u16,
    ports: *mut [u16; 2],
}

/// Translates a packet of a tracked or new flow and sends it on (`Ok`), or
/// names why the kernel gets it untouched (`Err`).
#[inline(always)]
fn try_hairpin(ctx: &XdpContext) -> Result<(u32, Counter), Counter> {
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4.to_be() {
        return Err(Counter::PassNotIpv4);
    }
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let ip = unsafe { &mut *ip };
    nat::check_ipv4(ip.version_ihl, ip.frag_off, ip.proto)?;
    if nat::ttl_expires(ip.ttl) {
        return Err(Counter::PassTtlExpired);
    }
    let settings = SETTINGS.get(0).ok_or(Counter::PassNotConfigured)?;
    if settings.lan_addr == 0 {
        return Err(Counter::PassNotConfigured);
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let ingress = ctx.ingress_ifindex() as u32;
    let tot_len = u16::from_be(ip.tot_len);
    if ip.proto == IPPROTO_ICMP {
        return try_icmp_error(ctx, ip.src_addr, tot_len, settings, now);
    }
    let l4 = l4_header(ctx, ip.proto)?;
    let segment =
        if ip.proto == IPPROTO_TCP { tcp_segment(ctx, tot_len)? } else { Segment::default() };
    let [src_port, dst_port] = unsafe { *l4.ports };
    let packet = FlowKey::new(ip.src_addr, ip.dst_addr, src_port, dst_port, ip.proto);

    let arrival = Arrival { packet, segment, now, tot_len };
    let (outcome, created) = match find_flow(&packet, ingress, settings, now)? {
        Some(flow) => (forward_tracked(ctx, &flow, &arrival)?, false),
        None => (open_flow(ctx, settings, &arrival)?, true),
    };
    let (to, route, counter) = match outcome {
        Outcome::Translate { to, route, counter } => (to, route, counter),
        Outcome::Answered(verdict) => return Ok(verdict),
    };

    if let Route::Unresolved { ifindex } = route {
        if let Err(counter) = hand_to_kernel(ctx, ifindex) {
            if created {
                let _ = CONNTRACK_NEW.remove(&packet);
                let _ = CONNTRACK_NEW.remove(&to.reversed());
            }
            return Err(counter);
        }
        // Adding metadata invalidates packet pointers: look the headers up again.
        let eth: *mut EthHeader = ptr_at(ctx, 0)?;
        let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
        let (ip, eth) = unsafe { (&mut *ip, &mut *eth) };
        let l4 = l4_header(ctx, ip.proto)?;
        rewrite(ip, &l4, &packet, &to);
        return send(eth, &route, counter);
    }
    rewrite(ip, &l4, &packet, &to);
    // SAFETY: bounds checked at the start; no helper has moved the packet.
    send(unsafe { &mut *eth }, &route, counter)
}

/// A packet of a flow: its tuple, TCP header, when it arrived and how long
/// it is (IPv4 total length).
struct Arrival {
    packet: FlowKey,
    segment: Segment,
    now: u64,
    tot_len: u16,
}

/// What becomes of a packet of a flow, tracked or new.
enum Outcome {
    /// Translate the packet to `to` and send it along `route`.
    Translate { to: FlowKey, route: Route, counter: Counter },
    /// Answered or dropped instead (deny set, window check, ICMP).
    Answered((u32, Counter)),
}

/// A packet of a tracked flow: its route, and the flow moved on by it. Not
/// inlined: the entry point's stack frame stays small, so that it and
/// either path's frame fit the 512 bytes BPF allows a call chain.
#[inline(always)]
fn forward_tracked(ctx: &XdpContext, flow: &Flow, arrival: &Arrival) -> Result<Outcome, Counter> {
    let Arrival { ref packet, ref segment, now, tot_len } = *arrival;
    // SAFETY: a map value; see find_flow. Fields are read one by one: a
    // copy of the whole entry does not fit the stack.
    let (translated, direction, kind) =
        unsafe { ((*flow.entry).translated, (*flow.entry).direction, (*flow.entry).kind) };
    // Tracked first: a packet the windows refuse costs no route lookup,
    // caches no route and is answered with nothing.
    if let Err(refused) = track(flow, packet, segment, now, tot_len) {
        return Ok(Outcome::Answered((xdp_action::XDP_DROP, refused)));
    }
    let route = flow_route(ctx, flow, &translated, tot_len, now)?;
    if let Route::TooBig { mtu } = route {
        return too_big(ctx, mtu, direction == DIRECTION_ORIGINAL, now).map(Outcome::Answered);
    }
    let counter = if direction != DIRECTION_ORIGINAL {
        Counter::TranslatedBack
    } else if kind == KIND_HAIRPIN {
        Counter::Hairpinned
    } else {
        Counter::PortForwarded
    };
    Ok(Outcome::Translate { to: translated, route, counter })
}

/// A packet of no tracked flow: admitted, routed and entered as a new flow,
/// or refused. Not inlined, as `forward_tracked`.
#[inline(always)]
fn open_flow(ctx: &XdpContext, settings: &Settings, arrival: &Arrival) -> Result<Outcome, Counter> {
    let Arrival { ref packet, ref segment, now, tot_len } = *arrival;
    let admitted = match admit_new_flow(ctx, packet, segment.flags, settings)? {
        Admission::Admitted(admitted) => admitted,
        Admission::Denied => return Ok(Outcome::Answered((xdp_action::XDP_DROP, Counter::Denied))),
    };
    // The route does not depend on the SNAT port: look it up before any
    // state is created, so a routing failure leaves none behind.
    let (route, _) = fib_lookup(ctx, &admitted.provisional, tot_len)?;
    if let Route::TooBig { mtu } = route {
        return too_big(ctx, mtu, true, now).map(Outcome::Answered);
    }
    let sides = Sides { original: ctx.ingress_ifindex() as u32, reply: route.egress() };
    let flow = match create_flow(packet, &admitted, &sides, segment, settings, now, tot_len) {
        Ok(flow) => flow,
        // Refused cleanly: handed to the kernel, the packet could reach a
        // service of the gateway's own on the public address.
        Err(Counter::PortAllocFailed) => {
            count(Counter::PortAllocFailed);
            let refusal = Unreachable {
                code: icmp::ICMP_ADMIN_PROHIBITED,
                mtu: 0,
                from_addr: packet.dst_addr,
                tot_len,
                counter: Counter::FlowRefused,
            };
            return answer_unreachable(ctx, &refusal, now).map(Outcome::Answered);
        }
        Err(other) => return Err(other),
    };
    count(Counter::FlowCreated);
    account(admitted.server.id, tot_len, true);
    let counter = if admitted.hairpin { Counter::Hairpinned } else { Counter::PortForwarded };
    Ok(Outcome::Translate { to: flow.translated, route, counter })
}

/// Copies a MAC address as a 32-bit and a 16-bit word: a `[u8; 6]`
/// assignment became a memmove call on the fast path.
#[inline(always)]
fn set_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: both are 6 bytes; unaligned accesses are fine for BPF on
    // packet and stack memory.
    unsafe {
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        core::ptr::write_unaligned(d.cast::<u32>(), core::ptr::read_unaligned(s.cast::<u32>()));
        core::ptr::write_unaligned(
            d.add(4).cast::<u16>(),
            core::ptr::read_unaligned(s.add(4).cast::<u16>()),
        );
    }
}

/// The Ethernet header's destination and source MAC addresses as the
/// three words `CachedRoute` keeps.
#[inline(always)]
fn eth_addrs(dmac: &[u8; 6], smac: &[u8; 6]) -> [u32; 3] {
    let (d, s) = (dmac, smac);
    [
        u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        u32::from_ne_bytes([d[4], d[5], s[0], s[1]]),
        u32::from_ne_bytes([s[2], s[3], s[4], s[5]]),
    ]
}

/// Sets the MAC addresses and picks the action for a translated packet.
#[inline(always)]
fn send(eth: &mut EthHeader, route: &Route, counter: Counter) -> Result<(u32, Counter), Counter> {
    match *route {
        Route::Resolved { action, eth_addrs, .. } => {
            let addrs = eth.dst.as_mut_ptr().cast::<u32>();
            // SAFETY: the 12 bytes of both addresses, in the packet.
            unsafe {
                addrs.write_unaligned(eth_addrs[0]);
                addrs.add(1).write_unaligned(eth_addrs[1]);
                addrs.add(2).write_unaligned(eth_addrs[2]);
            }
            Ok((action, counter))
        }
        Route::Unresolved { .. } => {
            count(Counter::NeighRedirected);
            Ok((xdp_action::XDP_PASS, counter))
        }
        Route::TooBig { .. } => Err(Counter::PassTooBig),
    }
}

const ICMP_OFFSET: usize = L4_OFFSET;
const EMBEDDED_IP_OFFSET: usize = ICMP_OFFSET + ICMP_HEADER_LEN;
const EMBEDDED_L4_OFFSET: usize = EMBEDDED_IP_OFFSET + IPV4_HEADER_LEN;

/// An ICMP error about a packet of a tracked flow goes to that packet's
/// sender, its outer and embedded headers translated back (RFC 5508).
/// Errors do not refresh the flow. Not inlined: a stack frame of its own.
#[inline(always)]
fn try_icmp_error(
    ctx: &XdpContext,
    outer_src: u32,
    tot_len: u16,
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let icmp_header: *mut IcmpHeader = ptr_at(ctx, ICMP_OFFSET)?;
    if !icmp::is_error(unsafe { (*icmp_header).icmp_type }) {
        return Err(Counter::PassNotTcpUdp);
    }
    let inner: *mut Ipv4Header =
        ptr_at(ctx, EMBEDDED_IP_OFFSET).map_err(|_| Counter::PassIcmpNoFlow)?;
    let (inner_version_ihl, inner_proto, inner_src, inner_dst) =
        unsafe { ((*inner).version_ihl, (*inner).proto, (*inner).src_addr, (*inner).dst_addr) };
    if inner_version_ihl != 0x45 || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP) {
        return Err(Counter::PassIcmpNoFlow);
    }
    let ports: *mut [u16; 2] =
        ptr_at(ctx, EMBEDDED_L4_OFFSET).map_err(|_| Counter::PassIcmpNoFlow)?;
    let [src_port, dst_port] = unsafe { *ports };
    let embedded = FlowKey::new(inner_src, inner_dst, src_port, dst_port, inner_proto);
    // The error comes from where the flow's packets in the other direction
    // come from: the same interface binding applies.
    let ingress = ctx.ingress_ifindex() as u32;
    let flow =
        find_flow(&embedded.reversed(), ingress, settings, now)?.ok_or(Counter::PassIcmpNoFlow)?;
    let translated = unsafe { (*flow.entry).translated };
    let rewrite = icmp::error_rewrite(outer_src, &embedded, &translated);
    let outer_to = FlowKey::new(rewrite.outer_src, rewrite.outer_dst, 0, 0, IPPROTO_ICMP);
    let (route, _) = fib_lookup(ctx, &outer_to, tot_len)?;
    if let Route::TooBig { .. } = route {
        return Err(Counter::PassTooBig);
    }
    if let Route::Unresolved { ifindex } = route {
        hand_to_kernel(ctx, ifindex)?;
    }

    // hand_to_kernel may have moved the packet: look everything up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let icmp_header: *mut IcmpHeader = ptr_at(ctx, ICMP_OFFSET)?;
    let inner: *mut Ipv4Header = ptr_at(ctx, EMBEDDED_IP_OFFSET)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, EMBEDDED_L4_OFFSET)?;
    // The embedded transport checksum, when the error quotes that far.
    let l4_check: Option<*mut u16> = if inner_proto == IPPROTO_UDP {
        ptr_at::<UdpHeader>(ctx, EMBEDDED_L4_OFFSET)
            .ok()
            .map(|udp| unsafe { &raw mut (*udp).check })
    } else {
        ptr_at::<TcpHeader>(ctx, EMBEDDED_L4_OFFSET)
            .ok()
            .map(|tcp| unsafe { &raw mut (*tcp).check })
    };
    let to = rewrite.embedded;
    unsafe {
        let old_ip_check = (*inner).check;
        let mut new_ip_check = checksum::replace_u32(old_ip_check, embedded.src_addr, to.src_addr);
        new_ip_check = checksum::replace_u32(new_ip_check, embedded.dst_addr, to.dst_addr);
        let (old_l4_check, new_l4_check) = match l4_check {
            Some(check) => {
                let old = *check;
                let new =
                    checksum::l4_after_rewrite(old, &embedded, &to, inner_proto == IPPROTO_UDP);
                *check = new;
                (old, new)
            }
            None => (0, 0),
        };
        (*icmp_header).check = icmp::checksum_after(
            (*icmp_header).check,
            &embedded,
            &to,
            (old_ip_check, new_ip_check),
            (old_l4_check, new_l4_check),
        );
        (*inner).check = new_ip_check;
        (*inner).src_addr = to.src_addr;
        (*inner).dst_addr = to.dst_addr;
        *ports = [to.src_port, to.dst_port];
        let outer_from = FlowKey::new((*ip).src_addr, (*ip).dst_addr, 0, 0, IPPROTO_ICMP);
        rewrite_ipv4(&mut *ip, &outer_from, &outer_to);
        send(&mut *eth, &route, Counter::IcmpTranslated)
    }
}

/// A live conntrack entry, the table it is in, and its partner (the other
/// direction's entry) where the lookup needed it: for entries of the
/// new-flow table (to check it is still there), and for TCP replies (the
/// original entry holds the windows). Null otherwise.
struct Flow {
    entry: *mut FlowEntry,
    partner: *mut FlowEntry,
    established: bool,
}

/// The live entry for `key` arriving on `ingress`: established flows first,
/// then new ones. An entry idle past its timeout counts as live while its
/// partner is not; once both are, the flow is removed and absent. A tuple
/// that arrives on another interface than its direction's is no flow's
/// (`Err`): a WAN host cannot steer a LAN flow by sending its tuple. Not
/// inlined: its keys get a stack frame of their own.
#[inline(always)]
fn find_flow(
    key: &FlowKey,
    ingress: u32,
    settings: &Settings,
    now: u64,
) -> Result<Option<Flow>, Counter> {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        if !expired(key, entry, settings, now, true) {
            // SAFETY: a map value; fields are copied out.
            let (entry_ingress, direction, proto) =
                unsafe { ((*entry).ingress, (*entry).direction, (*entry).translated.proto) };
            if !nat::on_its_side(entry_ingress, ingress) {
                return Err(Counter::WrongInterface);
            }
            let mut partner = core::ptr::null_mut();
            if proto == IPPROTO_TCP && direction != DIRECTION_ORIGINAL {
                // The original entry holds the windows. Promotion enters it
                // first, so without it the flow is being removed: gone.
                let partner_key = unsafe { (*entry).translated.reversed() };
                match CONNTRACK.get_ptr_mut(&partner_key) {
                    Some(original) => partner = original,
                    None => {
                        let _ = CONNTRACK.remove(key);
                        count(Counter::FlowOrphaned);
                        return Ok(None);
                    }
                }
            }
            return Ok(Some(Flow { entry, partner, established: true }));
        }
    }
    let Some(entry) = CONNTRACK_NEW.get_ptr_mut(key) else {
        return Ok(None);
    };
    if expired(key, entry, settings, now, false) {
        return Ok(None);
    }
    let entry_ingress = unsafe { (*entry).ingress };
    if !nat::on_its_side(entry_ingress, ingress) {
        return Err(Counter::WrongInterface);
    }
    // The new-flow table evicts entries one by one: an entry without its
    // partner is half a dead flow, whose SNAT port may be another's by now.
    let partner_key = unsafe { (*entry).translated.reversed() };
    let partner = match CONNTRACK_NEW.get_ptr_mut(&partner_key) {
        Some(partner) if nat::partner_matches(key, unsafe { &(*partner).translated }) => partner,
        _ => {
            let _ = CONNTRACK_NEW.remove(key);
            count(Counter::FlowOrphaned);
            return Ok(None);
        }
    };
    Ok(Some(Flow { entry, partner, established: false }))
}

/// Whether the flow of `entry` has expired; if so, removes both its entries.
#[inline(always)]
fn expired(
    key: &FlowKey,
    entry: *mut FlowEntry,
    settings: &Settings,
    now: u64,
    established: bool,
) -> bool {
    // SAFETY: a map value; fields are copied out.
    let (state, last_seen, partner_key) =
        unsafe { ((*entry).state, (*entry).last_seen_ns, (*entry).translated.reversed()) };
    if !settings.expired(state, last_seen, now) {
        return false;
    }
    let partner = if established {
        CONNTRACK.get_ptr(&partner_key)
    } else {
        CONNTRACK_NEW.get_ptr(&partner_key)
    };
    if let Some(partner) = partner {
        // SAFETY: a map value.
        if !settings.expired(state, unsafe { (*partner).last_seen_ns }, now) {
            return false;
        }
    }
    if established {
        let _ = CONNTRACK.remove(key);
        let _ = CONNTRACK.remove(&partner_key);
    } else {
        let _ = CONNTRACK_NEW.remove(key);
        let _ = CONNTRACK_NEW.remove(&partner_key);
    }
    count(Counter::FlowExpired);
    true
}

/// Moves the flow on with a packet: counters, last seen, state, and the
/// established table once the flow has earned it.
#[inline(always)]
fn track(
    flow: &Flow,
    packet: &FlowKey,
    segment: &Segment,
    now: u64,
    len: u16,
) -> Result<(), Counter> {
    const REFRESH_NS: u64 = 1_000_000_000;
    let entry = flow.entry;
    // SAFETY: a map value; fields are copied out.
    let (mapping_id, old_state, old_fin_seen, direction, created_s) = unsafe {
        (
            (*entry).mapping_id,
            (*entry).state,
            (*entry).fin_seen,
            (*entry).direction,
            (*entry).created_s,
        )
    };
    let (state, fin_seen) = if packet.proto == IPPROTO_TCP {
        // The original entry holds both directions' windows.
        let holder = if direction == DIRECTION_ORIGINAL { entry } else { flow.partner };
        if holder.is_null() {
            return Err(Counter::FlowOrphaned);
        }
        // SAFETY: a map value. Another CPU may track the other direction at
        // the same time; a lost update leaves a window smaller by one
        // segment, which the next segment widens again.
        let windows = unsafe { &mut (*holder).tcp };
        let tracked = tcp::track(old_state, old_fin_seen, windows, direction, segment)?;
        if tracked.rst_not_exact {
            count(Counter::TcpRstNotExact);
        }
        (tracked.state, tracked.fin_seen)
    } else {
        (nat::udp_next_state(old_state, direction), old_fin_seen)
    };
    // SAFETY: map values shared between CPUs: the counters are added
    // atomically.
    let refreshed = unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*entry).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).bytes, len as u64);
        let refreshed = now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS;
        if refreshed {
            (*entry).last_seen_ns = now;
        }
        refreshed
    };
    account(mapping_id, len, false);
    // Tried when the flow earns it, then at most once a second while the
    // established table is full: not twice a packet.
    let promote_now = !flow.established
        && nat::should_promote(state, created_s, now)
        && (state != old_state || refreshed);
    if state == old_state && fin_seen == old_fin_seen && !promote_now {
        return Ok(());
    }
    let partner = if !flow.partner.is_null() {
        flow.partner
    } else {
        let partner_key = unsafe { (*entry).translated.reversed() };
        match CONNTRACK.get_ptr_mut(&partner_key) {
            Some(partner) => partner,
            None => return Ok(()),
        }
    };
    unsafe {
        (*entry).state = state;
        (*entry).fin_seen = fin_seen;
        (*entry).last_seen_ns = now;
        (*partner).state = state;
        (*partner).fin_seen = fin_seen;
    }
    if promote_now {
        let partner_key = unsafe { (*entry).translated.reversed() };
        // SAFETY: map values; the helpers copy them into the other table.
        promote(packet, unsafe { &*entry }, &partner_key, unsafe { &*partner });
    }
    Ok(())
}

/// Moves a flow's two entries from the new to the established table. The
/// original entry goes first: it holds the TCP windows, and a reply found
/// in the established table must find it there (lookups try that table
/// first, so until both are in, both are still found in the new one).
#[inline(always)]
fn promote(key: &FlowKey, entry: &FlowEntry, partner_key: &FlowKey, partner: &FlowEntry) {
    let (first_key, first, second_key, second) = if entry.direction == DIRECTION_ORIGINAL {
        (key, entry, partner_key, partner)
    } else {
        (partner_key, partner, key, entry)
    };
    if CONNTRACK.insert(first_key, first, BPF_ANY as u64).is_err() {
        count(Counter::EstablishedTableFull);
        return;
    }
    if CONNTRACK.insert(second_key, second, BPF_ANY as u64).is_err() {
        let _ = CONNTRACK.remove(first_key);
        count(Counter::EstablishedTableFull);
        return;
    }
    let _ = CONNTRACK_NEW.remove(key);
    let _ = CONNTRACK_NEW.remove(partner_key);
    count(Counter::FlowEstablished);
}

#[inline(always)]
fn l4_header(ctx: &XdpContext, proto: u8) -> Result<L4, Counter> {
    if proto == IPPROTO_UDP {
        let udp: *mut UdpHeader = ptr_at(ctx, L4_OFFSET)?;
        return unsafe { Ok(L4 { check: &raw mut (*udp).check, ports: udp.cast() }) };
    }
    let tcp: *mut TcpHeader = ptr_at(ctx, L4_OFFSET)?;
    unsafe { Ok(L4 { check: &raw mut (*tcp).check, ports: tcp.cast() }) }
}

/// What TCP tracking needs of the packet's TCP header.
#[inline(always)]
fn tcp_segment(ctx: &XdpContext, tot_len: u16) -> Result<Segment, Counter> {
    let tcp: *mut TcpHeader = ptr_at(ctx, L4_OFFSET)?;
    // SAFETY: bounds checked by ptr_at.
    let (seq, ack, data_offset, flags, window) =
        unsafe { ((*tcp).seq, (*tcp).ack_seq, (*tcp).data_offset, (*tcp).flags, (*tcp).window) };
    let header_len = ((data_offset >> 4) as u32) * 4;
    if header_len < 20 {
        return Err(Counter::PassMalformed);
    }
    let payload_len = (tot_len as u32).saturating_sub(IPV4_HEADER_LEN as u32 + header_len);
    let window_scale = if flags & TCP_SYN != 0 { syn_window_scale(ctx) } else { NO_WINDOW_SCALE };
    Ok(Segment {
        seq: u32::from_be(seq),
        ack: u32::from_be(ack),
        window: u16::from_be(window),
        flags,
        payload_len,
        window_scale,
    })
}

/// The window scale a SYN announces, from its options, read into a per-CPU
/// buffer (the stack has no room for it).
#[inline(always)]
fn syn_window_scale(ctx: &XdpContext) -> u8 {
    const TCP_HEADER_WORDS: u32 = 5;
    let Ok(tcp) = ptr_at::<TcpHeader>(ctx, L4_OFFSET) else {
        return NO_WINDOW_SCALE;
    };
    // SAFETY: bounds checked by ptr_at.
    let data_offset = unsafe { (*tcp).data_offset };
    let words = (data_offset >> 4) as u32;
    if words <= TCP_HEADER_WORDS {
        return NO_WINDOW_SCALE;
    }
    let options_len = (words - TCP_HEADER_WORDS) * 4;
    // LLVM folds this into arithmetic whose bounds the verifier loses; read
    // back through the stack, the checks below are what it sees: 4 to 40.
    let options_len = core::hint::black_box(options_len);
    if options_len < 4 {
        return NO_WINDOW_SCALE;
    }
    if options_len > MAX_OPTIONS_LEN as u32 {
        return NO_WINDOW_SCALE;
    }
    let Some(options) = TCP_OPTIONS_SCRATCH.get_ptr_mut(0) else {
        return NO_WINDOW_SCALE;
    };
    let offset = L4_OFFSET as u32 + TCP_HEADER_WORDS * 4;
    // SAFETY: copies at most MAX_OPTIONS_LEN bytes into this CPU's buffer.
    let loaded = unsafe { bpf_xdp_load_bytes(ctx.ctx, offset, options.cast(), options_len) };
    if loaded != 0 {
        return NO_WINDOW_SCALE;
    }
    // SAFETY: this CPU's buffer, just written.
    tcp::window_scale(unsafe { &*options }, options_len as usize)
}

/// A new flow the mapping table and the interface's role let in.
struct Admitted {
    server: MappingValue,
    /// A LAN client through the public address (else a WAN port forward).
    hairpin: bool,
    /// The translated tuple with the client's own port, for the route.
    provisional: FlowKey,
}

enum Admission {
    Admitted(Admitted),
    /// From a source in the deny set: dropped.
    Denied,
}

/// A packet without a conntrack entry may open a flow if it is a client's
/// first packet to a mapped public address and port: a LAN client's on a LAN
/// interface (hairpin), anyone else's on a WAN interface (port forward), and
/// only as the mapping rule's restrictions and the deny set allow.
#[inline(always)]
fn admit_new_flow(
    ctx: &XdpContext,
    packet: &FlowKey,
    tcp_flags: u8,
    settings: &Settings,
) -> Result<Admission, Counter> {
    let mapping_key = MappingKey {
        public_addr: packet.dst_addr,
        public_port: packet.dst_port,
        proto: packet.proto,
        _pad: 0,
    };
    let server = *unsafe { MAPPINGS.get(&mapping_key) }.ok_or(Counter::PassNoMapping)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let role = *unsafe { INTERFACES.get(&ingress) }.ok_or(Counter::PassUnknownInterface)?;
    let lan_source = LAN_NETWORKS.get(Key::new(32, packet.src_addr)).is_some();
    let hairpin = nat::new_flow_kind(role, lan_source)?;
    if !hairpin && DENY_NETWORKS.get(Key::new(32, packet.src_addr)).is_some() {
        return Ok(Admission::Denied);
    }
    if server.flags & MAPPING_ALLOWLIST != 0 {
        let source = RuleSource { rule: (server.id as u32).to_be(), addr: packet.src_addr };
        if MAPPING_SOURCES.get(Key::new(64, source)).is_none() {
            return Err(Counter::PassNotAllowed);
        }
    }
    if server.flags & MAPPING_INTERFACE_BOUND != 0 {
        let bound = RuleInterface { ifindex: ingress, rule: server.id, _pad: 0 };
        if unsafe { MAPPING_INTERFACES.get(&bound) }.is_none() {
            return Err(Counter::PassInterfaceNotAllowed);
        }
    }
    if packet.proto != IPPROTO_UDP && !nat::tcp_opens_flow(tcp_flags) {
        return Err(Counter::PassTcpNotSyn);
    }
    let src_addr = if hairpin { settings.lan_addr } else { packet.src_addr };
    let provisional = FlowKey::new(
        src_addr,
        server.server_addr,
        packet.src_port,
        server.server_port,
        packet.proto,
    );
    Ok(Admission::Admitted(Admitted { server, hairpin, provisional }))
}

/// Where an entered flow's first packet goes.
struct Created {
    translated: FlowKey,
}

/// Enters both directions of a new flow into the table of new flows, the
/// reply entry first with BPF_NOEXIST: that insert is what makes the
/// translated tuple unique. A hairpin flow tries the client's port and then
/// random ones of the SNAT range, a bounded number of times.
#[inline(always)]
fn create_flow(
    packet: &FlowKey,
    admitted: &Admitted,
    sides: &Sides,
    syn: &Segment,
    settings: &Settings,
    now: u64,
    tot_len: u16,
) -> Result<Created, Counter> {
    let client_port = u16::from_be(packet.src_port);
    let attempts = if admitted.hairpin { SNAT_PORT_ATTEMPTS } else { 1 };
    let start = unsafe { bpf_get_prandom_u32() };
    let flow = NEW_FLOW_SCRATCH.get_ptr_mut(0).ok_or(Counter::PassFlowRace)?;
    // SAFETY: this CPU's scratch slot; XDP runs to completion on a CPU.
    let flow = unsafe { &mut *flow };
    // Built once; the retries change only the SNAT port.
    if admitted.hairpin {
        let lan_addr = settings.lan_addr;
        nat::hairpin_flow(flow, packet, &admitted.server, lan_addr, packet.src_port, sides, now);
    } else {
        nat::port_forward_flow(flow, packet, &admitted.server, sides, now);
    }
    flow.original.packets = 1;
    flow.original.bytes = tot_len as u64;
    if packet.proto == IPPROTO_TCP {
        flow.original.tcp = tcp::open(syn);
    }
    for attempt in 0..attempts {
        if admitted.hairpin {
            let port = nat::snat_port_candidate(
                client_port,
                attempt,
                start,
                settings.snat_port_first,
                settings.snat_port_last,
            )
            .to_be();
            flow.original.translated.src_port = port;
            flow.reply_key.dst_port = port;
        }
        // An established flow's port stays taken until user space reclaims
        // it, even once idle: checking expiry here would multiply the
        // verifier's paths by the retries.
        if CONNTRACK.get_ptr(&flow.reply_key).is_some()
            || CONNTRACK_NEW.insert(&flow.reply_key, &flow.reply, BPF_NOEXIST as u64).is_err()
        {
            continue;
        }
        if CONNTRACK_NEW.insert(&flow.original_key, &flow.original, BPF_NOEXIST as u64).is_ok() {
            return Ok(Created { translated: flow.original.translated });
        }
        // Another CPU entered this flow in the meantime; the client's
        // retransmission will find that entry.
        let _ = CONNTRACK_NEW.remove(&flow.reply_key);
        return Err(Counter::PassFlowRace);
    }
    Err(if admitted.hairpin { Counter::PortAllocFailed } else { Counter::PassFlowRace })
}

enum Route {
    /// Sent on with `action`: XDP_TX back out of the ingress interface, or
    /// XDP_REDIRECT with the egress device already chosen.
    Resolved { action: u32, egress: u32, eth_addrs: [u32; 3] },
    /// Routed out of `ifindex`, but the next hop's MAC is not known yet.
    Unresolved { ifindex: u32 },
    /// Larger than the egress MTU.
    TooBig { mtu: u16 },
}

impl Route {
    /// The interface the packet leaves through (0 when it does not leave).
    #[inline(always)]
    fn egress(&self) -> u32 {
        match *self {
            Route::Resolved { egress, .. } => egress,
            Route::Unresolved { ifindex } => ifindex,
            Route::TooBig { .. } => 0,
        }
    }
}

/// The route of a tracked flow's packet: the one cached in its entry while
/// that is valid, else looked up (and cached, while caching is on).
#[inline(always)]
fn flow_route(
    ctx: &XdpContext,
    flow: &Flow,
    translated: &FlowKey,
    tot_len: u16,
    now: u64,
) -> Result<Route, Counter> {
    let ingress = ctx.ingress_ifindex() as u32;
    // Read before the lookup: a change the lookup misses has moved the
    // generation on after this read, so the result is cached as stale.
    let cache = ROUTE_CACHE.get(0).copied().unwrap_or_default();
    // SAFETY: a map value, only read here.
    let (cached, last_seen_ns) = unsafe { ((*flow.entry).route, (*flow.entry).last_seen_ns) };
    if route::cached_route_valid(&cache, &cached, last_seen_ns, ingress, tot_len, now) {
        let action = forward_action(ingress, cached.egress)?;
        return Ok(Route::Resolved { action, egress: cached.egress, eth_addrs: cached.eth_addrs });
    }
    let (route, found) = fib_lookup(ctx, translated, tot_len)?;
    if let Some(found) = found
        && cache.usable(now)
    {
        // SAFETY: a map value. Another CPU writing the same flow's entry
        // writes the same result, unless a change races with both, and then
        // the generation has moved on.
        unsafe { (*flow.entry).route = CachedRoute { generation: cache.generation, ..found } };
        count(Counter::RouteCached);
    }
    Ok(route)
}

/// XDP_TX back out of the ingress interface, or a redirect to a managed one.
#[inline(always)]
fn forward_action(ingress: u32, egress: u32) -> Result<u32, Counter> {
    if egress == ingress {
        return Ok(xdp_action::XDP_TX);
    }
    // Choosing the devmap target now, before anything is rewritten, is also
    // the check that hairpin manages the egress interface.
    EGRESS_DEVICES.redirect(egress, 0).map_err(|_| Counter::PassEgressNotManaged)
}

/// Looks the route up, and gives the result to cache when it is one. Not
/// inlined: each caller would get its own copy of the parameters on the
/// stack.
#[inline(always)]
fn fib_lookup(
    ctx: &XdpContext,
    to: &FlowKey,
    tot_len: u16,
) -> Result<(Route, Option<CachedRoute>), Counter> {
    const WORDS: usize = size_of::<FibParams>() / 8;
    const _: () = assert!(size_of::<FibParams>() == WORDS * 8);
    // Zeroed word by word with volatile stores: any plain zeroing of the
    // struct became a call to memset on the fast path.
    let mut storage = core::mem::MaybeUninit::<[u64; WORDS]>::uninit();
    let words = storage.as_mut_ptr().cast::<u64>();
    for word in 0..WORDS {
        // SAFETY: within the array.
        unsafe { words.add(word).write_volatile(0) };
    }
    // SAFETY: every byte was written, all zeros is a valid FibParams, and it
    // is used in place (moving it out would be zeroed again, by memset).
    let params = unsafe { &mut *storage.as_mut_ptr().cast::<FibParams>() };
    params.family = AF_INET;
    params.l4_protocol = to.proto;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = to.src_addr;
    params.__bindgen_anon_4.ipv4_dst = to.dst_addr;
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, size_of::<FibParams>() as i32, 0) };
    let ingress = ctx.ingress_ifindex() as u32;
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let action = forward_action(ingress, params.ifindex)?;
            let eth_addrs = eth_addrs(&params.dmac, &params.smac);
            // The kernel returns the egress MTU on success too (since 5.12);
            // before, the field still held tot_len, which is as safe a bound.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            let found =
                CachedRoute { generation: 0, mtu, ingress, egress: params.ifindex, eth_addrs };
            Ok((Route::Resolved { action, egress: params.ifindex, eth_addrs }, Some(found)))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            if params.ifindex != ingress && EGRESS_DEVICES.get(params.ifindex).is_none() {
                return Err(Counter::PassEgressNotManaged);
            }
            Ok((Route::Unresolved { ifindex: params.ifindex }, None))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Ok((Route::TooBig { mtu: unsafe { params.__bindgen_anon_1.mtu_result } }, None))
        }
        _ => Err(Counter::FibFailed),
    }
}

/// A packet too big for the egress link. Sent towards a server or a WAN
/// client in reply, it goes to the kernel untouched: its addresses are
/// routable, so the kernel forwards it no further and answers "fragmentation
/// needed" to its sender. Sent to the public address, the kernel would take
/// it as its own, so hairpin answers itself (when DF is set; without DF the
/// kernel gets it, as it would fragment it).
#[inline(always)]
fn too_big(
    ctx: &XdpContext,
    mtu: u16,
    to_public_address: bool,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    if !to_public_address {
        return Err(Counter::PassTooBig);
    }
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked.
    let (frag_off, tot_len, public_addr) =
        unsafe { ((*ip).frag_off, (*ip).tot_len, (*ip).dst_addr) };
    if u16::from_be(frag_off) & IP_DONT_FRAGMENT == 0 {
        return Err(Counter::PassTooBig);
    }
    let answer = Unreachable {
        code: icmp::ICMP_FRAG_NEEDED,
        mtu,
        from_addr: public_addr,
        tot_len: u16::from_be(tot_len),
        counter: Counter::FragNeededSent,
    };
    answer_unreachable(ctx, &answer, now)
}

/// An ICMP "destination unreachable" to send in answer to a packet.
#[derive(Clone, Copy)]
struct Unreachable {
    code: u8,
    /// The next-hop MTU, for "fragmentation needed".
    mtu: u16,
    from_addr: u32,
    /// The answered packet's IPv4 total length.
    tot_len: u16,
    /// The verdict counted when the answer goes out.
    counter: Counter,
}

/// Turns the packet into the ICMP "destination unreachable" `answer` to its
/// sender: the received IPv4 header and 8 bytes after it are quoted, the
/// rest cut off, and it goes back out where it came from. Over the ICMP
/// rate limit, the packet is dropped instead. Not inlined: a stack frame of
/// its own.
#[inline(always)]
fn answer_unreachable(
    ctx: &XdpContext,
    answer: &Unreachable,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let Unreachable { code, mtu, from_addr, tot_len, counter } = *answer;
    let bucket = ICMP_RATE.get_ptr_mut(0).ok_or(Counter::IcmpRateLimited)?;
    // SAFETY: this CPU's bucket; XDP runs to completion on a CPU.
    if !ratelimit::take(unsafe { &mut *bucket }, now) {
        return Ok((xdp_action::XDP_DROP, Counter::IcmpRateLimited));
    }
    const QUOTE_LEN: usize = IPV4_HEADER_LEN + 8;
    const ICMP_LEN: usize = ICMP_HEADER_LEN + QUOTE_LEN;
    const PREPENDED: usize = IPV4_HEADER_LEN + ICMP_HEADER_LEN;
    const OLD_ETH: usize = PREPENDED;
    const QUOTE: usize = PREPENDED + ETH_HEADER_LEN;
    let frame_len = ETH_HEADER_LEN as i32 + tot_len as i32;
    let keep = (ETH_HEADER_LEN + QUOTE_LEN) as i32;
    if frame_len < keep {
        return Err(Counter::PassMalformed);
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - frame_len) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(PREPENDED as i32)) } != 0
    {
        // The packet may be half cut now: better dropped than sent on.
        return Ok((xdp_action::XDP_DROP, Counter::IcmpAnswerFailed));
    }
    let new_eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let old_eth: *mut EthHeader = ptr_at(ctx, OLD_ETH)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let icmp_header: *mut IcmpHeader = ptr_at(ctx, ICMP_OFFSET)?;
    let quoted: *mut Ipv4Header = ptr_at(ctx, QUOTE)?;
    let icmp_words: *mut [u16; ICMP_LEN / 2] = ptr_at(ctx, ICMP_OFFSET)?;
    let ip_words: *mut [u16; IPV4_HEADER_LEN / 2] = ptr_at(ctx, ETH_HEADER_LEN)?;
    unsafe {
        set_mac(&mut (*new_eth).dst, &(*old_eth).src);
        set_mac(&mut (*new_eth).src, &(*old_eth).dst);
        (*new_eth).ether_type = ETH_P_IPV4.to_be();
        let sender = (*quoted).src_addr;
        *ip = Ipv4Header {
            version_ihl: 0x45,
            tos: 0,
            tot_len: ((IPV4_HEADER_LEN + ICMP_LEN) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            check: 0,
            src_addr: from_addr,
            dst_addr: sender,
        };
        (*ip).check = !checksum::fold(sum_words(&*ip_words));
        let mtu = mtu.to_be_bytes();
        *icmp_header = IcmpHeader {
            icmp_type: icmp::ICMP_DEST_UNREACH,
            code,
            check: 0,
            rest: u32::from_ne_bytes([0, 0, mtu[0], mtu[1]]),
        };
        (*icmp_header).check = !checksum::fold(sum_words(&*icmp_words));
    }
    Ok((xdp_action::XDP_TX, counter))
}

#[inline(always)]
fn sum_words<const N: usize>(words: &[u16; N]) -> u32 {
    let mut sum = 0u32;
    for word in words {
        sum += *word as u32;
    }
    sum
}

/// Prepends the metadata that asks the TC ingress program to send the packet
/// on with `bpf_redirect_neigh`, which resolves the next hop and queues the
/// packet meanwhile, so even a flow's first packet is not lost.
#[inline(always)]
fn hand_to_kernel(ctx: &XdpContext, ifindex: u32) -> Result<(), Counter> {
    let len = size_of::<NeighRedirect>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        warn!(ctx, "no room for XDP metadata; packet passed untranslated");
        return Err(Counter::PassNoMetadata);
    }
    let meta = ctx.metadata();
    if meta + size_of::<NeighRedirect>() > ctx.data() {
        return Err(Counter::PassNoMetadata);
    }
    let meta = meta as *mut NeighRedirect;
    unsafe {
        (*meta).magic = NEIGH_REDIRECT_MAGIC;
        (*meta).ifindex = ifindex;
    }
    Ok(())
}

/// New addresses and one hop less.
#[inline(always)]
fn rewrite_ipv4(ip: &mut Ipv4Header, from: &FlowKey, to: &FlowKey) {
    let ttl_proto = |ip: &Ipv4Header| u16::from_ne_bytes([ip.ttl, ip.proto]);
    let old_ttl_proto = ttl_proto(ip);
    ip.ttl -= 1;
    ip.check = checksum::ipv4_after_rewrite(ip.check, from, to, old_ttl_proto, ttl_proto(ip));
    ip.src_addr = to.src_addr;
    ip.dst_addr = to.dst_addr;
}

#[inline(always)]
fn rewrite(ip: &mut Ipv4Header, l4: &L4, from: &FlowKey, to: &FlowKey) {
    rewrite_ipv4(ip, from, to);
    unsafe {
        *l4.check = checksum::l4_after_rewrite(*l4.check, from, to, from.proto == IPPROTO_UDP);
        *l4.ports = [to.src_port, to.dst_port];
    }
}

/// TC ingress: sends on the packets the XDP program translated but could
/// not forward because the next hop's MAC was not resolved.
#[classifier]
pub fn hairpin_neigh_redirect(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + size_of::<NeighRedirect>() > data {
        return TC_ACT_OK as i32;
    }
    let redirect = unsafe { &*(meta as *const NeighRedirect) };
    if redirect.magic != NEIGH_REDIRECT_MAGIC {
        return TC_ACT_OK as i32;
    }
    unsafe { bpf_redirect_neigh(redirect.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
