//! The two kinds of packet the one datapath runs on, as cilium's
//! `__ctx_buff`: an XDP frame (native XDP on a LAN or WAN interface) and an
//! skb (TC ingress, for interfaces where XDP cannot deliver: veths whose
//! peers take no XDP frames, devices without native XDP or without an
//! Ethernet header). What differs is here: verdict codes, sending, the
//! checksum update, resizing for an ICMP answer and the hand-off to the TC
//! program; everything else is written once over `Packet`.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode, xdp_action,
    },
    helpers::generated::{
        bpf_csum_update, bpf_l4_csum_replace, bpf_redirect, bpf_skb_adjust_room,
        bpf_skb_change_tail, bpf_skb_load_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
        bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
    },
    programs::{TcContext, XdpContext},
};
use hairpin_common::{
    Counter, FlowKey, FragmentKey, HANDOFF_NEIGH, IPPROTO_UDP, NEIGH_REDIRECT_MAGIC, NeighRedirect,
    TC_HANDOFF_MAGIC, TcHandoff, checksum, packet::Ipv4Header,
};

use crate::{
    icmp_messages::{TCP_CHECK_OFFSET, UDP_CHECK_OFFSET},
    maps::{EGRESS_DEVICES, TC_PENDING},
    packet::{L4, rewrite_ipv4},
};

pub(crate) trait Packet {
    /// The verdict that hands the packet to the kernel as it is now.
    const PASS: u32;
    /// The verdict that drops it.
    const DROP: u32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The interface the packet arrived on.
    fn ingress(&self) -> u32;
    /// The context, for helpers that take either kind.
    fn raw(&self) -> *mut c_void;
    /// Copies `len` bytes from `offset` of the packet (linear or not).
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> bool;
    /// The largest segment a GSO packet (an aggregate of TCP or UDP
    /// segments, from GRO or a local sender) is sent as; 0 for others.
    fn gso_size(&self) -> u32;
    /// The whole packet's length, linear or not (an skb's `len`).
    fn len(&self) -> u32;

    /// Back out of the interface it came in on.
    fn tx(&self) -> u32;
    /// Out of `egress` with the MAC addresses already written; `None` where
    /// this program cannot send there itself.
    fn redirect(&self, egress: u32) -> Option<u32>;

    /// Rewrites the tuple `from` to `to` (addresses, ports, one hop less)
    /// with its checksums; `l4_offset` is where `l4` starts. The packet's
    /// pointers are invalid afterwards.
    fn rewrite(
        &self,
        ip: &mut Ipv4Header,
        l4: &L4,
        l4_offset: usize,
        from: &FlowKey,
        to: &FlowKey,
    ) -> Result<(), Counter>;

    /// Whether the transport checksum field at `offset` is left to offload
    /// to complete (an skb's CHECKSUM_PARTIAL): it then holds the
    /// pseudo-header sum.
    fn checksum_offloaded(&self, offset: usize) -> bool;

    /// Cuts the frame of `frame_len` bytes to its first `keep` and makes
    /// room for `prepend` bytes between the Ethernet header and the rest,
    /// for an ICMP answer: the rest stays where it is, `prepend` bytes
    /// further in than before. Where the received Ethernet header is then
    /// (its bytes may overlap the room); `None` if it did not work.
    fn reshape(&self, frame_len: i32, keep: i32, prepend: i32) -> Option<usize>;

    /// Leaves `handoff` for the TC program, which sends the packet on once
    /// this program passes it.
    fn hand_off(&self, handoff: &TcHandoff) -> Result<(), Counter>;

    /// Leaves it for the TC program to send out of `ifindex` with
    /// `bpf_redirect_neigh`, once this program passes the packet.
    fn hand_to_neigh(&self, ifindex: u32) -> Result<(), Counter>;
}

impl Packet for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> bool {
        // SAFETY: the helper copies at most `len` bytes to `to`, which the
        // callers size.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, to, len) == 0 }
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // Only ever asked of a GSO packet, which a frame never is.
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn tx(&self) -> u32 {
        xdp_action::XDP_TX
    }

    #[inline(always)]
    fn redirect(&self, egress: u32) -> Option<u32> {
        // Choosing the devmap target now, before anything is rewritten, is
        // also the check that XDP can send there (only interfaces attached
        // in XDP mode are in the devmap).
        EGRESS_DEVICES.redirect(egress, 0).ok()
    }

