//! The seed's story in network namespaces: a LAN client cannot reach a LAN
//! server through the gateway's public address; hairpin fixes it.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hairpin_tests::{
    Netns,
    apps::{Servers, udp_echo},
    daemon::Daemon,
    seed::{
        Attach, BedKind, CLIENT, ConfigOptions, GATEWAY_LAN, PUBLIC, SERVER, SeedBed, WAN_HOST,
    },
};

#[derive(clap::Args)]
pub struct Options {}

const UDP_PUBLIC_PORT: u16 = 53;
const UDP_SERVER_PORT: u16 = 5353;

pub fn demo(_: &Options) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the demo needs root to create network namespaces and load eBPF; run it as root");
    }
    crate::setup::ensure()?;
    let binary = crate::build_hairpin(false)?;
    hairpin_tests::daemon::use_binary(binary);
    hairpin_tests::clean_up_on_signal("hairpin and the demo's namespaces", || {})
        .context("handling SIGINT and SIGTERM")?;

    step("Building the seed's network in namespaces");
    // As a container host has it: veths with their default offloads (tx
    // checksum offload, TSO, GRO) and no XDP program on any peer.
    let bed = SeedBed::with(BedKind::ContainerHost);
    println!(
        "  client {CLIENT} and server {SERVER} share a LAN bridge with the gateway ({GATEWAY_LAN});\n  \
         the gateway's public address is {PUBLIC} (WAN host {WAN_HOST}).\n  \
         The server answers HTTP on :80 and UDP echo on :{UDP_SERVER_PORT}, published as\n  \
         {PUBLIC}:80/tcp and {PUBLIC}:{UDP_PUBLIC_PORT}/udp."
    );
    let _servers = Servers::start(&bed.server, 80, UDP_SERVER_PORT);
    let mappings = [
        ("tcp", format!("{PUBLIC}:80"), format!("{SERVER}:80")),
        ("udp", format!("{PUBLIC}:{UDP_PUBLIC_PORT}"), format!("{SERVER}:{UDP_SERVER_PORT}")),
    ];
    let mappings: Vec<_> = mappings.iter().map(|(p, a, b)| (*p, a.as_str(), b.as_str())).collect();

    step("Without hairpin: the LAN client tries the public address");
    let tcp_before = curl(&bed.client);
    let udp_before = udp(&bed.client);

    step("Starting hairpin on the gateway");
    let options = ConfigOptions { attach: Some(Attach::Auto), ..ConfigOptions::default() };
    let config = bed.config_with(&mappings, &options);
    println!("{}", indent(&config));
    let daemon = Daemon::start(&bed.gateway, &config);
    for line in daemon.log() {
        println!("  | {line}");
    }

    step("With hairpin: the same requests");
    let tcp_after = curl(&bed.client);
    let udp_after = udp(&bed.client);
    step("The server reaches its own public address");
    let server_self = curl(&bed.server);

    step("Looking at the running instance");
    let client_port = format!("{CLIENT}:40000");
    let public_http = format!("{PUBLIC}:80");
    for args in [
        &["status"][..],
        &["mapping", "list"],
        &["conntrack", "list"],
        &["explain", "tcp", &client_port, &public_http],
        &["explain", "udp", &client_port, "203.0.113.1:5000"],
        &["stats"],
    ] {
        hairpin_command(&bed.gateway, &daemon, args);
    }

    step("Stopping hairpin; its counters");
    let counters = daemon.stop();
    for (name, value) in &counters {
        println!("  {name:<20} {value}");
    }

    step("Summary");
    let results = [
        ("client -> public TCP, without hairpin", !tcp_before, "fails"),
        ("client -> public UDP, without hairpin", !udp_before, "fails"),
        ("client -> public TCP, with hairpin", tcp_after, "works"),
        ("client -> public UDP, with hairpin", udp_after, "works"),
        ("server -> own public address, with hairpin", server_self, "works"),
    ];
    for (what, as_expected, expected) in &results {
        println!(
            "  {} {what}: {expected}{}",
            if *as_expected { "ok " } else { "BAD" },
            if *as_expected { "" } else { " (it did not)" }
        );
    }
    step("Removing the demo's namespaces");
    drop(bed);
    if results.iter().any(|(_, ok, _)| !ok) {
        bail!("the demo did not go as expected");
    }
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
}

/// `curl http://PUBLIC/` from `host`; whether it answered.
fn curl(host: &Netns) -> bool {
    let url = format!("http://{PUBLIC}/");
    let output = host.try_exec("curl", &["-sS", "--max-time", "3", &url]);
    let text = String::from_utf8_lossy(if output.status.success() {
        &output.stdout
    } else {
        &output.stderr
    });
    println!("  $ curl {url}\n  {}", text.trim());
    output.status.success()
}

fn udp(host: &Netns) -> bool {
    let server: SocketAddr = SocketAddrV4::new(PUBLIC, UDP_PUBLIC_PORT).into();
    let result = udp_echo(host, server, b"ping", Duration::from_secs(3));
    match &result {
        Ok(reply) => println!("  UDP {server} answered: {}", String::from_utf8_lossy(reply)),
        Err(e) => println!("  UDP {server}: no answer ({e})"),
    }
    result.is_ok()
}

/// Runs a `hairpin` command against the demo's instance and shows it.
fn hairpin_command(gateway: &Netns, daemon: &Daemon, args: &[&str]) {
    println!("  $ hairpin {}", args.join(" "));
    let binary = hairpin_tests::daemon::hairpin_binary();
    let output = gateway
        .command(&binary.to_string_lossy())
        .env("HAIRPIN_PIN_DIR", &daemon.pin_dir)
        .args(args)
        .output();
    match output {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr);
            for line in text.lines() {
                println!("  {line}");
            }
        }
        Err(e) => println!("  (cannot run hairpin: {e})"),
    }
}
