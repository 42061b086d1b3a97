//! Translating ICMP errors of tracked flows (RFC 5508 REQ-4, REQ-5, REQ-7):
//! the outer addresses, the embedded header and every checksum over them.

use crate::{
    FlowKey, checksum,
    packet::{IPV4_HEADER_LEN, IcmpHeader, Ipv4Header},
};

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_REDIRECT: u8 = 5;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Codes under `ICMP_DEST_UNREACH`: "fragmentation needed and DF set" and
/// "communication administratively prohibited".
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_ADMIN_PROHIBITED: u8 = 13;
pub const ICMP_HEADER_LEN: usize = 8;

/// The ICMP messages that carry the header of a packet they report on
/// (the ones netfilter relates to a connection).
pub const fn is_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH
            | ICMP_SOURCE_QUENCH
            | ICMP_REDIRECT
            | ICMP_TIME_EXCEEDED
            | ICMP_PARAMETER_PROBLEM
    )
}

/// The address the gateway sends its own ICMP error about a flow's packet
/// from ("time exceeded", "fragmentation needed"). A packet sent to the
/// public address is answered from it, as netfilter's translation of the
/// error makes it (RFC 5508 REQ-5c); a server's packet from the gateway's
/// LAN address, the router it reached.
pub const fn answer_source(to_public_address: bool, packet_dst: u32, lan_addr: u32) -> u32 {
    if to_public_address { packet_dst } else { lan_addr }
}

/// How an ICMP error about the packet `embedded` (as the gateway sent it) is
/// rewritten. `translated` is the conntrack entry found at
/// `embedded.reversed()`: how the flow's packets coming back this way are
/// rewritten, so its reverse is the packet as its sender sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorRewrite {
    pub outer_src: u32,
    pub outer_dst: u32,
    pub embedded: FlowKey,
}

pub const fn error_rewrite(
    outer_src: u32,
    embedded: &FlowKey,
    translated: &FlowKey,
) -> ErrorRewrite {
    // Where the flow rewrites the source in the direction the error
    // travels, the error's source is rewritten as well, whoever sent it:
    // the endpoint or a router behind it appears at the address its peer
    // uses (netfilter does the same, RFC 5508 REQ-5c). Elsewhere a router
    // keeps its own address.
    let outer_src =
        if translated.src_addr != embedded.dst_addr { translated.src_addr } else { outer_src };
    ErrorRewrite { outer_src, outer_dst: translated.dst_addr, embedded: translated.reversed() }
}

/// The ICMP checksum after the embedded header's addresses, ports and
/// checksums changed; it covers the whole ICMP message.
#[inline(always)]
pub const fn checksum_after(
    check: u16,
    from: &FlowKey,
    to: &FlowKey,
    embedded_ip_check: (u16, u16),
    embedded_l4_check: (u16, u16),
) -> u16 {
    let mut check = checksum::replace_u32(check, from.src_addr, to.src_addr);
    check = checksum::replace_u32(check, from.dst_addr, to.dst_addr);
    check = checksum::replace_u16(check, from.src_port, to.src_port);
    check = checksum::replace_u16(check, from.dst_port, to.dst_port);
    check = checksum::replace_u16(check, embedded_ip_check.0, embedded_ip_check.1);
    checksum::replace_u16(check, embedded_l4_check.0, embedded_l4_check.1)
}

/// The TTL of the ICMP errors the datapath sends.
pub const ANSWER_TTL: u8 = 64;

/// The IPv4 header of an ICMP error the datapath sends from `from_addr` to
/// `to_addr`, carrying `icmp_len` bytes (the ICMP header and its quote),
/// with its checksum.
#[inline(always)]
pub const fn answer_ipv4_header(from_addr: u32, to_addr: u32, icmp_len: u16) -> Ipv4Header {
    let mut header = Ipv4Header {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (IPV4_HEADER_LEN as u16 + icmp_len).to_be(),
        id: 0,
        frag_off: 0,
        ttl: ANSWER_TTL,
        proto: IPPROTO_ICMP,
        check: 0,
        src_addr: from_addr,
        dst_addr: to_addr,
    };
    header.check = checksum::ipv4_header(&header);
    header
}

/// The ICMP header of an error the datapath sends: its type and code, and
/// for "fragmentation needed" the next hop's MTU in its last two bytes
/// (RFC 1191); its checksum 0, to be computed over the whole message.
#[inline(always)]
pub const fn answer_icmp_header(icmp_type: u8, code: u8, mtu: u16) -> IcmpHeader {
    let [mtu_high, mtu_low] = mtu.to_be_bytes();
    IcmpHeader { icmp_type, code, check: 0, rest: u32::from_ne_bytes([0, 0, mtu_high, mtu_low]) }
}

