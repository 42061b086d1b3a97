//! Program cost through BPF_PROG_TEST_RUN: one packet per call (`repeat` 1,
//! as Katran measures: a repeated run would process the packet the previous
//! run rewrote), the kernel's own duration of each run, medians.

use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use hairpin::{
    config::Config,
    datapath::{Datapath, Table},
};
use hairpin_common::{FlowEntry, RouteCache, bench::programs};
use hairpin_tests::{Netns, raw::with_frag_off, veth};

use crate::{
    beds::{GATEWAY_LAN, PUBLIC, SERVER, TCP_BULK_PORT, UDP_PORT, mac_text},
    programs::{empty_program, forward_program, pin_to_cpu, program},
    stats::{median, percentile},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The source of the new flows, so they never meet the hit path's flow.
const NEW_FLOW_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 3);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const GATEWAY_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const GATEWAY_SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const HIT_PORT: u16 = 40000;
/// The published port of the hit path's UDP flow (the last of the range).
const HIT_UDP_PORT: u16 = UDP_PORT + 15;
const TCP_PORT: u16 = 40001;

/// The cost of one path through one program.
#[derive(Clone, Debug)]
pub struct PathCost {
    pub name: &'static str,
    pub what: &'static str,
    pub runs: usize,
    pub median_ns: f64,
    pub p10_ns: f64,
    pub p90_ns: f64,
    /// Each round's median, in order.
    pub round_medians: Vec<f64>,
}

pub const EMPTY: &str = "empty program";
pub const HIT: &str = "hairpin hit (UDP, established)";
pub const HIT_UNCACHED: &str = "hairpin hit, route cache off";
pub const REPLY: &str = "hairpin reply (UDP, established)";
pub const NEW_FLOW: &str = "hairpin new flow (UDP)";
pub const TCP_HIT: &str = "hairpin hit (TCP ACK, established)";
pub const TCP_REPLY: &str = "hairpin reply (TCP ACK, established)";
pub const NO_MAPPING: &str = "hairpin pass (no mapping)";
pub const FIRST_FRAGMENT: &str = "hairpin first fragment (UDP, established)";
pub const LATER_FRAGMENT: &str = "hairpin later fragment";
pub const FORWARDER: &str = "XDP forwarder, no NAT";

fn hairpin_config() -> String {
    format!(
        "[lan]\ninterfaces = [\"lan0\", \"lan1\"]\nnetworks = [\"192.168.0.0/24\", \"192.168.1.0/24\"]\n\
         address = \"{GATEWAY_LAN}\"\n\n[conntrack]\ncapacity = 1048576\n\n[timeouts]\nudp = 3600\n\n\
         [[mapping]]\nproto = \"udp\"\npublic = \"{PUBLIC}:{UDP_PORT}-{}\"\nto = \"{SERVER}:{UDP_PORT}-{}\"\n\n\
         [[mapping]]\nproto = \"tcp\"\npublic = \"{PUBLIC}:{TCP_BULK_PORT}\"\nto = \"{SERVER}:{TCP_BULK_PORT}\"\n",
        UDP_PORT + 15,
        UDP_PORT + 15
    )
}

fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), from_server: bool) -> Vec<u8> {
    let (smac, dmac) = if from_server {
        (SERVER_MAC, GATEWAY_SERVER_MAC)
    } else {
        (CLIENT_MAC, GATEWAY_CLIENT_MAC)
    };
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut packet, &[0x5a; 18])
        .expect("building a UDP packet");
    packet
}

/// Both sides' initial sequence number: the SYN-ACK acknowledges the SYN
/// exactly, and every later segment (seq and ack `ISN + 1`) is in the window
/// both ways, as the datapath's TCP tracking requires.
const ISN: u32 = 1000;

