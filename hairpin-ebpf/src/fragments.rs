//! Fragments of tracked flows: the first one, translated from its flow,
//! leaves behind how its datagram is translated; the later ones (which
//! carry no ports) are translated by that.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use hairpin_common::{
    Counter, FlowKey, FragmentEntry, FragmentKey, fragment, nat,
    packet::{ETH_HEADER_LEN, EthHeader, Ipv4Header},
};

use crate::{
    forward::{Route, forward_action, hand_to_kernel, send},
    maps::{FRAGMENTS, account},
    packet::{ptr_at, rewrite_ipv4},
};

/// Remembers how the datagram of a translated first fragment (`datagram`,
/// as it arrived) is translated and sent, for its later fragments.
#[inline(always)]
pub(crate) fn remember(
    datagram: &FragmentKey,
    to: &FlowKey,
    ingress: u32,
    route: &Route,
    mapping_id: u16,
    now: u64,
) {
    let (egress, eth_addrs, mtu, resolved) = match *route {
        Route::Resolved { egress, eth_addrs, mtu, .. } => (egress, eth_addrs, mtu, 1),
        // Sent by the kernel, which checks the size itself.
        Route::Unresolved { ifindex } => (ifindex, [0; 3], u16::MAX, 0),
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
        ..FragmentEntry::default()
    };
    // A full table evicts its oldest datagram (LRU).
    let _ = FRAGMENTS.insert(datagram, &entry, 0);
}

/// A fragment after the first: translated and sent as its datagram's first
/// fragment was, if that was translated, here, lately. Otherwise it is no
/// tracked flow's (`Err`, to the kernel untouched), or its translation has
/// lapsed (dropped: it would reach the kernel untranslated).
#[inline(always)]
pub(crate) fn translate_later(
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
    // SAFETY: a map value, copied out.
    let entry = *unsafe { FRAGMENTS.get(&datagram) }.ok_or(Counter::PassFragment)?;
    if let Err(refused) = fragment::translation_usable(&entry, ingress, now) {
        if refused == Counter::WrongInterface {
            return Err(refused);
        }
        return Ok((xdp_action::XDP_DROP, refused));
    }
    let tot_len = u16::from_be(tot_len);
    if tot_len > entry.mtu {
        return Ok((xdp_action::XDP_DROP, Counter::FragmentTooBig));
    }
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
    if let Route::Unresolved { ifindex } = route
        && let Err(failed) = hand_to_kernel(ctx, ifindex)
    {
        return Ok((xdp_action::XDP_DROP, failed));
    }
    // hand_to_kernel may have moved the packet: look the headers up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        rewrite_ipv4(&mut *ip, &from, &to);
        send(&mut *eth, &route, Counter::FragmentTranslated)
    }
}
