//! Fragments: the first one, translated from its flow, leaves behind how
//! its datagram is translated, and the later ones (which carry no ports)
//! are translated by that; the first one of no flow leaves behind that its
//! datagram goes to the kernel. Later fragments that come before their
//! first, of datagrams that may be a flow's, are held, copied into a queue,
//! until it comes: then the TC program sends them with it (translated by
//! XDP in the queue), or hands them to the kernel as they came.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use hairpin_common::{
    Counter, FRAGMENT_HELD, FRAGMENT_PASSED, FRAGMENT_TRANSLATED, FlowKey, FragmentEntry,
    FragmentKey, HANDOFF_TO_KERNEL, MAX_QUEUED_FRAME, QueuedFragmentKey, Settings,
    fragment::{self, Hold, Later, MAX_QUEUED_PER_DATAGRAM},
    nat,
    packet::{ETH_HEADER_LEN, EthHeader, Ipv4Header},
};

use crate::{
    context::Packet,
    forward::{Route, device_mtu, forward_action, hand_off, hand_to_kernel, send},
    maps::{FLOW_ADDRESSES, FRAGMENT_QUEUE, FRAGMENTS, HOLD_SCRATCH, account},
    packet::{ptr_at, rewrite_ipv4},
};

/// How many fragments are held for `datagram`, arriving on `ingress`, to be
/// released with its first fragment.
#[inline(always)]
pub(crate) fn held(datagram: &FragmentKey, ingress: u32, now: u64) -> u8 {
    // SAFETY: a map value, copied out.
    fragment::held_for(unsafe { FRAGMENTS.get(datagram) }, ingress, now)
}

/// The egress MTU of a route: the route's own, or the device's when the
/// next hop is not resolved (the lookup then says nothing of it).
#[inline(always)]
pub(crate) fn route_mtu(ctx: &impl Packet, route: &Route) -> u16 {
    match *route {
        Route::Resolved { mtu, .. } => mtu,
        Route::Unresolved { ifindex } => device_mtu(ctx, ifindex),
        Route::TooBig { mtu } => mtu,
    }
}

/// The datagram of a first fragment was translated to `to` and is sent
/// along `route` (whose egress MTU is `mtu`): its later fragments will be
/// too, and the `held` ones so far are translated in the queue, for the TC
/// program to send after it.
#[inline(always)]
pub(crate) fn translated(
    datagram: &FragmentKey,
    to: &FlowKey,
    (ingress, route, mtu): (u32, &Route, u16),
    mapping_id: u16,
    held: u8,
    now: u64,
) {
    let (egress, eth_addrs, resolved) = match *route {
        Route::Resolved { egress, eth_addrs, .. } => (egress, eth_addrs, 1),
        Route::Unresolved { ifindex } => (ifindex, [0; 3], 0),
        Route::TooBig { .. } => return,
    };
    let entry = FragmentEntry {
        created_ns: now,
        src_addr: to.src_addr,
        dst_addr: to.dst_addr,
        ingress,
        egress,
        eth_addrs,
        mtu,
        mapping_id,
        resolved,
        verdict: FRAGMENT_TRANSLATED,
        ..FragmentEntry::default()
    };
    // A full table evicts its oldest datagram (LRU).
    let _ = FRAGMENTS.insert(datagram, &entry, BPF_ANY as u64);
    let from = FlowKey::new(datagram.src_addr, datagram.dst_addr, 0, 0, datagram.proto);
    let to = FlowKey::new(to.src_addr, to.dst_addr, 0, 0, from.proto);
    if held == 0 {
        return;
    }
    // Every slot: two CPUs may have taken them out of order.
    for slot in 0..MAX_QUEUED_PER_DATAGRAM {
        let key = QueuedFragmentKey { datagram: *datagram, slot };
        let Some(queued) = FRAGMENT_QUEUE.get_ptr_mut(&key) else {
            continue;
        };
        // SAFETY: a map value; the frame's IPv4 header is 4-byte aligned
        // in it (see QueuedFragment) and the frame was at least that long.
        unsafe {
            let ip = &mut *(*queued).frame.as_mut_ptr().add(ETH_HEADER_LEN).cast::<Ipv4Header>();
            if nat::ttl_expires(ip.ttl) {
                // Not sent: the TC program skips an empty frame.
                (*queued).len = 0;
                continue;
            }
            rewrite_ipv4(ip, &from, &to);
            if resolved == 0 {
                // The kernel's neighbour resolution writes the addresses.
                continue;
            }
            let addrs = (*queued).frame.as_mut_ptr().cast::<u32>();
            addrs.write_unaligned(eth_addrs[0]);
            addrs.add(1).write_unaligned(eth_addrs[1]);
            addrs.add(2).write_unaligned(eth_addrs[2]);
        }
    }
}

