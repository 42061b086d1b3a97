//! `hairpin explain`: one packet through the running instance's program
//! (BPF_PROG_TEST_RUN), with its verdict and rewritten headers, leaving no
//! state behind: the copy of the program it runs writes only to tables of
//! its own (conntrack copied from the instance's, counters, ICMP rate), so
//! nothing the instance's flows do meanwhile is ever overwritten.

use std::{fmt, net::SocketAddrV4};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use hairpin_common::{
    Counter, FlowKey,
    maps::{names, programs},
};

use crate::{
    attach::Hook,
    config::Proto,
    datapath::{DatapathError, PinDir},
    maps::{Maps, Table, host_addr, wire_addr},
    netlink,
};

/// What the datapath does with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub action: String,
    /// The counters the packet moved (its verdict and what it caused).
    pub counters: Vec<&'static str>,
    pub input: Headers,
    /// The packet as it would leave, when it is sent on.
    pub output: Option<Headers>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
}

impl fmt::Display for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            _ => "ip",
        };
        write!(f, "{proto} {} -> {} ttl {}", self.src, self.dst, self.ttl)
    }
}

const XDP_ACTIONS: [&str; 5] = [
    "aborted",
    "drop",
    "pass to the kernel",
    "send back out of the same interface (XDP_TX)",
    "redirect to another interface (XDP_REDIRECT)",
];

/// The maps the datapath writes: explain's copy of the program gets its
/// own, so that its packet changes nothing of the instance's.
pub const PRIVATE_MAPS: [&str; 7] = [
    names::COUNTERS,
    names::MAPPING_STATS,
    names::CONNTRACK,
    names::CONNTRACK_NEW,
    names::ICMP_RATE,
    names::FRAGMENTS,
    names::FRAGMENT_QUEUE,
];

/// Builds a TCP SYN or a UDP datagram from `src` to `dst` as received on
/// `if_index` and runs it through a copy of the program the interface is
/// attached with (`hook`: XDP, or the TC datapath) that reads the
/// instance's configuration tables, and has its own counters and its own
/// copy of the conntrack tables (so the SNAT port it picks is the one the
/// instance would pick now).
pub fn explain(
    pins: &PinDir,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    if_index: u32,
    hook: Hook,
) -> Result<Explanation, DatapathError> {
    if crate::EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoEbpfObject);
    }
    crate::maps::check_layout(&pins.maps())?;
    let instance = Maps::open_pinned(&pins.maps())?;
    let capacity = aya::maps::MapData::from_pin(pins.maps().join(names::CONNTRACK))
        .and_then(|data| data.info().map(|info| info.max_entries()))
        .map_err(|e| DatapathError::Pin {
            path: pins.maps().display().to_string(),
            message: e.to_string(),
        })?;
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(names::CONNTRACK, capacity)
        .map_max_entries(names::CONNTRACK_NEW, capacity);
    let shared: Vec<(&str, std::path::PathBuf)> = names::SHARED
        .iter()
        .filter(|n| !PRIVATE_MAPS.contains(n))
        .map(|n| (*n, pins.maps().join(n)))
        .collect();
    for (name, path) in &shared {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
    let mut maps = Maps::take(&mut ebpf)?;
    copy_flow_entries(&instance, &mut maps, &flow_key(proto, src, dst));
    let segment = tcp_segment_for(&maps, proto, src, dst);
    let packet = build_packet(proto, src, dst, segment);
    let verdict = match hook {
        Hook::Xdp => run_xdp(&mut ebpf, &packet, if_index)?,
        Hook::Tc => run_tc(&mut ebpf, &packet, if_index)?,
    };
    let counters: Vec<(Counter, u64)> = maps.counters()?;
    let moved: Vec<&'static str> =
        counters.iter().filter(|(_, v)| *v > 0).map(|(c, _)| c.name()).collect();
    let input = parse(&packet).expect("a packet built here parses");
    let (action, output) = match hook {
        Hook::Xdp => xdp_action(&verdict, &moved, packet.len()),
        Hook::Tc => tc_action(&verdict, &input),
    };
    Ok(Explanation { action, counters: moved, input, output })
}