fn tcp(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    from_server: bool,
    syn: bool,
    ack: bool,
) -> Vec<u8> {
    let (smac, dmac) = if from_server {
        (SERVER_MAC, GATEWAY_SERVER_MAC)
    } else {
        (CLIENT_MAC, GATEWAY_CLIENT_MAC)
    };
    let mut builder = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, if syn { ISN } else { ISN + 1 }, 64240);
    if syn {
        builder = builder.syn();
    }
    if ack {
        builder = builder.ack(ISN + 1);
    }
    let mut packet = Vec::new();
    builder.write(&mut packet, if syn { &[] } else { &[0x5a; 6] }).expect("building a TCP packet");
    packet
}

/// One run of `program` on `packet` received on `ingress`: its verdict and
/// the kernel's duration in ns.
fn run_once(program: &Xdp, packet: &[u8], ingress: u32) -> anyhow::Result<(u32, u32)> {
    let context = hairpin_common::test_run::XdpMd::received(packet.len(), ingress);
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(context.as_bytes()),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((result.return_value, result.duration.as_nanos() as u32))
}

/// A namespace like a routed gateway's: `lan0` towards the server
/// (192.168.0.1/24), `lan1` towards the client (192.168.1.1/24), both
/// neighbours pinned, forwarding on.
fn gateway_netns() -> Netns {
    let netns = Netns::new("bcost");
    for (interface, peer, addr, mac) in [
        ("lan0", "lan0p", "192.168.0.1/24", GATEWAY_SERVER_MAC),
        ("lan1", "lan1p", "192.168.1.1/24", GATEWAY_CLIENT_MAC),
    ] {
        veth(&netns, interface, &netns, peer);
        netns.ip(&["link", "set", interface, "address", &mac_text(mac)]);
        netns.ip(&["addr", "add", addr, "dev", interface]);
    }
    for (addr, mac, interface) in [
        (SERVER, SERVER_MAC, "lan0"),
        (CLIENT, CLIENT_MAC, "lan1"),
        (NEW_FLOW_CLIENT, CLIENT_MAC, "lan1"),
    ] {
        netns.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac_text(mac),
            "dev",
            interface,
            "nud",
            "permanent",
        ]);
    }
    netns.sysctl("net.ipv4.ip_forward=1");
    netns
}

