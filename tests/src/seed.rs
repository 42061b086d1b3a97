//! The seed's topology: a LAN bridge with the gateway, a server and a
//! client, and a WAN host on the gateway's other side.
//!
//! ```text
//!  client 192.168.0.3 ─┐
//!  server 192.168.0.2 ─┼─ br0 ─ gw-lan 192.168.0.1 [gateway] gw-wan 203.0.113.1 ─ wan host 203.0.113.9
//! ```
//!
//! Two kinds of bed ([`BedKind`]): the native XDP bed works around the
//! veth traps (see the test-bed notes), the container-host bed keeps what a
//! real container host or VM lab has. The WAN link is a veth or an L3 link
//! without Ethernet header: a tun pair joined by a relay (like WireGuard or
//! PPP), or a real WireGuard tunnel run by wireguard-go ([`WanLink`]).

use std::net::Ipv4Addr;

use netlink_packet_route::link::LinkAttribute;

use crate::{Netns, XdpPass, attach_xdp_pass, tun::TunRelay, veth, wireguard::WireGuardLink};

pub const LAN_NETWORK: &str = "192.168.0.0/24";
pub const GATEWAY_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);
pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const WAN_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
pub const GATEWAY_LAN_IF: &str = "gw-lan";
pub const GATEWAY_WAN_IF: &str = "gw-wan";

/// What the bed's veths are like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BedKind {
    /// The traps worked around for native XDP: tx checksum offload off on
    /// the hosts, a pass-through XDP program on the peer of every veth the
    /// datapath transmits on.
    #[default]
    NativeXdp,
    /// As on a container host or in a VM lab: every veth keeps its default
    /// offloads (tx checksum offload, TSO/GSO), GRO is on at every end, and
    /// no XDP program is attached to any peer.
    ContainerHost,
}

/// The gateway's WAN link to the WAN host (`gw-wan` to the WAN host's
/// `eth0` either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WanLink {
    /// A veth pair (Ethernet).
    #[default]
    Veth,
    /// A tun device at each end (IP packets, no Ethernet header, like
    /// WireGuard or PPP), joined by a relay thread of the test.
    Tun,
    /// A real WireGuard tunnel: wireguard-go at each end (its interface a
    /// tun device, MTU 1420), the encrypted packets on an underlay veth pair
    /// in 198.51.100.0/24 between the gateway and the WAN host.
    WireGuard,
}

/// What carries an L3 WAN link.
enum L3Link {
    Tun(TunRelay),
    WireGuard(WireGuardLink),
}

pub struct SeedBed {
    pub gateway: Netns,
    pub server: Netns,
    pub client: Netns,
    pub wan: Netns,
    pub lan: Netns,
    pub kind: BedKind,
    pub wan_link: WanLink,
    _xdp_pass: Vec<XdpPass>,
    l3_link: Option<L3Link>,
}

impl Default for SeedBed {
    fn default() -> Self {
        Self::new()
    }
}

impl SeedBed {
    /// The native XDP bed with a veth WAN.
    pub fn new() -> Self {
        Self::with(BedKind::NativeXdp)
    }

    /// A bed of `kind` with a veth WAN.
    pub fn with(kind: BedKind) -> Self {
        Self::build(kind, WanLink::Veth)
    }

