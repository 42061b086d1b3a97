//! `hairpin-bench`: builds its own namespace beds and measures hairpin
//! against the kernel's routing, iptables, nftables and an XDP forwarder
//! without NAT. Run it through `cargo xtask bench [--quick]`, as root.

mod beds;
mod control;
mod cost;
mod load;
mod programs;
mod report;
mod scale;
mod stats;
mod tcp;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};

use crate::{
    beds::{BedKind, Gateway},
    load::LoadBed,
    report::{LoadResults, LoadRow, Machine, Results},
};

#[derive(Parser)]
#[command(about = "hairpin's benchmark, in network namespaces (needs root)")]
struct Options {
    /// A run of a few minutes: fewer frames, runs and seconds per measurement.
    #[arg(long)]
    quick: bool,
    /// Where the results file and its chart go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Appended to the results file's name (`<date>-<host>-<name>.md`), e.g. `after`.
    #[arg(long)]
    name: Option<String>,
    /// The command line to record in the results (default: this one).
    #[arg(long)]
    command_line: Option<String>,
    /// Replace the benchmark block of this README with the targets and a
    /// link to the results (full runs only).
    #[arg(long)]
    readme: Option<PathBuf>,
    /// The CPU the generator (and so the whole path) runs on (default: the last).
    #[arg(long)]
    cpu: Option<usize>,
    /// Run only these parts.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Measure only these configurations in the delivered-rate part (a
    /// target whose figures are missing shows as not measured).
    #[arg(long, value_enum, value_delimiter = ',')]
    gateways: Vec<Gateway>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Load,
    Cost,
    Scale,
    Tcp,
    /// The CLI and the metrics against `hairpin run` with up to a million flows.
    Control,
}

/// How much of everything a run does.
struct Plan {
    rounds: usize,
    flows: u32,
    frames: u32,
    cost_runs_per_round: usize,
    scale_flows: Vec<u32>,
    scale_capacity: u32,
    scale_frames: u32,
    scale_rounds: usize,
    conntrack_flows: u32,
    tcp_rounds: usize,
    bulk_seconds: u32,
    rr_seconds: f64,
    control_flows: Vec<u32>,
    control_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                flows: 1000,
                frames: 200_000,
                cost_runs_per_round: 5_000,
                scale_flows: vec![1_000, 100_000, 1_000_000],
                scale_capacity: 1 << 22,
                scale_frames: 1_000_000,
                scale_rounds: 3,
                conntrack_flows: 30_000,
                tcp_rounds: 3,
                bulk_seconds: 2,
                rr_seconds: 1.0,
                control_flows: vec![30_000, 1_000_000],
                control_rounds: 1,
            }
        } else {
            Self {
                rounds: 5,
                flows: 1000,
                frames: 1_000_000,
                cost_runs_per_round: 34_000,
                scale_flows: vec![1_000, 100_000, 1_000_000],
                scale_capacity: 1 << 22,
                scale_frames: 2_000_000,
                scale_rounds: 3,
                conntrack_flows: 100_000,
                // TCP between two hosts on two CPUs varies by a fifth from
                // one run to the next: five rounds steady the medians.
                tcp_rounds: 5,
                bulk_seconds: 10,
                rr_seconds: 4.0,
                control_flows: vec![30_000, 1_000_000],
                control_rounds: 3,
            }
        }
    }
}

