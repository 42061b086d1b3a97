//! What a real gateway meets besides plain segments, end to end and
//! differentially (the seed's iptables rules, then hairpin alone; see
//! `differential`): UDP datagrams fragmented both ways, fragments sent
//! last-first, IP options on an open flow, TTL 1 on a tracked flow, a
//! server behind a LAN router with a smaller MTU, and datagrams too big for
//! the LAN link without DF. Both columns must end the same way, and with
//! hairpin no packet of the flows may reach the kernel's stack.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use etherparse::PacketBuilder;
use hairpin_tests::{
    Netns,
    apps::{connected_udp, set_ip_option, udp_echo},
    capture::{Capture, Captured},
    differential::{Bed, Nat, counter, public},
    raw::{PacketSocket, fix_ipv4_checksum, ipv4_fragments},
    require_root,
    seed::{CLIENT, DatapathCase, GATEWAY_LAN, GATEWAY_LAN_IF, GATEWAY_WAN_IF, PUBLIC, WAN_HOST},
    veth,
};
use rstest::rstest;

/// The native XDP bed, native XDP.
const XDP_BED: DatapathCase = DatapathCase::Xdp;
/// The container-host bed, `attach = "auto"` when hairpin is the NAT.
const CONTAINER: DatapathCase = DatapathCase::AutoContainer;

const UDP_PORT: u16 = 53;
const MAPPINGS: &[(&str, &str, &str)] =
    &[("tcp", "203.0.113.1:80", "192.168.0.2:80"), ("udp", "203.0.113.1:53", "192.168.0.2:5353")];
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
enum Sender {
    /// The LAN client, through the hairpin.
    LanClient,
    /// The WAN host, through the port forward.
    WanHost,
}

impl Sender {
    fn netns(self, bed: &Bed) -> &Netns {
        match self {
            Sender::LanClient => &bed.seed.client,
            Sender::WanHost => &bed.seed.wan,
        }
    }

    fn addr(self) -> Ipv4Addr {
        match self {
            Sender::LanClient => CLIENT,
            Sender::WanHost => WAN_HOST,
        }
    }

    /// The gateway's interface facing the sender.
    fn gateway_interface(self) -> &'static str {
        match self {
            Sender::LanClient => GATEWAY_LAN_IF,
            Sender::WanHost => GATEWAY_WAN_IF,
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8).collect()
}

/// The echo server answers "PEER PAYLOAD": the payload must come back whole.
fn assert_echoed(reply: &[u8], payload: &[u8], what: &str) {
    assert!(
        reply.len() > payload.len() && reply.ends_with(payload),
        "{what}: the echo lost or damaged the payload ({} bytes back for {})",
        reply.len(),
        payload.len()
    );
}

#[rstest]
#[case::iptables_hairpin_3000(Nat::Iptables, Sender::LanClient, 3000, XDP_BED)]
#[case::iptables_hairpin_8000(Nat::Iptables, Sender::LanClient, 8000, XDP_BED)]
#[case::iptables_forward_3000(Nat::Iptables, Sender::WanHost, 3000, XDP_BED)]
#[case::hairpin_hairpin_3000(Nat::Hairpin, Sender::LanClient, 3000, XDP_BED)]
#[case::hairpin_hairpin_8000(Nat::Hairpin, Sender::LanClient, 8000, XDP_BED)]
#[case::hairpin_forward_3000(Nat::Hairpin, Sender::WanHost, 3000, XDP_BED)]
#[case::iptables_container_hairpin_4000(Nat::Iptables, Sender::LanClient, 4000, CONTAINER)]
#[case::iptables_container_forward_4000(Nat::Iptables, Sender::WanHost, 4000, CONTAINER)]
#[case::hairpin_container_hairpin_4000(Nat::Hairpin, Sender::LanClient, 4000, CONTAINER)]
#[case::hairpin_container_forward_4000(Nat::Hairpin, Sender::WanHost, 4000, CONTAINER)]
#[ignore = "needs root"]
fn large_udp_is_echoed_fragmented_both_ways(
    #[case] nat: Nat,
    #[case] sender: Sender,
    #[case] len: usize,
    #[case] case: DatapathCase,
) {
    require_root("large_udp_is_echoed_fragmented_both_ways");
    let mut bed = Bed::on(nat, case);
    bed.start_nat(MAPPINGS, None);
    let payload = pattern(len);
    let reply = udp_echo(sender.netns(&bed), public(UDP_PORT), &payload, TIMEOUT)
        .unwrap_or_else(|e| panic!("{sender:?}: {len}-byte UDP echo failed ({nat:?}): {e}"));
    assert_echoed(&reply, &payload, &format!("{sender:?}, {len} bytes ({nat:?})"));
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        // Both ways: the datagram and its echo, at MTU 1500.
        let later_fragments = 2 * (len / 1480) as u64;
        assert!(
            counter(&counters, "fragment_translated") >= later_fragments,
            "the later fragments should be translated by the fragment table: {counters:?}"
        );
    }
}