    /// A bed of `kind` whose WAN link is `wan_link`.
    pub fn build(kind: BedKind, wan_link: WanLink) -> Self {
        let lan = Netns::new("lan");
        let gateway = Netns::new("gw");
        let server = Netns::new("srv");
        let client = Netns::new("cli");
        let wan = Netns::new("wan");

        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        veth(&gateway, GATEWAY_LAN_IF, &lan, "p-gw");
        veth(&server, "eth0", &lan, "p-srv");
        veth(&client, "eth0", &lan, "p-cli");
        for port in ["p-gw", "p-srv", "p-cli"] {
            lan.ip(&["link", "set", port, "master", "br0"]);
        }
        let l3_link = match wan_link {
            WanLink::Veth => {
                veth(&gateway, GATEWAY_WAN_IF, &wan, "eth0");
                None
            }
            WanLink::Tun => {
                Some(L3Link::Tun(TunRelay::start(&gateway, GATEWAY_WAN_IF, &wan, "eth0")))
            }
            WanLink::WireGuard => Some(L3Link::WireGuard(WireGuardLink::start(
                &gateway,
                GATEWAY_WAN_IF,
                &wan,
                "eth0",
            ))),
        };

        gateway.ip(&["addr", "add", &format!("{GATEWAY_LAN}/24"), "dev", GATEWAY_LAN_IF]);
        gateway.ip(&["addr", "add", &format!("{PUBLIC}/24"), "dev", GATEWAY_WAN_IF]);
        gateway.sysctl("net.ipv4.ip_forward=1");
        for (host, addr) in [(&server, SERVER), (&client, CLIENT)] {
            host.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            host.ip(&["route", "add", "default", "via", &GATEWAY_LAN.to_string()]);
        }
        wan.ip(&["addr", "add", &format!("{WAN_HOST}/24"), "dev", "eth0"]);
        if let Some(L3Link::WireGuard(link)) = &l3_link {
            link.wait_for_handshake(&gateway, &WAN_HOST.to_string());
        }

        let mut xdp_pass = Vec::new();
        match kind {
            BedKind::NativeXdp => {
                // veth hands packets over with partial checksums; XDP_TX
                // would send them on unfinished (a test-bed matter: real
                // NICs deliver complete checksums).
                for host in [&server, &client] {
                    host.exec("ethtool", &["-K", "eth0", "tx", "off"]);
                }
                xdp_pass.push(attach_xdp_pass(&lan, "p-gw"));
                if wan_link == WanLink::Veth {
                    wan.exec("ethtool", &["-K", "eth0", "tx", "off"]);
                    xdp_pass.push(attach_xdp_pass(&wan, "eth0"));
                }
            }
            BedKind::ContainerHost => {
                gro_on(&gateway, GATEWAY_LAN_IF);
                for port in ["p-gw", "p-srv", "p-cli"] {
                    gro_on(&lan, port);
                }
                for host in [&server, &client] {
                    gro_on(host, "eth0");
                }
                if wan_link == WanLink::Veth {
                    gro_on(&gateway, GATEWAY_WAN_IF);
                    gro_on(&wan, "eth0");
                }
            }
        }

        Self { gateway, server, client, wan, lan, kind, wan_link, _xdp_pass: xdp_pass, l3_link }
    }

    /// Lets every veth of the bed carry IPv4 GSO packets of up to `size`
    /// bytes (IPv4 BIG TCP, `gso_ipv4_max_size` and `gro_ipv4_max_size`):
    /// a sender's TCP then hands aggregates over 64 KiB, whose IPv4 total
    /// length is 0, across the bed.
    pub fn enable_big_tcp(&self, size: u32) {
        let mut ends: Vec<(&Netns, &str)> = vec![
            (&self.gateway, GATEWAY_LAN_IF),
            (&self.lan, "p-gw"),
            (&self.lan, "p-srv"),
            (&self.lan, "p-cli"),
            (&self.server, "eth0"),
            (&self.client, "eth0"),
        ];
        if self.wan_link == WanLink::Veth {
            ends.extend([(&self.gateway, GATEWAY_WAN_IF), (&self.wan, "eth0")]);
        }
        // Set over netlink: Debian 12's `ip` does not know these yet.
        for (netns, interface) in ends {
            let name = interface.to_string();
            netns
                .run_in(move || {
                    let index = hairpin::datapath::if_index(&name).map_err(|e| e.to_string())?;
                    hairpin::netlink::set_link_attributes(
                        index,
                        vec![
                            LinkAttribute::GsoIpv4MaxSize(size),
                            LinkAttribute::GroIpv4MaxSize(size),
                        ],
                    )
                    .map_err(|e| e.to_string())
                })
                .unwrap_or_else(|e| panic!("BIG TCP of {size} bytes on {interface}: {e}"));
        }
    }

    /// Packets the tun relay of a tun WAN link carried so far (`None` with
    /// another WAN link).
    pub fn tun_relayed(&self) -> Option<u64> {
        match &self.l3_link {
            Some(L3Link::Tun(relay)) => Some(relay.relayed()),
            _ => None,
        }
    }

    /// Bytes the gateway's end of a WireGuard WAN link received and sent
    /// through the tunnel so far, from `wg show` (`None` with another WAN
    /// link).
    pub fn wireguard_transfer(&self) -> Option<(u64, u64)> {
        match &self.l3_link {
            Some(L3Link::WireGuard(link)) => Some(link.transfer()),
            _ => None,
        }
    }

    /// The hairpin configuration for this bed with the given mappings
    /// (`(proto, public, to)`).
    pub fn config(&self, mappings: &[(&str, &str, &str)]) -> String {
        self.config_with(mappings, &ConfigOptions::default())
    }

