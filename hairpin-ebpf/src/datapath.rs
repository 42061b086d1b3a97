//! The datapath, written once over `Packet` for XDP frames and TC skbs:
//! parse, find or open the flow, route, rewrite, send (or hand to the TC
//! program, answer, or drop and count).

use hairpin_common::{
    Counter, DIRECTION_ORIGINAL, FlowKey, FragmentKey, HANDOFF_NEIGH, HANDOFF_TO_KERNEL,
    IPPROTO_TCP, IPPROTO_UDP, Settings,
    fragment::Fragment,
    icmp::{self, IPPROTO_ICMP},
    nat::{self, Ipv4Layout, Sides, TooBigPath},
    packet::{ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, Ipv4Header, TcpHeader},
    tcp::Segment,
};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

use crate::{
    conntrack::{Admission, Flow, FlowLookup, admit_new_flow, create_flow, find_flow, track},
    context::Packet,
    forward::{Route, fib_lookup, flow_route, hand_off, hand_to_kernel, send},
    fragments,
    icmp_messages::{
        IP_DONT_FRAGMENT, IcmpAnswer, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, answer_icmp,
        time_exceeded, too_big, try_icmp_error,
    },
    maps::{CONNTRACK_NEW, SETTINGS, account, count},
    packet::{L4, l4_header, l4_offset, ptr_at, tcp_segment},
};

