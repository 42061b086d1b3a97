use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

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
        .args(["test", "--lib", "--bins", "--tests", "--", "--test-threads=1", "--include-ignored"])
        .args(&options.args)
        .stdout(Stdio::piped());
    let mut child = cargo.spawn().context("failed to start cargo test")?;
    let stdout = child.stdout.take().context("cargo test's output")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("\nall test binaries: {} passed, {} failed", totals.passed, totals.failed);
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    /// Adds a libtest summary line (`test result: ok. 3 passed; 0 failed; ...`).
    fn add(&mut self, line: &str) {
        let Some(summary) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in summary.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(count), Some(what)) = (words.next(), words.next()) {
                match (count.parse::<u64>(), what) {
                    (Ok(n), "passed") => self.passed += n,
                    (Ok(n), "failed") => self.failed += n,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_are_added_up() {
        let mut totals = Totals::default();
        totals.add("test result: ok. 28 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.05s");
        totals
            .add("test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out");
        totals.add("test something ... ok");
        assert_eq!((totals.passed, totals.failed), (31, 2));
    }
}
