#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_redirect_neigh, bpf_xdp_adjust_meta,
    },
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use hairpin_common::{
    Counter, DEFAULT_CONNTRACK_CAPACITY, DIRECTION_ORIGINAL, FlowEntry, FlowKey, IPPROTO_UDP,
    MAX_EGRESS_DEVICES, MAX_LAN_NETWORKS, MAX_MAPPINGS, MappingKey, MappingValue,
    NEIGH_REDIRECT_MAGIC, NeighRedirect, Settings, checksum,
    nat::{self, HairpinFlow, SNAT_PORT_ATTEMPTS},
    packet::{ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, Ipv4Header, L4_OFFSET, TcpHeader, UdpHeader},
};

#[map]
static MAPPINGS: HashMap<MappingKey, MappingValue> = HashMap::with_max_entries(MAX_MAPPINGS, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

#[map]
static LAN_NETWORKS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_LAN_NETWORKS, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static EGRESS_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_DEVICES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

const AF_INET: u8 = 2;

#[xdp]
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

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Counter> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

/// Where the checksum and flags of the packet's L4 header are.
struct L4 {
    check: *mut u16,
    ports: *mut [u16; 2],
    tcp_flags: u8,
}

/// Translates a packet of a tracked or newly hairpinned flow and sends it on
/// (`Ok`), or names why the kernel gets it untouched (`Err`).
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
    let l4 = l4_header(ctx, ip.proto)?;
    let [src_port, dst_port] = unsafe { *l4.ports };
    let packet = FlowKey::new(ip.src_addr, ip.dst_addr, src_port, dst_port, ip.proto);

    if nat::ttl_expires(ip.ttl) {
        return Err(Counter::PassTtlExpired);
    }
    let tot_len = u16::from_be(ip.tot_len);
    // SAFETY: the entry is copied out at once; a concurrent LRU eviction can
    // at worst hand us a stale copy of a valid entry.
    let (to, route, counter, created) = match unsafe { CONNTRACK.get(&packet) } {
        Some(entry) => {
            let counter = if entry.direction == DIRECTION_ORIGINAL {
                Counter::Hairpinned
            } else {
                Counter::TranslatedBack
            };
            let route = fib_lookup(ctx, &entry.translated, tot_len)?;
            (entry.translated, route, counter, None)
        }
        None => {
            let (server, settings) = admit_new_flow(&packet, l4.tcp_flags)?;
            // The route does not depend on the SNAT port: look it up before
            // any state is created, so a routing failure leaves none behind.
            let provisional = FlowKey::new(
                settings.lan_addr,
                server.server_addr,
                packet.src_port,
                server.server_port,
                packet.proto,
            );
            let route = fib_lookup(ctx, &provisional, tot_len)?;
            let flow = allocate_flow(&packet, &server, &settings)?;
            count(Counter::FlowCreated);
            (
                flow.original.translated,
                route,
                Counter::Hairpinned,
                Some(flow),
            )
        }
    };

    if let Route::Unresolved { ifindex } = route
        && let Err(counter) = hand_to_kernel(ctx, ifindex)
    {
        if let Some(flow) = created {
            let _ = CONNTRACK.remove(&flow.original_key);
            let _ = CONNTRACK.remove(&flow.reply_key);
        }
        return Err(counter);
    }
    // hand_to_kernel moved the packet start: look the headers up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let (ip, eth) = unsafe { (&mut *ip, &mut *eth) };
    let l4 = l4_header(ctx, ip.proto)?;
    rewrite(ip, &l4, &packet, &to);

    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            eth.src = smac;
            eth.dst = dmac;
            if ifindex == ctx.ingress_ifindex() as u32 {
                Ok((xdp_action::XDP_TX, counter))
            } else {
                // Present in the map (checked by fib_lookup), so this succeeds.
                let action = EGRESS_DEVICES
                    .redirect(ifindex, 0)
                    .unwrap_or(xdp_action::XDP_DROP);
                Ok((action, counter))
            }
        }
        Route::Unresolved { .. } => Ok((xdp_action::XDP_PASS, Counter::NeighRedirected)),
    }
}

