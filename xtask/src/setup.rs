//! `cargo xtask setup`: installs what building and testing the eBPF program
//! needs: the test tools (apt), the standard library's source for the active
//! toolchain (the eBPF build uses `-Z build-std=core`), and bpf-linker built
//! against the toolchain's own LLVM.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::run_command;

/// The Debian packages of the tools the tests use, each with a binary it ships.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("conntrack", "conntrack"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("socat", "socat"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("iputils-ping", "ping"),
    ("wireguard-go", "wireguard-go"),
    ("wireguard-tools", "wg"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// How long `rustup component add` may take: where rustup's server is
/// unreachable it hangs instead of failing.
const RUSTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Debian suites whose `rust-src` versions match rustup's stable releases.
const DEBIAN_SUITES: &str = "trixie-backports trixie sid";

#[derive(clap::Args)]
pub struct Options {
    /// Leave the test tools (apt packages) alone: set up only what building
    /// the eBPF program needs.
    #[arg(long)]
    skip_apt: bool,
}

pub fn setup(options: &Options) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut installed = Vec::new();

    if options.skip_apt {
        println!("test tools: skipped (--skip-apt)");
    } else {
        match test_tools()? {
            None => println!("test tools: present"),
            Some(how) => {
                println!("test tools: {how}");
                installed.push("test tools");
            }
        }
    }

    let toolchain = Toolchain::query()?;
    match rust_src(&toolchain)? {
        None => println!("rust-src: present"),
        Some(how) => {
            println!("rust-src: {how}");
            installed.push("rust-src");
        }
    }
    match bpf_linker(&toolchain)? {
        None => println!("bpf-linker: present"),
        Some(how) => {
            println!("bpf-linker: {how}");
            installed.push("bpf-linker");
        }
    }

    let elapsed = start.elapsed().as_secs_f64();
    if installed.is_empty() {
        println!("setup: everything was present ({elapsed:.1} s)");
    } else {
        println!("setup: done in {elapsed:.1} s; installed {}", installed.join(", "));
    }
    Ok(())
}

/// Returns at once when everything is present, else runs the whole setup.
pub fn ensure() -> anyhow::Result<()> {
    let toolchain = Toolchain::query()?;
    if missing_packages(TEST_TOOLS).is_empty()
        && toolchain.has_rust_src()
        && working_bpf_linker().is_some()
    {
        return Ok(());
    }
    println!("Some of what the build and the tests need is missing; running the setup.");
    setup(&Options { skip_apt: false })
}

/// The Rust toolchain cargo uses for this workspace.
struct Toolchain {
    rustc: OsString,
    sysroot: PathBuf,
    /// `1.95.0` for `rustc 1.95.0 (...)`.
    version: String,
    /// `22` for `LLVM version: 22.1.2`.
    llvm_major: String,
}

impl Toolchain {
    fn query() -> anyhow::Result<Self> {
        // Under cargo (through rustup) a bare `rustc` resolves to the same
        // toolchain as cargo's, since rustup passes RUSTUP_TOOLCHAIN down.
        let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let sysroot = output(Command::new(&rustc).args(["--print", "sysroot"]))?;
        let verbose = output(Command::new(&rustc).args(["--version", "--verbose"]))?;
        let version =
            verbose.lines().next().and_then(|line| line.split_whitespace().nth(1)).with_context(
                || format!("no version in `rustc --version --verbose`:\n{verbose}"),
            )?;
        let llvm_major = verbose
            .lines()
            .find_map(|line| line.strip_prefix("LLVM version:"))
            .and_then(|llvm| llvm.trim().split('.').next())
            .filter(|major| !major.is_empty())
            .with_context(|| {
                format!("no LLVM version in `rustc --version --verbose`:\n{verbose}")
            })?;
        Ok(Self {
            sysroot: PathBuf::from(sysroot.trim()),
            version: version.to_owned(),
            llvm_major: llvm_major.to_owned(),
            rustc,
        })
    }

    /// Where `-Z build-std` looks for the standard library's source.
    fn library(&self) -> PathBuf {
        self.sysroot.join("lib/rustlib/src/rust/library")
    }

    fn has_rust_src(&self) -> bool {
        self.library().join("core/Cargo.toml").is_file()
    }