/// A UDP datagram from `src` to `dst` as a frame from `src_mac` to
/// `dst_mac`, cut into fragments of 1480 bytes, last first.
fn fragments_last_first(
    (src, dst): (SocketAddrV4, SocketAddrV4),
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    payload: &[u8],
) -> Vec<Vec<u8>> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut frame, payload)
        .expect("build the datagram");
    // A fixed IP ID, DF clear: a datagram the sender fragmented itself.
    frame[18..22].copy_from_slice(&[0x5a, 0x5a, 0, 0]);
    fix_ipv4_checksum(&mut frame);
    let mut fragments = ipv4_fragments(&frame, 1480);
    fragments.reverse();
    fragments
}

#[rstest]
#[case::iptables_hairpin(Nat::Iptables, Sender::LanClient)]
#[case::iptables_forward(Nat::Iptables, Sender::WanHost)]
#[case::hairpin_hairpin(Nat::Hairpin, Sender::LanClient)]
#[case::hairpin_forward(Nat::Hairpin, Sender::WanHost)]
#[ignore = "needs root"]
fn fragments_sent_last_first_are_delivered(#[case] nat: Nat, #[case] sender: Sender) {
    require_root("fragments_sent_last_first_are_delivered");
    let mut bed = Bed::new(nat);
    bed.start_nat(MAPPINGS, None);
    let from = sender.netns(&bed);
    let socket = from
        .run_in(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap_or_else(|e| panic!("{sender:?}: bind: {e}"));
    socket.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let port = socket.local_addr().expect("local address").port();
    let payload = pattern(4000);
    let fragments = fragments_last_first(
        (SocketAddrV4::new(sender.addr(), port), SocketAddrV4::new(PUBLIC, UDP_PORT)),
        from.mac("eth0"),
        bed.seed.gateway.mac(sender.gateway_interface()),
        &payload,
    );
    assert_eq!(fragments.len(), 3);
    let raw = PacketSocket::open(from, "eth0");
    for fragment in &fragments {
        raw.send(fragment).unwrap_or_else(|e| panic!("{sender:?}: send a fragment: {e}"));
    }
    let mut buf = vec![0u8; 65536];
    let (len, peer) = match socket.recv_from(&mut buf) {
        Ok(received) => received,
        Err(e) => {
            let counters = bed.finish();
            panic!("{sender:?}: no echo of the last-first datagram ({nat:?}): {e}; {counters:?}")
        }
    };
    assert_eq!(peer, public(UDP_PORT), "the echo comes from the public address ({nat:?})");
    assert_echoed(&buf[..len], &payload, &format!("{sender:?} last-first ({nat:?})"));
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        assert_eq!(counter(&counters, "fragment_held"), 2, "{counters:?}");
        assert_eq!(counter(&counters, "fragment_released"), 2, "{counters:?}");
    }
}

/// Where a datagram of no flow goes: a service of the gateway's own (on its
/// LAN address: the probes count any fragment to the public address), or a
/// WAN host the kernel routes to.
#[derive(Clone, Copy, Debug)]
enum Unmapped {
    GatewayService,
    WanHost,
}

