//! Packets through the loaded XDP program with BPF_PROG_TEST_RUN.
//!
//! Each test runs in its own namespace holding a LAN interface with the
//! gateway's address and permanent neighbour entries, so that
//! `bpf_fib_lookup` resolves the next hop as on a real gateway.

use std::{mem::size_of, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{Ipv4HeaderSlice, PacketBuilder, TcpHeaderSlice, UdpHeaderSlice};
use hairpin::{
    config::Config,
    datapath::{Datapath, Table, monotonic_coarse_ns},
    routes::RouteCacheKeeper,
};
use hairpin_common::{
    Counter, FRAGMENT_TRANSLATED, FlowKey, FragmentEntry, FragmentKey, HANDOFF_TO_KERNEL,
    RouteCache, TC_HANDOFF_MAGIC, TcHandoff, fragment::MAX_FRAGMENTED_DATAGRAMS, state,
};
use hairpin_tests::{
    Netns,
    raw::{fix_ipv4_checksum, ipv4_fragments, with_frag_off},
    require_root, veth,
};
use rstest::rstest;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const GATEWAY: [u8; 4] = [192, 168, 0, 1];
const SERVER: [u8; 4] = [192, 168, 0, 2];
const CLIENT: [u8; 4] = [192, 168, 0, 3];
const CLIENT_B: [u8; 4] = [192, 168, 0, 4];
/// On the LAN, but with no neighbour entry.
const UNRESOLVED_SERVER: [u8; 4] = [192, 168, 0, 77];
/// A client behind the second LAN interface.
const OTHER_LAN_CLIENT: [u8; 4] = [192, 168, 1, 5];
/// The gateway's next hop on the WAN, towards 198.51.100.0/24.
const UPSTREAM_ROUTER: [u8; 4] = [203, 0, 113, 254];
const UPSTREAM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const GATEWAY_WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xf1];
const OUTSIDER: [u8; 4] = [198, 51, 100, 7];
const PUBLIC: [u8; 4] = [203, 0, 113, 1];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const CLIENT_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x04];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const CONFIG: &str = r#"
[lan]
interface = "lan0"
networks = ["192.168.0.0/24"]
address = "192.168.0.1"

[[mapping]]
proto = "tcp"
public = "203.0.113.1:80"
to = "192.168.0.2:8080"

[[mapping]]
proto = "udp"
public = "203.0.113.1:53"
to = "192.168.0.2:5353"

[[mapping]]
proto = "tcp"
public = "203.0.113.1:81"
to = "192.168.0.77:80"

[[mapping]]
proto = "tcp"
public = "203.0.113.1:8000-8009"
to = "192.168.0.2:9000-9009"

[[mapping]]
proto = "udp"
public = "203.0.113.1:80"
to = "192.168.0.2:8081"

[[mapping]]
proto = "tcp"
public = "198.51.100.10:443"
to = "192.168.0.2:8443"

[wan]
interface = "wan0"
addresses = ["203.0.113.1"]
"#;

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A namespace with `lan0` (192.168.0.1/24, forwarding on) and the server
/// and clients as permanent neighbours; `f` runs inside it with the
/// datapath loaded and configured from `config`.
fn with_datapath<R: Send>(config: &str, f: impl FnOnce(&mut Gateway) -> R + Send) -> R {
    with_datapath_in(Mode::Xdp, config, f)
}

/// Which program the packets go through: the XDP one (on an `xdp_md`) or
/// the TC datapath (on an skb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Xdp,
    Tc,
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// `with_datapath`, with the packets run through the program of `mode`.
fn with_datapath_in<R: Send>(
    mode: Mode,
    config: &str,
    f: impl FnOnce(&mut Gateway) -> R + Send,
) -> R {
    let netns = Netns::new("pkt");
    veth(&netns, "lan0", &netns, "lan0p");
    netns.ip(&["link", "set", "lan0", "address", &mac(GATEWAY_MAC)]);
    netns.ip(&["addr", "add", "192.168.0.1/24", "dev", "lan0"]);
    veth(&netns, "lan1", &netns, "lan1p");
    netns.ip(&["addr", "add", "192.168.1.1/24", "dev", "lan1"]);
    veth(&netns, "wan0", &netns, "wan0p");
    netns.ip(&["link", "set", "wan0", "address", &mac(GATEWAY_WAN_MAC)]);
    netns.ip(&["addr", "add", "203.0.113.1/24", "dev", "wan0"]);
    netns.ip(&["route", "add", "198.51.100.0/24", "via", "203.0.113.254"]);
    netns.sysctl("net.ipv4.ip_forward=1");
    for (addr, m, dev) in [
        (SERVER, SERVER_MAC, "lan0"),
        (CLIENT, CLIENT_MAC, "lan0"),
        (CLIENT_B, CLIENT_B_MAC, "lan0"),
        (OTHER_LAN_CLIENT, CLIENT_MAC, "lan1"),
        (UPSTREAM_ROUTER, UPSTREAM_MAC, "wan0"),
    ] {
        let addr = Ipv4Addr::from(addr).to_string();
        netns.ip(&["neigh", "replace", &addr, "lladdr", &mac(m), "dev", dev, "nud", "permanent"]);
    }
    let config: Config = config.parse().expect("test config");
    netns.run_in(move || {
        let mut datapath = Datapath::load(&config, None).expect("load the datapath");
        datapath.configure(&config).expect("configure the datapath");
        let lan0 = hairpin::datapath::if_index("lan0").expect("lan0");
        let lan1 = hairpin::datapath::if_index("lan1").expect("lan1");
        let wan0 = hairpin::datapath::if_index("wan0").expect("wan0");
        f(&mut Gateway { wan0, datapath, lan0, lan1, mode })
    })
}

struct Gateway {
    datapath: Datapath,
    mode: Mode,
    wan0: u32,
    lan0: u32,
    lan1: u32,
}

impl Gateway {
    /// Runs one packet received on lan0; the verdict and the packet after.
    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.lan0, packet)
    }

    /// Sent back out of the interface it came in on.
    fn tx(&self) -> u32 {
        if self.mode == Mode::Xdp { XDP_TX } else { TC_ACT_REDIRECT }
    }

    /// Sent out of another interface (for TC, also the same one: the
    /// verdict does not say which).
    fn redirect(&self) -> u32 {
        if self.mode == Mode::Xdp { XDP_REDIRECT } else { TC_ACT_REDIRECT }
    }

    fn pass(&self) -> u32 {
        if self.mode == Mode::Xdp { XDP_PASS } else { TC_ACT_OK }
    }

    fn drop_verdict(&self) -> u32 {
        if self.mode == Mode::Xdp { XDP_DROP } else { TC_ACT_SHOT }
    }

    /// Runs one packet received on the interface `ingress`.
    fn run_on(&mut self, ingress: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        if self.mode == Mode::Tc {
            return self.run_tc_on(ingress, packet);
        }
        let ctx = hairpin_common::test_run::XdpMd::received(packet.len(), ingress);
        test_run(self.datapath.xdp().expect("xdp program"), packet, ctx.as_bytes())
    }

    /// Runs one packet through the TC datapath as an skb received on
    /// `ingress`.
    fn run_tc_on(&mut self, ingress: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        // struct __sk_buff: ingress_ifindex at 36, ifindex at 40. (The
        // kernel refuses a GSO skb here: GSO is tested end to end.)
        let mut ctx = vec![0u8; 44];
        ctx[36..40].copy_from_slice(&ingress.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ingress.to_ne_bytes());
        test_run(self.datapath.tc(hairpin_common::programs::TC).expect("tc program"), packet, &ctx)
    }

    fn counter(&self, counter: Counter) -> u64 {
        let counters = self.datapath.maps.counters().expect("counters");
        counters.iter().find(|(c, _)| *c == counter).map(|(_, v)| *v).unwrap_or(0)
    }
}

/// Runs `packet` through `program` with the context `ctx`: its verdict and
/// the packet after.
fn test_run<P>(program: &P, packet: &[u8], ctx: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(ctx),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

struct Tcp {
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    ack: bool,
}

/// Both sides' initial sequence number in these tests: with the same one,
/// every later segment (seq and ack `ISN + 1`) fits either side's window.
const ISN: u32 = 1000;

/// A TCP segment of the tests' connections: a SYN or SYN-ACK opens with
/// `ISN` (the SYN-ACK acknowledging the SYN exactly), later segments carry
/// `ISN + 1` both ways and a payload.
fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), syn: bool, ack: bool, ttl: u8) -> Vec<u8> {
    let t = Tcp { src, dst, syn, ack };
    let seq = if t.syn { ISN } else { ISN + 1 };
    let mut builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(t.src.0, t.dst.0, ttl)
        .tcp(t.src.1, t.dst.1, seq, 64240);
    if t.syn {
        builder = builder.syn();
    }
    if t.ack {
        builder = builder.ack(ISN + 1);
    }
    let payload: &[u8] = if t.syn { b"" } else { b"tcp payload" };
    let mut packet = Vec::new();
    builder.write(&mut packet, payload).expect("build tcp");
    packet
}

fn syn(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    tcp(src, dst, true, false, 64)
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut packet, payload)
        .expect("build udp");
    packet
}

/// What a rewritten packet carries, after checking every checksum in it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

fn inspect(packet: &[u8]) -> Seen {
    let ip = Ipv4HeaderSlice::from_slice(&packet[14..]).expect("IPv4 header");
    assert_eq!(
        ip.header_checksum(),
        ip.to_header().calc_header_checksum(),
        "IPv4 header checksum is wrong"
    );
    let l4 = &packet[14 + ip.slice().len()..];
    let (src_port, dst_port) = match ip.protocol().0 {
        6 => {
            let tcp = TcpHeaderSlice::from_slice(l4).expect("TCP header");
            let payload = &l4[tcp.slice().len()..];
            let expected = tcp.calc_checksum_ipv4(&ip, payload).expect("tcp checksum");
            assert_eq!(tcp.checksum(), expected, "TCP checksum is wrong");
            (tcp.source_port(), tcp.destination_port())
        }
        17 => {
            let udp = UdpHeaderSlice::from_slice(l4).expect("UDP header");
            let payload = &l4[8..];
            if udp.checksum() != 0 {
                let expected = udp
                    .to_header()
                    .calc_checksum_ipv4(&ip.to_header(), payload)
                    .expect("udp checksum");
                assert_eq!(udp.checksum(), expected, "UDP checksum is wrong");
            }
            (udp.source_port(), udp.destination_port())
        }
        other => panic!("unexpected protocol {other}"),
    };
    Seen {
        src: (ip.source(), src_port),
        dst: (ip.destination(), dst_port),
        ttl: ip.ttl(),
        src_mac: packet[6..12].try_into().unwrap(),
        dst_mac: packet[0..6].try_into().unwrap(),
    }
}