    /// The toolchain's rustup name (its sysroot folder's), if rustup manages it.
    fn rustup_name(&self) -> Option<&str> {
        let parent = self.sysroot.parent()?;
        (parent.file_name()? == "toolchains").then(|| self.sysroot.file_name()?.to_str()).flatten()
    }
}

/// Installs the missing test tools with apt; `None` when none was missing.
fn test_tools() -> anyhow::Result<Option<String>> {
    let installed = ensure_tools(TEST_TOOLS)?;
    Ok((!installed.is_empty()).then(|| format!("installed with apt: {}", installed.join(" "))))
}

/// Installs with apt the packages of `tools` (package, a binary it ships)
/// whose binary is not found; returns the packages it installed.
pub fn ensure_tools(tools: &[(&'static str, &'static str)]) -> anyhow::Result<Vec<&'static str>> {
    let missing = missing_packages(tools);
    if missing.is_empty() {
        return Ok(missing);
    }
    if !crate::is_root() {
        bail!(
            "{} missing, and installing needs root: run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    run_command(Command::new("apt-get").arg("update"))?;
    run_command(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )?;
    if let Some((package, binary)) = tools.iter().find(|(_, binary)| find_program(binary).is_none())
    {
        bail!("apt installed {package} but {binary} is still not found");
    }
    Ok(missing)
}

/// The packages of `tools` (package, a binary it ships) whose binary is not found.
fn missing_packages(tools: &[(&'static str, &'static str)]) -> Vec<&'static str> {
    tools
        .iter()
        .filter(|(_, binary)| find_program(binary).is_none())
        .map(|(package, _)| *package)
        .collect()
}

/// Finds the executable `name` on PATH or in the sbin folders, which a
/// non-root user's PATH often lacks.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|file| {
            fs::metadata(file)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Installs rust-src for `toolchain`; `None` when it was present.
fn rust_src(toolchain: &Toolchain) -> anyhow::Result<Option<String>> {
    if toolchain.has_rust_src() {
        return Ok(None);
    }
    match rustup_add_rust_src(toolchain) {
        Ok(()) if toolchain.has_rust_src() => return Ok(Some("installed with rustup".into())),
        Ok(()) => println!(
            "rust-src: rustup reported success but {} is still missing; trying Debian's package",
            toolchain.library().join("core/Cargo.toml").display()
        ),
        Err(error) => {
            println!("rust-src: rustup could not install it ({error:#}); trying Debian's package");
        }
    }
    let version = debian_rust_src(toolchain)?;
    Ok(Some(format!("unpacked from Debian's rust-src {version}")))
}

