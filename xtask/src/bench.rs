//! `cargo xtask bench`: builds the benchmark runner (`hairpin-bench`) with
//! its eBPF programs and runs it as root; it writes
//! `bench/results/<date>-<host>.md` with a chart and, on a full run, puts
//! the targets into the README.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::setup;

/// Needed: iperf3 for TCP bulk throughput, curl to scrape the daemon's
/// metrics in the control-plane part.
const BENCH_TOOLS: &[(&str, &str)] = &[("iperf3", "iperf3"), ("curl", "curl")];

/// Wanted: gnuplot draws the chart, perf samples where the time goes. The
/// benchmark says so in its results when they are missing.
const OPTIONAL_TOOLS: &[(&str, &str)] = &[("gnuplot-nox", "gnuplot"), ("linux-perf", "perf")];

#[derive(clap::Args)]
pub struct Options {
    /// A run of a few minutes (fewer frames, runs and seconds per
    /// measurement) instead of about a quarter of an hour.
    #[arg(long)]
    quick: bool,
    /// Appended to the results file's name (`<date>-<host>-<name>.md`), e.g. `after`.
    #[arg(long)]
    name: Option<String>,
    /// Arguments for the runner, after `--` (e.g. `-- --only load,cost`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn bench(options: &Options) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("`cargo xtask bench` needs root for network namespaces and XDP; run it as root");
    }
    setup::ensure()?;
    let installed = setup::ensure_tools(BENCH_TOOLS)?;
    if !installed.is_empty() {
        println!("bench tools: installed with apt: {}", installed.join(" "));
    }
    for tool in OPTIONAL_TOOLS {
        match setup::ensure_tools(std::slice::from_ref(tool)) {
            Ok(installed) if !installed.is_empty() => println!("installed with apt: {}", tool.0),
            Ok(_) => {}
            Err(e) => println!(
                "{} is not available ({e:#}); the results will say what is missing",
                tool.0
            ),
        }
    }

    let root = crate::workspace_root();
    crate::run_command(
        Command::new(env!("CARGO")).current_dir(&root).env("HAIRPIN_REQUIRE_EBPF", "1").args([
            "build",
            "--release",
            "--package",
            "hairpin-bench",
            // The control-plane part runs the `hairpin` binary itself.
            "--package",
            "hairpin-user",
        ]),
    )?;
    let mut command_line = String::from("cargo xtask bench");
    if options.quick {
        command_line.push_str(" --quick");
    }
    if let Some(name) = &options.name {
        command_line.push_str(&format!(" --name {name}"));
    }
    if !options.args.is_empty() {
        command_line.push_str(&format!(" -- {}", options.args.join(" ")));
    }
    let runner = root.join("target/release/hairpin-bench");
    let mut run = Command::new(&runner);
    run.current_dir(&root)
        .env("HAIRPIN_BIN", root.join("target/release/hairpin"))
        .arg("--out")
        .arg(root.join("bench/results"))
        .arg("--readme")
        .arg(root.join("README.md"))
        .args(["--command-line", &command_line]);
    if options.quick {
        run.arg("--quick");
    }
    if let Some(name) = &options.name {
        run.args(["--name", name]);
    }
    let status = run
        .args(&options.args)
        .status()
        .with_context(|| format!("failed to start {}", runner.display()))?;
    if !status.success() {
        bail!("the benchmark failed: {status}");
    }
    Ok(())
}
