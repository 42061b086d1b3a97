//! The benchmark's network-namespace beds and the gateway configurations
//! compared on them.
//!
//! ```text
//! routed:  client 192.168.1.2 ─ gw-cli [gateway] gw-srv ─ server 192.168.0.2
//! bridge:  the seed's one-armed LAN (client 192.168.0.3, server 192.168.0.2
//!          and the gateway's gw-lan on one bridge)
//! floor:   client ─ server, one veth pair, no gateway
//! ```
//!
//! The public address is 203.0.113.1 on both beds; UDP ports 10000-10015 and
//! TCP ports 7000-7002 of it are published to the same ports of the server.

use std::{any::Any, fmt, net::Ipv4Addr};

use anyhow::Context as _;
use hairpin::{
    config::Config,
    datapath::Datapath,
    routes::{KeeperThread, RouteCacheKeeper},
};
use hairpin_tests::{Netns, XdpPass, attach_xdp_pass, daemon::Daemon, seed::SeedBed, veth};

use crate::programs::{Forwarder, TcForwarder};

pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
pub const SERVER_NET: &str = "192.168.0.0/24";
/// The gateway's address on the server's network: the hairpin SNAT source.
pub const GATEWAY_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
const ROUTED_GATEWAY_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const ROUTED_CLIENT_NET: &str = "192.168.1.0/24";

/// The published UDP ports (public and server alike): the first and how many.
pub const UDP_PORT: u16 = 10000;
pub const UDP_PORTS: u16 = 16;
/// The published TCP ports: bulk (iperf3), request/response, connect/request/response.
pub const TCP_BULK_PORT: u16 = 7000;
pub const TCP_RR_PORT: u16 = 7001;
pub const TCP_CRR_PORT: u16 = 7002;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BedKind {
    /// Client and server on separate gateway interfaces.
    Routed,
    /// The seed's one-armed LAN: client, server and gateway on one bridge.
    Bridge,
}

impl fmt::Display for BedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BedKind::Routed => "routed",
            BedKind::Bridge => "bridge",
        })
    }
}

/// What the gateway does with the client's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Gateway {
    /// Kernel forwarding, no NAT: the client sends to the server's address.
    KernelRouting,
    /// The seed's netfilter rules (DNAT to the server, SNAT to the gateway).
    Iptables,
    /// The same rules written for nftables.
    Nftables,
    /// hairpin in native XDP (`[datapath] attach = "xdp"`).
    Hairpin,
    /// hairpin's TC datapath (`attach = "tc"`, `hairpin_tc` on tcx ingress):
    /// it sees skbs and redirects skbs, like the kernel configurations.
    HairpinTc,
    /// The XDP forwarder without NAT (`bench_forward`): the limit of any XDP
    /// gateway on this path; the client sends to the server's address.
    XdpForwarder,
    /// The same forwarder on skbs (`bench_forward_tc` on tcx ingress): the
    /// limit of any TC gateway on this path.
    TcForwarder,
    /// `hairpin run`, the daemon an operator runs (XDP, pinned maps, its
    /// metrics on [`METRICS_LISTEN`] in the gateway's namespace): what the
    /// control-plane part measures the CLI and the scrapes against.
    HairpinDaemon,
}

/// Where [`Gateway::HairpinDaemon`] serves its metrics.
pub const METRICS_LISTEN: &str = "127.0.0.1:9464";

impl Gateway {
    pub const ALL: [Gateway; 7] = [
        Gateway::KernelRouting,
        Gateway::Iptables,
        Gateway::Nftables,
        Gateway::Hairpin,
        Gateway::HairpinTc,
        Gateway::XdpForwarder,
        Gateway::TcForwarder,
    ];

    /// Whether the client talks to the public address (else to the server's).
    pub fn translates(self) -> bool {
        matches!(
            self,
            Gateway::Iptables
                | Gateway::Nftables
                | Gateway::Hairpin
                | Gateway::HairpinTc
                | Gateway::HairpinDaemon
        )
    }

    /// Whether an XDP program runs on the gateway's ingress interface (and
    /// so transmits XDP frames, which a veth peer takes only with an XDP
    /// program of its own).
    pub fn is_xdp(self) -> bool {
        matches!(self, Gateway::Hairpin | Gateway::HairpinDaemon | Gateway::XdpForwarder)
    }

    /// What the end hosts need for TCP through this gateway: an XDP pass
    /// program only where the gateway sends XDP frames; everything else
    /// (the kernel, hairpin's TC datapath) hands skbs on.
    pub fn tcp_hosts(self) -> Hosts {
        if self.is_xdp() { Hosts::XdpPass } else { Hosts::Bare }
    }