fn log(message: &str) {
    eprintln!("bench: {message}");
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("the benchmark needs root for network namespaces and XDP: run `cargo xtask bench`");
    }
    if hairpin::EBPF_OBJECT.is_empty() || hairpin::BENCH_EBPF_OBJECT.is_empty() {
        bail!("built without the eBPF programs: run `cargo xtask bench`");
    }
    hairpin_tests::clean_up_on_signal("the benchmark's namespaces", tcp::kill_children)
        .context("handling SIGINT and SIGTERM")?;
    let started = Instant::now();
    let plan = Plan::new(options.quick);
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu = options.cpu.unwrap_or(cpus - 1);
    let parts = |part: Part| options.only.is_empty() || options.only.contains(&part);
    let mut results = Results {
        quick: options.quick,
        command_line: options
            .command_line
            .clone()
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
        machine: machine(cpus),
        ..Default::default()
    };
    if !options.only.is_empty() {
        results.notes.push(format!("only these parts ran: {:?}", options.only));
    }
    if !options.gateways.is_empty() {
        results.notes.push(format!("only these configurations ran: {:?}", options.gateways));
    }

    if parts(Part::Load) {
        results.load = Some(load_part(&plan, &options.gateways, cpu, &mut results.notes)?);
    }
    if parts(Part::Cost) {
        log("program cost");
        results.cost = Some(cost::measure(plan.cost_runs_per_round, 3, cpu)?);
        results.notes.push(
            "program cost is hairpin's XDP program only: BPF_PROG_TEST_RUN on XDP frames; the \
             TC datapath (`hairpin_tc`, on skbs) is not in it. Its cost shows in the \
             delivered-rate and TCP parts."
                .into(),
        );
    }
    if parts(Part::Scale) {
        results.scale = Some(scale::flow_scale(
            &plan.scale_flows,
            plan.scale_capacity,
            plan.scale_frames,
            plan.scale_rounds,
            cpu,
            &log,
        )?);
        log("nf_conntrack memory");
        results.conntrack = Some(scale::conntrack_memory(plan.conntrack_flows, cpu)?);
    }
    if parts(Part::Control) {
        results.control = Some(control::measure(
            &plan.control_flows,
            plan.scale_capacity,
            plan.control_rounds,
            cpu,
            &log,
        )?);
    }
    if parts(Part::Tcp) {
        results.tcp = Some(tcp::measure(
            &[
                Gateway::KernelRouting,
                Gateway::Iptables,
                Gateway::Nftables,
                Gateway::Hairpin,
                Gateway::HairpinTc,
            ],
            plan.tcp_rounds,
            plan.bulk_seconds,
            plan.rr_seconds,
            &log,
        )?);
    }
    results.notes.push(
        "`bpftool prog profile` needs hardware counters (cycles, instructions); this machine \
         has none (`perf stat -e cycles` says not supported), so the profile is perf's \
         cpu-clock sampling instead."
            .into(),
    );
    results.duration = started.elapsed();
    results.machine.load_average_after = load_average();
    let busy = |text: &str| text.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
    if [&results.machine.load_average, &results.machine.load_average_after]
        .iter()
        .any(|text| busy(text).is_some_and(|load| load > 1.0))
    {
        results.notes.push(
            "the machine was busy with other work during the run (load average above 1 on \
             2 CPUs): the figures are noisier than on an idle machine; compare the rounds."
                .into(),
        );
    }

    fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let mut stem = format!("{}-{}", results.machine.date, results.machine.host);
    if options.quick {
        stem.push_str("-quick");
    }
    if let Some(name) = &options.name {
        stem.push('-');
        stem.push_str(name);
    }
    let png_name = format!("{stem}.png");
    let chart = match &results.load {
        Some(load) => match report::chart(load, &options.out.join(&png_name)) {
            Ok(()) => Some(png_name.as_str()),
            Err(why) => {
                results.notes.push(format!("no chart: {why}"));
                None
            }
        },
        None => None,
    };
    let markdown = results.markdown(chart);
    let path = options.out.join(format!("{stem}.md"));
    fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", results.summary());
    println!("results: {}", path.display());
    // Only a full run of every part and configuration stands for the
    // README's figures.
    let full = !options.quick && options.only.is_empty() && options.gateways.is_empty();
    match &options.readme {
        Some(readme) if full => {
            update_readme(readme, &results, &path)?;
            println!("README: {} updated", readme.display());
        }
        Some(readme) => println!("README: {} left alone (not a full run)", readme.display()),
        None => {}
    }
    Ok(())
}