#[rstest]
#[ignore = "needs root"]
fn hairpin_forward_and_reply(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("hairpin_forward_and_reply");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict, out) = gw.run(&syn((CLIENT, 40000), (PUBLIC, 80)));
        assert_eq!(verdict, gw.tx(), "the hairpin goes back out of lan0");
        let seen = inspect(&out);
        assert_eq!(
            seen,
            Seen {
                src: (GATEWAY, 40000),
                dst: (SERVER, 8080),
                ttl: 63,
                src_mac: GATEWAY_MAC,
                dst_mac: SERVER_MAC,
            },
            "DNAT to the server, SNAT to the gateway keeping the client's port"
        );

        let reply = tcp((SERVER, 8080), (GATEWAY, 40000), true, true, 64);
        let (verdict, out) = gw.run(&reply);
        assert_eq!(verdict, gw.tx());
        assert_eq!(
            inspect(&out),
            Seen {
                src: (PUBLIC, 80),
                dst: (CLIENT, 40000),
                ttl: 63,
                src_mac: GATEWAY_MAC,
                dst_mac: CLIENT_MAC
            },
            "the reply comes from the public address"
        );

        let (verdict, out) = gw.run(&tcp((CLIENT, 40000), (PUBLIC, 80), false, true, 64));
        assert_eq!(verdict, gw.tx(), "the flow's later packets follow its entry");
        assert_eq!(inspect(&out).dst, (SERVER, 8080));

        assert_eq!(gw.counter(Counter::Hairpinned), 2);
        assert_eq!(gw.counter(Counter::TranslatedBack), 1);
        assert_eq!(gw.counter(Counter::FlowCreated), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn udp_forward_and_reply(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("udp_forward_and_reply");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict, out) = gw.run(&udp((CLIENT, 33333), (PUBLIC, 53), b"query"));
        assert_eq!(verdict, gw.tx());
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), ((GATEWAY, 33333), (SERVER, 5353)));
        assert_eq!(&out[out.len() - 5..], b"query", "payload untouched");

        let (verdict, out) = gw.run(&udp((SERVER, 5353), (GATEWAY, 33333), b"answer"));
        assert_eq!(verdict, gw.tx());
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), ((PUBLIC, 53), (CLIENT, 33333)));
    });
}

#[rstest]
#[ignore = "needs root"]
fn udp_zero_checksum_stays_zero(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("udp_zero_checksum_stays_zero");
    with_datapath_in(mode, CONFIG, |gw| {
        let mut packet = udp((CLIENT, 33334), (PUBLIC, 53), b"no checksum");
        packet[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.tx());
        assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0], "a zero UDP checksum must stay zero");
        inspect(&out);
    });
}

#[rstest]
#[ignore = "needs root"]
fn two_clients_with_the_same_source_port_get_distinct_tuples(
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("two_clients_with_the_same_source_port_get_distinct_tuples");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict_a, out_a) = gw.run(&syn((CLIENT, 40000), (PUBLIC, 80)));
        let mut syn_b = syn((CLIENT_B, 40000), (PUBLIC, 80));
        syn_b[6..12].copy_from_slice(&CLIENT_B_MAC);
        let (verdict_b, out_b) = gw.run(&syn_b);
        assert_eq!((verdict_a, verdict_b), (gw.tx(), gw.tx()));
        let (a, b) = (inspect(&out_a), inspect(&out_b));
        assert_eq!(a.src, (GATEWAY, 40000), "the first client keeps its port");
        assert_eq!(b.src.0, GATEWAY);
        assert_ne!(a.src, b.src, "two clients must never share a translated tuple");

        for (seen, client, client_mac) in [(a, CLIENT, CLIENT_MAC), (b, CLIENT_B, CLIENT_B_MAC)] {
            let reply = tcp(seen.dst, seen.src, true, true, 64);
            let (verdict, out) = gw.run(&reply);
            assert_eq!(verdict, gw.tx());
            let back = inspect(&out);
            assert_eq!(back.dst, (client, 40000), "each reply reaches its own client");
            assert_eq!(back.dst_mac, client_mac);
        }
    });
}

#[rstest]
#[ignore = "needs root"]
fn exhausted_snat_ports_refuse_the_flow(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("exhausted_snat_ports_refuse_the_flow");
    let config = CONFIG.replace(
        "address = \"192.168.0.1\"",
        "address = \"192.168.0.1\"\nsnat_ports = \"20000-20001\"",
    );
    with_datapath_in(mode, &config, |gw| {
        let mut ports = Vec::new();
        for client_port in [40000, 40001] {
            let (verdict, out) = gw.run(&syn((CLIENT, client_port), (PUBLIC, 80)));
            assert_eq!(verdict, gw.tx());
            ports.push(inspect(&out).src.1);
        }
        ports.sort();
        assert_eq!(ports, [20000, 20001], "the range's two ports are used once each");

        let packet = syn((CLIENT, 40002), (PUBLIC, 80));
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.tx(), "no port left: the flow is refused, to the client");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (PUBLIC, CLIENT));
        assert_eq!((out[34], out[35]), (3, 13), "communication administratively prohibited");
        assert_eq!(quoted, packet[14..14 + 28], "quoting the refused SYN");
        assert_eq!(gw.counter(Counter::PortAllocFailed), 1);
        assert_eq!(gw.counter(Counter::FlowRefused), 1);
        assert_eq!(gw.counter(Counter::FlowCreated), 2, "no state for the refused flow");
    });
}

/// A SYN whose IPv4 header carries a 4-byte option (NOP padding).
fn syn_with_ip_options() -> Vec<u8> {
    with_ip_option(syn((CLIENT, 40010), (PUBLIC, 80)))
}

fn arp() -> Vec<u8> {
    let mut packet = vec![0xff; 6];
    packet.extend_from_slice(&CLIENT_MAC);
    packet.extend_from_slice(&[0x08, 0x06]);
    packet.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    packet.extend_from_slice(&CLIENT_MAC);
    packet.extend_from_slice(&CLIENT);
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&GATEWAY);
    packet
}

#[rstest]
#[case::no_mapping(syn((CLIENT, 40000), (PUBLIC, 443)), Counter::PassNoMapping)]
#[case::wrong_protocol_for_the_port(udp((CLIENT, 40000), (PUBLIC, 81), b"x"), Counter::PassNoMapping)]
#[case::source_outside_the_lan(syn((OUTSIDER, 40000), (PUBLIC, 80)), Counter::PassSourceNotLan)]
#[case::tcp_ack_without_entry(tcp((CLIENT, 40000), (PUBLIC, 80), false, true, 64), Counter::PassTcpNotSyn)]
#[case::tcp_syn_ack_without_entry(tcp((CLIENT, 40000), (PUBLIC, 80), true, true, 64), Counter::PassTcpNotSyn)]
#[case::first_fragment_of_no_mapping(with_frag_off(udp((CLIENT, 40000), (PUBLIC, 54), b"frag"), 0x2000), Counter::PassNoMapping)]
#[case::ttl_one_of_no_flow(tcp((CLIENT, 40000), (PUBLIC, 443), true, false, 1), Counter::PassNoMapping)]
#[case::arp(arp(), Counter::PassNotIpv4)]
#[case::truncated_tcp(syn((CLIENT, 40000), (PUBLIC, 80))[..40].to_vec(), Counter::PassMalformed)]
#[ignore = "needs root"]
fn packets_hairpin_does_not_own_pass_untouched(
    #[case] packet: Vec<u8>,
    #[case] reason: Counter,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("packets_hairpin_does_not_own_pass_untouched");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.pass());
        assert_eq!(out, packet, "a passed packet must be untouched");
        assert_eq!(gw.counter(reason), 1, "counted as {}", reason.name());
        assert_eq!(gw.counter(Counter::FlowCreated), 0, "no state for a passed packet");
    });
}

/// Client to public address, or server back to the gateway.
#[derive(Clone, Copy, Debug)]
enum Towards {
    PublicAddress,
    Gateway,
}

#[rstest]
#[case::client_to_the_public_address(Towards::PublicAddress)]
#[case::server_to_the_gateway(Towards::Gateway)]
#[ignore = "needs root"]
fn ttl_one_of_a_tracked_flow_is_answered_with_time_exceeded(
    #[case] towards: Towards,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("ttl_one_of_a_tracked_flow_is_answered_with_time_exceeded");
    with_datapath_in(mode, CONFIG, |gw| {
        assert_eq!(gw.run(&udp((CLIENT, 40020), (PUBLIC, 53), b"q")).0, gw.tx());
        let (sender, packet, answered_from) = match towards {
            Towards::PublicAddress => {
                (CLIENT, with_ttl(udp((CLIENT, 40020), (PUBLIC, 53), b"q"), 1), PUBLIC)
            }
            Towards::Gateway => {
                (SERVER, with_ttl(udp((SERVER, 5353), (GATEWAY, 40020), b"a"), 1), GATEWAY)
            }
        };
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.tx(), "answered where it came from, not passed");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (answered_from, sender), "from the address the sender used");
        assert_eq!((out[34], out[35]), (11, 0), "time exceeded in transit");
        assert_eq!(quoted, packet[14..14 + 28], "the packet as its sender sent it");
        assert_eq!(gw.counter(Counter::TimeExceededSent), 1);
    });
}

fn with_ttl(mut packet: Vec<u8>, ttl: u8) -> Vec<u8> {
    packet[22] = ttl;
    fix_ipv4_checksum(&mut packet);
    packet
}

#[rstest]
#[ignore = "needs root"]
fn ip_options_are_kept_and_the_packet_translated(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("ip_options_are_kept_and_the_packet_translated");
    with_datapath_in(mode, CONFIG, |gw| {
        let packet = syn_with_ip_options();
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.tx(), "a new flow, options and all");
        assert_eq!(out[14], 0x46, "the options are kept");
        assert_eq!(&out[34..38], &packet[34..38], "the option bytes unchanged");
        let seen = inspect(&out);
        assert_eq!(seen.dst, (SERVER, 8080));
        assert_eq!(seen.src.0, GATEWAY);
        // The server's SYN-ACK comes back without options; then the client's
        // ACK with options again, on the open flow.
        let syn_ack = segment((SERVER, 8080), seen.src, SYN | ACK, ISN, ISN + 1, 0);
        assert_eq!(gw.run(&syn_ack).0, gw.tx());
        let ack = with_ip_option(segment((CLIENT, 40010), (PUBLIC, 80), ACK, ISN + 1, ISN + 1, 10));
        let (verdict, out) = gw.run(&ack);
        assert_eq!(verdict, gw.tx());
        assert_eq!(inspect(&out).dst, (SERVER, 8080), "translated on the open flow");
        assert_eq!(gw.counter(Counter::Hairpinned), 2);
    });
}

/// The packet with a 4-byte IPv4 option (NOP padding) inserted.
fn with_ip_option(plain: Vec<u8>) -> Vec<u8> {
    let mut packet = plain[..34].to_vec();
    packet.extend_from_slice(&[1, 1, 1, 0]);
    packet.extend_from_slice(&plain[34..]);
    packet[14] = 0x46;
    let tot_len = u16::from_be_bytes([packet[16], packet[17]]) + 4;
    packet[16..18].copy_from_slice(&tot_len.to_be_bytes());
    fix_ipv4_checksum(&mut packet);
    packet
}

#[test]
#[ignore = "needs root"]
fn unresolved_next_hop_is_handed_to_the_kernel_translated() {
    require_root("unresolved_next_hop_is_handed_to_the_kernel_translated");
    with_datapath(CONFIG, |gw| {
        let (verdict, out) = gw.run(&syn((CLIENT, 40030), (PUBLIC, 81)));
        assert_eq!(verdict, XDP_PASS, "TC's bpf_redirect_neigh sends it once the MAC is known");
        assert_eq!(gw.counter(Counter::NeighRedirected), 1);
        // The output starts with the metadata for the TC program.
        let meta = out.len() - syn((CLIENT, 40030), (PUBLIC, 81)).len();
        assert_eq!(meta, 8, "metadata in front of the packet");
        let seen = inspect(&out[meta..]);
        assert_eq!((seen.src, seen.dst), ((GATEWAY, 40030), (UNRESOLVED_SERVER, 80)));
        assert_eq!(seen.ttl, 63);
    });
}

