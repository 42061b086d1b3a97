use std::{
    io::{Read as _, Write as _},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{CommandFactory as _, Parser as _};
use hairpin::{
    attach::Hook,
    cli::{Cli, Command, ConntrackCommand, DenyCommand, MappingCommand},
    config::{Config, Mapping, Proto, parse_endpoint, parse_network},
    datapath::{Attachment, Datapath, PinDir, if_index, monotonic_coarse_ns},
    entry_count::EntryCounter,
    flows::FlowRow,
    lock::{DaemonLock, WriteLock},
    maps::{DenyOrigin, Maps},
    routes::RouteCacheKeeper,
    stats::{MappingRow, Snapshot, format_values},
};
use hairpin_common::Counter;
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

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
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says.
            eprintln!("hairpin: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, without the repetitions of causes
/// that already print their own cause.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string().replace('\n', "; ");
        if line.contains(text.trim()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text.trim());
    }
    line
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let pins = PinDir(cli.pin_dir);
    match cli.command {
        Command::Run { config, stats_interval, keep_attached } => {
            run(&config, &pins, stats_interval, keep_attached).await
        }
        Command::Check { config } => {
            let config = load_config(&config)?;
            println!("configuration is valid: {}", describe(&config));
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
            Ok(())
        }
        Command::Mapping(command) => mapping(&pins, command),
        Command::Conntrack(command) => conntrack(&pins, command),
        Command::Deny(command) => deny(&pins, command),
        Command::Stats { json, watch } => stats(&pins, json, watch).await,
        Command::Status { json } => status(&pins, json),
        Command::Explain { proto, src, dst, iface, json } => {
            explain(&pins, proto, src, dst, iface, json)
        }
        Command::ImportIptables { file, dry_run } => import_iptables(&pins, file, dry_run),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hairpin", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Man { dir: Some(dir) } => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("writing the man pages into {}", dir.display())),
    }
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
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

/// What `hairpin status` reads about the daemon, next to the pins.
#[derive(Serialize, Deserialize)]
struct DaemonState {
    pid: u32,
    config: PathBuf,
    pin_dir: PathBuf,
    conntrack_capacity: u32,
    interfaces: Vec<Attachment>,
}

fn state_file(pins: &PinDir) -> PathBuf {
    let name = pins
        .0
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "hairpin".into());
    PathBuf::from("/run/hairpin").join(format!("{name}.json"))
}

fn check_interfaces(config: &Config, path: &Path) -> anyhow::Result<()> {
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
    Ok(())
}

