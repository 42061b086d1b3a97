//! Reading and rewriting the packet: header pointers, the TCP fields tracking
//! needs, and the address, port and checksum rewrite.

use core::mem::size_of;

use hairpin_common::{
    Counter, FlowKey, IPPROTO_UDP, checksum,
    packet::{ETH_HEADER_LEN, Ipv4Header, TCP_SYN, TcpHeader, UdpHeader},
    tcp::{self, MAX_OPTIONS_LEN, NO_WINDOW_SCALE, Segment},
};

use crate::{context::Packet, maps::TCP_OPTIONS_SCRATCH};

#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Result<*mut T, Counter> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Counter::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

/// Where the L4 header starts: after the Ethernet header and the IPv4
/// header with its options (`header_len`, 20 to 60), so 34 to 74. Masked
/// so the verifier knows the bound whatever LLVM makes of the arithmetic.
#[inline(always)]
pub(crate) fn l4_offset(header_len: u32) -> usize {
    (core::hint::black_box(ETH_HEADER_LEN as u32 + header_len) & 0x7f) as usize
}

/// Where the checksum and ports of the packet's L4 header are.
pub(crate) struct L4 {
    pub(crate) check: *mut u16,
    pub(crate) ports: *mut [u16; 2],
}

/// Copies a MAC address as a 32-bit and a 16-bit word: a `[u8; 6]`
/// assignment became a memmove call on the fast path.
#[inline(always)]
pub(crate) fn set_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
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
pub(crate) fn eth_addrs(dmac: &[u8; 6], smac: &[u8; 6]) -> [u32; 3] {
    let (d, s) = (dmac, smac);
    [
        u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
        u32::from_ne_bytes([d[4], d[5], s[0], s[1]]),
        u32::from_ne_bytes([s[2], s[3], s[4], s[5]]),
    ]
}

#[inline(always)]
pub(crate) fn l4_header(ctx: &impl Packet, l4_offset: usize, proto: u8) -> Result<L4, Counter> {
    if proto == IPPROTO_UDP {
        let udp: *mut UdpHeader = ptr_at(ctx, l4_offset)?;
        return unsafe { Ok(L4 { check: &raw mut (*udp).check, ports: udp.cast() }) };
    }
    let tcp: *mut TcpHeader = ptr_at(ctx, l4_offset)?;
    unsafe { Ok(L4 { check: &raw mut (*tcp).check, ports: tcp.cast() }) }
}

/// What TCP tracking needs of the packet's TCP header (`ip_header_len`
/// bytes into the IPv4 packet of `tot_len`).
#[inline(always)]
pub(crate) fn tcp_segment(
    ctx: &impl Packet,
    l4_offset: usize,
    ip_header_len: u32,
    ip_len: u32,
) -> Result<Segment, Counter> {
    let tcp: *mut TcpHeader = ptr_at(ctx, l4_offset)?;
    // SAFETY: bounds checked by ptr_at.
    let (seq, ack, data_offset, flags, window) =
        unsafe { ((*tcp).seq, (*tcp).ack_seq, (*tcp).data_offset, (*tcp).flags, (*tcp).window) };
    let header_len = ((data_offset >> 4) as u32) * 4;
    if header_len < 20 {
        return Err(Counter::PassMalformed);
    }
    let payload_len = ip_len.saturating_sub(ip_header_len + header_len);
    let window_scale =
        if flags & TCP_SYN != 0 { syn_window_scale(ctx, l4_offset) } else { NO_WINDOW_SCALE };
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
pub(crate) fn syn_window_scale(ctx: &impl Packet, l4_offset: usize) -> u8 {
    const TCP_HEADER_WORDS: u32 = 5;
    let Ok(tcp) = ptr_at::<TcpHeader>(ctx, l4_offset) else {
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
    let offset = l4_offset as u32 + TCP_HEADER_WORDS * 4;
    // At most MAX_OPTIONS_LEN bytes, into this CPU's buffer.
    if !ctx.load_bytes(offset, options.cast(), options_len) {
        return NO_WINDOW_SCALE;
    }
    // SAFETY: this CPU's buffer, just written.
    tcp::window_scale(unsafe { &*options }, options_len as usize)
}

#[inline(always)]
pub(crate) fn sum_words<const N: usize>(words: &[u16; N]) -> u32 {
    let mut sum = 0u32;
    for word in words {
        sum += *word as u32;
    }
    sum
}

/// New addresses and one hop less.
#[inline(always)]
pub(crate) fn rewrite_ipv4(ip: &mut Ipv4Header, from: &FlowKey, to: &FlowKey) {
    let ttl_proto = |ip: &Ipv4Header| u16::from_ne_bytes([ip.ttl, ip.proto]);
    let old_ttl_proto = ttl_proto(ip);
    ip.ttl -= 1;
    ip.check = checksum::ipv4_after_rewrite(ip.check, from, to, old_ttl_proto, ttl_proto(ip));
    ip.src_addr = to.src_addr;
    ip.dst_addr = to.dst_addr;
}