/// Translates a packet of a tracked or new flow and sends it on, answers it
/// or drops it (`Ok`), or names why the kernel gets it untouched (`Err`):
/// only packets of no flow are passed untouched.
#[inline(always)]
pub(crate) fn try_hairpin<C: Packet>(ctx: &C) -> Result<(u32, Counter), Counter> {
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4.to_be() {
        return Err(Counter::PassNotIpv4);
    }
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let ip = unsafe { &mut *ip };
    let layout = nat::check_ipv4(ip.version_ihl, ip.frag_off, ip.proto)?;
    let settings = SETTINGS.get(0).ok_or(Counter::PassNotConfigured)?;
    if settings.lan_addr == 0 {
        return Err(Counter::PassNotConfigured);
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let ingress = ctx.ingress();
    if layout.fragment == Fragment::Later {
        return fragments::later_fragment(ctx, settings, ingress, now);
    }
    match whole_or_first(ctx, ip, &layout, settings, now) {
        // The later fragments of a datagram whose first goes to the kernel
        // go there too, and any held ones with it.
        Err(pass_reason) if layout.fragment == Fragment::First => {
            let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
            // SAFETY: bounds checked by ptr_at.
            let datagram =
                unsafe { FragmentKey::new((*ip).src_addr, (*ip).dst_addr, (*ip).id, (*ip).proto) };
            fragments::passed(ctx, &datagram, ingress, now, pass_reason)
        }
        verdict => verdict,
    }
}

/// A whole packet or a first fragment: an ICMP error, or a TCP or UDP
/// packet of a flow.
#[inline(always)]
fn whole_or_first<C: Packet>(
    ctx: &C,
    ip: &Ipv4Header,
    layout: &Ipv4Layout,
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let l4_offset = l4_offset(layout.header_len);
    if ip.proto == IPPROTO_ICMP {
        if layout.fragment != Fragment::Whole {
            return Err(Counter::PassFragment);
        }
        return try_icmp_error(ctx, l4_offset, settings, now);
    }
    let gso_size = ctx.gso_size();
    let skb_ip_len = ctx.len().saturating_sub(ETH_HEADER_LEN as u32);
    let tot_len = u16::from_be(ip.tot_len);
    let ip_len = nat::ipv4_len(tot_len, layout.header_len, ip.proto, gso_size != 0, skb_ip_len)?;
    if ip_len > u16::MAX as u32 {
        count(Counter::BigTcpAggregate);
    }
    let l4 = l4_header(ctx, l4_offset, ip.proto)?;
    let segment = if ip.proto == IPPROTO_TCP {
        tcp_segment(ctx, l4_offset, layout.header_len, ip_len)?
    } else {
        Segment::default()
    };
    let [src_port, dst_port] = unsafe { *l4.ports };
    let packet = FlowKey::new(ip.src_addr, ip.dst_addr, src_port, dst_port, ip.proto);
    let fragmented = layout.fragment == Fragment::First;
    let size = wire_size(ctx, gso_size, ip_len, layout.header_len, l4_offset, ip.proto);
    let arrival = Arrival {
        packet,
        segment,
        now,
        ip_len,
        size,
        ttl: ip.ttl,
        fragmented,
        l4_offset: l4_offset as u16,
        aggregate: gso_size != 0,
    };
    translate(ctx, settings, &arrival, l4_offset, l4)
}

/// The packet of a tracked or new flow: translated and sent on, answered
/// or dropped (`Ok`), or of no flow (`Err`, passed untouched). XDP sends it
/// itself unless it needs the TC program: a next hop to resolve (or an
/// interface hairpin does not manage), fragments held for it to release,
/// or a size to cut it to.
#[inline(always)]
fn translate<C: Packet>(
    ctx: &C,
    settings: &Settings,
    arrival: &Arrival,
    l4_offset: usize,
    l4: L4,
) -> Result<(u32, Counter), Counter> {
    let packet = arrival.packet;
    let ingress = ctx.ingress();
    let (outcome, created) = match find_flow(&packet, ingress, settings, arrival.now)? {
        FlowLookup::Original(flow) | FlowLookup::Reply(flow) => {
            (forward_tracked(ctx, &flow, arrival, settings)?, false)
        }
        FlowLookup::New => (open_flow(ctx, settings, arrival)?, true),
    };
    let (to, route, counter, mapping_id, split_mtu, to_kernel) = match outcome {
        Outcome::Translate { to, route, counter, mapping_id, split_mtu, to_kernel } => {
            (to, route, counter, mapping_id, split_mtu, to_kernel)
        }
        Outcome::Answered(verdict) => return Ok(verdict),
    };
    if !arrival.fragmented
        && split_mtu == 0
        && !to_kernel
        && let Route::Resolved { .. } = route
    {
        // The common case, sent by XDP: the L4 header as parsed, since no
        // helper has moved the packet (the Ethernet and IPv4 headers cost a
        // constant check again).
        let eth: *mut EthHeader = ptr_at(ctx, 0)?;
        let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
        let (ip, eth) = unsafe { (&mut *ip, &mut *eth) };
        let verdict = send::<C>(eth, &route, counter)?;
        return match ctx.rewrite(ip, &l4, l4_offset, &packet, &to) {
            Ok(()) => Ok(verdict),
            Err(failed) => Ok((C::DROP, failed)),
        };
    }
    // A first fragment: its datagram, and the fragments held for it.
    let (datagram, held) = if arrival.fragmented {
        let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
        // SAFETY: bounds checked by ptr_at; the packet is not rewritten yet.
        let id = unsafe { (*ip).id };
        let datagram = FragmentKey::new(packet.src_addr, packet.dst_addr, id, packet.proto);
        (datagram, fragments::held(&datagram, ingress, arrival.now))
    } else {
        (FragmentKey::default(), 0)
    };
    let through_tc = split_mtu != 0 || held > 0 || to_kernel;
    // The egress MTU: what TC cuts to, and what the later fragments must fit.
    let mtu = if split_mtu != 0 {
        split_mtu
    } else if arrival.fragmented {
        fragments::route_mtu(ctx, &route)
    } else {
        0
    };
    let neigh = matches!(route, Route::Unresolved { .. });
    let handed = if through_tc {
        let flags = if to_kernel {
            HANDOFF_TO_KERNEL
        } else if neigh {
            HANDOFF_NEIGH
        } else {
            0
        };
        hand_off(ctx, route.egress(), mtu, &datagram, held, flags)
    } else if let Route::Unresolved { ifindex } = route {
        hand_to_kernel(ctx, ifindex)
    } else {
        Ok(())
    };
    if let Err(counter) = handed {
        if created {
            let _ = CONNTRACK_NEW.remove(&packet);
            let _ = CONNTRACK_NEW.remove(&to.reversed());
        }
        return Ok((C::DROP, counter));
    }
    if arrival.fragmented {
        fragments::translated(
            &datagram,
            &to,
            (ingress, &route, mtu),
            mapping_id,
            held,
            arrival.now,
        );
    }
    // Adding metadata invalidates packet pointers: look the headers up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let (ip, eth) = unsafe { (&mut *ip, &mut *eth) };
    let l4 = l4_header(ctx, l4_offset, ip.proto)?;
    // The kernel routes it again: it keeps the MAC addresses it came with,
    // or the kernel would not take it for the gateway.
    let (action, counter) =
        if to_kernel { (C::PASS, counter) } else { send::<C>(eth, &route, counter)? };
    if let Err(failed) = ctx.rewrite(ip, &l4, l4_offset, &packet, &to) {
        return Ok((C::DROP, failed));
    }
    Ok((if through_tc { C::PASS } else { action }, counter))
}

/// A packet of a flow: its tuple, TCP header, when it arrived, how long it
/// is from its IPv4 header on (over 64 KiB for a BIG TCP aggregate), the
/// largest packet it is sent as (`size`: a GSO aggregate's segments), its TTL, and whether it is a datagram's first
/// fragment; where its transport header starts, and whether it is a GSO
/// aggregate.
struct Arrival {
    packet: FlowKey,
    segment: Segment,
    now: u64,
    ip_len: u32,
    size: u16,
    ttl: u8,
    fragmented: bool,
    l4_offset: u16,
    /// A GSO aggregate.
    aggregate: bool,
}

/// The largest packet this one is sent as: itself, or for a GSO aggregate
/// (GRO, or a local sender's TSO/USO) one of its segments, whose headers
/// are the aggregate's: only that must fit the egress MTU.
#[inline(always)]
fn wire_size(
    ctx: &impl Packet,
    segment: u32,
    ip_len: u32,
    ip_header_len: u32,
    l4_offset: usize,
    proto: u8,
) -> u16 {
    // Only a GSO aggregate is longer than 64 KiB.
    let whole = nat::len_u16(ip_len);
    if segment == 0 {
        return whole;
    }
    let l4_header_len = if proto == IPPROTO_TCP {
        match ptr_at::<TcpHeader>(ctx, l4_offset) {
            // SAFETY: bounds checked by ptr_at.
            Ok(tcp) => ((unsafe { (*tcp).data_offset } >> 4) as u32) * 4,
            Err(_) => return whole,
        }
    } else {
        8
    };
    let size = ip_header_len + l4_header_len + segment;
    if size < ip_len { size as u16 } else { whole }
}

/// What becomes of a packet of a flow, tracked or new.
enum Outcome {
    /// Translate the packet to `to` and send it along `route`, cut into
    /// fragments of `split_mtu` when that is not 0, or hand it to the
    /// kernel's forwarding (`to_kernel`, TC) to be cut there.
    Translate {
        to: FlowKey,
        route: Route,
        counter: Counter,
        mapping_id: u16,
        split_mtu: u16,
        to_kernel: bool,
    },
    /// Answered or dropped instead (deny set, window check, ICMP, no route).
    Answered((u32, Counter)),
}

/// A verdict that drops the packet.
#[inline(always)]
fn dropped<C: Packet>(counter: Counter) -> Outcome {
    Outcome::Answered((C::DROP, counter))
}

/// A packet of a tracked flow: the flow moved on by it, and its route.
/// Everything is inlined into one stack frame: BPF sums the frames along a
/// call chain against its 512 bytes, and split into calls the steps
/// needed more than inlined. A packet of the flow that cannot be sent on is
/// answered or dropped, never handed to the kernel untranslated.
#[inline(always)]
fn forward_tracked<C: Packet>(
    ctx: &C,
    flow: &Flow,
    arrival: &Arrival,
    settings: &Settings,
) -> Result<Outcome, Counter> {
    let Arrival { ref packet, ref segment, now, ip_len, size, ttl, fragmented, .. } = *arrival;
    // SAFETY: a map value; see find_flow. Fields are read one by one: a
    // copy of the whole entry does not fit the stack.
    let (translated, direction, kind, mapping_id) = unsafe {
        (
            (*flow.entry).translated,
            (*flow.entry).direction,
            (*flow.entry).kind,
            (*flow.entry).mapping_id,
        )
    };
    let original = direction == DIRECTION_ORIGINAL;
    if nat::ttl_expires(ttl) {
        let answered = (original, nat::len_u16(ip_len));
        return time_exceeded(ctx, answered, settings, now).map(Outcome::Answered);
    }
    // Tracked first: a packet the windows refuse costs no route lookup,
    // caches no route and is answered with nothing.
    if let Err(refused) = track(flow, packet, segment, fragmented, now, ip_len) {
        return Ok(dropped::<C>(refused));
    }
    let route = match flow_route(ctx, flow, &translated, size, now) {
        Ok(route) => route,
        Err(failed) => return Ok(dropped::<C>(failed)),
    };
    let counter = nat::translated_counter(direction, kind);
    if let Route::TooBig { mtu } = route {
        let translation = Translation { to: &translated, counter, mapping_id };
        return too_big_outcome(ctx, arrival, &translation, mtu, original, settings);
    }
    Ok(Outcome::Translate {
        to: translated,
        route,
        counter,
        mapping_id,
        split_mtu: 0,
        to_kernel: false,
    })
}

/// Whether the packet may be fragmented here (DF clear).
#[inline(always)]
fn may_fragment(ctx: &impl Packet) -> bool {
    match ptr_at::<Ipv4Header>(ctx, ETH_HEADER_LEN) {
        // SAFETY: bounds checked by ptr_at.
        Ok(ip) => u16::from_be(unsafe { (*ip).frag_off }) & IP_DONT_FRAGMENT == 0,
        Err(_) => false,
    }
}

/// Whether the datapath can cut the packet into fragments itself: not a
/// GSO aggregate, and its transport checksum complete (one left to offload
/// would be completed over the first fragment alone).
#[inline(always)]
fn cuttable(ctx: &impl Packet, arrival: &Arrival) -> bool {
    if arrival.aggregate {
        return false;
    }
    let check_offset =
        if arrival.packet.proto == IPPROTO_UDP { UDP_CHECK_OFFSET } else { TCP_CHECK_OFFSET };
    !ctx.checksum_offloaded(arrival.l4_offset as usize + check_offset)
}

/// What a packet of a flow is translated to, and counted as.
struct Translation<'a> {
    to: &'a FlowKey,
    counter: Counter,
    mapping_id: u16,
}