async fn run(
    path: &Path,
    pins: &PinDir,
    stats_interval: u64,
    keep_attached: bool,
) -> anyhow::Result<()> {
    // Installed first: a signal during start-up then stops hairpin cleanly
    // once it is up, instead of killing it half attached.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut config = load_config(path)?;
    check_interfaces(&config, path)?;
    for name in &config.lan.interfaces {
        warn_if_not_forwarding(name);
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("`metrics.listen`: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    // Held until this process ends, however it ends.
    let Some(_daemon_lock) = DaemonLock::try_acquire(&daemon_lock_file(pins))? else {
        let pid = read_state(pins).map_or_else(|| "unknown".into(), |s| s.pid.to_string());
        bail!(
            "hairpin is already running for {} (pid {pid}); stop it first, or give another --pin-dir",
            pins.0.display(),
        );
    };
    let taking_over = pins.exists();
    let mut datapath = Datapath::load(&config, Some(pins)).context("loading the datapath")?;
    if taking_over {
        info!("taking over the datapath pinned at {} (its flows go on)", pins.0.display());
    }
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
    datapath.plan(&config).context("choosing where the datapath runs")?;
    {
        let _lock = write_lock(pins)?;
        datapath.configure(&config).context("configuring the datapath")?;
    }
    let attachments = datapath.attach(&config).context("attaching the datapath")?;
    for a in &attachments {
        info!(
            "attached to {} ({}, ifindex {}): {}{}",
            a.interface,
            a.role,
            a.if_index,
            a.describe(),
            if a.taken_over { ", taken over" } else { "" }
        );
    }
    write_state(pins, path, &config, &attachments);
    let route_cache = match RouteCacheKeeper::start(&datapath.maps) {
        Ok(keeper) => Some(keeper.spawn()),
        Err(e) => {
            warn!("route cache off, every packet is looked up: {e}");
            None
        }
    };
    // One counting program for the scrapes, pinned for the CLI's `stats`.
    let counter = load_counter(pins);
    if let Some(listener) = metrics_listener {
        let (scrape_pins, capacity) = (pins.clone(), config.conntrack_capacity);
        if let Ok(addr) = listener.local_addr() {
            info!("metrics at http://{addr}/metrics");
        }
        tokio::spawn(async move {
            let served =
                hairpin::metrics::serve(listener, move || scrape(&scrape_pins, capacity, &counter))
                    .await;
            if let Err(e) = served {
                error!("the metrics endpoint stopped: {e}");
            }
        });
    }
    info!("hairpin running: {}", describe(&config));
    for mapping in &config.mappings {
        info!("  {mapping}");
    }
    for warning in config.warnings() {
        warn!("{warning}");
    }

    let period =
        Duration::from_secs(if stats_interval == 0 { u64::MAX / 4 } else { stats_interval });
    let mut stats_ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut reclaim_ticker = reclaim_ticker(&config);
    // Reclaim reads both tables, seconds at a million flows: on the blocking
    // pool, so that signals, reloads and scrapes are answered meanwhile;
    // one at a time.
    let mut reclaiming: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => match reload(path, pins, &config, &mut datapath) {
                Ok(new) => {
                    config = new;
                    reclaim_ticker = reclaim_ticker_for(&config);
                    info!("configuration reloaded: {}", describe(&config));
                }
                Err(e) => error!("configuration not reloaded, the running one stays: {}", one_line(&e)),
            },
            _ = stats_ticker.tick() => print_counters(&datapath.maps, &config, "counters"),
            _ = reclaim_ticker.tick() => {
                if reclaiming.as_ref().is_none_or(|task| task.is_finished()) {
                    let pins = pins.clone();
                    reclaiming = Some(tokio::task::spawn_blocking(move || {
                        match Maps::open_pinned(&pins.maps()) {
                            Ok(mut maps) => reclaim(&pins, &mut maps),
                            Err(e) => warn!("reclaiming expired flows: {e}"),
                        }
                    }));
                }
            }
        }
    }
    if let Some(task) = reclaiming {
        let _ = task.await;
    }
    // Turns the cache off: nobody watches for routing changes any more.
    drop(route_cache);
    print_counters(&datapath.maps, &config, "counters at exit");
    if keep_attached {
        datapath.keep();
        info!("left attached with its state at {} (--keep-attached)", pins.0.display());
    } else {
        datapath.remove();
        let _ = std::fs::remove_file(state_file(pins));
        info!("detached");
    }
    Ok(())
}

/// The counting program over the instance's tables, pinned at
/// [`PinDir::counter`]; `None`, said once, where it cannot load: the tables
/// are read then.
fn load_counter(pins: &PinDir) -> Arc<Option<Mutex<EntryCounter>>> {
    let loaded = Maps::open_pinned(&pins.maps())
        .map_err(|e| e.to_string())
        .and_then(|maps| EntryCounter::load(&maps).map_err(|e| e.to_string()))
        .and_then(|mut counter| {
            counter.pin(&pins.counter()).map_err(|e| e.to_string())?;
            Ok(counter)
        });
    match loaded {
        Ok(counter) => Arc::new(Some(Mutex::new(counter))),
        Err(e) => {
            warn!("counting the tables in the kernel: {e}; they are read in batches instead");
            Arc::new(None)
        }
    }
}

