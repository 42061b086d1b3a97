//! How the commands show what they read: text for people, JSON for
//! programs. Pure functions of what was read, so that each is tested on the
//! host; the binary reads, calls one and prints.

use std::{
    io::{self, Write},
    path::Path,
};

use serde::Serialize;

use crate::{
    daemon::State,
    explain::Explanation,
    flows::FlowRow,
    maps::DenyOrigin,
    stats::{MappingRow, Snapshot, format_values},
};

/// `mapping list`: a table, one rule per line.
pub fn mapping_table(rows: &[MappingRow]) -> String {
    if rows.is_empty() {
        return "no mappings\n".into();
    }
    let line = |cells: [&dyn std::fmt::Display; 7]| {
        let [proto, public, server, flows, packets, bytes, restrictions] = cells;
        format!(
            "{proto:<5} {public:<28} {server:<28} {flows:>8} {packets:>10} {bytes:>12}  {restrictions}\n"
        )
    };
    let mut text =
        line([&"proto", &"public", &"server", &"flows", &"packets", &"bytes", &"restrictions"]);
    for r in rows {
        let mut restrictions = Vec::new();
        if !r.allow.is_empty() {
            restrictions.push(format!("from {}", r.allow.join(",")));
        }
        if !r.interfaces.is_empty() {
            restrictions.push(format!("on {}", r.interfaces.join(",")));
        }
        let restrictions =
            if restrictions.is_empty() { "-".to_string() } else { restrictions.join(" ") };
        text.push_str(&line([
            &r.proto,
            &r.public,
            &r.to,
            &r.flows,
            &r.packets,
            &r.bytes,
            &restrictions,
        ]));
    }
    text
}

/// `conntrack list`: one line per flow.
pub fn flow_line(out: &mut impl Write, r: &FlowRow) -> io::Result<()> {
    writeln!(
        out,
        "{} {:<11} {} -> server sees {} (client {}, {}) age {}s timeout {}s packets {} bytes {}",
        r.proto,
        r.state,
        r.original,
        r.translated,
        r.client,
        r.kind,
        r.age_s,
        r.timeout_left_s,
        r.packets,
        r.bytes
    )
}

/// A JSON array written element by element, one per line, as the elements
/// are read: nothing is collected first.
pub struct JsonRows<W: Write> {
    out: W,
    rows: usize,
}

impl<W: Write> JsonRows<W> {
    pub fn start(mut out: W) -> io::Result<Self> {
        out.write_all(b"[")?;
        Ok(Self { out, rows: 0 })
    }

    pub fn push(&mut self, row: &impl Serialize) -> io::Result<()> {
        self.out.write_all(if self.rows == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut self.out, row)?;
        self.rows += 1;
        Ok(())
    }

    /// Closes the array; the writer, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(if self.rows == 0 { b"]\n" } else { b"\n]\n" })?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// `deny list --json`: a row.
#[derive(Serialize)]
pub struct DenyRow {
    pub network: String,
    pub origin: DenyOrigin,
}

/// `deny list`: one network per line, with where it comes from.
pub fn deny_list(networks: &[(ipnet::Ipv4Net, DenyOrigin)]) -> String {
    if networks.is_empty() {
        return "no denied networks\n".into();
    }
    networks
        .iter()
        .map(|(net, origin)| {
            let origin = match origin {
                DenyOrigin::Config => "config",
                DenyOrigin::Cli => "cli",
            };
            // Ipv4Net's Display ignores widths: padded as a string.
            format!("{:<18} {origin}\n", net.to_string())
        })
        .collect()
}

/// `stats --json`.
#[derive(Serialize)]
pub struct StatsJson<'a> {
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub mappings: &'a [MappingRow],
    pub capacity: u32,
}

/// `stats`: the counters that moved, each mapping's traffic and the tables'
/// fill.
pub fn stats_text(snapshot: &Snapshot, mappings: &[MappingRow]) -> String {
    let mut text =
        format!("counters:\n{}\nper mapping:\n", format_values(&snapshot.values(), false));
    for m in mappings {
        text.push_str(&format!(
            "  {} {} -> {}: {} flows, {} packets, {} bytes\n",
            m.proto, m.public, m.to, m.flows, m.packets, m.bytes
        ));
    }
    if snapshot.capacity > 0 {
        text.push_str(&format!(
            "tables: established {}/{} entries, new {}/{} entries\n",
            snapshot.established_entries,
            snapshot.capacity,
            snapshot.new_entries,
            snapshot.capacity
        ));
    }
    text
}

