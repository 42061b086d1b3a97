//! The NAT decisions, as pure functions of header fields and map values.

use crate::{
    CachedRoute, Counter, DIRECTION_ORIGINAL, DIRECTION_REPLY, FIN_SEEN_ORIGINAL, FIN_SEEN_REPLY,
    FlowEntry, FlowKey, IPPROTO_TCP, IPPROTO_UDP, KIND_HAIRPIN, KIND_PORT_FORWARD, MappingValue,
    ROLE_LAN, ROLE_WAN,
    fragment::Fragment,
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    state, tcp,
};

/// How many source ports a new flow tries before it is refused.
pub const SNAT_PORT_ATTEMPTS: u32 = 16;

/// How an IPv4 header hairpin may translate is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Layout {
    /// The header's length with its options, 20 to 60 bytes: where the L4
    /// header starts.
    pub header_len: u32,
    pub fragment: Fragment,
}

/// Whether an IPv4 header is one hairpin may translate, and its layout; the
/// counter says why not. TCP, UDP and ICMP are taken, options and fragments
/// included (options are kept, as netfilter keeps them).
#[inline(always)]
pub const fn check_ipv4(
    version_ihl: u8,
    frag_off_be: u16,
    proto: u8,
) -> Result<Ipv4Layout, Counter> {
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return Err(Counter::PassMalformed);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != crate::icmp::IPPROTO_ICMP {
        return Err(Counter::PassNotTcpUdp);
    }
    let header_len = (version_ihl & 0x0f) as u32 * 4;
    Ok(Ipv4Layout { header_len, fragment: Fragment::of(frag_off_be) })
}

/// Only a connection's first packet (SYN without ACK, RST or FIN) may open a
/// TCP entry; anything else without an entry belongs to a flow hairpin has
/// not seen from its start, which the kernel keeps handling.
#[inline(always)]
pub const fn tcp_opens_flow(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// A packet of a flow whose TTL would expire here is answered with ICMP
/// "time exceeded" instead of being translated.
#[inline(always)]
pub const fn ttl_expires(ttl: u8) -> bool {
    ttl <= 1
}

/// The source port tried at `attempt`, in host order: the client's own port
/// first when it lies in the range, then consecutive ports from a random
/// `start`, so that a range no longer than the attempts is searched whole.
#[inline(always)]
pub const fn snat_port_candidate(
    client_port: u16,
    attempt: u32,
    start: u32,
    first: u16,
    last: u16,
) -> u16 {
    if attempt == 0 && client_port >= first && client_port <= last {
        return client_port;
    }
    let span = (last as u32).saturating_sub(first as u32) + 1;
    first + (start.wrapping_add(attempt) % span) as u16
}

/// The two conntrack entries of a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowPair {
    /// Key: the client's packet as received. Value: client → server as the
    /// gateway sends it.
    pub original_key: FlowKey,
    pub original: FlowEntry,
    /// Key: the server's reply as received. Value: the reply as the client
    /// expects it (from the public address and port).
    pub reply_key: FlowKey,
    pub reply: FlowEntry,
}

/// The interfaces a flow's packets must arrive on, by direction: the
/// client's packets where its first one came in, the server's where the
/// route to the server leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sides {
    pub original: u32,
    pub reply: u32,
}

/// Writes a new flow's entry for `direction` in place: the datapath builds
/// entries in map memory, as they do not fit its stack.
#[inline(always)]
fn fill_entry(
    entry: &mut FlowEntry,
    translated: FlowKey,
    direction: u8,
    kind: u8,
    ingress: u32,
    now_ns: u64,
    server: &MappingValue,
) {
    entry.translated = translated;
    entry.route = CachedRoute { generation: 0, mtu: 0, ingress: 0, egress: 0, eth_addrs: [0; 3] };
    entry.last_seen_ns = now_ns;
    entry.bytes = 0;
    entry.packets = 0;
    entry.created_s = (now_ns / 1_000_000_000) as u32;
    entry.ingress = ingress;
    entry.mapping_id = server.id;
    entry.direction = direction;
    entry.state = initial_state(translated.proto);
    entry.fin_seen = 0;
    entry.kind = kind;
    entry._pad0 = 0;
    entry._pad1 = 0;
    entry.tcp = [tcp::NOTHING_SEEN; 2];
}

