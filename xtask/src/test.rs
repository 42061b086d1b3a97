use std::process::Command;

use anyhow::bail;

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for the test binaries, after `--` (e.g. a test name filter).
    #[arg(last = true)]
    args: Vec<String>,
}

/// Every test, the root-only ones included: they share kernel state
/// (interfaces, XDP attachments), so the test threads run one at a time.
pub fn test(options: &Options) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!(
            "`cargo xtask test` needs root for network namespaces and XDP; run it as root \
             (`cargo test` alone runs the host tests and skips the others)"
        );
    }
    crate::setup::ensure()?;
    let binary = crate::build_hairpin(false)?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(crate::workspace_root())
        .env("HAIRPIN_REQUIRE_EBPF", "1")
        .env("HAIRPIN_BIN", &binary)
        .args(["test", "--", "--test-threads=1"])
        .args(&options.args);
    crate::run_command(&mut cargo)
}
