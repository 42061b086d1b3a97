//! Project tasks: `cargo xtask <setup|run|test|demo|bench|deb>`.

mod bench;
mod deb;
mod demo;
mod run;
mod setup;
mod test;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "hairpin's project tasks")]
enum Task {
    /// Install what building and testing the eBPF program needs (rust-src,
    /// bpf-linker, the test tools); quick when already done.
    Setup(setup::Options),
    /// Build hairpin and run it with the given arguments, as root.
    Run(run::Options),
    /// Run every test: host tests, packet tests through the loaded program,
    /// end-to-end tests in network namespaces (needs root).
    Test(test::Options),
    /// Show the seed's problem and hairpin fixing it, in network namespaces.
    Demo(demo::Options),
    /// Measure hairpin against the kernel, iptables, nftables and an XDP
    /// forwarder in network namespaces; writes bench/results/ (needs root).
    Bench(bench::Options),
    /// Build the Debian package (binary, systemd unit, example
    /// configuration, man page, completions) into target/debian/; `--check`
    /// installs it and runs it on a namespace bed (needs root).
    Deb(deb::Options),
}

fn main() -> anyhow::Result<()> {
    match Task::parse() {
        Task::Setup(options) => setup::setup(&options),
        Task::Run(options) => run::run(&options),
        Task::Test(options) => test::test(&options),
        Task::Demo(options) => demo::demo(&options),
        Task::Bench(options) => bench::bench(&options),
        Task::Deb(options) => deb::deb(&options),
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs `command`, failing with its description when it does not succeed.
fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Builds the `hairpin` binary with its eBPF program (required, not optional
/// as in a plain `cargo build`) and returns its path.
fn build_hairpin(release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(workspace_root()).env("HAIRPIN_REQUIRE_EBPF", "1").args([
        "build",
        "--package",
        "hairpin-user",
        "--bin",
        "hairpin",
    ]);
    if release {
        cargo.arg("--release");
    }
    run_command(&mut cargo)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("hairpin"))
}
