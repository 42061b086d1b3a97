//! Where a translated packet goes: the route cached in its flow or looked
//! up with `bpf_fib_lookup`, and how it is sent.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup},
};
use hairpin_common::{
    CachedRoute, Counter, FlowKey, FragmentKey, TC_HANDOFF_MAGIC, TcHandoff, packet::EthHeader,
    route,
};

use crate::{
    conntrack::Flow,
    context::Packet,
    maps::{ROUTE_CACHE, count},
    packet::eth_addrs,
};

pub(crate) const AF_INET: u8 = 2;

/// Sets the MAC addresses and picks the action for a translated packet.
#[inline(always)]
pub(crate) fn send<C: Packet>(
    eth: &mut EthHeader,
    route: &Route,
    counter: Counter,
) -> Result<(u32, Counter), Counter> {
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
        // Handed off already (`hand_to_kernel`): the TC program sends it
        // once it is passed.
        Route::Unresolved { .. } => {
            count(Counter::NeighRedirected);
            Ok((C::PASS, counter))
        }
        Route::TooBig { .. } => Ok((C::DROP, Counter::TooBigDropped)),
    }
}

pub(crate) enum Route {
    /// Sent on with `action`: back out of the ingress interface, or
    /// redirected with the egress device already chosen.
    Resolved { action: u32, egress: u32, eth_addrs: [u32; 3], mtu: u16 },
    /// Routed out of `ifindex`, but sent by the kernel (TC,
    /// `bpf_redirect_neigh`): the next hop's MAC is not known yet, or XDP
    /// cannot send there (no devmap entry to redirect to).
    Unresolved { ifindex: u32 },
    /// Larger than the egress MTU.
    TooBig { mtu: u16 },
}

impl Route {
    /// The interface the packet leaves through (0 when it does not leave).
    #[inline(always)]
    pub(crate) fn egress(&self) -> u32 {
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
pub(crate) fn flow_route(
    ctx: &impl Packet,
    flow: &Flow,
    translated: &FlowKey,
    tot_len: u16,
    now: u64,
) -> Result<Route, Counter> {
    let ingress = ctx.ingress();
    // Read before the lookup: a change the lookup misses has moved the
    // generation on after this read, so the result is cached as stale.
    let cache = ROUTE_CACHE.get(0).copied().unwrap_or_default();
    // SAFETY: a map value, only read here.
    let (cached, last_seen_ns) = unsafe { ((*flow.entry).route, (*flow.entry).last_seen_ns) };
    if route::cached_route_valid(&cache, &cached, last_seen_ns, ingress, tot_len, now) {
        let Some(action) = forward_action(ctx, cached.egress) else {
            return Ok(Route::Unresolved { ifindex: cached.egress });
        };
        let (egress, eth_addrs, mtu) = (cached.egress, cached.eth_addrs, cached.mtu);
        return Ok(Route::Resolved { action, egress, eth_addrs, mtu });
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

/// Back out of the ingress interface, or a redirect to `egress`; `None`
/// where the program cannot send itself.
#[inline(always)]
pub(crate) fn forward_action(ctx: &impl Packet, egress: u32) -> Option<u32> {
    if egress == ctx.ingress() {
        return Some(ctx.tx());
    }
    ctx.redirect(egress)
}

/// Looks the route up, and gives the result to cache when it is one.
#[inline(always)]
pub(crate) fn fib_lookup(
    ctx: &impl Packet,
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
    // Never 0: for an skb that would check the whole skb against the
    // egress MTU, a GSO aggregate included.
    params.__bindgen_anon_1.tot_len = tot_len.max(1);
    params.ifindex = ctx.ingress();
    params.__bindgen_anon_3.ipv4_src = to.src_addr;
    params.__bindgen_anon_4.ipv4_dst = to.dst_addr;
    let ret = unsafe { bpf_fib_lookup(ctx.raw(), params, size_of::<FibParams>() as i32, 0) };
    let ingress = ctx.ingress();
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let egress = params.ifindex;
            let eth_addrs = eth_addrs(&params.dmac, &params.smac);
            // The kernel returns the egress MTU on success too (since 5.12);
            // before, the field still held tot_len, which is as safe a bound.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            let found = CachedRoute { generation: 0, mtu, ingress, egress, eth_addrs };
            let route = match forward_action(ctx, egress) {
                Some(action) => Route::Resolved { action, egress, eth_addrs, mtu },
                None => Route::Unresolved { ifindex: egress },
            };
            Ok((route, Some(found)))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok((Route::Unresolved { ifindex: params.ifindex }, None)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Ok((Route::TooBig { mtu: unsafe { params.__bindgen_anon_1.mtu_result } }, None))
        }
        // Blackhole, unreachable, prohibited, not forwarded: the packet
        // cannot go where its flow sends it.
        _ => Err(Counter::RouteFailed),
    }
}

/// Leaves the packet for the TC ingress program to send on with
/// `bpf_redirect_neigh`, which resolves the next hop and queues the packet
/// meanwhile, so even a flow's first packet is not lost.
#[inline(always)]
pub(crate) fn hand_to_kernel(ctx: &impl Packet, ifindex: u32) -> Result<(), Counter> {
    ctx.hand_to_neigh(ifindex)
}

/// Leaves the packet for the TC ingress program to send to `ifindex` (cut
/// into fragments when larger than `mtu`), and after it the `queued`
/// fragments held for `datagram` (see `TcHandoff`).
#[inline(always)]
pub(crate) fn hand_off(
    ctx: &impl Packet,
    ifindex: u32,
    mtu: u16,
    datagram: &FragmentKey,
    queued: u8,
    flags: u8,
) -> Result<(), Counter> {
    let handoff = TcHandoff {
        magic: TC_HANDOFF_MAGIC,
        ifindex,
        datagram: *datagram,
        mtu,
        queued,
        flags,
        _pad: 0,
    };
    ctx.hand_off(&handoff)
}

/// The MTU of the device `ifindex` (for a route whose lookup did not say
/// it); the IPv4 minimum when the kernel does not know the device.
#[inline(always)]
pub(crate) fn device_mtu(ctx: &impl Packet, ifindex: u32) -> u16 {
    let mut mtu: u32 = 0;
    // SAFETY: the helper writes the device's MTU into `mtu`, whatever it
    // answers about this packet's length.
    let checked = unsafe { bpf_check_mtu(ctx.raw(), ifindex, &mut mtu, 0, 0) };
    if checked < 0 || mtu == 0 || mtu > u16::MAX as u32 {
        return 576;
    }
    mtu as u16
}