    /// [`SeedBed::config`] with optional settings added.
    pub fn config_with(&self, mappings: &[(&str, &str, &str)], options: &ConfigOptions) -> String {
        let mut text = format!(
            "[lan]\ninterfaces = [\"{GATEWAY_LAN_IF}\"]\nnetworks = [\"{LAN_NETWORK}\"]\naddress = \"{GATEWAY_LAN}\"\n"
        );
        if let Some(ports) = &options.snat_ports {
            text.push_str(&format!("snat_ports = \"{ports}\"\n"));
        }
        // XDP explicitly: TC-mode interfaces do not translate yet (the TC
        // datapath's body is to come), and `auto` would pick TC on veths
        // whose peers run no XDP.
        text.push_str(&format!(
            "\n[wan]\ninterface = \"{GATEWAY_WAN_IF}\"\naddresses = [\"{PUBLIC}\"]\n"
        ));
        text.push_str(&datapath_config(options.attach));
        if let Some(listen) = &options.metrics_listen {
            text.push_str(&format!("\n[metrics]\nlisten = \"{listen}\"\n"));
        }
        if let Some(capacity) = options.conntrack_capacity {
            text.push_str(&format!("\n[conntrack]\ncapacity = {capacity}\n"));
        }
        if !options.timeouts.is_empty() {
            text.push_str("\n[timeouts]\n");
            for (key, seconds) in &options.timeouts {
                text.push_str(&format!("{key} = {seconds}\n"));
            }
        }
        for (proto, public, to) in mappings {
            text.push_str(&format!(
                "\n[[mapping]]\nproto = \"{proto}\"\npublic = \"{public}\"\nto = \"{to}\"\n"
            ));
        }
        text
    }

    /// The seed's two netfilter rules for each mapping: DNAT to the server in
    /// PREROUTING, SNAT of LAN-to-LAN traffic to the gateway in POSTROUTING.
    pub fn load_seed_iptables(&self, mappings: &[(&str, &str, &str)]) {
        for mapping in mappings {
            self.dnat(&["-s", LAN_NETWORK], mapping);
        }
        let gateway = GATEWAY_LAN.to_string();
        let snat = ["-A", "POSTROUTING", "-s", LAN_NETWORK, "-d", LAN_NETWORK];
        let mut args = vec!["-t", "nat"];
        args.extend(snat);
        args.extend(["-j", "SNAT", "--to-source", &gateway]);
        self.gateway.exec("iptables", &args);
    }

    /// Port forwards from the WAN, as netfilter does them: for each mapping,
    /// DNAT of packets arriving on the WAN interface for the public address
    /// and port to the server (no SNAT: the server sees the real client).
    pub fn load_port_forward_iptables(&self, mappings: &[(&str, &str, &str)]) {
        for mapping in mappings {
            self.dnat(&["-i", GATEWAY_WAN_IF], mapping);
        }
    }

    /// A PREROUTING DNAT rule for `(proto, public, to)`, for the packets
    /// `selector` picks.
    fn dnat(&self, selector: &[&str], (proto, public, to): &(&str, &str, &str)) {
        let (public_addr, public_ports) = public.split_once(':').expect("public addr:port");
        let ports = public_ports.replace('-', ":");
        let mut args = vec!["-t", "nat", "-A", "PREROUTING"];
        args.extend(selector);
        args.extend(["-d", public_addr, "-p", proto, "--dport", &ports]);
        args.extend(["-j", "DNAT", "--to-destination", to]);
        self.gateway.exec("iptables", &args);
    }

    /// Another host on the LAN bridge, `addr`/24 on its `eth0` with the
    /// gateway as default route, and this bed's kind of veth (like the
    /// client's).
    /// Its namespace is removed when the returned value is dropped.
    pub fn add_lan_host(&self, role: &str, addr: Ipv4Addr) -> Netns {
        let host = Netns::new(role);
        let port: String = format!("p-{role}").chars().take(15).collect();
        veth(&host, "eth0", &self.lan, &port);
        self.lan.ip(&["link", "set", &port, "master", "br0"]);
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        host.ip(&["route", "add", "default", "via", &GATEWAY_LAN.to_string()]);
        match self.kind {
            BedKind::NativeXdp => {
                host.exec("ethtool", &["-K", "eth0", "tx", "off"]);
            }
            BedKind::ContainerHost => {
                gro_on(&self.lan, &port);
                gro_on(&host, "eth0");
            }
        }
        host
    }
}

