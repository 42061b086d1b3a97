//! The results file (markdown), its chart (gnuplot) and the targets.

use hairpin_common::maps::names;
use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use crate::{
    beds::{BedKind, Gateway},
    cost::{self, PathCost},
    scale::{ConntrackMemory, Scale},
    stats::{median, min_max},
    tcp::TcpResult,
};

/// Where and on what the benchmark ran.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub date: String,
    pub time: String,
    pub host: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub iptables: String,
    pub load_average: String,
    pub load_average_after: String,
}

/// One configuration of the delivered-rate bench: ns per delivered packet
/// of each round and the share of the sent frames delivered.
#[derive(Clone, Debug)]
pub struct LoadRow {
    pub gateway: Option<Gateway>,
    pub label: String,
    pub rounds: Vec<f64>,
    pub delivered: Vec<f64>,
}

impl LoadRow {
    pub fn ns(&self) -> f64 {
        median(&self.rounds)
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadResults {
    pub flows: u32,
    pub frames: u32,
    pub rounds: usize,
    pub floor: Option<LoadRow>,
    pub beds: Vec<(BedKind, Vec<LoadRow>)>,
    /// Average run time of programs in the datapath (BPF_ENABLE_STATS),
    /// routed bed: (program, configuration, ns per run).
    pub in_situ: Vec<(String, String, f64)>,
    /// `perf report` of a routed run, per configuration, when perf could
    /// sample: (configuration, report).
    pub profiles: Vec<(String, String)>,
}

impl LoadResults {
    pub fn floor_ns(&self) -> f64 {
        self.floor.as_ref().map(LoadRow::ns).unwrap_or(f64::NAN)
    }

    pub fn row(&self, kind: BedKind, gateway: Gateway) -> Option<&LoadRow> {
        self.beds
            .iter()
            .find(|(k, _)| *k == kind)?
            .1
            .iter()
            .find(|row| row.gateway == Some(gateway))
    }

    /// A configuration's share of the time per packet: its time minus the floor.
    pub fn share(&self, kind: BedKind, gateway: Gateway) -> f64 {
        self.row(kind, gateway).map(|row| row.ns() - self.floor_ns()).unwrap_or(f64::NAN)
    }
}

#[derive(Default)]
pub struct Results {
    pub quick: bool,
    pub command_line: String,
    pub machine: Machine,
    pub duration: Duration,
    pub cost: Option<Vec<PathCost>>,
    pub load: Option<LoadResults>,
    pub scale: Option<Scale>,
    pub conntrack: Option<ConntrackMemory>,
    pub tcp: Option<Vec<TcpResult>>,
    pub control: Option<Vec<crate::control::ControlPoint>>,
    /// What did not work, or was left out, and why.
    pub notes: Vec<String>,
}

/// One target line.
pub struct Target {
    pub what: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub pass: Option<bool>,
    pub why: String,
}

impl Results {
    fn cost(&self, name: &str) -> Option<f64> {
        self.cost.as_ref()?.iter().find(|c| c.name == name).map(|c| c.median_ns)
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let hit = self.cost(cost::HIT);
        let empty = self.cost(cost::EMPTY);
        targets.push(match hit {
            Some(hit) => Target {
                what: "hit path <= 67 ns".into(),
                measured: format!("{hit:.0} ns"),
                pass: Some(hit <= 67.0),
                why: match empty {
                    Some(empty) => format!(
                        "the test-run harness alone (the empty program) takes {empty:.0} ns \
                         here, which leaves {:.0} ns of the target for the program; hairpin's \
                         work takes {:.0} ns",
                        67.0 - empty,
                        hit - empty
                    ),
                    None => String::new(),
                },
            },
            None => not_measured("hit path <= 67 ns"),
        });
        targets.push(match (hit, empty) {
            (Some(hit), Some(empty)) => Target {
                what: "hit path <= 2.5 x the empty program".into(),
                measured: format!("{:.2} x ({hit:.0} / {empty:.0} ns)", hit / empty),
                pass: Some(hit <= 2.5 * empty),
                why: "see the hit path's line".into(),
            },
            _ => not_measured("hit path <= 2.5 x the empty program"),
        });
        let load = self.load.as_ref();
        let share =
            |gateway| load.map(|l| l.share(BedKind::Routed, gateway)).filter(|v| v.is_finite());
        targets.push(match (share(Gateway::Hairpin), share(Gateway::XdpForwarder)) {
            (Some(hairpin), Some(forwarder)) => Target {
                what: "routed bed: hairpin's gateway share <= 1.2 x the no-NAT XDP forwarder's"
                    .into(),
                measured: format!(
                    "{:.2} x ({hairpin:.0} / {forwarder:.0} ns)",
                    hairpin / forwarder
                ),
                pass: Some(hairpin <= 1.2 * forwarder),
                why: String::new(),
            },
            _ => not_measured("routed bed: hairpin's share <= 1.2 x the forwarder's"),
        });
        targets.push(match (share(Gateway::Hairpin), share(Gateway::Iptables)) {
            (Some(hairpin), Some(iptables)) => Target {
                what: "routed bed: hairpin's gateway share >= 3.5 x lower than iptables'".into(),
                measured: format!(
                    "{:.2} x lower ({iptables:.0} / {hairpin:.0} ns)",
                    iptables / hairpin
                ),
                pass: Some(iptables >= 3.5 * hairpin),
                why: String::new(),
            },
            _ => not_measured("routed bed: hairpin's share >= 3.5 x lower than iptables'"),
        });
        targets.push(match (share(Gateway::HairpinTc), share(Gateway::Iptables)) {
            (Some(tc), Some(iptables)) => Target {
                what: "routed bed: hairpin TC's gateway share >= 2.5 x lower than iptables'".into(),
                measured: format!("{:.2} x lower ({iptables:.0} / {tc:.0} ns)", iptables / tc),
                pass: Some(iptables >= 2.5 * tc),
                why: match share(Gateway::TcForwarder) {
                    Some(floor) => format!(
                        "the no-NAT TC forwarder's share is {floor:.0} ns here, the floor of \
                         any TC gateway on this path (the skb made, routed and redirected); \
                         the target asks for at most {:.0} ns, and hairpin's NAT takes {:.0} ns \
                         above that floor",
                        iptables / 2.5,
                        tc - floor
                    ),
                    None => String::new(),
                },
            },
            _ => not_measured("routed bed: hairpin TC's share >= 2.5 x lower than iptables'"),
        });
        let bridge_share =
            |gateway| load.map(|l| l.share(BedKind::Bridge, gateway)).filter(|v| v.is_finite());
        targets.push(match (bridge_share(Gateway::HairpinTc), bridge_share(Gateway::Iptables)) {
            (Some(tc), Some(iptables)) => Target {
                what: "bridge bed: hairpin TC's gateway share not worse than iptables'".into(),
                measured: format!("{tc:.0} vs {iptables:.0} ns ({:.2} x lower)", iptables / tc),
                pass: Some(tc <= iptables),
                why: String::new(),
            },
            _ => not_measured("bridge bed: hairpin TC's share not worse than iptables'"),
        });
        targets.push(match &self.scale {
            Some(scale) => {
                let configured = scale.per_connection_configured();
                let established = scale.per_connection_established();
                Target {
                    what: "<= 200 bytes per connection".into(),
                    measured: format!(
                        "{configured:.0} B as configured (both tables); {established:.0} B in the established table alone"
                    ),
                    pass: Some(configured <= 200.0),
                    why: match scale.maps.iter().find(|m| m.name == names::CONNTRACK) {
                        Some(map) => format!(
                            "judged on the configured figure: both tables are preallocated with \
                             `conntrack.capacity` entries each, and a connection takes two \
                             entries; each entry costs the kernel {:.0} B beyond its {} B key \
                             and {} B value (element header and hash bucket): two entries take \
                             {:.0} B before their values",
                            map.per_entry() - f64::from(map.key_size + map.value_size),
                            map.key_size,
                            map.value_size,
                            2.0 * (map.per_entry() - f64::from(map.value_size))
                        ),
                        None => String::new(),
                    },
                }
            }
            None => not_measured("<= 200 bytes per connection"),
        });
        targets.push(match &self.scale {
            Some(scale) if scale.points.len() >= 2 => {
                let first = &scale.points[0];
                let last = &scale.points[scale.points.len() - 1];
                let loss = 1.0 - first.median_ns() / last.median_ns();
                Target {
                    what: format!(
                        "{} flows lose <= 20 % of the {} flows' packet rate",
                        count(last.flows),
                        count(first.flows)
                    ),
                    measured: format!(
                        "{:.1} % lower ({:.0} vs {:.0} kpps)",
                        100.0 * loss,
                        1e6 / last.median_ns(),
                        1e6 / first.median_ns()
                    ),
                    pass: Some(loss <= 0.20),
                    why: String::new(),
                }
            }
            _ => not_measured("1 M flows lose <= 20 % of the 1 k packet rate"),
        });
        let tcp =
            |gateway| self.tcp.as_ref()?.iter().find(|r| r.gateway == gateway).map(TcpResult::bulk);
        targets.push(match (tcp(Gateway::Hairpin), tcp(Gateway::Iptables)) {
            (Some(hairpin), Some(iptables)) => Target {
                what: "TCP bulk through hairpin >= through iptables".into(),
                measured: format!("{hairpin:.2} vs {iptables:.2} Gbit/s"),
                pass: Some(hairpin >= iptables),
                why: String::new(),
            },
            _ => not_measured("TCP bulk >= iptables"),
        });
        targets.extend(crate::control::targets(self.control.as_deref().unwrap_or_default()));
        targets
    }

    /// The results file.
    pub fn markdown(&self, chart: Option<&str>) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "# hairpin benchmark, {} ({})\n",
            m.date,
            if self.quick { "quick run" } else { "full run" }
        );
        let _ = writeln!(md, "| | |\n| --- | --- |");
        let _ = writeln!(md, "| command | `{}` |", self.command_line);
        let _ = writeln!(md, "| date | {} {} UTC |", m.date, m.time);
        let _ = writeln!(md, "| host | {} |", m.host);
        let _ = writeln!(md, "| kernel | {} |", m.kernel);
        let _ = writeln!(md, "| CPU | {} ({} CPUs) |", m.cpu_model, m.cpus);
        let _ = writeln!(md, "| iptables | {} |", m.iptables);
        let _ = writeln!(
            md,
            "| load average (1, 5, 15 min) | {} before, {} after |",
            m.load_average, m.load_average_after
        );
        let _ = writeln!(md, "| duration | {:.0} s |\n", self.duration.as_secs_f64());

        md.push_str(
            "## Targets\n\nPrinted for information; the command does not fail on them.\n\n",
        );
        md.push_str(&self.targets_table());

        if let Some(load) = &self.load {
            md.push_str(&load_section(load, chart));
        }
        if let Some(cost) = &self.cost {
            md.push_str(&cost_section(cost));
        }
        if self.scale.is_some() || self.conntrack.is_some() {
            md.push_str(&scale_section(self.scale.as_ref(), self.conntrack.as_ref()));
        }
        if let Some(tcp) = &self.tcp {
            md.push_str(&tcp_section(tcp));
        }
        if let Some(control) = &self.control {
            md.push_str(&crate::control::section(control));
        }
        md.push_str(METHOD);
        if !self.notes.is_empty() {
            md.push_str("\n## Notes from this run\n\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        md
    }

    pub fn targets_table(&self) -> String {
        let mut md = String::from("| target | measured | result |\n| --- | --- | --- |\n");
        for target in self.targets() {
            let result = match target.pass {
                Some(true) => "PASS".to_string(),
                Some(false) if target.why.is_empty() => "FAIL".to_string(),
                Some(false) => format!("FAIL ({})", target.why),
                None => "not measured".to_string(),
            };
            let _ = writeln!(md, "| {} | {} | {result} |", target.what, target.measured);
        }
        md.push('\n');
        md
    }

    /// The summary for the terminal: the targets and the routed bed.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        if let Some(load) = &self.load {
            for (kind, rows) in &load.beds {
                let _ = writeln!(text, "{kind} bed (floor {:.0} ns):", load.floor_ns());
                for row in rows {
                    let share = row.ns() - load.floor_ns();
                    let _ = writeln!(
                        text,
                        "  {:<26} {:>6.0} ns/packet  {:>6.0} kpps  share {:>5.0} ns",
                        row.label,
                        row.ns(),
                        1e6 / row.ns(),
                        share
                    );
                }
            }
        }
        if let Some(cost) = &self.cost {
            let _ = writeln!(text, "program cost (BPF_PROG_TEST_RUN, repeat 1, median):");
            for path in cost {
                let _ = writeln!(text, "  {:<36} {:>5.0} ns", path.name, path.median_ns);
            }
        }
        if let Some(scale) = &self.scale {
            let _ = writeln!(text, "flow scale (routed bed, hairpin):");
            for point in &scale.points {
                let _ = writeln!(
                    text,
                    "  {:>9} flows {:>6.0} ns/packet {:>6.0} kpps",
                    count(point.flows),
                    point.median_ns(),
                    1e6 / point.median_ns()
                );
            }
        }
        if let Some(tcp) = &self.tcp {
            let _ = writeln!(text, "TCP (routed bed):");
            for result in tcp {
                let _ = writeln!(
                    text,
                    "  {:<26} {:>6.2} Gbit/s {:>7.0} req/s {:>6.0} conn/s",
                    result.gateway.label(),
                    result.bulk(),
                    result.rr(),
                    result.crr()
                );
            }
        }
        let _ = writeln!(text, "targets:");
        for target in self.targets() {
            let result = match target.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "----",
            };
            let _ = writeln!(text, "  {result} {}: {}", target.what, target.measured);
        }
        text
    }
}