/// A packet of a flow too big for its egress link (`mtu`): cut by TC, cut
/// by the kernel, or answered with "fragmentation needed" (see
/// `nat::too_big_path`).
#[inline(always)]
fn too_big_outcome<C: Packet>(
    ctx: &C,
    arrival: &Arrival,
    translation: &Translation,
    mtu: u16,
    to_public_address: bool,
    settings: &Settings,
) -> Result<Outcome, Counter> {
    let Translation { to, counter, mapping_id } = *translation;
    // No link has an MTU of 0, and a split MTU of 0 would take the fast
    // path with the header pointers the checksum probe invalidated.
    if mtu == 0 {
        return Ok(dropped::<C>(Counter::TooBigDropped));
    }
    let answered = (to_public_address, nat::len_u16(arrival.ip_len));
    let dont_fragment = !may_fragment(ctx);
    let cuttable = !dont_fragment && cuttable(ctx, arrival);
    let source_kept = to.src_addr == arrival.packet.src_addr;
    let to_kernel = match nat::too_big_path(dont_fragment, cuttable, source_kept) {
        TooBigPath::Cut => false,
        TooBigPath::Kernel => true,
        TooBigPath::FragNeeded => {
            return too_big(ctx, mtu, answered, settings, arrival.now).map(Outcome::Answered);
        }
        TooBigPath::FragNeededUncut => {
            count(Counter::TooBigNotCut);
            return too_big(ctx, mtu, answered, settings, arrival.now).map(Outcome::Answered);
        }
    };
    if to_kernel {
        count(Counter::FragmentedByKernel);
    }
    // Its route regardless of size, for the TC program to cut it to `mtu`
    // and send the pieces.
    Ok(match fib_lookup(ctx, to, 0) {
        Ok((route @ (Route::Resolved { .. } | Route::Unresolved { .. }), _)) => {
            Outcome::Translate { to: *to, route, counter, mapping_id, split_mtu: mtu, to_kernel }
        }
        _ => dropped::<C>(Counter::TooBigDropped),
    })
}