/// Fragments of no flow reach where they are going whatever their order:
/// in order they pass through XDP untouched; last-first, those that may be
/// a flow's (to the gateway's address) are held until the first says the
/// datagram is no flow's, then handed to the kernel as they came, and the
/// others pass as they come. A big ping as well.
#[rstest]
#[case::iptables_gateway(Nat::Iptables, Unmapped::GatewayService)]
#[case::iptables_wan(Nat::Iptables, Unmapped::WanHost)]
#[case::hairpin_gateway(Nat::Hairpin, Unmapped::GatewayService)]
#[case::hairpin_wan(Nat::Hairpin, Unmapped::WanHost)]
#[ignore = "needs root"]
fn fragments_of_no_flow_reach_their_destination_in_any_order(
    #[case] nat: Nat,
    #[case] to: Unmapped,
) {
    require_root("fragments_of_no_flow_reach_their_destination_in_any_order");
    const PORT: u16 = 6000;
    let mut bed = Bed::new(nat);
    let (host, dst) = match to {
        Unmapped::GatewayService => (&bed.seed.gateway, GATEWAY_LAN),
        Unmapped::WanHost => (&bed.seed.wan, WAN_HOST),
    };
    bed.seed.wan.ip(&["route", "add", "192.168.0.0/24", "via", &PUBLIC.to_string()]);
    // Bound to its address, so that it answers from the address it was sent to.
    let echo = host
        .run_in(move || UdpSocket::bind((dst, PORT)))
        .unwrap_or_else(|e| panic!("{to:?}: bind the echo: {e}"));
    echo.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for _ in 0..2 {
            let (len, peer) = echo.recv_from(&mut buf)?;
            let mut reply = b"echo ".to_vec();
            reply.extend_from_slice(&buf[..len]);
            echo.send_to(&reply, peer)?;
        }
        io::Result::Ok(())
    });
    bed.start_nat(MAPPINGS, None);
    let client = &bed.seed.client;
    // A flow of the mappings too: the probes must see it with iptables.
    let mapped = udp_echo(client, public(UDP_PORT), b"mapped", TIMEOUT)
        .unwrap_or_else(|e| panic!("the mapped service ({nat:?}): {e}"));
    assert_echoed(&mapped, b"mapped", "mapped");
    let payload = pattern(4000);
    let reply = udp_echo(client, SocketAddrV4::new(dst, PORT).into(), &payload, TIMEOUT)
        .unwrap_or_else(|e| panic!("{to:?}: fragmented datagram in order ({nat:?}): {e}"));
    assert_echoed(&reply, &payload, &format!("{to:?} in order ({nat:?})"));

    let socket = client.run_in(|| UdpSocket::bind("0.0.0.0:0")).expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let port = socket.local_addr().expect("local address").port();
    let fragments = fragments_last_first(
        (SocketAddrV4::new(CLIENT, port), SocketAddrV4::new(dst, PORT)),
        client.mac("eth0"),
        bed.seed.gateway.mac(GATEWAY_LAN_IF),
        &payload,
    );
    let raw = PacketSocket::open(client, "eth0");
    for fragment in &fragments {
        raw.send(fragment).expect("send a fragment");
    }
    let mut buf = vec![0u8; 65536];
    let len = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{to:?}: fragmented datagram last-first ({nat:?}): {e}"));
    assert_echoed(&buf[..len], &payload, &format!("{to:?} last-first ({nat:?})"));
    echo.join().expect("echo thread").unwrap_or_else(|e| panic!("{to:?}: the echo: {e}"));

    let ping = client.try_exec("ping", &["-c", "1", "-W", "3", "-s", "3000", &dst.to_string()]);
    assert!(
        ping.status.success(),
        "{to:?}: a 3000-byte ping ({nat:?}): {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        // To the gateway's address the datagram may be a hairpin's reply:
        // held, then released to the kernel; transit is passed as it comes.
        let released = match to {
            Unmapped::GatewayService => 2,
            Unmapped::WanHost => 0,
        };
        assert_eq!(counter(&counters, "fragment_released"), released, "{counters:?}");
        assert_eq!(counter(&counters, "fragment_translated"), 0, "{counters:?}");
    }
}