/// `ethtool -K <interface> gro on`, as a container host with GRO has it.
fn gro_on(netns: &Netns, interface: &str) {
    netns.exec("ethtool", &["-K", interface, "gro", "on"]);
}

/// The offloads `ethtool -k` reports as on for `interface`, e.g.
/// `tx-checksumming`, `generic-receive-offload`.
pub fn offloads_on(netns: &Netns, interface: &str) -> Vec<String> {
    let output = netns.exec("ethtool", &["-k", interface]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().split_once(": ")?;
            value.starts_with("on").then(|| name.to_string())
        })
        .collect()
}

impl Drop for SeedBed {
    /// Whatever hairpin left pinned for this bed's gateway (after a kill, or
    /// `--keep-attached`) goes with the bed: nothing else may use its pins.
    /// An L3 WAN link stops first (its processes, wireguard-go's, live in
    /// the bed's namespaces).
    fn drop(&mut self) {
        drop(self.l3_link.take());
        let _ = std::fs::remove_dir_all(crate::daemon::pin_dir(&self.gateway));
        let _ = std::fs::remove_file(crate::daemon::state_file(&self.gateway));
    }
}

/// How the datapath attaches: `[datapath] attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Xdp,
    Tc,
    /// hairpin picks: TC on interfaces where native XDP cannot deliver
    /// (veths with default offloads and nothing on the peer, L3 devices).
    Auto,
}

impl Attach {
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::Xdp => "xdp",
            Attach::Tc => "tc",
            Attach::Auto => "auto",
        }
    }
}

/// The configuration's datapath sections: without `attach`, only native
/// XDP (what every hairpin so far understands); with it, `[datapath]
/// attach`, and native XDP when that is XDP.
fn datapath_config(attach: Option<Attach>) -> String {
    // The native XDP bed's default: its traps are worked around for XDP.
    let attach = attach.unwrap_or(Attach::Xdp);
    format!("\n[datapath]\nattach = \"{}\"\n", attach.as_str())
}

/// One column of the end-to-end matrix: a kind of bed and how hairpin is
/// told to attach on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathCase {
    /// The native XDP bed, `attach = "xdp"`.
    Xdp,
    /// The container-host bed, `attach = "tc"`.
    Tc,
    /// The container-host bed, `attach = "auto"` (which must pick TC there).
    AutoContainer,
}

impl DatapathCase {
    pub fn bed_kind(self) -> BedKind {
        match self {
            DatapathCase::Xdp => BedKind::NativeXdp,
            DatapathCase::Tc | DatapathCase::AutoContainer => BedKind::ContainerHost,
        }
    }

    pub fn attach(self) -> Option<Attach> {
        match self {
            DatapathCase::Xdp => Some(Attach::Xdp),
            DatapathCase::Tc => Some(Attach::Tc),
            DatapathCase::AutoContainer => Some(Attach::Auto),
        }
    }

    /// Whether hairpin should run its TC datapath on the bed's interfaces.
    pub fn expects_tc(self) -> bool {
        self.bed_kind() == BedKind::ContainerHost
    }

    /// A veth-WAN bed of this case's kind.
    pub fn bed(self) -> SeedBed {
        SeedBed::with(self.bed_kind())
    }

    /// [`ConfigOptions`] with this case's `attach`.
    pub fn options(self) -> ConfigOptions {
        ConfigOptions { attach: self.attach(), ..ConfigOptions::default() }
    }
}

/// Optional settings of a hairpin configuration, beyond the bed's
/// interfaces and the mappings.
#[derive(Clone, Debug, Default)]
pub struct ConfigOptions {
    /// `[lan] snat_ports`, e.g. `"20000-20003"`.
    pub snat_ports: Option<String>,
    /// `[conntrack] capacity`.
    pub conntrack_capacity: Option<u32>,
    /// `[timeouts]`: key (`tcp_established`, `tcp_transitory`, `tcp_opening`, `udp`) and
    /// seconds.
    pub timeouts: Vec<(&'static str, u64)>,
    /// `[metrics] listen`, e.g. `"127.0.0.1:9654"` (inside the gateway's
    /// namespace).
    pub metrics_listen: Option<String>,
    /// `[datapath] attach`; without it the configuration asks for native
    /// XDP only.
    pub attach: Option<Attach>,
}
