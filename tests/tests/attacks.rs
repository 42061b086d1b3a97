//! Attacks on the datapath end to end (issue 9), on the seed's bed with the
//! real `hairpin run`: hand-made frames from the WAN and the LAN (an
//! `AF_PACKET` socket on the attacker's interface), captures of what the
//! server and the clients really received, and the daemon's own view
//! (`stats --json`, `conntrack list --json`).

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use hairpin_tests::{
    Netns,
    apps::{Servers, TcpEcho, connected_udp, echo_round_trip, tcp_connect},
    capture::{Capture, Captured},
    cli::Cli,
    daemon::Daemon,
    raw::PacketSocket,
    require_root,
    seed::{CLIENT, ConfigOptions, GATEWAY_LAN, GATEWAY_WAN_IF, PUBLIC, SERVER, SeedBed, WAN_HOST},
};
use serde_json::Value;

const HTTP_PORT: u16 = 80;
const UDP_PUBLIC_PORT: u16 = 53;
const UDP_SERVER_PORT: u16 = 5353;
const ECHO_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_secs(3);

const HTTP: (&str, &str, &str) = ("tcp", "203.0.113.1:80", "192.168.0.2:80");
const UDP: (&str, &str, &str) = ("udp", "203.0.113.1:53", "192.168.0.2:5353");
const ECHO: (&str, &str, &str) = ("tcp", "203.0.113.1:7000", "192.168.0.2:7000");

/// The network spoofed WAN sources come from; the gateway routes it to the
/// WAN host, which drops what it gets for it (it does not forward).
const SPOOFED_WAN_NETWORK: &str = "198.51.100.0/24";

fn public(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(PUBLIC, port)
}

/// The seed's bed with its HTTP and UDP echo servers and a TCP echo server
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

    fn start(&self, options: &ConfigOptions) -> Daemon {
        self.start_with(&[HTTP, UDP, ECHO], options)
    }

    fn start_with(&self, mappings: &[(&str, &str, &str)], options: &ConfigOptions) -> Daemon {
        Daemon::start(&self.seed.gateway, &self.seed.config_with(mappings, options))
    }

    fn cli(&self) -> Cli<'_> {
        Cli::new(&self.seed.gateway)
    }

    /// Sends hand-made frames from the WAN host onto the gateway's WAN
    /// interface: what any host on the WAN side can put there.
    fn wan_injector(&self) -> Injector {
        Injector {
            socket: PacketSocket::open(&self.seed.wan, "eth0"),
            from_mac: self.seed.wan.mac("eth0"),
            to_mac: self.seed.gateway.mac(GATEWAY_WAN_IF),
        }
    }

    /// Replies to the spoofed WAN sources go to the WAN host (and die there),
    /// as they would go to the internet.
    fn route_spoofed_wan_network(&self) {
        self.seed.gateway.ip(&["route", "add", SPOOFED_WAN_NETWORK, "via", &WAN_HOST.to_string()]);
    }
}

/// A raw socket on an attacker's interface with the MAC addresses of its
/// link (the attacker's own, the gateway's).
struct Injector {
    socket: PacketSocket,
    from_mac: [u8; 6],
    to_mac: [u8; 6],
}

/// The TCP flags of a hand-made segment.
#[derive(Clone, Copy, Debug)]
enum Flags {
    Syn,
    Rst,
    /// ACK and PSH, with this acknowledgment number.
    Data {
        ack: u32,
    },
}

impl Injector {
    fn udp(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(self.from_mac, self.to_mac)
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut frame, payload)
            .expect("build a UDP frame");
        self.send(&frame, src, dst);
    }

    fn tcp(&self, src: SocketAddrV4, dst: SocketAddrV4, seq: u32, flags: Flags, payload: &[u8]) {
        let mut frame = Vec::new();
        let builder = PacketBuilder::ethernet2(self.from_mac, self.to_mac)
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .tcp(src.port(), dst.port(), seq, 64240);
        let builder = match flags {
            Flags::Syn => builder.syn(),
            Flags::Rst => builder.rst(),
            Flags::Data { ack } => builder.ack(ack).psh(),
        };
        builder.write(&mut frame, payload).expect("build a TCP frame");
        self.send(&frame, src, dst);
    }

    fn send(&self, frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4) {
        self.socket.send(frame).unwrap_or_else(|e| panic!("inject {src} -> {dst}: {e}"));
    }
}