/// The delivered-rate bench on every configuration of both beds.
fn load_part(
    plan: &Plan,
    gateways: &[Gateway],
    cpu: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<LoadResults> {
    log("delivered rate: building the beds");
    let mut beds = vec![LoadBed::floor(plan.flows)?];
    for kind in [BedKind::Routed, BedKind::Bridge] {
        for gateway in Gateway::ALL {
            if gateways.is_empty() || gateways.contains(&gateway) {
                beds.push(LoadBed::new(kind, gateway, plan.flows, 65_536)?);
            }
        }
    }
    for bed in &mut beds {
        bed.open_flows(cpu).with_context(|| format!("opening the flows of {}", bed.label()))?;
        bed.measure(plan.frames / 4, cpu)?;
    }
    let mut samples: Vec<Vec<load::Sample>> = vec![Vec::new(); beds.len()];
    for round in 0..plan.rounds {
        for (slot, bed) in beds.iter_mut().enumerate() {
            let sample = bed.measure(plan.frames, cpu)?;
            log(&format!(
                "round {}: {} {}: {:.0} ns/packet, {:.1} % delivered",
                round + 1,
                bed.kind.map(|k| k.to_string()).unwrap_or_default(),
                bed.label(),
                sample.ns_per_packet(),
                100.0 * sample.delivered_share()
            ));
            samples[slot].push(sample);
        }
    }
    let row = |bed: &LoadBed, samples: &[load::Sample]| LoadRow {
        gateway: bed.gateway,
        label: bed.label(),
        rounds: samples.iter().map(load::Sample::ns_per_packet).collect(),
        delivered: samples.iter().map(load::Sample::delivered_share).collect(),
    };
    let mut results = LoadResults {
        flows: plan.flows,
        frames: plan.frames,
        rounds: plan.rounds,
        floor: Some(row(&beds[0], &samples[0])),
        ..Default::default()
    };
    for kind in [BedKind::Routed, BedKind::Bridge] {
        let rows = beds
            .iter()
            .zip(&samples)
            .filter(|(bed, _)| bed.kind == Some(kind))
            .map(|(bed, samples)| row(bed, samples))
            .collect();
        results.beds.push((kind, rows));
    }

    // The programs' own run time in the datapath, and a profile.
    match in_situ(&mut beds, plan.frames, cpu) {
        Ok(rows) => results.in_situ = rows,
        Err(e) => notes.push(format!("program run time in the datapath not measured: {e:#}")),
    }
    for gateway in [Gateway::Hairpin, Gateway::HairpinTc] {
        if !gateways.is_empty() && !gateways.contains(&gateway) {
            continue;
        }
        match profile(&mut beds, gateway, plan.frames, cpu) {
            Ok(text) => results.profiles.push((gateway.label().to_string(), text)),
            Err(e) => notes.push(format!("no perf profile of {}: {e:#}", gateway.label())),
        }
    }
    Ok(results)
}

fn routed(beds: &mut [LoadBed], gateway: Gateway) -> Option<&mut LoadBed> {
    beds.iter_mut().find(|b| b.kind == Some(BedKind::Routed) && b.gateway == Some(gateway))
}

/// Average ns per run of the XDP programs on the routed bed, from the
/// kernel's BPF statistics.
fn in_situ(
    beds: &mut [LoadBed],
    frames: u32,
    cpu: usize,
) -> anyhow::Result<Vec<(String, String, f64)>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let mut rows = Vec::new();
    for gateway in
        [Gateway::Hairpin, Gateway::HairpinTc, Gateway::XdpForwarder, Gateway::TcForwarder]
    {
        let Some(bed) = routed(beds, gateway) else {
            continue;
        };
        let programs = bed_programs(bed)?;
        let before: Vec<(u64, Duration)> =
            programs.iter().map(|(_, id)| program_stats(*id)).collect::<anyhow::Result<_>>()?;
        bed.measure(frames, cpu)?;
        for ((name, id), (count, time)) in programs.iter().zip(before) {
            let (count_after, time_after) = program_stats(*id)?;
            let runs = count_after - count;
            if runs > 0 {
                let ns = (time_after - time).as_nanos() as f64 / runs as f64;
                rows.push((name.clone(), gateway.label().to_string(), ns));
            }
        }
    }
    Ok(rows)
}

/// The XDP and TC programs attached in a bed's gateway namespace, each once
/// with the interfaces it is on: (description, id).
fn bed_programs(bed: &LoadBed) -> anyhow::Result<Vec<(String, u32)>> {
    let gateway = bed.bed().context("gateway bed")?.gateway();
    let output = gateway.exec("ip", &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).context("ip -j link")?;
    let mut interfaces: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    for link in links.as_array().into_iter().flatten() {
        let Some(id) = link.pointer("/xdp/prog/id").and_then(|v| v.as_u64()) else {
            continue;
        };
        let interface = link.get("ifname").and_then(|v| v.as_str()).unwrap_or("?");
        interfaces.entry(id as u32).or_default().push(interface.to_string());
    }
    // tcx links do not show in `ip link`; bpftool lists them.
    let output = gateway.try_exec("bpftool", &["-j", "net", "show"]);
    if let Ok(net) = serde_json::from_slice::<serde_json::Value>(&output.stdout) {
        let tc = net.as_array().into_iter().flatten().filter_map(|n| n.get("tc"));
        for attached in tc.filter_map(|t| t.as_array()).flatten() {
            let Some(id) = attached.get("prog_id").and_then(|v| v.as_u64()) else {
                continue;
            };
            let interface = attached.get("devname").and_then(|v| v.as_str()).unwrap_or("?");
            let kind = attached.get("kind").and_then(|v| v.as_str()).unwrap_or("tc");
            interfaces.entry(id as u32).or_default().push(format!("{interface} {kind}"));
        }
    }
    let mut programs = Vec::new();
    for (id, on) in interfaces {
        let info = program_info(id)?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        programs.push((format!("{name} (on {})", on.join(", ")), id));
    }
    Ok(programs)
}