    /// hairpin's `[datapath] attach` mode, for the hairpin configurations.
    pub fn hairpin_attach(self) -> Option<&'static str> {
        match self {
            Gateway::Hairpin | Gateway::HairpinDaemon => Some("xdp"),
            Gateway::HairpinTc => Some("tc"),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Gateway::KernelRouting => "kernel routing, no NAT",
            Gateway::Iptables => "iptables (seed rules)",
            Gateway::Nftables => "nftables (same rules)",
            Gateway::Hairpin => "hairpin",
            Gateway::HairpinTc => "hairpin, TC datapath",
            Gateway::XdpForwarder => "XDP forwarder, no NAT",
            Gateway::TcForwarder => "TC forwarder, no NAT",
            Gateway::HairpinDaemon => "hairpin run (the daemon)",
        }
    }
}

/// What the end hosts' interfaces run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// Nothing: the UDP benches attach their sinks themselves.
    Bare,
    /// An XDP pass program on both, so XDP_TX/REDIRECT from the gateway
    /// reaches their stacks (TCP).
    XdpPass,
}

/// A bed: a gateway between a client and a server.
pub struct Bed {
    pub kind: BedKind,
    inner: Inner,
    _xdp_pass: Vec<XdpPass>,
}

enum Inner {
    Routed { gateway: Netns, client: Netns, server: Netns },
    Bridge(Box<SeedBed>),
}

/// Interface names: the hosts' own interface is `eth0` on every bed.
pub const HOST_IF: &str = "eth0";