    #[inline(always)]
    fn rewrite(
        &self,
        ip: &mut Ipv4Header,
        l4: &L4,
        _l4_offset: usize,
        from: &FlowKey,
        to: &FlowKey,
    ) -> Result<(), Counter> {
        rewrite_ipv4(ip, from, to);
        // SAFETY: pointers into the packet, bounds checked by l4_header.
        unsafe {
            *l4.check = checksum::l4_after_rewrite(*l4.check, from, to, from.proto == IPPROTO_UDP);
            *l4.ports = [to.src_port, to.dst_port];
        }
        Ok(())
    }

    #[inline(always)]
    fn checksum_offloaded(&self, _offset: usize) -> bool {
        // A driver's frame carries complete checksums.
        false
    }

    #[inline(always)]
    fn reshape(&self, frame_len: i32, keep: i32, prepend: i32) -> Option<usize> {
        // SAFETY: helpers on this program's own frame.
        let reshaped = unsafe {
            bpf_xdp_adjust_tail(self.ctx, keep - frame_len) == 0
                && bpf_xdp_adjust_head(self.ctx, -prepend) == 0
        };
        // The room is in front: the old Ethernet header follows it.
        reshaped.then_some(prepend as usize)
    }

    #[inline(always)]
    fn hand_off(&self, handoff: &TcHandoff) -> Result<(), Counter> {
        prepend_metadata(self, *handoff)
    }

    #[inline(always)]
    fn hand_to_neigh(&self, ifindex: u32) -> Result<(), Counter> {
        prepend_metadata(self, NeighRedirect { magic: NEIGH_REDIRECT_MAGIC, ifindex })
    }
}

/// Puts `value` in front of the frame as its metadata, for the TC ingress
/// program.
#[inline(always)]
fn prepend_metadata<T: Copy>(ctx: &XdpContext, value: T) -> Result<(), Counter> {
    let len = size_of::<T>() as i32;
    // SAFETY: a helper on this program's own frame.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return Err(Counter::NoMetadataDropped);
    }
    let meta = ctx.metadata();
    if meta + size_of::<T>() > XdpContext::data(ctx) {
        return Err(Counter::NoMetadataDropped);
    }
    // SAFETY: bounds checked against the packet data just above.
    unsafe { (meta as *mut T).write_unaligned(value) };
    Ok(())
}

/// The skb under the TC context.
#[inline(always)]
pub(crate) fn skb(ctx: &TcContext) -> *mut __sk_buff {
    ctx.skb.skb
}