#[rstest]
#[case::iptables(Nat::Iptables)]
#[case::hairpin(Nat::Hairpin)]
#[ignore = "needs root"]
fn ip_options_on_an_open_flow_are_carried(#[case] nat: Nat) {
    require_root("ip_options_on_an_open_flow_are_carried");
    let mut bed = Bed::new(nat);
    bed.start_nat(MAPPINGS, None);
    let socket = connected_udp(&bed.seed.client, public(UDP_PORT)).expect("connected socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut buf = [0u8; 2048];
    socket.send(b"plain").expect("send");
    let len = socket.recv(&mut buf).unwrap_or_else(|e| panic!("plain echo ({nat:?}): {e}"));
    assert_echoed(&buf[..len], b"plain", "plain");
    // Three NOPs and the end of the list: the smallest options there are.
    set_ip_option(&socket, libc::IPPROTO_IP, libc::IP_OPTIONS, &[1, 1, 1, 0]);
    socket.send(b"with options").expect("send");
    let len = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("a datagram with IP options on the open flow ({nat:?}): {e}"));
    assert_echoed(&buf[..len], b"with options", "with options");
    bed.finish();
}

/// An ICMP message in a captured frame: (source, type, code, bytes 4..8).
fn icmp_of(captured: &Captured) -> Option<(Ipv4Addr, u8, u8, [u8; 4])> {
    let frame = &captured.frame;
    if captured.outgoing || frame.len() < 42 || frame[12..14] != [8, 0] || frame[23] != 1 {
        return None;
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let icmp = frame.get(14 + ihl..14 + ihl + 8)?;
    let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    Some((src, icmp[0], icmp[1], icmp[4..8].try_into().ok()?))
}

#[rstest]
#[case::iptables_hairpin(Nat::Iptables, Sender::LanClient)]
#[case::iptables_forward(Nat::Iptables, Sender::WanHost)]
#[case::hairpin_hairpin(Nat::Hairpin, Sender::LanClient)]
#[case::hairpin_forward(Nat::Hairpin, Sender::WanHost)]
#[ignore = "needs root"]
fn ttl_one_on_a_tracked_flow_is_answered_time_exceeded(#[case] nat: Nat, #[case] sender: Sender) {
    require_root("ttl_one_on_a_tracked_flow_is_answered_time_exceeded");
    let mut bed = Bed::new(nat);
    bed.start_nat(MAPPINGS, None);
    let from = sender.netns(&bed);
    let socket = connected_udp(from, public(UDP_PORT)).expect("connected socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut buf = [0u8; 2048];
    socket.send(b"first").expect("send");
    let len = socket.recv(&mut buf).unwrap_or_else(|e| panic!("{sender:?}: first echo: {e}"));
    assert_echoed(&buf[..len], b"first", "first");

    let capture = Capture::start(from, "eth0");
    set_ip_option(&socket, libc::IPPROTO_IP, libc::IP_RECVERR, &1i32.to_ne_bytes());
    set_ip_option(&socket, libc::IPPROTO_IP, libc::IP_TTL, &1i32.to_ne_bytes());
    // The kernel rate-limits its ICMP errors per destination, and on the
    // hairpin it has just sent the client a redirect: netfilter's answer
    // may take a second try, a second later.
    socket.set_read_timeout(Some(Duration::from_millis(1200))).expect("read timeout");
    let mut outcome = Vec::new();
    let answered = (0..3).any(|_| {
        socket.send(b"expiring").expect("send");
        loop {
            match socket.recv(&mut buf) {
                Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => {
                    outcome.push(format!("{other:?}"));
                    return false;
                }
            }
        }
    });
    if !answered {
        let icmp: Vec<_> = capture.frames().iter().filter_map(icmp_of).collect();
        let sent = bed.seed.gateway.snmp("Icmp", "OutTimeExcds");
        panic!(
            "{sender:?}: no EHOSTUNREACH from time exceeded ({nat:?}): {outcome:?}; ICMP received: {icmp:?}; the gateway's kernel sent {sent} time exceeded"
        );
    }
    let time_exceeded = |frames: &[Captured]| {
        frames.iter().filter_map(icmp_of).find(|(_, icmp_type, ..)| *icmp_type == 11)
    };
    assert!(capture.wait_until(TIMEOUT, |frames| time_exceeded(frames).is_some()));
    let (src, _, code, _) = time_exceeded(&capture.frames()).expect("time exceeded");
    assert_eq!(code, 0, "in transit");
    assert_eq!(src, PUBLIC, "{sender:?}: from the address the sender used ({nat:?})");
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        assert_eq!(counter(&counters, "time_exceeded_sent"), 1, "{counters:?}");
    }
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 254);
const FAR_SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const FAR_PORT: u16 = 8000;
const FAR_MTU: u32 = 1280;
const UPLOAD_LEN: usize = 1 << 20;

/// Accepts one connection and answers it with how many bytes it read
/// before the client shut its side down.
fn count_one_upload(listener: TcpListener) -> io::Result<()> {
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_be_bytes())
}