/// The Prometheus exposition, read from the pinned maps.
fn scrape(
    pins: &PinDir,
    capacity: u32,
    counter: &Option<Mutex<EntryCounter>>,
) -> Result<String, String> {
    let maps = Maps::open_pinned(&pins.maps()).map_err(|e| e.to_string())?;
    let counted = counter.as_ref().and_then(|counter| {
        let mut counter = counter.lock().unwrap_or_else(PoisonError::into_inner);
        counter.count().inspect_err(|e| log::debug!("metrics: counting the tables: {e}")).ok()
    });
    // Without the counting program the tables are read, not a second
    // program loaded.
    let counts = match counted {
        Some(counts) => counts.map(|n| n as usize),
        None => maps.conntrack_entry_counts_read().map_err(|e| e.to_string())?,
    };
    let snapshot = Snapshot::read_counted(&maps, capacity, counts).map_err(|e| e.to_string())?;
    let mappings = MappingRow::read_all(&maps).map_err(|e| e.to_string())?;
    Ok(hairpin::metrics::render(&snapshot, &mappings))
}

fn reclaim_ticker(config: &Config) -> tokio::time::Interval {
    reclaim_ticker_for(config)
}

/// Often enough that expired flows do not linger much past their timeout.
fn reclaim_ticker_for(config: &Config) -> tokio::time::Interval {
    let t = config.timeouts;
    let shortest = t.tcp_established.min(t.tcp_transitory).min(t.udp).min(t.tcp_opening);
    let period = Duration::from_secs((shortest / 4).clamp(1, 10));
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
}

fn reclaim(pins: &PinDir, maps: &mut Maps) {
    // The tables are read without the writers' lock (at a million flows
    // that takes a second, and a reload must not wait for it); only the
    // removals, each checked again, are made under it.
    let now = monotonic_coarse_ns();
    let plan = match maps.settings().and_then(|settings| maps.reclaim_plan(&settings, now)) {
        Ok(plan) => plan,
        Err(e) => return warn!("reclaiming expired flows: {e}"),
    };
    let _lock = match write_lock(pins) {
        Ok(lock) => lock,
        Err(e) => return warn!("reclaiming expired flows: {}", one_line(&e)),
    };
    // The timeouts in force now, read under the lock: a reload may have
    // changed them since the tables were read.
    let settings = match maps.settings() {
        Ok(settings) => settings,
        Err(e) => return warn!("reclaiming expired flows: {e}"),
    };
    if let Err(e) = maps.free_retired_mapping_ids(&plan) {
        warn!("freeing the ids of withdrawn mapping rules: {e}");
    }
    let [established, new] = maps.remove_if_still_expired(&plan, &settings, now);
    for (counter, amount) in
        [(Counter::ReclaimedEstablished, established), (Counter::ReclaimedNew, new)]
    {
        if amount > 0
            && let Err(e) = maps.add_to_counter(counter, amount as u64)
        {
            warn!("counting reclaimed entries: {e}");
        }
    }
}

/// Applies a changed configuration, or explains why it cannot be applied
/// without a restart; nothing is written unless all of it is valid.
fn reload(
    path: &Path,
    pins: &PinDir,
    running: &Config,
    datapath: &mut Datapath,
) -> anyhow::Result<Config> {
    let config = load_config(path)?;
    check_interfaces(&config, path)?;
    let interfaces =
        |c: &Config| (c.lan.interfaces.clone(), c.wan.as_ref().map(|w| w.interface.clone()));
    if interfaces(&config) != interfaces(running) {
        bail!("the interfaces changed: restart hairpin to attach to new ones");
    }
    if config.conntrack_capacity != running.conntrack_capacity {
        bail!("conntrack.capacity changed: restart hairpin to resize the tables");
    }
    if config.attach != running.attach {
        bail!("[datapath] attach changed: restart hairpin to attach in another mode");
    }
    if config.metrics_listen != running.metrics_listen {
        bail!("metrics.listen changed: restart hairpin to move the endpoint");
    }
    let _lock = write_lock(pins)?;
    datapath.configure(&config).context("applying the configuration")?;
    Ok(config)
}

