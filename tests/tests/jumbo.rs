//! Jumbo frames on the LAN: hairpin translates them on the XDP multi-buffer
//! path, never truncating or dropping them.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use hairpin_tests::{
    apps::{BIG_LEN, Servers, big_body, http_get, udp_echo},
    daemon::Daemon,
    require_root,
    seed::{GATEWAY_LAN, GATEWAY_LAN_IF, PUBLIC, SERVER, SeedBed},
};

const JUMBO_MTU: &str = "9000";

fn jumbo_lan(bed: &SeedBed) {
    for port in ["br0", "p-gw", "p-srv", "p-cli"] {
        bed.lan.ip(&["link", "set", port, "mtu", JUMBO_MTU]);
    }
    bed.gateway.ip(&["link", "set", GATEWAY_LAN_IF, "mtu", JUMBO_MTU]);
    for host in [&bed.server, &bed.client] {
        host.ip(&["link", "set", "eth0", "mtu", JUMBO_MTU]);
    }
}

#[test]
#[ignore = "needs root"]
fn jumbo_frames_are_translated_whole() {
    require_root("jumbo_frames_are_translated_whole");
    let bed = SeedBed::new();
    jumbo_lan(&bed);
    let _servers = Servers::start(&bed.server, 80, 5353);
    let config = bed.config(&[
        ("tcp", &format!("{PUBLIC}:80"), &format!("{SERVER}:80")),
        ("udp", &format!("{PUBLIC}:53"), &format!("{SERVER}:5353")),
    ]);
    let daemon = Daemon::start(&bed.gateway, &config);

    let payload: Vec<u8> = (0..8000).map(|i| (i % 251) as u8).collect();
    let public_udp: SocketAddr = SocketAddrV4::new(PUBLIC, 53).into();
    let echo = udp_echo(&bed.client, public_udp, &payload, Duration::from_secs(3))
        .expect("an 8000-byte datagram through the hairpin and back");
    let prefix = format!("{GATEWAY_LAN}:");
    assert!(echo.starts_with(prefix.as_bytes()), "the server saw the gateway");
    assert!(echo.ends_with(&payload), "the 8000-byte datagram arrived whole, both ways");

    let (status, body) = http_get(
        &bed.client,
        SocketAddrV4::new(PUBLIC, 80).into(),
        "/big",
        Duration::from_secs(20),
    )
    .expect("1 MiB in jumbo segments");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(body.len() == BIG_LEN && body == big_body(BIG_LEN), "the download arrived intact");

    let counters = daemon.stop();
    println!("hairpin's counters: {counters:?}");
    assert!(counters.get("pass_too_big").copied().unwrap_or(0) == 0, "{counters:?}");
    assert!(counters.get("hairpinned").copied().unwrap_or(0) > 0, "{counters:?}");
}