#[inline(always)]
fn l4_header(ctx: &XdpContext, proto: u8) -> Result<L4, Counter> {
    if proto == IPPROTO_UDP {
        let udp: *mut UdpHeader = ptr_at(ctx, L4_OFFSET)?;
        unsafe {
            Ok(L4 {
                check: &raw mut (*udp).check,
                ports: udp.cast(),
                tcp_flags: 0,
            })
        }
    } else {
        let tcp: *mut TcpHeader = ptr_at(ctx, L4_OFFSET)?;
        unsafe {
            Ok(L4 {
                check: &raw mut (*tcp).check,
                ports: tcp.cast(),
                tcp_flags: (*tcp).flags,
            })
        }
    }
}

/// A packet without a conntrack entry may open a hairpin flow if it is a LAN
/// client's first packet to a mapped public address and port.
#[inline(always)]
fn admit_new_flow(packet: &FlowKey, tcp_flags: u8) -> Result<(MappingValue, Settings), Counter> {
    let mapping_key = MappingKey {
        public_addr: packet.dst_addr,
        public_port: packet.dst_port,
        proto: packet.proto,
        _pad: 0,
    };
    let server = *unsafe { MAPPINGS.get(&mapping_key) }.ok_or(Counter::PassNoMapping)?;
    if LAN_NETWORKS.get(Key::new(32, packet.src_addr)).is_none() {
        return Err(Counter::PassSourceNotLan);
    }
    if packet.proto != IPPROTO_UDP && !nat::tcp_opens_flow(tcp_flags) {
        return Err(Counter::PassTcpNotSyn);
    }
    let settings = *SETTINGS.get(0).ok_or(Counter::PassNotConfigured)?;
    if settings.lan_addr == 0 {
        return Err(Counter::PassNotConfigured);
    }
    Ok((server, settings))
}

/// Picks a free SNAT port with bounded retries and enters both directions.
/// The reply entry goes in first with BPF_NOEXIST: that insert is what makes
/// the translated tuple unique.
#[inline(always)]
fn allocate_flow(
    packet: &FlowKey,
    server: &MappingValue,
    settings: &Settings,
) -> Result<HairpinFlow, Counter> {
    let client_port = u16::from_be(packet.src_port);
    for attempt in 0..SNAT_PORT_ATTEMPTS {
        let random = unsafe { bpf_get_prandom_u32() };
        let port = nat::snat_port_candidate(
            client_port,
            attempt,
            random,
            settings.snat_port_first,
            settings.snat_port_last,
        );
        let flow = nat::hairpin_flow(packet, server, settings.lan_addr, port.to_be());
        if CONNTRACK
            .insert(&flow.reply_key, &flow.reply, BPF_NOEXIST as u64)
            .is_err()
        {
            continue;
        }
        if CONNTRACK
            .insert(&flow.original_key, &flow.original, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Ok(flow);
        }
        // Another CPU entered this flow in the meantime; the client's
        // retransmission will find that entry.
        let _ = CONNTRACK.remove(&flow.reply_key);
        return Err(Counter::PassFlowRace);
    }
    Err(Counter::PortAllocFailed)
}

enum Route {
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Routed out of `ifindex`, but the next hop's MAC is not known yet.
    Unresolved { ifindex: u32 },
}

#[inline(always)]
fn fib_lookup(ctx: &XdpContext, to: &FlowKey, tot_len: u16) -> Result<Route, Counter> {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = to.proto;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = to.src_addr;
    params.__bindgen_anon_4.ipv4_dst = to.dst_addr;
    let ret =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibParams>() as i32, 0) };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Route::Resolved {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Route::Unresolved {
            ifindex: params.ifindex,
        }),
        _ => return Err(Counter::FibFailed),
    }
    .and_then(|route| match route {
        Route::Resolved { ifindex, .. } | Route::Unresolved { ifindex }
            if ifindex != ctx.ingress_ifindex() as u32 && EGRESS_DEVICES.get(ifindex).is_none() =>
        {
            Err(Counter::PassEgressNotManaged)
        }
        route => Ok(route),
    })
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

#[inline(always)]
fn rewrite(ip: &mut Ipv4Header, l4: &L4, from: &FlowKey, to: &FlowKey) {
    let ttl_proto = |ip: &Ipv4Header| u16::from_ne_bytes([ip.ttl, ip.proto]);
    let old_ttl_proto = ttl_proto(ip);
    ip.ttl -= 1;
    ip.check = checksum::ipv4_after_rewrite(ip.check, from, to, old_ttl_proto, ttl_proto(ip));
    ip.src_addr = to.src_addr;
    ip.dst_addr = to.dst_addr;
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
