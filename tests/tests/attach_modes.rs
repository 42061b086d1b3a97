//! Where the datapath runs on each interface: `[datapath] attach`, what
//! `auto` makes of plain veths, and how status and a restart show it.

use hairpin::attach::xdp_act;
use hairpin_tests::{Netns, attach_xdp_pass, cli::Cli, daemon::Daemon, require_root, veth};

/// `xdp-features` of `interface` in `netns`, from the `netdev` family.
fn xdp_features(netns: &Netns, interface: &str) -> u64 {
    let interface = interface.to_string();
    netns.run_in(move || {
        let index = hairpin::datapath::if_index(&interface).expect("the interface exists");
        hairpin::netlink::xdp_features(index).expect("the netdev family answers")
    })
}

#[test]
#[ignore = "needs root"]
fn a_veth_can_send_xdp_frames_only_while_its_peer_runs_xdp_or_has_gro() {
    require_root("a_veth_can_send_xdp_frames_only_while_its_peer_runs_xdp_or_has_gro");
    let gateway = Netns::new("gw");
    let peer = Netns::new("peer");
    veth(&gateway, "gw-lan", &peer, "p-lan");
    let plain = xdp_features(&gateway, "gw-lan");
    let xdp_pass = attach_xdp_pass(&peer, "p-lan");
    let with_peer_xdp = xdp_features(&gateway, "gw-lan");
    drop(xdp_pass);
    peer.exec("ethtool", &["-K", "p-lan", "gro", "on"]);
    let with_peer_gro = xdp_features(&gateway, "gw-lan");
    println!(
        "xdp-features of a veth: plain peer {plain:#x}, peer with XDP {with_peer_xdp:#x}, peer with GRO {with_peer_gro:#x}"
    );
    assert_eq!(plain & xdp_act::NDO_XMIT, 0, "plain peer: {plain:#x}");
    assert_ne!(plain & xdp_act::BASIC, 0, "a veth has native XDP: {plain:#x}");
    assert_ne!(with_peer_xdp & xdp_act::NDO_XMIT, 0, "peer with XDP: {with_peer_xdp:#x}");
    assert_ne!(with_peer_gro & xdp_act::NDO_XMIT, 0, "peer with GRO: {with_peer_gro:#x}");
}

/// A gateway whose LAN and WAN interfaces are veths to a peer namespace
/// that runs no XDP program and has GRO off: the kernel says those veths
/// cannot send XDP frames.
struct PlainVethBed {
    gateway: Netns,
    _peer: Netns,
}

impl PlainVethBed {
    fn new() -> Self {
        let gateway = Netns::new("gw");
        let peer = Netns::new("peer");
        veth(&gateway, "gw-lan", &peer, "p-lan");
        veth(&gateway, "gw-wan", &peer, "p-wan");
        gateway.ip(&["addr", "add", "192.168.0.1/24", "dev", "gw-lan"]);
        gateway.ip(&["addr", "add", "203.0.113.1/24", "dev", "gw-wan"]);
        gateway.sysctl("net.ipv4.ip_forward=1");
        Self { gateway, _peer: peer }
    }

    /// The configuration with `datapath` as its `[datapath]` section.
    fn config(datapath: &str) -> String {
        format!(
            "[lan]\ninterfaces = [\"gw-lan\"]\nnetworks = [\"192.168.0.0/24\"]\naddress = \"192.168.0.1\"\n\n\
             [wan]\ninterface = \"gw-wan\"\naddresses = [\"203.0.113.1\"]\n\n\
             [datapath]\n{datapath}\n\n\
             [[mapping]]\nproto = \"tcp\"\npublic = \"203.0.113.1:80\"\nto = \"192.168.0.2:80\"\n"
        )
    }