/// A packet of no tracked flow: admitted, routed and entered as a new flow,
/// or refused.
#[inline(always)]
fn open_flow<C: Packet>(
    ctx: &C,
    settings: &Settings,
    arrival: &Arrival,
) -> Result<Outcome, Counter> {
    let Arrival { ref packet, ref segment, now, ip_len, size, ttl, .. } = *arrival;
    let admitted = match admit_new_flow(ctx, packet, segment.flags, settings)? {
        Admission::Admitted(admitted) => admitted,
        Admission::Denied => return Ok(dropped::<C>(Counter::Denied)),
    };
    if nat::ttl_expires(ttl) {
        let answered = (true, nat::len_u16(ip_len));
        return time_exceeded(ctx, answered, settings, now).map(Outcome::Answered);
    }
    // The route does not depend on the SNAT port: look it up before any
    // state is created, so a routing failure leaves none behind.
    let (route, split_mtu, to_kernel) = match fib_lookup(ctx, &admitted.provisional, size) {
        Ok((Route::TooBig { mtu }, _)) => {
            let translation = Translation {
                to: &admitted.provisional,
                counter: Counter::FlowCreated,
                mapping_id: 0,
            };
            match too_big_outcome(ctx, arrival, &translation, mtu, true, settings)? {
                Outcome::Translate { route, split_mtu, to_kernel, .. } => {
                    (route, split_mtu, to_kernel)
                }
                answered => return Ok(answered),
            }
        }
        Ok((route, _)) => (route, 0, false),
        Err(failed) => return Ok(dropped::<C>(failed)),
    };
    let sides = Sides { original: ctx.ingress(), reply: route.egress() };
    let flow = match create_flow(packet, &admitted, &sides, segment, settings, now, ip_len) {
        Ok(flow) => flow,
        // Refused cleanly: handed to the kernel, the packet could reach a
        // service of the gateway's own on the public address.
        Err(Counter::PortAllocFailed) => {
            count(Counter::PortAllocFailed);
            let refusal = IcmpAnswer {
                icmp_type: icmp::ICMP_DEST_UNREACH,
                code: icmp::ICMP_ADMIN_PROHIBITED,
                mtu: 0,
                from_addr: packet.dst_addr,
                tot_len: nat::len_u16(ip_len),
                counter: Counter::FlowRefused,
            };
            return answer_icmp(ctx, &refusal, now).map(Outcome::Answered);
        }
        Err(Counter::FlowRaceDropped) => return Ok(dropped::<C>(Counter::FlowRaceDropped)),
        Err(other) => return Err(other),
    };
    count(Counter::FlowCreated);
    let mapping_id = admitted.server.id;
    account(mapping_id, ip_len, true);
    let counter = if admitted.hairpin { Counter::Hairpinned } else { Counter::PortForwarded };
    Ok(Outcome::Translate { to: flow.translated, route, counter, mapping_id, split_mtu, to_kernel })
}
