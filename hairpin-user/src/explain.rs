//! `hairpin explain`: one packet through the running instance's program
//! (BPF_PROG_TEST_RUN), with its verdict and rewritten headers, leaving no
//! state behind.

use std::{fmt, net::SocketAddrV4};

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use hairpin_common::{
    Counter, FlowEntry, FlowKey,
    maps::{names, programs},
};

use crate::{
    config::Proto,
    datapath::{DatapathError, PinDir},
    maps::{Maps, Table, host_addr, wire_addr},
};

/// What the datapath does with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub action: String,
    /// The counters the packet moved (its verdict and what it caused).
    pub counters: Vec<&'static str>,
    pub input: Headers,
    /// The packet as it would leave, when it is sent on.
    pub output: Option<Headers>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
}

impl fmt::Display for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            _ => "ip",
        };
        write!(f, "{proto} {} -> {} ttl {}", self.src, self.dst, self.ttl)
    }
}

const XDP_ACTIONS: [&str; 5] = [
    "aborted",
    "drop",
    "pass to the kernel",
    "send back out of the same interface (XDP_TX)",
    "redirect to another interface (XDP_REDIRECT)",
];

/// Builds a TCP SYN or a UDP datagram from `src` to `dst` as received on
/// `if_index`, runs it through a copy of the program that shares the
/// instance's tables (but has its own counters), and undoes any conntrack
/// change it made.
pub fn explain(
    pins: &PinDir,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    if_index: u32,
) -> Result<Explanation, DatapathError> {
    if crate::EBPF_OBJECT.is_empty() {
        return Err(DatapathError::NoEbpfObject);
    }
    crate::maps::check_layout(&pins.maps())?;
    let mut loader = EbpfLoader::new();
    let private = [names::COUNTERS, names::MAPPING_STATS];
    let shared: Vec<(&str, std::path::PathBuf)> = names::SHARED
        .iter()
        .filter(|n| !private.contains(n))
        .map(|n| (*n, pins.maps().join(n)))
        .collect();
    for (name, path) in &shared {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
    let mut maps = Maps::take(&mut ebpf)?;
    let xdp: &mut Xdp = ebpf
        .program_mut(programs::XDP)
        .ok_or(DatapathError::Program {
            name: programs::XDP,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
    xdp.load().map_err(|source| DatapathError::Program { name: programs::XDP, source })?;

    let packet = build_packet(proto, src, dst);
    let key = FlowKey::new(
        wire_addr(*src.ip()),
        wire_addr(*dst.ip()),
        src.port().to_be(),
        dst.port().to_be(),
        proto.number(),
    );
    let before = snapshot(&maps, &key)?;

    let ctx: Vec<u8> =
        [0, packet.len() as u32, 0, if_index, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; packet.len() + 256];
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
    out.truncate(result.data_size_out as usize);

    let counters: Vec<(Counter, u64)> = maps.counters()?;
    let moved: Vec<&'static str> =
        counters.iter().filter(|(_, v)| *v > 0).map(|(c, _)| c.name()).collect();
    const XDP_PASS: u32 = 2;
    let handed_on = moved.contains(&Counter::NeighRedirected.name());
    let sent =
        matches!(result.return_value, 3 | 4) || (result.return_value == XDP_PASS && handed_on);
    // A packet handed to the kernel has the TC program's metadata in front.
    let start =
        if result.return_value == XDP_PASS { out.len().saturating_sub(packet.len()) } else { 0 };
    let output = if sent { parse(&out[start..]) } else { None };
    let created = counters.iter().any(|(c, v)| *c == Counter::FlowCreated && *v > 0);
    restore(&mut maps, &before, created.then(|| output.map(|h| reply_key(&h))).flatten(), &key);

    let action = XDP_ACTIONS.get(result.return_value as usize).copied().unwrap_or("unknown");
    let action = if result.return_value == XDP_PASS && handed_on {
        "hand to the kernel translated, to send once the next hop's MAC is resolved"
    } else {
        action
    };
    Ok(Explanation {
        action: action.to_string(),
        counters: moved,
        input: parse(&packet).expect("a packet built here parses"),
        output,
    })
}

fn reply_key(out: &Headers) -> FlowKey {
    FlowKey::new(
        wire_addr(*out.dst.ip()),
        wire_addr(*out.src.ip()),
        out.dst.port().to_be(),
        out.src.port().to_be(),
        out.proto,
    )
}

/// A packet's entry and its partner, in both tables, as they were.
struct Before {
    entries: Vec<(Table, FlowKey, Option<FlowEntry>)>,
}

fn snapshot(maps: &Maps, key: &FlowKey) -> Result<Before, DatapathError> {
    let mut keys = vec![*key];
    let mut entries = Vec::new();
    for table in [Table::Established, Table::New] {
        let all = maps.conntrack(table)?;
        if let Some((_, entry)) = all.iter().find(|(k, _)| k == key) {
            keys.push(entry.translated.reversed());
        }
    }
    for table in [Table::Established, Table::New] {
        let all = maps.conntrack(table)?;
        for k in &keys {
            entries.push((table, *k, all.iter().find(|(key, _)| key == k).map(|(_, e)| *e)));
        }
    }
    Ok(Before { entries })
}

fn restore(maps: &mut Maps, before: &Before, created_reply: Option<FlowKey>, key: &FlowKey) {
    if let Some(reply) = created_reply {
        maps.remove_flows(Table::New, &[*key, reply]);
    }
    for (table, k, entry) in &before.entries {
        match entry {
            Some(entry) => maps.put_flow(*table, k, entry),
            None => {
                maps.remove_flows(*table, &[*k]);
            }
        }
    }
}

fn build_packet(proto: Proto, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let l4_len = if proto == Proto::Tcp { 20 } else { 8 };
    let total = 20 + l4_len;
    let mut p = vec![0u8; 14 + total];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto.number();
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let check = hairpin_common::checksum::full(ip);
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    let l4 = &mut p[34..];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    if proto == Proto::Tcp {
        l4[12] = 5 << 4;
        l4[13] = hairpin_common::packet::TCP_SYN;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, proto.number()]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let sum =
        hairpin_common::checksum::sum_words(l4, hairpin_common::checksum::sum_words(&pseudo, 0));
    let check = !hairpin_common::checksum::fold(sum);
    let at = if proto == Proto::Tcp { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    p
}

fn parse(frame: &[u8]) -> Option<Headers> {
    let ip = frame.get(14..34)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip[0] != 0x45 {
        return None;
    }
    let l4 = frame.get(34..38)?;
    let addr = |b: &[u8]| host_addr(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let has_ports = matches!(ip[9], 6 | 17);
    let port = |b: &[u8]| if has_ports { u16::from_be_bytes([b[0], b[1]]) } else { 0 };
    Some(Headers {
        proto: ip[9],
        src: SocketAddrV4::new(addr(&ip[12..16]), port(&l4[0..2])),
        dst: SocketAddrV4::new(addr(&ip[16..20]), port(&l4[2..4])),
        ttl: ip[8],
    })
}