    /// `(interface, mode, chosen_by, reason, program)` of each interface,
    /// from `hairpin status --json`.
    fn modes(&self) -> Vec<(String, String, String, String, String)> {
        let status = Cli::new(&self.gateway).json(&["status", "--json"]);
        let rows = status["interfaces"].as_array().cloned().unwrap_or_default();
        rows.iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (s("interface"), s("mode"), s("chosen_by"), s("reason"), s("program"))
            })
            .collect()
    }

    /// The names of the instance's pinned links (`xdp_gw-lan`, `tc_gw-wan`).
    fn links(&self) -> Vec<String> {
        let status = Cli::new(&self.gateway).json(&["status", "--json"]);
        let mut names: Vec<String> = status["links"]
            .as_array()
            .map(|links| {
                links.iter().map(|l| l["name"].as_str().unwrap_or_default().to_string()).collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The name of the XDP program on `interface`, if one is attached.
    fn xdp_program(&self, interface: &str) -> Option<String> {
        let shown = self.gateway.ip(&["-d", "link", "show", "dev", interface]).stdout;
        let id = String::from_utf8_lossy(&shown)
            .split("prog/xdp id ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string();
        Some(self.program_name(&id))
    }

    /// The program the pinned link `name` runs.
    fn linked_program(&self, name: &str) -> String {
        let status = Cli::new(&self.gateway).json(&["status", "--json"]);
        let links = status["links"].as_array().cloned().unwrap_or_default();
        let link = links
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no link {name}: {status:#}"));
        self.program_name(&link["program_id"].to_string())
    }

    fn program_name(&self, id: &str) -> String {
        let shown = self.gateway.exec("bpftool", &["prog", "show", "id", id, "--json"]);
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("bpftool json");
        shown["name"].as_str().unwrap_or_default().to_string()
    }

    /// The interface indexes in the instance's `EGRESS_DEVICES`.
    fn egress_devices(&self, daemon: &Daemon) -> usize {
        let map = daemon.pin_dir.join("maps/EGRESS_DEVICES");
        let map = map.to_str().expect("utf-8");
        let dump = self.gateway.exec("bpftool", &["map", "dump", "pinned", map, "--json"]);
        let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool json");
        dump.as_array().map_or(0, Vec::len)
    }
}

fn owned(rows: &[(&str, &str, &str, &str, &str)]) -> Vec<(String, String, String, String, String)> {
    rows.iter()
        .map(|(a, b, c, d, e)| {
            (a.to_string(), b.to_string(), c.to_string(), d.to_string(), e.to_string())
        })
        .collect()
}

const PEER_CANNOT: &str = "veth: veth peer cannot take XDP frames (no XDP program or GRO on the \
     peer), and local senders leave checksums to offload (CHECKSUM_PARTIAL), which XDP cannot \
     complete";

#[test]
#[ignore = "needs root"]
fn auto_attaches_tc_to_veths_whose_peers_cannot_take_xdp_frames() {
    require_root("auto_attaches_tc_to_veths_whose_peers_cannot_take_xdp_frames");
    let bed = PlainVethBed::new();
    let daemon = Daemon::start(&bed.gateway, &PlainVethBed::config("attach = \"auto\""));
    assert_eq!(
        bed.modes(),
        owned(&[
            ("gw-lan", "tc", "auto", PEER_CANNOT, "hairpin_tc"),
            ("gw-wan", "tc", "auto", PEER_CANNOT, "hairpin_tc"),
        ])
    );
    let text = Cli::new(&bed.gateway).ok(&["status"]);
    assert!(
        text.contains("gw-lan       lan ifindex")
            && text.contains(&format!("TC (auto: {PEER_CANNOT})")),
        "status should show the mode and why:\n{text}"
    );
    let logged = daemon.log().iter().any(|line| {
        line.contains("attached to gw-wan") && line.contains(&format!("TC (auto: {PEER_CANNOT})"))
    });
    assert!(logged, "hairpin run should log the mode and why:\n{}", daemon.log().join("\n"));
    assert_eq!(bed.links(), ["tc_gw-lan", "tc_gw-wan"], "no XDP link in TC mode");
    assert_eq!(bed.xdp_program("gw-lan"), None, "no XDP on a TC-mode interface");
    assert_eq!(bed.linked_program("tc_gw-lan"), "hairpin_tc");
    assert_eq!(bed.egress_devices(&daemon), 0, "XDP must not redirect into TC-mode interfaces");
    let _ = daemon.stop();
}

#[test]
#[ignore = "needs root"]
fn configured_xdp_attaches_native_xdp_even_on_plain_veths() {
    require_root("configured_xdp_attaches_native_xdp_even_on_plain_veths");
    let bed = PlainVethBed::new();
    let daemon = Daemon::start(&bed.gateway, &PlainVethBed::config("attach = \"xdp\""));
    assert_eq!(
        bed.modes(),
        owned(&[
            ("gw-lan", "xdp", "configured", "", "hairpin"),
            ("gw-wan", "xdp", "configured", "", "hairpin"),
        ])
    );
    let text = Cli::new(&bed.gateway).ok(&["status"]);
    assert!(text.contains("XDP native (configured)"), "{text}");
    let shown = bed.gateway.ip(&["-d", "link", "show", "dev", "gw-lan"]).stdout;
    let shown = String::from_utf8_lossy(&shown);
    assert!(shown.contains("xdp ") && !shown.contains("xdpgeneric"), "native XDP:\n{shown}");
    assert_eq!(bed.xdp_program("gw-lan").as_deref(), Some("hairpin"));
    assert_eq!(bed.linked_program("tc_gw-lan"), "hairpin_neigh_redirect");
    assert_eq!(bed.egress_devices(&daemon), 2);
    let warned = daemon.log().iter().any(|l| l.contains("gw-lan: XDP as configured"));
    assert!(warned, "the lost frames should be warned about:\n{}", daemon.log().join("\n"));
    let _ = daemon.stop();
}

#[test]
#[ignore = "needs root"]
fn a_restart_reattaches_an_interface_whose_mode_changed() {
    require_root("a_restart_reattaches_an_interface_whose_mode_changed");
    let bed = PlainVethBed::new();
    let all_xdp = PlainVethBed::config("attach = \"xdp\"");
    let wan_tc = PlainVethBed::config("attach = \"xdp\"\n[datapath.interfaces]\ngw-wan = \"tc\"");

    let first = Daemon::start_with(&bed.gateway, &all_xdp, &["--keep-attached"]);
    let first_tc_link = bed.linked_program("tc_gw-wan");
    let _ = first.stop();
    assert_eq!(first_tc_link, "hairpin_neigh_redirect");
    assert_eq!(bed.links(), ["tc_gw-lan", "tc_gw-wan", "xdp_gw-lan", "xdp_gw-wan"]);

    let second = Daemon::start_with(&bed.gateway, &wan_tc, &["--keep-attached"]);
    assert_eq!(
        bed.modes(),
        owned(&[
            ("gw-lan", "xdp", "configured", "", "hairpin"),
            ("gw-wan", "tc", "configured", "", "hairpin_tc"),
        ])
    );
    assert!(
        second.log().iter().any(|l| l.contains("attached to gw-lan") && l.contains("taken over")),
        "gw-lan's links should be taken over:\n{}",
        second.log().join("\n")
    );
    assert_eq!(bed.links(), ["tc_gw-lan", "tc_gw-wan", "xdp_gw-lan"], "gw-wan's XDP link left");
    assert_eq!(bed.xdp_program("gw-wan"), None, "XDP still on gw-wan, now in TC mode");
    assert_eq!(bed.linked_program("tc_gw-wan"), "hairpin_tc");
    assert_eq!(bed.egress_devices(&second), 1, "only gw-lan is an XDP redirect target");
    let _ = second.stop();

    let third = Daemon::start(&bed.gateway, &all_xdp);
    assert_eq!(bed.links(), ["tc_gw-lan", "tc_gw-wan", "xdp_gw-lan", "xdp_gw-wan"]);
    assert_eq!(bed.xdp_program("gw-wan").as_deref(), Some("hairpin"));
    assert_eq!(bed.linked_program("tc_gw-wan"), "hairpin_neigh_redirect");
    let pin_dir = third.pin_dir.clone();
    let _ = third.stop();
    assert!(!pin_dir.exists(), "a stop without --keep-attached removes the pins");
    assert_eq!(bed.xdp_program("gw-lan"), None, "XDP left attached after the stop");
}
