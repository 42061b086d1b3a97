//! The NAT decisions, as pure functions of header fields and map values.

use crate::{
    Counter, DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowEntry, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    MappingValue,
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// How many source ports a new flow tries before it is refused.
pub const SNAT_PORT_ATTEMPTS: u32 = 16;

/// Whether an IPv4 header is one hairpin may translate; the counter says why
/// not. Only plain TCP and UDP without options or fragmentation are taken.
#[inline(always)]
pub const fn check_ipv4(version_ihl: u8, frag_off_be: u16, proto: u8) -> Result<(), Counter> {
    if version_ihl >> 4 != 4 {
        return Err(Counter::PassMalformed);
    }
    if version_ihl & 0x0f != 5 {
        return Err(Counter::PassIpOptions);
    }
    // More-fragments flag or a non-zero offset.
    if u16::from_be(frag_off_be) & 0x3fff != 0 {
        return Err(Counter::PassFragment);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Counter::PassNotTcpUdp);
    }
    Ok(())
}

/// Only a connection's first packet (SYN without ACK, RST or FIN) may open a
/// TCP entry; anything else without an entry belongs to a flow hairpin has
/// not seen from its start, which the kernel keeps handling.
#[inline(always)]
pub const fn tcp_opens_flow(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// A packet whose TTL would expire here goes to the kernel, which answers
/// with ICMP time exceeded.
#[inline(always)]
pub const fn ttl_expires(ttl: u8) -> bool {
    ttl <= 1
}

/// The source port tried at `attempt`, in host order: the client's own port
/// first when it lies in the range, then pseudo-random ones.
#[inline(always)]
pub const fn snat_port_candidate(
    client_port: u16,
    attempt: u32,
    random: u32,
    first: u16,
    last: u16,
) -> u16 {
    if attempt == 0 && client_port >= first && client_port <= last {
        return client_port;
    }
    let span = (last as u32).saturating_sub(first as u32) + 1;
    first + (random % span) as u16
}

/// The two conntrack entries of a new hairpin flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HairpinFlow {
    /// Key: the client's packet as received. Value: client → server as the
    /// gateway sends it (source = gateway LAN address and SNAT port).
    pub original_key: FlowKey,
    pub original: FlowEntry,
    /// Key: the server's reply as received. Value: the reply as the client
    /// expects it (from the public address and port).
    pub reply_key: FlowKey,
    pub reply: FlowEntry,
}

/// DNAT to the server and SNAT to `lan_addr:snat_port` (big-endian port).
#[inline(always)]
pub const fn hairpin_flow(
    packet: &FlowKey,
    server: &MappingValue,
    lan_addr: u32,
    snat_port: u16,
) -> HairpinFlow {
    let to_server = FlowKey::new(
        lan_addr,
        server.server_addr,
        snat_port,
        server.server_port,
        packet.proto,
    );
    let reply_key = FlowKey::new(
        server.server_addr,
        lan_addr,
        server.server_port,
        snat_port,
        packet.proto,
    );
    let to_client = FlowKey::new(
        packet.dst_addr,
        packet.src_addr,
        packet.dst_port,
        packet.src_port,
        packet.proto,
    );
    HairpinFlow {
        original_key: *packet,
        original: FlowEntry {
            translated: to_server,
            direction: DIRECTION_ORIGINAL,
            _pad: [0; 7],
        },
        reply_key,
        reply: FlowEntry {
            translated: to_client,
            direction: DIRECTION_REPLY,
            _pad: [0; 7],
        },
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    const fn be(port: u16) -> u16 {
        port.to_be()
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[rstest]
    #[case::plain_tcp(0x45, 0, 6, Ok(()))]
    #[case::plain_udp(0x45, 0, 17, Ok(()))]
    #[case::dont_fragment_is_fine(0x45, be(0x4000), 6, Ok(()))]
    #[case::options(0x46, 0, 6, Err(Counter::PassIpOptions))]
    #[case::more_fragments(0x45, be(0x2000), 17, Err(Counter::PassFragment))]
    #[case::later_fragment(0x45, be(0x00b9), 17, Err(Counter::PassFragment))]
    #[case::icmp(0x45, 0, 1, Err(Counter::PassNotTcpUdp))]
    #[case::not_v4(0x65, 0, 6, Err(Counter::PassMalformed))]
    fn ipv4_header_checks(
        #[case] version_ihl: u8,
        #[case] frag: u16,
        #[case] proto: u8,
        #[case] expected: Result<(), Counter>,
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
    fn retries_stay_in_range_and_vary() {
        let ports: std::collections::BTreeSet<u16> = (1..200u32)
            .map(|a| snat_port_candidate(40000, a, a.wrapping_mul(2_654_435_761), 20000, 20015))
            .collect();
        assert!(
            ports.iter().all(|p| (20000..=20015).contains(p)),
            "{ports:?}"
        );
        assert!(
            ports.len() > 8,
            "retries should spread over the range: {ports:?}"
        );
    }

    #[test]
    fn full_range_does_not_overflow() {
        assert_eq!(
            snat_port_candidate(5, 1, u32::MAX, 0, 65535),
            (u32::MAX % 65536) as u16
        );
    }

    #[test]
    fn hairpin_flow_rewrites_both_directions() {
        let client = addr([192, 168, 0, 3]);
        let public = addr([203, 0, 113, 1]);
        let server = addr([192, 168, 0, 2]);
        let gateway = addr([192, 168, 0, 1]);
        let packet = FlowKey::new(client, public, be(40000), be(80), IPPROTO_TCP);
        let mapping = MappingValue {
            server_addr: server,
            server_port: be(8080),
            _pad: [0; 2],
        };

        let flow = hairpin_flow(&packet, &mapping, gateway, be(41000));

        assert_eq!(flow.original_key, packet);
        assert_eq!(
            flow.original.translated,
            FlowKey::new(gateway, server, be(41000), be(8080), IPPROTO_TCP)
        );
        assert_eq!(flow.original.direction, DIRECTION_ORIGINAL);
        assert_eq!(
            flow.reply_key,
            FlowKey::new(server, gateway, be(8080), be(41000), IPPROTO_TCP)
        );
        assert_eq!(
            flow.reply.translated,
            FlowKey::new(public, client, be(80), be(40000), IPPROTO_TCP)
        );
        assert_eq!(flow.reply.direction, DIRECTION_REPLY);
    }
}