/// The ICMP checksum `check` of an answer whose quote holds a transport
/// checksum left to offload (`field`, the pseudo-header sum), made right
/// for the quote as it will be once offload completes it (`completed`).
#[inline(always)]
pub const fn check_with_completed_quote(check: u16, field: u16, completed: u16) -> u16 {
    checksum::replace_u16(check, field, completed)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    const fn be(port: u16) -> u16 {
        port.to_be()
    }

    #[test]
    fn error_from_the_server_to_a_hairpin_client() {
        let (client, public, server, gateway) = (
            addr([192, 168, 0, 3]),
            addr([203, 0, 113, 1]),
            addr([192, 168, 0, 2]),
            addr([192, 168, 0, 1]),
        );
        // The server reports on what the gateway sent it: gateway:41000 → server:5000.
        let embedded = FlowKey::new(gateway, server, be(41000), be(5000), 17);
        // The reply entry: server → gateway:41000 goes back as public:5000 → client:40000.
        let translated = FlowKey::new(public, client, be(5000), be(40000), 17);
        let rewrite = error_rewrite(server, &embedded, &translated);
        assert_eq!(
            rewrite.outer_src, public,
            "the server is known to the client as the public address"
        );
        assert_eq!(rewrite.outer_dst, client);
        assert_eq!(rewrite.embedded, FlowKey::new(client, public, be(40000), be(5000), 17));
    }

    #[test]
    fn error_from_a_router_keeps_the_router_address() {
        let (wan_client, public, server, router) = (
            addr([198, 51, 100, 7]),
            addr([203, 0, 113, 1]),
            addr([192, 168, 0, 2]),
            addr([203, 0, 113, 254]),
        );
        // A router on the WAN reports on the server's reply as sent: public:80 → client.
        let embedded = FlowKey::new(public, wan_client, be(80), be(50000), 6);
        // The original entry: client → public:80 goes in as client → server:8080.
        let translated = FlowKey::new(wan_client, server, be(50000), be(8080), 6);
        let rewrite = error_rewrite(router, &embedded, &translated);
        assert_eq!((rewrite.outer_src, rewrite.outer_dst), (router, server));
        assert_eq!(rewrite.embedded, FlowKey::new(server, wan_client, be(8080), be(50000), 6));
    }

    #[test]
    fn error_from_a_lan_router_about_a_port_forward_comes_from_the_public_address() {
        let (wan_client, public, server, lan_router) = (
            addr([198, 51, 100, 7]),
            addr([203, 0, 113, 1]),
            addr([10, 1, 0, 2]),
            addr([192, 168, 0, 254]),
        );
        // A router on the LAN reports on what the gateway sent: client → server:8080.
        let embedded = FlowKey::new(wan_client, server, be(50000), be(8080), 6);
        // The reply entry: server:8080 → client goes out as public:80 → client.
        let translated = FlowKey::new(public, wan_client, be(80), be(50000), 6);
        let rewrite = error_rewrite(lan_router, &embedded, &translated);
        assert_eq!(
            (rewrite.outer_src, rewrite.outer_dst),
            (public, wan_client),
            "the server's network is not shown to the WAN"
        );
        assert_eq!(rewrite.embedded, FlowKey::new(wan_client, public, be(50000), be(80), 6));
    }

    #[test]
    fn error_from_a_router_towards_a_hairpin_client_comes_from_the_gateway() {
        let (client, public, server, gateway, lan_router) = (
            addr([192, 168, 0, 3]),
            addr([203, 0, 113, 1]),
            addr([192, 168, 0, 2]),
            addr([192, 168, 0, 1]),
            addr([192, 168, 0, 254]),
        );
        // A router between gateway and client reports on the reply as sent:
        // public:5000 → client:40000. The original entry: client → public:5000
        // goes in as gateway:41000 → server:5000.
        let embedded = FlowKey::new(public, client, be(5000), be(40000), 17);
        let translated = FlowKey::new(gateway, server, be(41000), be(5000), 17);
        let rewrite = error_rewrite(lan_router, &embedded, &translated);
        assert_eq!((rewrite.outer_src, rewrite.outer_dst), (gateway, server));
    }

    #[test]
    fn answers_come_from_the_address_the_sender_used() {
        let (public, lan) = (addr([203, 0, 113, 1]), addr([192, 168, 0, 1]));
        assert_eq!(answer_source(true, public, lan), public);
        assert_eq!(answer_source(false, addr([198, 51, 100, 7]), lan), lan);
    }

    #[test]
    fn only_errors_are_translated() {
        assert!(
            is_error(ICMP_DEST_UNREACH)
                && is_error(ICMP_TIME_EXCEEDED)
                && is_error(ICMP_PARAMETER_PROBLEM)
        );
        assert!(!is_error(0) && !is_error(8), "echo reply and request are not errors");
    }

    fn words(bytes: &[u8]) -> u32 {
        checksum::sum_words(bytes, 0)
    }

    proptest! {
        /// An ICMP error message rewritten incrementally has the checksum a
        /// full computation gives.
        #[test]
        fn icmp_checksum_incremental_equals_full(
            from in (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>()),
            to in (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>()),
            ip_check in (any::<u16>(), any::<u16>()),
            l4_check in (any::<u16>(), any::<u16>()),
            rest in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let from = FlowKey::new(from.0, from.1, from.2, from.3, 17);
            let to = FlowKey::new(to.0, to.1, to.2, to.3, 17);
            // ICMP header (type, code, checksum, unused), embedded IPv4
            // header, embedded UDP header, more payload.
            let message = |tuple: &FlowKey, ip_check: u16, l4_check: u16| {
                let mut m: Vec<u8> = vec![3, 3, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&[0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 17]);
                m.extend_from_slice(&ip_check.to_ne_bytes());
                m.extend_from_slice(&tuple.src_addr.to_ne_bytes());
                m.extend_from_slice(&tuple.dst_addr.to_ne_bytes());
                m.extend_from_slice(&tuple.src_port.to_ne_bytes());
                m.extend_from_slice(&tuple.dst_port.to_ne_bytes());
                m.extend_from_slice(&[0, 28]);
                m.extend_from_slice(&l4_check.to_ne_bytes());
                m.extend_from_slice(&rest);
                let check = !checksum::fold(words(&m));
                m[2..4].copy_from_slice(&check.to_ne_bytes());
                m
            };
            let before = message(&from, ip_check.0, l4_check.0);
            let after = message(&to, ip_check.1, l4_check.1);
            let check = u16::from_ne_bytes([before[2], before[3]]);
            let incremental = checksum_after(check, &from, &to, ip_check, l4_check);
            let full = u16::from_ne_bytes([after[2], after[3]]);
            prop_assert!(
                incremental == full || (incremental | full) == 0xffff && (incremental & full) == 0,
                "incremental {incremental:#06x} != full {full:#06x}"
            );
        }
    }

    fn ipv4_bytes(header: &Ipv4Header) -> [u8; IPV4_HEADER_LEN] {
        let mut bytes = [0u8; IPV4_HEADER_LEN];
        bytes[0] = header.version_ihl;
        bytes[1] = header.tos;
        bytes[2..4].copy_from_slice(&header.tot_len.to_ne_bytes());
        bytes[4..6].copy_from_slice(&header.id.to_ne_bytes());
        bytes[6..8].copy_from_slice(&header.frag_off.to_ne_bytes());
        bytes[8] = header.ttl;
        bytes[9] = header.proto;
        bytes[10..12].copy_from_slice(&header.check.to_ne_bytes());
        bytes[12..16].copy_from_slice(&header.src_addr.to_ne_bytes());
        bytes[16..20].copy_from_slice(&header.dst_addr.to_ne_bytes());
        bytes
    }

    #[test]
    fn an_answers_ipv4_header_is_valid_and_says_what_it_carries() {
        let header = answer_ipv4_header(addr([203, 0, 113, 1]), addr([198, 51, 100, 7]), 36);
        let bytes = ipv4_bytes(&header);
        assert_eq!(bytes[..12], [0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, bytes[10], bytes[11]]);
        assert_eq!(bytes[12..], [203, 0, 113, 1, 198, 51, 100, 7]);
        assert_eq!(checksum::full(&bytes), 0, "the header's checksum verifies: {bytes:?}");
    }

    proptest! {
        #[test]
        fn an_answers_ipv4_header_checksum_verifies(from: u32, to: u32, len in 8u16..1500) {
            let bytes = ipv4_bytes(&answer_ipv4_header(from, to, len));
            prop_assert_eq!(checksum::full(&bytes), 0);
        }
    }

    proptest! {
        #[test]
        fn the_answers_checksum_follows_the_completed_quote(
            words: [u16; 8],
            at in 0usize..8,
            completed: u16,
        ) {
            let bytes = |words: &[u16; 8]| -> Vec<u8> {
                words.iter().flat_map(|w| w.to_ne_bytes()).collect()
            };
            let check = checksum::full(&bytes(&words));
            let mut sent = words;
            sent[at] = completed;
            prop_assert_eq!(
                check_with_completed_quote(check, words[at], completed),
                checksum::full(&bytes(&sent))
            );
        }
    }

    #[test]
    fn frag_needed_carries_the_mtu_in_network_order() {
        let header = answer_icmp_header(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1400);
        assert_eq!((header.icmp_type, header.code, header.check), (3, 4, 0));
        assert_eq!(header.rest.to_ne_bytes(), [0, 0, 0x05, 0x78], "next-hop MTU 1400");
        let header = answer_icmp_header(ICMP_TIME_EXCEEDED, 0, 0);
        assert_eq!((header.icmp_type, header.rest), (11, 0), "time exceeded has no MTU");
    }
}