#[test]
#[ignore = "needs root"]
fn unconfigured_program_passes_everything() {
    require_root("unconfigured_program_passes_everything");
    let netns = Netns::new("pkt");
    netns.run_in(|| {
        let config: Config = CONFIG.parse().unwrap();
        let mut datapath = Datapath::load(&config, None).expect("load");
        let packet = syn((CLIENT, 40000), (PUBLIC, 80));
        let mut out = vec![0u8; packet.len() + 256];
        let result = datapath
            .xdp()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(result.return_value, XDP_PASS);
        assert_ne!(result.return_value, XDP_DROP);
    });
}

#[rstest]
#[ignore = "needs root"]
fn hairpin_between_lan_interfaces_is_redirected(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("hairpin_between_lan_interfaces_is_redirected");
    let config =
        CONFIG.replace("interface = \"lan0\"", "interfaces = [\"lan0\", \"lan1\"]").replace(
            "networks = [\"192.168.0.0/24\"]",
            "networks = [\"192.168.0.0/24\", \"192.168.1.0/24\"]",
        );
    with_datapath_in(mode, &config, |gw| {
        let lan1 = gw.lan1;
        let (verdict, out) = gw.run_on(lan1, &syn((OTHER_LAN_CLIENT, 40040), (PUBLIC, 80)));
        assert_eq!(
            verdict,
            gw.redirect(),
            "the server is behind lan0: redirect through the devmap"
        );
        let seen = inspect(&out);
        assert_eq!(
            (seen.src, seen.dst),
            ((GATEWAY, 40040), (SERVER, 8080)),
            "SNAT source stays lan.address"
        );
        assert_eq!(seen.dst_mac, SERVER_MAC);

        let (verdict, out) = gw.run(&tcp((SERVER, 8080), (GATEWAY, 40040), true, true, 64));
        assert_eq!(verdict, gw.redirect(), "the reply goes back out of lan1");
        assert_eq!(inspect(&out).dst, (OTHER_LAN_CLIENT, 40040));
    });
}

#[test]
#[ignore = "needs root"]
fn packet_on_an_unmanaged_interface_is_passed() {
    require_root("packet_on_an_unmanaged_interface_is_passed");
    with_datapath(CONFIG, |gw| {
        let lan1 = gw.lan1;
        let packet = syn((OTHER_LAN_CLIENT, 40050), (PUBLIC, 80));
        // lan1 is not in the configuration.
        let (verdict, out) = gw.run_on(lan1, &packet);
        assert_eq!((verdict, out), (XDP_PASS, packet));
        assert_eq!(gw.counter(Counter::PassUnknownInterface), 1);
    });
}

impl Gateway {
    /// The entry keyed by `key`, and its table.
    fn entry(&self, key: FlowKey) -> Option<(Table, hairpin_common::FlowEntry)> {
        [Table::Established, Table::New].into_iter().find_map(|table| {
            let entries = self.datapath.maps.conntrack(table).expect("conntrack");
            entries.into_iter().find(|(k, _)| *k == key).map(|(_, e)| (table, e))
        })
    }

    /// The flow state and table of the entry keyed by `packet`'s tuple.
    fn flow_state(&self, key: FlowKey) -> Option<(Table, &'static str)> {
        [Table::Established, Table::New].into_iter().find_map(|table| {
            let entries = self.datapath.maps.conntrack(table).expect("conntrack");
            entries.iter().find(|(k, _)| *k == key).map(|(_, e)| (table, state::name(e.state)))
        })
    }
}

fn key(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8) -> FlowKey {
    FlowKey::new(
        u32::from_ne_bytes(src.0),
        u32::from_ne_bytes(dst.0),
        src.1.to_be(),
        dst.1.to_be(),
        proto,
    )
}

fn flagged(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Vec<u8> {
    let mut packet = tcp(src, dst, false, false, 64);
    // Set the flags byte directly and fix the TCP checksum.
    packet[14 + 20 + 13] = flags;
    let ip = Ipv4HeaderSlice::from_slice(&packet[14..]).unwrap();
    let tcp_slice = TcpHeaderSlice::from_slice(&packet[34..]).unwrap();
    let check = tcp_slice.calc_checksum_ipv4(&ip, &packet[34 + 20..]).unwrap();
    packet[34 + 16..34 + 18].copy_from_slice(&check.to_be_bytes());
    packet
}

const WAN_CLIENT: [u8; 4] = [198, 51, 100, 7];

#[rstest]
#[ignore = "needs root"]
fn wan_port_forward_keeps_the_client_address(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("wan_port_forward_keeps_the_client_address");
    with_datapath_in(mode, CONFIG, |gw| {
        let wan0 = gw.wan0;
        let mut packet = syn((WAN_CLIENT, 50000), (PUBLIC, 80));
        packet[..6].copy_from_slice(&GATEWAY_WAN_MAC);
        let (verdict, out) = gw.run_on(wan0, &packet);
        assert_eq!(verdict, gw.redirect(), "from the WAN interface to the LAN one");
        let seen = inspect(&out);
        assert_eq!(
            (seen.src, seen.dst, seen.dst_mac),
            ((WAN_CLIENT, 50000), (SERVER, 8080), SERVER_MAC),
            "DNAT only: the server sees the real client"
        );

        let (verdict, out) = gw.run(&tcp((SERVER, 8080), (WAN_CLIENT, 50000), true, true, 64));
        assert_eq!(verdict, gw.redirect(), "the reply goes out of the WAN interface");
        let seen = inspect(&out);
        assert_eq!(
            (seen.src, seen.dst, seen.src_mac, seen.dst_mac),
            ((PUBLIC, 80), (WAN_CLIENT, 50000), GATEWAY_WAN_MAC, UPSTREAM_MAC),
            "from the public address, through the upstream router"
        );
        assert_eq!(gw.counter(Counter::PortForwarded), 1);
        assert_eq!(gw.counter(Counter::TranslatedBack), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn lan_source_arriving_on_the_wan_is_passed(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("lan_source_arriving_on_the_wan_is_passed");
    with_datapath_in(mode, CONFIG, |gw| {
        let wan0 = gw.wan0;
        let packet = syn((CLIENT, 50001), (PUBLIC, 80));
        let (verdict, out) = gw.run_on(wan0, &packet);
        assert_eq!((verdict, out), (gw.pass(), packet), "a spoofed LAN source");
        assert_eq!(gw.counter(Counter::PassLanSourceOnWan), 1);
    });
}

#[rstest]
#[case(8000, 9000)]
#[case(8005, 9005)]
#[case(8009, 9009)]
#[ignore = "needs root"]
fn port_range_mapping(
    #[case] public_port: u16,
    #[case] server_port: u16,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("port_range_mapping");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict, out) = gw.run(&syn((CLIENT, 40100), (PUBLIC, public_port)));
        assert_eq!(verdict, gw.tx());
        assert_eq!(inspect(&out).dst, (SERVER, server_port));
        let reply = tcp((SERVER, server_port), (GATEWAY, 40100), true, true, 64);
        assert_eq!(inspect(&gw.run(&reply).1).src, (PUBLIC, public_port));
        let outside = syn((CLIENT, 40101), (PUBLIC, 8010));
        assert_eq!(gw.run(&outside).0, gw.pass(), "8010 is outside the range");
    });
}

/// A TCP segment with these flags, sequence and acknowledgment numbers and
/// `len` bytes of payload.
fn segment(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    flags: u8,
    seq: u32,
    ack: u32,
    len: usize,
) -> Vec<u8> {
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, seq, 64240)
        .write(&mut packet, &vec![0x61; len])
        .expect("build tcp");
    let tcp_at = 14 + 20;
    packet[tcp_at + 8..tcp_at + 12].copy_from_slice(&ack.to_be_bytes());
    packet[tcp_at + 13] = flags;
    fix_tcp_checksum(&mut packet);
    packet
}

fn fix_tcp_checksum(packet: &mut [u8]) {
    let ip = Ipv4HeaderSlice::from_slice(&packet[14..]).unwrap();
    let tcp_slice = TcpHeaderSlice::from_slice(&packet[34..]).unwrap();
    let check = tcp_slice.calc_checksum_ipv4(&ip, &packet[34 + tcp_slice.slice().len()..]).unwrap();
    packet[34 + 16..34 + 18].copy_from_slice(&check.to_be_bytes());
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

#[rstest]
#[ignore = "needs root"]
fn tcp_states_follow_the_connection_and_it_moves_tables(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("tcp_states_follow_the_connection_and_it_moves_tables");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40200);
        let (public, server, gateway) = ((PUBLIC, 80), (SERVER, 8080), (GATEWAY, 40200));
        let original = key(client, public, 6);
        let reply = key(server, gateway, 6);
        let (c, s) = (100_000u32, 900_000u32);
        // (from the client, flags, seq, ack, payload, table, state after)
        let steps: &[(bool, u8, u32, u32, usize, Table, &str)] = &[
            (true, SYN, c, 0, 0, Table::New, "SYN_SENT"),
            (false, SYN | ACK, s, c + 1, 0, Table::New, "SYN_RECV"),
            (true, ACK, c + 1, s + 1, 0, Table::Established, "ESTABLISHED"),
            (true, ACK, c + 1, s + 1, 100, Table::Established, "ESTABLISHED"),
            (false, ACK, s + 1, c + 101, 500, Table::Established, "ESTABLISHED"),
            (true, FIN | ACK, c + 101, s + 501, 0, Table::Established, "FIN_WAIT"),
            (false, ACK, s + 501, c + 102, 0, Table::Established, "CLOSE_WAIT"),
            (false, FIN | ACK, s + 501, c + 102, 0, Table::Established, "TIME_WAIT"),
            (true, ACK, c + 102, s + 502, 0, Table::Established, "TIME_WAIT"),
            (true, RST, c + 102, 0, 0, Table::Established, "CLOSE"),
        ];
        for (i, &(from_client, flags, seq, ack, len, table, state_name)) in steps.iter().enumerate()
        {
            let packet = if from_client {
                segment(client, public, flags, seq, ack, len)
            } else {
                segment(server, gateway, flags, seq, ack, len)
            };
            let (verdict, _) = gw.run(&packet);
            assert_eq!(verdict, gw.tx(), "step {i}: packet not translated");
            for k in [original, reply] {
                assert_eq!(
                    gw.flow_state(k),
                    Some((table, state_name)),
                    "step {i}: flags {flags:#04x}"
                );
            }
        }
        assert_eq!(gw.counter(Counter::FlowEstablished), 1);
    });
}

/// Opens a TCP flow from `client` through the hairpin with a validated
/// handshake (client ISN 100000, server ISN 900000).
fn established_tcp(gw: &mut Gateway, client: ([u8; 4], u16)) {
    let (public, server, gateway) = ((PUBLIC, 80), (SERVER, 8080), (GATEWAY, client.1));
    for (from_client, flags, seq, ack) in [
        (true, SYN, 100_000, 0),
        (false, SYN | ACK, 900_000, 100_001),
        (true, ACK, 100_001, 900_001),
    ] {
        let packet = if from_client {
            segment(client, public, flags, seq, ack, 0)
        } else {
            segment(server, gateway, flags, seq, ack, 0)
        };
        assert_eq!(gw.run(&packet).0, gw.tx(), "handshake packet {flags:#04x}");
    }
    assert_eq!(gw.flow_state(key(client, public, 6)), Some((Table::Established, "ESTABLISHED")));
}

