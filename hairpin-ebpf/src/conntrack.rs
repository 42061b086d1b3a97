//! The flow table: finding a packet's flow (bound to its interface, never a
//! half-evicted one), tracking it, promoting it, and admitting and entering
//! new flows.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_get_prandom_u32,
    maps::lpm_trie::Key,
};
use hairpin_common::{
    Counter, DIRECTION_ORIGINAL, FlowEntry, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAPPING_ALLOWLIST,
    MAPPING_INTERFACE_BOUND, MappingKey, MappingValue, RuleInterface, RuleSource, Settings,
    nat::{self, SNAT_PORT_ATTEMPTS, Sides},
    tcp::{self, Segment},
};

use crate::context::Packet;
use crate::maps::{
    CONNTRACK, CONNTRACK_NEW, DENY_NETWORKS, INTERFACES, LAN_NETWORKS, MAPPING_INTERFACES,
    MAPPING_SOURCES, MAPPINGS, NEW_FLOW_SCRATCH, account, count,
};

/// A live conntrack entry, the table it is in, and its partner (the other
/// direction's entry) where the lookup needed it: for entries of the
/// new-flow table (to check it is still there), and for TCP replies (the
/// original entry holds the windows). Null otherwise.
pub(crate) struct Flow {
    pub(crate) entry: *mut FlowEntry,
    pub(crate) partner: *mut FlowEntry,
    pub(crate) established: bool,
}

/// What a packet's tuple is in the flow table (as cilium's CT_NEW,
/// CT_ESTABLISHED, CT_REPLY): no live flow's, or a live flow's packet in
/// the direction its client opened it, or a reply.
pub(crate) enum FlowLookup {
    New,
    Original(Flow),
    Reply(Flow),
}

impl FlowLookup {
    /// The flow, whichever direction.
    #[inline(always)]
    pub(crate) fn flow(self) -> Option<Flow> {
        match self {
            FlowLookup::New => None,
            FlowLookup::Original(flow) | FlowLookup::Reply(flow) => Some(flow),
        }
    }
}

/// Names a live flow's entry by its direction.
#[inline(always)]
fn tracked(flow: Flow) -> FlowLookup {
    // SAFETY: a map value; the field is copied out.
    if unsafe { (*flow.entry).direction } == DIRECTION_ORIGINAL {
        FlowLookup::Original(flow)
    } else {
        FlowLookup::Reply(flow)
    }
}

/// The live entry for `key` arriving on `ingress`: established flows first,
/// then new ones. An entry idle past its timeout counts as live while its
/// partner is not; once both are, the flow is removed and absent. A tuple
/// that arrives on another interface than its direction's is no flow's
/// (`Err`): a WAN host cannot steer a LAN flow by sending its tuple.
#[inline(always)]
pub(crate) fn find_flow(
    key: &FlowKey,
    ingress: u32,
    settings: &Settings,
    now: u64,
) -> Result<FlowLookup, Counter> {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        if !expired(key, entry, settings, now, true) {
            // SAFETY: a map value; fields are copied out.
            let (entry_ingress, direction, proto) =
                unsafe { ((*entry).ingress, (*entry).direction, (*entry).translated.proto) };
            if !nat::on_its_side(entry_ingress, ingress) {
                return Err(Counter::WrongInterface);
            }
            let mut partner = core::ptr::null_mut();
            if proto == IPPROTO_TCP && direction != DIRECTION_ORIGINAL {
                // The original entry holds the windows. Promotion enters it
                // first, so without it the flow is being removed: gone.
                let partner_key = unsafe { (*entry).translated.reversed() };
                match CONNTRACK.get_ptr_mut(&partner_key) {
                    Some(original) => partner = original,
                    None => {
                        let _ = CONNTRACK.remove(key);
                        count(Counter::FlowOrphaned);
                        return Ok(FlowLookup::New);
                    }
                }
            }
            return Ok(tracked(Flow { entry, partner, established: true }));
        }
    }
    let Some(entry) = CONNTRACK_NEW.get_ptr_mut(key) else {
        return Ok(FlowLookup::New);
    };
    if expired(key, entry, settings, now, false) {
        return Ok(FlowLookup::New);
    }
    let entry_ingress = unsafe { (*entry).ingress };
    if !nat::on_its_side(entry_ingress, ingress) {
        return Err(Counter::WrongInterface);
    }
    // The new-flow table evicts entries one by one: an entry without its
    // partner is half a dead flow, whose SNAT port may be another's by now.
    let partner_key = unsafe { (*entry).translated.reversed() };
    let partner = match CONNTRACK_NEW.get_ptr_mut(&partner_key) {
        Some(partner) if nat::partner_matches(key, unsafe { &(*partner).translated }) => partner,
        _ => {
            let _ = CONNTRACK_NEW.remove(key);
            count(Counter::FlowOrphaned);
            return Ok(FlowLookup::New);
        }
    };
    Ok(tracked(Flow { entry, partner, established: false }))
}

