//! The control plane end to end: every `hairpin` command run for real inside
//! the gateway's namespace (`nsenter --net`, so the host's bpffs and the
//! instance's pins stay visible), against a `hairpin run` daemon of the
//! seed's bed, with real traffic checking that what the commands say and do
//! is what the datapath does.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use hairpin_tests::{
    Netns,
    apps::{Servers, TcpEcho, http_get, http_request, tcp_connect, udp_echo},
    cli::{Cli, CliOutput},
    daemon::{Daemon, pin_dir},
    require_root,
    seed::{CLIENT, ConfigOptions, GATEWAY_LAN, PUBLIC, SERVER, SeedBed},
};
use rstest::rstest;
use serde_json::{Value, json};

const HTTP_PORT: u16 = 80;
const UDP_PUBLIC_PORT: u16 = 53;
const UDP_SERVER_PORT: u16 = 5353;
const ECHO_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection that must fail may take to do so.
const FAIL_TIMEOUT: Duration = Duration::from_millis(1500);

const HTTP: (&str, &str, &str) = ("tcp", "203.0.113.1:80", "192.168.0.2:80");
const UDP: (&str, &str, &str) = ("udp", "203.0.113.1:53", "192.168.0.2:5353");
const ECHO: (&str, &str, &str) = ("tcp", "203.0.113.1:7000", "192.168.0.2:7000");

/// The seed's bed with an HTTP and UDP echo server and a TCP echo server
/// on the server host.
struct Bed {
    seed: SeedBed,
    _servers: Servers,
    _echo: TcpEcho,
}

impl Bed {
    fn new() -> Self {
        let seed = SeedBed::new();
        let servers = Servers::start(&seed.server, HTTP_PORT, UDP_SERVER_PORT);
        let echo = TcpEcho::start(&seed.server, ECHO_PORT);
        Self { seed, _servers: servers, _echo: echo }
    }

    fn start(&self, mappings: &[(&str, &str, &str)]) -> Daemon {
        Daemon::start(&self.seed.gateway, &self.seed.config(mappings))
    }

    fn cli(&self) -> Cli<'_> {
        Cli::new(&self.seed.gateway)
    }
}

fn public(port: u16) -> SocketAddr {
    SocketAddrV4::new(PUBLIC, port).into()
}