impl Packet for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn ingress(&self) -> u32 {
        // SAFETY: the context's field, read.
        unsafe { (*skb(self)).ingress_ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> bool {
        // SAFETY: the helper copies at most `len` bytes to `to`, which the
        // callers size.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), offset, to, len) == 0 }
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: the context's field, read.
        unsafe { (*skb(self)).gso_size }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // SAFETY: the context's field, read.
        unsafe { (*skb(self)).len }
    }

    #[inline(always)]
    fn tx(&self) -> u32 {
        // SAFETY: a helper that only records where the skb goes.
        unsafe { bpf_redirect(self.ingress(), 0) as u32 }
    }

    #[inline(always)]
    fn redirect(&self, egress: u32) -> Option<u32> {
        // An skb can go out of any interface, Ethernet or not (the kernel
        // strips the Ethernet header for a device without one).
        // SAFETY: a helper that only records where the skb goes.
        Some(unsafe { bpf_redirect(egress, 0) } as u32)
    }

    #[inline(always)]
    fn rewrite(
        &self,
        ip: &mut Ipv4Header,
        l4: &L4,
        l4_offset: usize,
        from: &FlowKey,
        to: &FlowKey,
    ) -> Result<(), Counter> {
        rewrite_ipv4(ip, from, to);
        // SAFETY: pointers into the packet, bounds checked by l4_header.
        unsafe { *l4.ports = [to.src_port, to.dst_port] };
        // The transport checksum through the kernel, which knows how the skb
        // carries it: complete (updated, with skb->csum for
        // CHECKSUM_COMPLETE), or left to offload (CHECKSUM_PARTIAL: the
        // field is the pseudo-header sum, and only the addresses change it).
        let udp = from.proto == IPPROTO_UDP;
        let (check_offset, zero_means_none) = if udp {
            (l4_offset + UDP_CHECK_OFFSET, BPF_F_MARK_MANGLED_0 as u64)
        } else {
            (l4_offset + TCP_CHECK_OFFSET, 0)
        };
        let skb = skb(self);
        let addresses = checksum::addresses_diff(from, to) as u64;
        let ports = checksum::ports_diff(from, to) as u64;
        // SAFETY: a pointer into the packet, bounds checked by l4_header.
        if udp && unsafe { *l4.check } == 0 {
            // No UDP checksum to update, but the ports moved under the
            // sum of a CHECKSUM_COMPLETE skb (the helper leaves a zero
            // field, and that sum, alone).
            // SAFETY: a helper on this program's own skb.
            unsafe { bpf_csum_update(skb, ports as u32) };
            return Ok(());
        }
        // SAFETY: helpers on this program's own packet.
        let updated = unsafe {
            bpf_l4_csum_replace(
                skb.cast(),
                check_offset as u32,
                0,
                addresses,
                BPF_F_PSEUDO_HDR as u64 | zero_means_none,
            ) == 0
                && bpf_l4_csum_replace(skb.cast(), check_offset as u32, 0, ports, zero_means_none)
                    == 0
        };
        if updated { Ok(()) } else { Err(Counter::ChecksumFailed) }
    }

    #[inline(always)]
    fn checksum_offloaded(&self, offset: usize) -> bool {
        // The skb does not show its ip_summed; the kernel's update does:
        // without BPF_F_PSEUDO_HDR it leaves a CHECKSUM_PARTIAL field alone
        // and changes any other, which is then changed back.
        const ONE: u64 = 1;
        const MINUS_ONE: u64 = !1u32 as u64;
        let skb = skb(self);
        let mut before = 0u16;
        let mut after = 0u16;
        let offset = offset as u32;
        // SAFETY: helpers on this program's own packet, reading into the
        // stack.
        unsafe {
            if bpf_skb_load_bytes(skb.cast(), offset, (&raw mut before).cast(), 2) != 0
                || bpf_l4_csum_replace(skb.cast(), offset, 0, ONE, 0) != 0
                || bpf_skb_load_bytes(skb.cast(), offset, (&raw mut after).cast(), 2) != 0
            {
                return false;
            }
            if after == before {
                return true;
            }
            bpf_l4_csum_replace(skb.cast(), offset, 0, MINUS_ONE, 0);
        }
        false
    }

    #[inline(always)]
    fn reshape(&self, _frame_len: i32, keep: i32, prepend: i32) -> Option<usize> {
        let skb = skb(self);
        // Room after the MAC header, not in front of it: the kernel moves
        // its network header with it (to the answer's IPv4 header), which
        // a device without an Ethernet header is sent from, and keeps a
        // left-to-offload checksum pointing into the quote.
        // SAFETY: helpers on this program's own packet.
        let reshaped = unsafe {
            bpf_skb_change_tail(skb, keep as u32, 0) == 0
                && bpf_skb_adjust_room(skb, prepend, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, 0) == 0
        };
        reshaped.then_some(0)
    }

    #[inline(always)]
    fn hand_off(&self, handoff: &TcHandoff) -> Result<(), Counter> {
        // This program is the TC program: the hand-off waits in this CPU's
        // slot until it passes the packet (see `tc::run_datapath`).
        let pending = TC_PENDING.get_ptr_mut(0).ok_or(Counter::NoMetadataDropped)?;
        // SAFETY: this CPU's slot; a TC program runs to completion on it.
        unsafe { *pending = *handoff };
        Ok(())
    }

    #[inline(always)]
    fn hand_to_neigh(&self, ifindex: u32) -> Result<(), Counter> {
        let handoff = TcHandoff {
            magic: TC_HANDOFF_MAGIC,
            ifindex,
            datagram: FragmentKey::default(),
            mtu: u16::MAX,
            queued: 0,
            flags: HANDOFF_NEIGH,
            _pad: 0,
        };
        self.hand_off(&handoff)
    }
}