fn not_measured(what: &str) -> Target {
    Target { what: what.into(), measured: "-".into(), pass: None, why: String::new() }
}

/// `1 k`, `100 k`, `1 M`.
pub fn count(n: u32) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{} M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{} k", n / 1_000),
        n => n.to_string(),
    }
}

fn load_section(load: &LoadResults, chart: Option<&str>) -> String {
    let mut md = String::from("\n## Delivered packets per second\n\n");
    let _ = writeln!(
        md,
        "64-byte UDP frames of {} flows from the live-frame generator at the client to the \
         public address (or, without NAT, the server's), counted by the XDP sink at the server. \
         {} frames per measurement, {} rounds interleaved across every configuration of both \
         beds; medians. ns per delivered packet = generator wall time / packets the sink \
         counted; the whole path runs on one CPU (veth hands frames on in the sender's \
         softirq). Gateway share = a configuration's time - the floor's.\n",
        count(load.flows),
        count(load.frames),
        load.rounds
    );
    if let Some(floor) = &load.floor {
        let (lo, hi) = min_max(&floor.rounds);
        let _ = writeln!(
            md,
            "Floor (generator straight into the sink over one veth pair): **{:.0} ns** per \
             packet ({:.0} kpps; rounds {lo:.0}-{hi:.0}).\n",
            floor.ns(),
            1e6 / floor.ns()
        );
    }
    for (kind, rows) in &load.beds {
        let _ = writeln!(
            md,
            "### {} bed\n",
            match kind {
                BedKind::Routed => "Routed (client and server on separate gateway interfaces)",
                BedKind::Bridge => "Bridge (the seed's one-armed LAN)",
            }
        );
        md.push_str(
            "| configuration | ns/packet | kpps | rounds (ns) | delivered | gateway share (ns) | share / XDP forwarder's | share / TC forwarder's | share vs iptables' |\n\
             | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        // A ratio to a configuration this run did not measure is left out.
        let ratio = |value: f64, suffix: &str| {
            if value.is_finite() { format!("{value:.2} x{suffix}") } else { "-".to_string() }
        };
        for row in rows {
            let gateway = row.gateway.expect("gateway rows");
            let share = load.share(*kind, gateway);
            let xdp_forwarder = load.share(*kind, Gateway::XdpForwarder);
            let tc_forwarder = load.share(*kind, Gateway::TcForwarder);
            let iptables = load.share(*kind, Gateway::Iptables);
            let (lo, hi) = min_max(&row.rounds);
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {lo:.0}-{hi:.0} | {:.1} % | {share:.0} | {} | {} | {} |",
                row.label,
                row.ns(),
                1e6 / row.ns(),
                100.0 * median(&row.delivered),
                ratio(share / xdp_forwarder, ""),
                ratio(share / tc_forwarder, ""),
                ratio(iptables / share, " lower"),
            );
        }
        md.push('\n');
    }
    match chart {
        Some(png) => {
            let _ = writeln!(md, "![gateway share per configuration]({png})\n");
        }
        None => md.push_str("(No chart: gnuplot was not available.)\n\n"),
    }
    if !load.in_situ.is_empty() {
        md.push_str(
            "### Program run time in the datapath\n\n\
             Average per run while the routed bed's load ran (kernel BPF statistics, \
             `BPF_ENABLE_STATS`; measured in a separate run, the statistics cost two clock \
             reads per run).\n\n| program | configuration | ns per run |\n| --- | --- | ---: |\n",
        );
        for (program, configuration, ns) in &load.in_situ {
            let _ = writeln!(md, "| {program} | {configuration} | {ns:.0} |");
        }
        md.push('\n');
    }
    for (configuration, profile) in &load.profiles {
        let _ = write!(
            md,
            "### Where the time goes (routed bed, {configuration})\n\n\
             `perf record -e cpu-clock` on the generator's CPU during one measurement \
             (no hardware counters on this machine), symbols over 1 %:\n\n```\n",
        );
        md.push_str(profile.trim_end());
        md.push_str("\n```\n\n");
    }
    md
}