/// `GET /` from `from` to the public address and `port`; the body, which
/// names the peer the server saw.
fn get_hello(from: &Netns, port: u16) -> io::Result<String> {
    let (status, body) = http_get(from, public(port), "/", TIMEOUT)?;
    if status != "HTTP/1.0 200 OK" {
        return Err(io::Error::other(format!("status {status}")));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Panics unless `GET /` to public `port` works and the server saw the
/// gateway's LAN address.
#[track_caller]
fn assert_hairpinned(from: &Netns, port: u16, when: &str) {
    match get_hello(from, port) {
        Ok(hello) => assert!(
            hello.starts_with(&format!("hello {GATEWAY_LAN}:")),
            "{when}: the server should see the gateway's LAN address, it answered: {hello}"
        ),
        Err(e) => panic!("{when}: GET / to {} failed: {e}", public(port)),
    }
}

/// Panics unless a connection to public `port` fails.
#[track_caller]
fn assert_refused(from: &Netns, port: u16, when: &str) {
    if let Ok(mut stream) = tcp_connect(from, public(port), FAIL_TIMEOUT) {
        // Nothing listens on the gateway: only a server behind a mapping
        // could have completed the handshake.
        let answer = http_request(&mut stream, public(port), "/", FAIL_TIMEOUT);
        panic!("{when}: a connection to {} should fail, it was answered: {answer:?}", public(port));
    }
}

/// One message to a TCP echo server and its echo back, within `TIMEOUT`.
fn echo_roundtrip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    hairpin_tests::apps::echo_round_trip(stream, message)
}

/// A long TCP flow kept busy: round trips to an echo server, one after the
/// other, on one connection, until stopped or until one fails.
struct EchoPump {
    roundtrips: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<TcpStream, String>>>,
}

impl EchoPump {
    fn start(mut stream: TcpStream) -> Self {
        let roundtrips = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (roundtrips, stop) = (roundtrips.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = roundtrips.load(Ordering::Relaxed);
                    let message = format!("round trip {n}\n");
                    echo_roundtrip(&mut stream, message.as_bytes())
                        .map_err(|e| format!("round trip {n} failed: {e}"))?;
                    roundtrips.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(stream)
            })
        };
        Self { roundtrips, stop, thread: Some(thread) }
    }

    /// Waits until `more` round trips beyond those done so far have been
    /// made; panics when the flow broke or stalled.
    #[track_caller]
    fn advance(&mut self, more: u64, when: &str) {
        let target = self.roundtrips.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + 2 * TIMEOUT;
        while self.roundtrips.load(Ordering::Relaxed) < target {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                let error = match self.thread.take().expect("pump thread").join() {
                    Ok(Err(error)) => error,
                    Ok(Ok(_)) => "the pump stopped".into(),
                    Err(_) => "the pump thread panicked".into(),
                };
                panic!("{when}: the long flow broke: {error}");
            }
            assert!(
                Instant::now() < deadline,
                "{when}: the long flow stalled at {} round trips",
                self.roundtrips.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops pumping; the connection, still open, when no round trip failed.
    #[track_caller]
    fn stop(mut self, when: &str) -> TcpStream {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.thread.take().expect("pump thread").join().expect("pump thread panicked");
        result.unwrap_or_else(|e| panic!("{when}: the long flow broke: {e}"))
    }
}

impl Drop for EchoPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `(proto, public, to)` of every mapping in `mapping list --json` or
/// `stats --json`'s `mappings`.
fn mapping_triples(rows: &Value) -> Vec<(String, String, String)> {
    rows.as_array()
        .unwrap_or_else(|| panic!("not a JSON array of mappings: {rows}"))
        .iter()
        .map(|row| {
            let field = |name: &str| {
                row[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("mapping without a string `{name}`: {row}"))
                    .to_string()
            };
            (field("proto"), field("public"), field("to"))
        })
        .collect()
}

fn triples(mappings: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    mappings.iter().map(|(p, a, b)| (p.to_string(), a.to_string(), b.to_string())).collect()
}

/// The flows of `conntrack list --json` whose original direction is `original`.
fn flows_with<'a>(flows: &'a Value, original: &str) -> Vec<&'a Value> {
    flows
        .as_array()
        .unwrap_or_else(|| panic!("conntrack list --json is not an array: {flows}"))
        .iter()
        .filter(|flow| flow["original"] == original)
        .collect()
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{name}` in stats --json: {stats}"))
}

/// The per-mapping figures of `stats --json` for the mapping publishing `public`.
fn mapping_traffic(stats: &Value, public: &str) -> (u64, u64, u64) {
    let row = stats["mappings"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["public"] == public))
        .unwrap_or_else(|| panic!("no mapping {public} in stats --json: {stats}"));
    let figure = |name: &str| row[name].as_u64().unwrap_or_else(|| panic!("no `{name}` in {row}"));
    (figure("flows"), figure("packets"), figure("bytes"))
}

/// Panics unless the command failed as a refused input should: exit status
/// 1 and exactly one line `hairpin: ...` on stderr, or clap's usage error
/// (status 2, `error: ...`); nothing on stdout either way.
#[track_caller]
fn assert_refused_input(output: &CliOutput, status: i32) {
    assert_eq!(output.code(), status, "`{}` should exit with {status}: {output}", output.command);
    assert!(output.stdout.is_empty(), "`{}` printed on stdout: {output}", output.command);
    match status {
        1 => {
            let lines: Vec<&str> = output.stderr.lines().collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with("hairpin: ") && lines[0].len() > 12,
                "`{}` should say why in one `hairpin: ` line: {output}",
                output.command
            );
        }
        _ => assert!(
            output.stderr.starts_with("error: "),
            "`{}` should print clap's usage error: {output}",
            output.command
        ),
    }
}

#[test]
#[ignore = "needs root"]
fn mapping_add_and_del_while_a_flow_runs() {
    require_root("mapping_add_and_del_while_a_flow_runs");
    let bed = Bed::new();
    let (client, cli) = (&bed.seed.client, bed.cli());
    let _daemon = bed.start(&[ECHO]);
    assert_refused(client, 8080, "before `mapping add`");

    let stream = tcp_connect(client, public(ECHO_PORT), TIMEOUT).expect("connect to the echo");
    let mut pump = EchoPump::start(stream);
    pump.advance(20, "before `mapping add`");

    let added = cli.ok(&["mapping", "add", "tcp", "203.0.113.1:8080", "192.168.0.2:80"]);
    assert!(
        added.contains("published tcp 203.0.113.1:8080 -> 192.168.0.2:80"),
        "`mapping add` should say what it published: {added}"
    );
    assert_hairpinned(client, 8080, "right after `mapping add`");
    pump.advance(20, "after `mapping add`");

    let new = ("tcp", "203.0.113.1:8080", "192.168.0.2:80");
    let listed = cli.json(&["mapping", "list", "--json"]);
    assert_eq!(mapping_triples(&listed), triples(&[ECHO, new]), "mapping list --json: {listed}");
    let text = cli.ok(&["mapping", "list"]);
    for (proto, public, to) in [ECHO, new] {
        assert!(
            text.lines().any(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.starts_with(&[proto, public, to])
            }),
            "mapping list should show {proto} {public} {to}:\n{text}"
        );
    }
    let new_row = listed
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["public"] == new.1))
        .expect("the new mapping's row");
    assert!(
        new_row["flows"].as_u64() >= Some(1) && new_row["packets"].as_u64() >= Some(3),
        "the new mapping carried a connection: {new_row}"
    );

    // An established flow of the mapping, to outlive its withdrawal.
    let mut established =
        tcp_connect(client, public(8080), TIMEOUT).expect("connect before `mapping del`");
    let deleted = cli.ok(&["mapping", "del", "tcp", "203.0.113.1:8080"]);
    assert!(deleted.contains("withdrew tcp 203.0.113.1:8080 -> 192.168.0.2:80"), "{deleted}");
    assert_refused(client, 8080, "after `mapping del`");
    let (status, body) = http_request(&mut established, public(8080), "/", TIMEOUT)
        .expect("the established flow of a withdrawn mapping goes on");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with(&format!("hello {GATEWAY_LAN}:")), "{body}");

    let listed = cli.json(&["mapping", "list", "--json"]);
    assert_eq!(mapping_triples(&listed), triples(&[ECHO]), "after `mapping del`: {listed}");
    pump.advance(20, "after `mapping del`");

    // Withdrawing the long flow's own mapping leaves it going too, until
    // `conntrack flush` ends it.
    cli.ok(&["mapping", "del", "tcp", ECHO.1]);
    assert_eq!(cli.json(&["mapping", "list", "--json"]), json!([]));
    pump.advance(20, "after withdrawing its own mapping");
    let mut stream = pump.stop("before `conntrack flush`");
    cli.ok(&["conntrack", "flush"]);
    assert!(
        echo_roundtrip(&mut stream, b"after the flush\n").is_err(),
        "after `conntrack flush` the withdrawn mapping's flow should end"
    );
}

#[test]
#[ignore = "needs root"]
fn a_withdrawn_mappings_flows_are_not_counted_under_the_next_mapping() {
    require_root("a_withdrawn_mappings_flows_are_not_counted_under_the_next_mapping");
    let bed = Bed::new();
    let (client, cli) = (&bed.seed.client, bed.cli());
    let _daemon = bed.start(&[HTTP]);
    cli.ok(&["mapping", "add", ECHO.0, ECHO.1, ECHO.2]);
    let mut stream = tcp_connect(client, public(ECHO_PORT), TIMEOUT).expect("connect to the echo");
    echo_roundtrip(&mut stream, b"hello\n").expect("echo through the new mapping");
    cli.ok(&["mapping", "del", ECHO.0, ECHO.1]);
    // Published after the withdrawal: it may take the withdrawn one's slot.
    cli.ok(&["mapping", "add", UDP.0, UDP.1, UDP.2]);
    for i in 0..10 {
        echo_roundtrip(&mut stream, format!("{i}\n").as_bytes()).unwrap_or_else(|e| {
            panic!("the withdrawn mapping's flow broke at round trip {i}: {e}")
        });
    }
    let listed = cli.json(&["mapping", "list", "--json"]);
    let udp = listed
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["public"] == UDP.1))
        .unwrap_or_else(|| panic!("no {} in {listed}", UDP.1));
    assert!(
        udp["flows"] == 0 && udp["packets"] == 0 && udp["bytes"] == 0,
        "{} carried no traffic yet, but `mapping list` counts the withdrawn TCP mapping's flow under it: {udp}",
        UDP.1
    );
    let stats = cli.json(&["stats", "--json"]);
    assert_eq!(mapping_traffic(&stats, UDP.1), (0, 0, 0), "stats --json: {stats}");
}

#[test]
#[ignore = "needs root"]
fn the_datapath_outlives_its_daemon_and_a_restart_takes_it_over() {
    require_root("the_datapath_outlives_its_daemon_and_a_restart_takes_it_over");
    let bed = Bed::new();
    let (client, gateway, cli) = (&bed.seed.client, &bed.seed.gateway, bed.cli());
    let config = bed.seed.config(&[HTTP, ECHO]);
    let pins = pin_dir(gateway);

    let daemon = Daemon::start(gateway, &config);
    let stream = tcp_connect(client, public(ECHO_PORT), TIMEOUT).expect("connect to the echo");
    let client_port = stream.local_addr().expect("local address").port();
    let mut pump = EchoPump::start(stream);
    pump.advance(10, "with the first daemon");

    daemon.kill();
    assert!(pins.exists(), "a killed daemon leaves its pins at {}", pins.display());
    pump.advance(10, "after kill -9");
    assert_hairpinned(client, HTTP_PORT, "a new connection after kill -9");
    let status = cli.ok(&["status"]);
    assert!(status.contains("not running"), "status should say the daemon is gone:\n{status}");
    // Taking over with other table sizes is refused, and the datapath goes on.
    let resized = bed.seed.config_with(
        &[HTTP, ECHO],
        &ConfigOptions { conntrack_capacity: Some(1024), ..Default::default() },
    );
    let resized_path = std::env::temp_dir().join(format!("{}-resized.toml", gateway.name()));
    std::fs::write(&resized_path, resized).expect("write the resized config");
    let refused = cli.run(&["run", "--config", resized_path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&resized_path);
    assert_refused_input(&refused, 1);
    assert!(refused.stderr.contains("conntrack.capacity"), "{refused}");
    pump.advance(10, "after a refused takeover");
    // The commands work on the pins alone: a mapping published with no
    // daemon running works at once.
    cli.ok(&["mapping", "add", UDP.0, UDP.1, UDP.2]);
    let echo = udp_echo(client, public(UDP_PUBLIC_PORT), b"no daemon", TIMEOUT)
        .expect("UDP through a mapping published with no daemon running");
    assert!(echo.starts_with(format!("{GATEWAY_LAN}:").as_bytes()), "the server saw the gateway");

    let daemon = Daemon::start_with(gateway, &config, &["--keep-attached"]);
    assert!(
        daemon.log().iter().any(|line| line.contains("taking over")),
        "the restarted daemon should take over the pinned datapath; its log:\n{}",
        daemon.log().join("\n")
    );
    pump.advance(10, "after the restart");
    assert_hairpinned(client, HTTP_PORT, "a new connection after the restart");
    let original = format!("{CLIENT}:{client_port} -> {PUBLIC}:{ECHO_PORT}");
    let flows = cli.json(&["conntrack", "list", "--json"]);
    let long = flows_with(&flows, &original);
    assert!(
        long.len() == 1 && long[0]["state"] == "ESTABLISHED" && long[0]["proto"] == "tcp",
        "conntrack list should show the long flow {original} ESTABLISHED once: {flows:#}"
    );
    let server_side = long[0]["translated"].as_str().unwrap_or_default();
    assert!(
        server_side.starts_with(&format!("{GATEWAY_LAN}:"))
            && server_side.ends_with(&format!(" -> {SERVER}:{ECHO_PORT}")),
        "the long flow as the server sees it: {server_side}"
    );
    let text = cli.ok(&["conntrack", "list"]);
    assert!(text.contains(&original), "conntrack list should show {original}:\n{text}");

    // SIGTERM under --keep-attached: the datapath stays, the next daemon
    // takes it over.
    let _ = daemon.stop();
    assert!(pins.exists(), "--keep-attached leaves the pins at {}", pins.display());
    pump.advance(10, "after SIGTERM under --keep-attached");
    assert_hairpinned(client, HTTP_PORT, "a new connection with no daemon (--keep-attached)");

    let daemon = Daemon::start(gateway, &config);
    assert!(
        daemon.log().iter().any(|line| line.contains("taking over")),
        "the daemon started after --keep-attached should take over; its log:\n{}",
        daemon.log().join("\n")
    );
    pump.advance(10, "after the second restart");
    let mut stream = pump.stop("before the last SIGTERM");

    // A plain SIGTERM: everything goes, the seed's problem is back.
    let _ = daemon.stop();
    assert!(!pins.exists(), "a plain SIGTERM should remove the pins at {}", pins.display());
    assert_refused(client, HTTP_PORT, "after the last SIGTERM");
    assert!(
        echo_roundtrip(&mut stream, b"after detaching\n").is_err(),
        "the long flow went on with hairpin detached"
    );
}

/// A case's arguments with each `{name}` of `values` replaced by its value.
fn fill(args: &[&str], values: &[(&str, &Path)]) -> Vec<String> {
    args.iter()
        .map(|arg| {
            values.iter().fold(arg.to_string(), |arg, (name, value)| {
                arg.replace(&format!("{{{name}}}"), &value.display().to_string())
            })
        })
        .collect()
}

/// A configuration file for the bed whose gateway is `gateway`, removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(gateway: &Netns, name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}.toml", gateway.name()));
        std::fs::write(&path, text).expect("write a configuration file");
        Self(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[rstest]
#[case::public_not_an_address(&["mapping", "add", "tcp", "203.0.113:81", "192.168.0.2:81"], 1, "203.0.113:81")]
#[case::server_not_an_address(&["mapping", "add", "tcp", "203.0.113.1:81", "192.168.0.256:81"], 1, "192.168.0.256:81")]
#[case::host_name(&["mapping", "add", "tcp", "gateway.example:81", "192.168.0.2:81"], 1, "gateway.example:81")]
#[case::no_port(&["mapping", "add", "tcp", "203.0.113.1", "192.168.0.2"], 1, "203.0.113.1")]
#[case::multicast_public(&["mapping", "add", "udp", "224.0.0.1:81", "192.168.0.2:81"], 1, "224.0.0.1")]
#[case::public_port_0(&["mapping", "add", "tcp", "203.0.113.1:0", "192.168.0.2:81"], 1, "port 0")]
#[case::server_port_0(&["mapping", "add", "tcp", "203.0.113.1:81", "192.168.0.2:0"], 1, "port 0")]
#[case::port_too_big(&["mapping", "add", "tcp", "203.0.113.1:65536", "192.168.0.2:81"], 1, "65536")]
#[case::reversed_range(&["mapping", "add", "tcp", "203.0.113.1:90-80", "192.168.0.2:80-90"], 1, "reversed")]
#[case::unequal_ranges(&["mapping", "add", "udp", "203.0.113.1:8000-8009", "192.168.0.2:9000-9004"], 1, "equal")]
#[case::range_to_one_port(&["mapping", "add", "udp", "203.0.113.1:8000-8009", "192.168.0.2:9000"], 1, "equal")]
#[case::too_many_ports(&["mapping", "add", "udp", "198.51.100.1:1-65535", "192.168.0.2:1-65535"], 1, "65536")]
#[case::unknown_protocol(&["mapping", "add", "sctp", "203.0.113.1:81", "192.168.0.2:81"], 2, "sctp")]
#[case::missing_server(&["mapping", "add", "tcp", "203.0.113.1:81"], 2, "SERVER")]
#[case::duplicate(&["mapping", "add", "tcp", "203.0.113.1:80", "192.168.0.2:8080"], 1, "already published")]
#[case::overlapping_range(&["mapping", "add", "tcp", "203.0.113.1:70-90", "192.168.0.2:70-90"], 1, "already published")]
#[case::overlapping_udp(&["mapping", "add", "udp", "203.0.113.1:50-60", "192.168.0.2:50-60"], 1, "already published")]
#[case::del_unknown(&["mapping", "del", "tcp", "203.0.113.1:81"], 1, "203.0.113.1:81")]
#[case::del_other_protocol(&["mapping", "del", "udp", "203.0.113.1:80"], 1, "udp 203.0.113.1:80")]
#[case::del_wider_range(&["mapping", "del", "tcp", "203.0.113.1:80-81"], 1, "203.0.113.1:80-81")]
#[case::del_bad_address(&["mapping", "del", "tcp", "203.0.113.300:80"], 1, "203.0.113.300:80")]
#[case::del_port_0(&["mapping", "del", "tcp", "203.0.113.1:0"], 1, "port 0")]
#[case::del_unknown_protocol(&["mapping", "del", "sctp", "203.0.113.1:80"], 2, "sctp")]
#[case::explain_no_port(&["explain", "tcp", "192.168.0.3", "203.0.113.1:80"], 2, "192.168.0.3")]
#[case::explain_bad_address(&["explain", "tcp", "192.168.0.3:40000", "203.0.113.256:80"], 2, "203.0.113.256:80")]
#[case::explain_unknown_protocol(&["explain", "sctp", "192.168.0.3:40000", "203.0.113.1:80"], 2, "sctp")]
#[case::explain_unknown_interface(&["explain", "tcp", "192.168.0.3:40000", "203.0.113.1:80", "--iface", "nosuch0"], 1, "nosuch0")]
#[case::conntrack_unknown_command(&["conntrack", "drop"], 2, "drop")]
#[case::stats_bad_interval(&["stats", "--watch", "soon"], 2, "soon")]
#[case::import_missing_file(&["import-iptables", "/nonexistent/iptables.rules"], 1, "/nonexistent/iptables.rules")]
#[case::check_missing_file(&["check", "--config", "/nonexistent/hairpin.toml"], 1, "/nonexistent/hairpin.toml")]
#[case::run_missing_config(&["run", "--config", "/nonexistent/hairpin.toml"], 1, "/nonexistent/hairpin.toml")]
#[case::run_a_second_daemon(&["run", "--config", "{config}"], 1, "already running")]
#[case::check_syntax_error(&["check", "--config", "{broken}"], 1, "line 1")]
#[case::check_invalid_value(&["check", "--config", "{port0}"], 1, "mapping[0].public")]
#[case::run_syntax_error(&["run", "--config", "{broken}"], 1, "line 1")]
#[case::run_invalid_value(&["run", "--config", "{port0}"], 1, "mapping[0].public")]
#[ignore = "needs root"]
fn bad_input_is_refused_and_nothing_is_written(
    #[case] args: &[&str],
    #[case] status: i32,
    #[case] says: &str,
) {
    require_root("bad_input_is_refused_and_nothing_is_written");
    let bed = SeedBed::new();
    let daemon = Daemon::start(&bed.gateway, &bed.config(&[HTTP, UDP]));
    let cli = Cli::new(&bed.gateway);
    let mappings = cli.json(&["mapping", "list", "--json"]);
    let flows = cli.json(&["conntrack", "list", "--json"]);
    let broken = ConfigFile::new(&bed.gateway, "broken", "[lan\ninterfaces = [\"gw-lan\"]\n");
    let port0 = ConfigFile::new(
        &bed.gateway,
        "port0",
        &bed.config(&[("tcp", "203.0.113.1:0", "192.168.0.2:80")]),
    );
    let args = fill(
        args,
        &[
            ("config", daemon.config_path()),
            ("pins", cli.pin_dir()),
            ("broken", &broken.0),
            ("port0", &port0.0),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let output = cli.run(&args);
    assert_refused_input(&output, status);
    assert!(
        output.stderr.contains(says),
        "`{}` should name `{says}` in its message: {output}",
        output.command
    );
    assert_eq!(
        cli.json(&["mapping", "list", "--json"]),
        mappings,
        "`{}` changed the mappings",
        output.command
    );
    assert_eq!(
        cli.json(&["conntrack", "list", "--json"]),
        flows,
        "`{}` changed the flows",
        output.command
    );
    assert!(cli.pin_dir().exists(), "`{}` removed the instance's pins", output.command);
    let _ = daemon.stop();
}

#[rstest]
#[case::mapping_add(&["mapping", "add", "tcp", "203.0.113.1:80", "192.168.0.2:80"])]
#[case::mapping_del(&["mapping", "del", "tcp", "203.0.113.1:80"])]
#[case::mapping_list(&["mapping", "list"])]
#[case::mapping_list_json(&["mapping", "list", "--json"])]
#[case::conntrack_list(&["conntrack", "list"])]
#[case::conntrack_list_json(&["conntrack", "list", "--json"])]
#[case::conntrack_flush(&["conntrack", "flush"])]
#[case::stats(&["stats"])]
#[case::stats_json(&["stats", "--json"])]
#[case::stats_watch(&["stats", "--watch", "1"])]
#[case::status(&["status"])]
#[case::status_json(&["status", "--json"])]
#[case::status_pin_dir_option(&["status", "--pin-dir", "{pins}"])]
#[case::explain(&["explain", "tcp", "192.168.0.3:40000", "203.0.113.1:80"])]
#[case::explain_json(&["explain", "udp", "192.168.0.3:40000", "203.0.113.1:53", "--json"])]
#[case::import_iptables(&["import-iptables", "-"])]
#[ignore = "needs root"]
fn commands_without_a_running_instance_say_so(#[case] args: &[&str]) {
    require_root("commands_without_a_running_instance_say_so");
    let gateway = Netns::new("gw");
    let pins = pin_dir(&gateway);
    let cli = if args.contains(&"{pins}") {
        // The option wins over the environment: the message names its directory.
        Cli::with_pin_dir(&gateway, pins.with_extension("env"))
    } else {
        Cli::new(&gateway)
    };
    let args = fill(args, &[("pins", &pins)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rule = "*nat\n-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80\nCOMMIT\n";

    let output = cli.run_with_stdin(&args, rule.as_bytes());
    assert_refused_input(&output, 1);
    assert!(
        output.stderr.contains("no running hairpin instance")
            && output.stderr.contains(&pins.display().to_string()),
        "`{}` should say there is no running instance at {}: {output}",
        output.command,
        pins.display()
    );
    assert!(!pins.exists(), "`{}` created {}", output.command, pins.display());
}

/// `stats --json` without the counters of the bed's own link-local chatter
/// (ARP, IPv6 neighbour discovery, IGMP), which goes on whatever the test
/// does; explain's packets are TCP and UDP over IPv4, so they could move
/// every other counter.
fn stats_without_chatter(cli: &Cli) -> Value {
    let mut stats = cli.json(&["stats", "--json"]);
    let counters = stats["counters"].as_object_mut().expect("stats --json has counters");
    for chatter in ["pass_not_ipv4", "pass_not_tcp_udp"] {
        counters.remove(chatter).unwrap_or_else(|| panic!("no counter `{chatter}`"));
    }
    stats
}

/// `explain --json` of one packet.
fn explain(cli: &Cli, proto: &str, src: &str, dst: &str) -> Value {
    cli.json(&["explain", proto, src, dst, "--json"])
}

#[track_caller]
fn assert_explained(explained: &Value, action: &str, counters: &[&str], output: Option<&str>) {
    assert!(
        explained["action"].as_str().is_some_and(|a| a.contains(action)),
        "explain should say `{action}`: {explained:#}"
    );
    let moved: Vec<&str> = explained["counters"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for counter in counters {
        assert!(moved.contains(counter), "explain should name `{counter}`: {explained:#}");
    }
    match output {
        Some(headers) => assert!(
            explained["output"].as_str().is_some_and(|o| o.starts_with(headers)),
            "explain should show the packet leaving as `{headers}`: {explained:#}"
        ),
        None => assert_eq!(explained["output"], Value::Null, "nothing leaves: {explained:#}"),
    }
}

#[test]
#[ignore = "needs root"]
fn explain_says_what_traffic_then_does_and_leaves_no_state() {
    require_root("explain_says_what_traffic_then_does_and_leaves_no_state");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    // The client's connections all come from this port, so explain can be
    // asked about the very tuple the traffic will use.
    const CLIENT_PORT: u16 = 40000;
    seed.client.sysctl(&format!("net.ipv4.ip_local_port_range={CLIENT_PORT} {CLIENT_PORT}"));
    let _daemon = bed.start(&[HTTP, ECHO]);
    let src = format!("{CLIENT}:{CLIENT_PORT}");
    let rewritten = format!("tcp {GATEWAY_LAN}:{CLIENT_PORT} -> {SERVER}:{HTTP_PORT} ");

    // The server's MAC is not resolved yet: the translated SYN goes to the
    // kernel to send once it is.
    let unresolved = explain(&cli, "tcp", &src, "203.0.113.1:80");
    assert_explained(
        &unresolved,
        "hand to the kernel translated",
        &["neigh_redirected"],
        Some(&rewritten),
    );
    // The gateway talks to the server itself: now the MAC is known.
    http_get(&seed.gateway, SocketAddrV4::new(SERVER, HTTP_PORT).into(), "/", TIMEOUT)
        .expect("the gateway reaches the server directly");

    let flows = cli.json(&["conntrack", "list", "--json"]);
    let stats = stats_without_chatter(&cli);
    let mappings = cli.json(&["mapping", "list", "--json"]);

    let hairpin = explain(&cli, "tcp", &src, "203.0.113.1:80");
    assert_explained(
        &hairpin,
        "send back out of the same interface (XDP_TX)",
        &["hairpinned", "flow_created"],
        Some(&rewritten),
    );
    assert_eq!(hairpin["input"], format!("tcp {src} -> {PUBLIC}:{HTTP_PORT} ttl 64"));
    let no_mapping = explain(&cli, "tcp", &src, "203.0.113.1:81");
    assert_explained(&no_mapping, "pass to the kernel", &["pass_no_mapping"], None);
    let udp = explain(&cli, "udp", &src, "203.0.113.1:53");
    assert_explained(&udp, "pass to the kernel", &["pass_no_mapping"], None);
    let text = cli.ok(&["explain", "tcp", &src, "203.0.113.1:80"]);
    for expected in [
        "verdict: send back out of the same interface (XDP_TX)".to_string(),
        format!("leaves:  {rewritten}"),
        "hairpinned".to_string(),
        "arriving on gw-lan".to_string(),
    ] {
        assert!(text.contains(&expected), "explain should say `{expected}`:\n{text}");
    }
    let wan = cli.json(&[
        "explain",
        "tcp",
        "198.51.100.7:5555",
        "203.0.113.1:80",
        "--iface",
        "gw-wan",
        "--json",
    ]);
    assert_explained(
        &wan,
        "",
        &["port_forwarded"],
        Some("tcp 198.51.100.7:5555 -> 192.168.0.2:80 "),
    );

    assert_eq!(cli.json(&["conntrack", "list", "--json"]), flows, "explain left flows behind");
    assert_eq!(stats_without_chatter(&cli), stats, "explain moved the counters");
    assert_eq!(
        cli.json(&["mapping", "list", "--json"]),
        mappings,
        "explain moved the mappings' figures"
    );

    // Now the real packet: hairpinned, and the server sees the rewritten source.
    let hello = get_hello(&seed.client, HTTP_PORT).expect("GET / through the hairpin");
    assert_eq!(hello.trim(), format!("hello {GATEWAY_LAN}:{CLIENT_PORT}"));
    let after = cli.json(&["stats", "--json"]);
    for name in ["hairpinned", "flow_created"] {
        assert!(
            counter(&after, name) > counter(&stats, name),
            "the real SYN should move `{name}` as explain said: {after}"
        );
    }
    assert_refused(&seed.client, 81, "to a port without a mapping");

    // A packet of a flow already tracked: explain shows the flow's own
    // translation and leaves the flow as it was.
    let mut stream = tcp_connect(&seed.client, public(ECHO_PORT), TIMEOUT).expect("connect");
    echo_roundtrip(&mut stream, b"first\n").expect("echo through the hairpin");
    let original = format!("{src} -> {PUBLIC}:{ECHO_PORT}");
    let tracked_flow = |when: &str| {
        let flows = cli.json(&["conntrack", "list", "--json"]);
        let found = flows_with(&flows, &original);
        assert_eq!(found.len(), 1, "{when}: the flow {original} once in {flows:#}");
        let flow = found[0];
        [&flow["state"], &flow["translated"], &flow["packets"], &flow["bytes"]].map(Value::clone)
    };
    let before = tracked_flow("before explain");
    let tracked = explain(&cli, "tcp", &src, "203.0.113.1:7000");
    let translated = format!("tcp {GATEWAY_LAN}:{CLIENT_PORT} -> {SERVER}:{ECHO_PORT} ");
    assert!(
        tracked["output"].as_str().is_some_and(|o| o.starts_with(&translated)),
        "a packet of the tracked flow should leave as `{translated}`: {tracked:#}"
    );
    assert_eq!(tracked_flow("after explain"), before, "explain changed the tracked flow");
    echo_roundtrip(&mut stream, b"second\n").expect("the flow after explain");
}

#[test]
#[ignore = "needs root"]
fn import_iptables_takes_over_the_seed_rules() {
    require_root("import_iptables_takes_over_the_seed_rules");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    seed.load_seed_iptables(&[HTTP]);
    let saved = seed.gateway.exec("iptables-save", &[]).stdout;
    // netfilter must not do the work behind hairpin's back.
    seed.gateway.exec("iptables", &["-t", "nat", "-F"]);
    let _daemon = bed.start(&[]);
    assert_refused(&seed.client, HTTP_PORT, "with no rule and no mapping");

    let dry = cli.run_with_stdin(&["import-iptables", "--dry-run"], &saved).expect_success();
    assert!(
        dry.stdout
            .lines()
            .any(|l| l == "would publish tcp 203.0.113.1:80 -> 192.168.0.2:80 from 192.168.0.0/24"),
        "the dry run should show the DNAT rule as a mapping: {dry}"
    );
    assert!(
        dry.stdout.lines().any(|l| {
            l.starts_with("skipped line ")
                && l.contains("-A POSTROUTING -s 192.168.0.0/24 -d 192.168.0.0/24 -j SNAT --to-source 192.168.0.1")
                && l.contains("SNAT")
        }),
        "the dry run should list the SNAT rule as skipped: {dry}"
    );
    assert_eq!(dry.stdout.lines().filter(|l| l.contains("publish")).count(), 1, "{dry}");
    assert_eq!(cli.json(&["mapping", "list", "--json"]), json!([]), "a dry run publishes nothing");
    assert_refused(&seed.client, HTTP_PORT, "after the dry run");

    let file = std::env::temp_dir().join(format!("{}-iptables.rules", seed.gateway.name()));
    std::fs::write(&file, &saved).expect("write the iptables-save output");
    let imported = cli.run(&["import-iptables", file.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&file);
    let imported = imported.expect_success();
    assert!(
        imported
            .stdout
            .lines()
            .any(|l| l == "published tcp 203.0.113.1:80 -> 192.168.0.2:80 from 192.168.0.0/24"),
        "{imported}"
    );
    let listed = cli.json(&["mapping", "list", "--json"]);
    assert_eq!(mapping_triples(&listed), triples(&[HTTP]), "after the import: {listed}");
    assert_eq!(listed[0]["allow"], json!(["192.168.0.0/24"]), "the rule's `-s` is kept");
    assert_hairpinned(&seed.client, HTTP_PORT, "after the import");
    // The seed's rule is for LAN sources only: so is the import.
    assert!(
        get_forwarded(seed, HTTP_PORT).is_err(),
        "a WAN host outside the imported rule's `-s` was forwarded"
    );

    // Importing again publishes nothing twice.
    let again = cli.run_with_stdin(&["import-iptables", "-"], &saved);
    assert!(
        again.stdout.contains("not published tcp 203.0.113.1:80 -> 192.168.0.2:80 from"),
        "a second import should say the mapping is there already: {again}"
    );
    assert_eq!(mapping_triples(&cli.json(&["mapping", "list", "--json"])), triples(&[HTTP]));
}

#[test]
#[ignore = "needs root"]
fn stats_status_and_conntrack_flush_follow_the_traffic() {
    require_root("stats_status_and_conntrack_flush_follow_the_traffic");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let daemon = bed.start(&[HTTP, UDP]);

    let before = cli.json(&["stats", "--json"]);
    assert_eq!(mapping_traffic(&before, HTTP.1), (0, 0, 0), "{before}");
    const CONNECTIONS: u64 = 3;
    const DATAGRAMS: u64 = 1;
    for i in 0..CONNECTIONS {
        assert_hairpinned(&seed.client, HTTP_PORT, &format!("connection {i}"));
    }
    udp_echo(&seed.client, public(UDP_PUBLIC_PORT), b"ping", TIMEOUT).expect("UDP echo");
    let after = cli.json(&["stats", "--json"]);
    // Each exchange: at least SYN, request, ACK, FIN from the client and
    // SYN-ACK, response, FIN from the server; a datagram each way.
    assert!(
        counter(&after, "hairpinned")
            >= counter(&before, "hairpinned") + 4 * CONNECTIONS + DATAGRAMS,
        "hairpinned should grow with the traffic: {before} then {after}"
    );
    assert!(
        counter(&after, "translated_back")
            >= counter(&before, "translated_back") + 3 * CONNECTIONS + DATAGRAMS,
        "translated_back should grow: {after}"
    );
    assert_eq!(
        counter(&after, "flow_created"),
        counter(&before, "flow_created") + CONNECTIONS + DATAGRAMS,
        "one flow per connection and datagram: {after}"
    );
    let (flows, packets, bytes) = mapping_traffic(&after, HTTP.1);
    assert_eq!(flows, CONNECTIONS, "flows of {}: {after}", HTTP.1);
    assert!(packets >= 7 * CONNECTIONS && bytes > 40 * packets, "traffic of {}: {after}", HTTP.1);
    let (flows, packets, bytes) = mapping_traffic(&after, UDP.1);
    assert!(
        flows == DATAGRAMS && packets == 2 * DATAGRAMS && bytes > 0,
        "traffic of {}: {after}",
        UDP.1
    );
    let text = cli.ok(&["stats"]);
    assert!(
        text.contains(&format!("tcp {} -> {}: {CONNECTIONS} flows", HTTP.1, HTTP.2)),
        "stats should show the traffic per mapping:\n{text}"
    );

    // `stats --watch` prints again every interval, up to date each time.
    let mut watch = cli.spawn(&["stats", "--json", "--watch", "1"]);
    let mut watched = |when: &str| -> Value {
        let line = watch
            .next_line(TIMEOUT)
            .unwrap_or_else(|| panic!("`{}` printed nothing more {when}", watch.command));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("`{line}` is not JSON: {e}"))
    };
    let first = watched("at first");
    assert_eq!(mapping_traffic(&first, HTTP.1).0, CONNECTIONS, "{first}");
    assert_hairpinned(&seed.client, HTTP_PORT, "while watching");
    let deadline = Instant::now() + 2 * TIMEOUT;
    while mapping_traffic(&watched("after a connection"), HTTP.1).0 != CONNECTIONS + 1 {
        assert!(Instant::now() < deadline, "`stats --watch` never showed the new connection");
    }
    assert!(watch.is_running(), "`stats --watch` should keep running");
    drop(watch);
    let connections = CONNECTIONS + 1;

    let status = cli.json(&["status", "--json"]);
    let config = daemon.config_path().display().to_string();
    assert_eq!(status["daemon"]["config"], config, "{status:#}");
    assert_eq!(status["daemon"]["running"], true, "{status:#}");
    assert_eq!(status["daemon"]["pid"], daemon.pid(), "{status:#}");
    let interfaces: Vec<(&str, &str, &str)> = status["interfaces"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or_default();
                    (s("interface"), s("role"), s("mode"))
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(interfaces, [("gw-lan", "lan", "xdp"), ("gw-wan", "wan", "xdp")], "{status:#}");
    // The XDP program status names is the one the kernel runs on gw-lan.
    let link = seed.gateway.ip(&["-d", "link", "show", "dev", "gw-lan"]).stdout;
    let link = String::from_utf8_lossy(&link);
    let attached = link
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no XDP program on gw-lan:\n{link}"));
    let links = status["links"].as_array().unwrap_or_else(|| panic!("no links: {status:#}"));
    let xdp_lan = links.iter().find(|l| l["name"] == "xdp_gw-lan");
    assert!(
        xdp_lan.is_some_and(|l| l["program_id"] == attached),
        "status should name the XDP program {attached} attached to gw-lan: {status:#}"
    );
    // Every link and program it names is the kernel's.
    for link in links {
        let (Some(link_id), Some(program_id)) =
            (link["link_id"].as_u64(), link["program_id"].as_u64())
        else {
            panic!("a link without ids: {link}");
        };
        let shown = seed.gateway.exec("bpftool", &["link", "show", "id", &link_id.to_string()]);
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(
            shown.contains(&format!("prog {program_id}")),
            "status says link {link_id} runs program {program_id}, bpftool says:\n{shown}"
        );
    }
    let text = cli.ok(&["status"]);
    assert!(
        text.contains(&format!("program id {attached}")),
        "status should name the XDP program {attached} attached to gw-lan:\n{text}"
    );
    for expected in ["gw-lan", "gw-wan", "XDP native (configured)", &format!("config:   {config}")]
    {
        assert!(text.contains(expected), "status should show `{expected}`:\n{text}");
    }

    let flows = cli.json(&["conntrack", "list", "--json"]);
    assert!(
        flows.as_array().is_some_and(|f| f.len() as u64 == connections + DATAGRAMS),
        "conntrack list should show the {} flows: {flows:#}",
        connections + DATAGRAMS
    );
    let flushed = cli.ok(&["conntrack", "flush"]);
    assert!(
        flushed.contains(&format!("removed {} entries", 2 * (connections + DATAGRAMS))),
        "conntrack flush should say what it removed: {flushed}"
    );
    assert_eq!(cli.json(&["conntrack", "list", "--json"]), json!([]), "after conntrack flush");
    assert_eq!(cli.ok(&["conntrack", "list"]).trim(), "0 flow(s)");
    // New flows start afresh after the flush.
    assert_hairpinned(&seed.client, HTTP_PORT, "after conntrack flush");
}

#[test]
#[ignore = "needs root"]
fn sighup_applies_a_good_configuration_and_keeps_the_running_one_on_a_bad_one() {
    require_root("sighup_applies_a_good_configuration_and_keeps_the_running_one_on_a_bad_one");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let mut daemon = bed.start(&[HTTP]);
    assert!(
        udp_echo(&seed.client, public(UDP_PUBLIC_PORT), b"before", FAIL_TIMEOUT).is_err(),
        "UDP is not published yet"
    );

    // A mapping published live, not in the file: a reload withdraws it.
    cli.ok(&["mapping", "add", ECHO.0, ECHO.1, ECHO.2]);
    std::fs::write(daemon.config_path(), seed.config(&[HTTP, UDP])).expect("edit the config");
    let config = daemon.config_path().to_str().expect("utf-8 path").to_string();
    let checked = cli.ok(&["check", "--config", &config]);
    assert!(
        checked.contains("configuration is valid") && checked.contains("2 mapping(s)"),
        "{checked}"
    );
    daemon.reload();
    daemon.wait_for_log("configuration reloaded", TIMEOUT);
    let echo = udp_echo(&seed.client, public(UDP_PUBLIC_PORT), b"after", TIMEOUT)
        .expect("UDP through the mapping added by SIGHUP");
    assert!(echo.starts_with(format!("{GATEWAY_LAN}:").as_bytes()) && echo.ends_with(b" after"));
    let listed = cli.json(&["mapping", "list", "--json"]);
    assert_eq!(mapping_triples(&listed), triples(&[UDP, HTTP]), "{listed}");

    assert_refused(&seed.client, ECHO_PORT, "after a reload without the live mapping");

    std::fs::write(daemon.config_path(), "[lan\ninterfaces = [\"gw-lan\"\n").expect("break it");
    let checked = cli.run(&["check", "--config", &config]);
    assert!(
        checked.code() == 1 && checked.stderr.starts_with("hairpin: invalid configuration"),
        "check should refuse the broken file: {checked}"
    );
    daemon.reload();
    daemon.wait_for_log("not reloaded", TIMEOUT);
    assert_eq!(
        mapping_triples(&cli.json(&["mapping", "list", "--json"])),
        triples(&[UDP, HTTP]),
        "a bad config changed the mappings"
    );
    assert_hairpinned(&seed.client, HTTP_PORT, "after a bad SIGHUP");
    udp_echo(&seed.client, public(UDP_PUBLIC_PORT), b"still", TIMEOUT)
        .expect("UDP after a bad SIGHUP");

    // A valid file that cannot be applied without a restart is refused too.
    let other_mode = seed.config(&[HTTP]).replace("attach = \"xdp\"", "attach = \"tc\"");
    std::fs::write(daemon.config_path(), other_mode).expect("edit the config");
    daemon.reload();
    daemon.wait_for_log("attach changed", TIMEOUT);
    assert_eq!(mapping_triples(&cli.json(&["mapping", "list", "--json"])), triples(&[UDP, HTTP]));
    let _ = daemon.stop();
}

const METRICS: &str = "127.0.0.1:9654";

/// One scrape of the daemon's metrics from inside the gateway's namespace.
fn scrape(gateway: &Netns) -> String {
    let address: SocketAddr = METRICS.parse().expect("metrics address");
    let (status, body) = http_get(gateway, address, "/metrics", TIMEOUT)
        .unwrap_or_else(|e| panic!("GET http://{METRICS}/metrics in the gateway failed: {e}"));
    assert!(status.ends_with(" 200 OK"), "GET /metrics answered {status}");
    String::from_utf8(body).expect("UTF-8 metrics")
}

/// The value of the sample written exactly `series` (name and labels).
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample `{series}` in:\n{exposition}"))
}

#[test]
#[ignore = "needs root"]
fn prometheus_metrics_grow_with_the_traffic() {
    require_root("prometheus_metrics_grow_with_the_traffic");
    let bed = Bed::new();
    let seed = &bed.seed;
    let options = ConfigOptions { metrics_listen: Some(METRICS.into()), ..Default::default() };
    let daemon = Daemon::start(&seed.gateway, &seed.config_with(&[HTTP], &options));

    let hairpinned = r#"hairpin_packets_total{verdict="hairpinned"}"#;
    let flows =
        r#"hairpin_mapping_flows_total{proto="tcp",public="203.0.113.1:80",to="192.168.0.2:80"}"#;
    let before = scrape(&seed.gateway);
    assert_eq!(sample(&before, flows), 0.0);
    for i in 0..3 {
        assert_hairpinned(&seed.client, HTTP_PORT, &format!("connection {i}"));
    }
    let after = scrape(&seed.gateway);
    assert!(
        sample(&after, hairpinned) >= sample(&before, hairpinned) + 12.0,
        "{hairpinned} should grow by the packets sent: {} then {}",
        sample(&before, hairpinned),
        sample(&after, hairpinned)
    );
    assert_eq!(sample(&after, flows), 3.0, "{after}");
    // The client's last ACK may still be on its way: `stats`, read later,
    // has at least as much.
    let stats = Cli::new(&seed.gateway).json(&["stats", "--json"]);
    assert!(
        counter(&stats, "hairpinned") as f64 >= sample(&after, hairpinned),
        "the metrics and `stats --json` should agree: {after}\n{stats}"
    );
    let entries = r#"hairpin_conntrack_entries{table="new"}"#;
    assert_eq!(
        sample(&after, entries) as u64,
        counter(&stats, "new_entries"),
        "the scrape counts the tables as `stats` does: {after}"
    );
    // A million-flow table is read in about a second, counted in the
    // kernel in a fraction: the scrapes must count.
    let log = daemon.log();
    assert!(
        !log.iter().any(|line| line.contains("counting the tables")),
        "the daemon could not count the tables in the kernel:\n{}",
        log.join("\n")
    );
}

/// Gives the server a new MAC address, announced with gratuitous ARP as a
/// host does (`arp_notify`); the gateway's kernel updates its neighbour
/// entry from it.
fn move_server_to_new_mac(seed: &SeedBed) {
    seed.server.sysctl("net.ipv4.conf.eth0.arp_notify=1");
    seed.server.ip(&["link", "set", "eth0", "address", "02:00:00:00:aa:02"]);
}

#[test]
#[ignore = "needs root"]
fn a_running_daemon_follows_a_server_that_changes_its_mac_address() {
    require_root("a_running_daemon_follows_a_server_that_changes_its_mac_address");
    let bed = Bed::new();
    let _daemon = bed.start(&[ECHO]);
    let stream =
        tcp_connect(&bed.seed.client, public(ECHO_PORT), TIMEOUT).expect("connect to the echo");
    let mut pump = EchoPump::start(stream);
    pump.advance(20, "before the change");
    move_server_to_new_mac(&bed.seed);
    pump.advance(20, "after the server's MAC address changed");
}

/// A killed daemon hears no more changes: its cached routes must lapse.
#[test]
#[ignore = "needs root"]
fn after_kill_9_cached_routes_lapse_and_changes_apply() {
    require_root("after_kill_9_cached_routes_lapse_and_changes_apply");
    let bed = Bed::new();
    let daemon = bed.start(&[ECHO]);
    let stream =
        tcp_connect(&bed.seed.client, public(ECHO_PORT), TIMEOUT).expect("connect to the echo");
    let mut pump = EchoPump::start(stream);
    pump.advance(20, "with the daemon");
    let route_cache_on = || bed.cli().json(&["status", "--json"])["route_cache"]["on"].clone();
    assert_eq!(route_cache_on(), json!(true), "the running daemon keeps the route cache");
    daemon.kill();
    let lifetime = Duration::from_nanos(hairpin_common::route::LIFETIME_NS);
    thread::sleep(lifetime + Duration::from_millis(500));
    assert_eq!(route_cache_on(), json!(false), "`status` tells the cache lapsed");
    pump.advance(10, "once the cache has lapsed");
    move_server_to_new_mac(&bed.seed);
    pump.advance(20, "after the server's MAC address changed, with no daemon");
}

/// The body of `GET /` from the WAN host through public `port`, naming the
/// peer the server saw (the WAN host's own address: a port forward).
fn get_forwarded(seed: &SeedBed, port: u16) -> io::Result<String> {
    get_hello(&seed.wan, port)
}

/// The row of `mapping list --json` publishing `public`.
fn mapping_row(cli: &Cli, public: &str) -> Value {
    let listed = cli.json(&["mapping", "list", "--json"]);
    listed
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["public"] == public))
        .unwrap_or_else(|| panic!("no mapping {public} in mapping list --json: {listed}"))
        .clone()
}

#[test]
#[ignore = "needs root"]
fn allow_and_interface_restrictions_admit_only_their_flows_and_never_outlive_their_rule() {
    require_root("allow_and_interface_restrictions_admit_only_their_flows");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let _daemon = bed.start(&[]);
    let wan_host = hairpin_tests::seed::WAN_HOST;
    let add = |extra: &[&str]| {
        let mut args = vec!["mapping", "add", HTTP.0, HTTP.1, HTTP.2];
        args.extend_from_slice(extra);
        cli.ok(&args)
    };
    // Each step withdraws the rule and, once a flow of it could no longer
    // be entered, flushes its flows, which frees its id: the next rule gets
    // the same id, and what the last one left must not count.
    let withdraw = || {
        cli.ok(&["mapping", "del", HTTP.0, HTTP.1]);
        thread::sleep(Duration::from_nanos(hairpin_common::mapping_ids::SETTLE_NS * 11 / 10));
        cli.ok(&["conntrack", "flush"]);
    };

    let added = add(&["--allow", &format!("{wan_host}/32")]);
    assert!(added.contains(&format!("from {wan_host}/32")), "{added}");
    let row = mapping_row(&cli, HTTP.1);
    assert_eq!(row["allow"], json!([format!("{wan_host}/32")]), "{row}");
    assert_eq!(row["interfaces"], json!([]), "{row}");
    let first_id = row["id"].clone();
    let hello = get_forwarded(seed, HTTP_PORT).expect("the allowed WAN host is forwarded");
    assert!(hello.starts_with(&format!("hello {wan_host}:")), "{hello}");
    assert_refused(&seed.client, HTTP_PORT, "a LAN client outside the allowlist");

    withdraw();
    add(&["--allow", &format!("{CLIENT}/32")]);
    assert_eq!(mapping_row(&cli, HTTP.1)["id"], first_id, "test setup: the id is reused");
    assert_hairpinned(&seed.client, HTTP_PORT, "the LAN client now allowed");
    assert!(
        get_forwarded(seed, HTTP_PORT).is_err(),
        "the WAN host was allowed by the withdrawn rule of the same id only"
    );

    withdraw();
    add(&["--interface", "gw-wan"]);
    let row = mapping_row(&cli, HTTP.1);
    assert_eq!((row["allow"].clone(), row["interfaces"].clone()), (json!([]), json!(["gw-wan"])));
    assert!(get_forwarded(seed, HTTP_PORT).is_ok(), "from the WAN, the bound interface");
    assert_refused(&seed.client, HTTP_PORT, "from the LAN, on an interface it is not bound to");
    let text = cli.ok(&["mapping", "list"]);
    assert!(text.contains("on gw-wan"), "mapping list shows the binding: {text}");
    let stats = stats_without_chatter(&cli);
    assert!(counter(&stats, "pass_interface_not_allowed") >= 1, "{stats}");

    withdraw();
    for bad in [&["--interface", "eth9"][..], &["--allow", "192.168.0.7/24"][..]] {
        let mut args = vec!["mapping", "add", HTTP.0, HTTP.1, HTTP.2];
        args.extend_from_slice(bad);
        assert_refused_input(&cli.run(&args), 1);
    }
    assert_eq!(cli.json(&["mapping", "list", "--json"]), json!([]), "nothing half-written");
}

#[test]
#[ignore = "needs root"]
fn deny_add_bans_new_and_open_port_forwards_and_only_cli_entries_survive_a_reload() {
    require_root("deny_add_bans_new_and_open_port_forwards");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let config_deny = "\n[deny]\nnetworks = [\"198.51.100.0/24\"]\n";
    let mut daemon =
        Daemon::start(&seed.gateway, &format!("{}{config_deny}", seed.config(&[HTTP, ECHO])));
    let wan_host = hairpin_tests::seed::WAN_HOST;
    let listed = cli.json(&["deny", "list", "--json"]);
    assert_eq!(listed, json!([{"network": "198.51.100.0/24", "origin": "config"}]));

    let stream = tcp_connect(&seed.wan, public(ECHO_PORT), TIMEOUT).expect("WAN echo");
    let mut pump = EchoPump::start(stream);
    pump.advance(10, "before the ban");
    let mut stream = pump.stop("before the ban");
    let mut lan_stream = tcp_connect(&seed.client, public(ECHO_PORT), TIMEOUT).expect("LAN echo");

    let banned = cli.ok(&["deny", "add", &format!("{wan_host}/32")]);
    assert!(banned.contains("ended 1 open port-forward flow"), "{banned}");
    assert!(
        echo_roundtrip(&mut stream, b"after the ban\n").is_err(),
        "an open connection of a banned client should end"
    );
    assert!(get_forwarded(seed, HTTP_PORT).is_err(), "a new flow of a banned client");
    echo_roundtrip(&mut lan_stream, b"LAN flows are not port forwards\n")
        .expect("the ban ends no LAN flow");
    assert_hairpinned(&seed.client, HTTP_PORT, "the ban is for WAN flows");
    assert!(counter(&stats_without_chatter(&cli), "denied") >= 1);

    // The file loses its entry: it goes; the command line's stays.
    std::fs::write(daemon.config_path(), seed.config(&[HTTP, ECHO])).expect("edit the config");
    daemon.reload();
    daemon.wait_for_log("configuration reloaded", TIMEOUT);
    let listed = cli.json(&["deny", "list", "--json"]);
    assert_eq!(listed, json!([{"network": format!("{wan_host}/32"), "origin": "cli"}]));

    cli.ok(&["deny", "del", &format!("{wan_host}/32")]);
    assert!(get_forwarded(seed, HTTP_PORT).is_ok(), "after `deny del`");
    assert_refused_input(&cli.run(&["deny", "del", &format!("{wan_host}/32")]), 1);
    assert_refused_input(&cli.run(&["deny", "add", "203.0.113.9/24"]), 1);
}

/// `mapping list --json`'s rule ids, panicking when two rules share one.
#[track_caller]
fn unique_rule_ids(cli: &Cli) -> Vec<u64> {
    let listed = cli.json(&["mapping", "list", "--json"]);
    let mut ids: Vec<u64> = listed
        .as_array()
        .expect("an array of mappings")
        .iter()
        .map(|row| row["id"].as_u64().unwrap_or_else(|| panic!("no id in {row}")))
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "two mapping rules share an id: {listed}");
    ids
}

#[test]
#[ignore = "needs root"]
fn concurrent_writers_never_pick_the_same_rule_id_or_lose_a_mapping() {
    require_root("concurrent_writers_never_pick_the_same_rule_id");
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let mut daemon = bed.start(&[HTTP]);
    let per_writer = 25u16;
    let add_all = |first: u16| {
        for port in first..first + per_writer {
            let public = format!("203.0.113.1:{port}");
            cli.ok(&["mapping", "add", "tcp", &public, "192.168.0.2:80"]);
        }
    };
    thread::scope(|scope| {
        scope.spawn(|| add_all(10000));
        scope.spawn(|| add_all(20000));
    });
    let ids = unique_rule_ids(&cli);
    assert_eq!(ids.len(), 1 + 2 * per_writer as usize, "a mapping was lost");
    assert_hairpinned(&seed.client, 10000 + per_writer - 1, "a concurrently added mapping");

    // `mapping add` racing reloads: each reload makes the mappings the
    // file's again, but no two rules ever share an id.
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            for port in 30000..30000 + per_writer {
                let public = format!("203.0.113.1:{port}");
                cli.ok(&["mapping", "add", "tcp", &public, "192.168.0.2:80"]);
                unique_rule_ids(&cli);
            }
            stop.store(true, Ordering::Relaxed);
        });
        while !stop.load(Ordering::Relaxed) {
            daemon.reload();
            thread::sleep(Duration::from_millis(20));
        }
    });
    daemon.reload();
    daemon.wait_for_log("configuration reloaded", TIMEOUT);
    unique_rule_ids(&cli);
    assert_hairpinned(&seed.client, HTTP_PORT, "the file's mapping after the reloads");
}

#[test]
#[ignore = "needs root"]
fn a_pin_dir_that_is_a_symlink_is_refused_not_followed() {
    require_root("a_pin_dir_that_is_a_symlink_is_refused_not_followed");
    let bed = Bed::new();
    let _daemon = bed.start(&[HTTP]);
    let real = pin_dir(&bed.seed.gateway);
    let link = std::env::temp_dir().join(format!("{}-pins-link", bed.seed.gateway.name()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&real, &link).expect("test setup: a symlink to the pins");
    let cli = Cli::with_pin_dir(&bed.seed.gateway, &link);
    let listed = cli.run(&["mapping", "list"]);
    let added = cli.run(&["mapping", "add", ECHO.0, ECHO.1, ECHO.2]);
    let _ = std::fs::remove_file(&link);
    for output in [&listed, &added] {
        assert_refused_input(output, 1);
        assert!(output.stderr.contains("symbolic link"), "should say why: {output}");
    }
    let through_real = bed.cli().json(&["mapping", "list", "--json"]);
    assert_eq!(mapping_triples(&through_real), triples(&[HTTP]), "nothing written: {through_real}");
}

/// Many more flows than one batch read of a table holds (the CLI reads the
/// conntrack tables thousands of entries per system call): `conntrack list`
/// shows each flow once, `status` counts every entry, with the daemon
/// running. The flows are written into the pinned tables directly, as the
/// datapath would enter established hairpin flows.
#[test]
#[ignore = "needs root"]
fn conntrack_list_and_status_see_every_one_of_ten_thousand_flows() {
    use bytemuck::Zeroable as _;
    use hairpin::{
        datapath::{PinDir, monotonic_coarse_ns},
        maps::{Maps, Table},
    };
    use hairpin_common::{DIRECTION_ORIGINAL, FlowEntry, FlowKey, KIND_HAIRPIN, state};

    require_root("conntrack_list_and_status_see_every_one_of_ten_thousand_flows");
    const FLOWS: u32 = 10_000;
    let bed = SeedBed::new();
    let options = ConfigOptions { conntrack_capacity: Some(32_768), ..ConfigOptions::default() };
    let _daemon = Daemon::start(&bed.gateway, &bed.config_with(&[HTTP], &options));
    let cli = Cli::new(&bed.gateway);
    let mut maps = Maps::open_pinned(&PinDir(cli.pin_dir().to_path_buf()).maps())
        .expect("the instance's pinned maps");
    let now = monotonic_coarse_ns();
    let wire = |addr: std::net::Ipv4Addr| u32::from(addr).to_be();
    for i in 0..FLOWS {
        let client = wire(std::net::Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8));
        let key = FlowKey::new(client, wire(PUBLIC), 40_000u16.to_be(), 80u16.to_be(), 6);
        let snat = (20_000 + i as u16).to_be();
        let translated = FlowKey::new(wire(GATEWAY_LAN), wire(SERVER), snat, 80u16.to_be(), 6);
        let mut original = FlowEntry::zeroed();
        original.translated = translated;
        original.direction = DIRECTION_ORIGINAL;
        original.state = state::TCP_ESTABLISHED;
        original.kind = KIND_HAIRPIN;
        original.last_seen_ns = now;
        let mut reply = original;
        reply.direction = DIRECTION_ORIGINAL + 1;
        reply.translated = key.reversed();
        maps.put_flow(Table::Established, &key, &original);
        maps.put_flow(Table::Established, &translated.reversed(), &reply);
    }

    let flows = cli.json(&["conntrack", "list", "--json"]);
    let rows = flows.as_array().expect("a JSON array of flows");
    let listed: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|row| row["original"].as_str()).collect();
    assert_eq!(rows.len(), FLOWS as usize, "one row per flow");
    assert_eq!(listed.len(), FLOWS as usize, "no flow listed twice");
    assert!(
        rows.iter().all(|row| row["state"] == "ESTABLISHED" && row["table"] == "established"),
        "every flow established: {:#}",
        rows[0]
    );
    let text = cli.ok(&["conntrack", "list"]);
    assert!(text.ends_with(&format!("{FLOWS} flow(s)\n")), "the text listing's count");
    let status = cli.json(&["status", "--json"]);
    assert_eq!(status["conntrack"]["established"], json!(2 * FLOWS), "{status:#}");
    assert_eq!(status["conntrack"]["capacity"], json!(32_768), "{status:#}");

    // Some not yet answered flows too: the kernel's count of each table is
    // what reading it finds.
    for i in 0..300u32 {
        let client = wire(std::net::Ipv4Addr::new(10, 8, (i >> 8) as u8, i as u8));
        let key = FlowKey::new(client, wire(PUBLIC), 41_000u16.to_be(), 80u16.to_be(), 6);
        let mut opening = FlowEntry::zeroed();
        opening.direction = DIRECTION_ORIGINAL;
        opening.state = state::TCP_SYN_SENT;
        opening.last_seen_ns = now;
        maps.put_flow(Table::New, &key, &opening);
    }
    let read = [Table::Established, Table::New]
        .map(|table| maps.conntrack_len(table).expect("read the table") as u64);
    assert_eq!(read, [2 * u64::from(FLOWS), 300], "the tables as read in batches");
    let counted = hairpin::entry_count::EntryCounter::load(&maps)
        .expect("load the counting program over the pinned tables")
        .count()
        .expect("count the tables in the kernel");
    assert_eq!(counted, read, "the kernel's count of (established, new) entries");
    let pinned = hairpin::entry_count::EntryCounter::open_pinned(&maps)
        .expect("the daemon pinned its counting program over its tables")
        .count()
        .expect("count the tables with the pinned program");
    assert_eq!(pinned, read, "the pinned counter's count of (established, new) entries");
    let status = cli.json(&["status", "--json"]);
    assert_eq!(status["conntrack"]["new"], json!(300), "{status:#}");
}

/// nftables users' port forwards: `import-nft` reads the gateway's live
/// ruleset (it runs `nft -j list ruleset` itself) or a saved one, imports
/// the dnat rules it can keep exactly and says why it refuses the others.
#[test]
#[ignore = "needs root"]
fn import_nft_takes_over_the_gateways_port_forwards_and_refuses_what_it_cannot_keep() {
    require_root(
        "import_nft_takes_over_the_gateways_port_forwards_and_refuses_what_it_cannot_keep",
    );
    let bed = Bed::new();
    let (seed, cli) = (&bed.seed, bed.cli());
    let ruleset = r#"table ip hp_import {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "gw-lan" ip saddr 192.168.0.0/24 ip daddr 203.0.113.1 tcp dport 80 dnat to 192.168.0.2:80
        ip daddr 203.0.113.1 udp dport 53 counter dnat to 192.168.0.2
        ip daddr 203.0.113.1 tcp dport { 25, 587 } dnat to 192.168.0.2
        fib daddr type local tcp dport 8080 dnat to 192.168.0.2:8080
        ip daddr 203.0.113.1 tcp dport 5000 dnat to 192.168.0.7-192.168.0.9:5000
        ip saddr != 10.0.0.0/8 ip daddr 203.0.113.1 tcp dport 3389 dnat to 192.168.0.2:3389
    }
}
"#;
    let file = std::env::temp_dir().join(format!("{}-ruleset.nft", seed.gateway.name()));
    std::fs::write(&file, ruleset).expect("write the ruleset");
    seed.gateway.exec("nft", &["-f", file.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&file);
    let saved = seed.gateway.exec("nft", &["-j", "list", "ruleset"]).stdout;
    let _daemon = bed.start(&[]);

    // From the live ruleset, with nothing published.
    let dry = cli.run(&["import-nft", "--dry-run"]).expect_success();
    let published: Vec<&str> =
        dry.stdout.lines().filter(|l| l.starts_with("would publish")).collect();
    assert_eq!(
        published,
        [
            "would publish tcp 203.0.113.1:80 -> 192.168.0.2:80 from 192.168.0.0/24 on gw-lan",
            "would publish udp 203.0.113.1:53 -> 192.168.0.2:53",
        ],
        "{dry}"
    );
    for reason in ["a set of ports", "the gateway's own addresses", "one server", "negations"] {
        assert!(
            dry.stdout
                .lines()
                .any(|l| l.starts_with("skipped ip hp_import prerouting rule handle ")
                    && l.contains(reason)),
            "the dry run should refuse a rule saying `{reason}`: {dry}"
        );
    }
    assert_eq!(cli.json(&["mapping", "list", "--json"]), json!([]), "a dry run publishes nothing");

    // netfilter must not do the work behind hairpin's back.
    seed.gateway.exec("nft", &["delete", "table", "ip", "hp_import"]);
    assert_refused(&seed.client, HTTP_PORT, "with neither the nft rule nor a mapping");
    let imported = cli.run_with_stdin(&["import-nft", "-"], &saved).expect_success();
    assert!(
        imported
            .stdout
            .lines()
            .any(|l| l
                == "published tcp 203.0.113.1:80 -> 192.168.0.2:80 from 192.168.0.0/24 on gw-lan"),
        "{imported}"
    );
    let listed = cli.json(&["mapping", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_hairpinned(&seed.client, HTTP_PORT, "after the import");
    assert!(
        get_forwarded(seed, HTTP_PORT).is_err(),
        "a WAN host outside the rule's `ip saddr` and `iifname` was forwarded"
    );
}

/// `stats` races an instance that stops: the counting program is loaded
/// over the pins, and a pin gone since the maps were opened must not be
/// replaced by a new, empty table pinned in the instance's place.
#[test]
#[ignore = "needs root"]
fn counting_never_pins_a_table_of_its_own_where_the_instance_removed_one() {
    use hairpin::{datapath::PinDir, entry_count::EntryCounter, maps::Maps};

    require_root("counting_never_pins_a_table_of_its_own_where_the_instance_removed_one");
    let bed = SeedBed::new();
    let daemon = Daemon::start(&bed.gateway, &bed.config(&[HTTP]));
    let cli = Cli::new(&bed.gateway);
    let dir = PinDir(cli.pin_dir().to_path_buf()).maps();
    let maps = Maps::open_pinned(&dir).expect("the instance's pinned maps");
    EntryCounter::load(&maps).expect("the counting program loads over the live pins");
    let pin = dir.join(hairpin_common::maps::names::CONNTRACK_NEW);
    std::fs::remove_file(&pin).expect("remove one table's pin, as a stopping instance does");
    let refused = EntryCounter::load(&maps).err();
    assert!(
        matches!(refused, Some(hairpin::entry_count::CountError::TableGone(_))),
        "the counter must refuse a table that is not the instance's: {refused:?}"
    );
    assert!(!pin.exists(), "the counter left a table of its own pinned at {}", pin.display());
    let counter = PinDir(cli.pin_dir().to_path_buf()).counter();
    assert!(counter.exists(), "the daemon pins its counting program at {}", counter.display());
    daemon.stop();
    assert!(
        !counter.exists(),
        "a stopped daemon leaves its counter pinned at {}",
        counter.display()
    );
}
