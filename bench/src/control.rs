//! The control plane at scale: `hairpin run` on the routed bed with many
//! established flows, and how long the commands an operator runs against it
//! take (`conntrack list --json`, `stats --json`, a metrics scrape, `mapping
//! add`), with the daemon's memory while ten scrapes run at once.

use std::{
    fs,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use hairpin_common::nat::UDP_STREAM_AFTER_S;
use hairpin_tests::{Netns, cli::Cli, daemon::Daemon};

use crate::{
    beds::{BedKind, Gateway, METRICS_LISTEN, PUBLIC, SERVER},
    load::LoadBed,
    stats::median,
};

/// How many scrapes run at once for the memory figure.
pub const CONCURRENT_SCRAPES: usize = 10;

/// One flow count's measurements; times in seconds, one per round.
#[derive(Clone, Debug, Default)]
pub struct ControlPoint {
    pub flows: u32,
    /// Entries of the established and the new-flow table, as `stats
    /// --json` counts them.
    pub established_entries: u64,
    pub new_entries: u64,
    /// Rows `conntrack list --json` printed (one per flow).
    pub listed: usize,
    pub list: Vec<f64>,
    pub stats: Vec<f64>,
    pub scrape: Vec<f64>,
    pub mapping_add: Vec<f64>,
    /// The slowest of [`CONCURRENT_SCRAPES`] scrapes started together.
    pub concurrent_slowest: f64,
    /// The daemon's resident memory before the concurrent scrapes and the
    /// most it reached while they ran, KiB.
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
}

impl ControlPoint {
    pub fn rss_growth_mib(&self) -> f64 {
        self.rss_peak_kib.saturating_sub(self.rss_before_kib) as f64 / 1024.0
    }
}

/// The median of a point's rounds, seconds.
pub fn seconds(rounds: &[f64]) -> f64 {
    median(rounds)
}

/// `hairpin run` with `flows` established flows for each of `flow_counts`
/// (tables of `capacity` entries), each command timed `rounds` times.
pub fn measure(
    flow_counts: &[u32],
    capacity: u32,
    rounds: usize,
    cpu: usize,
    log: &dyn Fn(&str),
) -> anyhow::Result<Vec<ControlPoint>> {
    let mut points = Vec::new();
    for &flows in flow_counts {
        log(&format!("control plane: opening {flows} flows through hairpin run"));
        let mut bed = LoadBed::new(BedKind::Routed, Gateway::HairpinDaemon, flows, capacity)?;
        bed.open_flows(cpu)?;
        // An answered UDP flow moves to the established table with its
        // first packet after UDP_STREAM_AFTER_S: each flow sends once more.
        thread::sleep(Duration::from_secs(u64::from(UDP_STREAM_AFTER_S) + 1));
        bed.measure(flows, cpu)?;
        let gateway = bed.bed().context("the gateway bed")?.gateway();
        let daemon = daemon(&bed)?;
        let point = measure_point(gateway, daemon.pid(), flows, rounds, log)?;
        log(&format!(
            "control plane, {flows} flows: list {:.2} s, stats {:.3} s, scrape {:.3} s, \
             mapping add {:.3} s, RSS +{:.1} MiB under {CONCURRENT_SCRAPES} scrapes",
            seconds(&point.list),
            seconds(&point.stats),
            seconds(&point.scrape),
            seconds(&point.mapping_add),
            point.rss_growth_mib()
        ));
        points.push(point);
    }
    Ok(points)
}

fn daemon(bed: &LoadBed) -> anyhow::Result<&Daemon> {
    bed.configured
        .downcast_ref::<Vec<Box<dyn std::any::Any>>>()
        .and_then(|kept| kept.iter().find_map(|item| item.downcast_ref::<Daemon>()))
        .context("the bed runs no hairpin daemon")
}

fn measure_point(
    gateway: &Netns,
    pid: u32,
    flows: u32,
    rounds: usize,
    log: &dyn Fn(&str),
) -> anyhow::Result<ControlPoint> {
    let cli = Cli::new(gateway);
    let mut point = ControlPoint { flows, ..Default::default() };
    for round in 0..rounds {
        let (took, output) = timed(|| cli.run(&["conntrack", "list", "--json"]));
        ensure!(output.success(), "conntrack list failed: {output}");
        let rows = serde_json::from_str::<serde_json::Value>(&output.stdout)
            .context("conntrack list --json is not JSON")?
            .as_array()
            .map(Vec::len)
            .context("conntrack list --json is not an array")?;
        point.list.push(took);
        point.listed = rows;

        let (took, output) = timed(|| cli.run(&["stats", "--json"]));
        ensure!(output.success(), "stats failed: {output}");
        let counters = &output.json()["counters"];
        point.established_entries = counters["established_entries"]
            .as_u64()
            .context("stats --json has no established_entries")?;
        point.new_entries =
            counters["new_entries"].as_u64().context("stats --json has no new_entries")?;
        point.stats.push(took);

        let (took, body) = timed(|| scrape(gateway));
        let body = body?;
        ensure!(
            body.contains("hairpin_conntrack_entries"),
            "the scrape has no hairpin_conntrack_entries:\n{}",
            &body[..body.len().min(2000)]
        );
        point.scrape.push(took);

        let public = format!("{PUBLIC}:9999");
        let server = format!("{SERVER}:9999");
        let (took, output) = timed(|| cli.run(&["mapping", "add", "tcp", &public, &server]));
        ensure!(output.success(), "mapping add failed: {output}");
        point.mapping_add.push(took);
        let output = cli.run(&["mapping", "del", "tcp", &public]);
        ensure!(output.success(), "mapping del failed: {output}");
        log(&format!(
            "control plane round {}: {flows} flows: list {:.2} s ({rows} rows), stats {:.3} s",
            round + 1,
            point.list[round],
            point.stats[round]
        ));
    }
    // Fewer rows than flows means the list (or the bed) lost some: the
    // timing would then be of a smaller table.
    ensure!(
        point.listed as u64 * 100 >= u64::from(flows) * 95,
        "conntrack list showed {} rows for {flows} flows",
        point.listed
    );
    // Two entries per established flow: the figures are of established
    // flows, not of not-yet-answered ones.
    ensure!(
        point.established_entries * 100 >= 2 * u64::from(flows) * 95,
        "only {} established entries for {flows} flows ({} in the new-flow table)",
        point.established_entries,
        point.new_entries
    );
    let (slowest, before, peak) = concurrent_scrapes(gateway, pid)?;
    point.concurrent_slowest = slowest;
    point.rss_before_kib = before;
    point.rss_peak_kib = peak;
    Ok(point)
}

fn timed<R>(f: impl FnOnce() -> R) -> (f64, R) {
    let started = Instant::now();
    let result = f();
    (started.elapsed().as_secs_f64(), result)
}

/// `curl` inside the gateway's namespace, where the daemon listens.
fn curl(gateway: &Netns) -> Command {
    let mut command = gateway.command("curl");
    command.args(["--silent", "--show-error", "--fail", "--max-time", "60"]);
    command.arg(format!("http://{METRICS_LISTEN}/metrics"));
    command
}

fn scrape(gateway: &Netns) -> anyhow::Result<String> {
    let output = curl(gateway).output().context("starting curl")?;
    if !output.status.success() {
        bail!("scraping the metrics failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    String::from_utf8(output.stdout).context("the scrape is not UTF-8")
}

/// `VmRSS` of `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in the daemon's status")
}

/// Starts [`CONCURRENT_SCRAPES`] scrapes together while sampling the
/// daemon's resident memory: (the slowest scrape's seconds, RSS before,
/// peak RSS).
fn concurrent_scrapes(gateway: &Netns, pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let before = rss_kib(pid)?;
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = Arc::clone(&running);
        thread::spawn(move || {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                if let Ok(rss) = rss_kib(pid) {
                    peak = peak.max(rss);
                }
                thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let started = Instant::now();
    let children = (0..CONCURRENT_SCRAPES)
        .map(|_| curl(gateway).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("curl"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut slowest = 0f64;
    let mut failed = Vec::new();
    for child in children {
        let output = child.wait_with_output().context("waiting for curl")?;
        slowest = slowest.max(started.elapsed().as_secs_f64());
        if !output.status.success() {
            failed.push(String::from_utf8_lossy(&output.stderr).into_owned());
        }
    }
    running.store(false, Ordering::Relaxed);
    let peak = sampler.join().expect("the RSS sampler panicked").max(rss_kib(pid)?);
    ensure!(failed.is_empty(), "{} concurrent scrapes failed: {failed:?}", failed.len());
    Ok((slowest, before, peak))
}

/// One target per figure the control plane must meet, from the largest
/// flow count measured (and the 30 k list); `None` for a count not run.
pub fn targets(points: &[ControlPoint]) -> Vec<crate::report::Target> {
    use crate::report::{Target, count};
    let largest = points.iter().max_by_key(|p| p.flows);
    let at = |flows: u32| points.iter().find(|p| p.flows == flows);
    let mut targets = Vec::new();
    let mut limit = |what: String,
                     point: Option<&ControlPoint>,
                     value: &dyn Fn(&ControlPoint) -> f64,
                     unit: &str,
                     max: f64| {
        targets.push(match point {
            Some(point) => {
                let measured = value(point);
                Target {
                    what: format!("{what} ({} flows) <= {max} {unit}", count(point.flows)),
                    measured: format!("{measured:.3} {unit}"),
                    pass: Some(measured <= max),
                    why: String::new(),
                }
            }
            None => Target {
                what: format!("{what} <= {max} {unit}"),
                measured: "-".into(),
                pass: None,
                why: String::new(),
            },
        });
    };
    let million = largest.filter(|p| p.flows >= 1_000_000);
    limit("`conntrack list --json`".into(), million, &|p| seconds(&p.list), "s", 5.0);
    limit("`conntrack list --json`".into(), at(30_000), &|p| seconds(&p.list), "s", 0.5);
    limit("`stats --json`".into(), million, &|p| seconds(&p.stats), "s", 0.3);
    limit("a metrics scrape".into(), million, &|p| seconds(&p.scrape), "s", 0.3);
    limit(
        format!("daemon RSS growth during {CONCURRENT_SCRAPES} concurrent scrapes"),
        million,
        &|p| p.rss_growth_mib() * 1024.0 * 1024.0 / 1e6,
        "MB",
        50.0,
    );
    limit("`mapping add`".into(), million, &|p| seconds(&p.mapping_add), "s", 0.1);
    targets
}

/// The results file's section.
pub fn section(points: &[ControlPoint]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## Control plane at scale\n\n\
         `hairpin run` (the daemon, XDP, pinned maps, metrics on) on the routed bed; the flows \
         are opened by packets as in the flow-scale part, answered, and sent to once more after \
         `UDP_STREAM_AFTER_S`, so that they move to the established table (its entries are \
         counted below, two per flow). \
         Each command is timed from start to exit (the CLI's process start included), medians \
         of the rounds; the scrape is `curl` of `/metrics` in the gateway's namespace. The \
         memory is the daemon's `VmRSS`, sampled every 2 ms while \
         ten scrapes started together.\n\n\
         | flows | established entries | new-flow entries | listed | `conntrack list --json` (s) | `stats --json` (s) | scrape (s) | slowest of 10 concurrent scrapes (s) | RSS before (MiB) | RSS growth (MiB) | `mapping add` (s) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for p in points {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.3} |",
            crate::report::count(p.flows),
            p.established_entries,
            p.new_entries,
            p.listed,
            seconds(&p.list),
            seconds(&p.stats),
            seconds(&p.scrape),
            p.concurrent_slowest,
            p.rss_before_kib as f64 / 1024.0,
            p.rss_growth_mib(),
            seconds(&p.mapping_add)
        );
    }
    md
}