fn cost_section(cost: &[PathCost]) -> String {
    let mut md = String::from(
        "\n## Program cost (BPF_PROG_TEST_RUN)\n\n\
         One packet per call (`repeat` 1, as Katran does: a repeated run would process the \
         packet the previous run rewrote), the kernel's duration of each run; 3 rounds, every \
         path in turn. hairpin on a routed gateway namespace (client on lan1, server on lan0, \
         neighbours pinned), the verdict of every run checked. The empty program's figure is \
         the harness itself (timer reads and the call).\n\n\
         | path | what | runs | median ns | p10-p90 ns | round medians | x empty | minus empty |\n\
         | --- | --- | ---: | ---: | --- | --- | ---: | ---: |\n",
    );
    let empty =
        cost.iter().find(|c| c.name == cost::EMPTY).map(|c| c.median_ns).unwrap_or(f64::NAN);
    for path in cost {
        let rounds: Vec<String> = path.round_medians.iter().map(|v| format!("{v:.0}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0}-{:.0} | {} | {:.2} | {:.0} |",
            path.name,
            path.what,
            path.runs,
            path.median_ns,
            path.p10_ns,
            path.p90_ns,
            rounds.join(", "),
            path.median_ns / empty,
            path.median_ns - empty
        );
    }
    let median_of = |name: &str| cost.iter().find(|c| c.name == name).map(|c| c.median_ns);
    if let (Some(first), Some(later), Some(hit)) =
        (median_of(cost::FIRST_FRAGMENT), median_of(cost::LATER_FRAGMENT), median_of(cost::HIT))
    {
        let _ = writeln!(
            md,
            "\nA 3000-byte UDP datagram at MTU 1500 is three fragments: {:.0} ns through hairpin \
             (first + 2 later, harness included), against {:.0} ns for three unfragmented \
             packets of the flow.",
            first + 2.0 * later,
            3.0 * hit
        );
    }
    md
}

fn scale_section(scale: Option<&Scale>, conntrack: Option<&ConntrackMemory>) -> String {
    let mut md = String::from("\n## Flow scale and memory per connection\n\n");
    if let Some(scale) = scale {
        let _ = writeln!(
            md,
            "hairpin on the routed bed, conntrack tables of {} entries each. Every flow is \
             opened by one client packet and answered by the server (UDP, so it moves to the \
             established table), then the generator cycles through all of them, in order; \
             interleaved rounds, medians.\n\n\
             | flows | established | frames per round | ns/packet | kpps | vs first | rounds (ns) | opening the flows (ns/packet) |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
            count(scale.capacity)
        );
        let first = scale.points.first().map(|p| p.median_ns()).unwrap_or(f64::NAN);
        for point in &scale.points {
            let rounds: Vec<String> = point.rounds.iter().map(|v| format!("{v:.0}")).collect();
            // A few thousand packets mostly time the first run's setup.
            let opening = if point.flows >= 100_000 {
                format!("{:.0}", point.opening_ns)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:+.1} % | {} | {opening} |",
                count(point.flows),
                point.established,
                count(point.frames),
                point.median_ns(),
                1e6 / point.median_ns(),
                100.0 * (first / point.median_ns() - 1.0),
                rounds.join(", "),
            );
        }
        md.push_str(
            "\nhairpin's conntrack maps (kernel accounting, `memlock` in the map's fdinfo, \
             what bpftool shows as `bytes_memlock`; hash maps are preallocated):\n\n\
             | map | entries | key + value bytes | bytes | per entry |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        for map in &scale.maps {
            let _ = writeln!(
                md,
                "| {} | {} | {} + {} | {} | {:.1} |",
                map.name,
                map.max_entries,
                map.key_size,
                map.value_size,
                map.bytes,
                map.per_entry()
            );
        }
        let _ = writeln!(
            md,
            "\nPer connection: **{:.0} bytes** in the established table alone (two entries); \
             **{:.0} bytes** as configured (both tables, {} connections at most).\n",
            scale.per_connection_established(),
            scale.per_connection_configured(),
            count(scale.capacity / 2)
        );
    }
    if let Some(ct) = conntrack {
        let tops: Vec<String> =
            ct.top_caches.iter().map(|(name, bytes)| format!("{name} {bytes:.0}")).collect();
        let _ = writeln!(
            md,
            "nf_conntrack on the same kernel: {} NAT connections (the seed's iptables rules, \
             routed bed, every flow answered) grew the `nf_conntrack` slab cache by **{:.0} \
             bytes per connection** (object size {}), the other slab caches by {:.0} bytes per \
             connection (extensions and NAT; anything else allocating meanwhile counts too), \
             and the preallocated hash table adds {:.1} bytes per possible connection ({} \
             buckets for nf_conntrack_max {}): **about {:.0} bytes per connection**. Largest \
             growth, bytes per connection: {}.\n",
            ct.entries,
            ct.conntrack_cache_per_entry,
            ct.object_size,
            ct.other_slab_per_entry,
            ct.bucket_share(),
            ct.buckets,
            ct.max,
            ct.per_connection(),
            tops.join(", ")
        );
    }
    md
}

