//! The TC ingress programs. Next to XDP: what XDP translated but cannot
//! send itself, handed over with metadata in front of the packet. It sends
//! a packet whose next hop is unresolved with `bpf_redirect_neigh`, cuts a
//! packet too big for its link into fragments, and releases the fragments
//! held for a first fragment. Everything else goes on to the kernel. In TC
//! mode: the whole datapath on the skb, which leaves itself the same
//! hand-off in a per-CPU slot instead of the metadata.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{
        bpf_clone_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_pull_data, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use hairpin_common::{
    Counter, HANDOFF_NEIGH, HANDOFF_TO_KERNEL, MAX_QUEUED_FRAME, NEIGH_MARK_MASK, NEIGH_MARK_TAG,
    NEIGH_REDIRECT_MAGIC, NeighRedirect, QueuedFragmentKey, TC_HANDOFF_MAGIC, TcHandoff, checksum,
    fragment::{self, MAX_QUEUED_PER_DATAGRAM, MAX_SPLIT_FRAGMENTS, MAX_SPLIT_PAYLOAD},
    packet::{ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, IPV4_HEADER_LEN, Ipv4Header, L4_OFFSET},
};

use crate::{
    context::skb,
    datapath::try_hairpin,
    maps::{FRAGMENT_QUEUE, SPLIT_SCRATCH, TC_PENDING, count},
    packet::ptr_at,
};

/// How much of the packet the datapath reads directly: the Ethernet
/// header, an IPv4 header with options, and an ICMP error's quote of
/// another (the TCP options are loaded with a helper).
const HEADERS_LEN: u32 = 160;