/// Whether the flow of `entry` has expired; if so, removes both its entries.
#[inline(always)]
pub(crate) fn expired(
    key: &FlowKey,
    entry: *mut FlowEntry,
    settings: &Settings,
    now: u64,
    established: bool,
) -> bool {
    // SAFETY: a map value; fields are copied out.
    let (state, last_seen, partner_key) =
        unsafe { ((*entry).state, (*entry).last_seen_ns, (*entry).translated.reversed()) };
    // Only looked at once this entry is idle: the common case costs no
    // second lookup.
    if !settings.expired(state, last_seen, now) {
        return false;
    }
    let partner = if established {
        CONNTRACK.get_ptr(&partner_key)
    } else {
        CONNTRACK_NEW.get_ptr(&partner_key)
    };
    // SAFETY: a map value, read.
    let partner_last_seen = partner.map(|partner| unsafe { (*partner).last_seen_ns });
    if !settings.flow_expired(state, last_seen, partner_last_seen, now) {
        return false;
    }
    if established {
        let _ = CONNTRACK.remove(key);
        let _ = CONNTRACK.remove(&partner_key);
    } else {
        let _ = CONNTRACK_NEW.remove(key);
        let _ = CONNTRACK_NEW.remove(&partner_key);
    }
    count(Counter::FlowExpired);
    true
}

/// Moves the flow on with a packet: counters, last seen, state, and the
/// established table once the flow has earned it.
#[inline(always)]
pub(crate) fn track(
    flow: &Flow,
    packet: &FlowKey,
    segment: &Segment,
    fragmented: bool,
    now: u64,
    len: u32,
) -> Result<(), Counter> {
    const REFRESH_NS: u64 = 1_000_000_000;
    let entry = flow.entry;
    // SAFETY: a map value; fields are copied out.
    let (mapping_id, old_state, old_fin_seen, direction, created_s) = unsafe {
        (
            (*entry).mapping_id,
            (*entry).state,
            (*entry).fin_seen,
            (*entry).direction,
            (*entry).created_s,
        )
    };
    let (state, fin_seen) = if packet.proto == IPPROTO_TCP && fragmented {
        // A fragment shows only part of its segment, whose length the
        // windows need: the segment is translated, the windows left alone.
        (old_state, old_fin_seen)
    } else if packet.proto == IPPROTO_TCP {
        // The original entry holds both directions' windows.
        let holder = if direction == DIRECTION_ORIGINAL { entry } else { flow.partner };
        if holder.is_null() {
            return Err(Counter::FlowOrphaned);
        }
        // SAFETY: a map value. Another CPU may track the other direction at
        // the same time; a lost update leaves a window smaller by one
        // segment, which the next segment widens again.
        let windows = unsafe { &mut (*holder).tcp };
        let tracked = tcp::track(old_state, old_fin_seen, windows, direction, segment)?;
        if tracked.rst_not_exact {
            count(Counter::TcpRstNotExact);
        }
        (tracked.state, tracked.fin_seen)
    } else {
        (nat::udp_next_state(old_state, direction), old_fin_seen)
    };
    // SAFETY: map values shared between CPUs: the counters are added
    // atomically.
    let refreshed = unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*entry).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).bytes, len as u64);
        let refreshed = now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS;
        if refreshed {
            (*entry).last_seen_ns = now;
        }
        refreshed
    };
    account(mapping_id, len, false);
    // Tried when the flow earns it, then at most once a second while the
    // established table is full: not twice a packet.
    let promote_now = !flow.established
        && nat::should_promote(state, created_s, now)
        && (state != old_state || refreshed);
    if state == old_state && fin_seen == old_fin_seen && !promote_now {
        return Ok(());
    }
    let partner = if !flow.partner.is_null() {
        flow.partner
    } else {
        let partner_key = unsafe { (*entry).translated.reversed() };
        match CONNTRACK.get_ptr_mut(&partner_key) {
            Some(partner) => partner,
            None => return Ok(()),
        }
    };
    unsafe {
        (*entry).state = state;
        (*entry).fin_seen = fin_seen;
        (*entry).last_seen_ns = now;
        (*partner).state = state;
        (*partner).fin_seen = fin_seen;
    }
    if promote_now {
        let partner_key = unsafe { (*entry).translated.reversed() };
        // SAFETY: map values; the helpers copy them into the other table.
        promote(packet, unsafe { &*entry }, &partner_key, unsafe { &*partner });
    }
    Ok(())
}