#[rstest]
#[case::far_ahead(900_001 + (1 << 30))]
#[case::behind(900_001u32.wrapping_sub(1 << 29))]
#[case::half_way_round(900_001 + (1 << 31))]
#[ignore = "needs root"]
fn a_blind_rst_outside_the_window_is_dropped(
    #[case] seq: u32,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("a_blind_rst_outside_the_window_is_dropped");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40210);
        established_tcp(gw, client);
        let blind = segment((SERVER, 8080), (GATEWAY, 40210), RST, seq, 0, 0);
        assert_eq!(gw.run(&blind).0, gw.drop_verdict(), "an out-of-window RST is not sent on");
        assert_eq!(gw.counter(Counter::TcpOutOfWindow), 1);
        assert_eq!(
            gw.flow_state(key(client, (PUBLIC, 80), 6)),
            Some((Table::Established, "ESTABLISHED")),
            "the flow stays established"
        );
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_rst_in_the_window_closes_only_when_exact(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_rst_in_the_window_closes_only_when_exact");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40220);
        established_tcp(gw, client);
        let from_server = |seq| segment((SERVER, 8080), (GATEWAY, 40220), RST, seq, 0, 0);
        assert_eq!(gw.run(&from_server(900_001 + 3000)).0, gw.tx(), "sent on for a challenge ACK");
        assert_eq!(gw.counter(Counter::TcpRstNotExact), 1);
        let original = key(client, (PUBLIC, 80), 6);
        assert_eq!(gw.flow_state(original), Some((Table::Established, "ESTABLISHED")));
        assert_eq!(gw.run(&from_server(900_001)).0, gw.tx());
        assert_eq!(gw.flow_state(original), Some((Table::Established, "CLOSE")));
    });
}

#[rstest]
#[ignore = "needs root"]
fn blind_fin_and_data_are_dropped(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("blind_fin_and_data_are_dropped");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40230);
        established_tcp(gw, client);
        let wild = 100_001 + 500_000_000;
        for packet in [
            segment(client, (PUBLIC, 80), FIN | ACK, wild, 900_001, 0),
            segment(client, (PUBLIC, 80), ACK, wild, 900_001, 100),
            segment(client, (PUBLIC, 80), ACK, 100_001, 900_001 + 5_000_000, 0),
        ] {
            assert_eq!(gw.run(&packet).0, gw.drop_verdict());
        }
        assert_eq!(gw.counter(Counter::TcpOutOfWindow), 3);
        assert_eq!(
            gw.flow_state(key(client, (PUBLIC, 80), 6)),
            Some((Table::Established, "ESTABLISHED"))
        );
        let data = segment(client, (PUBLIC, 80), ACK, 100_001, 900_001, 100);
        assert_eq!(gw.run(&data).0, gw.tx(), "the real data still flows");
    });
}

