//! End to end in network namespaces: the seed's topology, real sockets, the
//! real `hairpin` binary.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use hairpin_tests::{
    Netns,
    apps::{BIG_LEN, Servers, big_body, http_get, udp_echo},
    daemon::Daemon,
    netfilter::{
        add_netfilter_probes, kernel_conntrack_entries, netfilter_probe_listing,
        netfilter_probe_packets, reset_netfilter_probes,
    },
    require_root,
    seed::{GATEWAY_LAN, PUBLIC, SERVER, SeedBed},
};

const HTTP_PORT: u16 = 80;
/// The UDP service is published on another port than the server's, so the
/// destination port is translated too.
const UDP_PUBLIC_PORT: u16 = 53;
const UDP_SERVER_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);

fn mappings() -> [(&'static str, String, String); 2] {
    [
        ("tcp", format!("{PUBLIC}:{HTTP_PORT}"), format!("{SERVER}:{HTTP_PORT}")),
        ("udp", format!("{PUBLIC}:{UDP_PUBLIC_PORT}"), format!("{SERVER}:{UDP_SERVER_PORT}")),
    ]
}

fn mapping_refs<'a>(
    m: &'a [(&'static str, String, String); 2],
) -> Vec<(&'static str, &'a str, &'a str)> {
    m.iter().map(|(p, a, b)| (*p, a.as_str(), b.as_str())).collect()
}

fn public_http() -> SocketAddr {
    SocketAddrV4::new(PUBLIC, HTTP_PORT).into()
}

fn public_udp() -> SocketAddr {
    SocketAddrV4::new(PUBLIC, UDP_PUBLIC_PORT).into()
}

struct Scenario {
    bed: SeedBed,
    _servers: Servers,
}

fn scenario() -> Scenario {
    let bed = SeedBed::new();
    let servers = Servers::start(&bed.server, HTTP_PORT, UDP_SERVER_PORT);
    Scenario { bed, _servers: servers }
}

fn start_hairpin(bed: &SeedBed) -> Daemon {
    let m = mappings();
    Daemon::start(&bed.gateway, &bed.config(&mapping_refs(&m)))
}

/// GET / through the public address; the body names the peer the server saw.
fn get_hello(from: &Netns) -> std::io::Result<String> {
    let (status, body) = http_get(from, public_http(), "/", TIMEOUT)?;
    assert_eq!(status, "HTTP/1.0 200 OK");
    Ok(String::from_utf8_lossy(&body).to_string())
}

fn counter(counters: &std::collections::BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

#[test]
#[ignore = "needs root"]
fn lan_client_fails_without_hairpin_and_reaches_the_server_with_it() {
    require_root("lan_client_fails_without_hairpin_and_reaches_the_server_with_it");
    let s = scenario();
    assert!(
        get_hello(&s.bed.client).is_err(),
        "without hairpin, TCP to the public address should fail"
    );
    assert!(
        udp_echo(&s.bed.client, public_udp(), b"ping", TIMEOUT).is_err(),
        "without hairpin, UDP to the public address should fail"
    );

    let daemon = start_hairpin(&s.bed);
    let hello = get_hello(&s.bed.client).expect("TCP through the hairpin");
    assert!(
        hello.starts_with(&format!("hello {GATEWAY_LAN}:")),
        "the server should see the gateway's LAN address (SNAT): {hello}"
    );
    let echo =
        udp_echo(&s.bed.client, public_udp(), b"ping", TIMEOUT).expect("UDP through the hairpin");
    let echo = String::from_utf8_lossy(&echo);
    assert!(
        echo.starts_with(&format!("{GATEWAY_LAN}:")) && echo.ends_with(" ping"),
        "echo: {echo}"
    );

    let counters = daemon.stop();
    println!("hairpin's counters: {counters:?}");
    assert_eq!(counter(&counters, "flow_created"), 2, "one TCP and one UDP flow: {counters:?}");
    assert!(counter(&counters, "hairpinned") >= 5, "{counters:?}");
    assert!(counter(&counters, "translated_back") >= 4, "{counters:?}");

    assert!(
        get_hello(&s.bed.client).is_err(),
        "after hairpin detached, the seed's problem is back"
    );
}

#[test]
#[ignore = "needs root"]
fn server_reaches_its_own_public_address() {
    require_root("server_reaches_its_own_public_address");
    let s = scenario();
    let _daemon = start_hairpin(&s.bed);
    let hello = get_hello(&s.bed.server).expect("server to its own public address");
    assert!(hello.starts_with(&format!("hello {GATEWAY_LAN}:")), "{hello}");
    let echo = udp_echo(&s.bed.server, public_udp(), b"self", TIMEOUT).expect("UDP to itself");
    assert!(String::from_utf8_lossy(&echo).ends_with(" self"));
}

#[test]
#[ignore = "needs root"]
fn hundred_sequential_connections_all_succeed() {
    require_root("hundred_sequential_connections_all_succeed");
    let s = scenario();
    let daemon = start_hairpin(&s.bed);
    for i in 0..100 {
        get_hello(&s.bed.client).unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
    }
    let counters = daemon.stop();
    assert_eq!(counter(&counters, "flow_created"), 100, "{counters:?}");
}

#[test]
#[ignore = "needs root"]
fn one_mib_download_arrives_intact() {
    require_root("one_mib_download_arrives_intact");
    let s = scenario();
    let _daemon = start_hairpin(&s.bed);
    let (status, body) = http_get(&s.bed.client, public_http(), "/big", Duration::from_secs(20))
        .expect("1 MiB through the hairpin");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body.len(), BIG_LEN);
    assert!(body == big_body(BIG_LEN), "the 1 MiB body arrived corrupted");
}

