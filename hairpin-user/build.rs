use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

/// Set to 1 to fail the build when the eBPF toolchain is missing, instead of
/// embedding an empty object (`cargo xtask` sets it).
const REQUIRE_EBPF: &str = "HAIRPIN_REQUIRE_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={REQUIRE_EBPF}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // One object per binary of hairpin-ebpf, named after it by aya-build.
    let objects = ["hairpin", "hairpin-bench", "hairpin-count"].map(|name| out_dir.join(name));
    let required = env::var(REQUIRE_EBPF).is_ok_and(|v| v == "1");

    if let Some(missing) = missing_toolchain() {
        if required {
            return Err(anyhow!(
                "cannot build the eBPF program: {missing}; run `cargo xtask setup`"
            ));
        }
        println!(
            "cargo:warning=building without the eBPF program ({missing}); run `cargo xtask setup`"
        );
        // Paths that do not exist make cargo rerun this script on every
        // build, so the program is built as soon as the toolchain is there.
        println!("cargo:rerun-if-changed={}", rust_src_marker().display());
        println!("cargo:rerun-if-changed={}", bpf_linker_path().display());
        for object in &objects {
            fs::write(object, []).context("writing an empty eBPF object")?;
        }
        return Ok(());
    }

    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .context("workspace root")?
        .join("hairpin-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.with_file_name("hairpin-common").display());
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hairpin-ebpf",
            root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&active_toolchain()),
    )
}

/// What the eBPF build needs and this machine lacks, if anything.
fn missing_toolchain() -> Option<String> {
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        return Some("bpf-linker is not installed".into());
    }
    let core = rust_src_marker();
    if !core.exists() {
        return Some(format!("rust-src is missing ({} not found)", core.display()));
    }
    None
}

/// A file that exists when the toolchain has rust-src.
fn rust_src_marker() -> PathBuf {
    let sysroot = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default();
    PathBuf::from(sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml")
}

fn bpf_linker_path() -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    cargo_home.join("bin/bpf-linker")
}

/// The toolchain building this crate, for `rustup run` to build the eBPF
/// crate with the same compiler (and so the same rust-src).
fn active_toolchain() -> String {
    env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into())
}