fn program_info(id: u32) -> anyhow::Result<aya::programs::ProgramInfo> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == id)
        .with_context(|| format!("no program {id}"))
}

fn program_stats(id: u32) -> anyhow::Result<(u64, Duration)> {
    let info = program_info(id)?;
    Ok((info.run_count(), info.run_time()))
}

/// perf's cpu-clock samples on the generator's CPU during one routed
/// measurement of `gateway`, summarised by symbol.
fn profile(
    beds: &mut [LoadBed],
    gateway: Gateway,
    frames: u32,
    cpu: usize,
) -> anyhow::Result<String> {
    let data = std::env::temp_dir().join(format!("hairpin-bench-{}.perf", std::process::id()));
    let bed = routed(beds, gateway).context("routed bed")?;
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "10000", "-C", &cpu.to_string(), "-o"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting perf record")?;
    thread::sleep(Duration::from_millis(300));
    let measured = bed.measure(frames, cpu);
    // SIGINT makes perf write its data.
    if let Some(pid) = rustix::process::Pid::from_raw(perf.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    }
    let status = perf.wait().context("waiting for perf")?;
    measured?;
    if !status.success() && !data.exists() {
        bail!("perf record failed: {status}");
    }
    let output = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "symbol",
            "--percent-limit",
            "1",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    let _ = fs::remove_file(&data);
    let text: String = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            // `8.00%  [k] symbol` without the padding and empty columns.
            let words: Vec<&str> = line.split_whitespace().take(3).collect();
            format!("{}\n", words.join(" "))
        })
        .collect();
    if text.is_empty() {
        bail!("perf report printed nothing: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(text)
}

fn machine(cpus: usize) -> Machine {
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    Machine {
        date: run("date", &["-u", "+%Y-%m-%d"]),
        time: run("date", &["-u", "+%H:%M"]),
        host: fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        kernel: run("uname", &["-r"]),
        cpu_model,
        cpus,
        iptables: run("iptables", &["-V"]),
        load_average: load_average(),
        load_average_after: String::new(),
    }
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

const README_BEGIN: &str = "<!-- bench:begin -->";
const README_END: &str = "<!-- bench:end -->";

/// Replaces the README's benchmark block with this run's targets.
fn update_readme(readme: &Path, results: &Results, file: &Path) -> anyhow::Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("{} has no {README_BEGIN} ... {README_END} block", readme.display());
    };
    let link = file
        .strip_prefix(readme.parent().unwrap_or(Path::new("")))
        .unwrap_or(file)
        .display()
        .to_string();
    let mut block = format!(
        "{README_BEGIN}\nLatest full run: [{link}]({link}), {} on {} (kernel {}).\n\n",
        results.machine.date, results.machine.cpu_model, results.machine.kernel
    );
    if let Some(load) = &results.load {
        block.push_str(&format!(
            "Routed bed, ns per delivered packet (floor {:.0} ns; gateway share = time - floor):\n\n\
             | configuration | ns/packet | gateway share |\n| --- | ---: | ---: |\n",
            load.floor_ns()
        ));
        if let Some((_, rows)) = load.beds.iter().find(|(k, _)| *k == BedKind::Routed) {
            for row in rows {
                block.push_str(&format!(
                    "| {} | {:.0} | {:.0} |\n",
                    row.label,
                    row.ns(),
                    row.ns() - load.floor_ns()
                ));
            }
        }
        block.push('\n');
    }
    block.push_str(&results.targets_table());
    let updated = format!("{}{block}{}", &text[..begin], &text[end..]);
    fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}