/// The state a new flow starts in.
pub const fn initial_state(proto: u8) -> u8 {
    if proto == IPPROTO_UDP { state::UDP_UNREPLIED } else { state::TCP_SYN_SENT }
}

#[inline(always)]
fn fill_pair(
    flow: &mut FlowPair,
    packet: &FlowKey,
    to_server: FlowKey,
    kind: u8,
    sides: &Sides,
    now_ns: u64,
    server: &MappingValue,
) {
    flow.original_key = *packet;
    fill_entry(
        &mut flow.original,
        to_server,
        DIRECTION_ORIGINAL,
        kind,
        sides.original,
        now_ns,
        server,
    );
    flow.reply_key = to_server.reversed();
    fill_entry(
        &mut flow.reply,
        packet.reversed(),
        DIRECTION_REPLY,
        kind,
        sides.reply,
        now_ns,
        server,
    );
}

/// A LAN client through the public address: DNAT to the server and SNAT to
/// `lan_addr:snat_port` (big-endian port), written into `flow`.
#[inline(always)]
pub fn hairpin_flow(
    flow: &mut FlowPair,
    packet: &FlowKey,
    server: &MappingValue,
    lan_addr: u32,
    snat_port: u16,
    sides: &Sides,
    now_ns: u64,
) {
    let to_server =
        FlowKey::new(lan_addr, server.server_addr, snat_port, server.server_port, packet.proto);
    fill_pair(flow, packet, to_server, KIND_HAIRPIN, sides, now_ns, server);
}

/// A WAN client to a published port: DNAT only, as a port forward does;
/// written into `flow`.
#[inline(always)]
pub fn port_forward_flow(
    flow: &mut FlowPair,
    packet: &FlowKey,
    server: &MappingValue,
    sides: &Sides,
    now_ns: u64,
) {
    let to_server = FlowKey::new(
        packet.src_addr,
        server.server_addr,
        packet.src_port,
        server.server_port,
        packet.proto,
    );
    fill_pair(flow, packet, to_server, KIND_PORT_FORWARD, sides, now_ns, server);
}

/// The flow's state after a packet in `direction`, from the TCP `flags`
/// alone (ignored for UDP), with the updated `FIN_SEEN_*` bits. Until the
/// datapath tracks sequence numbers (`crate::tcp`), this is what it uses.
pub const fn next_state(flow_state: u8, fin_seen: u8, direction: u8, flags: u8) -> (u8, u8) {
    if flow_state == state::UDP_UNREPLIED || flow_state == state::UDP_REPLIED {
        let replied = flow_state == state::UDP_REPLIED || direction == DIRECTION_REPLY;
        return (if replied { state::UDP_REPLIED } else { state::UDP_UNREPLIED }, fin_seen);
    }
    let original = direction == DIRECTION_ORIGINAL;
    if flags & TCP_RST != 0 {
        return (state::TCP_CLOSE, fin_seen);
    }
    if flags & TCP_SYN != 0 {
        return match (flow_state, original, flags & TCP_ACK != 0) {
            // A closed connection's tuple reused for a new one.
            (state::TCP_TIME_WAIT | state::TCP_CLOSE, true, false) => (state::TCP_SYN_SENT, 0),
            (state::TCP_SYN_SENT, false, true) => (state::TCP_SYN_RECV, fin_seen),
            _ => (flow_state, fin_seen),
        };
    }
    if flags & TCP_FIN != 0 {
        let fin_seen = fin_seen | if original { FIN_SEEN_ORIGINAL } else { FIN_SEEN_REPLY };
        if fin_seen == FIN_SEEN_ORIGINAL | FIN_SEEN_REPLY {
            return (state::TCP_TIME_WAIT, fin_seen);
        }
        return match flow_state {
            state::TCP_SYN_RECV | state::TCP_ESTABLISHED => (state::TCP_FIN_WAIT, fin_seen),
            _ => (flow_state, fin_seen),
        };
    }
    if flags & TCP_ACK != 0 {
        let first_fin_by_original = fin_seen & FIN_SEEN_ORIGINAL != 0;
        return match flow_state {
            state::TCP_SYN_RECV if original => (state::TCP_ESTABLISHED, fin_seen),
            // The other side acknowledges the first FIN: half closed.
            state::TCP_FIN_WAIT if original != first_fin_by_original => {
                (state::TCP_CLOSE_WAIT, fin_seen)
            }
            _ => (flow_state, fin_seen),
        };
    }
    (flow_state, fin_seen)
}