/// Moves a flow's two entries from the new to the established table. The
/// original entry goes first: it holds the TCP windows, and a reply found
/// in the established table must find it there (lookups try that table
/// first, so until both are in, both are still found in the new one).
#[inline(always)]
pub(crate) fn promote(
    key: &FlowKey,
    entry: &FlowEntry,
    partner_key: &FlowKey,
    partner: &FlowEntry,
) {
    let (first_key, first, second_key, second) = if entry.direction == DIRECTION_ORIGINAL {
        (key, entry, partner_key, partner)
    } else {
        (partner_key, partner, key, entry)
    };
    if CONNTRACK.insert(first_key, first, BPF_ANY as u64).is_err() {
        count(Counter::EstablishedTableFull);
        return;
    }
    if CONNTRACK.insert(second_key, second, BPF_ANY as u64).is_err() {
        let _ = CONNTRACK.remove(first_key);
        count(Counter::EstablishedTableFull);
        return;
    }
    let _ = CONNTRACK_NEW.remove(key);
    let _ = CONNTRACK_NEW.remove(partner_key);
    count(Counter::FlowEstablished);
}

/// A new flow the mapping table and the interface's role let in.
pub(crate) struct Admitted {
    pub(crate) server: MappingValue,
    /// A LAN client through the public address (else a WAN port forward).
    pub(crate) hairpin: bool,
    /// The translated tuple with the client's own port, for the route.
    pub(crate) provisional: FlowKey,
}

pub(crate) enum Admission {
    Admitted(Admitted),
    /// From a source in the deny set: dropped.
    Denied,
}