fn write_state(pins: &PinDir, config_path: &Path, config: &Config, attachments: &[Attachment]) {
    let state = DaemonState {
        pid: std::process::id(),
        config: std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf()),
        pin_dir: pins.0.clone(),
        conntrack_capacity: config.conntrack_capacity,
        interfaces: attachments.to_vec(),
    };
    let path = state_file(pins);
    let written = std::fs::create_dir_all("/run/hairpin").and_then(|()| {
        std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap_or_default())
    });
    if let Err(e) = written {
        warn!("writing {}: {e}; `hairpin status` will know less", path.display());
    }
}

/// The daemon's lock ([`DaemonLock`]), next to its state file.
fn daemon_lock_file(pins: &PinDir) -> PathBuf {
    state_file(pins).with_extension("lock")
}

/// Whether the instance's daemon runs: it holds its lock.
fn daemon_alive(pins: &PinDir) -> bool {
    hairpin::lock::daemon_running(&daemon_lock_file(pins))
        .inspect_err(|e| warn!("{e}"))
        .unwrap_or(false)
}

fn read_state(pins: &PinDir) -> Option<DaemonState> {
    serde_json::from_slice(&std::fs::read(state_file(pins)).ok()?).ok()
}

/// The running instance's maps.
fn open(pins: &PinDir) -> anyhow::Result<Maps> {
    if !pins.exists() {
        bail!(
            "no running hairpin instance at {} (start one with `hairpin run --config FILE`, or give --pin-dir)",
            pins.0.display()
        );
    }
    pins.check_ownership()?;
    Maps::open_pinned(&pins.maps())
        .with_context(|| format!("opening the instance at {}", pins.0.display()))
}

/// The writers' lock of the instance at `pins`, held until dropped.
fn write_lock(pins: &PinDir) -> anyhow::Result<WriteLock> {
    Ok(WriteLock::acquire(&pins.0)?)
}

fn print_counters(maps: &Maps, config: &Config, title: &str) {
    match Snapshot::read(maps, config.conntrack_capacity) {
        Ok(snapshot) => println!("{title}:\n{}", format_values(&snapshot.values(), false)),
        Err(e) => warn!("reading counters: {e}"),
    }
}

fn warn_if_not_forwarding(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
        warn!(
            "IPv4 forwarding is off on {interface} ({path}); hairpin will pass every packet to the kernel"
        );
    }
}