#[rstest]
#[case::acknowledging_more_than_the_syn(100_002)]
#[case::guessed(12345)]
#[ignore = "needs root"]
fn a_forged_syn_ack_does_not_open_the_flow(
    #[case] ack: u32,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("a_forged_syn_ack_does_not_open_the_flow");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40240);
        let (public, server, gateway) = ((PUBLIC, 80), (SERVER, 8080), (GATEWAY, 40240));
        assert_eq!(gw.run(&segment(client, public, SYN, 100_000, 0, 0)).0, gw.tx());
        let forged = segment(server, gateway, SYN | ACK, 5, ack, 0);
        assert_eq!(gw.run(&forged).0, gw.drop_verdict());
        assert_eq!(gw.counter(Counter::TcpHandshakeInvalid), 1);
        // The client's ACK of what the forger sent establishes nothing.
        let ack_of_forgery = segment(client, public, ACK, 100_001, 6, 0);
        let _ = gw.run(&ack_of_forgery);
        assert_eq!(gw.flow_state(key(client, public, 6)), Some((Table::New, "SYN_SENT")));
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_syn_with_window_scaling_lets_the_window_grow(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_syn_with_window_scaling_lets_the_window_grow");
    with_datapath_in(mode, CONFIG, |gw| {
        let client = (CLIENT, 40250);
        let (public, server, gateway) = ((PUBLIC, 80), (SERVER, 8080), (GATEWAY, 40250));
        let with_scale =
            |src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8, seq: u32, ack: u32| {
                let mut packet = Vec::new();
                PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
                    .ipv4(src.0, dst.0, 64)
                    .tcp(src.1, dst.1, seq, 64240)
                    .options(&[
                        etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                        etherparse::TcpOptionElement::Noop,
                        etherparse::TcpOptionElement::WindowScale(7),
                    ])
                    .expect("options")
                    .write(&mut packet, &[])
                    .expect("build tcp");
                packet[34 + 8..34 + 12].copy_from_slice(&ack.to_be_bytes());
                packet[34 + 13] = flags;
                fix_tcp_checksum(&mut packet);
                packet
            };
        assert_eq!(gw.run(&with_scale(client, public, SYN, 100_000, 0)).0, gw.tx());
        assert_eq!(gw.run(&with_scale(server, gateway, SYN | ACK, 900_000, 100_001)).0, gw.tx());
        assert_eq!(gw.run(&segment(client, public, ACK, 100_001, 900_001, 0)).0, gw.tx());
        // 1 MB ahead of the acknowledgments: inside 64240 << 7, far outside 64240.
        let ahead = segment(server, gateway, ACK, 900_001 + 1_000_000, 100_001, 100);
        assert_eq!(
            gw.run(&ahead).0,
            gw.tx(),
            "the server's scaled window was read from its SYN-ACK"
        );
        assert_eq!(gw.counter(Counter::TcpOutOfWindow), 0);
    });
}

#[rstest]
#[ignore = "needs root"]
fn udp_flow_is_established_by_the_reply(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("udp_flow_is_established_by_the_reply");
    with_datapath_in(mode, CONFIG, |gw| {
        let original = key((CLIENT, 33400), (PUBLIC, 53), 17);
        gw.run(&udp((CLIENT, 33400), (PUBLIC, 53), b"q"));
        assert_eq!(gw.flow_state(original), Some((Table::New, "UNREPLIED")));
        gw.run(&udp((SERVER, 5353), (GATEWAY, 33400), b"a"));
        assert_eq!(
            gw.flow_state(original),
            Some((Table::New, "REPLIED")),
            "a query and its answer are not a stream: they stay evictable"
        );
        // The flow has lasted 3 s: backdate its entries, as a clock would.
        for table_key in [original, key((SERVER, 5353), (GATEWAY, 33400), 17)] {
            let (_, mut entry) = gw.entry(table_key).expect("flow entry");
            entry.created_s -= 3;
            entry.last_seen_ns -= 3_000_000_000;
            gw.datapath.maps.put_flow(Table::New, &table_key, &entry);
        }
        gw.run(&udp((CLIENT, 33400), (PUBLIC, 53), b"q2"));
        assert_eq!(gw.flow_state(original), Some((Table::Established, "REPLIED")));
        assert_eq!(gw.counter(Counter::FlowEstablished), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_flows_tuple_from_the_wrong_interface_is_no_flows(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_flows_tuple_from_the_wrong_interface_is_no_flows");
    with_datapath_in(mode, CONFIG, |gw| {
        let wan0 = gw.wan0;
        let (verdict, _) = gw.run(&udp((CLIENT, 33500), (PUBLIC, 53), b"q"));
        assert_eq!(verdict, gw.tx());
        // A WAN host sends the LAN client's tuple, then the server's reply tuple.
        for packet in [
            udp((CLIENT, 33500), (PUBLIC, 53), b"injected to the server"),
            udp((SERVER, 5353), (GATEWAY, 33500), b"injected to the client"),
        ] {
            let (verdict, out) = gw.run_on(wan0, &packet);
            assert_eq!((verdict, out), (gw.pass(), packet), "passed untouched, never translated");
        }
        assert_eq!(gw.counter(Counter::WrongInterface), 2);
        let (verdict, out) = gw.run(&udp((SERVER, 5353), (GATEWAY, 33500), b"a"));
        assert_eq!(verdict, gw.tx(), "the flow still works from its own side");
        assert_eq!(inspect(&out).dst, (CLIENT, 33500));
        assert_eq!(gw.counter(Counter::FlowCreated), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_wan_tuple_arriving_on_the_lan_is_not_translated(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_wan_tuple_arriving_on_the_lan_is_not_translated");
    with_datapath_in(mode, CONFIG, |gw| {
        let wan0 = gw.wan0;
        let (verdict, _) = gw.run_on(wan0, &syn((WAN_CLIENT, 50100), (PUBLIC, 80)));
        assert_eq!(verdict, gw.redirect());
        // The same tuple from a LAN host: not the WAN client's flow.
        let packet = flagged((WAN_CLIENT, 50100), (PUBLIC, 80), 0x10);
        let (verdict, out) = gw.run(&packet);
        assert_eq!((verdict, out), (gw.pass(), packet));
        assert_eq!(gw.counter(Counter::WrongInterface), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_half_evicted_flow_never_shares_its_port(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_half_evicted_flow_never_shares_its_port");
    with_datapath_in(mode, CONFIG, |gw| {
        let (_, out) = gw.run(&udp((CLIENT, 40300), (PUBLIC, 53), b"first"));
        assert_eq!(inspect(&out).src, (GATEWAY, 40300));
        // The table evicts the cold reply entry alone.
        let reply = key((SERVER, 5353), (GATEWAY, 40300), 17);
        assert_eq!(gw.datapath.maps.remove_flows(Table::New, &[reply]), 1);

        let mut second = udp((CLIENT_B, 40300), (PUBLIC, 53), b"second");
        second[6..12].copy_from_slice(&CLIENT_B_MAC);
        let (_, out) = gw.run(&second);
        let second_source = inspect(&out).src;
        assert_eq!(second_source, (GATEWAY, 40300), "the port is free again");

        let (verdict, out) = gw.run(&udp((CLIENT, 40300), (PUBLIC, 53), b"first again"));
        assert_eq!(verdict, gw.tx());
        assert_ne!(
            inspect(&out).src,
            second_source,
            "the first client's orphan entry must not send it from the second one's port"
        );
        assert_eq!(gw.counter(Counter::FlowOrphaned), 1);
        let (_, out) = gw.run(&udp((SERVER, 5353), second_source, b"to the second"));
        assert_eq!(inspect(&out).dst, (CLIENT_B, 40300), "replies reach the port's owner");
    });
}

#[rstest]
#[ignore = "needs root"]
fn generated_icmp_is_rate_limited(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("generated_icmp_is_rate_limited");
    let config = CONFIG.replace(
        "address = \"192.168.0.1\"",
        "address = \"192.168.0.1\"\nsnat_ports = \"20000-20000\"",
    );
    with_datapath_in(mode, &config, |gw| {
        gw.run(&syn((CLIENT, 41000), (PUBLIC, 80)));
        let mut answered = 0;
        for client_port in 41001..41201 {
            let (verdict, _) = gw.run(&syn((CLIENT, client_port), (PUBLIC, 80)));
            answered += (verdict == gw.tx()) as u64;
        }
        let limited = gw.counter(Counter::IcmpRateLimited);
        assert!(
            (hairpin_common::ratelimit::ICMP_BURST..200).contains(&answered),
            "{answered} of 200 refusals answered"
        );
        assert_eq!(answered + limited, 200, "every refusal is answered or dropped and counted");
        assert!(limited >= 100, "a burst of 200 in well under a second is limited: {limited}");
    });
}

#[test]
#[ignore = "needs root"]
fn expired_flows_are_absent_and_reclaimed() {
    require_root("expired_flows_are_absent_and_reclaimed");
    let config = format!("{CONFIG}\n[timeouts]\ntcp_opening = 1\ntcp_transitory = 1\nudp = 1\n");
    with_datapath(&config, |gw| {
        let client = (CLIENT, 40300);
        assert_eq!(gw.run(&syn(client, (PUBLIC, 80))).0, XDP_TX);
        assert_eq!(gw.run(&udp((CLIENT, 33500), (PUBLIC, 53), b"q")).0, XDP_TX);
        assert_eq!(gw.run(&udp((SERVER, 5353), (GATEWAY, 33500), b"a")).0, XDP_TX);

        // Timeouts are in whole seconds; this test is about time passing.
        std::thread::sleep(std::time::Duration::from_millis(2100));

        let ack = tcp(client, (PUBLIC, 80), false, true, 64);
        assert_eq!(
            gw.run(&ack),
            (XDP_PASS, ack.clone()),
            "an expired flow is absent: its ACK goes to the kernel"
        );
        assert_eq!(gw.counter(Counter::FlowExpired), 1, "removed by the datapath");
        assert_eq!(gw.flow_state(key(client, (PUBLIC, 80), 6)), None);

        let settings = hairpin::datapath::settings(&config.parse().unwrap());
        let reclaimed = gw
            .datapath
            .maps
            .reclaim_expired(&settings, hairpin::datapath::monotonic_coarse_ns())
            .expect("reclaim");
        assert_eq!(
            reclaimed,
            [0, 2],
            "the idle UDP flow's two entries, from the new-flow table (an answered query is no stream)"
        );
        assert!(gw.datapath.maps.conntrack(Table::New).unwrap().is_empty());

        assert_eq!(gw.run(&syn(client, (PUBLIC, 80))).0, XDP_TX, "the same tuple opens a new flow");
    });
}

#[test]
#[ignore = "needs root"]
fn reclaim_keeps_a_flow_reopened_after_it_read_the_table() {
    require_root("reclaim_keeps_a_flow_reopened_after_it_read_the_table");
    let config = format!("{CONFIG}\n[timeouts]\nudp = 1\n");
    with_datapath(&config, |gw| {
        let query = udp((CLIENT, 33600), (PUBLIC, 53), b"q");
        assert_eq!(gw.run(&query).0, XDP_TX);
        // Timeouts are in whole seconds; this test is about time passing.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let settings = hairpin::datapath::settings(&config.parse().unwrap());
        let now = monotonic_coarse_ns();
        let plan = gw.datapath.maps.reclaim_plan(&settings, now).expect("read the tables");
        assert_eq!(plan.expired[1].len(), 2, "reclaim read the expired flow's two entries");

        // Meanwhile the client sends again: the datapath removes the expired
        // flow and opens a new one under the same keys.
        assert_eq!(gw.run(&query).0, XDP_TX);
        assert_eq!(gw.counter(Counter::FlowCreated), 2);

        let removed = gw.datapath.maps.remove_if_still_expired(&plan, &settings, now);
        assert_eq!(removed, [0, 0], "the new flow is not the expired one reclaim read");
        let (verdict, out) = gw.run(&udp((SERVER, 5353), (GATEWAY, 33600), b"a"));
        assert_eq!(verdict, XDP_TX, "the reopened flow still translates");
        assert_eq!(inspect(&out).dst, (CLIENT, 33600));
    });
}

/// A withdrawn rule's id is not given to the next rule while a flow of it
/// lives (that flow's traffic would count under the next rule), and comes
/// back once a reclaim found no flow carrying it.
#[test]
#[ignore = "needs root"]
fn a_withdrawn_rules_id_comes_back_only_once_its_flows_are_gone() {
    require_root("a_withdrawn_rules_id_comes_back_only_once_its_flows_are_gone");
    let config = format!("{CONFIG}\n[timeouts]\nudp = 1\n");
    with_datapath(&config, |gw| {
        let rules = gw.datapath.maps.mapping_rules().expect("the published rules");
        let rule = rules
            .iter()
            .find(|rule| rule.mapping.public_ports.first == 53)
            .unwrap_or_else(|| panic!("no UDP rule in {rules:?}"))
            .clone();
        assert_eq!(gw.run(&udp((CLIENT, 33600), (PUBLIC, 53), b"q")).0, XDP_TX, "a flow");
        let (proto, public, ports) =
            (rule.mapping.proto, rule.mapping.public, rule.mapping.public_ports);
        let maps = &mut gw.datapath.maps;
        maps.remove_mapping(proto, public, ports).expect("withdraw the UDP rule");

        // A reclaim long after the withdrawal, but while the flow lives.
        let settings = hairpin::datapath::settings(&config.parse().unwrap());
        let later = monotonic_coarse_ns() + 3 * hairpin_common::mapping_ids::SETTLE_NS;
        let plan = maps.reclaim_plan(&settings, later).expect("read the tables");
        assert!(plan.ids_seen[usize::from(rule.id)], "the live flow carries the withdrawn id");
        assert_eq!(maps.free_retired_mapping_ids(&plan).expect("free ids"), 0);
        let next = maps.add_mapping(&rule.mapping).expect("publish it again");
        assert_ne!(next, rule.id, "the id of a rule whose flow lives was given out again");

        std::thread::sleep(std::time::Duration::from_millis(2100));
        let now = monotonic_coarse_ns();
        assert_eq!(maps.reclaim_expired(&settings, now).expect("reclaim"), [0, 2], "the flow");
        assert_eq!(maps.reclaim_expired(&settings, now).expect("reclaim"), [0, 0]);
        maps.remove_mapping(proto, public, ports).expect("withdraw it again");
        let last = maps.add_mapping(&rule.mapping).expect("publish it once more");
        assert_eq!(last, rule.id, "the lowest id, free again once its flow was gone");
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_servers_packet_too_big_for_the_wan_is_answered_or_dropped(
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("a_servers_packet_too_big_for_the_wan_is_answered_or_dropped");
    with_datapath_in(mode, CONFIG, |gw| {
        // The WAN link is smaller than the LAN's packets.
        ip(&["link", "set", "wan0", "mtu", "1400"]);
        let wan0 = gw.wan0;
        assert_eq!(gw.run_on(wan0, &udp((WAN_CLIENT, 50100), (PUBLIC, 53), b"q")).0, gw.redirect());
        let big = with_dont_fragment(udp((SERVER, 5353), (WAN_CLIENT, 50100), &[7u8; 1450]), true);
        let (verdict, out) = gw.run(&big);
        assert_eq!(verdict, gw.tx(), "answered, never forwarded untranslated");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (GATEWAY, SERVER), "from the router the server reached");
        assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1400, "the next-hop MTU");
        assert_eq!(quoted, big[14..14 + 28], "the server's own header");
        assert_eq!(gw.counter(Counter::FragNeededSent), 1);
        let small = udp((SERVER, 5353), (WAN_CLIENT, 50100), &[7u8; 1300]);
        assert_eq!(gw.run(&small).0, gw.redirect());
    });
}

fn with_dont_fragment(mut packet: Vec<u8>, dont_fragment: bool) -> Vec<u8> {
    if dont_fragment {
        packet[20] |= 0x40;
    } else {
        packet[20] &= !0x40;
    }
    fix_ipv4_checksum(&mut packet);
    packet
}

/// An ICMP error from `from` to `to` quoting `quoted` (an IPv4 packet,
/// without Ethernet header), as much as `quote_len` bytes of it.
fn icmp_error(
    from: [u8; 4],
    to: [u8; 4],
    icmp_type: u8,
    code: u8,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let quoted = &quoted[..quote_len.min(quoted.len())];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let check = hairpin_common::checksum::full(&icmp);
    icmp[2..4].copy_from_slice(&check.to_ne_bytes());
    let mut packet = SERVER_MAC.to_vec();
    packet.extend_from_slice(&GATEWAY_MAC);
    packet.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + icmp.len()) as u16;
    packet.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0]);
    packet[16..18].copy_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&from);
    packet.extend_from_slice(&to);
    fix_ipv4_checksum(&mut packet);
    packet.extend_from_slice(&icmp);
    packet
}

/// Checks the outer IPv4 and ICMP checksums and the quoted IPv4 header's;
/// returns (outer source, outer destination, quoted packet bytes).
fn inspect_icmp(packet: &[u8]) -> ([u8; 4], [u8; 4], Vec<u8>) {
    let ip = Ipv4HeaderSlice::from_slice(&packet[14..]).expect("outer IPv4");
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum(), "outer IPv4 checksum");
    assert_eq!(ip.protocol().0, 1, "ICMP");
    let icmp = &packet[34..];
    assert_eq!(hairpin_common::checksum::full(icmp), 0, "ICMP checksum is wrong");
    let quoted = &icmp[8..];
    let inner = Ipv4HeaderSlice::from_slice(quoted).expect("quoted IPv4");
    assert_eq!(
        inner.header_checksum(),
        inner.to_header().calc_header_checksum(),
        "quoted IPv4 checksum"
    );
    (ip.source(), ip.destination(), quoted.to_vec())
}

#[rstest]
#[case::whole_udp_header(28)]
#[case::the_whole_datagram(576)]
#[ignore = "needs root"]
fn icmp_port_unreachable_from_the_server_reaches_the_hairpin_client(
    #[case] quote_len: usize,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("icmp_port_unreachable_from_the_server_reaches_the_hairpin_client");
    with_datapath_in(mode, CONFIG, |gw| {
        let sent = udp((CLIENT, 33600), (PUBLIC, 53), b"anyone there?");
        let (verdict, delivered) = gw.run(&sent);
        assert_eq!(verdict, gw.tx());
        // The server has no socket on 5353: it reports on what it received.
        let error = icmp_error(SERVER, GATEWAY, 3, 3, &delivered[14..], quote_len);
        let (verdict, out) = gw.run(&error);
        assert_eq!(verdict, gw.tx(), "the error goes back to the client");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (PUBLIC, CLIENT), "as from the public address the client used");
        let client_sent = &sent[14..];
        assert_eq!(
            &quoted[12..20],
            &client_sent[12..20],
            "quoted addresses as the client sent them"
        );
        assert_eq!(quoted[8], client_sent[8] - 1, "quoted TTL as the server received it");
        assert_eq!(
            &quoted[20..28],
            &client_sent[20..28],
            "the quoted UDP header (ports and checksum) is the client's own"
        );
        if quote_len > 28 {
            assert_eq!(&quoted[28..], &client_sent[28..], "quoted payload untouched");
        }
        assert_eq!(gw.counter(Counter::IcmpTranslated), 1);
    });
}

#[rstest]
#[ignore = "needs root"]
fn icmp_time_exceeded_from_a_wan_router_reaches_the_server(
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("icmp_time_exceeded_from_a_wan_router_reaches_the_server");
    with_datapath_in(mode, CONFIG, |gw| {
        let wan0 = gw.wan0;
        assert_eq!(gw.run_on(wan0, &syn((WAN_CLIENT, 50200), (PUBLIC, 80))).0, gw.redirect());
        let server_sent = tcp((SERVER, 8080), (WAN_CLIENT, 50200), true, true, 64);
        let (verdict, forwarded) = gw.run(&server_sent);
        assert_eq!(verdict, gw.redirect());
        // A router upstream reports the reply's TTL expired, quoting 40 bytes.
        let error = icmp_error(UPSTREAM_ROUTER, WAN_CLIENT, 11, 0, &forwarded[14..], 48);
        let mut error = error;
        error[..6].copy_from_slice(&GATEWAY_WAN_MAC);
        // Addressed to the WAN client, but arriving here as the router's next hop would send it.
        let (verdict, out) = gw.run_on(wan0, &error);
        assert_eq!(verdict, gw.redirect(), "to the server, on the LAN");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (UPSTREAM_ROUTER, SERVER), "a router keeps its own address");
        assert_eq!(&quoted[12..20], &server_sent[14 + 12..14 + 20]);
        assert_eq!(
            &quoted[20..40],
            &server_sent[34..54],
            "quoted TCP header, checksum included, as the server sent it"
        );
    });
}

#[rstest]
#[case::no_flow(icmp_error(SERVER, GATEWAY, 3, 3, &udp((GATEWAY, 1), (SERVER, 2), b"x")[14..], 28), Counter::PassIcmpNoFlow)]
#[case::echo_request(icmp_error(CLIENT, GATEWAY, 8, 0, &[0; 8], 8), Counter::PassNotTcpUdp)]
#[case::truncated_quote(icmp_error(SERVER, GATEWAY, 3, 3, &udp((GATEWAY, 1), (SERVER, 2), b"x")[14..], 22), Counter::PassIcmpNoFlow)]
#[ignore = "needs root"]
fn icmp_that_belongs_to_no_flow_passes_untouched(
    #[case] packet: Vec<u8>,
    #[case] reason: Counter,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("icmp_that_belongs_to_no_flow_passes_untouched");
    with_datapath_in(mode, CONFIG, |gw| {
        let (verdict, out) = gw.run(&packet);
        assert_eq!((verdict, out), (gw.pass(), packet));
        assert_eq!(gw.counter(reason), 1, "counted as {}", reason.name());
    });
}

/// An ACK carrying `len` bytes, with or without DF.
fn big_tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), len: usize, dont_fragment: bool) -> Vec<u8> {
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_WAN_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 5000, 64240)
        .ack(1)
        .write(&mut packet, &vec![0x5a; len])
        .expect("build tcp");
    if dont_fragment {
        packet[20] |= 0x40;
    } else {
        packet[20] &= !0x40;
    }
    fix_ipv4_checksum(&mut packet);
    packet
}

/// A WAN client's handshake through the TCP port forward, arriving on wan0.
fn forwarded_handshake(gw: &mut Gateway, client: ([u8; 4], u16)) {
    let wan0 = gw.wan0;
    assert_eq!(gw.run_on(wan0, &syn(client, (PUBLIC, 80))).0, gw.redirect());
    assert_eq!(gw.run(&tcp((SERVER, 8080), client, true, true, 64)).0, gw.redirect());
    let ack = tcp(client, (PUBLIC, 80), false, true, 64);
    assert_eq!(gw.run_on(wan0, &ack).0, gw.redirect(), "handshake done");
}

#[test]
#[ignore = "needs root"]
fn too_big_towards_the_server_is_answered_with_fragmentation_needed() {
    require_root("too_big_towards_the_server_is_answered_with_fragmentation_needed");
    with_datapath(CONFIG, |gw| {
        ip(&["link", "set", "lan0", "mtu", "1400"]);
        let wan0 = gw.wan0;
        let client = (WAN_CLIENT, 50300);
        forwarded_handshake(gw, client);

        let big = big_tcp(client, (PUBLIC, 80), 1420, true);
        let (verdict, out) = gw.run_on(wan0, &big);
        assert_eq!(verdict, XDP_TX, "answered where it came from");
        assert_eq!(&out[0..6], &big[6..12], "back to the sender's MAC");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (PUBLIC, WAN_CLIENT), "from the address the client sent to");
        assert_eq!((out[34], out[35]), (3, 4), "destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1400, "the next-hop MTU");
        assert_eq!(quoted, big[14..14 + 28], "the sender's own header and 8 bytes");
        assert_eq!(gw.counter(Counter::FragNeededSent), 1);

        let may_fragment = big_tcp(client, (PUBLIC, 80), 1420, false);
        let (verdict, out) = gw.run_on(wan0, &may_fragment);
        assert_eq!(verdict, XDP_PASS, "handed to TC to be cut into fragments");
        let (meta, out) = out.split_at(size_of::<TcHandoff>());
        let handoff: TcHandoff = bytemuck::pod_read_unaligned(meta);
        assert_eq!(handoff.magic, TC_HANDOFF_MAGIC, "metadata for TC");
        assert_eq!((handoff.mtu, handoff.queued), (1400, 0), "cut to the LAN's MTU");
        assert_eq!(inspect(out).dst, (SERVER, 8080), "translated, not the gateway's own");
        assert_eq!(&out[0..6], &SERVER_MAC, "addressed to the next hop");
        assert_eq!(gw.counter(Counter::TooBigDropped), 0);
    });
}

/// A second public address that is not assigned to the gateway (routed to
/// it), and TCP and UDP published on the same port to different places.
#[rstest]
#[case::unassigned_address_tcp(6, ([198, 51, 100, 10], 443), 8443)]
#[case::same_port_tcp(6, (PUBLIC, 80), 8080)]
#[case::same_port_udp(17, (PUBLIC, 80), 8081)]
#[ignore = "needs root"]
fn mappings_by_address_protocol_and_port(
    #[case] proto: u8,
    #[case] public: ([u8; 4], u16),
    #[case] server_port: u16,
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("mappings_by_address_protocol_and_port");
    with_datapath_in(mode, CONFIG, |gw| {
        let (from_lan, from_wan) = if proto == 6 {
            (syn((CLIENT, 40400), public), syn((WAN_CLIENT, 50400), public))
        } else {
            (udp((CLIENT, 40400), public, b"l"), udp((WAN_CLIENT, 50400), public, b"w"))
        };
        let (verdict, out) = gw.run(&from_lan);
        assert_eq!(verdict, gw.tx(), "hairpin");
        assert_eq!(inspect(&out).dst, (SERVER, server_port));
        let wan0 = gw.wan0;
        let (verdict, out) = gw.run_on(wan0, &from_wan);
        assert_eq!(verdict, gw.redirect(), "port forward");
        assert_eq!(inspect(&out).dst, (SERVER, server_port));
    });
}

/// The server's MAC address after it "moved".
const SERVER_NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];

/// Changes the server's neighbour entry in the calling thread's namespace.
fn move_server_to(new_mac: [u8; 6]) {
    let addr = Ipv4Addr::from(SERVER).to_string();
    let status = std::process::Command::new("ip")
        .args(["neigh", "replace", &addr, "lladdr", &mac(new_mac), "dev", "lan0"])
        .args(["nud", "permanent"])
        .status();
    assert!(status.expect("ip neigh").success(), "changing the server's neighbour entry");
}

/// An established UDP flow client → public address → server; its next
/// client packet.
fn established_udp_flow(gw: &mut Gateway, client_port: u16) -> Vec<u8> {
    let first = udp((CLIENT, client_port), (PUBLIC, 53), b"query");
    assert_eq!(gw.run(&first).0, gw.tx(), "the flow's first packet");
    let reply = udp((SERVER, 5353), (GATEWAY, client_port), b"answer");
    assert_eq!(gw.run(&reply).0, gw.tx(), "the server's reply");
    first
}

/// What a busy LAN says on rtnetlink all day (neighbours confirmed again,
/// IPv6 neighbour discovery, neighbours of interfaces hairpin does not
/// manage) does not make the cached routes stale; a neighbour that moves
/// does.
#[test]
#[ignore = "needs root"]
fn neighbour_chatter_that_changes_no_lookup_keeps_the_cache() {
    require_root("neighbour_chatter_that_changes_no_lookup_keeps_the_cache");
    with_datapath(CONFIG, |gw| {
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip").args(args).status();
            assert!(status.expect("ip").success(), "ip {}", args.join(" "));
        };
        ip(&["link", "add", "other9", "type", "veth", "peer", "name", "other9p"]);
        for end in ["other9", "other9p"] {
            let sysctl = format!("net.ipv6.conf.{end}.disable_ipv6=1");
            let status = std::process::Command::new("sysctl").args(["-qw", &sysctl]).status();
            assert!(status.expect("sysctl").success(), "{sysctl}");
            ip(&["link", "set", end, "up"]);
        }
        // The new link's own notifications pass before the keeper listens.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut keeper = RouteCacheKeeper::start(&gw.datapath.maps).expect("route cache keeper");
        let neighbour = ["neigh", "replace", "192.168.0.77", "lladdr", "02:00:00:00:00:77"];
        let steps: [(&[&str], bool, &str); 5] = [
            (&[&neighbour[..], &["dev", "lan0"]].concat(), true, "a LAN neighbour heard of"),
            (&[&neighbour[..], &["dev", "lan0"]].concat(), false, "the same, confirmed"),
            (
                &["neigh", "replace", "10.9.9.9", "lladdr", "02:00:00:00:00:99", "dev", "other9"],
                false,
                "a neighbour of an unmanaged interface",
            ),
            (
                &[
                    "-6",
                    "neigh",
                    "replace",
                    "fe80::77",
                    "lladdr",
                    "02:00:00:00:00:77",
                    "dev",
                    "lan0",
                ],
                false,
                "IPv6 neighbour discovery",
            ),
            (
                &["neigh", "replace", "192.168.0.77", "lladdr", "02:00:00:00:00:78", "dev", "lan0"],
                true,
                "the LAN neighbour moved to another MAC address",
            ),
        ];
        for (args, stale, what) in steps {
            ip(args);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let changed = keeper.on_changes().expect("read the change notifications");
            assert_eq!(changed, stale, "{what}: the cache made stale?");
        }
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_flows_route_is_cached_until_a_change_is_announced(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_flows_route_is_cached_until_a_change_is_announced");
    with_datapath_in(mode, CONFIG, |gw| {
        let mut keeper = RouteCacheKeeper::start(&gw.datapath.maps).expect("route cache keeper");
        let packet = established_udp_flow(gw, 41000);
        let lookups_before = gw.counter(Counter::RouteCached);
        for n in 0..10 {
            let (verdict, out) = gw.run(&packet);
            assert_eq!(verdict, gw.tx(), "packet {n}");
            assert_eq!(inspect(&out).dst_mac, SERVER_MAC, "packet {n}");
        }
        assert_eq!(
            gw.counter(Counter::RouteCached) - lookups_before,
            1,
            "ten packets of one flow: looked up and cached once"
        );

        move_server_to(SERVER_NEW_MAC);
        assert!(
            keeper.on_changes().expect("read the change notifications"),
            "the neighbour change is announced on rtnetlink"
        );
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, gw.tx());
        assert_eq!(
            inspect(&out).dst_mac,
            SERVER_NEW_MAC,
            "after a change, the flow's next packet goes where the kernel now says"
        );
        assert_eq!(gw.counter(Counter::RouteCached) - lookups_before, 2, "looked up again");
    });
}

#[rstest]
#[ignore = "needs root"]
fn a_route_change_moves_a_cached_flow_to_the_new_next_hop(
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("a_route_change_moves_a_cached_flow_to_the_new_next_hop");
    const OTHER_ROUTER: &str = "203.0.113.253";
    const OTHER_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfd];
    with_datapath_in(mode, CONFIG, |gw| {
        let mut keeper = RouteCacheKeeper::start(&gw.datapath.maps).expect("route cache keeper");
        let client = (WAN_CLIENT, 50700);
        assert_eq!(gw.run_on(gw.wan0, &syn(client, (PUBLIC, 80))).0, gw.redirect());
        assert_eq!(gw.run(&tcp((SERVER, 8080), client, true, true, 64)).0, gw.redirect());
        let from_server = tcp((SERVER, 8080), client, false, true, 64);
        for _ in 0..3 {
            let (verdict, out) = gw.run(&from_server);
            assert_eq!(verdict, gw.redirect(), "the server's packets go out of wan0");
            assert_eq!(inspect(&out).dst_mac, UPSTREAM_MAC, "through the upstream router");
        }
        let lookups_before = gw.counter(Counter::RouteCached);

        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip").args(args).status();
            assert!(status.expect("ip").success(), "ip {}", args.join(" "));
        };
        ip(&["neigh", "replace", OTHER_ROUTER, "lladdr", &mac(OTHER_ROUTER_MAC), "dev", "wan0"]);
        keeper.on_changes().expect("read the change notifications");
        let (_, out) = gw.run(&from_server);
        assert_eq!(inspect(&out).dst_mac, UPSTREAM_MAC, "a new neighbour alone changes no route");

        ip(&["route", "replace", "198.51.100.0/24", "via", OTHER_ROUTER]);
        assert!(
            keeper.on_changes().expect("read the change notifications"),
            "the route change is announced on rtnetlink"
        );
        let (verdict, out) = gw.run(&from_server);
        assert_eq!(verdict, gw.redirect());
        assert_eq!(
            inspect(&out).dst_mac,
            OTHER_ROUTER_MAC,
            "after the route changed, the flow's next packet goes to the new next hop"
        );
        assert!(gw.counter(Counter::RouteCached) > lookups_before, "looked up again");
    });
}

/// Without a keeper watching for changes (stopped, or a killed daemon's
/// deadline passed), every packet is looked up: changes apply at once.
#[rstest]
#[case::stopped(false)]
#[case::lapsed(true)]
#[ignore = "needs root"]
fn without_a_keeper_every_packet_is_looked_up(#[case] lapse: bool) {
    require_root("without_a_keeper_every_packet_is_looked_up");
    with_datapath(CONFIG, |gw| {
        let keeper = RouteCacheKeeper::start(&gw.datapath.maps).expect("route cache keeper");
        let packet = established_udp_flow(gw, 41001);
        let (_, out) = gw.run(&packet);
        assert_eq!(inspect(&out).dst_mac, SERVER_MAC);
        if lapse {
            // What a killed keeper leaves: the deadline it last set.
            let cache = gw.datapath.maps.route_cache().expect("route cache");
            let soon = monotonic_coarse_ns() + 50_000_000;
            let lapsing = RouteCache { valid_until_ns: soon, ..cache };
            gw.datapath.maps.set_route_cache(lapsing).expect("set the deadline");
            std::mem::forget(keeper);
            std::thread::sleep(std::time::Duration::from_millis(100));
        } else {
            keeper.stop().expect("stop the keeper");
        }
        let lookups_before = gw.counter(Counter::RouteCached);

        move_server_to(SERVER_NEW_MAC);
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(inspect(&out).dst_mac, SERVER_NEW_MAC, "the change applies at once");
        assert_eq!(gw.counter(Counter::RouteCached), lookups_before, "nothing more is cached");
    });
}

#[test]
#[ignore = "needs root"]
fn a_packet_larger_than_the_cached_route_allows_is_looked_up() {
    require_root("a_packet_larger_than_the_cached_route_allows_is_looked_up");
    with_datapath(CONFIG, |gw| {
        ip(&["link", "set", "lan0", "mtu", "1400"]);
        let _keeper = RouteCacheKeeper::start(&gw.datapath.maps).expect("route cache keeper");
        let client = (WAN_CLIENT, 50600);
        assert_eq!(gw.run_on(gw.wan0, &syn(client, (PUBLIC, 80))).0, XDP_REDIRECT);
        let reply = tcp((SERVER, 8080), client, true, true, 64);
        assert_eq!(gw.run(&reply).0, XDP_REDIRECT, "the server's SYN-ACK");
        let ack = tcp(client, (PUBLIC, 80), false, true, 64);
        for _ in 0..2 {
            assert_eq!(gw.run_on(gw.wan0, &ack).0, XDP_REDIRECT, "small packets are forwarded");
        }
        assert!(gw.counter(Counter::RouteCached) >= 1, "the flow's route is cached");

        let big = big_tcp(client, (PUBLIC, 80), 1420, true);
        let (verdict, out) = gw.run_on(gw.wan0, &big);
        assert_eq!(verdict, XDP_TX, "answered, not forwarded over the cached route");
        assert_eq!((out[34], out[35]), (3, 4), "destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1400, "the next-hop MTU");
        assert_eq!(gw.counter(Counter::FragNeededSent), 1);
    });
}

/// A UDP datagram of `len` payload bytes with IP ID `id`.
fn big_udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), len: usize, id: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut packet = udp(src, dst, &payload);
    packet[18..20].copy_from_slice(&id.to_be_bytes());
    fix_ipv4_checksum(&mut packet);
    packet
}

/// Checks a fragment's IPv4 checksum; its addresses and offset in bytes.
fn inspect_fragment(fragment: &[u8]) -> ([u8; 4], [u8; 4], usize) {
    let ip = Ipv4HeaderSlice::from_slice(&fragment[14..]).expect("IPv4 header");
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum(), "IPv4 checksum");
    (ip.source(), ip.destination(), ip.fragments_offset().byte_offset() as usize)
}