/// The packet's conntrack key, as the datapath builds it (network order).
fn flow_key(proto: Proto, src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
    FlowKey::new(
        wire_addr(*src.ip()),
        wire_addr(*dst.ip()),
        src.port().to_be(),
        dst.port().to_be(),
        proto.number(),
    )
}

/// Copies into the run's private tables the only entries the program can
/// find for this packet: its own key's, in either table, and their
/// partners (the other direction of the same flow). A copy of whole tables
/// would cost a second per million flows and show nothing more. The port a
/// new flow is given is drawn at random by the datapath, so its search
/// among taken ports is not replayed: a new flow is explained as opened.
fn copy_flow_entries(instance: &Maps, maps: &mut Maps, key: &FlowKey) {
    let tables = [Table::Established, Table::New];
    for table in tables {
        let Some(entry) = instance.flow_in(table, key) else { continue };
        maps.put_flow(table, key, &entry);
        let partner = entry.translated.reversed();
        for partner_table in tables {
            if let Some(other) = instance.flow_in(partner_table, &partner) {
                maps.put_flow(partner_table, &partner, &other);
            }
        }
    }
}

/// A test run's answer: the program's return value and the packet after.
struct Verdict {
    return_value: u32,
    packet: Vec<u8>,
}

fn run_xdp(ebpf: &mut Ebpf, packet: &[u8], if_index: u32) -> Result<Verdict, DatapathError> {
    let xdp: &mut Xdp = program(ebpf, programs::XDP)?;
    xdp.load().map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
    let ctx = hairpin_common::test_run::XdpMd::received(packet.len(), if_index);
    let mut out = vec![0u8; packet.len() + 256];
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(ctx.as_bytes()),
            ..Default::default()
        })
        .map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
    out.truncate(result.data_size_out as usize);
    Ok(Verdict { return_value: result.return_value, packet: out })
}

/// The TC datapath on an skb received on `if_index`. A test run always
/// hands a classifier an Ethernet frame, so `hairpin_tc` serves devices
/// without an Ethernet header too: `hairpin_tc_l3` is `hairpin_tc` after
/// pushing one.
fn run_tc(ebpf: &mut Ebpf, packet: &[u8], if_index: u32) -> Result<Verdict, DatapathError> {
    let tc: &mut SchedClassifier = program(ebpf, programs::TC)?;
    tc.load().map_err(|source| DatapathError::Program { name: programs::TC, source })?;
    let ctx = skb_context(if_index);
    let mut out = vec![0u8; packet.len() + 256];
    let result = tc
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .map_err(|source| DatapathError::Program { name: programs::TC, source })?;
    out.truncate(result.data_size_out as usize);
    Ok(Verdict { return_value: result.return_value, packet: out })
}

/// `struct __sk_buff` up to `ifindex`, the fields a test run takes from it
/// (all others before it must be zero): received on `if_index`.
fn skb_context(if_index: u32) -> Vec<u8> {
    const INGRESS_IFINDEX: usize = 36;
    const IFINDEX: usize = 40;
    let mut ctx = vec![0u8; IFINDEX + 4];
    ctx[INGRESS_IFINDEX..INGRESS_IFINDEX + 4].copy_from_slice(&if_index.to_ne_bytes());
    ctx[IFINDEX..IFINDEX + 4].copy_from_slice(&if_index.to_ne_bytes());
    ctx
}

