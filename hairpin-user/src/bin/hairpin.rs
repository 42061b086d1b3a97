use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hairpin::{
    config::Config,
    datapath::{Datapath, Table, if_index, monotonic_coarse_ns},
    stats::{Snapshot, format_values},
};
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

/// hairpin: hairpin NAT for Linux gateways, in XDP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach it to the LAN interfaces and stay in the
    /// foreground; SIGINT or SIGTERM detaches it.
    Run {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the counters every this many seconds (0: only at exit).
        #[arg(long, default_value_t = 0)]
        stats_interval: u64,
    },
    /// Check a configuration file and print what it would do.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hairpin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says.
            eprintln!("hairpin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, stats_interval } => run(&config, stats_interval).await,
        Command::Check { config } => {
            let config = load_config(&config)?;
            println!("configuration is valid: {}", describe(&config));
            Ok(())
        }
    }
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::from_file(path).with_context(|| format!("invalid configuration {}", path.display()))
}

fn describe(config: &Config) -> String {
    format!(
        "LAN {} ({}), SNAT source {}, {} mapping(s)",
        config.lan.interfaces.join(", "),
        config.lan.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
        config.lan.address,
        config.mappings.len()
    )
}

async fn run(path: &std::path::Path, stats_interval: u64) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let lan = config
        .lan
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("lan.interfaces[{i}]"), name));
    let wan = config.wan.iter().map(|wan| ("wan.interface".to_string(), &wan.interface));
    for (key, name) in lan.chain(wan) {
        if_index(name)
            .with_context(|| format!("invalid configuration {}: `{key}`", path.display()))?;
    }
    for name in &config.lan.interfaces {
        warn_if_not_forwarding(name);
    }

    let mut datapath = Datapath::load(&config).context("loading the datapath")?;
    if let Some(logger) = datapath.take_logger() {
        // SAFETY: the AsyncFd owns the logger, so the fd outlives the registration.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .context("watching the eBPF log")?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    datapath.configure(&config).context("configuring the datapath")?;
    let attachments = datapath.attach(&config).context("attaching the datapath")?;
    for a in &attachments {
        info!("attached to {} (ifindex {}) in {} mode", a.interface, a.if_index, a.mode);
    }
    info!("hairpin running: {}", describe(&config));
    for mapping in &config.mappings {
        info!("  {mapping}");
    }
    for warning in config.warnings() {
        warn!("{warning}");
    }

    let settings = hairpin::datapath::settings(&config);
    let mut reclaimed = [0u64; 2];
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let period =
        Duration::from_secs(if stats_interval == 0 { u64::MAX / 4 } else { stats_interval });
    let mut stats_ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let reclaim_period = reclaim_interval(&config);
    let mut reclaim_ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + reclaim_period, reclaim_period);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = stats_ticker.tick() => print_counters(&datapath, &config, reclaimed, "counters"),
            _ = reclaim_ticker.tick() => match datapath.reclaim_expired(&settings, monotonic_coarse_ns()) {
                Ok([established, new]) => {
                    reclaimed[0] += established as u64;
                    reclaimed[1] += new as u64;
                }
                Err(e) => warn!("reclaiming expired flows: {e}"),
            },
        }
    }
    print_counters(&datapath, &config, reclaimed, "counters at exit");
    datapath.detach();
    info!("detached");
    Ok(())
}

/// Often enough that expired flows do not linger much past their timeout.
fn reclaim_interval(config: &Config) -> Duration {
    let t = config.timeouts;
    let shortest = t.tcp_established.min(t.tcp_transitory).min(t.udp);
    Duration::from_secs((shortest / 4).clamp(1, 10))
}

fn snapshot(datapath: &Datapath, config: &Config, reclaimed: [u64; 2]) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        counters: datapath.counters()?,
        established_entries: datapath.conntrack(Table::Established)?.len(),
        new_entries: datapath.conntrack(Table::New)?.len(),
        capacity: config.conntrack_capacity,
        reclaimed_established: reclaimed[0],
        reclaimed_new: reclaimed[1],
    })
}

fn print_counters(datapath: &Datapath, config: &Config, reclaimed: [u64; 2], title: &str) {
    match snapshot(datapath, config, reclaimed) {
        Ok(snapshot) => println!("{title}:\n{}", format_values(&snapshot.values(), false)),
        Err(e) => warn!("reading counters: {e}"),
    }
}

/// `bpf_fib_lookup` refuses to route for an interface without forwarding.
fn warn_if_not_forwarding(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
        warn!(
            "IPv4 forwarding is off on {interface} ({path}); hairpin will pass every packet to the kernel"
        );
    }
}
