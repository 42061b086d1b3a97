//! Counting the conntrack tables' entries in the kernel: user space loads
//! this program over the instance's pinned tables and runs it
//! (`BPF_PROG_TEST_RUN`) once per table, the two runs side by side on two
//! CPUs. `bpf_for_each_map_elem` visits every entry without copying it out,
//! several times faster than reading the tables in batches, which is all
//! user space can do (the kernel keeps no count it can read).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_for_each_map_elem,
    macros::{map, xdp},
    maps::{HashMap, LruHashMap},
    programs::XdpContext,
};
use hairpin_common::{DEFAULT_CONNTRACK_CAPACITY, FlowEntry, FlowKey};

// The instance's tables: user space points these at the pinned maps.
#[map]
static CONNTRACK: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

#[map]
static CONNTRACK_NEW: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// Visits one entry and goes on (a non-zero return would stop the walk).
#[inline(never)]
extern "C" fn visit(
    _map: *mut c_void,
    _key: *mut c_void,
    _value: *mut c_void,
    _ctx: *mut c_void,
) -> i64 {
    0
}

/// What a slot says when the walk failed: no table holds that many.
const WALK_FAILED: u64 = u64::MAX;

fn count(table: *const c_void) -> u64 {
    // SAFETY: `table` is a map of this program; `visit` has the callback's
    // signature and keeps no pointer; there is no context.
    let visited = unsafe {
        bpf_for_each_map_elem(table.cast_mut(), visit as *mut c_void, core::ptr::null_mut(), 0)
    };
    u64::try_from(visited).unwrap_or(WALK_FAILED)
}

/// Where in the frame the count is written, native-endian; [`WALK_FAILED`]
/// where the kernel refused the walk.
const COUNT_AT: usize = 8;

/// Counts the table the frame's first byte names (0: established, 1: new
/// flows) and writes the count into the frame, which the test run hands
/// back: runs share no state, so two can count the two tables at once, and
/// any number of processes can run the program.
#[xdp]
pub fn hairpin_count_entries(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + COUNT_AT + 8 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the byte at `start` is inside the frame (checked above).
    let slot = unsafe { *(start as *const u8) };
    let value = match slot {
        0 => count((&raw const CONNTRACK).cast()),
        1 => count((&raw const CONNTRACK_NEW).cast()),
        _ => return xdp_action::XDP_ABORTED,
    };
    // SAFETY: bytes COUNT_AT..COUNT_AT + 8 are inside the frame (checked
    // above); the frame need not be aligned.
    unsafe { ((start + COUNT_AT) as *mut u64).write_unaligned(value) };
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
