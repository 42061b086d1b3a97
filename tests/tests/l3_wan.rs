//! A gateway whose WAN is an L3 device (IP packets without an Ethernet
//! header): a tun device joined to the WAN host's tun by a relay thread, or
//! a real WireGuard tunnel run by wireguard-go over an underlay veth pair.
//! The gateway has no netfilter rule at all, so a port forward can only work
//! if hairpin translates it (its TC program for L3 devices on the WAN
//! interface): the test shows it failing before hairpin starts and after it
//! stops.

use std::{io, net::SocketAddrV4, time::Duration};

use rstest::rstest;

use hairpin_tests::{
    Netns,
    apps::{BIG_LEN, Servers, big_body, connected_udp, http_get, set_ip_option, udp_echo},
    cli::assert_datapath,
    daemon::Daemon,
    require_root,
    seed::{
        Attach, BedKind, ConfigOptions, GATEWAY_LAN_IF, GATEWAY_WAN_IF, PUBLIC, SERVER, SeedBed,
        WAN_HOST, WanLink,
    },
};

const HTTP_PORT: u16 = 80;
const UDP_PUBLIC_PORT: u16 = 53;
const UDP_SERVER_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);

fn mappings() -> [(&'static str, String, String); 2] {
    [
        ("tcp", format!("{PUBLIC}:{HTTP_PORT}"), format!("{SERVER}:{HTTP_PORT}")),
        ("udp", format!("{PUBLIC}:{UDP_PUBLIC_PORT}"), format!("{SERVER}:{UDP_SERVER_PORT}")),
    ]
}

/// `GET /` from the WAN host through the public address; the body.
fn wan_get(wan: &Netns) -> io::Result<String> {
    let (status, body) = http_get(wan, SocketAddrV4::new(PUBLIC, HTTP_PORT).into(), "/", TIMEOUT)?;
    if status != "HTTP/1.0 200 OK" {
        return Err(io::Error::other(format!("status {status}")));
    }
    Ok(String::from_utf8_lossy(&body).to_string())
}

/// A UDP echo from the WAN host through the public address; the reply.
fn wan_echo(wan: &Netns, payload: &[u8]) -> io::Result<String> {
    let reply = udp_echo(wan, SocketAddrV4::new(PUBLIC, UDP_PUBLIC_PORT).into(), payload, TIMEOUT)?;
    Ok(String::from_utf8_lossy(&reply).to_string())
}

/// Panics unless neither TCP nor UDP to the published ports gets through:
/// what the gateway does with the WAN host's packets when nothing
/// translates them.
fn assert_untranslated(bed: &SeedBed, when: &str) {
    if let Ok(body) = wan_get(&bed.wan) {
        panic!("{when}: TCP through the L3 WAN worked without hairpin (got `{body}`)");
    }
    if let Ok(reply) = wan_echo(&bed.wan, b"control") {
        panic!("{when}: UDP through the L3 WAN worked without hairpin (got `{reply}`)");
    }
}

/// No NAT rule of netfilter anywhere in the gateway: only hairpin can make
/// the port forward work.
fn assert_no_netfilter_nat(gateway: &Netns) {
    let rules = gateway.exec("iptables", &["-t", "nat", "-S"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.lines().all(|rule| rule.starts_with("-P ")),
        "the gateway should have no iptables NAT rule:\n{rules}"
    );
    let ruleset = gateway.exec("nft", &["list", "ruleset"]);
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert!(
        !ruleset.contains("dnat") && !ruleset.contains("snat") && !ruleset.contains("masquerade"),
        "the gateway should have no nftables NAT rule:\n{ruleset}"
    );
}

/// Bytes the gateway's WireGuard interface sent so far (`wg show`).
fn wireguard_sent(bed: &SeedBed) -> u64 {
    bed.wireguard_transfer().expect("a WireGuard WAN").1
}

#[rstest]
#[case::tun_relay(WanLink::Tun)]
#[case::wireguard_go(WanLink::WireGuard)]
#[ignore = "needs root"]
fn a_port_forward_through_an_l3_wan_is_translated_by_hairpin_alone(#[case] wan_link: WanLink) {
    require_root("a_port_forward_through_an_l3_wan_is_translated_by_hairpin_alone");
    let bed = SeedBed::build(BedKind::ContainerHost, wan_link);
    let _servers = Servers::start(&bed.server, HTTP_PORT, UDP_SERVER_PORT);
    assert_no_netfilter_nat(&bed.gateway);
    let sent_before_control = bed.wireguard_transfer().map(|(_, sent)| sent);
    assert_untranslated(&bed, "before hairpin started");
    match wan_link {
        WanLink::Tun => assert!(
            bed.tun_relayed().is_some_and(|relayed| relayed > 0),
            "the negative control's packets should have crossed the tun relay"
        ),
        WanLink::WireGuard => {
            let sent = wireguard_sent(&bed) - sent_before_control.expect("a WireGuard WAN");
            assert!(sent > 0, "the gateway's refusals should have gone out through WireGuard");
        }
        WanLink::Veth => unreachable!("an L3 WAN test"),
    }

    let m = mappings();
    let refs: Vec<_> = m.iter().map(|(p, a, b)| (*p, a.as_str(), b.as_str())).collect();
    let options = ConfigOptions { attach: Some(Attach::Auto), ..ConfigOptions::default() };
    let daemon = Daemon::start(&bed.gateway, &bed.config_with(&refs, &options));
    assert_datapath(&bed.gateway, &[GATEWAY_LAN_IF, GATEWAY_WAN_IF], true);

    let hello = wan_get(&bed.wan)
        .unwrap_or_else(|e| panic!("TCP from the WAN host through the {wan_link:?} WAN: {e}"));
    assert!(
        hello.starts_with(&format!("hello {WAN_HOST}:")),
        "the server should see the WAN host's own address: {hello}"
    );
    let echo = wan_echo(&bed.wan, b"over tun")
        .unwrap_or_else(|e| panic!("UDP from the WAN host through the {wan_link:?} WAN: {e}"));
    assert!(
        echo.starts_with(&format!("{WAN_HOST}:")) && echo.ends_with(" over tun"),
        "UDP echo: {echo}"
    );
    let sent_before_download = bed.wireguard_transfer().map(|(_, sent)| sent);
    let (status, body) = http_get(
        &bed.wan,
        SocketAddrV4::new(PUBLIC, HTTP_PORT).into(),
        "/big",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("1 MiB download through the {wan_link:?} WAN: {e}"));
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body.len(), BIG_LEN, "downloaded length");
    assert!(body == big_body(BIG_LEN), "the 1 MiB body arrived corrupted");
    if let Some(before) = sent_before_download {
        let (received, sent) = bed.wireguard_transfer().expect("a WireGuard WAN");
        println!("wg show transfer (gateway): received {received} B, sent {sent} B");
        assert!(
            sent - before >= BIG_LEN as u64,
            "the 1 MiB download should have left through wireguard-go: {} B sent",
            sent - before
        );
    }

    let counters = daemon.stop();
    println!("hairpin's counters: {counters:?}");
    let port_forwarded = counters.get("port_forwarded").copied().unwrap_or(0);
    assert!(port_forwarded >= 3, "three flows were forwarded: {counters:?}");

    assert_untranslated(&bed, "after hairpin stopped");
}

/// A datagram of the WAN host's forwarded flow that arrives with TTL 1 over
/// the L3 WAN is answered "time exceeded" by hairpin, out of the same L3
/// device: the answer is built in front of the packet's quote and sent
/// without the Ethernet header the TC program put there. Handed to the
/// kernel untranslated instead, it would have met the gateway's own closed
/// port (ECONNREFUSED), or nothing.
#[rstest]
#[case::tun_relay(WanLink::Tun)]
#[case::wireguard_go(WanLink::WireGuard)]
#[ignore = "needs root"]
fn ttl_one_over_an_l3_wan_is_answered_time_exceeded(#[case] wan_link: WanLink) {
    require_root("ttl_one_over_an_l3_wan_is_answered_time_exceeded");
    let bed = SeedBed::build(BedKind::ContainerHost, wan_link);
    let _servers = Servers::start(&bed.server, HTTP_PORT, UDP_SERVER_PORT);
    let m = mappings();
    let refs: Vec<_> = m.iter().map(|(p, a, b)| (*p, a.as_str(), b.as_str())).collect();
    let options = ConfigOptions { attach: Some(Attach::Auto), ..ConfigOptions::default() };
    let daemon = Daemon::start(&bed.gateway, &bed.config_with(&refs, &options));
    assert_datapath(&bed.gateway, &[GATEWAY_LAN_IF, GATEWAY_WAN_IF], true);

    let socket = connected_udp(&bed.wan, SocketAddrV4::new(PUBLIC, UDP_PUBLIC_PORT).into())
        .expect("a connected UDP socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut buf = [0u8; 2048];
    socket.send(b"first").expect("send");
    let len = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("the first echo over the {wan_link:?} WAN: {e}"));
    assert!(buf[..len].ends_with(b" first"), "echo: {:?}", &buf[..len]);

    set_ip_option(&socket, libc::IPPROTO_IP, libc::IP_RECVERR, &1i32.to_ne_bytes());
    socket.set_ttl(1).expect("TTL 1");
    socket.send(b"expiring").expect("send");
    let answer = loop {
        match socket.recv(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    match answer {
        Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) => {}
        other => panic!(
            "over the {wan_link:?} WAN: expected EHOSTUNREACH from time exceeded, got {other:?}"
        ),
    }
    let counters = daemon.stop();
    assert_eq!(
        counters.get("time_exceeded_sent").copied().unwrap_or(0),
        1,
        "hairpin should have answered it: {counters:?}"
    );
}