fn parse_mapping(
    proto: Proto,
    public: &str,
    server: &str,
    allow: &[String],
    interfaces: Vec<String>,
) -> anyhow::Result<Mapping> {
    let (public, public_ports) = parse_endpoint(public).map_err(|e| anyhow!("public: {e}"))?;
    let (to, to_ports) = parse_endpoint(server).map_err(|e| anyhow!("server: {e}"))?;
    if public_ports.len() != to_ports.len() {
        bail!(
            "{} public port(s) but {} server port(s): the ranges must have equal lengths",
            public_ports.len(),
            to_ports.len()
        );
    }
    let allow = allow
        .iter()
        .map(|net| parse_network(net).map_err(|e| anyhow!("--allow: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Mapping { proto, public, public_ports, to, to_ports, allow, interfaces })
}

fn mapping(pins: &PinDir, command: MappingCommand) -> anyhow::Result<()> {
    match command {
        MappingCommand::Add { proto, public, server, allow, interfaces } => {
            let mapping = parse_mapping(proto, &public, &server, &allow, interfaces)?;
            let mut maps = open(pins)?;
            let _lock = write_lock(pins)?;
            maps.add_mapping(&mapping)?;
            println!("published {mapping}");
            Ok(())
        }
        MappingCommand::Del { proto, public } => {
            let (public, ports) = parse_endpoint(&public).map_err(|e| anyhow!("public: {e}"))?;
            let mut maps = open(pins)?;
            let _lock = write_lock(pins)?;
            let rule = maps.remove_mapping(proto, public, ports)?;
            println!(
                "withdrew {} (its established flows go on until they end or expire)",
                rule.mapping
            );
            Ok(())
        }
        MappingCommand::List { json } => {
            let rows = MappingRow::read_all(&open(pins)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no mappings");
            } else {
                println!(
                    "{:<5} {:<28} {:<28} {:>8} {:>10} {:>12}  restrictions",
                    "proto", "public", "server", "flows", "packets", "bytes"
                );
                for r in rows {
                    let mut restrictions = Vec::new();
                    if !r.allow.is_empty() {
                        restrictions.push(format!("from {}", r.allow.join(",")));
                    }
                    if !r.interfaces.is_empty() {
                        restrictions.push(format!("on {}", r.interfaces.join(",")));
                    }
                    println!(
                        "{:<5} {:<28} {:<28} {:>8} {:>10} {:>12}  {}",
                        r.proto,
                        r.public,
                        r.to,
                        r.flows,
                        r.packets,
                        r.bytes,
                        if restrictions.is_empty() { "-".into() } else { restrictions.join(" ") }
                    );
                }
            }
            Ok(())
        }
    }
}

/// Every flow's row, handed to `row` as the tables are read; how many.
fn for_each_flow(
    maps: &Maps,
    mut row: impl FnMut(FlowRow) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let settings = maps.settings()?;
    let now = monotonic_coarse_ns();
    hairpin::flows::for_each_flow(maps, |table, flow| {
        row(FlowRow::new(table, &flow, &settings, now))
    })
}

fn conntrack(pins: &PinDir, command: ConntrackCommand) -> anyhow::Result<()> {
    match command {
        ConntrackCommand::List { json } => {
            let maps = open(pins)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if json {
                // A JSON array written row by row as the flows are read.
                out.write_all(b"[")?;
                let mut separator: &[u8] = b"\n";
                let flows = for_each_flow(&maps, |r| {
                    out.write_all(separator)?;
                    separator = b",\n";
                    serde_json::to_writer(&mut out, &r)?;
                    Ok(())
                })?;
                if flows > 0 {
                    out.write_all(b"\n")?;
                }
                out.write_all(b"]\n")?;
                out.flush()?;
                return Ok(());
            }
            let flows = for_each_flow(&maps, |r| {
                writeln!(
                    out,
                    "{} {:<11} {} -> server sees {} (client {}, {}) age {}s timeout {}s packets {} bytes {}",
                    r.proto,
                    r.state,
                    r.original,
                    r.translated,
                    r.client,
                    r.kind,
                    r.age_s,
                    r.timeout_left_s,
                    r.packets,
                    r.bytes
                )?;
                Ok(())
            })?;
            writeln!(out, "{flows} flow(s)")?;
            out.flush()?;
            Ok(())
        }
        ConntrackCommand::Flush => {
            let mut maps = open(pins)?;
            let _lock = write_lock(pins)?;
            let removed = maps.flush_conntrack()?;
            println!("removed {removed} entries ({} flows)", removed / 2);
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct DenyJson {
    network: String,
    origin: DenyOrigin,
}

fn deny(pins: &PinDir, command: DenyCommand) -> anyhow::Result<()> {
    let parse = |cidr: &str| parse_network(cidr).map_err(|e| anyhow!("{e}"));
    match command {
        DenyCommand::Add { cidr } => {
            let net = parse(&cidr)?;
            let mut maps = open(pins)?;
            let _lock = write_lock(pins)?;
            let added = maps.add_deny(&net, DenyOrigin::Cli)?;
            let ended = maps.remove_forwards_from(&net)?;
            println!(
                "{} {net}; ended {ended} open port-forward flow(s) from it",
                if added { "denied" } else { "already denied" }
            );
            Ok(())
        }
        DenyCommand::Del { cidr } => {
            let net = parse(&cidr)?;
            let mut maps = open(pins)?;
            let _lock = write_lock(pins)?;
            if !maps.remove_deny(&net)? {
                bail!("{net} is not in the deny set (`hairpin deny list` shows it)");
            }
            println!("no longer denied: {net}");
            Ok(())
        }
        DenyCommand::List { json } => {
            let networks = open(pins)?.deny_networks()?;
            if json {
                let rows: Vec<DenyJson> = networks
                    .iter()
                    .map(|(net, origin)| DenyJson { network: net.to_string(), origin: *origin })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if networks.is_empty() {
                println!("no denied networks");
            } else {
                for (net, origin) in &networks {
                    let origin = match origin {
                        DenyOrigin::Config => "config",
                        DenyOrigin::Cli => "cli",
                    };
                    println!("{net:<18} {origin}");
                }
            }
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct StatsJson {
    counters: std::collections::BTreeMap<&'static str, u64>,
    mappings: Vec<MappingRow>,
    capacity: u32,
}

async fn stats(pins: &PinDir, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    loop {
        let maps = open(pins)?;
        let capacity = maps.conntrack_capacity()?;
        let snapshot = Snapshot::read(&maps, capacity)?;
        let mappings = MappingRow::read_all(&maps)?;
        if json {
            let stats =
                StatsJson { counters: snapshot.values().into_iter().collect(), mappings, capacity };
            println!("{}", serde_json::to_string(&stats)?);
        } else {
            println!("counters:\n{}", format_values(&snapshot.values(), false));
            println!("per mapping:");
            for m in &mappings {
                println!(
                    "  {} {} -> {}: {} flows, {} packets, {} bytes",
                    m.proto, m.public, m.to, m.flows, m.packets, m.bytes
                );
            }
            if capacity > 0 {
                println!(
                    "tables: established {}/{} entries, new {}/{} entries",
                    snapshot.established_entries, capacity, snapshot.new_entries, capacity
                );
            }
        }
        match watch {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds.max(1))).await,
            None => return Ok(()),
        }
    }
}

fn status(pins: &PinDir, json: bool) -> anyhow::Result<()> {
    let maps = open(pins)?;
    let state = read_state(pins);
    let daemon_alive = daemon_alive(pins);
    let [established, new] = maps.conntrack_entry_counts()?;
    let links = pinned_links(pins);
    let route_cache = maps.route_cache()?;
    let route_cache_on = route_cache.usable(monotonic_coarse_ns());
    let capacity = maps.conntrack_capacity()?;
    if json {
        let value = serde_json::json!({
            "pin_dir": pins.0,
            "daemon": state.as_ref().map(|s| serde_json::json!({"pid": s.pid, "running": daemon_alive, "config": s.config})),
            "interfaces": state.as_ref().map(|s| &s.interfaces),
            "links": links.iter().map(|l| serde_json::json!({"name": l.name, "link_id": l.link_id, "program_id": l.program_id})).collect::<Vec<_>>(),
            "conntrack": {"established": established, "new": new, "capacity": capacity},
            "mappings": maps.mapping_rules()?.len(),
            "route_cache": {"on": route_cache_on, "generation": route_cache.generation},
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("instance: {}", pins.0.display());
    match &state {
        Some(s) => {
            println!(
                "daemon:   pid {} ({})",
                s.pid,
                if daemon_alive {
                    "running"
                } else {
                    "not running: the datapath goes on without it"
                }
            );
            println!("config:   {}", s.config.display());
            for a in &s.interfaces {
                println!(
                    "  {:<12} {} ifindex {} {}",
                    a.interface,
                    a.role,
                    a.if_index,
                    a.describe()
                );
            }
        }
        None => println!("daemon:   unknown (no state file {})", state_file(pins).display()),
    }
    for link in &links {
        println!(
            "link:     {:<16} link id {} program id {}",
            link.name, link.link_id, link.program_id
        );
    }
    println!(
        "flows:    established {established}/{capacity} entries, new {new}/{capacity} entries"
    );
    println!("mappings: {}", maps.mapping_rules()?.len());
    if route_cache_on {
        println!("routes:   cached per flow (generation {})", route_cache.generation);
    } else {
        println!("routes:   looked up for every packet (no daemon keeps the route cache)");
    }
    Ok(())
}

struct LinkState {
    /// `xdp_<interface>` or `tc_<interface>`.
    name: String,
    link_id: u32,
    program_id: u32,
}

/// The instance's pinned links and the programs they run.
fn pinned_links(pins: &PinDir) -> Vec<LinkState> {
    let Ok(dir) = std::fs::read_dir(pins.0.join("links")) else {
        return Vec::new();
    };
    let mut links: Vec<LinkState> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pinned = aya::programs::links::PinnedLink::from_pin(entry.path()).ok()?;
            let info = aya::programs::links::FdLink::from(pinned).info().ok()?;
            Some(LinkState {
                name: entry.file_name().to_string_lossy().to_string(),
                link_id: info.id(),
                program_id: info.program_id(),
            })
        })
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    links
}

fn explain(
    pins: &PinDir,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    iface: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    if !pins.exists() {
        open(pins)?;
    }
    let attachments = read_state(pins).map(|s| s.interfaces).unwrap_or_default();
    let iface = match iface {
        Some(iface) => iface,
        None => attachments
            .iter()
            .find(|a| a.role == "lan")
            .map(|a| a.interface.clone())
            .ok_or_else(|| anyhow!("give the interface the packet arrives on with --iface"))?,
    };
    let index = if_index(&iface)?;
    // The program the interface runs; XDP for one the daemon did not say.
    let hook = attachments.iter().find(|a| a.interface == iface).map_or(Hook::Xdp, |a| a.mode);
    let explanation = hairpin::explain::explain(pins, proto, src, dst, index, hook)?;
    if json {
        let value = serde_json::json!({
            "mode": hook,
            "action": explanation.action,
            "counters": explanation.counters,
            "input": explanation.input.to_string(),
            "output": explanation.output.map(|o| o.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("packet:  {} (arriving on {iface}, {hook})", explanation.input);
    println!("verdict: {}", explanation.action);
    let because: Vec<String> =
        explanation.counters.iter().map(|c| hairpin::explain::because(c)).collect();
    println!("because: {}", because.join(", "));
    if let Some(output) = explanation.output {
        println!("leaves:  {output}");
    }
    Ok(())
}

fn import_iptables(pins: &PinDir, file: Option<PathBuf>, dry_run: bool) -> anyhow::Result<()> {
    let text = match file.as_deref() {
        None => read_stdin()?,
        Some(path) if path == Path::new("-") => read_stdin()?,
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    // The instance's interfaces, for `-i`; without an instance, `-i` rules
    // are refused rather than guessed.
    let interfaces = if pins.exists() { Some(open(pins)?.managed_interfaces()) } else { None };
    let imported = hairpin::import::import_iptables_save(&text, interfaces.as_deref());
    for skipped in &imported.skipped {
        println!("skipped line {}: {} ({})", skipped.line, skipped.rule, skipped.reason);
    }
    if dry_run {
        for mapping in &imported.mappings {
            println!("would publish {mapping}");
        }
        return Ok(());
    }
    let mut maps = open(pins)?;
    let _lock = write_lock(pins)?;
    let mut refused = 0;
    for mapping in &imported.mappings {
        match maps.add_mapping(mapping) {
            Ok(_) => println!("published {mapping}"),
            Err(e) => {
                refused += 1;
                println!("not published {mapping}: {e}");
            }
        }
    }
    if refused > 0 {
        bail!("{refused} of {} mapping(s) not published", imported.mappings.len());
    }
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
    Ok(text)
}
