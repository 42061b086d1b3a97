//! Fragments: the first one, translated from its flow, leaves behind how
//! its datagram is translated, and the later ones (which carry no ports)
//! are translated by that; the first one of no flow leaves behind that its
//! datagram goes to the kernel. Later fragments that come before their
//! first are held, copied into a queue, until it comes: then the TC program
//! sends them with it (translated by XDP in the queue), or hands them to
//! the kernel as they came.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_meta, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use hairpin_common::{
    Counter, FRAGMENT_HELD, FRAGMENT_PASSED, FRAGMENT_RELEASE_MAGIC, FRAGMENT_TRANSLATED, FlowKey,
    FragmentEntry, FragmentKey, FragmentRelease, MAX_QUEUED_FRAME, QueuedFragmentKey,
    fragment::{self, Hold, Later, MAX_QUEUED_PER_DATAGRAM},
    nat,
    packet::{ETH_HEADER_LEN, EthHeader, Ipv4Header},
};

use crate::{
    forward::{Route, cut_in_tc, forward_action, hand_to_kernel, send},
    maps::{FRAGMENT_QUEUE, FRAGMENTS, HOLD_SCRATCH, account, count},
    packet::{ptr_at, rewrite_ipv4},
};

/// The datagram of a first fragment was translated to `to` and sent along
/// `route`: its later fragments will be too. Fragments of it held so far
/// are translated in the queue; how many, for the TC program to send with
/// this one. `known_mtu` bounds the egress MTU where the route does not say
/// it (an unresolved next hop): the first fragment fit or was cut to it.
#[inline(always)]
pub(crate) fn translated(
    datagram: &FragmentKey,
    to: &FlowKey,
    ingress: u32,
    route: &Route,
    mapping_id: u16,
    now: u64,
    known_mtu: u16,
) -> u8 {
    let (egress, eth_addrs, mtu, resolved) = match *route {
        Route::Resolved { egress, eth_addrs, mtu, .. } => (egress, eth_addrs, mtu, 1),
        Route::Unresolved { ifindex } => (ifindex, [0; 3], known_mtu, 0),
        Route::TooBig { .. } => return 0,
    };
    // SAFETY: a map value, copied out.
    let held = fragment::held_for(unsafe { FRAGMENTS.get(datagram) }, ingress, now);
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
    let _ = FRAGMENTS.insert(datagram, &entry, 0);
    if held == 0 {
        return 0;
    }
    let from = FlowKey::new(datagram.src_addr, datagram.dst_addr, 0, 0, datagram.proto);
    for slot in 0..MAX_QUEUED_PER_DATAGRAM {
        if slot >= held {
            break;
        }
        let key = QueuedFragmentKey { datagram: *datagram, slot: slot as u32 };
        let Some(queued) = FRAGMENT_QUEUE.get_ptr_mut(&key) else {
            continue;
        };
        // SAFETY: a map value; the frame's IPv4 header is 4-byte aligned
        // in it (see QueuedFragment) and the frame was at least that long.
        unsafe {
            let ip = &mut *(*queued).frame.as_mut_ptr().add(ETH_HEADER_LEN).cast::<Ipv4Header>();
            let len = (*queued).len;
            if nat::ttl_expires(ip.ttl) || len as usize - ETH_HEADER_LEN > mtu as usize {
                // Not sent: the TC program skips an empty frame.
                (*queued).len = 0;
                count(if nat::ttl_expires(ip.ttl) {
                    Counter::TtlExpiredDropped
                } else {
                    Counter::FragmentTooBig
                });
                continue;
            }
            rewrite_ipv4(ip, &from, &FlowKey::new(to.src_addr, to.dst_addr, 0, 0, from.proto));
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
    held
}

/// The first fragment of a datagram of no flow goes to the kernel, and so
/// will its later fragments; those held so far go with it, as they came
/// (the TC program hands them to the kernel). Returns how the packet is
/// passed: `pass_reason`, counted.
#[inline(always)]
pub(crate) fn passed(
    ctx: &XdpContext,
    datagram: &FragmentKey,
    ingress: u32,
    now: u64,
    pass_reason: Counter,
) -> Result<(u32, Counter), Counter> {
    // SAFETY: a map value, copied out.
    let held = fragment::held_for(unsafe { FRAGMENTS.get(datagram) }, ingress, now);
    let entry = FragmentEntry {
        created_ns: now,
        ingress,
        verdict: FRAGMENT_PASSED,
        ..FragmentEntry::default()
    };
    let _ = FRAGMENTS.insert(datagram, &entry, 0);
    if held > 0 && release(ctx, datagram, held, ingress, Release::ToKernel).is_err() {
        // The held fragments are left to lapse; the kernel never completes
        // the datagram, as it would not without them.
        count(Counter::NoMetadataDropped);
    }
    Err(pass_reason)
}

/// Where the TC program sends a first fragment and the fragments held for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Out of the egress, with the MAC addresses XDP wrote.
    Egress,
    /// Out of the egress, through the kernel's neighbour resolution.
    Neigh,
    /// Into the kernel, as they came.
    ToKernel,
}

/// Prepends the metadata that asks the TC ingress program to send this
/// first fragment and the `held` fragments of its datagram to `ifindex`, or
/// to the kernel.
#[inline(always)]
pub(crate) fn release(
    ctx: &XdpContext,
    datagram: &FragmentKey,
    held: u8,
    ifindex: u32,
    how: Release,
) -> Result<(), Counter> {
    let len = size_of::<FragmentRelease>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return Err(Counter::NoMetadataDropped);
    }
    let meta = ctx.metadata();
    if meta + size_of::<FragmentRelease>() > ctx.data() {
        return Err(Counter::NoMetadataDropped);
    }
    let meta = meta as *mut FragmentRelease;
    // SAFETY: bounds checked against the packet data just above.
    unsafe {
        (*meta).magic = FRAGMENT_RELEASE_MAGIC;
        (*meta).ifindex = ifindex;
        (*meta).datagram = *datagram;
        (*meta).queued = held;
        (*meta).to_kernel = (how == Release::ToKernel) as u8;
        (*meta).neigh = (how == Release::Neigh) as u8;
        (*meta)._pad = 0;
    }
    Ok(())
}

