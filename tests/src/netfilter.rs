//! Probes that count the packets of published services netfilter sees on a
//! gateway, and the gateway's kernel conntrack table.
//!
//! The probes sit in the raw table's PREROUTING, before conntrack and NAT,
//! in a chain of their own, so their counters are exactly the packets of the
//! services that reached the kernel's stack. Packets handled in XDP
//! (`XDP_TX`, `XDP_REDIRECT`) never get there.

use std::net::Ipv4Addr;

use crate::Netns;

const CHAIN: &str = "HAIRPIN_PROBE";

/// Adds a probe for each direction of each mapping (`(proto, public, to)` as
/// in [`crate::seed::SeedBed::config`]): packets to the public address and
/// port, packets from the server's address and port, fragments to the
/// public address or from the server, and ICMP from the server (errors
/// about the flows). With `max_ip_len`, only packets whose
/// IPv4 total length is at most that are counted (larger ones are the
/// kernel's to answer with "fragmentation needed").
pub fn add_netfilter_probes(
    gateway: &Netns,
    mappings: &[(&str, &str, &str)],
    max_ip_len: Option<u16>,
) {
    if gateway.try_exec("iptables", &["-t", "raw", "-n", "-L", CHAIN]).status.success() {
        panic!("netfilter probes are already installed in {}", gateway.name());
    }
    gateway.exec("iptables", &["-t", "raw", "-N", CHAIN]);
    gateway.exec("iptables", &["-t", "raw", "-A", "PREROUTING", "-j", CHAIN]);
    let length = max_ip_len.map(|len| format!("0:{len}"));
    let mut servers: Vec<&str> = Vec::new();
    for (proto, public, to) in mappings {
        let (public_addr, public_ports) = split_endpoint(public);
        let (server_addr, server_ports) = split_endpoint(to);
        for (direction, addr, ports) in [
            (["-d", "--dport"], public_addr, public_ports),
            (["-s", "--sport"], server_addr, server_ports),
        ] {
            let mut rule = vec![
                "-t",
                "raw",
                "-A",
                CHAIN,
                direction[0],
                addr,
                "-p",
                proto,
                direction[1],
                &ports,
            ];
            if let Some(length) = &length {
                rule.extend(["-m", "length", "--length", length]);
            }
            gateway.exec("iptables", &rule);
        }
        if !servers.contains(&server_addr) {
            servers.push(server_addr);
        }
    }
    // Later fragments carry no ports: any fragment to a public address or
    // from a server is one of the flows'. (With netfilter's NAT, the
    // kernel reassembles before the raw table, and these never count.)
    let mut publics: Vec<&str> =
        mappings.iter().map(|(_, public, _)| split_endpoint(public).0).collect();
    publics.dedup();
    for public in publics {
        gateway.exec("iptables", &["-t", "raw", "-A", CHAIN, "-d", public, "-f"]);
    }
    for server in &servers {
        gateway.exec("iptables", &["-t", "raw", "-A", CHAIN, "-s", server, "-f"]);
    }
    for server in servers {
        let mut rule = vec!["-t", "raw", "-A", CHAIN, "-s", server, "-p", "icmp"];
        if let Some(length) = &length {
            rule.extend(["-m", "length", "--length", length]);
        }
        gateway.exec("iptables", &rule);
    }
}

/// `ADDRESS:PORT` or `ADDRESS:FIRST-LAST` as iptables wants them.
fn split_endpoint(endpoint: &str) -> (&str, String) {
    let (addr, ports) =
        endpoint.rsplit_once(':').unwrap_or_else(|| panic!("`{endpoint}` is not ADDRESS:PORT"));
    (addr, ports.replace('-', ":"))
}

/// Packets counted by the probes so far.
pub fn netfilter_probe_packets(gateway: &Netns) -> u64 {
    let output = gateway.exec("iptables", &["-t", "raw", "-L", CHAIN, "-v", "-x", "-n"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(2)
        .map(|line| {
            line.split_whitespace()
                .next()
                .and_then(|packets| packets.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected line in the probe counters: {line}"))
        })
        .sum()
}

/// The probe rules with their counters, for failure messages.
pub fn netfilter_probe_listing(gateway: &Netns) -> String {
    let output = gateway.exec("iptables", &["-t", "raw", "-L", CHAIN, "-v", "-x", "-n"]);
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Zeroes the probes' counters.
pub fn reset_netfilter_probes(gateway: &Netns) {
    gateway.exec("iptables", &["-t", "raw", "-Z", CHAIN]);
}

/// The kernel conntrack entries with original destination `destination`.
pub fn kernel_conntrack_entries(gateway: &Netns, destination: Ipv4Addr) -> String {
    let output = gateway.try_exec("conntrack", &["-L", "-d", &destination.to_string()]);
    String::from_utf8_lossy(&output.stdout).to_string()
}