fn tcp_section(tcp: &[TcpResult]) -> String {
    let mut md = String::from(
        "\n## TCP through the gateway (routed bed)\n\n\
         Bulk: iperf3, one stream, client to the public address (to the server's without \
         NAT). Requests: one byte each way on one connection, as fast as answered. \
         Connections: connect, one byte each way, close, one after another. The hosts send \
         without checksum offload (as the test bed must, for XDP_TX on veth), which also \
         turns off TSO. Only the XDP gateways (hairpin in XDP) put XDP frames on the hosts' veths, \
         so only their beds have XDP pass programs on the hosts; the kernel configurations and \
         hairpin's TC datapath hand skbs on and run with nothing on the hosts, and with no XDP \
         program on the gateway. Medians of the rounds.\n\n\
         | configuration | bulk Gbit/s | rounds | requests/s | connections/s | failed connections |\n\
         | --- | ---: | --- | ---: | ---: | ---: |\n",
    );
    for result in tcp {
        let rounds: Vec<String> = result.bulk_gbps.iter().map(|v| format!("{v:.2}")).collect();
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {:.0} | {:.0} | {} |",
            result.gateway.label(),
            result.bulk(),
            rounds.join(", "),
            result.rr(),
            result.crr(),
            result.crr_failed
        );
    }
    md
}