/// Measures every path: `rounds` rounds, each running every path
/// `runs_per_round` times in turn.
pub fn measure(runs_per_round: usize, rounds: usize, cpu: usize) -> anyhow::Result<Vec<PathCost>> {
    let netns = gateway_netns();
    let config: Config = hairpin_config().parse().context("the cost bed's configuration")?;
    netns.run_in(move || {
        pin_to_cpu(cpu)?;
        let mut datapath = Datapath::load(&config, None).context("loading hairpin")?;
        datapath.configure(&config).context("configuring hairpin")?;
        let empty = empty_program()?;
        let forwarder = forward_program(&["lan0", "lan1"])?;
        let lan0 = hairpin::datapath::if_index("lan0")?;
        let lan1 = hairpin::datapath::if_index("lan1")?;

        // The hit flow has a published port of its own: the new flows'
        // SNAT ports never meet it.
        let client_udp = udp((CLIENT, HIT_PORT), (PUBLIC, HIT_UDP_PORT), false);
        let reply_udp = udp((SERVER, HIT_UDP_PORT), (GATEWAY_LAN, HIT_PORT), true);
        let direct_udp = udp((CLIENT, HIT_PORT), (SERVER, UDP_PORT), false);
        let no_mapping = udp((CLIENT, HIT_PORT), (PUBLIC, 9), false);
        let client_ack = tcp((CLIENT, TCP_PORT), (PUBLIC, TCP_BULK_PORT), false, false, true);
        let server_ack = tcp((SERVER, TCP_BULK_PORT), (GATEWAY_LAN, TCP_PORT), true, false, true);

        // Establish the UDP and TCP flows the hit and reply paths use.
        {
            let xdp = datapath.xdp()?;
            for (packet, ingress, what) in [
                (&client_udp, lan1, "UDP from the client"),
                (&reply_udp, lan0, "UDP reply"),
                (
                    &tcp((CLIENT, TCP_PORT), (PUBLIC, TCP_BULK_PORT), false, true, false),
                    lan1,
                    "SYN",
                ),
                (
                    &tcp((SERVER, TCP_BULK_PORT), (GATEWAY_LAN, TCP_PORT), true, true, true),
                    lan0,
                    "SYN-ACK",
                ),
                (&client_ack, lan1, "ACK"),
            ] {
                let (verdict, _) = run_once(xdp, packet, ingress)?;
                ensure!(verdict == XDP_REDIRECT, "{what}: verdict {verdict}, not XDP_REDIRECT");
            }
        }
        // A UDP flow is promoted once it has lasted 2 s both ways: age it
        // by 3 s rather than wait, then let the client's next packet do it.
        for (table_key, entry) in datapath.maps.conntrack(Table::New)? {
            if table_key.proto == hairpin_common::IPPROTO_UDP {
                let aged = FlowEntry {
                    created_s: entry.created_s - 3,
                    last_seen_ns: entry.last_seen_ns - 3_000_000_000,
                    ..entry
                };
                datapath.maps.put_flow(Table::New, &table_key, &aged);
            }
        }
        let (verdict, _) = run_once(datapath.xdp()?, &client_udp, lan1)?;
        ensure!(verdict == XDP_REDIRECT, "UDP stream: verdict {verdict}, not XDP_REDIRECT");
        let established = datapath
            .maps
            .counters()?
            .iter()
            .find(|(counter, _)| *counter == hairpin_common::Counter::FlowEstablished)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        ensure!(established == 2, "{established} flows established, expected 2 (UDP and TCP)");

        let mut new_flow_index = 0u32;
        let mut new_flow = move || {
            let i = new_flow_index;
            new_flow_index += 1;
            let sport = 1024 + (i % 60_000) as u16;
            let dport = UDP_PORT + (i / 60_000) as u16 % (HIT_UDP_PORT - UDP_PORT);
            udp((NEW_FLOW_CLIENT, sport), (PUBLIC, dport), false)
        };

        // The route cache as a running daemon keeps it (no routing changes
        // happen here), or off for the uncached hit path.
        let route_cache = |on: bool| RouteCache {
            generation: 1,
            valid_until_ns: if on { u64::MAX } else { 0 },
            ..Default::default()
        };
        // A datagram of the hit flow in fragments: a first fragment with a
        // new IP ID every run (each leaves its datagram's translation
        // behind), and a later fragment of one datagram whose first was
        // sent just before the round (the translation lives 2 s).
        let mut first_fragment_id = 0u16;
        let first_of_the_hit_flow = client_udp.clone();
        let mut first_fragment = move || {
            first_fragment_id = first_fragment_id.wrapping_add(1);
            let mut packet = first_of_the_hit_flow.clone();
            packet[18..20].copy_from_slice(&first_fragment_id.to_be_bytes());
            with_frag_off(packet, 0x2000)
        };
        let later_datagram = |frag_off: u16| {
            let mut packet = udp((CLIENT, HIT_PORT), (PUBLIC, HIT_UDP_PORT), false);
            packet[18..20].copy_from_slice(&0xfffeu16.to_be_bytes());
            with_frag_off(packet, frag_off)
        };
        let later_first = later_datagram(0x2000);
        let later_fragment = later_datagram(185);
        let names = [
            EMPTY,
            FORWARDER,
            HIT,
            HIT_UNCACHED,
            REPLY,
            TCP_HIT,
            TCP_REPLY,
            NEW_FLOW,
            NO_MAPPING,
            FIRST_FRAGMENT,
            LATER_FRAGMENT,
        ];
        let mut durations: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        let mut round_medians: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        for _ in 0..rounds {
            for (slot, name) in names.iter().enumerate() {
                let cache = route_cache(*name != HIT_UNCACHED);
                datapath.maps.set_route_cache(cache).context("setting the route cache")?;
                if *name == LATER_FRAGMENT {
                    let (verdict, _) = run_once(datapath.xdp()?, &later_first, lan1)?;
                    ensure!(verdict == XDP_REDIRECT, "first fragment: verdict {verdict}");
                }
                let mut round = Vec::with_capacity(runs_per_round);
                for _ in 0..runs_per_round {
                    let (verdict, ns, expected) = match *name {
                        EMPTY => {
                            let (v, ns) =
                                run_once(program(&empty, programs::EMPTY)?, &client_udp, lan1)?;
                            (v, ns, XDP_PASS)
                        }
                        FORWARDER => {
                            let (v, ns) = run_once(
                                program(&forwarder, programs::FORWARD)?,
                                &direct_udp,
                                lan1,
                            )?;
                            (v, ns, XDP_REDIRECT)
                        }
                        HIT | HIT_UNCACHED => {
                            let (v, ns) = run_once(datapath.xdp()?, &client_udp, lan1)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        REPLY => {
                            let (v, ns) = run_once(datapath.xdp()?, &reply_udp, lan0)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        TCP_HIT => {
                            let (v, ns) = run_once(datapath.xdp()?, &client_ack, lan1)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        TCP_REPLY => {
                            let (v, ns) = run_once(datapath.xdp()?, &server_ack, lan0)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        NEW_FLOW => {
                            let packet = new_flow();
                            let (v, ns) = run_once(datapath.xdp()?, &packet, lan1)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        FIRST_FRAGMENT => {
                            let packet = first_fragment();
                            let (v, ns) = run_once(datapath.xdp()?, &packet, lan1)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        LATER_FRAGMENT => {
                            let (v, ns) = run_once(datapath.xdp()?, &later_fragment, lan1)?;
                            (v, ns, XDP_REDIRECT)
                        }
                        _ => {
                            let (v, ns) = run_once(datapath.xdp()?, &no_mapping, lan1)?;
                            (v, ns, XDP_PASS)
                        }
                    };
                    if verdict != expected {
                        let counters: Vec<String> = datapath
                            .maps
                            .counters()?
                            .iter()
                            .filter(|(_, n)| *n > 0)
                            .map(|(c, n)| format!("{c:?} {n}"))
                            .collect();
                        anyhow::bail!(
                            "{name}: verdict {verdict}, expected {expected} (run {} of the round; hairpin's counters: {})",
                            round.len(),
                            counters.join(", ")
                        );
                    }
                    round.push(f64::from(ns));
                }
                round_medians[slot].push(median(&round));
                durations[slot].extend(round);
            }
        }
        Ok(names
            .iter()
            .enumerate()
            .map(|(slot, name)| PathCost {
                name,
                what: describe(name),
                runs: durations[slot].len(),
                median_ns: median(&durations[slot]),
                p10_ns: percentile(&durations[slot], 10.0),
                p90_ns: percentile(&durations[slot], 90.0),
                round_medians: round_medians[slot].clone(),
            })
            .collect())
    })
}

fn describe(name: &str) -> &'static str {
    match name {
        EMPTY => "`return XDP_PASS`: the test-run harness and the program call",
        FORWARDER => "bpf_fib_lookup, MAC and TTL rewrite, devmap redirect",
        HIT => {
            "client → public address, flow established: conntrack lookup, cached route, rewrite, redirect"
        }
        HIT_UNCACHED => "the same with the route cache off: bpf_fib_lookup on every packet",
        REPLY => "server → gateway, translated back to the client",
        TCP_HIT => "client ACK of an established connection",
        TCP_REPLY => "server ACK of it: the windows are in the client's entry, one lookup more",
        NEW_FLOW => "a new source port every run: mapping, SNAT port, two inserts",
        FIRST_FRAGMENT => {
            "the hit path for a datagram's first fragment, which leaves its translation in the fragment table (one insert)"
        }
        LATER_FRAGMENT => {
            "a fragment without ports: fragment table lookup, address rewrite, redirect"
        }
        _ => "a port nothing is published on: to the kernel",
    }
}
