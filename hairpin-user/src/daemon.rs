//! `hairpin run`: the daemon. One tokio runtime runs it all as tasks:
//! signals (SIGINT and SIGTERM stop it, SIGHUP reloads the configuration),
//! the reclaim of expired flows and the counter printouts (on the blocking
//! pool, so that signals and scrapes are answered meanwhile), the route
//! cache's rtnetlink watch, the eBPF log and the metrics endpoint (its
//! scrapes on the blocking pool too). Nothing that takes long runs on the
//! runtime's one thread. Its state file
//! and lock, next to each other under `/run/hairpin`, tell `hairpin status`
//! what runs.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hairpin_common::Counter;
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, ConfigError},
    datapath::{Attachment, Datapath, DatapathError, PinDir, if_index, monotonic_coarse_ns},
    entry_count::EntryCounter,
    lock::{DaemonLock, LockError, WriteLock},
    maps::Maps,
    routes::RouteCacheKeeper,
    stats::{MappingRow, Snapshot, format_values},
};

/// Where the state files and the daemons' locks are.
const RUN_DIR: &str = "/run/hairpin";

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("invalid configuration {path}")]
    Config { path: String, source: ConfigError },
    #[error("invalid configuration {path}: `{key}`")]
    Interface { path: String, key: String, source: Box<DatapathError> },
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] io::Error),
    #[error("`metrics.listen`: cannot listen on {addr}")]
    MetricsListen { addr: SocketAddr, source: io::Error },
    #[error(
        "hairpin is already running for {pin_dir} (pid {pid}); stop it first, or give another --pin-dir"
    )]
    AlreadyRunning { pin_dir: String, pid: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{step}")]
    Datapath { step: &'static str, source: Box<DatapathError> },
    #[error("watching the eBPF log")]
    Log(#[source] io::Error),
    #[error("a reload panicked; hairpin stops, leaving the datapath pinned")]
    ReloadPanicked,
    /// A reload that only a restart can apply.
    #[error("{0}")]
    NeedsRestart(&'static str),
}

fn datapath_step(step: &'static str) -> impl FnOnce(DatapathError) -> DaemonError {
    move |source| DaemonError::Datapath { step, source: Box::new(source) }
}

/// What `hairpin run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub pins: PinDir,
    /// Seconds between counter printouts; 0: none.
    pub stats_interval: u64,
    /// Leave the datapath attached and pinned on exit.
    pub keep_attached: bool,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(options: &RunOptions) -> Result<(), DaemonError> {
    let RunOptions { config: path, pins, stats_interval, keep_attached } = options;
    // Installed first: a signal during start-up then stops hairpin cleanly
    // once it is up, instead of killing it half attached.
    let handler = |kind, name| signal(kind).map_err(|e| DaemonError::Signal(name, e));
    let mut sigint = handler(SignalKind::interrupt(), "SIGINT")?;
    let mut sigterm = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut sighup = handler(SignalKind::hangup(), "SIGHUP")?;
    let mut config = load_config(path)?;
    check_interfaces(&config, path)?;
    for name in &config.lan.interfaces {
        warn_if_not_forwarding(name);
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    // Held until this process ends, however it ends.
    let Some(_daemon_lock) = DaemonLock::try_acquire(&lock_file(pins))? else {
        let pid = read_state(pins).map_or_else(|| "unknown".into(), |s| s.pid.to_string());
        return Err(DaemonError::AlreadyRunning { pin_dir: pins.0.display().to_string(), pid });
    };
    let taking_over = pins.exists();
    let mut datapath =
        Datapath::load(&config, Some(pins)).map_err(datapath_step("loading the datapath"))?;
    if taking_over {
        info!("taking over the datapath pinned at {} (its flows go on)", pins.0.display());
    }
    if let Some(logger) = datapath.take_logger() {
        // SAFETY: the AsyncFd owns the logger, so the fd outlives the registration.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| DaemonError::Log(e.into_parts().1))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    datapath.plan(&config).map_err(datapath_step("choosing where the datapath runs"))?;
    {
        let _lock = WriteLock::acquire(&pins.0)?;
        datapath.configure(&config).map_err(datapath_step("configuring the datapath"))?;
    }
    let attachments = datapath.attach(&config).map_err(datapath_step("attaching the datapath"))?;
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
    // One counting program for the scrapes, pinned for the CLI's `stats`;
    // loaded (the verifier runs) before the route cache's keeper starts on
    // this runtime.
    let counter = load_counter(pins);
    let route_cache = match RouteCacheKeeper::start(&datapath.maps).and_then(|k| k.spawn_task()) {
        Ok(keeper) => Some(keeper),
        Err(e) => {
            warn!("route cache off, every packet is looked up: {e}");
            None
        }
    };
    if let Some(listener) = metrics_listener {
        let (scrape_pins, capacity) = (pins.clone(), config.conntrack_capacity);
        if let Ok(addr) = listener.local_addr() {
            info!("metrics at http://{addr}/metrics");
        }
        tokio::spawn(async move {
            let served =
                crate::metrics::serve(listener, move || scrape(&scrape_pins, capacity, &counter))
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
        Duration::from_secs(if *stats_interval == 0 { u64::MAX / 4 } else { *stats_interval });
    let mut stats_ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut reclaim_every = reclaim_ticker(&config);
    // Reclaim reads both tables, a second at a million flows: on the
    // blocking pool, so that signals, reloads and scrapes are answered
    // meanwhile; one at a time.
    let mut reclaiming: Option<tokio::task::JoinHandle<()>> = None;
    let mut printing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                // On the blocking pool: a reload waits for the writers' lock
                // and may read the tables, and the route cache's keeper
                // must go on meanwhile.
                let (path, pins, running) = (path.clone(), pins.clone(), config.clone());
                let reloaded = tokio::task::spawn_blocking(move || {
                    let reloaded = reload(&path, &pins, &running, &mut datapath);
                    (reloaded, datapath)
                })
                .await;
                let reloaded = match reloaded {
                    Ok((reloaded, returned)) => {
                        datapath = returned;
                        reloaded
                    }
                    Err(_) => return Err(DaemonError::ReloadPanicked),
                };
                match reloaded {
                    Ok(new) => {
                        config = new;
                        reclaim_every = reclaim_ticker(&config);
                        info!("configuration reloaded: {}", describe(&config));
                    }
                    Err(e) => error!("configuration not reloaded, the running one stays: {}", one_line(&e)),
                }
            },
            // Counting a million-flow table takes a fifth of a second: not
            // on the runtime's thread.
            _ = stats_ticker.tick() => {
                if printing.as_ref().is_none_or(|task| task.is_finished()) {
                    let (pins, capacity) = (pins.clone(), config.conntrack_capacity);
                    printing = Some(tokio::task::spawn_blocking(move || {
                        match Maps::open_pinned(&pins.maps()) {
                            Ok(maps) => print_counters(&maps, capacity, "counters"),
                            Err(e) => warn!("reading counters: {e}"),
                        }
                    }));
                }
            }
            _ = reclaim_every.tick() => {
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
    for task in [reclaiming, printing].into_iter().flatten() {
        let _ = task.await;
    }
    // Turns the cache off: nobody watches for routing changes any more.
    if let Some(keeper) = route_cache {
        keeper.stop().await;
    }
    print_counters(&datapath.maps, config.conntrack_capacity, "counters at exit");
    if *keep_attached {
        datapath.keep();
        info!("left attached with its state at {} (--keep-attached)", pins.0.display());
    } else {
        datapath.remove();
        let _ = std::fs::remove_file(state_file(pins));
        info!("detached");
    }
    Ok(())
}

/// An error and its causes on one line, without the repetitions of causes
/// that already print their own cause.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(error) = cause {
        let text = error.to_string().replace('\n', "; ");
        if !line.contains(text.trim()) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text.trim());
        }
        cause = error.source();
    }
    line
}

/// The configuration at `path`, parsed and checked.
pub fn load_config(path: &Path) -> Result<Config, DaemonError> {
    Config::from_file(path)
        .map_err(|source| DaemonError::Config { path: path.display().to_string(), source })
}

/// The configuration in one line, for the log.
pub fn describe(config: &Config) -> String {
    format!(
        "LAN {} ({}), SNAT source {}, {} mapping(s)",
        config.lan.interfaces.join(", "),
        config.lan.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
        config.lan.address,
        config.mappings.len()
    )
}

/// Refuses a configuration that names an interface this host lacks.
fn check_interfaces(config: &Config, path: &Path) -> Result<(), DaemonError> {
    let lan = config
        .lan
        .interfaces
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("lan.interfaces[{i}]"), name));
    let wan = config.wan.iter().map(|wan| ("wan.interface".to_string(), &wan.interface));
    for (key, name) in lan.chain(wan) {
        if_index(name).map_err(|source| DaemonError::Interface {
            path: path.display().to_string(),
            key,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

fn warn_if_not_forwarding(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
        warn!(
            "IPv4 forwarding is off on {interface} ({path}); hairpin will pass every packet to the kernel"
        );
    }
}

/// What `hairpin status` reads about the daemon, next to the pins.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub conntrack_capacity: u32,
    pub interfaces: Vec<Attachment>,
}

/// The state file of the instance at `pins`.
pub fn state_file(pins: &PinDir) -> PathBuf {
    let name = pins
        .0
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "hairpin".into());
    PathBuf::from(RUN_DIR).join(format!("{name}.json"))
}

/// The state the instance's daemon wrote, if it did.
pub fn read_state(pins: &PinDir) -> Option<State> {
    serde_json::from_slice(&std::fs::read(state_file(pins)).ok()?).ok()
}

fn write_state(pins: &PinDir, config_path: &Path, config: &Config, attachments: &[Attachment]) {
    let state = State {
        pid: std::process::id(),
        config: std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf()),
        pin_dir: pins.0.clone(),
        conntrack_capacity: config.conntrack_capacity,
        interfaces: attachments.to_vec(),
    };
    let path = state_file(pins);
    let written = std::fs::create_dir_all(RUN_DIR).and_then(|()| {
        std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap_or_default())
    });
    if let Err(e) = written {
        warn!("writing {}: {e}; `hairpin status` will know less", path.display());
    }
}

/// The daemon's lock ([`DaemonLock`]), next to its state file.
pub fn lock_file(pins: &PinDir) -> PathBuf {
    state_file(pins).with_extension("lock")
}

/// Whether the instance's daemon runs: it holds its lock.
pub fn alive(pins: &PinDir) -> bool {
    crate::lock::daemon_running(&lock_file(pins)).inspect_err(|e| warn!("{e}")).unwrap_or(false)
}

/// Prints the counters and the tables' fill under `title`.
pub fn print_counters(maps: &Maps, capacity: u32, title: &str) {
    match Snapshot::read(maps, capacity) {
        Ok(snapshot) => println!("{title}:\n{}", format_values(&snapshot.values(), false)),
        Err(e) => warn!("reading counters: {e}"),
    }
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

/// The Prometheus exposition, read from the pinned maps. Scrapes take turns
/// with the counter: each count already runs on two CPUs.
fn scrape(
    pins: &PinDir,
    capacity: u32,
    counter: &Option<Mutex<EntryCounter>>,
) -> Result<String, String> {
    let maps = Maps::open_pinned(&pins.maps()).map_err(|e| e.to_string())?;
    let counted = counter.as_ref().and_then(|counter| {
        let mut counter = counter.lock().unwrap_or_else(PoisonError::into_inner);
        counter.count().inspect_err(|e| debug!("metrics: counting the tables: {e}")).ok()
    });
    // Without the counting program the tables are read, not a second
    // program loaded.
    let counts = match counted {
        Some(counts) => counts.map(|n| n as usize),
        None => maps.conntrack_entry_counts_read().map_err(|e| e.to_string())?,
    };
    let snapshot = Snapshot::read_counted(&maps, capacity, counts).map_err(|e| e.to_string())?;
    let mappings = MappingRow::read_all(&maps).map_err(|e| e.to_string())?;
    Ok(crate::metrics::render(&snapshot, &mappings))
}

/// Often enough that expired flows do not linger much past their timeout.
fn reclaim_ticker(config: &Config) -> tokio::time::Interval {
    let period = reclaim_period(config);
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
}

/// A quarter of the shortest timeout, 1 to 10 s.
pub fn reclaim_period(config: &Config) -> Duration {
    let t = config.timeouts;
    let shortest = t.tcp_established.min(t.tcp_transitory).min(t.udp).min(t.tcp_opening);
    Duration::from_secs((shortest / 4).clamp(1, 10))
}

/// Removes the entries of expired flows and frees the ids of withdrawn
/// rules that no flow carries any more.
fn reclaim(pins: &PinDir, maps: &mut Maps) {
    // The tables are read without the writers' lock (at a million flows
    // that takes a second, and a reload must not wait for it); only the
    // removals, each checked again, are made under it.
    let now = monotonic_coarse_ns();
    let plan = match maps.settings().and_then(|settings| maps.reclaim_plan(&settings, now)) {
        Ok(plan) => plan,
        Err(e) => return warn!("reclaiming expired flows: {e}"),
    };
    let _lock = match WriteLock::acquire(&pins.0) {
        Ok(lock) => lock,
        Err(e) => return warn!("reclaiming expired flows: {e}"),
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

/// What in `new` a reload cannot apply to a daemon running `running`, and
/// what to do instead.
pub fn needs_restart(running: &Config, new: &Config) -> Option<&'static str> {
    let interfaces =
        |c: &Config| (c.lan.interfaces.clone(), c.wan.as_ref().map(|w| w.interface.clone()));
    if interfaces(new) != interfaces(running) {
        Some("the interfaces changed: restart hairpin to attach to new ones")
    } else if new.conntrack_capacity != running.conntrack_capacity {
        Some("conntrack.capacity changed: restart hairpin to resize the tables")
    } else if new.attach != running.attach {
        Some("[datapath] attach changed: restart hairpin to attach in another mode")
    } else if new.metrics_listen != running.metrics_listen {
        Some("metrics.listen changed: restart hairpin to move the endpoint")
    } else {
        None
    }
}

/// Applies a changed configuration, or explains why it cannot be applied
/// without a restart; nothing is written unless all of it is valid.
fn reload(
    path: &Path,
    pins: &PinDir,
    running: &Config,
    datapath: &mut Datapath,
) -> Result<Config, DaemonError> {
    let config = load_config(path)?;
    check_interfaces(&config, path)?;
    if let Some(change) = needs_restart(running, &config) {
        return Err(DaemonError::NeedsRestart(change));
    }
    let _lock = WriteLock::acquire(&pins.0)?;
    datapath.configure(&config).map_err(datapath_step("applying the configuration"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    // The seed configuration (one TCP mapping, attach = "auto").
    use crate::config::tests::SEED as RUNNING;

    #[rstest]
    #[case::a_mapping_added(
        "\n[[mapping]]\nproto = \"udp\"\npublic = \"203.0.113.1:53\"\nto = \"192.168.0.2:53\"\n",
        None
    )]
    #[case::timeouts("\n[timeouts]\nudp = 600\n", None)]
    #[case::capacity("\n[conntrack]\ncapacity = 4096\n", Some("conntrack.capacity changed"))]
    // "": `[datapath] attach` from "auto" to "tc".
    #[case::attach("", Some("[datapath] attach changed"))]
    #[case::metrics("\n[metrics]\nlisten = \"127.0.0.1:9464\"\n", Some("metrics.listen changed"))]
    fn a_reload_applies_what_it_can_and_names_what_needs_a_restart(
        #[case] added: &str,
        #[case] restart: Option<&str>,
    ) {
        let running: Config = RUNNING.parse().expect("the running configuration");
        let edited = match added {
            "" => RUNNING.replace(r#"attach = "auto""#, r#"attach = "tc""#),
            added => format!("{RUNNING}{added}"),
        };
        let new: Config = edited.parse().expect("the new configuration");
        let said = needs_restart(&running, &new);
        assert_eq!(said.map(|s| s.split(':').next().unwrap_or(s)), restart, "{said:?}");
        assert!(said.is_none_or(|s| s.contains("restart hairpin")), "{said:?}");
    }

    #[test]
    fn another_lan_interface_needs_a_restart() {
        let running: Config = RUNNING.parse().expect("the running configuration");
        let new: Config = RUNNING
            .replace(r#"["gw-lan"]"#, r#"["gw-lan", "gw-lan2"]"#)
            .parse()
            .expect("the new configuration");
        assert_eq!(
            needs_restart(&running, &new),
            Some("the interfaces changed: restart hairpin to attach to new ones")
        );
    }

    #[rstest]
    #[case::the_shortest_quartered("[timeouts]\nudp = 20\n", 5)]
    #[case::at_most_ten_seconds("", 10)]
    #[case::at_least_one_second("[timeouts]\ntcp_opening = 1\n", 1)]
    fn reclaim_runs_at_a_quarter_of_the_shortest_timeout(
        #[case] timeouts: &str,
        #[case] seconds: u64,
    ) {
        let config: Config = format!("{RUNNING}\n{timeouts}").parse().expect("a configuration");
        assert_eq!(reclaim_period(&config), Duration::from_secs(seconds));
    }

    #[test]
    fn state_files_are_named_after_the_pin_directory() {
        let pins = PinDir(PathBuf::from("/sys/fs/bpf/hairpin-lab"));
        assert_eq!(state_file(&pins), Path::new("/run/hairpin/hairpin-lab.json"));
        assert_eq!(lock_file(&pins), Path::new("/run/hairpin/hairpin-lab.lock"));
    }

    #[test]
    fn one_line_says_each_cause_once() {
        let error = DaemonError::Config {
            path: "/etc/hairpin/hairpin.toml".into(),
            source: ConfigError::Syntax("line 3: expected `=`".into()),
        };
        assert_eq!(
            one_line(&error),
            "invalid configuration /etc/hairpin/hairpin.toml: line 3: expected `=`"
        );
    }
}