/// A WAN host uploads to a server behind a LAN router whose far side has
/// MTU 1280 (the server's own link 1500, so it announces MSS 1460): the
/// router answers "fragmentation needed", which must reach the WAN host
/// from the public address (RFC 5508 REQ-5c), and the upload completes.
#[rstest]
#[case::iptables(Nat::Iptables)]
#[case::hairpin(Nat::Hairpin)]
#[ignore = "needs root"]
fn a_server_behind_a_lan_router_with_a_smaller_mtu(#[case] nat: Nat) {
    require_root("a_server_behind_a_lan_router_with_a_smaller_mtu");
    let mut bed = Bed::new(nat);
    let router = bed.seed.add_lan_host("rtr", ROUTER);
    let far = Netns::new("far");
    veth(&far, "eth0", &router, "eth1");
    router.ip(&["addr", "add", "10.1.0.1/24", "dev", "eth1"]);
    router.ip(&["link", "set", "eth1", "mtu", &FAR_MTU.to_string()]);
    router.sysctl("net.ipv4.ip_forward=1");
    far.ip(&["addr", "add", &format!("{FAR_SERVER}/24"), "dev", "eth0"]);
    far.ip(&["route", "add", "default", "via", "10.1.0.1"]);
    far.exec("ethtool", &["-K", "eth0", "tx", "off"]);
    bed.seed.gateway.ip(&["route", "add", "10.1.0.0/24", "via", &ROUTER.to_string()]);
    let listener =
        far.run_in(|| TcpListener::bind(("0.0.0.0", FAR_PORT))).expect("listen on the far server");
    let server = std::thread::spawn(move || count_one_upload(listener));
    let mappings = [("tcp", "203.0.113.1:8000", "10.1.0.2:8000")];
    bed.start_nat(&mappings, None);

    let capture = Capture::start(&bed.seed.wan, "eth0");
    let target = public(FAR_PORT);
    let uploaded = bed.seed.wan.run_in(move || -> io::Result<u64> {
        let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(&vec![0x42; UPLOAD_LEN])?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        Ok(u64::from_be_bytes(count))
    });
    let uploaded =
        uploaded.unwrap_or_else(|e| panic!("1 MiB upload to the far server ({nat:?}): {e}"));
    assert_eq!(uploaded, UPLOAD_LEN as u64, "the server read the whole upload ({nat:?})");
    server.join().expect("server thread").expect("the far server");

    let frag_needed: Vec<(Ipv4Addr, u16)> = capture
        .frames()
        .iter()
        .filter_map(icmp_of)
        .filter(|(_, icmp_type, code, _)| (*icmp_type, *code) == (3, 4))
        .map(|(src, _, _, rest)| (src, u16::from_be_bytes([rest[2], rest[3]])))
        .collect();
    assert!(!frag_needed.is_empty(), "no fragmentation needed reached the WAN host ({nat:?})");
    for (src, mtu) in &frag_needed {
        assert_eq!(*src, PUBLIC, "fragmentation needed from the public address ({nat:?})");
        assert_eq!(*mtu, FAR_MTU as u16, "the router's next-hop MTU ({nat:?})");
    }
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        assert!(counter(&counters, "icmp_translated") >= 1, "{counters:?}");
    }
}