impl Bed {
    pub fn new(kind: BedKind, hosts: Hosts) -> Self {
        let mut xdp_pass = Vec::new();
        let inner = match kind {
            BedKind::Routed => {
                let gateway = Netns::new("bgw");
                let client = Netns::new("bcli");
                let server = Netns::new("bsrv");
                veth(&gateway, "gw-cli", &client, HOST_IF);
                veth(&gateway, "gw-srv", &server, HOST_IF);
                // The public address is the gateway's own (no WAN side is needed).
                gateway.ip(&["addr", "add", &format!("{PUBLIC}/32"), "dev", "lo"]);
                gateway.ip(&[
                    "addr",
                    "add",
                    &format!("{ROUTED_GATEWAY_CLIENT_SIDE}/24"),
                    "dev",
                    "gw-cli",
                ]);
                gateway.ip(&["addr", "add", &format!("{GATEWAY_LAN}/24"), "dev", "gw-srv"]);
                client.ip(&["addr", "add", &format!("{ROUTED_CLIENT}/24"), "dev", HOST_IF]);
                client.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &ROUTED_GATEWAY_CLIENT_SIDE.to_string(),
                ]);
                server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", HOST_IF]);
                server.ip(&["route", "add", "default", "via", &GATEWAY_LAN.to_string()]);
                Inner::Routed { gateway, client, server }
            }
            BedKind::Bridge => {
                let seed = SeedBed::new();
                // The generator's XDP_TX and the server's replies enter the
                // bridge through these ports.
                xdp_pass.push(attach_xdp_pass(&seed.lan, "p-cli"));
                xdp_pass.push(attach_xdp_pass(&seed.lan, "p-srv"));
                Inner::Bridge(Box::new(seed))
            }
        };
        let bed = Self { kind, inner, _xdp_pass: xdp_pass };
        let gateway = bed.gateway();
        gateway.sysctl("net.ipv4.ip_forward=1");
        for scope in ["all", "default"] {
            gateway.sysctl(&format!("net.ipv4.conf.{scope}.send_redirects=0"));
            gateway.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter=0"));
        }
        for interface in bed.gateway_interfaces() {
            gateway.sysctl(&format!("net.ipv4.conf.{interface}.send_redirects=0"));
        }
        // The sinks drop ARP: every neighbour is pinned.
        let client_mac = mac_text(bed.client().mac(HOST_IF));
        let server_mac = mac_text(bed.server().mac(HOST_IF));
        let (client_if, server_if) = bed.gateway_sides();
        gateway.ip(&[
            "neigh",
            "replace",
            &bed.client_addr().to_string(),
            "lladdr",
            &client_mac,
            "dev",
            client_if,
            "nud",
            "permanent",
        ]);
        gateway.ip(&[
            "neigh",
            "replace",
            &SERVER.to_string(),
            "lladdr",
            &server_mac,
            "dev",
            server_if,
            "nud",
            "permanent",
        ]);
        let gateway_client_mac = mac_text(gateway.mac(client_if));
        let gateway_server_mac = mac_text(gateway.mac(server_if));
        let client_gateway = bed.client_gateway().to_string();
        bed.client().ip(&[
            "neigh",
            "replace",
            &client_gateway,
            "lladdr",
            &gateway_client_mac,
            "dev",
            HOST_IF,
            "nud",
            "permanent",
        ]);
        bed.server().ip(&[
            "neigh",
            "replace",
            &GATEWAY_LAN.to_string(),
            "lladdr",
            &gateway_server_mac,
            "dev",
            HOST_IF,
            "nud",
            "permanent",
        ]);
        if kind == BedKind::Routed {
            // As the seed bed does: XDP_TX from the gateway needs complete
            // checksums from the senders.
            for host in [bed.client(), bed.server()] {
                host.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
            }
        }
        let mut bed = bed;
        if hosts == Hosts::XdpPass {
            let client = attach_xdp_pass(bed.client(), HOST_IF);
            let server = attach_xdp_pass(bed.server(), HOST_IF);
            bed._xdp_pass.extend([client, server]);
        }
        bed
    }

    pub fn gateway(&self) -> &Netns {
        match &self.inner {
            Inner::Routed { gateway, .. } => gateway,
            Inner::Bridge(seed) => &seed.gateway,
        }
    }

    pub fn client(&self) -> &Netns {
        match &self.inner {
            Inner::Routed { client, .. } => client,
            Inner::Bridge(seed) => &seed.client,
        }
    }

    pub fn server(&self) -> &Netns {
        match &self.inner {
            Inner::Routed { server, .. } => server,
            Inner::Bridge(seed) => &seed.server,
        }
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        match self.kind {
            BedKind::Routed => ROUTED_CLIENT,
            BedKind::Bridge => hairpin_tests::seed::CLIENT,
        }
    }

    /// The gateway address the client routes through.
    fn client_gateway(&self) -> Ipv4Addr {
        match self.kind {
            BedKind::Routed => ROUTED_GATEWAY_CLIENT_SIDE,
            BedKind::Bridge => GATEWAY_LAN,
        }
    }

    /// The clients' network (NAT rules, hairpin's LAN networks).
    pub fn client_net(&self) -> &'static str {
        match self.kind {
            BedKind::Routed => ROUTED_CLIENT_NET,
            BedKind::Bridge => SERVER_NET,
        }
    }

    /// The gateway's interfaces towards the client and towards the server.
    pub fn gateway_sides(&self) -> (&'static str, &'static str) {
        match self.kind {
            BedKind::Routed => ("gw-cli", "gw-srv"),
            BedKind::Bridge => {
                (hairpin_tests::seed::GATEWAY_LAN_IF, hairpin_tests::seed::GATEWAY_LAN_IF)
            }
        }
    }

    fn gateway_interfaces(&self) -> Vec<&'static str> {
        let (client, server) = self.gateway_sides();
        if client == server { vec![client] } else { vec![client, server] }
    }

    /// The MAC addresses the client's and the server's frames go to.
    pub fn gateway_macs(&self) -> ([u8; 6], [u8; 6]) {
        let (client, server) = self.gateway_sides();
        (self.gateway().mac(client), self.gateway().mac(server))
    }

    /// Makes the gateway do `gateway`'s job; undone when the result is
    /// dropped (the netfilter rules go with the namespace).
    ///
    /// `receive_xdp`: the gateway's interfaces must take XDP_TX frames from
    /// the live-frame generator, so kernel configurations get an XDP pass
    /// program there (a veth needs one to receive XDP frames).
    pub fn configure(
        &self,
        gateway: Gateway,
        receive_xdp: bool,
        conntrack_capacity: u32,
    ) -> anyhow::Result<Box<dyn Any>> {
        let mut kept: Vec<Box<dyn Any>> = Vec::new();
        let interfaces = self.gateway_interfaces();
        if receive_xdp && !gateway.is_xdp() {
            for interface in &interfaces {
                kept.push(Box::new(attach_xdp_pass(self.gateway(), interface)));
            }
        }
        match gateway {
            Gateway::KernelRouting => {}
            Gateway::Iptables => self.iptables(),
            Gateway::Nftables => self.nftables()?,
            Gateway::Hairpin | Gateway::HairpinTc => {
                let attach = gateway.hairpin_attach().expect("a hairpin configuration");
                let (datapath, keeper) = self.hairpin(attach, conntrack_capacity)?;
                kept.push(Box::new(datapath));
                kept.push(Box::new(keeper));
            }
            Gateway::HairpinDaemon => {
                let config = format!(
                    "{}\n[metrics]\nlisten = \"{METRICS_LISTEN}\"\n",
                    self.hairpin_config("xdp", conntrack_capacity)
                );
                kept.push(Box::new(Daemon::start(self.gateway(), &config)));
            }
            Gateway::XdpForwarder => {
                let (client_if, server_if) = self.gateway_sides();
                kept.push(Box::new(Forwarder::attach(self.gateway(), client_if, &[server_if])?));
                if receive_xdp && client_if != server_if {
                    kept.push(Box::new(attach_xdp_pass(self.gateway(), server_if)));
                }
            }
            Gateway::TcForwarder => {
                let (client_if, _) = self.gateway_sides();
                kept.push(Box::new(TcForwarder::attach(self.gateway(), client_if)?));
            }
        }
        Ok(Box::new(kept))
    }

    fn iptables(&self) {
        let gateway = self.gateway();
        let public = PUBLIC.to_string();
        let server = SERVER.to_string();
        let udp_ports = format!("{UDP_PORT}:{}", UDP_PORT + UDP_PORTS - 1);
        let tcp_ports = format!("{TCP_BULK_PORT}:{TCP_CRR_PORT}");
        for (proto, ports) in [("udp", &udp_ports), ("tcp", &tcp_ports)] {
            gateway.exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-s",
                    self.client_net(),
                    "-d",
                    &public,
                    "-p",
                    proto,
                    "--dport",
                    ports,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &server,
                ],
            );
        }
        gateway.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                self.client_net(),
                "-d",
                SERVER_NET,
                "-j",
                "SNAT",
                "--to-source",
                &GATEWAY_LAN.to_string(),
            ],
        );
    }

    /// The nftables rules, for the results file.
    pub fn nftables_ruleset(&self) -> String {
        let clients = self.client_net();
        let udp_last = UDP_PORT + UDP_PORTS - 1;
        format!(
            "table ip hairpin_bench {{\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tip saddr {clients} ip daddr {PUBLIC} udp dport {UDP_PORT}-{udp_last} dnat to {SERVER}\n\
             \t\tip saddr {clients} ip daddr {PUBLIC} tcp dport {TCP_BULK_PORT}-{TCP_CRR_PORT} dnat to {SERVER}\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {clients} ip daddr {SERVER_NET} snat to {GATEWAY_LAN}\n\
             \t}}\n\
             }}\n"
        )
    }

    fn nftables(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = self
            .gateway()
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("starting nft")?;
        child
            .stdin
            .take()
            .context("nft's input")?
            .write_all(self.nftables_ruleset().as_bytes())
            .context("writing the ruleset to nft")?;
        let status = child.wait().context("waiting for nft")?;
        anyhow::ensure!(status.success(), "nft -f failed: {status}");
        Ok(())
    }

    /// hairpin's configuration for this bed, attached as `attach` says
    /// (`xdp` or `tc`).
    pub fn hairpin_config(&self, attach: &str, conntrack_capacity: u32) -> String {
        let interfaces: Vec<String> =
            self.gateway_interfaces().iter().map(|name| format!("\"{name}\"")).collect();
        let mut networks = vec![format!("\"{SERVER_NET}\"")];
        if self.client_net() != SERVER_NET {
            networks.push(format!("\"{}\"", self.client_net()));
        }
        let udp_last = UDP_PORT + UDP_PORTS - 1;
        format!(
            "[lan]\ninterfaces = [{}]\nnetworks = [{}]\naddress = \"{GATEWAY_LAN}\"\n\n\
             [datapath]\nattach = \"{attach}\"\n\n\
             [conntrack]\ncapacity = {conntrack_capacity}\n\n\
             [timeouts]\nudp = 3600\n\n\
             [[mapping]]\nproto = \"udp\"\npublic = \"{PUBLIC}:{UDP_PORT}-{udp_last}\"\nto = \"{SERVER}:{UDP_PORT}-{udp_last}\"\n\n\
             [[mapping]]\nproto = \"tcp\"\npublic = \"{PUBLIC}:{TCP_BULK_PORT}-{TCP_CRR_PORT}\"\nto = \"{SERVER}:{TCP_BULK_PORT}-{TCP_CRR_PORT}\"\n",
            interfaces.join(", "),
            networks.join(", ")
        )
    }

    /// Loads, configures and attaches hairpin on the gateway (no pins),
    /// with the route cache kept as `hairpin run` keeps it.
    pub fn hairpin(
        &self,
        attach: &str,
        conntrack_capacity: u32,
    ) -> anyhow::Result<(Datapath, KeeperThread)> {
        let config: Config = self
            .hairpin_config(attach, conntrack_capacity)
            .parse()
            .context("hairpin's configuration")?;
        self.gateway().run_in(move || {
            let mut datapath = Datapath::load(&config, None).context("loading hairpin")?;
            datapath.configure(&config).context("configuring hairpin")?;
            datapath.attach(&config).context("attaching hairpin")?;
            let keeper = RouteCacheKeeper::start(&datapath.maps).context("the route cache")?;
            Ok((datapath, keeper.spawn()))
        })
    }
}

/// Two namespaces joined by one veth pair: the generator straight into the
/// sink, no gateway (the floor every gateway's share is taken from).
pub struct FloorBed {
    pub client: Netns,
    pub server: Netns,
}

impl FloorBed {
    pub fn new() -> Self {
        let client = Netns::new("bfc");
        let server = Netns::new("bfs");
        veth(&client, HOST_IF, &server, HOST_IF);
        Self { client, server }
    }
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
