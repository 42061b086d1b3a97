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

/// Where the package installs the binary, and the unit runs it from.
const BINARY: &str = "/usr/bin/hairpin";

/// What the installed package must provide.
const INSTALLED: &[&str] = &[
    BINARY,
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

/// The man pages (hairpin.1 and one per command, gzipped, as Debian ships
/// them) and the completions for bash, zsh and fish, from `hairpin man`
/// and `hairpin completions`.
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
    let man = dir.join("man");
    let _ = fs::remove_dir_all(&man);
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    run_command(Command::new(binary).arg("man").arg("--dir").arg(&man))?;
    let pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    ensure!(
        pages.iter().any(|page| page.ends_with("hairpin.1")) && pages.len() > 1,
        "`hairpin man --dir` wrote no page per command: {pages:?}"
    );
    run_command(Command::new("gzip").args(["-9", "--no-name"]).args(&pages))?;
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
    // The check ends by purging the package: on a machine where hairpin is
    // installed for real, that would remove the operator's installation.
    let status = Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", "hairpin"])
        .output()
        .context("starting dpkg-query")?;
    let status = String::from_utf8_lossy(&status.stdout);
    if !status.trim().is_empty() && status.trim() != "not-installed" {
        bail!(
            "a hairpin package is on this machine ({}): `--check` would replace and purge it; \
             run the check on a test machine",
            status.trim()
        );
    }
    setup::ensure_tools(&[("man-db", "man")])?;
    // --force-confnew: a configuration left by an earlier package is
    // replaced by this one's, never asked about.
    let installed =
        run_command(Command::new("dpkg").args(["--force-confnew", "--install"]).arg(package));
    let checked = installed.and_then(|()| check_installed());
    // Purged whether or not the install went through: a half-installed
    // package is removed too.
    let removed = run_command(Command::new("dpkg").args(["--purge", "hairpin"]));
    checked?;
    removed?;
    println!("package check: installed, man pages and completions found, the unit's command ran");
    Ok(())
}

fn check_installed() -> anyhow::Result<()> {
    for path in INSTALLED {
        ensure!(Path::new(path).is_file(), "the package did not install {path}");
        let owner = Command::new("dpkg").args(["--search", path]).output()?;
        ensure!(
            String::from_utf8_lossy(&owner.stdout).starts_with("hairpin:"),
            "{path} is not the hairpin package's (dpkg --search: {})",
            String::from_utf8_lossy(&owner.stdout).trim()
        );
    }
    for page in ["hairpin", "hairpin-mapping-add"] {
        let man = Command::new("man").args(["-w", page]).output().context("starting man")?;
        ensure!(
            man.status.success()
                && String::from_utf8_lossy(&man.stdout).contains(&format!("{page}.1")),
            "`man -w {page}` does not find the page: {}",
            String::from_utf8_lossy(&man.stderr)
        );
    }
    let version = Command::new(BINARY).arg("--version").output()?;
    ensure!(version.status.success(), "the installed hairpin does not run");
    let unit = "/lib/systemd/system/hairpin.service";
    println!("package check: running the installed unit's command on a namespace bed");
    // The service test reads ExecStart from the unit and checks that it
    // runs this binary.
    run_command(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .env("HAIRPIN_REQUIRE_EBPF", "1")
            .env("HAIRPIN_BIN", BINARY)
            .env("HAIRPIN_UNIT", unit)
            .args(["test", "--package", "hairpin-tests", "--test", "service", "--"])
            .args(["--include-ignored", "--test-threads=1"]),
    )
}