fn xdp_action(
    verdict: &Verdict,
    moved: &[&'static str],
    packet_len: usize,
) -> (String, Option<Headers>) {
    const XDP_PASS: u32 = 2;
    let handed_on = moved.contains(&Counter::NeighRedirected.name());
    let sent =
        matches!(verdict.return_value, 3 | 4) || (verdict.return_value == XDP_PASS && handed_on);
    // A packet handed to the kernel has the TC program's metadata in front.
    let out = &verdict.packet;
    let start =
        if verdict.return_value == XDP_PASS { out.len().saturating_sub(packet_len) } else { 0 };
    let output = if sent { parse(&out[start..]) } else { None };
    let action = XDP_ACTIONS.get(verdict.return_value as usize).copied().unwrap_or("unknown");
    let action = if verdict.return_value == XDP_PASS && handed_on {
        "hand to the kernel translated, to send once the next hop's MAC is resolved"
    } else {
        action
    };
    (action.to_string(), output)
}

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// What the TC datapath's verdict means. A redirect names the interface
/// the route to the packet's new destination leaves by: the test run does
/// not say which one `bpf_redirect` or `bpf_redirect_neigh` chose.
fn tc_action(verdict: &Verdict, input: &Headers) -> (String, Option<Headers>) {
    let output = parse(&verdict.packet);
    match verdict.return_value {
        TC_ACT_REDIRECT => {
            let out = output
                .and_then(|headers| netlink::route_out_interface(*headers.dst.ip()).ok().flatten());
            let action = match out.and_then(crate::datapath::if_name) {
                Some(name) => format!("redirect out of {name} (TC)"),
                None => "redirect to another interface (TC)".to_string(),
            };
            (action, output)
        }
        TC_ACT_OK | TC_ACT_UNSPEC => match output {
            // Rewritten, then left to the kernel to route.
            Some(headers) if headers != *input => {
                ("pass to the kernel translated (TC)".to_string(), Some(headers))
            }
            _ => ("pass to the kernel".to_string(), None),
        },
        TC_ACT_SHOT => ("drop".to_string(), None),
        other => (format!("unknown TC verdict {}", other as i32), None),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// What a counter says about the packet, for `because:`.
pub fn because(counter: &str) -> String {
    let why = match counter {
        "wrong_interface" => {
            "a tracked flow's tuple on another interface than that direction's: no flow"
        }
        "flow_orphaned" => "a new-flow entry whose partner was evicted: removed, no flow",
        "tcp_out_of_window" => "outside the receiver's TCP window: dropped",
        "tcp_handshake_invalid" => "breaks the TCP handshake: dropped",
        "tcp_rst_not_exact" => {
            "a RST in the window but not at the expected sequence number: sent on, flow unchanged"
        }
        "denied" => "the source is in the deny set (`hairpin deny list`): dropped",
        "pass_not_allowed" => "the source is not in the mapping's allow list: as if unmapped",
        "pass_interface_not_allowed" => {
            "the mapping is not bound to this interface: as if unmapped"
        }
        "icmp_rate_limited" => "the ICMP answer is over the rate limit: dropped",
        _ => return counter.to_string(),
    };
    format!("{counter} ({why})")
}

/// A TCP segment's flags, sequence and acknowledgment numbers.
#[derive(Clone, Copy)]
struct TcpSegment {
    flags: u8,
    seq: u32,
    ack: u32,
}

/// The TCP segment explain sends: for a tracked flow, an ACK at the flow's
/// next sequence numbers (what the flow's next packet carries, so the window
/// check lets it through), else the SYN that would open one.
fn tcp_segment_for(maps: &Maps, proto: Proto, src: SocketAddrV4, dst: SocketAddrV4) -> TcpSegment {
    use hairpin_common::{
        DIRECTION_ORIGINAL,
        packet::{TCP_ACK, TCP_SYN},
    };
    let syn = TcpSegment { flags: TCP_SYN, seq: 0, ack: 0 };
    if proto != Proto::Tcp {
        return syn;
    }
    let key = FlowKey::new(
        wire_addr(*src.ip()),
        wire_addr(*dst.ip()),
        src.port().to_be(),
        dst.port().to_be(),
        proto.number(),
    );
    let Some(entry) = maps.flow(&key) else {
        return syn;
    };
    let (windows, sender) = if entry.direction == DIRECTION_ORIGINAL {
        (entry.tcp, 0)
    } else {
        match maps.flow(&entry.translated.reversed()) {
            Some(original) => (original.tcp, 1),
            None => return syn,
        }
    };
    TcpSegment { flags: TCP_ACK, seq: windows[sender].end, ack: windows[1 - sender].end }
}

fn build_packet(
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    segment: TcpSegment,
) -> Vec<u8> {
    let l4_len = if proto == Proto::Tcp { 20 } else { 8 };
    let total = 20 + l4_len;
    let mut p = vec![0u8; 14 + total];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto.number();
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let check = hairpin_common::checksum::full(ip);
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    let l4 = &mut p[34..];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    if proto == Proto::Tcp {
        l4[4..8].copy_from_slice(&segment.seq.to_be_bytes());
        l4[8..12].copy_from_slice(&segment.ack.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = segment.flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, proto.number()]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let sum =
        hairpin_common::checksum::sum_words(l4, hairpin_common::checksum::sum_words(&pseudo, 0));
    let check = !hairpin_common::checksum::fold(sum);
    let at = if proto == Proto::Tcp { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    p
}

fn parse(frame: &[u8]) -> Option<Headers> {
    let ip = frame.get(14..34)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip[0] != 0x45 {
        return None;
    }
    let l4 = frame.get(34..38)?;
    let addr = |b: &[u8]| host_addr(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let has_ports = matches!(ip[9], 6 | 17);
    let port = |b: &[u8]| if has_ports { u16::from_be_bytes([b[0], b[1]]) } else { 0 };
    Some(Headers {
        proto: ip[9],
        src: SocketAddrV4::new(addr(&ip[12..16]), port(&l4[0..2])),
        dst: SocketAddrV4::new(addr(&ip[16..20]), port(&l4[2..4])),
        ttl: ip[8],
    })
}

#[cfg(test)]
mod tests {
    use hairpin_common::Counter;
    use rstest::rstest;

    use super::*;

    fn endpoint(text: &str) -> SocketAddrV4 {
        text.parse().expect("test endpoint")
    }

    #[rstest]
    #[case::pass_unchanged(TC_ACT_OK, false, "pass to the kernel", false)]
    #[case::unspec(TC_ACT_UNSPEC, false, "pass to the kernel", false)]
    #[case::pass_translated(TC_ACT_OK, true, "pass to the kernel translated (TC)", true)]
    #[case::drop(TC_ACT_SHOT, true, "drop", false)]
    #[case::redirect(TC_ACT_REDIRECT, true, "redirect ", true)]
    #[case::unknown(4, false, "unknown TC verdict 4", false)]
    fn tc_verdicts(
        #[case] return_value: u32,
        #[case] rewritten: bool,
        #[case] action: &str,
        #[case] leaves: bool,
    ) {
        let segment = TcpSegment { flags: hairpin_common::packet::TCP_SYN, seq: 0, ack: 0 };
        let (src, public) = (endpoint("192.168.0.3:40000"), endpoint("203.0.113.1:80"));
        let packet = build_packet(Proto::Tcp, src, public, segment);
        let after = if rewritten {
            build_packet(
                Proto::Tcp,
                endpoint("192.168.0.1:40000"),
                endpoint("192.168.0.2:80"),
                segment,
            )
        } else {
            packet.clone()
        };
        let input = parse(&packet).expect("parses");
        let (said, output) = tc_action(&Verdict { return_value, packet: after }, &input);
        assert!(said.starts_with(action), "{said:?} for {return_value}");
        assert_eq!(output.is_some(), leaves, "{output:?} for {return_value}");
        if let Some(output) = output {
            assert_eq!(output.dst, endpoint("192.168.0.2:80"));
        }
    }

    #[test]
    fn the_skb_context_names_the_interface_received_on() {
        let ctx = skb_context(7);
        assert_eq!(ctx.len(), 44, "struct __sk_buff up to ifindex");
        let field = |at: usize| u32::from_ne_bytes(ctx[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!((field(36), field(40)), (7, 7), "ingress_ifindex and ifindex");
        assert!(ctx[..36].iter().all(|b| *b == 0), "the fields before must be zero");
    }

    #[test]
    fn the_tables_the_datapath_writes_are_private() {
        for name in PRIVATE_MAPS {
            assert!(names::SHARED.contains(&name), "{name} is not a map of the instance");
        }
        for name in [names::CONNTRACK, names::CONNTRACK_NEW, names::COUNTERS, names::ICMP_RATE] {
            assert!(PRIVATE_MAPS.contains(&name), "explain would write the instance's {name}");
        }
    }

    #[test]
    fn every_restriction_counter_is_explained() {
        for counter in [
            Counter::WrongInterface,
            Counter::FlowOrphaned,
            Counter::TcpOutOfWindow,
            Counter::TcpHandshakeInvalid,
            Counter::TcpRstNotExact,
            Counter::Denied,
            Counter::PassNotAllowed,
            Counter::PassInterfaceNotAllowed,
            Counter::IcmpRateLimited,
        ] {
            let text = because(counter.name());
            assert!(text.len() > counter.name().len() + 10, "{} is not explained", counter.name());
        }
        assert_eq!(because("hairpinned"), "hairpinned");
    }
}