/// The whole datapath on an skb (TC mode): translated and redirected,
/// answered, dropped, or passed to the kernel; a hand-off it left itself
/// is carried out as the TC program next to XDP carries out XDP's.
pub(crate) fn run_datapath(ctx: &TcContext) -> i32 {
    let skb = skb(ctx);
    // Also what an XDP program handed over: while an interface changes
    // from XDP to TC mode, both run for a moment.
    if let Some(verdict) = marked(skb).or_else(|| handed_over(skb)) {
        return verdict;
    }
    // The headers must be in the skb's linear part to be read in place
    // (a GRO aggregate or a local sender's skb may hold them in pages).
    // SAFETY: the context's fields, read.
    let (len, data, data_end) = unsafe { ((*skb).len, (*skb).data, (*skb).data_end) };
    let wanted = if len < HEADERS_LEN { len } else { HEADERS_LEN };
    // SAFETY: a helper on this program's own packet.
    if data_end.wrapping_sub(data) < wanted && unsafe { bpf_skb_pull_data(skb, wanted) } != 0 {
        count(Counter::PullFailed);
        return TC_ACT_SHOT;
    }
    // A hand-off is only ever this run's (a run that left one always
    // takes it, but a slot that says otherwise must not send this packet).
    if let Some(pending) = TC_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a TC program runs to completion on it.
        unsafe { (*pending).magic = 0 };
    }
    let (action, counter) = match try_hairpin(ctx) {
        Ok(verdict) => verdict,
        Err(pass_reason) => (TC_ACT_OK as u32, pass_reason),
    };
    count(counter);
    let Some(pending) = TC_PENDING.get_ptr_mut(0) else {
        return action as i32;
    };
    // SAFETY: this CPU's slot, written by this run if at all.
    let handoff = unsafe {
        if (*pending).magic != TC_HANDOFF_MAGIC {
            return action as i32;
        }
        (*pending).magic = 0;
        *pending
    };
    if action != TC_ACT_OK as u32 {
        return action as i32;
    }
    if handoff.flags == HANDOFF_NEIGH && handoff.queued == 0 && handoff.mtu == u16::MAX {
        // SAFETY: a helper that records where the skb goes.
        return unsafe { bpf_redirect_neigh(handoff.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    send_handed_off(skb, &handoff)
}

/// Puts an Ethernet header in front of an IPv4 packet of a device without
/// one, so that the datapath finds its usual frame; the kernel takes it off
/// again for such a device (passed, or sent out of one). Anything else is
/// the kernel's (`Err`).
#[inline(always)]
pub(crate) fn push_ethernet_header(ctx: &TcContext) -> Result<(), i32> {
    let skb = skb(ctx);
    // SAFETY: the context's field, read.
    if unsafe { (*skb).protocol } != (ETH_P_IPV4.to_be()) as u32 {
        return Err(TC_ACT_OK);
    }
    // SAFETY: a helper on this program's own packet.
    if unsafe { bpf_skb_change_head(skb, ETH_HEADER_LEN as u32, 0) } != 0 {
        count(Counter::PassMalformed);
        return Err(TC_ACT_OK);
    }
    let eth: *mut EthHeader = ptr_at(ctx, 0).map_err(|_| TC_ACT_OK)?;
    // SAFETY: bounds checked by ptr_at; the helper zeroed the addresses.
    unsafe { (*eth).ether_type = ETH_P_IPV4.to_be() };
    Ok(())
}

/// A copy this program sent back into its interface (`Out::Neigh`,
/// `Out::Kernel`): sent on with `bpf_redirect_neigh`, or passed.
#[inline(always)]
fn marked(skb: *mut __sk_buff) -> Option<i32> {
    // SAFETY: the context's field, read and written.
    let mark = unsafe { (*skb).mark };
    if mark & NEIGH_MARK_MASK != NEIGH_MARK_TAG {
        return None;
    }
    unsafe { (*skb).mark = 0 };
    let ifindex = mark & !NEIGH_MARK_MASK;
    if ifindex == 0 {
        return Some(TC_ACT_OK);
    }
    // SAFETY: a helper that records where the skb goes.
    Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// The metadata as a `T`, when there is that much of it.
#[inline(always)]
fn metadata<T>(skb: *mut __sk_buff) -> Option<*mut T> {
    // SAFETY: the context's fields, read.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + size_of::<T>() > data {
        return None;
    }
    Some(meta as *mut T)
}

pub(crate) fn tc_ingress(ctx: &TcContext) -> i32 {
    let skb = skb(ctx);
    marked(skb).or_else(|| handed_over(skb)).unwrap_or(TC_ACT_OK)
}

/// What the XDP program handed over in front of the packet, sent on; `None`
/// for a packet without a hand-off.
#[inline(always)]
fn handed_over(skb: *mut __sk_buff) -> Option<i32> {
    let magic = metadata::<u32>(skb)?;
    // SAFETY: each is checked to lie inside the metadata before it is read.
    match unsafe { *magic } {
        NEIGH_REDIRECT_MAGIC => {
            let redirect = metadata::<NeighRedirect>(skb)?;
            unsafe {
                (*redirect).magic = 0;
                Some(bpf_redirect_neigh((*redirect).ifindex, core::ptr::null_mut(), 0, 0) as i32)
            }
        }
        TC_HANDOFF_MAGIC => {
            let handoff = unsafe { *metadata::<TcHandoff>(skb)? };
            // The copies sent on carry the metadata too: they must not be
            // taken for another hand-off when they come back in.
            unsafe { *magic = 0 };
            Some(send_handed_off(skb, &handoff))
        }
        _ => None,
    }
}

/// Where the packets this program makes go.
#[derive(Clone, Copy)]
enum Out {
    /// Out of this interface, with the MAC addresses XDP wrote.
    Egress(u32),
    /// Out of this interface, through the kernel's neighbour resolution:
    /// each copy comes back in here, marked, for `bpf_redirect_neigh`.
    Neigh,
    /// Into the kernel's stack, as if received: each copy comes back in
    /// here, marked, to be passed.
    Kernel,
}

impl Out {
    /// Where to, given the egress and how the XDP program asked.
    #[inline(always)]
    fn of(skb: *mut __sk_buff, ifindex: u32, neigh: bool) -> Option<Self> {
        if !neigh {
            return Some(Out::Egress(ifindex));
        }
        if ifindex & NEIGH_MARK_MASK != 0 || ifindex == 0 {
            return None;
        }
        // SAFETY: the context's field, written: every copy carries it.
        unsafe { (*skb).mark = NEIGH_MARK_TAG | ifindex };
        Some(Out::Neigh)
    }
}

/// Sends a copy of the packet as it is now; whether it went (queued
/// under congestion counts as gone).
#[inline(always)]
fn send_copy(skb: *mut __sk_buff, out: Out) -> bool {
    const NET_XMIT_CN: i64 = 2;
    // SAFETY: helpers on this program's own packet and its context.
    let sent = unsafe {
        match out {
            Out::Egress(ifindex) => bpf_clone_redirect(skb, ifindex, 0),
            Out::Neigh | Out::Kernel => {
                bpf_clone_redirect(skb, (*skb).ifindex, BPF_F_INGRESS as u64)
            }
        }
    };
    sent == 0 || sent == NET_XMIT_CN
}

/// Sends the packet (translated by XDP; cut into fragments when larger
/// than the hand-off's MTU), then each fragment held for its datagram
/// (translated by XDP in the queue), or all of them as they came back into
/// the kernel. The packet is rewritten into each held frame in turn and a
/// copy sent each time; every held frame leaves the queue.
#[inline(always)]
fn send_handed_off(skb: *mut __sk_buff, handoff: &TcHandoff) -> i32 {
    let out = if handoff.flags & HANDOFF_TO_KERNEL != 0 {
        // SAFETY: the context's field, written: every copy carries it.
        unsafe { (*skb).mark = NEIGH_MARK_TAG };
        Some(Out::Kernel)
    } else {
        Out::of(skb, handoff.ifindex, handoff.flags & HANDOFF_NEIGH != 0)
    };
    let Some(out) = out else {
        count(Counter::NoMetadataDropped);
        return TC_ACT_SHOT;
    };
    send_or_cut(skb, out, handoff.mtu);
    // Every slot: two CPUs may have taken them out of order.
    for slot in 0..MAX_QUEUED_PER_DATAGRAM {
        if handoff.queued == 0 {
            break;
        }
        let key = QueuedFragmentKey { datagram: handoff.datagram, slot };
        let Some(held) = FRAGMENT_QUEUE.get_ptr(&key) else {
            continue;
        };
        // SAFETY: a map value; its length is bounded below for the verifier.
        let len = core::hint::black_box(unsafe { (*held).len } as u32);
        if len < L4_OFFSET as u32 || len > MAX_QUEUED_FRAME as u32 {
            let _ = FRAGMENT_QUEUE.remove(&key);
            continue;
        }
        if !matches!(out, Out::Kernel) && len - ETH_HEADER_LEN as u32 > handoff.mtu as u32 {
            let _ = FRAGMENT_QUEUE.remove(&key);
            count(Counter::FragmentTooBig);
            continue;
        }
        // SAFETY: helpers on this program's own packet; at most the held
        // frame's bytes are read from its map value.
        let rewritten = unsafe {
            bpf_skb_change_tail(skb, len, 0) == 0
                && bpf_skb_store_bytes(
                    skb,
                    0,
                    (*held).frame.as_ptr().cast(),
                    len,
                    BPF_F_RECOMPUTE_CSUM as u64,
                ) == 0
        };
        let _ = FRAGMENT_QUEUE.remove(&key);
        if rewritten && send_copy(skb, out) {
            count(Counter::FragmentReleased);
        }
    }
    TC_ACT_SHOT
}

/// Sends a copy of the packet, cut into fragments first when it is larger
/// than `mtu` (the kernel cuts what it is handed itself).
#[inline(always)]
fn send_or_cut(skb: *mut __sk_buff, out: Out, mtu: u16) -> bool {
    let mut tot_len = [0u8; 2];
    // SAFETY: a helper reading this program's packet into the stack.
    let read = unsafe {
        bpf_skb_load_bytes(skb.cast(), ETH_HEADER_LEN as u32 + 2, tot_len.as_mut_ptr().cast(), 2)
    };
    if matches!(out, Out::Kernel) || read != 0 || u16::from_be_bytes(tot_len) <= mtu {
        return send_copy(skb, out);
    }
    let cut = try_split(skb, mtu, out).is_ok();
    count(if cut { Counter::PacketFragmented } else { Counter::TooBigDropped });
    cut
}

#[inline(always)]
fn try_split(skb: *mut __sk_buff, mtu: u16, out: Out) -> Result<(), ()> {
    let mut header = Ipv4Header {
        version_ihl: 0,
        tos: 0,
        tot_len: 0,
        id: 0,
        frag_off: 0,
        ttl: 0,
        proto: 0,
        check: 0,
        src_addr: 0,
        dst_addr: 0,
    };
    let header_ptr = (&raw mut header).cast();
    // SAFETY: a helper reading this program's packet into the stack.
    if unsafe { bpf_skb_load_bytes(skb.cast(), ETH_HEADER_LEN as u32, header_ptr, 20) } != 0 {
        return Err(());
    }
    // Options would have to be sorted into those copied into every
    // fragment and the others: such packets are not cut.
    if header.version_ihl != 0x45 {
        return Err(());
    }
    let tot_len = u16::from_be(header.tot_len) as u32;
    let plan =
        fragment::split(tot_len, IPV4_HEADER_LEN as u32, mtu as u32, header.frag_off).ok_or(())?;
    let payload_len = core::hint::black_box(tot_len - IPV4_HEADER_LEN as u32);
    if payload_len == 0 || payload_len > MAX_SPLIT_PAYLOAD as u32 {
        return Err(());
    }
    let scratch = SPLIT_SCRATCH.get_ptr_mut(0).ok_or(())?;
    let scratch = scratch.cast::<u8>();
    // SAFETY: at most MAX_SPLIT_PAYLOAD bytes into this CPU's buffer.
    if unsafe { bpf_skb_load_bytes(skb.cast(), L4_OFFSET as u32, scratch.cast(), payload_len) } != 0
    {
        return Err(());
    }
    let frag_off = header.frag_off;
    for index in 0..MAX_SPLIT_FRAGMENTS {
        if index >= plan.fragments {
            break;
        }
        let piece = fragment::piece(&plan, payload_len, index, frag_off);
        // Bounded for the verifier: the offset below the payload bound, the
        // length at most that (the buffer is twice as long).
        let offset = core::hint::black_box(piece.offset) as usize & (MAX_SPLIT_PAYLOAD - 1);
        let len = core::hint::black_box(piece.len);
        if len == 0 || len > MAX_SPLIT_PAYLOAD as u32 {
            return Err(());
        }
        header.tot_len = ((IPV4_HEADER_LEN as u32 + len) as u16).to_be();
        header.frag_off = piece.frag_off_be;
        header.check = checksum::ipv4_header(&header);
        // SAFETY: helpers on this program's own packet; the payload is read
        // from inside this CPU's buffer.
        let sent = unsafe {
            bpf_skb_change_tail(skb, L4_OFFSET as u32 + len, 0) == 0
                && bpf_skb_store_bytes(
                    skb,
                    ETH_HEADER_LEN as u32,
                    (&raw const header).cast(),
                    IPV4_HEADER_LEN as u32,
                    BPF_F_RECOMPUTE_CSUM as u64,
                ) == 0
                && bpf_skb_store_bytes(
                    skb,
                    L4_OFFSET as u32,
                    scratch.add(offset).cast(),
                    len,
                    BPF_F_RECOMPUTE_CSUM as u64,
                ) == 0
        } && send_copy(skb, out);
        if !sent {
            return Err(());
        }
    }
    Ok(())
}