/// The first fragment of a datagram of no flow goes to the kernel, and so
/// will its later fragments; those held so far go with it, as they came
/// (the TC program hands them to the kernel). Returns how the packet is
/// passed: `pass_reason`.
#[inline(always)]
pub(crate) fn passed(
    ctx: &impl Packet,
    datagram: &FragmentKey,
    ingress: u32,
    now: u64,
    pass_reason: Counter,
) -> Result<(u32, Counter), Counter> {
    let held = held(datagram, ingress, now);
    let entry = FragmentEntry {
        created_ns: now,
        ingress,
        verdict: FRAGMENT_PASSED,
        ..FragmentEntry::default()
    };
    let _ = FRAGMENTS.insert(datagram, &entry, BPF_ANY as u64);
    if held > 0 {
        // Without the metadata, the held fragments are left to lapse; the
        // kernel never completes the datagram, as it would not without them.
        let _ = hand_off(ctx, ingress, u16::MAX, datagram, held, HANDOFF_TO_KERNEL);
    }
    Err(pass_reason)
}

/// A fragment after the first: translated and sent as its datagram's first
/// fragment was, passed as it was, or held until it comes (when it may be
/// a flow's; any other goes to the kernel untouched, whatever its order).
#[inline(always)]
pub(crate) fn later_fragment<C: Packet>(
    ctx: &C,
    settings: &Settings,
    ingress: u32,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (src_addr, dst_addr, id, proto, ttl, tot_len) = unsafe {
        ((*ip).src_addr, (*ip).dst_addr, (*ip).id, (*ip).proto, (*ip).ttl, (*ip).tot_len)
    };
    let datagram = FragmentKey::new(src_addr, dst_addr, id, proto);
    let found = FRAGMENTS.get_ptr_mut(&datagram);
    // SAFETY: a map value, only read here.
    let entry = found.map(|entry| unsafe { *entry });
    let tot_len = u16::from_be(tot_len);
    let later = fragment::later(entry.as_ref(), ingress, now);
    if let Later::Hold(_) | Later::WrongInterface = later {
        // SAFETY: map values, copied out.
        let role = |addr: u32| unsafe { FLOW_ADDRESSES.get(&addr) }.copied().unwrap_or(0);
        let to_lan_addr = dst_addr == settings.lan_addr;
        if !fragment::may_be_a_flows(role(src_addr), role(dst_addr), to_lan_addr) {
            return Err(if later == Later::WrongInterface {
                Counter::WrongInterface
            } else {
                Counter::PassFragment
            });
        }
    }
    match later {
        Later::Translate => {}
        Later::Pass => return Err(Counter::PassFragment),
        // Maybe a flow's, from another interface: no flow's there, and
        // never passed untranslated.
        Later::WrongInterface => return Ok((C::DROP, Counter::WrongInterface)),
        Later::Hold(hold) => {
            return hold_fragment(ctx, &datagram, found, hold, ingress, now, tot_len);
        }
    };
    let Some(entry) = entry else {
        return Err(Counter::PassFragment);
    };
    // No ICMP error is sent about a fragment after the first.
    if nat::ttl_expires(ttl) {
        return Ok((C::DROP, Counter::TtlExpiredDropped));
    }
    // Too big for the egress link, it is cut again (fragments carry no DF).
    let too_big = tot_len > entry.mtu;
    let from = FlowKey::new(src_addr, dst_addr, 0, 0, proto);
    let to = FlowKey::new(entry.src_addr, entry.dst_addr, 0, 0, proto);
    account(entry.mapping_id, tot_len as u32, false);
    let route = match forward_action(ctx, entry.egress) {
        Some(action) if entry.resolved != 0 => Route::Resolved {
            action,
            egress: entry.egress,
            eth_addrs: entry.eth_addrs,
            mtu: entry.mtu,
        },
        _ => Route::Unresolved { ifindex: entry.egress },
    };
    let neigh = matches!(route, Route::Unresolved { .. });
    let handed = if too_big {
        let flags = if neigh { hairpin_common::HANDOFF_NEIGH } else { 0 };
        hand_off(ctx, entry.egress, entry.mtu, &datagram, 0, flags)
    } else if neigh {
        hand_to_kernel(ctx, entry.egress)
    } else {
        Ok(())
    };
    if let Err(failed) = handed {
        return Ok((C::DROP, failed));
    }
    // The metadata moved the packet: look the headers up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (action, counter) = unsafe {
        rewrite_ipv4(&mut *ip, &from, &to);
        send::<C>(&mut *eth, &route, Counter::FragmentTranslated)?
    };
    Ok((if too_big { C::PASS } else { action }, counter))
}