/// Calls `send(index)` for each of `count` frames, at most `per_ms` of
/// them a millisecond (64 keeps the veth rings and backlogs on the way from
/// dropping most of them).
fn paced(count: u32, per_ms: u32, mut send: impl FnMut(u32)) {
    for index in 0..count {
        send(index);
        if index % per_ms == per_ms - 1 {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A spoofed WAN source: 250 addresses of [`SPOOFED_WAN_NETWORK`], then the
/// next source port.
fn spoofed_wan_source(index: u32) -> SocketAddrV4 {
    let host = 1 + (index % 250) as u8;
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, host), 20_000 + (index / 250) as u16)
}

/// A TCP or UDP packet of a captured frame.
#[derive(Debug)]
struct Segment {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    /// Sequence number and flags (SYN, FIN, RST), TCP only.
    tcp: Option<(u32, bool, bool, bool)>,
    payload: Vec<u8>,
}

impl Segment {
    fn parse(frame: &[u8]) -> Option<Self> {
        let packet = SlicedPacket::from_ethernet(frame).ok()?;
        let Some(NetSlice::Ipv4(ip)) = &packet.net else {
            return None;
        };
        let (src_addr, dst_addr) = (ip.header().source_addr(), ip.header().destination_addr());
        let (src_port, dst_port, tcp, payload) = match packet.transport? {
            TransportSlice::Udp(udp) => {
                (udp.source_port(), udp.destination_port(), None, udp.payload())
            }
            TransportSlice::Tcp(tcp) => (
                tcp.source_port(),
                tcp.destination_port(),
                Some((tcp.sequence_number(), tcp.syn(), tcp.fin(), tcp.rst())),
                tcp.payload(),
            ),
            _ => return None,
        };
        Some(Self {
            src: SocketAddrV4::new(src_addr, src_port),
            dst: SocketAddrV4::new(dst_addr, dst_port),
            tcp,
            payload: payload.to_vec(),
        })
    }

    /// How it looked on the wire, for failure messages.
    fn describe(&self) -> String {
        let tcp = self.tcp.map_or(String::new(), |(seq, syn, fin, rst)| {
            format!(" seq {seq} syn {syn} fin {fin} rst {rst}")
        });
        format!("{} -> {}{tcp}, {} bytes", self.src, self.dst, self.payload.len())
    }

    /// The sequence number after this segment (TCP only).
    fn seq_end(&self) -> Option<u32> {
        let (seq, syn, fin, _) = self.tcp?;
        Some(seq.wrapping_add(self.payload.len() as u32 + u32::from(syn) + u32::from(fin)))
    }
}

/// The TCP or UDP packets the host received (not sent), in order. ICMP
/// errors quoting a packet are not among them.
fn received(frames: &[Captured]) -> impl Iterator<Item = Segment> + '_ {
    frames.iter().filter(|f| !f.outgoing).filter_map(|f| Segment::parse(&f.frame))
}

/// Whether a received TCP or UDP packet carries `marker` in its payload.
fn carries(frames: &[Captured], marker: &str) -> bool {
    delivered(frames, marker).is_some()
}

