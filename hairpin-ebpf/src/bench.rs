//! The benchmark's programs (`cargo xtask bench`): a traffic generator for
//! live frames, a counting sink, the empty program, and a forwarder without
//! NAT in XDP and in TC, the limit of any XDP or TC gateway on the same
//! path.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use hairpin_common::{
    IPPROTO_UDP,
    bench::{
        GENERATOR_FRAME_LEN, GeneratorConfig, MAX_FORWARD_DEVICES, SINK_OTHER, SINK_SLOTS, SINK_UDP,
    },
    checksum,
    packet::{ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, Ipv4Header, L4_OFFSET, UdpHeader},
};

#[map]
static GENERATOR_CONFIG: Array<GeneratorConfig> = Array::with_max_entries(1, 0);

#[map]
static GENERATOR_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SINK_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SINK_SLOTS, 0);

#[map]
static FORWARD_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_FORWARD_DEVICES, 0);

const AF_INET: u8 = 2;

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[xdp]
pub fn bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// What the test beds attach to a veth peer so that frames sent into the
/// veth are delivered (a veth takes XDP frames only where its receiving
/// end runs XDP); frags-capable, for jumbo MTUs.
#[xdp(frags)]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts IPv4 UDP frames and the rest apart, and drops them all.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let slot = if is_ipv4_udp(&ctx) { SINK_UDP } else { SINK_OTHER };
    if let Some(count) = SINK_COUNTS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn is_ipv4_udp(ctx: &XdpContext) -> bool {
    let (Some(eth), Some(ip)) =
        (ptr_at::<EthHeader>(ctx, 0), ptr_at::<Ipv4Header>(ctx, ETH_HEADER_LEN))
    else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*eth).ether_type == ETH_P_IPV4.to_be() && (*ip).proto == IPPROTO_UDP }
}

/// Gives its frame the ports (and UDP checksum) of the next flow and sends
/// it back out of the interface it is run on (live frames).
#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    let (Some(config), Some(counter), Some(frame)) = (
        GENERATOR_CONFIG.get(0),
        GENERATOR_COUNTER.get_ptr_mut(0),
        ptr_at::<[u32; GENERATOR_FRAME_LEN / 4]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU slot and a bounds-checked frame.
    unsafe {
        // Word by word: a plain copy becomes a call to a byte-wise memmove.
        for (i, word) in config.frame.iter().enumerate() {
            core::ptr::write_volatile(frame.cast::<u32>().add(i), *word);
        }
        let udp = frame.cast::<u8>().add(L4_OFFSET).cast::<UdpHeader>();
        let flow = config.flow(*counter);
        *counter += 1;
        (*udp).src_port = flow.src_port;
        (*udp).dst_port = flow.dst_port;
        (*udp).check = flow.check;
    }
    xdp_action::XDP_TX
}

/// Routes IPv4 as the kernel would, without NAT: next hop from
/// `bpf_fib_lookup`, MAC addresses, TTL and header checksum, then out of
/// the egress interface (`XDP_TX` when it is the ingress one). Anything it
/// cannot route goes to the kernel.
#[xdp]
pub fn bench_forward(ctx: XdpContext) -> u32 {
    let (start, end, ingress) = (ctx.data(), ctx.data_end(), ctx.ingress_ifindex() as u32);
    match route(ctx.as_ptr(), start, end, ingress) {
        Some(egress) if egress == ingress => xdp_action::XDP_TX,
        Some(egress) => FORWARD_DEVICES.redirect(egress, 0).unwrap_or(xdp_action::XDP_PASS),
        None => xdp_action::XDP_PASS,
    }
}

/// The same forwarder on skbs (tcx ingress): `bpf_redirect` out of the
/// egress interface.
#[classifier]
pub fn bench_forward_tc(ctx: TcContext) -> i32 {
    // SAFETY: the context's field, read.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    match route(ctx.as_ptr(), ctx.data(), ctx.data_end(), ingress) {
        // SAFETY: a helper that only records where the skb goes.
        Some(egress) => unsafe { bpf_redirect(egress, 0) as i32 },
        None => TC_ACT_OK,
    }
}

/// Routes the IPv4 packet between `start` and `end` (an XDP frame's or a
/// linear skb's) in place, arrived on `ingress`: the egress interface, or
/// `None` for the kernel.
#[inline(always)]
fn route(ctx: *mut core::ffi::c_void, start: usize, end: usize, ingress: u32) -> Option<u32> {
    if start + ETH_HEADER_LEN + size_of::<Ipv4Header>() > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    let (eth, ip) = unsafe {
        (&mut *(start as *mut EthHeader), &mut *((start + ETH_HEADER_LEN) as *mut Ipv4Header))
    };
    if eth.ether_type != ETH_P_IPV4.to_be() || ip.ttl <= 1 {
        return None;
    }
    let mut storage = core::mem::MaybeUninit::<FibParams>::uninit();
    let params = storage.as_mut_ptr();
    // SAFETY: the parameters are zeroed word by word in place (`mem::zeroed`
    // and copies of zeroed values become calls to a byte-wise memset), then
    // filled in; all-zero is a valid FibParams.
    let params = unsafe {
        for i in 0..size_of::<FibParams>() / 8 {
            core::ptr::write_volatile(params.cast::<u64>().add(i), 0);
        }
        (*params).family = AF_INET;
        (*params).l4_protocol = ip.proto;
        (*params).__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
        (*params).ifindex = ingress;
        (*params).__bindgen_anon_3.ipv4_src = ip.src_addr;
        (*params).__bindgen_anon_4.ipv4_dst = ip.dst_addr;
        if bpf_fib_lookup(ctx, params, size_of::<FibParams>() as i32, 0) as u32
            != BPF_FIB_LKUP_RET_SUCCESS
        {
            return None;
        }
        &*params
    };
    let ttl_proto = |ip: &Ipv4Header| u16::from_ne_bytes([ip.ttl, ip.proto]);
    let old = ttl_proto(ip);
    ip.ttl -= 1;
    ip.check = checksum::replace_u16(ip.check, old, ttl_proto(ip));
    eth.src = params.smac;
    eth.dst = params.dmac;
    Some(params.ifindex)
}

const _: () = assert!(size_of::<FibParams>() % 8 == 0);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