const METHOD: &str = "
## Method and caveats

- Generator: `bench_generator`, an XDP program run with BPF_PROG_TEST_RUN in live-frame mode \
(`BPF_F_TEST_XDP_LIVE_FRAMES`, batches of 64) on a thread in the client's namespace, pinned to \
one CPU; it gives each frame the next flow's ports and UDP checksum and returns XDP_TX, which \
sends it out of the client's veth. The same generator for every configuration.
- Sink: `bench_sink` on the server's veth counts IPv4 UDP frames per CPU and drops them. \
Neighbour entries are pinned (the sink drops ARP). The client's veth has a sink too, for the \
server's replies.
- A veth only takes XDP frames when its receiving end runs an XDP program: kernel \
configurations get an XDP pass program on the gateway's interfaces (the frames become skbs \
there), hairpin (XDP) and the forwarder are that program. hairpin's TC datapath gets the pass \
program too and runs on the skbs it makes (tcx ingress, `bpf_redirect` of the skb to the other \
side): its figure is the live frame turned into an skb, the TC program and the skb's redirect, \
the same path as iptables' with hairpin's NAT instead of netfilter's.
- hairpin is loaded through its library (`Datapath::load`, `configure`, `attach`; \
`[datapath] attach = \"xdp\"`, or `\"tc\"` for the TC rows), as `hairpin run` does, without pins.
- Everything runs in network namespaces this run creates and removes; the machine may be \
shared, so other load shows up as noise (see the rounds).
";

