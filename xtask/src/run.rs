use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct Options {
    /// Build in release mode.
    #[arg(long)]
    release: bool,
    /// Arguments for hairpin, after `--` (e.g. `-- run --config hairpin.toml`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let binary = crate::build_hairpin(options.release)?;
    let mut command = if crate::is_root() {
        Command::new(&binary)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    };
    let status = command
        .args(&options.args)
        .status()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    if !status.success() {
        bail!("hairpin exited with {status}");
    }
    Ok(())
}