/// The datagram the translated fragments make up again, every checksum
/// checked (the UDP one covers the whole datagram).
fn reassembled(fragments: &[Vec<u8>]) -> Seen {
    let mut sorted: Vec<&Vec<u8>> = fragments.iter().collect();
    sorted.sort_by_key(|fragment| inspect_fragment(fragment).2);
    let mut packet = sorted[0][..34].to_vec();
    for fragment in &sorted {
        let (_, _, offset) = inspect_fragment(fragment);
        assert_eq!(packet.len() - 34, offset, "the fragments follow each other");
        packet.extend_from_slice(&fragment[34..]);
    }
    let tot_len = (packet.len() - 14) as u16;
    packet[16..18].copy_from_slice(&tot_len.to_be_bytes());
    let mut packet = with_frag_off(packet, 0);
    packet[22] = sorted[0][22];
    fix_ipv4_checksum(&mut packet);
    inspect(&packet)
}

#[rstest]
#[ignore = "needs root"]
fn a_hairpinned_datagrams_fragments_are_translated_by_its_first_both_ways(
    #[values(Mode::Xdp, Mode::Tc)] mode: Mode,
) {
    require_root("a_hairpinned_datagrams_fragments_are_translated_by_its_first_both_ways");
    with_datapath_in(mode, CONFIG, |gw| {
        let query = ipv4_fragments(&big_udp((CLIENT, 40100), (PUBLIC, 53), 3000, 7), 1480);
        assert_eq!(query.len(), 3);
        let mut sent = Vec::new();
        for (index, fragment) in query.iter().enumerate() {
            let (verdict, out) = gw.run(fragment);
            assert_eq!(verdict, gw.tx(), "fragment {index} sent back out to the server");
            let (src, dst, _) = inspect_fragment(&out);
            assert_eq!((src, dst), (GATEWAY, SERVER), "fragment {index} translated");
            assert_eq!(&out[0..6], &SERVER_MAC);
            sent.push(out);
        }
        let seen = reassembled(&sent);
        assert_eq!(seen.dst, (SERVER, 5353), "the datagram reaches the server whole");
        assert_eq!(seen.src.0, GATEWAY);
        assert_eq!(gw.counter(Counter::FragmentTranslated), 2);

        let snat_port = seen.src.1;
        let answer = ipv4_fragments(&big_udp((SERVER, 5353), (GATEWAY, snat_port), 8000, 9), 1480);
        assert_eq!(answer.len(), 6);
        let sent: Vec<Vec<u8>> = answer
            .iter()
            .map(|fragment| {
                let (verdict, out) = gw.run(fragment);
                assert_eq!(verdict, gw.tx(), "the answer's fragments go back to the client");
                out
            })
            .collect();
        let seen = reassembled(&sent);
        assert_eq!((seen.src, seen.dst), ((PUBLIC, 53), (CLIENT, 40100)));
        assert_eq!(gw.counter(Counter::FragmentTranslated), 7);
    });
}