/// A fragment after the first: translated and sent as its datagram's first
/// fragment was, passed as it was, or held until it comes.
#[inline(always)]
pub(crate) fn later_fragment(
    ctx: &XdpContext,
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
    match fragment::later(entry.as_ref(), ingress, now) {
        Later::Translate => {}
        Later::Pass => return Err(Counter::PassFragment),
        Later::WrongInterface => return Err(Counter::WrongInterface),
        Later::Hold(hold) => {
            return hold_fragment(ctx, &datagram, found, hold, ingress, now, tot_len);
        }
    };
    let Some(entry) = entry else {
        return Err(Counter::PassFragment);
    };
    // Too big for the egress link, it is cut again (fragments carry no DF).
    let too_big = tot_len > entry.mtu;
    // No ICMP error is sent about a fragment after the first.
    if nat::ttl_expires(ttl) {
        return Ok((xdp_action::XDP_DROP, Counter::TtlExpiredDropped));
    }
    let from = FlowKey::new(src_addr, dst_addr, 0, 0, proto);
    let to = FlowKey::new(entry.src_addr, entry.dst_addr, 0, 0, proto);
    account(entry.mapping_id, tot_len, false);
    let route = match forward_action(ingress, entry.egress) {
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
        cut_in_tc(ctx, entry.egress, entry.mtu, neigh)
    } else if neigh {
        hand_to_kernel(ctx, entry.egress)
    } else {
        Ok(())
    };
    if let Err(failed) = handed {
        return Ok((xdp_action::XDP_DROP, failed));
    }
    // The metadata moved the packet: look the headers up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (action, counter) = unsafe {
        rewrite_ipv4(&mut *ip, &from, &to);
        send(&mut *eth, &route, Counter::FragmentTranslated)?
    };
    Ok((if too_big { xdp_action::XDP_PASS } else { action }, counter))
}

/// Copies a fragment that came before its first fragment into the queue
/// and drops it; its first fragment releases it. A frame too large to
/// hold goes to the kernel untouched.
#[inline(always)]
fn hold_fragment(
    ctx: &XdpContext,
    datagram: &FragmentKey,
    found: Option<*mut FragmentEntry>,
    hold: Hold,
    ingress: u32,
    now: u64,
    tot_len: u16,
) -> Result<(u32, Counter), Counter> {
    let frame_len = ETH_HEADER_LEN + tot_len as usize;
    if frame_len > MAX_QUEUED_FRAME {
        return Err(Counter::PassFragment);
    }
    let slot = match hold {
        Hold::First => 0,
        Hold::Slot(slot) => slot,
        Hold::Full => return Ok((xdp_action::XDP_DROP, Counter::FragmentHoldFull)),
    };
    let scratch = HOLD_SCRATCH.get_ptr_mut(0).ok_or(Counter::FragmentHoldFull)?;
    // Masked for the verifier: at most the frame buffer.
    let len = core::hint::black_box(frame_len as u32);
    if len < (ETH_HEADER_LEN + 20) as u32 || len > MAX_QUEUED_FRAME as u32 {
        return Err(Counter::PassFragment);
    }
    // SAFETY: this CPU's buffer; at most its frame's size is written.
    unsafe {
        if bpf_xdp_load_bytes(ctx.ctx, 0, (*scratch).frame.as_mut_ptr().cast(), len) != 0 {
            return Err(Counter::PassMalformed);
        }
        (*scratch).len = len as u16;
    }
    let key = QueuedFragmentKey { datagram: *datagram, slot: slot as u32 };
    // SAFETY: this CPU's buffer, just written.
    if FRAGMENT_QUEUE.insert(&key, unsafe { &*scratch }, 0).is_err() {
        return Ok((xdp_action::XDP_DROP, Counter::FragmentHoldFull));
    }
    match (hold, found) {
        // SAFETY: a map value; another CPU holding a fragment of the same
        // datagram at once may take the same slot: one of the two is lost.
        (Hold::Slot(_), Some(entry)) => unsafe { (*entry).queued = slot + 1 },
        _ => {
            let entry = FragmentEntry {
                created_ns: now,
                ingress,
                verdict: FRAGMENT_HELD,
                queued: 1,
                ..FragmentEntry::default()
            };
            let _ = FRAGMENTS.insert(datagram, &entry, 0);
        }
    }
    Ok((xdp_action::XDP_DROP, Counter::FragmentHeld))
}