/// A UDP flow's state after a packet in `direction`.
pub const fn udp_next_state(flow_state: u8, direction: u8) -> u8 {
    if flow_state == state::UDP_REPLIED || direction == DIRECTION_REPLY {
        state::UDP_REPLIED
    } else {
        state::UDP_UNREPLIED
    }
}

/// How long a replied UDP flow must have lasted before it counts as a
/// stream (netfilter's "assured"): a query and its answer never do.
pub const UDP_STREAM_AFTER_S: u32 = 2;

/// Whether a flow of the new-flow table, in `flow_state` after a packet at
/// `now_ns`, moves to the established table, where a flood of new flows
/// cannot evict it: TCP once its handshake was validated, UDP once it has
/// seen traffic both ways for more than `UDP_STREAM_AFTER_S`.
pub const fn should_promote(flow_state: u8, created_s: u32, now_ns: u64) -> bool {
    match flow_state {
        state::TCP_ESTABLISHED => true,
        state::UDP_REPLIED => {
            let now_s = (now_ns / 1_000_000_000) as u32;
            now_s.wrapping_sub(created_s) as i32 > UDP_STREAM_AFTER_S as i32
        }
        _ => false,
    }
}

/// Whether an entry found for a packet is one of its flow's: the packet
/// must have come in on the interface of its direction.
#[inline(always)]
pub const fn on_its_side(entry_ingress: u32, packet_ingress: u32) -> bool {
    entry_ingress == packet_ingress
}

/// Whether an entry of the new-flow table still has its partner: the entry
/// found at the reverse of its translated tuple must translate back to the
/// entry's own key. The table evicts entries one by one; a flow whose other
/// half is gone is dead, and its SNAT port may already be another flow's.
#[inline(always)]
pub fn partner_matches(key: &FlowKey, partner_translated: &FlowKey) -> bool {
    partner_translated.reversed() == *key
}

/// Which kind of flow a new packet may open, from the role of the interface
/// it came in on and whether its source is in a LAN network: a LAN client's
/// on a LAN interface (hairpin, `Ok(true)`), anyone else's on a WAN
/// interface (port forward, `Ok(false)`).
#[inline(always)]
pub const fn new_flow_kind(role: u8, lan_source: bool) -> Result<bool, Counter> {
    match role {
        ROLE_LAN if lan_source => Ok(true),
        ROLE_LAN => Err(Counter::PassSourceNotLan),
        ROLE_WAN if lan_source => Err(Counter::PassLanSourceOnWan),
        ROLE_WAN => Ok(false),
        _ => Err(Counter::PassUnknownInterface),
    }
}

/// The verdict counter of a translated packet of a flow: a reply going
/// back, or a hairpinned or port-forwarded packet of its client.
#[inline(always)]
pub fn translated_counter(direction: u8, kind: u8) -> Counter {
    if direction != DIRECTION_ORIGINAL {
        Counter::TranslatedBack
    } else if kind == KIND_HAIRPIN {
        Counter::Hairpinned
    } else {
        Counter::PortForwarded
    }
}

/// How a packet of a flow that is too big for its egress link goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooBigPath {
    /// Cut into fragments by the datapath (TC).
    Cut,
    /// Translated and handed to the kernel's forwarding, which cuts it: the
    /// datapath cannot (its transport checksum is left to offload, which
    /// would then be completed over the first fragment alone, or it is a
    /// GSO aggregate), and its source is not the gateway's own (the kernel
    /// would drop it as a martian).
    Kernel,
    /// Answered with "fragmentation needed": DF is set.
    FragNeeded,
    /// Answered with "fragmentation needed" though DF is clear: neither the
    /// datapath nor the kernel can cut it, and the answer lets its sender
    /// cut the next ones itself (a Linux sender lowers its path MTU).
    FragNeededUncut,
}

