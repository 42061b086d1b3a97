//! What `examples/hairpin.service` promises: hairpin runs with only the
//! capabilities the unit grants. `cargo xtask deb --check` runs this test
//! again against the installed package: `HAIRPIN_UNIT` names the installed
//! unit and `HAIRPIN_BIN` the installed binary, which the unit's
//! `ExecStart` must run.

use std::{net::SocketAddrV4, time::Duration};

use hairpin_tests::{
    apps::{Servers, http_get},
    daemon::Daemon,
    require_root,
    seed::{GATEWAY_LAN, PUBLIC, SERVER, SeedBed},
};

/// The unit under test: `$HAIRPIN_UNIT`, else the example in the repository.
fn unit() -> String {
    let path = std::env::var("HAIRPIN_UNIT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hairpin.service").to_string()
    });
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The unit's `ExecStart`: its program and arguments.
fn exec_start(unit: &str) -> Vec<String> {
    let line =
        unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit sets ExecStart");
    line.split_whitespace().map(str::to_string).collect()
}

/// The unit's `CapabilityBoundingSet`, as `setpriv --bounding-set` takes it.
fn unit_capabilities(unit: &str) -> String {
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
    let unit = unit();
    // The daemon below runs `hairpin run --config FILE`: the unit's command
    // with the bed's configuration file instead of /etc/hairpin's.
    let command = exec_start(&unit);
    assert!(
        matches!(command.as_slice(), [_, run, config, _] if run == "run" && config == "--config"),
        "ExecStart is `hairpin run --config FILE`: {command:?}"
    );
    if std::env::var_os("HAIRPIN_UNIT").is_some() {
        assert_eq!(
            std::path::Path::new(&command[0]),
            hairpin_tests::daemon::hairpin_binary(),
            "the installed unit's program is the binary under test"
        );
    }
    let config = bed.config(&[("tcp", &format!("{PUBLIC}:80"), &format!("{SERVER}:80"))]);
    let bounding_set = format!("--bounding-set={}", unit_capabilities(&unit));
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