#[test]
#[ignore = "needs root"]
fn fragments_that_come_before_their_first_are_held_and_released_with_it() {
    require_root("fragments_that_come_before_their_first_are_held_and_released_with_it");
    with_datapath(CONFIG, |gw| {
        let query = ipv4_fragments(&big_udp((CLIENT, 40200), (PUBLIC, 53), 4000, 11), 1480);
        for fragment in query[1..].iter().rev() {
            let (verdict, _) = gw.run(fragment);
            assert_eq!(verdict, XDP_DROP, "held, never passed untranslated");
        }
        assert_eq!(gw.counter(Counter::FragmentHeld), 2);
        let (verdict, out) = gw.run(&query[0]);
        assert_eq!(verdict, XDP_PASS, "handed to TC, which sends the held ones after it");
        let (meta, out) = out.split_at(size_of::<TcHandoff>());
        let release: TcHandoff = bytemuck::pod_read_unaligned(meta);
        assert_eq!(release.magic, TC_HANDOFF_MAGIC);
        assert_eq!((release.queued, release.flags), (2, 0), "two held, sent translated");
        let (src, dst, _) = inspect_fragment(out);
        assert_eq!((src, dst), (GATEWAY, SERVER), "the first fragment is translated");
        let held = gw.datapath.maps.fragments().expect("fragments");
        let entry = held.iter().find(|(key, _)| key.id == 11u16.to_be()).expect("the datagram");
        assert_eq!(entry.1.verdict, FRAGMENT_TRANSLATED, "its later fragments are translated");
        // A duplicate of a later fragment, after the first: translated now.
        let (verdict, out) = gw.run(&query[2]);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(inspect_fragment(&out).1, SERVER);
    });
}

#[test]
#[ignore = "needs root"]
fn fragments_of_no_flow_go_to_the_kernel_untouched_in_any_order() {
    require_root("fragments_of_no_flow_go_to_the_kernel_untouched_in_any_order");
    with_datapath(CONFIG, |gw| {
        let other = ipv4_fragments(&big_udp((CLIENT, 40300), (PUBLIC, 54), 3000, 21), 1480);
        let (verdict, _) = gw.run(&other[2]);
        assert_eq!(verdict, XDP_DROP, "held until its first fragment says whose it is");
        let (verdict, out) = gw.run(&other[0]);
        assert_eq!(verdict, XDP_PASS);
        let (meta, out) = out.split_at(size_of::<TcHandoff>());
        let release: TcHandoff = bytemuck::pod_read_unaligned(meta);
        assert_eq!(
            (release.queued, release.flags),
            (1, HANDOFF_TO_KERNEL),
            "the held one to the kernel too"
        );
        assert!(out == other[0], "the first fragment to the kernel as it came");
        let (verdict, out) = gw.run(&other[1]);
        assert!((verdict, &out) == (XDP_PASS, &other[1]), "a later one after it, as it came");
        assert_eq!(gw.counter(Counter::PassFragment), 1, "the later one, after its first");
        assert_eq!(gw.counter(Counter::FlowCreated), 0);
    });
}