/// Copies a fragment that came before its first fragment into the queue
/// and drops it; its first fragment releases it. Its place is claimed by
/// inserting it there only if the place is free: two CPUs holding fragments
/// of one datagram take two.
#[inline(always)]
fn hold_fragment<C: Packet>(
    ctx: &C,
    datagram: &FragmentKey,
    found: Option<*mut FragmentEntry>,
    hold: Hold,
    ingress: u32,
    now: u64,
    tot_len: u16,
) -> Result<(u32, Counter), Counter> {
    let frame_len = ETH_HEADER_LEN + tot_len as usize;
    // Maybe a flow's: too large to hold, it is dropped, never passed.
    if frame_len > MAX_QUEUED_FRAME {
        return Ok((C::DROP, Counter::FragmentHoldFull));
    }
    let first_free = match (hold, found) {
        (Hold::Full, _) => return Ok((C::DROP, Counter::FragmentHoldFull)),
        // SAFETY: a map value, read: a hint where the free places start.
        (Hold::Queue, Some(entry)) => unsafe { (*entry).queued },
        (_, found) => {
            let entry = FragmentEntry {
                created_ns: now,
                ingress,
                verdict: FRAGMENT_HELD,
                ..FragmentEntry::default()
            };
            // Replaces only a stale entry; a fresh one another CPU just
            // entered wins, and this fragment is lost to that race.
            let flags = if found.is_some() { BPF_ANY } else { BPF_NOEXIST };
            if FRAGMENTS.insert(datagram, &entry, flags as u64).is_err() {
                return Ok((C::DROP, Counter::FragmentHoldFull));
            }
            // What an earlier datagram with the same IP ID left must not be
            // sent with this one.
            for slot in 0..MAX_QUEUED_PER_DATAGRAM {
                let _ = FRAGMENT_QUEUE.remove(&QueuedFragmentKey { datagram: *datagram, slot });
            }
            0
        }
    };
    let scratch = HOLD_SCRATCH.get_ptr_mut(0).ok_or(Counter::FragmentHoldFull)?;
    // Masked for the verifier: at most the frame buffer.
    let len = core::hint::black_box(frame_len as u32);
    if len < (ETH_HEADER_LEN + 20) as u32 || len > MAX_QUEUED_FRAME as u32 {
        return Ok((C::DROP, Counter::FragmentHoldFull));
    }
    // SAFETY: this CPU's buffer; at most its frame's size is written.
    unsafe {
        if !ctx.load_bytes(0, (*scratch).frame.as_mut_ptr().cast(), len) {
            return Ok((C::DROP, Counter::FragmentHoldFull));
        }
        (*scratch).len = len as u16;
    }
    for slot in 0..MAX_QUEUED_PER_DATAGRAM {
        if slot < first_free {
            continue;
        }
        let key = QueuedFragmentKey { datagram: *datagram, slot };
        // SAFETY: this CPU's buffer, just written.
        if FRAGMENT_QUEUE.insert(&key, unsafe { &*scratch }, BPF_NOEXIST as u64).is_ok() {
            if let Some(entry) = FRAGMENTS.get_ptr_mut(datagram) {
                // SAFETY: a map value; a lost update only makes the hint low.
                unsafe { (*entry).queued = slot + 1 };
            }
            return Ok((C::DROP, Counter::FragmentHeld));
        }
    }
    Ok((C::DROP, Counter::FragmentHoldFull))
}