fn rustup_add_rust_src(toolchain: &Toolchain) -> anyhow::Result<()> {
    let mut rustup = Command::new("rustup");
    rustup.args(["component", "add", "rust-src"]);
    // The toolchain whose sysroot was checked, even when RUSTC named it.
    if let Some(name) = toolchain.rustup_name() {
        rustup.args(["--toolchain", name]);
    }
    println!(
        "rust-src: trying `rustup component add rust-src` (for at most {} s)",
        RUSTUP_TIMEOUT.as_secs()
    );
    let mut child = rustup
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {rustup:?}"))?;
    let deadline = Instant::now() + RUSTUP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for rustup")? {
            if !status.success() {
                bail!("it failed: {status}");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            child.kill().context("stopping rustup")?;
            child.wait().context("waiting for rustup to stop")?;
            bail!("it did not finish in {} s", RUSTUP_TIMEOUT.as_secs());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Unpacks Debian's `rust-src` of the toolchain's version into the state
/// folder and links the toolchain's library source to it; returns the
/// package version.
///
/// The package is plain source, so it is only unpacked, never installed, and
/// apt runs with a private state that leaves the machine's own alone.
fn debian_rust_src(toolchain: &Toolchain) -> anyhow::Result<String> {
    let state = state_dir()?;
    let downloads = state.join("rust-src");
    fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;

    let prefix = format!("{}+", toolchain.version);
    let (version, deb) = match downloaded_deb(&downloads, &prefix)? {
        Some(found) => found,
        None => {
            let apt = PrivateApt::new(&state.join("apt"))?;
            run_command(apt.command("apt-get").arg("update"))?;
            let madison = output(apt.command("apt-cache").args(["madison", "rust-src"]))?;
            let version = madison
                .lines()
                .filter_map(|line| line.split('|').nth(1))
                .map(str::trim)
                .find(|version| version.starts_with(&prefix))
                .with_context(|| {
                    format!(
                        "Debian ({DEBIAN_SUITES}) has no rust-src for rustc {}; it has:\n{madison}",
                        toolchain.version
                    )
                })?
                .to_owned();
            run_command(
                apt.command("apt-get")
                    // The download lands in a folder the _apt user cannot write.
                    .arg("-oAPT::Sandbox::User=root")
                    .args(["download", &format!("rust-src={version}")])
                    .current_dir(&downloads),
            )?;
            let deb = downloads.join(deb_name(&version));
            if !deb.is_file() {
                bail!("apt-get download did not leave {}", deb.display());
            }
            (version, deb)
        }
    };

    let tree = downloads.join(format!("tree-{version}"));
    let library = tree.join("usr/lib/rustlib/src/rust/library");
    if !library.join("core/Cargo.toml").is_file() {
        // Unpack beside it and rename, so an interrupted unpack is never
        // taken for a complete tree.
        let partial = downloads.join(format!("tree-{version}.partial"));
        for dir in [&partial, &tree] {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        run_command(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &tree)
            .with_context(|| format!("renaming {} to {}", partial.display(), tree.display()))?;
        if !library.join("core/Cargo.toml").is_file() {
            bail!("{} holds no core/Cargo.toml", library.display());
        }
    }

    let link = toolchain.library();
    match fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => fs::remove_file(&link)
            .with_context(|| format!("removing the stale link {}", link.display()))?,
        Ok(_) => bail!(
            "{} exists but holds no core/Cargo.toml; move it away and run the setup again",
            link.display()
        ),
        Err(_) => {}
    }
    let parent = link.parent().context("the library link has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    symlink(&library, &link)
        .with_context(|| format!("linking {} to {}", link.display(), library.display()))?;
    if !toolchain.has_rust_src() {
        bail!(
            "linked {} to {} but {} still lacks rust-src",
            link.display(),
            library.display(),
            Path::new(&toolchain.rustc).display()
        );
    }
    Ok(version)
}

/// A `rust-src` package of a version starting with `prefix` downloaded
/// earlier into `downloads`, with its version.
fn downloaded_deb(downloads: &Path, prefix: &str) -> anyhow::Result<Option<(String, PathBuf)>> {
    for entry in
        fs::read_dir(downloads).with_context(|| format!("reading {}", downloads.display()))?
    {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if let Some(version) = name
            .strip_prefix("rust-src_")
            .and_then(|rest| rest.strip_suffix("_all.deb"))
            .map(|version| version.replace("%3a", ":"))
            .filter(|version| version.starts_with(prefix))
        {
            return Ok(Some((version, path)));
        }
    }
    Ok(None)
}

/// The file name `apt-get download` gives a `rust-src` package.
fn deb_name(version: &str) -> String {
    format!("rust-src_{}_all.deb", version.replace(':', "%3a"))
}

/// apt with its own lists, sources and cache under one folder.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let lists = dir.join("lists");
        let etc = dir.join("etc");
        let cache = dir.join("cache");
        for folder in [lists.join("partial"), etc.clone(), cache.join("archives/partial")] {
            fs::create_dir_all(&folder)
                .with_context(|| format!("creating {}", folder.display()))?;
        }
        let sources = etc.join("debian.sources");
        // The folder is ours: drop sources left by anything else.
        for entry in fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))? {
            let path = entry?.path();
            if path != sources {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        fs::write(
            &sources,
            format!(
                "Types: deb\nURIs: {}\nSuites: {DEBIAN_SUITES}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                debian_mirror()?
            ),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        Ok(Self {
            options: vec![
                format!("-oDir::State::Lists={}", lists.display()),
                "-oDir::Etc::SourceList=/dev/null".into(),
                format!("-oDir::Etc::SourceParts={}", etc.display()),
                format!("-oDir::Cache={}", cache.display()),
            ],
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }
}

/// The Debian mirror this machine's apt uses.
fn debian_mirror() -> anyhow::Result<String> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if deb822.exists() {
        let text =
            fs::read_to_string(deb822).with_context(|| format!("reading {}", deb822.display()))?;
        return text
            .lines()
            .find_map(|line| line.trim().strip_prefix("URIs:"))
            .and_then(|uris| uris.split_whitespace().next())
            .map(str::to_owned)
            .with_context(|| format!("no `URIs:` line in {}", deb822.display()));
    }
    // The one-line format (`deb [options] URI suite components`).
    let list = Path::new("/etc/apt/sources.list");
    let text = fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("deb "))
        .find_map(|rest| {
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            rest.split_whitespace().next().map(str::to_owned)
        })
        .with_context(|| {
            format!("no Debian mirror found in {} or {}", deb822.display(), list.display())
        })
}

/// Installs bpf-linker when none runs; `None` when one does.
fn bpf_linker(toolchain: &Toolchain) -> anyhow::Result<Option<String>> {
    if let Some(linker) = working_bpf_linker() {
        warn_if_off_path(&linker);
        return Ok(None);
    }

    let llvm = toolchain_llvm(&toolchain.sysroot.join("lib"))?;
    let llvm_name = llvm.file_name().context("the LLVM library has a name")?;
    // bpf-linker links `$LLVM_PREFIX/lib/libLLVM.so` and keeps that folder as
    // its run path, where the loader then looks for the soname.
    let prefix = state_dir()?.join("llvm");
    let lib = prefix.join("lib");
    if lib.exists() {
        fs::remove_dir_all(&lib).with_context(|| format!("removing {}", lib.display()))?;
    }
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(llvm_name)] {
        let link = lib.join(name);
        symlink(&llvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    }

    println!(
        "bpf-linker: building {BPF_LINKER_VERSION} against {} (a minute or two)",
        llvm.display()
    );
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_command(
        Command::new(cargo)
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", toolchain.llvm_major))
            // Replaces an installed bpf-linker that no longer runs (its LLVM
            // went away with an older toolchain).
            .arg("--force"),
    )?;
    let linker = working_bpf_linker()
        .context("bpf-linker was installed but `bpf-linker --version` still fails")?;
    warn_if_off_path(&linker);
    Ok(Some(format!(
        "built {BPF_LINKER_VERSION} against the toolchain's LLVM {}",
        toolchain.llvm_major
    )))
}

/// A bpf-linker whose `--version` runs: the one on PATH, else cargo's.
fn working_bpf_linker() -> Option<PathBuf> {
    let cargo_bin = cargo_home().map(|home| home.join("bin/bpf-linker"));
    find_program("bpf-linker").into_iter().chain(cargo_bin).find(|linker| {
        Command::new(linker)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// The eBPF build runs `bpf-linker` from PATH, so say when it is not there.
fn warn_if_off_path(linker: &Path) {
    let path = env::var_os("PATH").unwrap_or_default();
    let on_path =
        linker.parent().is_some_and(|dir| env::split_paths(&path).any(|entry| entry == dir));
    if !on_path {
        println!(
            "bpf-linker: warning: {} is not on PATH; add its folder to PATH for the eBPF build",
            linker.display()
        );
    }
}

/// The program `name` on PATH, else in cargo's bin folder (where `cargo
/// install` puts it, which PATH may lack).
pub fn cargo_bin(name: &str) -> Option<PathBuf> {
    find_program(name)
        .or_else(|| cargo_home().map(|home| home.join("bin").join(name)).filter(|p| p.is_file()))
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

/// The toolchain's LLVM shared library in its sysroot's `lib`.
fn toolchain_llvm(lib: &Path) -> anyhow::Result<PathBuf> {
    let names: Vec<String> = fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    // `libLLVM.so.<version>` is the library itself (and its soname); a
    // `libLLVM-<version>.so` beside it may be only a linker script naming it.
    names
        .iter()
        .find(|name| name.starts_with("libLLVM.so."))
        .or_else(|| names.iter().find(|name| name.starts_with("libLLVM-") && name.ends_with(".so")))
        .map(|name| lib.join(name))
        .with_context(|| format!("no libLLVM shared library in {}", lib.display()))
}

/// Where the setup keeps what it downloads, unpacks and links to.
fn state_dir() -> anyhow::Result<PathBuf> {
    if crate::is_root() {
        return Ok(PathBuf::from("/var/lib/hairpin-setup"));
    }
    let data = env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .context("neither XDG_DATA_HOME nor HOME is set")?;
    Ok(data.join("hairpin-setup"))
}

/// Runs `command` and returns what it printed.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed: {}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}