/// How a packet too big for its egress link goes on, given whether it
/// has DF set, whether the datapath can cut it, and whether translating it
/// keeps its source (the original direction of a port forward).
#[inline(always)]
pub const fn too_big_path(dont_fragment: bool, cuttable: bool, source_kept: bool) -> TooBigPath {
    if dont_fragment {
        TooBigPath::FragNeeded
    } else if cuttable {
        TooBigPath::Cut
    } else if source_kept {
        TooBigPath::Kernel
    } else {
        TooBigPath::FragNeededUncut
    }
}

/// How long an IPv4 packet is, from its IPv4 header on: its total length,
/// or for an IPv4 BIG TCP aggregate (a TCP GSO skb over 64 KiB, whose total
/// length is 0, as the kernel's `iph_totlen` reads it) what the skb holds
/// from the IPv4 header on (`skb_ip_len`). A total length shorter than the
/// header is malformed (the kernel drops such a packet).
#[inline(always)]
pub const fn ipv4_len(
    tot_len: u16,
    header_len: u32,
    proto: u8,
    gso: bool,
    skb_ip_len: u32,
) -> Result<u32, Counter> {
    if tot_len == 0 && gso && proto == IPPROTO_TCP && skb_ip_len > header_len {
        return Ok(skb_ip_len);
    }
    if (tot_len as u32) < header_len {
        return Err(Counter::PassMalformed);
    }
    Ok(tot_len as u32)
}