/// Draws the gateway shares of both beds as a bar chart; the PNG's file
/// name, or why there is none.
pub fn chart(load: &LoadResults, png: &Path) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("hairpin-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let data = dir.join("share.dat");
    let mut text = String::from("configuration routed bridge\n");
    for gateway in Gateway::ALL {
        let value = |kind| {
            let share = load.share(kind, gateway);
            if share.is_finite() { format!("{share:.0}") } else { "0".into() }
        };
        let _ = writeln!(
            text,
            "\"{}\" {} {}",
            gateway.label(),
            value(BedKind::Routed),
            value(BedKind::Bridge)
        );
    }
    fs::write(&data, text).map_err(|e| e.to_string())?;
    let script = format!(
        "set terminal pngcairo size 1000,560 font 'sans,10'\n\
         set output '{}'\n\
         set title 'Gateway share per delivered packet (ns, lower is better; floor {:.0} ns subtracted)'\n\
         set style data histograms\nset style histogram clustered gap 1\n\
         set style fill solid 0.8 border -1\nset boxwidth 0.9\n\
         set ylabel 'ns per packet'\nset yrange [0:*]\nset grid ytics\n\
         set xtics rotate by -20 scale 0\nset key top left\n\
         plot '{}' using 2:xtic(1) title columnheader(2), '' using 3 title columnheader(3)\n",
        png.display(),
        load.floor_ns(),
        data.display()
    );
    let script_file = dir.join("share.gp");
    fs::write(&script_file, script).map_err(|e| e.to_string())?;
    let output =
        Command::new("gnuplot").arg(&script_file).output().map_err(|e| format!("gnuplot: {e}"))?;
    let _ = fs::remove_dir_all(&dir);
    if !output.status.success() {
        return Err(format!("gnuplot failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rstest::{fixture, rstest};

    use super::*;

    fn row(gateway: Gateway, ns: f64) -> LoadRow {
        LoadRow {
            gateway: Some(gateway),
            label: gateway.label().into(),
            rounds: vec![ns],
            delivered: vec![1.0],
        }
    }

    /// A floor of 1000 ns; iptables' share 2000 ns on the routed bed and
    /// 1500 ns on the bridge bed; hairpin TC's shares as given (none: no row).
    #[fixture]
    fn tc_results(
        #[default(None)] routed_tc: Option<f64>,
        #[default(None)] bridge_tc: Option<f64>,
    ) -> Results {
        let mut routed = vec![row(Gateway::Iptables, 3000.0)];
        let mut bridge = vec![row(Gateway::Iptables, 2500.0)];
        routed.extend(routed_tc.map(|share| row(Gateway::HairpinTc, 1000.0 + share)));
        bridge.extend(bridge_tc.map(|share| row(Gateway::HairpinTc, 1000.0 + share)));
        Results {
            load: Some(LoadResults {
                floor: Some(LoadRow {
                    gateway: None,
                    label: String::new(),
                    rounds: vec![1000.0],
                    delivered: vec![1.0],
                }),
                beds: vec![(BedKind::Routed, routed), (BedKind::Bridge, bridge)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pass(results: &Results, text: &str) -> Option<bool> {
        let targets = results.targets();
        let target = targets.iter().find(|t| t.what.contains(text));
        target.unwrap_or_else(|| panic!("no target with {text:?}")).pass
    }

    #[rstest]
    #[case::well_under(Some(500.0), Some(true))]
    #[case::exactly_2_5_x(Some(800.0), Some(true))]
    #[case::just_over(Some(801.0), Some(false))]
    #[case::as_slow_as_iptables(Some(2000.0), Some(false))]
    #[case::not_measured(None, None)]
    fn tc_routed_target_wants_2_5_x_lower_than_iptables(
        #[case] tc_share: Option<f64>,
        #[case] expected: Option<bool>,
    ) {
        let results = tc_results(tc_share, Some(1000.0));
        assert_eq!(pass(&results, "routed bed: hairpin TC's"), expected);
    }

    #[rstest]
    #[case::lower(Some(1000.0), Some(true))]
    #[case::equal(Some(1500.0), Some(true))]
    #[case::worse(Some(1600.0), Some(false))]
    #[case::not_measured(None, None)]
    fn tc_bridge_target_wants_no_worse_than_iptables(
        #[case] tc_share: Option<f64>,
        #[case] expected: Option<bool>,
    ) {
        let results = tc_results(Some(500.0), tc_share);
        assert_eq!(pass(&results, "bridge bed: hairpin TC's"), expected);
    }

    #[rstest]
    fn tc_targets_do_not_move_the_xdp_ones(#[from(tc_results)] results: Results) {
        // No hairpin XDP row: its targets are not measured, TC's row or not.
        assert_eq!(pass(&results, "3.5 x"), None);
        let with_tc = tc_results(Some(500.0), Some(1000.0));
        assert_eq!(pass(&with_tc, "3.5 x"), None);
        assert_eq!(pass(&with_tc, "1.2 x"), None);
    }

    #[test]
    fn tc_rows_show_in_the_load_section_and_the_chart_order() {
        let results = tc_results(Some(500.0), Some(1000.0));
        let md = load_section(results.load.as_ref().unwrap(), None);
        // Routed: 1500 ns, share 500 ns, iptables' 2000 ns; bridge: share 1000 vs 1500 ns.
        assert!(md.contains("| hairpin, TC datapath | 1500 | 667 |"), "{md}");
        // No forwarder rows: their ratios are left out, not NaN.
        assert!(md.contains("| 500 | - | - | 4.00 x lower |"), "{md}");
        assert!(md.contains("| hairpin, TC datapath | 2000 | 500 |"), "{md}");
        assert!(md.contains("| 1000 | - | - | 1.50 x lower |"), "{md}");
        assert!(Gateway::ALL.contains(&Gateway::HairpinTc));
    }

    #[test]
    fn tc_target_names_the_tc_forwarders_floor() {
        let mut results = tc_results(Some(700.0), Some(1000.0));
        let load = results.load.as_mut().unwrap();
        load.beds[0].1.push(row(Gateway::TcForwarder, 1600.0));
        let targets = results.targets();
        let target = targets.iter().find(|t| t.what.contains("routed bed: hairpin TC's")).unwrap();
        assert!(target.why.contains("forwarder's share is 600 ns"), "{}", target.why);
        assert!(target.why.contains("at most 800 ns"), "{}", target.why);
        assert!(target.why.contains("takes 100 ns above that floor"), "{}", target.why);
        let md = load_section(results.load.as_ref().unwrap(), None);
        assert!(
            md.contains(
                "| hairpin, TC datapath | 1700 | 588 | 1700-1700 | 100.0 % | 700 | - | 1.17 x |"
            ),
            "{md}"
        );
    }

    #[test]
    fn counts_read_as_written() {
        assert_eq!(count(1_000), "1 k");
        assert_eq!(count(100_000), "100 k");
        assert_eq!(count(1_000_000), "1 M");
        assert_eq!(count(1_234), "1234");
    }

    #[test]
    fn targets_pass_and_fail_on_the_figures() {
        let results = Results {
            load: Some(LoadResults {
                floor: Some(LoadRow {
                    gateway: None,
                    label: String::new(),
                    rounds: vec![1000.0],
                    delivered: vec![1.0],
                }),
                beds: vec![(
                    BedKind::Routed,
                    vec![
                        row(Gateway::Iptables, 3000.0),
                        row(Gateway::Hairpin, 1500.0),
                        row(Gateway::XdpForwarder, 1450.0),
                    ],
                )],
                ..Default::default()
            }),
            ..Default::default()
        };
        let targets = results.targets();
        let find = |text: &str| targets.iter().find(|t| t.what.contains(text)).unwrap().pass;
        // Shares: iptables 2000, hairpin 500, forwarder 450.
        assert_eq!(find("1.2 x"), Some(true));
        assert_eq!(find("3.5 x"), Some(true));
        assert_eq!(find("67 ns"), None);
    }
}
