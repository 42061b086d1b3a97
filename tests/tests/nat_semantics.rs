//! NAT semantics end to end, differentially: each scenario runs once with
//! the seed's iptables rules (plus netfilter port forwards from the WAN) and
//! once with hairpin alone. The endpoints must see the same results either
//! way, and with hairpin none of the flows' packets may reach netfilter.
//! Then fault tests, hairpin only: a flood of new flows, SNAT port
//! exhaustion.

use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::mpsc,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use hairpin_tests::{
    Netns,
    apps::{
        BIG_LEN, Servers, TcpEcho, big_body, connected_udp, echo_round_trip, http_get,
        http_request, tcp_connect, udp_echo,
    },
    daemon::Daemon,
    differential::{Bed, HTTP_PORT, Nat, UDP_SERVER_PORT, counter, public},
    raw::PacketSocket,
    require_root,
    seed::{
        ConfigOptions, DatapathCase, GATEWAY_LAN, GATEWAY_LAN_IF, GATEWAY_WAN_IF, PUBLIC, SeedBed,
        WAN_HOST,
    },
};
use rstest::rstest;

/// The native XDP bed, native XDP.
const XDP_BED: DatapathCase = DatapathCase::Xdp;
/// The container-host bed, `attach = "auto"` when hairpin is the NAT.
const CONTAINER: DatapathCase = DatapathCase::AutoContainer;

const UDP_PUBLIC_PORT: u16 = 53;
/// Published over UDP, but nothing listens on the server: it answers ICMP
/// port unreachable.
const CLOSED_UDP_PORT: u16 = 5000;
const ECHO_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// The services every differential scenario publishes.
const MAPPINGS: &[(&str, &str, &str)] = &[
    ("tcp", "203.0.113.1:80", "192.168.0.2:80"),
    ("udp", "203.0.113.1:53", "192.168.0.2:5353"),
    ("udp", "203.0.113.1:5000", "192.168.0.2:5000"),
];

/// `GET /` through the public address; the peer address the server saw.
fn peer_seen_over_tcp(from: &Netns, role: &str, nat: Nat) -> String {
    let (status, body) = http_get(from, public(HTTP_PORT), "/", TIMEOUT)
        .unwrap_or_else(|e| panic!("{role}: GET / via {PUBLIC}:{HTTP_PORT} failed ({nat:?}): {e}"));
    assert_eq!(status, "HTTP/1.0 200 OK", "{role}: status ({nat:?})");
    let body = String::from_utf8_lossy(&body).to_string();
    body.strip_prefix("hello ")
        .unwrap_or_else(|| panic!("{role}: unexpected body ({nat:?}): {body}"))
        .trim()
        .to_string()
}

/// A UDP echo through the public address; the peer address the server saw.
fn peer_seen_over_udp(from: &Netns, role: &str, nat: Nat) -> String {
    let payload = format!("ping from {role}");
    let reply = udp_echo(from, public(UDP_PUBLIC_PORT), payload.as_bytes(), TIMEOUT)
        .unwrap_or_else(|e| {
            panic!("{role}: UDP echo via {PUBLIC}:{UDP_PUBLIC_PORT} failed ({nat:?}): {e}")
        });
    let reply = String::from_utf8_lossy(&reply).to_string();
    reply
        .strip_suffix(&format!(" {payload}"))
        .unwrap_or_else(|| panic!("{role}: the echo lost the payload ({nat:?}): {reply}"))
        .to_string()
}

fn addr_of(peer: &str) -> Ipv4Addr {
    peer.parse::<SocketAddrV4>()
        .unwrap_or_else(|e| panic!("`{peer}` is not the address:port the server saw: {e}"))
        .ip()
        .to_owned()
}

/// LAN hosts, the server included, reach the server through the public
/// address; the server sees the gateway's LAN address (SNAT), so its
/// replies come back through the gateway.
#[rstest]
#[case::iptables(Nat::Iptables)]
#[case::hairpin(Nat::Hairpin)]
#[ignore = "needs root"]
fn lan_hosts_reach_the_server_through_the_public_address(#[case] nat: Nat) {
    require_root("lan_hosts_reach_the_server_through_the_public_address");
    let mut bed = Bed::new(nat);
    bed.start_nat(MAPPINGS, None);
    for (from, role) in [(&bed.seed.client, "client"), (&bed.seed.server, "server")] {
        let tcp_peer = peer_seen_over_tcp(from, role, nat);
        assert_eq!(
            addr_of(&tcp_peer),
            GATEWAY_LAN,
            "{role}: over TCP the server should see the gateway's LAN address ({nat:?})"
        );
        let udp_peer = peer_seen_over_udp(from, role, nat);
        assert_eq!(
            addr_of(&udp_peer),
            GATEWAY_LAN,
            "{role}: over UDP the server should see the gateway's LAN address ({nat:?})"
        );
    }
    bed.finish();
}