/// A packet without a conntrack entry may open a flow if it is a client's
/// first packet to a mapped public address and port: a LAN client's on a LAN
/// interface (hairpin), anyone else's on a WAN interface (port forward), and
/// only as the mapping rule's restrictions and the deny set allow.
#[inline(always)]
pub(crate) fn admit_new_flow(
    ctx: &impl Packet,
    packet: &FlowKey,
    tcp_flags: u8,
    settings: &Settings,
) -> Result<Admission, Counter> {
    let mapping_key = MappingKey {
        public_addr: packet.dst_addr,
        public_port: packet.dst_port,
        proto: packet.proto,
        _pad: 0,
    };
    let server = *unsafe { MAPPINGS.get(&mapping_key) }.ok_or(Counter::PassNoMapping)?;
    let ingress = ctx.ingress();
    let role = *unsafe { INTERFACES.get(&ingress) }.ok_or(Counter::PassUnknownInterface)?;
    let lan_source = LAN_NETWORKS.get(Key::new(32, packet.src_addr)).is_some();
    let hairpin = nat::new_flow_kind(role, lan_source)?;
    if !hairpin && DENY_NETWORKS.get(Key::new(32, packet.src_addr)).is_some() {
        return Ok(Admission::Denied);
    }
    if server.flags & MAPPING_ALLOWLIST != 0 {
        let source = RuleSource { rule: (server.id as u32).to_be(), addr: packet.src_addr };
        if MAPPING_SOURCES.get(Key::new(64, source)).is_none() {
            return Err(Counter::PassNotAllowed);
        }
    }
    if server.flags & MAPPING_INTERFACE_BOUND != 0 {
        let bound = RuleInterface { ifindex: ingress, rule: server.id, _pad: 0 };
        if unsafe { MAPPING_INTERFACES.get(&bound) }.is_none() {
            return Err(Counter::PassInterfaceNotAllowed);
        }
    }
    if packet.proto != IPPROTO_UDP && !nat::tcp_opens_flow(tcp_flags) {
        return Err(Counter::PassTcpNotSyn);
    }
    let src_addr = if hairpin { settings.lan_addr } else { packet.src_addr };
    let provisional = FlowKey::new(
        src_addr,
        server.server_addr,
        packet.src_port,
        server.server_port,
        packet.proto,
    );
    Ok(Admission::Admitted(Admitted { server, hairpin, provisional }))
}

/// Where an entered flow's first packet goes.
pub(crate) struct Created {
    pub(crate) translated: FlowKey,
}

/// Enters both directions of a new flow into the table of new flows, the
/// reply entry first with BPF_NOEXIST: that insert is what makes the
/// translated tuple unique. A hairpin flow tries the client's port and then
/// random ones of the SNAT range, a bounded number of times.
#[inline(always)]
pub(crate) fn create_flow(
    packet: &FlowKey,
    admitted: &Admitted,
    sides: &Sides,
    syn: &Segment,
    settings: &Settings,
    now: u64,
    ip_len: u32,
) -> Result<Created, Counter> {
    let client_port = u16::from_be(packet.src_port);
    let attempts = if admitted.hairpin { SNAT_PORT_ATTEMPTS } else { 1 };
    let start = unsafe { bpf_get_prandom_u32() };
    let flow = NEW_FLOW_SCRATCH.get_ptr_mut(0).ok_or(Counter::FlowRaceDropped)?;
    // SAFETY: this CPU's scratch slot; a program runs to completion on a CPU.
    let flow = unsafe { &mut *flow };
    // Built once; the retries change only the SNAT port.
    if admitted.hairpin {
        let lan_addr = settings.lan_addr;
        nat::hairpin_flow(flow, packet, &admitted.server, lan_addr, packet.src_port, sides, now);
    } else {
        nat::port_forward_flow(flow, packet, &admitted.server, sides, now);
    }
    flow.original.packets = 1;
    flow.original.bytes = ip_len as u64;
    if packet.proto == IPPROTO_TCP {
        flow.original.tcp = tcp::open(syn);
    }
    for attempt in 0..attempts {
        if admitted.hairpin {
            let port = nat::snat_port_candidate(
                client_port,
                attempt,
                start,
                settings.snat_port_first,
                settings.snat_port_last,
            )
            .to_be();
            flow.original.translated.src_port = port;
            flow.reply_key.dst_port = port;
        }
        // An established flow's port stays taken until user space reclaims
        // it, even once idle: checking expiry here would multiply the
        // verifier's paths by the retries.
        if CONNTRACK.get_ptr(&flow.reply_key).is_some()
            || CONNTRACK_NEW.insert(&flow.reply_key, &flow.reply, BPF_NOEXIST as u64).is_err()
        {
            continue;
        }
        if CONNTRACK_NEW.insert(&flow.original_key, &flow.original, BPF_NOEXIST as u64).is_ok() {
            return Ok(Created { translated: flow.original.translated });
        }
        // Another CPU entered this flow in the meantime; the client's
        // retransmission will find that entry.
        let _ = CONNTRACK_NEW.remove(&flow.reply_key);
        return Err(Counter::FlowRaceDropped);
    }
    Err(if admitted.hairpin { Counter::PortAllocFailed } else { Counter::FlowRaceDropped })
}