/// A pinned link of the instance and the program it runs.
pub struct LinkRow {
    /// `xdp_<interface>` or `tc_<interface>`.
    pub name: String,
    pub link_id: u32,
    pub program_id: u32,
}

/// What `status` shows of an instance.
pub struct Status<'a> {
    pub pin_dir: &'a Path,
    pub state: Option<&'a State>,
    pub state_file: &'a Path,
    pub daemon_running: bool,
    pub links: &'a [LinkRow],
    /// Entries in the established and the new-flow table.
    pub entries: [usize; 2],
    pub capacity: u32,
    pub mappings: usize,
    pub route_cache_on: bool,
    pub route_cache_generation: u16,
}

impl Status<'_> {
    pub fn json(&self) -> serde_json::Value {
        let [established, new] = self.entries;
        serde_json::json!({
            "pin_dir": self.pin_dir,
            "daemon": self.state.map(|s| serde_json::json!({"pid": s.pid, "running": self.daemon_running, "config": s.config})),
            "interfaces": self.state.map(|s| &s.interfaces),
            "links": self.links.iter().map(|l| serde_json::json!({"name": l.name, "link_id": l.link_id, "program_id": l.program_id})).collect::<Vec<_>>(),
            "conntrack": {"established": established, "new": new, "capacity": self.capacity},
            "mappings": self.mappings,
            "route_cache": {"on": self.route_cache_on, "generation": self.route_cache_generation},
        })
    }

    pub fn text(&self) -> String {
        let mut text = format!("instance: {}\n", self.pin_dir.display());
        match self.state {
            Some(s) => {
                let running = if self.daemon_running {
                    "running"
                } else {
                    "not running: the datapath goes on without it"
                };
                text.push_str(&format!("daemon:   pid {} ({running})\n", s.pid));
                text.push_str(&format!("config:   {}\n", s.config.display()));
                for a in &s.interfaces {
                    text.push_str(&format!(
                        "  {:<12} {} ifindex {} {}\n",
                        a.interface,
                        a.role,
                        a.if_index,
                        a.describe()
                    ));
                }
            }
            None => text.push_str(&format!(
                "daemon:   unknown (no state file {})\n",
                self.state_file.display()
            )),
        }
        for link in self.links {
            text.push_str(&format!(
                "link:     {:<16} link id {} program id {}\n",
                link.name, link.link_id, link.program_id
            ));
        }
        let ([established, new], capacity) = (self.entries, self.capacity);
        text.push_str(&format!(
            "flows:    established {established}/{capacity} entries, new {new}/{capacity} entries\n"
        ));
        text.push_str(&format!("mappings: {}\n", self.mappings));
        if self.route_cache_on {
            text.push_str(&format!(
                "routes:   cached per flow (generation {})\n",
                self.route_cache_generation
            ));
        } else {
            text.push_str(
                "routes:   looked up for every packet (no daemon keeps the route cache)\n",
            );
        }
        text
    }
}

/// `explain`: the packet, the verdict, the counters that say why, and the
/// packet as it would leave.
pub fn explanation_text(
    explanation: &Explanation,
    iface: &str,
    hook: impl std::fmt::Display,
) -> String {
    let because: Vec<String> =
        explanation.counters.iter().map(|c| crate::explain::because(c)).collect();
    let mut text = format!(
        "packet:  {} (arriving on {iface}, {hook})\nverdict: {}\nbecause: {}\n",
        explanation.input,
        explanation.action,
        because.join(", ")
    );
    if let Some(output) = &explanation.output {
        text.push_str(&format!("leaves:  {output}\n"));
    }
    text
}

