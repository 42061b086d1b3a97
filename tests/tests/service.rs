//! What `examples/hairpin.service` promises: hairpin runs with only the
//! capabilities the unit grants.

use std::{net::SocketAddrV4, time::Duration};

use hairpin_tests::{
    apps::{Servers, http_get},
    daemon::Daemon,
    require_root,
    seed::{GATEWAY_LAN, PUBLIC, SERVER, SeedBed},
};

/// The unit's `CapabilityBoundingSet`, as `setpriv --bounding-set` takes it.
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/hairpin.service"
    ))
    .expect("read examples/hairpin.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(!caps.is_empty(), "no capabilities in {line:?}");
    format!("-all,{}", caps.join(","))
}

#[test]
#[ignore = "needs root"]
fn hairpin_runs_with_the_units_capabilities_only() {
    require_root("hairpin_runs_with_the_units_capabilities_only");
    let bed = SeedBed::new();
    let _servers = Servers::start(&bed.server, 80, 5353);
    let config = bed.config(&[("tcp", &format!("{PUBLIC}:80"), &format!("{SERVER}:80"))]);
    let bounding_set = format!("--bounding-set={}", unit_capabilities());
    let daemon = Daemon::start_wrapped(&bed.gateway, &config, &[], &["setpriv", &bounding_set]);

    let (status, body) =
        http_get(&bed.client, SocketAddrV4::new(PUBLIC, 80).into(), "/", Duration::from_secs(3))
            .expect("the hairpin works with the unit's capabilities");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with(&format!("hello {GATEWAY_LAN}:")), "{body}");
    let route_cache_off = daemon.log().iter().any(|line| line.contains("route cache off"));
    assert!(!route_cache_off, "the route cache needs no more capabilities:\n{:#?}", daemon.log());
    let counters = daemon.stop();
    assert!(counters.get("hairpinned").copied().unwrap_or(0) > 0, "{counters:?}");
    assert!(
        counters.get("route_cached").copied().unwrap_or(0) > 0,
        "the flow's route was cached under the unit's capabilities: {counters:?}"
    );
}
