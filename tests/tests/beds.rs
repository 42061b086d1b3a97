//! The beds are what they claim to be, before any test relies on them: the
//! native XDP bed has its workarounds, the container-host bed has none of
//! them, and the tun WAN carries IP packets without an Ethernet header.

use std::time::Duration;

use hairpin_tests::{
    Netns,
    apps::{Servers, http_get},
    require_root,
    seed::{
        BedKind, GATEWAY_LAN_IF, GATEWAY_WAN_IF, PUBLIC, SERVER, SeedBed, WAN_HOST, WanLink,
        offloads_on,
    },
};

/// The offloads a container host's veths have on.
const DEFAULT_OFFLOADS: &[&str] = &[
    "tx-checksumming",
    "tcp-segmentation-offload",
    "generic-segmentation-offload",
    "generic-receive-offload",
];

/// Whether `ip -d link` shows an XDP program on `interface`.
fn has_xdp(netns: &Netns, interface: &str) -> bool {
    let output = netns.ip(&["-d", "link", "show", "dev", interface]);
    String::from_utf8_lossy(&output.stdout).contains("prog/xdp")
}

/// Every veth end of the bed whose packets the gateway sends or receives.
fn veth_ends(bed: &SeedBed) -> Vec<(&Netns, &'static str)> {
    let mut ends = vec![
        (&bed.gateway, GATEWAY_LAN_IF),
        (&bed.lan, "p-gw"),
        (&bed.lan, "p-srv"),
        (&bed.lan, "p-cli"),
        (&bed.server, "eth0"),
        (&bed.client, "eth0"),
    ];
    if bed.wan_link == WanLink::Veth {
        ends.extend([(&bed.gateway, GATEWAY_WAN_IF), (&bed.wan, "eth0")]);
    }
    ends
}

#[test]
#[ignore = "needs root"]
fn the_container_host_bed_keeps_default_offloads_and_no_xdp_on_peers() {
    require_root("the_container_host_bed_keeps_default_offloads_and_no_xdp_on_peers");
    let bed = SeedBed::with(BedKind::ContainerHost);
    for (netns, interface) in veth_ends(&bed) {
        let on = offloads_on(netns, interface);
        for offload in DEFAULT_OFFLOADS {
            assert!(
                on.iter().any(|o| o == offload),
                "{interface} in {}: {offload} should be on, on are: {on:?}",
                netns.name()
            );
        }
        assert!(!has_xdp(netns, interface), "{interface} in {} has an XDP program", netns.name());
    }
}

#[test]
#[ignore = "needs root"]
fn the_native_xdp_bed_has_its_workarounds() {
    require_root("the_native_xdp_bed_has_its_workarounds");
    let bed = SeedBed::new();
    for host in [&bed.server, &bed.client, &bed.wan] {
        let on = offloads_on(host, "eth0");
        assert!(
            !on.iter().any(|o| o == "tx-checksumming"),
            "tx checksum offload should be off on {}: {on:?}",
            host.name()
        );
    }
    assert!(has_xdp(&bed.lan, "p-gw"), "p-gw should have the pass-through XDP program");
    assert!(has_xdp(&bed.wan, "eth0"), "the WAN host's eth0 should have it");
}

/// Without any NAT, the tun WAN routes: the WAN host reaches the gateway's
/// public address and, through the gateway, the server's LAN address.
#[test]
#[ignore = "needs root"]
fn the_tun_wan_carries_ip_packets_without_an_ethernet_header() {
    require_root("the_tun_wan_carries_ip_packets_without_an_ethernet_header");
    let bed = SeedBed::build(BedKind::ContainerHost, WanLink::Tun);
    let link = bed.gateway.ip(&["-d", "link", "show", "dev", GATEWAY_WAN_IF]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("link/none") && link.contains("tun"), "gw-wan is no tun device: {link}");
    // The server's replies to the WAN host go back through the gateway.
    bed.wan.ip(&["route", "add", "192.168.0.0/24", "via", &PUBLIC.to_string()]);
    let _servers = Servers::start(&bed.server, 80, 5353);
    let server = std::net::SocketAddrV4::new(SERVER, 80).into();
    let before = bed.tun_relayed().expect("a tun relay");
    let (status, body) = http_get(&bed.wan, server, "/", Duration::from_secs(3))
        .expect("WAN host to the server's LAN address, routed over the tun WAN");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with(&format!("hello {WAN_HOST}:")), "{body}");
    let relayed = bed.tun_relayed().expect("a tun relay") - before;
    assert!(relayed >= 6, "the relay carried only {relayed} packets of a TCP exchange");
}
