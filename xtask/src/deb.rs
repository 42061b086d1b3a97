//! `cargo xtask deb`: the Debian package, built by cargo-deb from the
//! `[package.metadata.deb]` of hairpin-user: the binary with its eBPF
//! programs, the systemd unit, an example configuration under /etc/hairpin,
//! and the man page and shell completions generated from the CLI model.
//! `--check` then installs it, checks that the man page and completions are
//! where the system looks for them, runs the installed unit's command on a
//! namespace bed and removes the package again.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{run_command, setup, workspace_root};

/// The cargo-deb release the package is built with (`cargo install --locked`).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// What the installed package must provide, besides the binary.
const INSTALLED: &[&str] = &[
    "/usr/bin/hairpin",
    "/lib/systemd/system/hairpin.service",
    "/etc/hairpin/hairpin.toml",
    "/usr/share/bash-completion/completions/hairpin",
    "/usr/share/zsh/vendor-completions/_hairpin",
    "/usr/share/fish/vendor_completions.d/hairpin.fish",
];

#[derive(clap::Args)]
pub struct Options {
    /// Then install the package (dpkg -i), check its man page, completions
    /// and unit, run the unit's command on a namespace bed, and remove it
    /// (needs root).
    #[arg(long)]
    check: bool,
}

pub fn deb(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    let cargo_deb = cargo_deb()?;
    let root = workspace_root();
    let binary = crate::build_hairpin(true)?;
    let assets = root.join("target/deb-assets");
    generate_assets(&binary, &assets)?;
    let out = root.join("target/debian");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let listing = Command::new(&cargo_deb)
        .current_dir(&root)
        .args(["--package", "hairpin-user", "--no-build", "--output"])
        .arg(&out)
        .output()
        .context("starting cargo-deb")?;
    if !listing.status.success() {
        bail!("cargo deb failed: {}", String::from_utf8_lossy(&listing.stderr));
    }
    // cargo-deb prints the package's path last.
    let package = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .last()
        .map(|line| PathBuf::from(line.trim()))
        .filter(|path| path.extension().is_some_and(|e| e == "deb") && path.is_file())
        .context("cargo deb did not say where the package is")?;
    println!("package: {}", package.display());
    if options.check {
        check(&package)?;
    }
    Ok(())
}

/// cargo-deb on PATH or in cargo's bin folder, installed if missing.
fn cargo_deb() -> anyhow::Result<PathBuf> {
    let installed = setup::cargo_bin("cargo-deb");
    if let Some(path) = installed {
        return Ok(path);
    }
    println!("cargo-deb: installing {CARGO_DEB_VERSION} (a minute or two)");
    run_command(Command::new(env!("CARGO")).args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))?;
    setup::cargo_bin("cargo-deb").context("cargo-deb was installed but is not found")
}

/// The man page (gzipped, as Debian ships them) and the completions for
/// bash, zsh and fish, from `hairpin man` and `hairpin completions`.
fn generate_assets(binary: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let generated = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let output = Command::new(binary).args(args).output().context("starting hairpin")?;
        ensure!(
            output.status.success() && !output.stdout.is_empty(),
            "hairpin {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
    };
    let man = dir.join("hairpin.1");
    fs::write(&man, generated(&["man"])?).context("writing the man page")?;
    let _ = fs::remove_file(dir.join("hairpin.1.gz"));
    run_command(Command::new("gzip").args(["-9", "--no-name"]).arg(&man))?;
    for (shell, file) in [("bash", "hairpin.bash"), ("zsh", "_hairpin"), ("fish", "hairpin.fish")] {
        fs::write(dir.join(file), generated(&["completions", shell])?)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    Ok(())
}

/// Installs `package`, checks what it put where, runs the installed unit's
/// command on a bed (the service test, aimed at the installed files) and
/// removes the package.
fn check(package: &Path) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("`cargo xtask deb --check` installs the package: run it as root");
    }
    setup::ensure_tools(&[("man-db", "man")])?;
    run_command(Command::new("dpkg").arg("--install").arg(package))?;
    let checked = check_installed();
    let removed = run_command(Command::new("dpkg").args(["--purge", "hairpin"]));
    checked?;
    removed?;
    println!("package check: installed, man page and completions found, the unit's command ran");
    Ok(())
}

fn check_installed() -> anyhow::Result<()> {
    for path in INSTALLED {
        ensure!(Path::new(path).is_file(), "the package did not install {path}");
    }
    let man = Command::new("man").args(["-w", "hairpin"]).output().context("starting man")?;
    ensure!(
        man.status.success() && String::from_utf8_lossy(&man.stdout).contains("hairpin.1"),
        "`man -w hairpin` does not find the page: {}",
        String::from_utf8_lossy(&man.stderr)
    );
    let version = Command::new("/usr/bin/hairpin").arg("--version").output()?;
    ensure!(version.status.success(), "the installed hairpin does not run");
    let unit = "/lib/systemd/system/hairpin.service";
    let exec_start = fs::read_to_string(unit)?
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart=").map(str::to_owned))
        .context("the installed unit has no ExecStart")?;
    let program = exec_start.split_whitespace().next().unwrap_or_default().to_owned();
    println!("package check: running the unit's command ({exec_start}) on a namespace bed");
    run_command(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .env("HAIRPIN_REQUIRE_EBPF", "1")
            .env("HAIRPIN_BIN", &program)
            .env("HAIRPIN_UNIT", unit)
            .args(["test", "--package", "hairpin-tests", "--test", "service", "--"])
            .args(["--include-ignored", "--test-threads=1"]),
    )
}