/// The LAN link is smaller than the WAN's (1400): a WAN host's datagram of
/// 1500 bytes without DF must be fragmented on its way to the server, and
/// one of 3000 (fragmented at 1500 by the WAN host) fragmented again; their
/// echoes (fragmented by the server) come back. On the container host the
/// WAN host leaves the 1500-byte datagram's checksum to offload, which TC
/// cannot cut: the kernel does, after hairpin translated it.
#[rstest]
#[case::iptables_1500(Nat::Iptables, 1472, XDP_BED)]
#[case::iptables_3000(Nat::Iptables, 3000, XDP_BED)]
#[case::hairpin_1500(Nat::Hairpin, 1472, XDP_BED)]
#[case::hairpin_3000(Nat::Hairpin, 3000, XDP_BED)]
#[case::iptables_container_1500(Nat::Iptables, 1472, CONTAINER)]
#[case::hairpin_container_1500(Nat::Hairpin, 1472, CONTAINER)]
#[case::hairpin_container_3000(Nat::Hairpin, 3000, CONTAINER)]
#[ignore = "needs root"]
fn a_datagram_too_big_for_the_lan_without_df_is_fragmented(
    #[case] nat: Nat,
    #[case] len: usize,
    #[case] case: DatapathCase,
) {
    require_root("a_datagram_too_big_for_the_lan_without_df_is_fragmented");
    const LAN_MTU: &str = "1400";
    let mut bed = Bed::on(nat, case);
    bed.seed.gateway.ip(&["link", "set", GATEWAY_LAN_IF, "mtu", LAN_MTU]);
    bed.seed.server.ip(&["link", "set", "eth0", "mtu", LAN_MTU]);
    bed.start_nat(MAPPINGS, None);
    let payload = pattern(len);
    let target = public(UDP_PORT);
    let echoed = bed.seed.wan.run_in(|| -> io::Result<Vec<u8>> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.connect(target)?;
        set_ip_option(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &libc::IP_PMTUDISC_DONT.to_ne_bytes(),
        );
        socket.send(&payload)?;
        let mut buf = vec![0u8; 65536];
        let len = socket.recv(&mut buf)?;
        Ok(buf[..len].to_vec())
    });
    let echoed = match echoed {
        Ok(echoed) => echoed,
        Err(e) => {
            let counters = bed.finish();
            panic!("{len}-byte datagram without DF ({nat:?}): {e}; {counters:?}")
        }
    };
    assert_echoed(&echoed, &payload, &format!("too big without DF ({nat:?})"));
    let counters = bed.finish();
    if nat == Nat::Hairpin {
        // The datagram, or each of its full-size fragments (1480 bytes of
        // UDP header and payload each); a whole datagram of a local sender
        // on the container host by the kernel.
        let cut = ((len + 8) / 1480) as u64;
        let (by_tc, by_kernel) = match case {
            DatapathCase::Xdp => (cut, 0),
            _ if len + 28 <= 1500 => (0, 1),
            _ => (cut, 0),
        };
        assert_eq!(counter(&counters, "packet_fragmented"), by_tc, "{counters:?}");
        assert_eq!(counter(&counters, "fragmented_by_kernel"), by_kernel, "{counters:?}");
    }
}

const BIG_REPLY_PUBLIC_PORT: u16 = 54;
const BIG_REPLY_SERVER_PORT: u16 = 5454;
const BIG_REPLY_LEN: usize = 1472;