#[test]
#[ignore = "needs root"]
fn a_datagrams_translation_lapses_and_binds_to_its_interface() {
    require_root("a_datagrams_translation_lapses_and_binds_to_its_interface");
    with_datapath(CONFIG, |gw| {
        let query = ipv4_fragments(&big_udp((CLIENT, 40400), (PUBLIC, 53), 3000, 31), 1480);
        assert_eq!(gw.run(&query[0]).0, XDP_TX);
        let wan0 = gw.wan0;
        let (verdict, _) = gw.run_on(wan0, &query[1]);
        assert_eq!(verdict, XDP_DROP, "another interface's: no flow's, and never passed as it is");
        assert_eq!(gw.counter(Counter::WrongInterface), 1);

        let key = FragmentKey::new(
            u32::from_ne_bytes(CLIENT),
            u32::from_ne_bytes(PUBLIC),
            31u16.to_be(),
            17,
        );
        let (_, entry) = gw
            .datapath
            .maps
            .fragments()
            .expect("fragments")
            .into_iter()
            .find(|(k, _)| *k == key)
            .expect("the datagram");
        let aged = FragmentEntry { created_ns: monotonic_coarse_ns() - 3_000_000_000, ..entry };
        gw.datapath.maps.put_fragment(&key, &aged);
        let (verdict, _) = gw.run(&query[1]);
        assert_eq!(verdict, XDP_DROP, "past its lifetime: held as a new datagram's");
        assert_eq!(gw.counter(Counter::FragmentTranslated), 0);
    });
}

#[test]
#[ignore = "needs root"]
fn the_fragment_table_is_bounded() {
    require_root("the_fragment_table_is_bounded");
    with_datapath(CONFIG, |gw| {
        let first =
            |id: u16| ipv4_fragments(&big_udp((CLIENT, 40500), (PUBLIC, 53), 1600, id), 1480);
        let extra = 500;
        for id in 0..(MAX_FRAGMENTED_DATAGRAMS + extra) as u16 {
            assert_eq!(gw.run(&first(id)[0]).0, XDP_TX, "datagram {id}");
        }
        let known = gw.datapath.maps.fragments().expect("fragments").len();
        assert!(
            known <= MAX_FRAGMENTED_DATAGRAMS as usize,
            "{known} datagrams kept, more than the table's {MAX_FRAGMENTED_DATAGRAMS}"
        );
        let newest = (MAX_FRAGMENTED_DATAGRAMS + extra - 1) as u16;
        let (verdict, out) = gw.run(&first(newest)[1]);
        assert_eq!(verdict, XDP_TX, "the newest datagram is kept");
        assert_eq!(inspect_fragment(&out).1, SERVER);
    });
}

#[test]
#[ignore = "needs root"]
fn a_later_fragment_too_big_for_the_egress_is_cut_again() {
    require_root("a_later_fragment_too_big_for_the_egress_is_cut_again");
    with_datapath(CONFIG, |gw| {
        ip(&["link", "set", "lan0", "mtu", "1400"]);
        let wan0 = gw.wan0;
        let query = ipv4_fragments(&big_udp((WAN_CLIENT, 50500), (PUBLIC, 53), 2000, 41), 1376);
        let small_first = with_frag_off(query[0].clone(), 0x2000);
        assert_eq!(gw.run_on(wan0, &small_first).0, XDP_REDIRECT);
        let big_later = ipv4_fragments(&big_udp((WAN_CLIENT, 50500), (PUBLIC, 53), 3000, 41), 1480);
        let (verdict, out) = gw.run_on(wan0, &big_later[1]);
        assert_eq!(verdict, XDP_PASS, "handed to TC to be cut for the LAN");
        let (meta, out) = out.split_at(size_of::<TcHandoff>());
        let handoff: TcHandoff = bytemuck::pod_read_unaligned(meta);
        assert_eq!((handoff.magic, handoff.mtu), (TC_HANDOFF_MAGIC, 1400));
        let (src, dst, offset) = inspect_fragment(out);
        assert_eq!((src, dst, offset), (WAN_CLIENT, SERVER, 1480), "translated, offset kept");
        assert_eq!(gw.counter(Counter::FragmentTranslated), 1);
    });
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

#[rstest]
#[ignore = "needs root"]
fn a_flows_packet_with_no_route_is_dropped_not_passed(#[values(Mode::Xdp, Mode::Tc)] mode: Mode) {
    require_root("a_flows_packet_with_no_route_is_dropped_not_passed");
    with_datapath_in(mode, CONFIG, |gw| {
        let packet = udp((CLIENT, 40600), (PUBLIC, 53), b"q");
        assert_eq!(gw.run(&packet).0, gw.tx());
        ip(&["route", "add", "prohibit", "192.168.0.2/32"]);
        let (verdict, _) = gw.run(&packet);
        assert_eq!(verdict, gw.drop_verdict(), "never passed to the kernel untranslated");
        assert_eq!(gw.counter(Counter::RouteFailed), 1);
        let (verdict, _) = gw.run(&udp((CLIENT, 40601), (PUBLIC, 53), b"q"));
        assert_eq!(verdict, gw.drop_verdict(), "nor is a new flow's first packet");
        assert_eq!(gw.counter(Counter::RouteFailed), 2);
        assert_eq!(gw.counter(Counter::FlowCreated), 1, "no state for the unroutable flow");
    });
}

#[test]
#[ignore = "needs root"]
fn a_route_through_an_interface_hairpin_does_not_manage_goes_through_the_kernel_translated() {
    require_root(
        "a_route_through_an_interface_hairpin_does_not_manage_goes_through_the_kernel_translated",
    );
    with_datapath(CONFIG, |gw| {
        ip(&["link", "add", "lan9", "type", "veth", "peer", "name", "lan9p"]);
        ip(&["link", "set", "lan9", "up"]);
        ip(&["link", "set", "lan9p", "up"]);
        ip(&["addr", "add", "10.9.0.1/24", "dev", "lan9"]);
        ip(&[
            "neigh",
            "replace",
            "10.9.0.2",
            "lladdr",
            "02:00:00:00:09:02",
            "dev",
            "lan9",
            "nud",
            "permanent",
        ]);
        ip(&["route", "add", "192.168.0.2/32", "via", "10.9.0.2", "dev", "lan9"]);
        let packet = udp((CLIENT, 40700), (PUBLIC, 53), b"q");
        let (verdict, out) = gw.run(&packet);
        assert_eq!(verdict, XDP_PASS, "for TC's bpf_redirect_neigh");
        let (meta, out) = out.split_at(size_of::<hairpin_common::NeighRedirect>());
        assert_eq!(meta[..4], hairpin_common::NEIGH_REDIRECT_MAGIC.to_ne_bytes());
        let lan9 = hairpin::datapath::if_index("lan9").expect("lan9");
        assert_eq!(u32::from_ne_bytes(meta[4..8].try_into().unwrap()), lan9, "out of lan9");
        assert_eq!(inspect(out).dst, (SERVER, 5353), "translated before it is handed over");
        assert_eq!(gw.counter(Counter::NeighRedirected), 1);
    });
}

#[test]
#[ignore = "needs root"]
fn an_icmp_redirect_about_a_flow_is_translated() {
    require_root("an_icmp_redirect_about_a_flow_is_translated");
    with_datapath(CONFIG, |gw| {
        let sent = udp((CLIENT, 40800), (PUBLIC, 53), b"q");
        let (verdict, delivered) = gw.run(&sent);
        assert_eq!(verdict, XDP_TX);
        let redirect = icmp_error(SERVER, GATEWAY, 5, 1, &delivered[14..], 28);
        let (verdict, out) = gw.run(&redirect);
        assert_eq!(verdict, XDP_TX, "translated like the other errors, not passed");
        let (src, dst, quoted) = inspect_icmp(&out);
        assert_eq!((src, dst), (PUBLIC, CLIENT));
        assert_eq!(&quoted[12..20], &sent[26..34], "the client's own addresses quoted");
        assert_eq!(gw.counter(Counter::IcmpTranslated), 1);
    });
}

#[test]
#[ignore = "needs root"]
fn an_icmp_error_about_a_flow_whose_ttl_expires_is_dropped() {
    require_root("an_icmp_error_about_a_flow_whose_ttl_expires_is_dropped");
    with_datapath(CONFIG, |gw| {
        let (verdict, delivered) = gw.run(&udp((CLIENT, 40900), (PUBLIC, 53), b"q"));
        assert_eq!(verdict, XDP_TX);
        let error = with_ttl(icmp_error(SERVER, GATEWAY, 3, 3, &delivered[14..], 28), 1);
        let (verdict, _) = gw.run(&error);
        assert_eq!(verdict, XDP_DROP, "no error about an error, and never passed untranslated");
        assert_eq!(gw.counter(Counter::TtlExpiredDropped), 1);
    });
}

#[test]
#[ignore = "needs root"]
fn an_early_fragment_that_cannot_be_a_flows_passes_as_it_came() {
    require_root("an_early_fragment_that_cannot_be_a_flows_passes_as_it_came");
    with_datapath(CONFIG, |gw| {
        // A LAN host's datagram to the internet, neither from a server nor to
        // a public or the gateway's address: the kernel's to route.
        let transit = ipv4_fragments(&big_udp((CLIENT, 41000), (OUTSIDER, 53), 3000, 51), 1480);
        let (verdict, out) = gw.run(&transit[2]);
        assert!((verdict, &out) == (XDP_PASS, &transit[2]), "untouched, not held");
        assert_eq!(gw.counter(Counter::PassFragment), 1);
        assert_eq!(gw.counter(Counter::FragmentHeld), 0);
        // From a server it may be a port forward's reply: held.
        let reply = ipv4_fragments(&big_udp((SERVER, 5353), (OUTSIDER, 41001), 3000, 52), 1480);
        assert_eq!(gw.run(&reply[2]).0, XDP_DROP);
        assert_eq!(gw.counter(Counter::FragmentHeld), 1);
    });
}

#[test]
#[ignore = "needs root"]
fn tc_sends_a_packet_to_an_unresolved_next_hop_with_redirect_neigh() {
    require_root("tc_sends_a_packet_to_an_unresolved_next_hop_with_redirect_neigh");
    with_datapath_in(Mode::Tc, CONFIG, |gw| {
        let (verdict, out) = gw.run(&syn((CLIENT, 40030), (PUBLIC, 81)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "bpf_redirect_neigh resolves the next hop");
        assert_eq!(gw.counter(Counter::NeighRedirected), 1);
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst), ((GATEWAY, 40030), (UNRESOLVED_SERVER, 80)));
        assert_eq!(seen.ttl, 63, "translated by the same program, no metadata");
    });
}

#[test]
#[ignore = "needs root"]
fn tc_cuts_a_packet_too_big_without_dont_fragment() {
    require_root("tc_cuts_a_packet_too_big_without_dont_fragment");
    with_datapath_in(Mode::Tc, CONFIG, |gw| {
        ip(&["link", "set", "lan0", "mtu", "1400"]);
        let wan0 = gw.wan0;
        let client = (WAN_CLIENT, 50320);
        forwarded_handshake(gw, client);

        let may_fragment = big_tcp(client, (PUBLIC, 80), 1420, false);
        let (verdict, _) = gw.run_on(wan0, &may_fragment);
        assert_eq!(verdict, TC_ACT_SHOT, "sent as fragments; the skb itself is not");
        assert_eq!(gw.counter(Counter::PacketFragmented), 1, "cut in TC");
        assert_eq!(gw.counter(Counter::TooBigDropped), 0);
    });
}