#[test]
#[ignore = "needs root"]
fn with_the_seed_rules_loaded_the_flows_never_reach_netfilter() {
    require_root("with_the_seed_rules_loaded_the_flows_never_reach_netfilter");
    let s = scenario();
    let m = mappings();
    s.bed.load_seed_iptables(&mapping_refs(&m));
    add_netfilter_probes(&s.bed.gateway, &mapping_refs(&m), None);

    // The rules themselves work, and the probes see their packets.
    get_hello(&s.bed.client).expect("TCP through the seed's iptables rules");
    udp_echo(&s.bed.client, public_udp(), b"nf", TIMEOUT)
        .expect("UDP through the seed's iptables rules");
    assert!(
        netfilter_probe_packets(&s.bed.gateway) > 0,
        "the probes should count netfilter's packets"
    );
    reset_netfilter_probes(&s.bed.gateway);
    s.bed.gateway.exec("conntrack", &["-F"]);

    let daemon = start_hairpin(&s.bed);
    const CONNECTIONS: u64 = 10;
    for _ in 0..CONNECTIONS {
        get_hello(&s.bed.client).expect("TCP through hairpin");
    }
    let echo = udp_echo(&s.bed.client, public_udp(), b"xdp", TIMEOUT).expect("UDP through hairpin");
    assert!(String::from_utf8_lossy(&echo).ends_with(" xdp"));
    let (_, body) = http_get(&s.bed.server, public_http(), "/", TIMEOUT).expect("server to itself");
    assert!(!body.is_empty());

    assert_eq!(
        netfilter_probe_packets(&s.bed.gateway),
        0,
        "netfilter saw packets of hairpinned flows:\n{}",
        netfilter_probe_listing(&s.bed.gateway)
    );
    let entries = kernel_conntrack_entries(&s.bed.gateway, PUBLIC);
    assert!(!entries.contains("dport="), "kernel conntrack tracked hairpinned flows:\n{entries}");

    let counters = daemon.stop();
    assert_eq!(counter(&counters, "flow_created"), CONNECTIONS + 2, "{counters:?}");
    // Each HTTP exchange is at least SYN, ACK, request, FIN-ACK and final
    // ACK from the client, and SYN-ACK, response and FIN from the server;
    // the UDP exchange is one datagram each way.
    let http_exchanges = CONNECTIONS + 1;
    let udp_datagrams = 1;
    assert!(counter(&counters, "hairpinned") >= 5 * http_exchanges + udp_datagrams, "{counters:?}");
    assert!(
        counter(&counters, "translated_back") >= 3 * http_exchanges + udp_datagrams,
        "{counters:?}"
    );
}