/// The WAN host reaches the published services; the server sees its real
/// address (no SNAT) and answers through its default gateway.
#[rstest]
#[case::iptables(Nat::Iptables)]
#[case::hairpin(Nat::Hairpin)]
#[ignore = "needs root"]
fn wan_port_forward_keeps_the_client_address(#[case] nat: Nat) {
    require_root("wan_port_forward_keeps_the_client_address");
    let mut bed = Bed::new(nat);
    bed.start_nat(MAPPINGS, None);
    let tcp_peer = peer_seen_over_tcp(&bed.seed.wan, "WAN host", nat);
    assert_eq!(
        addr_of(&tcp_peer),
        WAN_HOST,
        "over TCP the server should see the WAN host's own address ({nat:?})"
    );
    let udp_peer = peer_seen_over_udp(&bed.seed.wan, "WAN host", nat);
    assert_eq!(
        addr_of(&udp_peer),
        WAN_HOST,
        "over UDP the server should see the WAN host's own address ({nat:?})"
    );
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        assert!(
            counter(&counters, "port_forwarded") > 0,
            "the WAN host's packets should be counted as port_forwarded: {counters:?}"
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum Sender {
    LanClient,
    WanHost,
}

/// A datagram to a published port nobody listens on: the server's ICMP port
/// unreachable reaches the sender at once, translated so that its connected
/// socket recognises it (ECONNREFUSED on the next receive).
#[rstest]
#[case::iptables_lan_client(Nat::Iptables, Sender::LanClient, XDP_BED)]
#[case::iptables_wan_host(Nat::Iptables, Sender::WanHost, XDP_BED)]
#[case::hairpin_lan_client(Nat::Hairpin, Sender::LanClient, XDP_BED)]
#[case::hairpin_wan_host(Nat::Hairpin, Sender::WanHost, XDP_BED)]
#[case::hairpin_container_lan_client(Nat::Hairpin, Sender::LanClient, CONTAINER)]
#[case::hairpin_container_wan_host(Nat::Hairpin, Sender::WanHost, CONTAINER)]
#[ignore = "needs root"]
fn icmp_port_unreachable_reaches_the_sender(
    #[case] nat: Nat,
    #[case] sender: Sender,
    #[case] case: DatapathCase,
) {
    require_root("icmp_port_unreachable_reaches_the_sender");
    let mut bed = Bed::on(nat, case);
    bed.start_nat(MAPPINGS, None);
    let from = match sender {
        Sender::LanClient => &bed.seed.client,
        Sender::WanHost => &bed.seed.wan,
    };
    let unreachable_sent = |netns: &Netns| netns.snmp("Icmp", "OutDestUnreachs");
    let (server_before, gateway_before) =
        (unreachable_sent(&bed.seed.server), unreachable_sent(&bed.seed.gateway));

    let socket = connected_udp(from, public(CLOSED_UDP_PORT))
        .unwrap_or_else(|e| panic!("{sender:?}: connected UDP socket: {e}"));
    const WAIT: Duration = Duration::from_secs(1);
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    socket
        .send(b"anyone there?")
        .unwrap_or_else(|e| panic!("{sender:?}: send to {PUBLIC}:{CLOSED_UDP_PORT}: {e}"));
    let mut buf = [0u8; 256];
    let started = Instant::now();
    let result = socket.recv(&mut buf);
    let waited = started.elapsed();

    let server_sent = unreachable_sent(&bed.seed.server) - server_before;
    let gateway_sent = unreachable_sent(&bed.seed.gateway) - gateway_before;
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            panic!(
                "{sender:?}: no ICMP port unreachable within {WAIT:?} ({nat:?}); the server sent {server_sent}, the gateway {gateway_sent}"
            )
        }
        Err(e) => panic!("{sender:?}: expected ECONNREFUSED ({nat:?}), got {e}"),
        Ok(len) => panic!(
            "{sender:?}: expected ECONNREFUSED ({nat:?}), got a reply: {:?}",
            String::from_utf8_lossy(&buf[..len])
        ),
    }
    assert_eq!(
        gateway_sent, 0,
        "{sender:?}: the gateway answered port unreachable itself ({nat:?}): the datagram never reached the server"
    );
    assert!(
        server_sent >= 1,
        "{sender:?}: the refusal should come from the server, which sent {server_sent} port unreachable ({nat:?})"
    );
    println!("{sender:?} ({nat:?}): ECONNREFUSED after {waited:?}");
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        assert!(
            counter(&counters, "icmp_translated") >= 1,
            "the ICMP error should be counted as icmp_translated: {counters:?}"
        );
    }
}

