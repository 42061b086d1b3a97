use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

/// Set to 1 to fail the build when the eBPF toolchain is missing, instead of
/// embedding an empty object (`cargo xtask` sets it).
const REQUIRE_EBPF: &str = "HAIRPIN_REQUIRE_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={REQUIRE_EBPF}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("hairpin");
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
        fs::write(&object, []).context("writing the empty eBPF object")?;
        return Ok(());
    }

    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .context("workspace root")?
        .join("hairpin-ebpf");
    let common_dir = ebpf_dir.with_file_name("hairpin-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
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
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("bpf-linker is not installed".into());
    }
    let sysroot = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.exists() {
        return Some(format!(
            "rust-src is missing ({} not found)",
            core.display()
        ));
    }
    None
}

/// The toolchain building this crate, for `rustup run` to build the eBPF
/// crate with the same compiler (and so the same rust-src).
fn active_toolchain() -> String {
    env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into())
}
