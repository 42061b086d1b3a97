//! Tiny servers and clients run on threads inside a bed's namespaces.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
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
                socket
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buf = [0u8; 2048];
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
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("servers did not start");
        }
        Self {
            stop,
            threads: vec![tcp, udp],
        }
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
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
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
    let path = path.to_string();
    netns.run_in(move || {
        let mut stream = TcpStream::connect_timeout(&server, timeout)?;
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
    })
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
        let mut buf = [0u8; 2048];
        let len = socket.recv(&mut buf)?;
        Ok(buf[..len].to_vec())
    })
}