/// The gateway's WAN link has MTU 1400, both endpoints 1500: the WAN host
/// advertises MSS 1460, the server's full-size segments do not fit, and the
/// gateway must make the server learn the path MTU (ICMP fragmentation
/// needed), not send them on oversized nor lose them.
#[rstest]
#[case::iptables(Nat::Iptables, XDP_BED)]
#[case::hairpin(Nat::Hairpin, XDP_BED)]
#[case::iptables_container(Nat::Iptables, CONTAINER)]
#[case::hairpin_container(Nat::Hairpin, CONTAINER)]
#[ignore = "needs root"]
fn download_across_a_smaller_wan_mtu_uses_path_mtu_discovery(
    #[case] nat: Nat,
    #[case] case: DatapathCase,
) {
    require_root("download_across_a_smaller_wan_mtu_uses_path_mtu_discovery");
    const WAN_MTU: u16 = 1400;
    let mut bed = Bed::on(nat, case);
    bed.seed.gateway.ip(&["link", "set", GATEWAY_WAN_IF, "mtu", &WAN_MTU.to_string()]);
    for (netns, interface, role) in [
        (&bed.seed.wan, "eth0", "WAN host"),
        (&bed.seed.server, "eth0", "server"),
        (&bed.seed.gateway, GATEWAY_LAN_IF, "gateway LAN"),
    ] {
        assert_eq!(netns.mtu(interface), 1500, "{role}'s {interface} MTU");
    }
    assert_eq!(
        bed.seed.server.sysctl_value("net.ipv4.ip_no_pmtu_disc"),
        "0",
        "the server must do path MTU discovery"
    );
    // The WAN host counts what arrives bigger than the WAN link allows
    // (veth delivers frames up to the receiver's MTU, whatever the sender's
    // is). No GRO, so that each packet is counted as it came.
    bed.seed.wan.exec("ethtool", &["-K", "eth0", "gro", "off"]);
    // veth hands a GSO packet over whole, so what the WAN host counts would
    // be the gateway's sends, not what a 1400-byte wire carries: the
    // gateway segments at its WAN egress, as before a real wire (its LAN
    // side keeps GRO and the server TSO, so the gateway still receives
    // packets bigger than the WAN MTU on the container-host bed).
    bed.seed.gateway.exec("ethtool", &["-K", GATEWAY_WAN_IF, "tso", "off", "gso", "off"]);
    let oversize = format!("{}:65535", WAN_MTU + 1);
    bed.seed.wan.exec(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--sport", "80", "-m", "length", "--length", &oversize],
    );
    bed.start_nat(MAPPINGS, Some(WAN_MTU));

    let (status, body) =
        http_get(&bed.seed.wan, public(HTTP_PORT), "/big", Duration::from_secs(20)).unwrap_or_else(
            |e| panic!("WAN host: 1 MiB download via a {WAN_MTU}-byte link failed ({nat:?}): {e}"),
        );
    assert_eq!(status, "HTTP/1.0 200 OK", "({nat:?})");
    assert_eq!(body.len(), BIG_LEN, "downloaded length ({nat:?})");
    assert!(body == big_body(BIG_LEN), "the 1 MiB body arrived corrupted ({nat:?})");

    let listing = bed.seed.wan.exec("iptables", &["-L", "INPUT", "-v", "-x", "-n"]);
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    let oversized: u64 = listing
        .lines()
        .skip(2)
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        oversized, 0,
        "the WAN host received packets larger than the WAN MTU {WAN_MTU} ({nat:?}):\n{listing}"
    );
    let route = bed.seed.server.ip(&["route", "get", &WAN_HOST.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains(&format!("mtu {WAN_MTU}")),
        "the server should have learnt the path MTU {WAN_MTU} to the WAN host ({nat:?}):\n{route}"
    );
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        println!("answered fragmentation needed: {}", counter(&counters, "frag_needed_sent"));
    }
}

