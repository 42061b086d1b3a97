use std::{
    io::{Read as _, Write as _},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{CommandFactory as _, Parser as _};
use hairpin::{
    attach::Hook,
    cli::{Cli, Command, ConntrackCommand, DenyCommand, MappingCommand},
    config::{Mapping, Proto, parse_endpoint, parse_network},
    daemon,
    datapath::{PinDir, if_index, monotonic_coarse_ns},
    flows::FlowRow,
    lock::WriteLock,
    maps::{DenyOrigin, Maps},
    render,
    stats::{MappingRow, Snapshot},
};

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
            eprintln!("hairpin: {}", daemon::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let pins = PinDir(cli.pin_dir);
    match cli.command {
        Command::Run { config, stats_interval, keep_attached } => {
            let options = daemon::RunOptions { config, pins, stats_interval, keep_attached };
            Ok(daemon::run(&options).await?)
        }
        Command::Check { config } => {
            let config = daemon::load_config(&config)?;
            println!("configuration is valid: {}", daemon::describe(&config));
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
        Command::ImportNft { file, dry_run } => import_nft(&pins, file, dry_run),
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
            } else {
                print!("{}", render::mapping_table(&rows));
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
                let mut rows = render::JsonRows::start(out)?;
                for_each_flow(&maps, |r| Ok(rows.push(&r)?))?;
                rows.finish()?;
                return Ok(());
            }
            let flows = for_each_flow(&maps, |r| Ok(render::flow_line(&mut out, &r)?))?;
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
                let rows: Vec<render::DenyRow> = networks
                    .iter()
                    .map(|(net, origin)| render::DenyRow {
                        network: net.to_string(),
                        origin: *origin,
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::deny_list(&networks));
            }
            Ok(())
        }
    }
}

async fn stats(pins: &PinDir, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    loop {
        let maps = open(pins)?;
        let capacity = maps.conntrack_capacity()?;
        let snapshot = Snapshot::read(&maps, capacity)?;
        let mappings = MappingRow::read_all(&maps)?;
        if json {
            let counters = snapshot.values().into_iter().collect();
            let stats = render::StatsJson { counters, mappings: &mappings, capacity };
            println!("{}", serde_json::to_string(&stats)?);
        } else {
            print!("{}", render::stats_text(&snapshot, &mappings));
        }
        match watch {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds.max(1))).await,
            None => return Ok(()),
        }
    }
}

fn status(pins: &PinDir, json: bool) -> anyhow::Result<()> {
    let maps = open(pins)?;
    let state = daemon::read_state(pins);
    let daemon_running = daemon::alive(pins);
    let [established, new] = maps.conntrack_entry_counts()?;
    let links = pinned_links(pins);
    let route_cache = maps.route_cache()?;
    let route_cache_on = route_cache.usable(monotonic_coarse_ns());
    let capacity = maps.conntrack_capacity()?;
    let state_file = daemon::state_file(pins);
    let status = render::Status {
        pin_dir: &pins.0,
        state: state.as_ref(),
        state_file: &state_file,
        daemon_running,
        links: &links,
        entries: [established, new],
        capacity,
        mappings: maps.mapping_rules()?.len(),
        route_cache_on,
        route_cache_generation: route_cache.generation,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status.json())?);
    } else {
        print!("{}", status.text());
    }
    Ok(())
}

/// The instance's pinned links and the programs they run.
fn pinned_links(pins: &PinDir) -> Vec<render::LinkRow> {
    let Ok(dir) = std::fs::read_dir(pins.0.join("links")) else {
        return Vec::new();
    };
    let mut links: Vec<render::LinkRow> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pinned = aya::programs::links::PinnedLink::from_pin(entry.path()).ok()?;
            let info = aya::programs::links::FdLink::from(pinned).info().ok()?;
            Some(render::LinkRow {
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
    let attachments = daemon::read_state(pins).map(|s| s.interfaces).unwrap_or_default();
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
        let value = render::explanation_json(&explanation, hook);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render::explanation_text(&explanation, &iface, hook));
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
    publish(pins, &imported.mappings, dry_run)
}

fn import_nft(pins: &PinDir, file: Option<PathBuf>, dry_run: bool) -> anyhow::Result<()> {
    let json = match file.as_deref() {
        Some(path) if path == Path::new("-") => read_stdin()?,
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let listed = std::process::Command::new("nft")
                .args(["-j", "list", "ruleset"])
                .output()
                .context("running `nft -j list ruleset`")?;
            if !listed.status.success() {
                bail!(
                    "`nft -j list ruleset` failed ({}): {}",
                    listed.status,
                    String::from_utf8_lossy(&listed.stderr).trim()
                );
            }
            String::from_utf8(listed.stdout).context("`nft -j list ruleset` wrote no UTF-8")?
        }
    };
    // The instance's interfaces, for `iifname`; without an instance,
    // `iifname` rules are refused rather than guessed.
    let interfaces = if pins.exists() { Some(open(pins)?.managed_interfaces()) } else { None };
    let imported = hairpin::import::nft::import_nft_ruleset(&json, interfaces.as_deref())
        .context("reading the ruleset")?;
    for skipped in &imported.skipped {
        println!("skipped {} rule handle {}: {}", skipped.chain, skipped.handle, skipped.reason);
    }
    publish(pins, &imported.mappings, dry_run)
}

/// Publishes imported mappings, or with `dry_run` says what it would.
fn publish(pins: &PinDir, mappings: &[Mapping], dry_run: bool) -> anyhow::Result<()> {
    if dry_run {
        for mapping in mappings {
            println!("would publish {mapping}");
        }
        return Ok(());
    }
    let mut maps = open(pins)?;
    let _lock = write_lock(pins)?;
    let mut refused = 0;
    for mapping in mappings {
        match maps.add_mapping(mapping) {
            Ok(_) => println!("published {mapping}"),
            Err(e) => {
                refused += 1;
                println!("not published {mapping}: {e}");
            }
        }
    }
    if refused > 0 {
        bail!("{refused} of {} mapping(s) not published", mappings.len());
    }
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
    Ok(text)
}