/// An IPv4 packet's length (see [`ipv4_len`]) where a 16-bit one is
/// wanted: a BIG TCP aggregate's counts as 64 KiB - 1.
#[inline(always)]
pub const fn len_u16(ip_len: u32) -> u16 {
    if ip_len > u16::MAX as u32 { u16::MAX } else { ip_len as u16 }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[test]
    fn a_length_over_16_bits_saturates() {
        assert_eq!((len_u16(1500), len_u16(65_535), len_u16(185_000)), (1500, 65_535, 65_535));
    }

    #[rstest]
    #[case::whole_packet(1500, IPPROTO_TCP, false, 1500, Ok(1500))]
    #[case::gso_aggregate_under_64k(64_000, IPPROTO_TCP, true, 64_000, Ok(64_000))]
    #[case::big_tcp_aggregate(0, IPPROTO_TCP, true, 185_000, Ok(185_000))]
    #[case::zero_without_gso(0, IPPROTO_TCP, false, 185_000, Err(Counter::PassMalformed))]
    #[case::zero_udp_gso(0, IPPROTO_UDP, true, 185_000, Err(Counter::PassMalformed))]
    #[case::zero_gso_without_payload(0, IPPROTO_TCP, true, 20, Err(Counter::PassMalformed))]
    #[case::shorter_than_its_header(19, IPPROTO_UDP, false, 1500, Err(Counter::PassMalformed))]
    // The skb's length only stands in for a total length of 0: a lying
    // total length is the packet's own (the kernel trims the skb to it).
    #[case::total_length_under_the_skb(100, IPPROTO_TCP, true, 185_000, Ok(100))]
    fn an_ipv4_packets_length_is_its_total_length_or_a_big_tcp_skbs(
        #[case] tot_len: u16,
        #[case] proto: u8,
        #[case] gso: bool,
        #[case] skb_ip_len: u32,
        #[case] expected: Result<u32, Counter>,
    ) {
        assert_eq!(
            ipv4_len(tot_len, 20, proto, gso, skb_ip_len),
            expected,
            "total length {tot_len}, proto {proto}, GSO {gso}, skb {skb_ip_len}"
        );
    }

    #[rstest]
    #[case::df_set(true, true, true, TooBigPath::FragNeeded)]
    #[case::df_set_uncuttable(true, false, false, TooBigPath::FragNeeded)]
    #[case::cut_by_the_datapath(false, true, false, TooBigPath::Cut)]
    #[case::port_forward_left_to_offload(false, false, true, TooBigPath::Kernel)]
    #[case::hairpin_left_to_offload(false, false, false, TooBigPath::FragNeededUncut)]
    fn a_packet_too_big_is_cut_handed_to_the_kernel_or_answered(
        #[case] dont_fragment: bool,
        #[case] cuttable: bool,
        #[case] source_kept: bool,
        #[case] expected: TooBigPath,
    ) {
        assert_eq!(
            too_big_path(dont_fragment, cuttable, source_kept),
            expected,
            "DF {dont_fragment}, cuttable {cuttable}, source kept {source_kept}"
        );
    }

    #[rstest]
    #[case::both_fresh(5, Some(5), false)]
    #[case::one_way_stream_keeps_the_flow(40, Some(5), false)]
    #[case::the_other_way_too(5, Some(40), false)]
    #[case::both_idle(40, Some(35), true)]
    #[case::alone_and_idle(40, None, true)]
    #[case::alone_and_fresh(5, None, false)]
    fn a_flow_expires_when_both_directions_are_idle(
        #[case] idle_s: u64,
        #[case] partner_idle_s: Option<u64>,
        #[case] expected: bool,
    ) {
        const SECOND: u64 = 1_000_000_000;
        let settings = crate::Settings { udp_ns: 30 * SECOND, ..crate::Settings::default() };
        let now = 100 * SECOND;
        let partner = partner_idle_s.map(|idle| now - idle * SECOND);
        assert_eq!(
            settings.flow_expired(crate::state::UDP_REPLIED, now - idle_s * SECOND, partner, now),
            expected,
            "idle {idle_s} s, partner {partner_idle_s:?}"
        );
    }

    #[rstest]
    #[case::reply_of_a_hairpin(DIRECTION_REPLY, KIND_HAIRPIN, Counter::TranslatedBack)]
    #[case::reply_of_a_forward(DIRECTION_REPLY, KIND_PORT_FORWARD, Counter::TranslatedBack)]
    #[case::hairpin_client(DIRECTION_ORIGINAL, KIND_HAIRPIN, Counter::Hairpinned)]
    #[case::wan_client(DIRECTION_ORIGINAL, KIND_PORT_FORWARD, Counter::PortForwarded)]
    fn a_translated_packet_counts_by_direction_and_kind(
        #[case] direction: u8,
        #[case] kind: u8,
        #[case] expected: Counter,
    ) {
        assert_eq!(
            translated_counter(direction, kind),
            expected,
            "direction {direction} kind {kind}"
        );
    }

    const fn be(port: u16) -> u16 {
        port.to_be()
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    const fn layout(header_len: u32, fragment: Fragment) -> Result<Ipv4Layout, Counter> {
        Ok(Ipv4Layout { header_len, fragment })
    }

    #[rstest]
    #[case::plain_tcp(0x45, 0, 6, layout(20, Fragment::Whole))]
    #[case::plain_udp(0x45, 0, 17, layout(20, Fragment::Whole))]
    #[case::dont_fragment_is_fine(0x45, be(0x4000), 6, layout(20, Fragment::Whole))]
    #[case::options(0x46, 0, 6, layout(24, Fragment::Whole))]
    #[case::most_options(0x4f, 0, 17, layout(60, Fragment::Whole))]
    #[case::more_fragments(0x45, be(0x2000), 17, layout(20, Fragment::First))]
    #[case::later_fragment(0x45, be(0x00b9), 17, layout(20, Fragment::Later))]
    #[case::icmp(0x45, 0, 1, layout(20, Fragment::Whole))]
    #[case::gre(0x45, 0, 47, Err(Counter::PassNotTcpUdp))]
    #[case::not_v4(0x65, 0, 6, Err(Counter::PassMalformed))]
    #[case::header_too_short(0x44, 0, 6, Err(Counter::PassMalformed))]
    fn ipv4_header_checks(
        #[case] version_ihl: u8,
        #[case] frag: u16,
        #[case] proto: u8,
        #[case] expected: Result<Ipv4Layout, Counter>,
    ) {
        assert_eq!(check_ipv4(version_ihl, frag, proto), expected);
    }

    #[rstest]
    #[case::syn(TCP_SYN, true)]
    #[case::syn_ack(TCP_SYN | TCP_ACK, false)]
    #[case::ack(TCP_ACK, false)]
    #[case::rst(TCP_RST, false)]
    #[case::syn_fin(TCP_SYN | TCP_FIN, false)]
    #[case::syn_with_ecn_bits(TCP_SYN | 0xc0, true)]
    fn only_a_bare_syn_opens(#[case] flags: u8, #[case] opens: bool) {
        assert_eq!(tcp_opens_flow(flags), opens);
    }

    #[rstest]
    #[case(0, true)]
    #[case(1, true)]
    #[case(2, false)]
    #[case(64, false)]
    fn ttl_below_two_expires(#[case] ttl: u8, #[case] expires: bool) {
        assert_eq!(ttl_expires(ttl), expires);
    }

    #[test]
    fn client_port_kept_when_in_range() {
        assert_eq!(snat_port_candidate(40000, 0, 7, 1024, 65535), 40000);
    }

    #[test]
    fn client_port_outside_range_is_replaced() {
        let port = snat_port_candidate(80, 0, 123_456, 20000, 20015);
        assert!((20000..=20015).contains(&port), "{port}");
    }

    #[test]
    fn retries_stay_in_range() {
        for attempt in 1..200 {
            let port = snat_port_candidate(40000, attempt, 3_000_000_000, 20000, 20015);
            assert!((20000..=20015).contains(&port), "attempt {attempt}: {port}");
        }
    }

    #[test]
    fn a_small_range_is_searched_whole() {
        for start in [0, 7, 15, u32::MAX] {
            let ports: std::collections::BTreeSet<u16> = (0..SNAT_PORT_ATTEMPTS)
                .map(|a| snat_port_candidate(40000, a, start, 20000, 20015))
                .collect();
            assert_eq!(
                ports.len(),
                16,
                "start {start}: every port of a 16-port range is tried: {ports:?}"
            );
        }
    }

    #[test]
    fn full_range_does_not_overflow() {
        assert_eq!(snat_port_candidate(5, 1, u32::MAX, 0, 65535), 0, "wraps around");
        assert_eq!(snat_port_candidate(5, 2, 65533, 1, 65535), 1, "wraps to the first port");
    }

    #[test]
    fn hairpin_flow_rewrites_both_directions() {
        let client = addr([192, 168, 0, 3]);
        let public = addr([203, 0, 113, 1]);
        let server = addr([192, 168, 0, 2]);
        let gateway = addr([192, 168, 0, 1]);
        let packet = FlowKey::new(client, public, be(40000), be(80), IPPROTO_TCP);
        let mapping =
            MappingValue { server_addr: server, server_port: be(8080), ..Default::default() };

        let mut flow = FlowPair::default();
        hairpin_flow(
            &mut flow,
            &packet,
            &mapping,
            gateway,
            be(41000),
            &Sides { original: 4, reply: 4 },
            5,
        );

        assert_eq!(flow.original_key, packet);
        assert_eq!(
            flow.original.translated,
            FlowKey::new(gateway, server, be(41000), be(8080), IPPROTO_TCP)
        );
        assert_eq!(flow.original.direction, DIRECTION_ORIGINAL);
        assert_eq!(flow.reply_key, FlowKey::new(server, gateway, be(8080), be(41000), IPPROTO_TCP));
        assert_eq!(
            flow.reply.translated,
            FlowKey::new(public, client, be(80), be(40000), IPPROTO_TCP)
        );
        assert_eq!(flow.reply.direction, DIRECTION_REPLY);
        assert_eq!(flow.original_key, flow.reply.translated.reversed(), "partners find each other");
        assert_eq!(flow.reply_key, flow.original.translated.reversed(), "partners find each other");
        assert_eq!((flow.original.state, flow.original.last_seen_ns), (state::TCP_SYN_SENT, 5));
    }

    #[test]
    fn port_forward_keeps_the_client_address() {
        let wan_client = addr([198, 51, 100, 7]);
        let public = addr([203, 0, 113, 1]);
        let server = addr([192, 168, 0, 2]);
        let packet = FlowKey::new(wan_client, public, be(50000), be(53), IPPROTO_UDP);
        let mapping =
            MappingValue { server_addr: server, server_port: be(5353), ..Default::default() };

        let mut flow = FlowPair::default();
        port_forward_flow(&mut flow, &packet, &mapping, &Sides { original: 3, reply: 4 }, 9);

        assert_eq!(
            flow.original.translated,
            FlowKey::new(wan_client, server, be(50000), be(5353), IPPROTO_UDP)
        );
        assert_eq!(
            flow.reply_key,
            FlowKey::new(server, wan_client, be(5353), be(50000), IPPROTO_UDP)
        );
        assert_eq!(
            flow.reply.translated,
            FlowKey::new(public, wan_client, be(53), be(50000), IPPROTO_UDP)
        );
        assert_eq!(
            (flow.original.kind, flow.original.state),
            (KIND_PORT_FORWARD, state::UDP_UNREPLIED)
        );
    }

    const O: u8 = DIRECTION_ORIGINAL;
    const R: u8 = DIRECTION_REPLY;

    use state::{
        TCP_CLOSE as CLOSE, TCP_CLOSE_WAIT as CLOSE_WAIT, TCP_ESTABLISHED as EST,
        TCP_FIN_WAIT as FIN_WAIT, TCP_SYN_RECV as SYN_RECV, TCP_SYN_SENT as SYN_SENT,
        TCP_TIME_WAIT as TIME_WAIT,
    };

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;

    /// Replays packets from the start of a connection; the states after each.
    fn replay(packets: &[(u8, u8)]) -> std::vec::Vec<u8> {
        let (mut flow_state, mut fin_seen) = (state::TCP_SYN_SENT, 0);
        packets
            .iter()
            .map(|&(direction, flags)| {
                (flow_state, fin_seen) = next_state(flow_state, fin_seen, direction, flags);
                flow_state
            })
            .collect()
    }

    #[rstest]
    #[case::handshake(&[(R, SYN_ACK), (O, ACK)], &[SYN_RECV, EST])]
    #[case::syn_retransmitted(&[(O, SYN), (R, SYN_ACK), (O, SYN), (O, ACK)], &[SYN_SENT, SYN_RECV, SYN_RECV, EST])]
    #[case::client_closes_first(
        &[(R, SYN_ACK), (O, ACK), (O, FIN_ACK), (R, ACK), (R, FIN_ACK), (O, ACK)],
        &[SYN_RECV, EST, FIN_WAIT, CLOSE_WAIT, TIME_WAIT, TIME_WAIT]
    )]
    #[case::reset_by_server(&[(R, SYN_ACK), (O, ACK), (R, RST)], &[SYN_RECV, EST, CLOSE])]
    #[case::refused(&[(R, RST | ACK)], &[CLOSE])]
    #[case::reopened_after_close(&[(R, RST), (O, SYN), (R, SYN_ACK)], &[CLOSE, SYN_SENT, SYN_RECV])]
    #[case::syn_ack_from_client_ignored(&[(O, SYN_ACK)], &[SYN_SENT])]
    fn tcp_state_machine(#[case] packets: &[(u8, u8)], #[case] expected: &[u8]) {
        let names =
            |states: &[u8]| states.iter().map(|s| state::name(*s)).collect::<std::vec::Vec<_>>();
        assert_eq!(names(&replay(packets)), names(expected));
    }

    #[rstest]
    #[case(state::UDP_UNREPLIED, O, state::UDP_UNREPLIED)]
    #[case(state::UDP_UNREPLIED, R, state::UDP_REPLIED)]
    #[case(state::UDP_REPLIED, O, state::UDP_REPLIED)]
    fn udp_states(#[case] from: u8, #[case] direction: u8, #[case] to: u8) {
        assert_eq!(udp_next_state(from, direction), to);
    }

    const SECOND: u64 = 1_000_000_000;

    #[rstest]
    #[case::validated_handshake(EST, 100, 100 * SECOND, true)]
    #[case::udp_answered_at_once(state::UDP_REPLIED, 100, 100 * SECOND, false)]
    #[case::udp_answered_for_two_seconds(state::UDP_REPLIED, 100, 102 * SECOND, false)]
    #[case::udp_stream(state::UDP_REPLIED, 100, 103 * SECOND, true)]
    #[case::udp_one_way_for_long(state::UDP_UNREPLIED, 100, 1000 * SECOND, false)]
    #[case::opening(SYN_RECV, 100, 1000 * SECOND, false)]
    #[case::closing(FIN_WAIT, 100, 1000 * SECOND, false)]
    fn promotion(
        #[case] flow_state: u8,
        #[case] created_s: u32,
        #[case] now_ns: u64,
        #[case] promoted: bool,
    ) {
        assert_eq!(
            should_promote(flow_state, created_s, now_ns),
            promoted,
            "{} created at {created_s} s, now {} s",
            state::name(flow_state),
            now_ns / SECOND
        );
    }

    #[rstest]
    #[case::lan_client(ROLE_LAN, true, Ok(true))]
    #[case::outsider_on_the_lan(ROLE_LAN, false, Err(Counter::PassSourceNotLan))]
    #[case::wan_client(ROLE_WAN, false, Ok(false))]
    #[case::lan_source_spoofed_on_the_wan(ROLE_WAN, true, Err(Counter::PassLanSourceOnWan))]
    #[case::unknown_role(0, false, Err(Counter::PassUnknownInterface))]
    fn new_flow_kinds(
        #[case] role: u8,
        #[case] lan_source: bool,
        #[case] kind: Result<bool, Counter>,
    ) {
        assert_eq!(new_flow_kind(role, lan_source), kind);
    }

    #[test]
    fn partners_are_matched_by_their_translations() {
        let sides = Sides { original: 4, reply: 4 };
        let server = MappingValue {
            server_addr: addr([192, 168, 0, 2]),
            server_port: be(80),
            ..Default::default()
        };
        let packet = |client: u8| {
            FlowKey::new(
                addr([192, 168, 0, client]),
                addr([203, 0, 113, 1]),
                be(40000),
                be(80),
                IPPROTO_TCP,
            )
        };
        let gateway = addr([192, 168, 0, 1]);
        let (mut first, mut second) = (FlowPair::default(), FlowPair::default());
        hairpin_flow(&mut first, &packet(3), &server, gateway, be(41000), &sides, 0);
        hairpin_flow(&mut second, &packet(4), &server, gateway, be(41000), &sides, 0);
        assert!(partner_matches(&first.original_key, &first.reply.translated));
        assert!(partner_matches(&first.reply_key, &first.original.translated));
        assert_eq!(first.reply_key, second.reply_key, "the same SNAT port");
        assert!(
            !partner_matches(&first.original_key, &second.reply.translated),
            "an orphan original entry must not take a second client's reply entry for its own"
        );
    }

    #[test]
    fn flows_record_the_interface_of_each_direction() {
        let sides = Sides { original: 3, reply: 2 };
        let server = MappingValue {
            server_addr: addr([192, 168, 0, 2]),
            server_port: be(80),
            ..Default::default()
        };
        let packet = FlowKey::new(
            addr([198, 51, 100, 7]),
            addr([203, 0, 113, 1]),
            be(5),
            be(80),
            IPPROTO_TCP,
        );
        let mut flow = FlowPair::default();
        port_forward_flow(&mut flow, &packet, &server, &sides, 0);
        assert_eq!((flow.original.ingress, flow.reply.ingress), (3, 2));
        assert!(on_its_side(flow.original.ingress, 3) && !on_its_side(flow.original.ingress, 2));
    }

    #[test]
    fn timeouts_by_state() {
        let settings = crate::Settings {
            tcp_established_ns: 7440,
            tcp_transitory_ns: 240,
            udp_ns: 300,
            tcp_opening_ns: 60,
            ..Default::default()
        };
        assert_eq!(settings.timeout_ns(EST), 7440);
        assert_eq!(settings.timeout_ns(TIME_WAIT), 240);
        assert_eq!(settings.timeout_ns(CLOSE_WAIT), 240);
        assert_eq!(settings.timeout_ns(CLOSE), 240);
        assert_eq!(settings.timeout_ns(SYN_SENT), 60, "opening has its own, shorter timeout");
        assert_eq!(settings.timeout_ns(SYN_RECV), 60);
        assert_eq!(settings.timeout_ns(state::UDP_REPLIED), 300);
        assert!(!settings.expired(EST, 1000, 1000 + 7440));
        assert!(settings.expired(EST, 1000, 1000 + 7441));
        assert!(
            !settings.expired(UDP_UNREPLIED_STATE, 2000, 1000),
            "a timestamp from the future is not expired"
        );
    }

    const UDP_UNREPLIED_STATE: u8 = state::UDP_UNREPLIED;
}
