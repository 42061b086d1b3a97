//! Tiny servers and clients run on threads inside a bed's namespaces.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::Netns;

/// The body `GET /big` answers with: `len` bytes of a fixed pattern.
pub fn big_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

pub const BIG_LEN: usize = 1 << 20;

/// An HTTP server on TCP `port` and a UDP echo server on `udp_port`, in a
/// namespace. `GET /` answers `hello <peer address>`, `GET /big` 1 MiB.
/// UDP datagrams come back prefixed with the peer address as the server saw
/// it. Stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(netns: &Netns, port: u16, udp_port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let tcp = {
            let stop = stop.clone();
            let ready = ready_tx.clone();
            netns.spawn(move || {
                let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind http");
                listener.set_nonblocking(true).expect("nonblocking");
                ready.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            thread::spawn(move || serve_http(stream, peer));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        let udp = {
            let stop = stop.clone();
            netns.spawn(move || {
                let socket = UdpSocket::bind(("0.0.0.0", udp_port)).expect("bind udp");
                socket.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                        let mut reply = format!("{peer} ").into_bytes();
                        reply.extend_from_slice(&buf[..len]);
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(5)).expect("servers did not start");
        }
        Self { stop, threads: vec![tcp, udp] }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_http(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = if request.starts_with(b"GET /big ") {
        big_body(BIG_LEN)
    } else {
        format!("hello {peer}\n").into_bytes()
    };
    let head =
        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

/// `GET path` from inside a namespace; the status line and body.
pub fn http_get(
    netns: &Netns,
    server: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(String, Vec<u8>)> {
    let mut stream = tcp_connect(netns, server, timeout)?;
    http_request(&mut stream, server, path, timeout)
}

/// A TCP connection opened from inside a namespace (the stream stays in
/// that namespace whichever thread uses it).
pub fn tcp_connect(netns: &Netns, server: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    netns.run_in(move || TcpStream::connect_timeout(&server, timeout))
}

/// `GET path` on an open connection to `server`; the status line and body.
/// The server closes the connection after the response.
pub fn http_request(
    stream: &mut TcpStream,
    server: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(String, Vec<u8>)> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, response[split + 4..].to_vec()))
}

/// A UDP socket in a namespace, connected to `server` (so ICMP errors about
/// what it sends come back as errors of its next receive).
pub fn connected_udp(netns: &Netns, server: SocketAddr) -> io::Result<UdpSocket> {
    netns.run_in(move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(server)?;
        Ok(socket)
    })
}

/// Sets an IP-level (or any) socket option no std or rustix call covers
/// (`IP_RECVERR`, `IP_OPTIONS`); panics if the kernel refuses it.
pub fn set_ip_option(socket: &UdpSocket, level: i32, name: i32, value: &[u8]) {
    // SAFETY: a valid socket and a buffer of the given length.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    assert_eq!(done, 0, "setsockopt {name}: {}", io::Error::last_os_error());
}

/// A TCP echo server in a namespace: every connection gets back what it
/// sends, for as long as it stays open (up to a minute idle). Stopped on
/// drop (open connections end at their idle limit).
pub struct TcpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(netns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            netns.spawn(move || {
                let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind echo");
                listener.set_nonblocking(true).expect("nonblocking");
                ready_tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            thread::spawn(move || echo(stream));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("echo server did not start");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends back every byte received, at once, until the peer closes or is
/// silent for a minute.
pub fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `payload` to a UDP echo server from inside a namespace; the reply.
pub fn udp_echo(
    netns: &Netns,
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let payload = payload.to_vec();
    netns.run_in(move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(server)?;
        socket.send(&payload)?;
        let mut buf = vec![0u8; 65536];
        let len = socket.recv(&mut buf)?;
        Ok(buf[..len].to_vec())
    })
}

/// Sends `message` on a connection to a TCP echo server and expects it back
/// whole.
pub fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != message {
        return Err(io::Error::other(format!(
            "sent {:?}, echoed {:?}",
            String::from_utf8_lossy(message),
            String::from_utf8_lossy(&echoed)
        )));
    }
    Ok(())
}