/// A TCP SYN to the public HTTP port from a spoofed LAN source, as a whole
/// Ethernet frame with correct checksums.
fn spoofed_syn(index: u32, from_mac: [u8; 6], gateway_mac: [u8; 6]) -> Vec<u8> {
    // Sources .4 to .253 except the flooding host's own (.50): never the
    // gateway, server or client.
    let hosts: Vec<u8> = (4..=253).filter(|h| *h != 50).collect();
    let host = hosts[index as usize % hosts.len()];
    let port = 10_000 + (index / hosts.len() as u32) as u16;
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(from_mac, gateway_mac)
        .ipv4([192, 168, 0, host], PUBLIC.octets(), 64)
        .tcp(port, HTTP_PORT, index.wrapping_mul(2_654_435_761), 64240)
        .syn()
        .write(&mut frame, &[])
        .expect("build a SYN");
    frame
}

/// A long-running TCP flow through the hairpin survives ten times the flow
/// table's capacity in new flows (a SYN flood from spoofed LAN sources), and
/// new connections still work afterwards.
#[test]
#[ignore = "needs root"]
fn a_long_flow_survives_a_flood_of_new_flows() {
    require_root("a_long_flow_survives_a_flood_of_new_flows");
    const CAPACITY: u32 = 1024;
    const FLOOD: u32 = 10 * CAPACITY;
    let seed = SeedBed::new();
    let _servers = Servers::start(&seed.server, HTTP_PORT, UDP_SERVER_PORT);
    let _echo = TcpEcho::start(&seed.server, ECHO_PORT);
    let flooder = seed.add_lan_host("flood", Ipv4Addr::new(192, 168, 0, 50));
    let mappings = [
        ("tcp", "203.0.113.1:80", "192.168.0.2:80"),
        ("tcp", "203.0.113.1:7000", "192.168.0.2:7000"),
    ];
    let options = ConfigOptions { conntrack_capacity: Some(CAPACITY), ..ConfigOptions::default() };
    let daemon = Daemon::start(&seed.gateway, &seed.config_with(&mappings, &options));

    let mut long = tcp_connect(&seed.client, public(ECHO_PORT), TIMEOUT)
        .unwrap_or_else(|e| panic!("the long flow: connect to {PUBLIC}:{ECHO_PORT}: {e}"));
    long.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    echo_round_trip(&mut long, b"before the flood")
        .unwrap_or_else(|e| panic!("the long flow, before the flood: {e}"));

    let gateway_mac = seed.gateway.mac(GATEWAY_LAN_IF);
    let flooder_mac = flooder.mac("eth0");
    let socket = PacketSocket::open(&flooder, "eth0");
    let (done_tx, done_rx) = mpsc::channel();
    let flood = std::thread::spawn(move || {
        let started = Instant::now();
        for index in 0..FLOOD {
            socket
                .send(&spoofed_syn(index, flooder_mac, gateway_mac))
                .unwrap_or_else(|e| panic!("flood frame {index}: {e}"));
            // Paced so that the veth rings and backlogs on the way do not
            // drop most of it: 64 frames a millisecond at most.
            if index % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let _ = done_tx.send(started.elapsed());
    });

    // The long flow keeps talking while the flood runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut during = 0u32;
    let flood_took = loop {
        match done_rx.try_recv() {
            Ok(took) => break took,
            Err(mpsc::TryRecvError::Disconnected) => {
                flood.join().map(|_| ()).unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                panic!("the flood thread ended without finishing");
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        assert!(Instant::now() < deadline, "the flood did not finish within 20 s");
        echo_round_trip(&mut long, format!("during the flood {during}").as_bytes()).unwrap_or_else(
            |e| panic!("the long flow, after {during} exchanges during the flood: {e}"),
        );
        during += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    flood.join().expect("flood thread");
    println!("{FLOOD} SYNs sent in {flood_took:?}; {during} exchanges on the long flow meanwhile");

    for round in 0..10 {
        echo_round_trip(&mut long, format!("after the flood {round}").as_bytes())
            .unwrap_or_else(|e| panic!("the long flow, exchange {round} after the flood: {e}"));
    }
    let (status, _) = http_get(&seed.client, public(HTTP_PORT), "/", TIMEOUT)
        .unwrap_or_else(|e| panic!("a new connection after the flood: {e}"));
    assert_eq!(status, "HTTP/1.0 200 OK", "a new connection after the flood");
    drop(long);

    let counters = daemon.stop();
    println!("hairpin's counters after the flood: {counters:?}");
    let created = counter(&counters, "flow_created");
    assert!(
        created >= u64::from(FLOOD / 2),
        "only {created} flows created for {FLOOD} flood SYNs: the flood was not accounted: {counters:?}"
    );
    assert!(
        counter(&counters, "new_flows_evicted") >= created - u64::from(CAPACITY),
        "the new-flow table can hold {CAPACITY} entries: the rest must show as evicted: {counters:?}"
    );
    assert_eq!(counter(&counters, "established_table_full"), 0, "{counters:?}");
}

/// With four SNAT ports, four open connections take them all; a fifth is
/// refused cleanly (the client sees an error, nothing hangs) and the four
/// keep working.
#[test]
#[ignore = "needs root"]
fn exhausted_snat_ports_refuse_a_new_flow_and_keep_the_open_ones() {
    require_root("exhausted_snat_ports_refuse_a_new_flow_and_keep_the_open_ones");
    const PORTS: std::ops::RangeInclusive<u16> = 20000..=20003;
    let seed = SeedBed::new();
    let _servers = Servers::start(&seed.server, HTTP_PORT, UDP_SERVER_PORT);
    let mappings = [("tcp", "203.0.113.1:80", "192.168.0.2:80")];
    let options = ConfigOptions {
        snat_ports: Some(format!("{}-{}", PORTS.start(), PORTS.end())),
        ..ConfigOptions::default()
    };
    let daemon = Daemon::start(&seed.gateway, &seed.config_with(&mappings, &options));

    let mut open = Vec::new();
    for index in 0..PORTS.len() {
        let stream = tcp_connect(&seed.client, public(HTTP_PORT), TIMEOUT)
            .unwrap_or_else(|e| panic!("open connection {index}: {e}"));
        open.push(stream);
    }

    const REFUSAL_WITHIN: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let fifth = tcp_connect(&seed.client, public(HTTP_PORT), REFUSAL_WITHIN);
    let waited = started.elapsed();
    match fifth {
        Ok(stream) => panic!(
            "a fifth connection got through with all {} SNAT ports taken (local {:?})",
            PORTS.len(),
            stream.local_addr()
        ),
        Err(e) => println!("the fifth connection failed after {waited:?}: {e}"),
    }
    // Refused with an ICMP error at once, not left to time out.
    assert!(waited < Duration::from_secs(1), "refusing the fifth connection took {waited:?}");

    let mut ports = BTreeSet::new();
    for (index, stream) in open.iter_mut().enumerate() {
        let (status, body) = http_request(stream, public(HTTP_PORT), "/", TIMEOUT)
            .unwrap_or_else(|e| panic!("open connection {index} after the refusal: {e}"));
        assert_eq!(status, "HTTP/1.0 200 OK", "open connection {index}");
        let body = String::from_utf8_lossy(&body).to_string();
        let peer: SocketAddrV4 = body
            .trim()
            .strip_prefix("hello ")
            .and_then(|peer| peer.parse().ok())
            .unwrap_or_else(|| panic!("open connection {index}: unexpected body {body:?}"));
        assert_eq!(*peer.ip(), GATEWAY_LAN, "open connection {index}: SNAT address");
        assert!(
            PORTS.contains(&peer.port()),
            "open connection {index}: SNAT port {} outside {PORTS:?}",
            peer.port()
        );
        ports.insert(peer.port());
    }
    assert_eq!(
        ports.len(),
        PORTS.len(),
        "the server saw the open connections from ports {ports:?}: not all distinct"
    );

    let counters = daemon.stop();
    println!("hairpin's counters: {counters:?}");
    assert_eq!(counter(&counters, "port_alloc_failed"), 1, "{counters:?}");
    assert_eq!(counter(&counters, "flow_refused"), 1, "{counters:?}");
}