/// A UDP server that answers every datagram with `BIG_REPLY_LEN` bytes
/// sent without DF (`IP_PMTUDISC_DONT`, as DNS servers do), until `stop`.
fn serve_big_replies(server: &Netns, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    server.spawn(move || {
        let socket = UdpSocket::bind(("0.0.0.0", BIG_REPLY_SERVER_PORT)).expect("bind");
        set_ip_option(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &libc::IP_PMTUDISC_DONT.to_ne_bytes(),
        );
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        ready_tx.send(()).expect("ready");
        let reply = pattern(BIG_REPLY_LEN);
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&reply, peer);
            }
        }
    });
    ready_rx.recv_timeout(TIMEOUT).expect("big-reply server ready");
}

/// A server's reply without DF too big for the WAN link: netfilter's
/// kernel cuts it. hairpin cuts it in TC when its checksum is complete (the
/// native XDP bed); on the container host the server leaves it to offload,
/// which neither TC nor the kernel's forwarding (the translated source is
/// the gateway's own) can cut: hairpin answers "fragmentation needed", the
/// server cuts its next reply itself, and the WAN host's retry gets it.
#[rstest]
#[case::iptables(Nat::Iptables, XDP_BED)]
#[case::hairpin(Nat::Hairpin, XDP_BED)]
#[case::iptables_container(Nat::Iptables, CONTAINER)]
#[case::hairpin_container(Nat::Hairpin, CONTAINER)]
#[ignore = "needs root"]
fn a_reply_too_big_for_the_wan_without_df_gets_through(
    #[case] nat: Nat,
    #[case] case: DatapathCase,
) {
    require_root("a_reply_too_big_for_the_wan_without_df_gets_through");
    const WAN_MTU: &str = "1400";
    let mut bed = Bed::on(nat, case);
    bed.seed.gateway.ip(&["link", "set", GATEWAY_WAN_IF, "mtu", WAN_MTU]);
    bed.seed.wan.ip(&["link", "set", "eth0", "mtu", WAN_MTU]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    serve_big_replies(&bed.seed.server, stop.clone());
    let public_big = format!("{PUBLIC}:{BIG_REPLY_PUBLIC_PORT}");
    let server_big = format!("192.168.0.2:{BIG_REPLY_SERVER_PORT}");
    let mappings = [MAPPINGS[0], MAPPINGS[1], ("udp", public_big.as_str(), server_big.as_str())];
    bed.start_nat(&mappings, None);
    let socket = connected_udp(&bed.seed.wan, public(BIG_REPLY_PUBLIC_PORT)).expect("socket");
    socket.set_read_timeout(Some(Duration::from_secs(1))).expect("read timeout");
    let mut buf = [0u8; 4096];
    let mut tries = 0;
    let reply = loop {
        tries += 1;
        socket.send(b"query").expect("send");
        match socket.recv(&mut buf) {
            Ok(len) => break buf[..len].to_vec(),
            Err(e) if tries < 3 => println!("try {tries}: {e}"),
            Err(e) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let counters = bed.finish();
                panic!("no reply in {tries} tries ({nat:?}, {case:?}): {e}; {counters:?}")
            }
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        reply == pattern(BIG_REPLY_LEN),
        "big reply ({nat:?}, {case:?}): {} bytes back for {BIG_REPLY_LEN}, or damaged",
        reply.len()
    );
    let counters = bed.finish();
    match (nat, case) {
        (Nat::Iptables, _) => assert_eq!(tries, 1, "the kernel cuts the first reply"),
        (Nat::Hairpin, DatapathCase::Xdp) => {
            assert_eq!(tries, 1, "TC cuts the first reply: {counters:?}");
            assert_eq!(counter(&counters, "packet_fragmented"), 1, "{counters:?}");
        }
        (Nat::Hairpin, _) => {
            assert_eq!(tries, 2, "the server cuts its second reply: {counters:?}");
            assert_eq!(counter(&counters, "too_big_not_cut"), 1, "{counters:?}");
            assert_eq!(counter(&counters, "frag_needed_sent"), 1, "{counters:?}");
        }
    }
}