/// The first received TCP or UDP packet that carries `marker`.
fn delivered(frames: &[Captured], marker: &str) -> Option<Segment> {
    received(frames).find(|segment| contains(&segment.payload, marker.as_bytes()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn stats(cli: &Cli) -> Value {
    cli.json(&["stats", "--json"])
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{name}` in stats --json: {stats}"))
}

/// Polls `stats --json` until the counter `name` reaches `at_least`;
/// panics, saying `what`, when it does not within `timeout`.
fn wait_for_counter(cli: &Cli, name: &str, at_least: u64, timeout: Duration, what: &str) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = stats(cli);
        if counter(&stats, name) >= at_least {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: `{name}` is {} after {timeout:?}, expected at least {at_least}: {stats}",
            counter(&stats, name)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The flow of `conntrack list --json` whose original direction is
/// `original` (`client -> public`); panics when there is not exactly one.
fn flow(cli: &Cli, original: &str) -> Value {
    let flows = cli.json(&["conntrack", "list", "--json"]);
    let matching: Vec<&Value> = flows
        .as_array()
        .unwrap_or_else(|| panic!("conntrack list --json is not an array: {flows}"))
        .iter()
        .filter(|flow| flow["original"] == original)
        .collect();
    assert_eq!(matching.len(), 1, "flows {original} in conntrack list --json: {flows}");
    matching[0].clone()
}

/// Sends `message` on a UDP socket connected to the echo server through the
/// public address; the address:port the server saw it from.
fn udp_round_trip(socket: &UdpSocket, message: &str) -> io::Result<SocketAddrV4> {
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(message.as_bytes())?;
    let mut buf = [0u8; 1500];
    let len = socket.recv(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..len]).to_string();
    reply
        .strip_suffix(&format!(" {message}"))
        .and_then(|peer| peer.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected echo of {message:?}: {reply:?}")))
}

fn local_v4(addr: io::Result<SocketAddr>) -> SocketAddrV4 {
    match addr.expect("local address") {
        SocketAddr::V4(addr) => addr,
        other => panic!("not IPv4: {other}"),
    }
}

/// The server-side source of a flow, from the `translated` field of
/// `conntrack list --json` (`192.168.0.1:P -> 192.168.0.2:S`).
fn translated_source(flow: &Value) -> SocketAddrV4 {
    let translated = flow["translated"].as_str().unwrap_or_else(|| panic!("no translated: {flow}"));
    translated
        .split(" -> ")
        .next()
        .and_then(|src| src.parse().ok())
        .unwrap_or_else(|| panic!("unexpected translated tuple in {flow}"))
}

/// A WAN host sends, to the gateway's WAN interface, packets bearing the
/// tuples of open hairpin flows (UDP and TCP): the LAN client's (client ->
/// public address) and the reply's (server -> gateway LAN address:SNAT
/// port). None may reach the server or the client (checked by captures on
/// both, against a WAN probe and the flows' own packets that must), each is
/// counted as `wrong_interface`, and the flows are untouched and go on.
#[test]
#[ignore = "needs root"]
fn a_lan_flows_tuples_injected_from_the_wan_are_never_delivered() {
    require_root("a_lan_flows_tuples_injected_from_the_wan_are_never_delivered");
    let bed = Bed::new();
    let seed = &bed.seed;
    let cli = bed.cli();
    // What the datapath passes goes to the gateway's stack, which on a real
    // gateway drops these spoofed sources (strict reverse path filter)
    // rather than answer the LAN hosts with ICMP errors about them.
    seed.gateway.sysctl("net.ipv4.conf.all.rp_filter=1");
    seed.gateway.sysctl(&format!("net.ipv4.conf.{GATEWAY_WAN_IF}.rp_filter=1"));
    let _daemon = bed.start(&ConfigOptions::default());

    let udp = connected_udp(&seed.client, public(UDP_PUBLIC_PORT).into())
        .unwrap_or_else(|e| panic!("client: UDP socket to {PUBLIC}:{UDP_PUBLIC_PORT}: {e}"));
    let udp_snat = udp_round_trip(&udp, "udp before")
        .unwrap_or_else(|e| panic!("client: UDP echo through the hairpin: {e}"));
    let udp_client = SocketAddrV4::new(CLIENT, local_v4(udp.local_addr()).port());
    assert_eq!(*udp_snat.ip(), GATEWAY_LAN, "the server should see the UDP flow SNATed");

    let mut tcp = tcp_connect(&seed.client, public(ECHO_PORT).into(), TIMEOUT)
        .unwrap_or_else(|e| panic!("client: TCP to {PUBLIC}:{ECHO_PORT}: {e}"));
    tcp.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    echo_round_trip(&mut tcp, b"tcp before").unwrap_or_else(|e| panic!("client: TCP echo: {e}"));
    let tcp_client = SocketAddrV4::new(CLIENT, local_v4(tcp.local_addr()).port());
    let tcp_original = format!("{tcp_client} -> {}", public(ECHO_PORT));
    let tcp_snat = translated_source(&flow(&cli, &tcp_original));
    let udp_original = format!("{udp_client} -> {}", public(UDP_PUBLIC_PORT));
    let udp_before = flow(&cli, &udp_original);

    let server_capture = Capture::start(&seed.server, "eth0");
    let client_capture = Capture::start(&seed.client, "eth0");
    let wrong_before = counter(&stats(&cli), "wrong_interface");
    let wan = bed.wan_injector();
    let server_udp = SocketAddrV4::new(SERVER, UDP_SERVER_PORT);
    let server_tcp = SocketAddrV4::new(SERVER, ECHO_PORT);
    let injected: [(&str, SocketAddrV4, SocketAddrV4); 4] = [
        ("INJECTED udp client tuple", udp_client, public(UDP_PUBLIC_PORT)),
        ("INJECTED udp reply tuple", server_udp, udp_snat),
        ("INJECTED tcp client tuple", tcp_client, public(ECHO_PORT)),
        ("INJECTED tcp reply tuple", server_tcp, tcp_snat),
    ];
    for (marker, src, dst) in injected {
        if marker.contains("udp") {
            wan.udp(src, dst, marker.as_bytes());
        } else {
            wan.tcp(src, dst, 1_000_000, Flags::Data { ack: 1_000_000 }, marker.as_bytes());
        }
    }
    // A port forward of the WAN host's own, sent after the injections on the
    // same path into the gateway: once the server has it, what was injected
    // before it has had its chance to arrive.
    const PROBE: &str = "PROBE from the WAN host";
    wan.udp(SocketAddrV4::new(WAN_HOST, 40_999), public(UDP_PUBLIC_PORT), PROBE.as_bytes());
    assert!(
        server_capture.wait_until(TIMEOUT, |frames| carries(frames, PROBE)),
        "the server's capture never saw the WAN host's port-forwarded probe: the capture or the bed is broken"
    );
    for (role, capture) in [("server", &server_capture), ("client", &client_capture)] {
        for (marker, src, dst) in injected {
            // The injected packets were sent first: a short wait for a
            // delivery that must not come.
            capture.wait_until(Duration::from_millis(200), |frames| carries(frames, marker));
            if let Some(segment) = delivered(&capture.frames(), marker) {
                panic!(
                    "the {role} received the packet a WAN host injected with the tuple {src} -> {dst} ({marker:?}), as {}",
                    segment.describe()
                );
            }
        }
    }

    let stats = wait_for_counter(
        &cli,
        "wrong_interface",
        wrong_before + injected.len() as u64,
        TIMEOUT,
        "each injected tuple should be counted once as arriving on the wrong interface",
    );
    println!("after the injections: {stats}");
    let udp_after = flow(&cli, &udp_original);
    for field in ["packets", "bytes", "state", "translated"] {
        assert_eq!(
            udp_after[field], udp_before[field],
            "the injected tuples moved the UDP flow's {field}: before {udp_before}, after {udp_after}"
        );
    }
    assert_eq!(flow(&cli, &tcp_original)["state"], "ESTABLISHED", "the TCP flow's state");

    let udp_snat_after = udp_round_trip(&udp, "udp after")
        .unwrap_or_else(|e| panic!("client: the UDP flow after the injections: {e}"));
    assert_eq!(udp_snat_after, udp_snat, "the UDP flow's SNAT source changed");
    echo_round_trip(&mut tcp, b"tcp after")
        .unwrap_or_else(|e| panic!("client: the TCP flow after the injections: {e}"));
    for (role, capture) in [("server", &server_capture), ("client", &client_capture)] {
        for marker in ["udp after", "tcp after"] {
            // The capture reads on a thread of its own: give it the time
            // to take in what the socket already received.
            assert!(
                capture.wait_until(TIMEOUT, |frames| carries(frames, marker)),
                "the {role}'s capture missed the flow's own {marker:?}: it would miss an injected packet too"
            );
        }
    }
}

/// A wave of spoofed WAN queries to a published UDP port, each answered
/// once by the server, then a LAN client's TCP connection through the
/// hairpin that goes idle, then a SYN flood from spoofed WAN sources: the
/// answered queries never fill the established table (a query answered once
/// is not a stream), the idle connection is in the established table and
/// still carries data both ways after the flood, and no flow was ever kept
/// out of the established table for want of room.
#[test]
#[ignore = "needs root"]
fn an_idle_connection_outlives_a_spoofed_udp_wave_and_a_syn_flood() {
    require_root("an_idle_connection_outlives_a_spoofed_udp_wave_and_a_syn_flood");
    const CAPACITY: u32 = 1024;
    const WAVE: u32 = 2 * CAPACITY;
    const FLOOD: u32 = 5 * CAPACITY;
    let bed = Bed::new();
    let seed = &bed.seed;
    let cli = bed.cli();
    bed.route_spoofed_wan_network();
    let options = ConfigOptions { conntrack_capacity: Some(CAPACITY), ..ConfigOptions::default() };
    let daemon = bed.start(&options);
    let wan = bed.wan_injector();

    let started = Instant::now();
    paced(WAVE, 64, |index| {
        let query = format!("spoofed query {index}");
        wan.udp(spoofed_wan_source(index), public(UDP_PUBLIC_PORT), query.as_bytes());
    });
    // Answered: each query's reply went back through the gateway (to the
    // WAN host, which drops it), so every flow has seen both directions.
    let after_wave = wait_for_counter(
        &cli,
        "translated_back",
        u64::from(WAVE) * 9 / 10,
        Duration::from_secs(5),
        "the server should have answered (nearly) every spoofed query",
    );
    println!("the wave of {WAVE} queries took {:?}: {after_wave}", started.elapsed());
    assert_eq!(
        counter(&after_wave, "established_entries"),
        0,
        "queries answered once entered the established table: {after_wave}"
    );

    let mut idle = tcp_connect(&seed.client, public(ECHO_PORT).into(), TIMEOUT)
        .unwrap_or_else(|e| panic!("client: TCP to {PUBLIC}:{ECHO_PORT} after the wave: {e}"));
    idle.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    echo_round_trip(&mut idle, b"before the flood")
        .unwrap_or_else(|e| panic!("the connection, before the flood: {e}"));
    let original =
        format!("{CLIENT}:{} -> {}", local_v4(idle.local_addr()).port(), public(ECHO_PORT));
    let before = flow(&cli, &original);
    assert_eq!(
        (before["state"].as_str(), before["table"].as_str()),
        (Some("ESTABLISHED"), Some("established")),
        "the connection, exchanging data, should be an established flow: {before}"
    );

    let started = Instant::now();
    paced(FLOOD, 64, |index| {
        let source = spoofed_wan_source(index);
        wan.tcp(source, public(HTTP_PORT), index.wrapping_mul(2_654_435_761), Flags::Syn, &[]);
    });
    let after_flood = wait_for_counter(
        &cli,
        "flow_created",
        counter(&after_wave, "flow_created") + u64::from(FLOOD) * 9 / 10,
        Duration::from_secs(5),
        "(nearly) every SYN of the flood should have opened a flow",
    );
    println!("the flood of {FLOOD} SYNs took {:?}: {after_flood}", started.elapsed());

    for round in 0..3 {
        echo_round_trip(&mut idle, format!("after the flood {round}").as_bytes()).unwrap_or_else(
            |e| panic!("the connection idle during the flood, exchange {round} after it: {e}"),
        );
    }
    let after = flow(&cli, &original);
    assert_eq!(after["state"], "ESTABLISHED", "the connection after the flood: {after}");
    let stats = stats(&cli);
    println!("at the end: {stats}");
    assert_eq!(counter(&stats, "established_table_full"), 0, "{stats}");
    assert_eq!(
        counter(&stats, "established_entries"),
        2,
        "only the connection's two entries belong in the established table: {stats}"
    );
    let created = counter(&stats, "flow_created");
    assert!(
        counter(&stats, "new_flows_evicted") >= created.saturating_sub(u64::from(CAPACITY)),
        "{created} flows in a new-flow table of {CAPACITY} entries: the rest must have been evicted: {stats}"
    );
    drop(idle);
    daemon.stop();
}

/// Datagrams as a server received them: source and payload.
type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// Records, in arrival order, every datagram a UDP port of a namespace
/// receives (source and payload); answers none. Stopped on drop.
struct Recorder {
    records: Arc<Mutex<Datagrams>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    fn start(netns: &Netns, port: u16) -> Self {
        let socket = netns.run_in(move || UdpSocket::bind(("0.0.0.0", port)).expect("bind"));
        rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, 8 << 20)
            .unwrap_or_else(|e| panic!("SO_RCVBUFFORCE: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(20))).expect("read timeout");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (records, stop) = (records.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                        records.lock().expect("records").push((peer, buf[..len].to_vec()));
                    }
                }
            })
        };
        Self { records, stop, thread: Some(thread) }
    }

    fn len(&self) -> usize {
        self.records.lock().expect("records").len()
    }

    /// Waits until no datagram has come for `quiet` (at most `timeout`);
    /// the records.
    fn settle(&self, quiet: Duration, timeout: Duration) -> Datagrams {
        let deadline = Instant::now() + timeout;
        let (mut seen, mut since) = (self.len(), Instant::now());
        while since.elapsed() < quiet && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
            let now = self.len();
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
        }
        self.records.lock().expect("records").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `count` UDP sockets in `netns` bound to the ports from `first_port`, each
/// connected to `server`.
fn udp_sockets(netns: &Netns, first_port: u16, count: u16, server: SocketAddrV4) -> Vec<UdpSocket> {
    netns.run_in(move || {
        (0..count)
            .map(|i| {
                let socket = UdpSocket::bind(("0.0.0.0", first_port + i))
                    .unwrap_or_else(|e| panic!("bind UDP port {}: {e}", first_port + i));
                socket.connect(server).expect("connect");
                socket
            })
            .collect()
    })
}

/// Pins the calling thread to CPU 0, so that what it sends is handled in
/// the order it sent it.
fn pin_to_first_cpu() {
    let mut set = rustix::thread::CpuSet::new();
    set.set(0);
    rustix::thread::sched_setaffinity(None, &set)
        .unwrap_or_else(|e| panic!("sched_setaffinity: {e}"));
}

/// A client flow of the two-clients test: the client (`A` or `B`) and its
/// socket's index.
type ClientFlow = (char, u16);

/// One datagram of a client flow: its sequence number, its place in the
/// server's arrival order, the gateway port it came from.
type Sent = (u32, usize, u16);

/// One client flow's packets on one gateway source port, without a break:
/// from the server's record `first` to `last` (arrival order).
#[derive(Debug)]
struct Epoch {
    flow: ClientFlow,
    port: u16,
    first: usize,
    last: usize,
    packets: usize,
}

/// The epochs of each client flow: its packets in the order it sent them,
/// cut wherever the gateway source port the server saw changes.
fn epochs(records: &[(SocketAddr, Vec<u8>)]) -> Vec<Epoch> {
    let mut flows: BTreeMap<ClientFlow, Vec<Sent>> = BTreeMap::new();
    for (arrival, (peer, payload)) in records.iter().enumerate() {
        let SocketAddr::V4(peer) = peer else { panic!("not IPv4: {peer}") };
        assert_eq!(*peer.ip(), GATEWAY_LAN, "the server saw a datagram not SNATed: {peer}");
        let text = String::from_utf8_lossy(payload);
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [client, socket, seq] = fields[..] else { panic!("unexpected datagram {text:?}") };
        let client = client.chars().next().expect("client id");
        let (socket, seq) = (socket.parse().expect("socket"), seq.parse().expect("sequence"));
        flows.entry((client, socket)).or_default().push((seq, arrival, peer.port()));
    }
    let mut epochs = Vec::new();
    for (flow, mut packets) in flows {
        packets.sort_unstable();
        for (_, arrival, port) in packets {
            match epochs.last_mut() {
                Some(Epoch { flow: f, port: p, first, last, packets })
                    if *f == flow && *p == port =>
                {
                    *first = (*first).min(arrival);
                    *last = (*last).max(arrival);
                    *packets += 1;
                }
                _ => epochs.push(Epoch { flow, port, first: arrival, last: arrival, packets: 1 }),
            }
        }
    }
    epochs
}

/// Two LAN hosts (A and B) each send one-way UDP from 16 sockets to a
/// published port, SNATed to a range of 64 ports (which their own ports are
/// not in, so that every new flow gets a random one), while a SYN flood
/// from spoofed WAN sources churns the new-flow table. B starts once the
/// flood is well under way, when A's reply entries (never used: the server
/// answers nothing) are the first a table blind to partners would evict.
/// At the server every datagram names its client and socket: a stretch of
/// one flow's datagrams on a gateway port must never overlap another flow's
/// stretch on the same port. (A port may pass from one flow to another
/// when the first has ended: it then goes on from another port.)
#[test]
#[ignore = "needs root"]
fn one_gateway_port_never_carries_two_clients_flows_at_once() {
    require_root("one_gateway_port_never_carries_two_clients_flows_at_once");
    const CAPACITY: u32 = 1024;
    const FLOOD: u32 = 16 * CAPACITY;
    /// Slow enough that the table turns over in about 16 ms, 8 times the
    /// clients' period: a flow in use is not the least recently used.
    const FLOOD_PER_MS: u32 = 32;
    /// The flood's progress at which B starts: the table has turned over
    /// eight times.
    const B_STARTS: u32 = 4 * CAPACITY;
    const SOCKETS: u16 = 16;
    const FIRST_PORT: u16 = 40_000;
    const SNAT_PORTS: &str = "20000-20063";
    const RECORDER_PORT: u16 = 6000;
    let bed = Bed::new();
    let seed = &bed.seed;
    bed.route_spoofed_wan_network();
    let recorder = Recorder::start(&seed.server, RECORDER_PORT);
    let host_b = seed.add_lan_host("cli-b", Ipv4Addr::new(192, 168, 0, 4));
    let options = ConfigOptions {
        conntrack_capacity: Some(CAPACITY),
        snat_ports: Some(SNAT_PORTS.into()),
        ..ConfigOptions::default()
    };
    let daemon = bed.start_with(&[HTTP, ("udp", "203.0.113.1:6000", "192.168.0.2:6000")], &options);

    let server = public(RECORDER_PORT);
    let a = udp_sockets(&seed.client, FIRST_PORT, SOCKETS, server);
    let b = udp_sockets(&host_b, FIRST_PORT, SOCKETS, server);
    for (i, socket) in a.iter().enumerate() {
        socket.send(format!("A {i} 0").as_bytes()).expect("A's first datagram");
    }
    let opened = Instant::now() + TIMEOUT;
    while recorder.len() < usize::from(SOCKETS) {
        assert!(
            Instant::now() < opened,
            "the server got {} of A's first datagrams",
            recorder.len()
        );
        thread::sleep(Duration::from_millis(5));
    }

    let wan = bed.wan_injector();
    let progress = Arc::new(AtomicU32::new(0));
    let flood = {
        let progress = progress.clone();
        thread::spawn(move || {
            paced(FLOOD, FLOOD_PER_MS, |index| {
                let source = spoofed_wan_source(index);
                let seq = index.wrapping_mul(2_654_435_761);
                wan.tcp(source, public(HTTP_PORT), seq, Flags::Syn, &[]);
                progress.store(index + 1, Ordering::Relaxed);
            });
        })
    };
    // One thread sends for both hosts, round after round, so that the
    // order the server records is the order the datagrams were sent in.
    let sender = {
        let progress = progress.clone();
        thread::spawn(move || {
            pin_to_first_cpu();
            let (mut a_rounds, mut b_rounds, mut after_flood) = (1u32, 0u32, 0);
            while after_flood < 20 {
                let flooded = progress.load(Ordering::Relaxed);
                for i in 0..usize::from(SOCKETS) {
                    let _ = a[i].send(format!("A {i} {a_rounds}").as_bytes());
                    if flooded >= B_STARTS {
                        let _ = b[i].send(format!("B {i} {b_rounds}").as_bytes());
                    }
                }
                a_rounds += 1;
                b_rounds += u32::from(flooded >= B_STARTS);
                after_flood += u32::from(flooded == FLOOD);
                thread::sleep(Duration::from_millis(2));
            }
            (a_rounds, b_rounds)
        })
    };
    flood.join().expect("the flood thread");
    let (a_rounds, b_rounds) = sender.join().expect("the sender thread");
    let records = recorder.settle(Duration::from_millis(300), TIMEOUT);
    let counters = daemon.stop();
    println!("hairpin's counters: {counters:?}");

    let received = |client: char| {
        records.iter().filter(|(_, payload)| payload.first() == Some(&(client as u8))).count()
    };
    let (from_a, from_b) = (received('A'), received('B'));
    println!(
        "A sent {a_rounds} rounds, B {b_rounds}, of {SOCKETS} datagrams; the server got {from_a} from A, {from_b} from B"
    );
    assert!(
        b_rounds > 0 && from_b > 0,
        "B never sent or never got through: the test did not test anything"
    );
    let created = counters.get("flow_created").copied().unwrap_or(0);
    assert!(
        created >= u64::from(FLOOD / 2),
        "only {created} flows created for {FLOOD} flood SYNs: the new-flow table was not churned: {counters:?}"
    );

    let epochs = epochs(&records);
    let mut by_port: BTreeMap<u16, Vec<&Epoch>> = BTreeMap::new();
    for epoch in &epochs {
        by_port.entry(epoch.port).or_default().push(epoch);
    }
    let mut overlaps = Vec::new();
    for (port, epochs) in &by_port {
        for (i, one) in epochs.iter().enumerate() {
            for other in &epochs[i + 1..] {
                if one.flow != other.flow && one.first <= other.last && other.first <= one.last {
                    overlaps.push(format!("port {port}: {one:?} and {other:?}"));
                }
            }
        }
    }
    let moved = epochs.len().saturating_sub(2 * usize::from(SOCKETS));
    println!("{} epochs on {} gateway ports ({moved} port changes)", epochs.len(), by_port.len());
    assert!(
        overlaps.is_empty(),
        "{} times one gateway port carried two client flows at once, e.g.:\n{}",
        overlaps.len(),
        overlaps.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The sequence number the next segment of `client`'s connection to the
/// public echo port carries (the server's next expected one), from a
/// capture on the WAN host: the end of the client's last segment out.
fn next_seq(capture: &Capture, client: SocketAddrV4) -> u32 {
    let frames = capture.frames();
    frames
        .iter()
        .rev()
        .filter(|f| f.outgoing)
        .filter_map(|f| Segment::parse(&f.frame))
        // The attacker's RSTs leave through the same interface: not the
        // client's.
        .find(|segment| {
            let is_rst = segment.tcp.is_some_and(|(_, _, _, rst)| rst);
            segment.src == client && segment.dst == public(ECHO_PORT) && !is_rst
        })
        .and_then(|segment| segment.seq_end())
        .unwrap_or_else(|| panic!("the WAN host's capture has no segment of {client}"))
}

/// A port-forwarded TCP connection from the WAN host is established; an
/// attacker on the WAN side, spoofing the client's address and port onto
/// the gateway's WAN interface, sends RSTs with random sequence numbers far
/// outside the window, then one inside the window but not at the next
/// expected sequence number. Neither may end the flow: it stays ESTABLISHED
/// in `conntrack list`, data still flows both ways, and the RSTs are counted
/// as `tcp_out_of_window` and `tcp_rst_not_exact`. (Needs the datapath's
/// TCP window tracking.)
#[test]
#[ignore = "needs root"]
fn blind_resets_from_the_wan_leave_a_forwarded_connection_established() {
    require_root("blind_resets_from_the_wan_leave_a_forwarded_connection_established");
    const BLIND_RESETS: u32 = 32;
    /// Further from the next expected sequence number than any window here.
    const FAR: u32 = 1 << 24;
    let bed = Bed::new();
    let seed = &bed.seed;
    let cli = bed.cli();
    let _daemon = bed.start(&ConfigOptions::default());
    let capture = Capture::start(&seed.wan, "eth0");

    let mut stream = tcp_connect(&seed.wan, public(ECHO_PORT).into(), TIMEOUT)
        .unwrap_or_else(|e| panic!("WAN host: TCP to {PUBLIC}:{ECHO_PORT}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    echo_round_trip(&mut stream, b"before the resets")
        .unwrap_or_else(|e| panic!("the connection, before the resets: {e}"));
    let client = local_v4(stream.local_addr());
    assert_eq!(*client.ip(), WAN_HOST);
    let original = format!("{client} -> {}", public(ECHO_PORT));
    assert_eq!(flow(&cli, &original)["state"], "ESTABLISHED", "the connection before the resets");
    assert!(
        capture.wait_until(TIMEOUT, |frames| carries(frames, "before the resets")),
        "the WAN host's capture missed the echo"
    );
    let expected = next_seq(&capture, client);
    let before = stats(&cli);

    // The attacker's segments come from elsewhere on the WAN side; at the
    // gateway they are the client's tuple arriving on the WAN interface.
    let attacker = bed.wan_injector();
    let mut random = 0x9e37_79b9_u32;
    let mut sent = 0;
    while sent < BLIND_RESETS {
        random ^= random << 13;
        random ^= random >> 17;
        random ^= random << 5;
        let distance = random.wrapping_sub(expected);
        if distance < FAR || distance > FAR.wrapping_neg() {
            continue;
        }
        attacker.tcp(client, public(ECHO_PORT), random, Flags::Rst, &[]);
        sent += 1;
    }
    echo_round_trip(&mut stream, b"after the blind resets")
        .unwrap_or_else(|e| panic!("the connection, after {BLIND_RESETS} blind resets: {e}"));
    let after = flow(&cli, &original);
    assert_eq!(
        after["state"], "ESTABLISHED",
        "{BLIND_RESETS} out-of-window RSTs moved the flow out of ESTABLISHED: {after}"
    );
    wait_for_counter(
        &cli,
        "tcp_out_of_window",
        counter(&before, "tcp_out_of_window") + u64::from(BLIND_RESETS),
        TIMEOUT,
        "each out-of-window RST should be counted",
    );

    // In the window (the server's is far larger than this), not exact: the
    // endpoint is to answer it with a challenge ACK (RFC 5961 §3.2).
    let expected = next_seq(&capture, client);
    let before = stats(&cli);
    attacker.tcp(client, public(ECHO_PORT), expected.wrapping_add(1000), Flags::Rst, &[]);
    wait_for_counter(
        &cli,
        "tcp_rst_not_exact",
        counter(&before, "tcp_rst_not_exact") + 1,
        TIMEOUT,
        "the in-window RST at the wrong sequence number should be counted",
    );
    let after = flow(&cli, &original);
    assert_eq!(
        after["state"], "ESTABLISHED",
        "an in-window RST not at the expected sequence number moved the flow out of ESTABLISHED: {after}"
    );
    echo_round_trip(&mut stream, b"after the in-window reset")
        .unwrap_or_else(|e| panic!("the connection, after an in-window RST: {e}"));
}