/// `explain --json`.
pub fn explanation_json(explanation: &Explanation, hook: impl Serialize) -> serde_json::Value {
    serde_json::json!({
        "mode": hook,
        "action": explanation.action,
        "counters": explanation.counters,
        "input": explanation.input.to_string(),
        "output": explanation.output.map(|o| o.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use hairpin_common::Counter;

    use super::*;

    fn row(public: &str, allow: &[&str], interfaces: &[&str]) -> MappingRow {
        MappingRow {
            id: 1,
            proto: "tcp".into(),
            public: public.into(),
            to: "192.168.0.2:80".into(),
            allow: allow.iter().map(ToString::to_string).collect(),
            interfaces: interfaces.iter().map(ToString::to_string).collect(),
            flows: 3,
            packets: 40,
            bytes: 5000,
        }
    }

    #[test]
    fn the_mapping_table_has_a_line_per_rule_and_its_restrictions() {
        let table = mapping_table(&[
            row("203.0.113.1:80", &[], &[]),
            row("203.0.113.1:443", &["198.51.100.0/24"], &["gw-wan"]),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("proto public"), "{table}");
        assert!(
            lines[1].starts_with("tcp   203.0.113.1:80 ") && lines[1].ends_with("  -"),
            "{table}"
        );
        assert!(lines[2].ends_with("  from 198.51.100.0/24 on gw-wan"), "{table}");
        assert!(
            lines[2].contains(" 3 ") && lines[2].contains(" 40 ") && lines[2].contains(" 5000 ")
        );
        assert_eq!(mapping_table(&[]), "no mappings\n");
    }

    #[rstest::rstest]
    #[case::none(&[], "[]\n")]
    #[case::one(&[1], "[\n1\n]\n")]
    #[case::three(&[1, 2, 3], "[\n1,\n2,\n3\n]\n")]
    fn json_rows_are_an_array_whatever_their_number(#[case] rows: &[u32], #[case] text: &str) {
        let mut json = JsonRows::start(Vec::new()).expect("start");
        for row in rows {
            json.push(row).expect("push");
        }
        let written = String::from_utf8(json.finish().expect("finish")).expect("utf-8");
        assert_eq!(written, text);
        let parsed: Vec<u32> = serde_json::from_str(&written).expect("valid JSON");
        assert_eq!(parsed, rows);
    }

    #[test]
    fn the_deny_list_says_where_each_network_comes_from() {
        let networks = [
            ("203.0.113.128/25".parse().expect("a network"), DenyOrigin::Config),
            ("198.51.100.7/32".parse().expect("a network"), DenyOrigin::Cli),
        ];
        assert_eq!(deny_list(&networks), "203.0.113.128/25   config\n198.51.100.7/32    cli\n");
        assert_eq!(deny_list(&[]), "no denied networks\n");
    }

    #[test]
    fn stats_show_what_moved_the_mappings_and_the_fill() {
        let snapshot = Snapshot {
            counters: vec![(Counter::FlowCreated, 7)],
            established_entries: 10,
            new_entries: 4,
            capacity: 64,
            ..Default::default()
        };
        let text = stats_text(&snapshot, &[row("203.0.113.1:80", &[], &[])]);
        assert!(text.starts_with("counters:\n"), "{text}");
        assert!(text.contains(Counter::FlowCreated.name()), "{text}");
        assert!(
            text.contains(
                "  tcp 203.0.113.1:80 -> 192.168.0.2:80: 3 flows, 40 packets, 5000 bytes\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("tables: established 10/64 entries, new 4/64 entries\n"), "{text}");
    }

    #[test]
    fn status_without_a_daemon_says_so_and_what_still_runs() {
        let links = [LinkRow { name: "xdp_gw-lan".into(), link_id: 5, program_id: 9 }];
        let status = Status {
            pin_dir: Path::new("/sys/fs/bpf/hairpin"),
            state: None,
            state_file: Path::new("/run/hairpin/hairpin.json"),
            daemon_running: false,
            links: &links,
            entries: [2, 1],
            capacity: 64,
            mappings: 2,
            route_cache_on: false,
            route_cache_generation: 3,
        };
        let text = status.text();
        assert_eq!(
            text,
            "instance: /sys/fs/bpf/hairpin\n\
             daemon:   unknown (no state file /run/hairpin/hairpin.json)\n\
             link:     xdp_gw-lan       link id 5 program id 9\n\
             flows:    established 2/64 entries, new 1/64 entries\n\
             mappings: 2\n\
             routes:   looked up for every packet (no daemon keeps the route cache)\n"
        );
        let json = status.json();
        assert_eq!(json["conntrack"]["established"], 2);
        assert_eq!(json["daemon"], serde_json::Value::Null);
        assert_eq!(json["links"][0]["program_id"], 9);
        assert_eq!(json["route_cache"]["on"], false);
    }
}
