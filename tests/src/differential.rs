//! The differential bed: the seed's topology with one kind of NAT on the
//! gateway, the seed's iptables rules or hairpin alone, so that a scenario
//! can be shown to end the same way through both. With hairpin, netfilter
//! probes prove none of the flows' packets reached the kernel's stack.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
};

use crate::{
    apps::Servers,
    cli::assert_datapath,
    daemon::Daemon,
    netfilter::{add_netfilter_probes, netfilter_probe_listing, netfilter_probe_packets},
    seed::{DatapathCase, GATEWAY_LAN_IF, GATEWAY_WAN_IF, PUBLIC, SeedBed},
};

pub const HTTP_PORT: u16 = 80;
pub const UDP_SERVER_PORT: u16 = 5353;

/// What translates the flows on the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// The seed's rules and netfilter port forwards from the WAN; hairpin is
    /// not running.
    Iptables,
    /// hairpin alone, no netfilter NAT rule.
    Hairpin,
}

/// The seed's bed with its servers running and one kind of NAT on the
/// gateway, netfilter probes counting the published services' packets.
pub struct Bed {
    pub nat: Nat,
    /// The kind of bed, and how hairpin attaches when it is the NAT.
    pub case: DatapathCase,
    pub seed: SeedBed,
    _servers: Servers,
    daemon: Option<Daemon>,
}

impl Bed {
    /// The bed and its servers; no NAT yet, so the test can change the
    /// topology first.
    pub fn new(nat: Nat) -> Self {
        Self::on(nat, DatapathCase::Xdp)
    }

    /// Like [`Bed::new`], on `case`'s kind of bed (hairpin attaching as
    /// `case` says).
    pub fn on(nat: Nat, case: DatapathCase) -> Self {
        let seed = case.bed();
        let servers = Servers::start(&seed.server, HTTP_PORT, UDP_SERVER_PORT);
        Self { nat, case, seed, _servers: servers, daemon: None }
    }

    /// Installs the probes (counting only packets up to `probe_max_ip_len`
    /// when given) and starts the NAT.
    pub fn start_nat(&mut self, mappings: &[(&str, &str, &str)], probe_max_ip_len: Option<u16>) {
        add_netfilter_probes(&self.seed.gateway, mappings, probe_max_ip_len);
        match self.nat {
            Nat::Iptables => {
                self.seed.load_seed_iptables(mappings);
                self.seed.load_port_forward_iptables(mappings);
            }
            Nat::Hairpin => {
                let config = self.seed.config_with(mappings, &self.case.options());
                self.daemon = Some(Daemon::start(&self.seed.gateway, &config));
                assert_datapath(
                    &self.seed.gateway,
                    &[GATEWAY_LAN_IF, GATEWAY_WAN_IF],
                    self.case.expects_tc(),
                );
            }
        }
    }

    /// Checks what netfilter saw: with iptables, the probes must have
    /// counted the flows (so they do count); with hairpin, nothing. Returns
    /// hairpin's counters (empty with iptables).
    pub fn finish(mut self) -> BTreeMap<String, u64> {
        let packets = netfilter_probe_packets(&self.seed.gateway);
        let listing = netfilter_probe_listing(&self.seed.gateway);
        let counters = self.daemon.take().map(Daemon::stop).unwrap_or_default();
        println!("netfilter probes ({:?}):\n{listing}", self.nat);
        println!("hairpin's counters: {counters:?}");
        match self.nat {
            Nat::Iptables => assert!(
                packets > 0,
                "with iptables NAT the probes should have counted the flows' packets:\n{listing}"
            ),
            Nat::Hairpin => assert_eq!(
                packets, 0,
                "with hairpin, {packets} packets of its flows reached netfilter:\n{listing}\nhairpin's counters: {counters:?}"
            ),
        }
        counters
    }
}

pub fn public(port: u16) -> SocketAddr {
    SocketAddrV4::new(PUBLIC, port).into()
}

pub fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}
