#![no_std]
#![no_main]
// The BPF target's `core` has no atomic read-modify-write types; the
// intrinsic compiles to BPF's atomic add (the crate is built with
// RUSTC_BOOTSTRAP=1 for build-std already).
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys and values are passed by reference: by value, the map helpers'
// generic arguments copy them onto the 512-byte stack (a held fragment is
// 1.5 KiB).
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod context;
mod datapath;
mod forward;
mod fragments;
mod icmp_messages;
mod maps;
mod packet;
mod tc;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{datapath::try_hairpin, maps::count};

/// The datapath in native XDP, on interfaces where XDP can deliver what it
/// translates.
#[xdp(frags)]
pub fn hairpin(ctx: XdpContext) -> u32 {
    let (action, counter) = match try_hairpin(&ctx) {
        Ok(forwarded) => forwarded,
        Err(pass_reason) => (xdp_action::XDP_PASS, pass_reason),
    };
    count(counter);
    action
}

/// TC ingress next to the XDP program: sends on what it translated but
/// could not send itself (see `tc`).
#[classifier]
pub fn hairpin_neigh_redirect(ctx: TcContext) -> i32 {
    tc::tc_ingress(&ctx)
}

/// The datapath on skbs (an interface attached in TC mode).
#[classifier]
pub fn hairpin_tc(ctx: TcContext) -> i32 {
    tc::run_datapath(&ctx)
}

/// The datapath on skbs of a device without an Ethernet header (tun,
/// wireguard, ppp): one is put in front first.
#[classifier]
pub fn hairpin_tc_l3(ctx: TcContext) -> i32 {
    match tc::push_ethernet_header(&ctx) {
        Ok(()) => tc::run_datapath(&ctx),
        Err(verdict) => verdict,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
