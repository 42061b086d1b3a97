//! TCP through the gateway: bulk throughput (iperf3) and request/response
//! rates (one byte each way on one connection, and a new connection per
//! request), on the routed bed.

use std::{
    any::Any,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hairpin_tests::Netns;

use crate::{
    beds::{Bed, BedKind, Gateway, PUBLIC, SERVER, TCP_BULK_PORT, TCP_CRR_PORT, TCP_RR_PORT},
    stats::median,
};

/// Child processes started here (iperf3 servers), for the interrupt handler.
pub static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills the processes started here (from the interrupt handler).
pub fn kill_children() {
    for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A process stopped and reaped on drop.
struct Process(Child);

impl Process {
    fn spawn(mut command: std::process::Command) -> anyhow::Result<Self> {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(child.id());
        Ok(Self(child))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let pid = self.0.id();
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != pid);
    }
}

/// The servers of the TCP tests in the server's namespace; stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _iperf3: Process,
}

impl Servers {
    fn start(server: &Netns) -> anyhow::Result<Self> {
        let mut iperf3 = server.command("iperf3");
        iperf3.args(["-s", "-p", &TCP_BULK_PORT.to_string()]);
        let iperf3 = Process::spawn(iperf3)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (port, per_connection_thread) in [(TCP_RR_PORT, true), (TCP_CRR_PORT, false)] {
            let stop = stop.clone();
            let listener = server.run_in(move || TcpListener::bind(("0.0.0.0", port)))?;
            listener.set_nonblocking(true)?;
            threads
                .push(thread::spawn(move || accept_loop(listener, &stop, per_connection_thread)));
        }
        // iperf3 needs a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server
            .try_exec("ss", &["-Hltn", &format!("sport = :{TCP_BULK_PORT}")])
            .stdout
            .is_empty()
        {
            if Instant::now() > deadline {
                bail!("iperf3 did not start listening");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { stop, threads, _iperf3: iperf3 })
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

fn accept_loop(listener: TcpListener, stop: &AtomicBool, per_connection_thread: bool) {
    while !stop.load(Ordering::Relaxed) {
        // Wait for a connection without polling on a timer, which would cap
        // the connection rate; wake up now and then to see `stop`.
        let mut ready = [rustix::event::PollFd::new(&listener, rustix::event::PollFlags::IN)];
        let wait = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        if !rustix::event::poll(&mut ready, Some(&wait)).is_ok_and(|ready| ready > 0) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if per_connection_thread {
                    thread::spawn(move || hairpin_tests::apps::echo(stream));
                } else {
                    hairpin_tests::apps::echo(stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One configuration's TCP bed.
struct TcpBed {
    gateway: Gateway,
    bed: Bed,
    _configured: Box<dyn Any>,
    _servers: Servers,
}

impl TcpBed {
    fn new(gateway: Gateway) -> anyhow::Result<Self> {
        let bed = Bed::new(BedKind::Routed, gateway.tcp_hosts());
        let configured = bed.configure(gateway, false, 262_144)?;
        // Connections per second: the client's ports come round again.
        bed.client().sysctl("net.ipv4.ip_local_port_range=1024 65535");
        bed.client().sysctl("net.ipv4.tcp_tw_reuse=1");
        let servers = Servers::start(bed.server())?;
        Ok(Self { gateway, bed, _configured: configured, _servers: servers })
    }

    fn destination(&self) -> Ipv4Addr {
        if self.gateway.translates() { PUBLIC } else { SERVER }
    }

    fn bulk(&self, seconds: u32) -> anyhow::Result<f64> {
        let output = self.bed.client().try_exec(
            "iperf3",
            &[
                "-c",
                &self.destination().to_string(),
                "-p",
                &TCP_BULK_PORT.to_string(),
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        );
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!("iperf3's output: {}", String::from_utf8_lossy(&output.stderr))
            })?;
        if let Some(error) = json.get("error") {
            bail!("iperf3: {error}");
        }
        json.pointer("/end/sum_received/bits_per_second")
            .and_then(|v| v.as_f64())
            .map(|bps| bps / 1e9)
            .context("no end.sum_received.bits_per_second in iperf3's output")
    }

    /// Transactions per second of one byte each way on one connection.
    fn request_response(&self, seconds: f64) -> anyhow::Result<f64> {
        let server = SocketAddr::from((self.destination(), TCP_RR_PORT));
        let mut stream = self
            .bed
            .client()
            .run_in(move || TcpStream::connect_timeout(&server, Duration::from_secs(3)))
            .context("connecting for request/response")?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut transactions = 0u64;
        let start = Instant::now();
        let mut byte = [0u8; 1];
        while start.elapsed().as_secs_f64() < seconds {
            stream.write_all(b"x")?;
            stream.read_exact(&mut byte)?;
            transactions += 1;
        }
        Ok(transactions as f64 / start.elapsed().as_secs_f64())
    }

    /// Connections per second, each one request and response, then closed;
    /// and how many failed.
    fn connect_request_response(&self, seconds: f64) -> anyhow::Result<(f64, u64)> {
        let server = SocketAddr::from((self.destination(), TCP_CRR_PORT));
        self.bed.client().run_in(move || {
            let mut done = 0u64;
            let mut failed = 0u64;
            let start = Instant::now();
            let mut byte = [0u8; 1];
            while start.elapsed().as_secs_f64() < seconds {
                let result = (|| -> io::Result<()> {
                    let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(1))?;
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                    stream.write_all(b"x")?;
                    stream.read_exact(&mut byte)?;
                    Ok(())
                })();
                match result {
                    Ok(()) => done += 1,
                    Err(_) => failed += 1,
                }
            }
            Ok((done as f64 / start.elapsed().as_secs_f64(), failed))
        })
    }
}

/// One configuration's TCP figures, one value per round.
#[derive(Clone, Debug)]
pub struct TcpResult {
    pub gateway: Gateway,
    pub bulk_gbps: Vec<f64>,
    pub rr_per_s: Vec<f64>,
    pub crr_per_s: Vec<f64>,
    pub crr_failed: u64,
}

impl TcpResult {
    pub fn bulk(&self) -> f64 {
        median(&self.bulk_gbps)
    }
    pub fn rr(&self) -> f64 {
        median(&self.rr_per_s)
    }
    pub fn crr(&self) -> f64 {
        median(&self.crr_per_s)
    }
}

pub fn measure(
    gateways: &[Gateway],
    rounds: usize,
    bulk_seconds: u32,
    rr_seconds: f64,
    log: &dyn Fn(&str),
) -> anyhow::Result<Vec<TcpResult>> {
    let beds = gateways.iter().map(|g| TcpBed::new(*g)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut results: Vec<TcpResult> = gateways
        .iter()
        .map(|g| TcpResult {
            gateway: *g,
            bulk_gbps: Vec::new(),
            rr_per_s: Vec::new(),
            crr_per_s: Vec::new(),
            crr_failed: 0,
        })
        .collect();
    for round in 0..rounds {
        for (bed, result) in beds.iter().zip(results.iter_mut()) {
            let gbps = bed
                .bulk(bulk_seconds)
                .with_context(|| format!("{}: iperf3", bed.gateway.label()))?;
            log(&format!(
                "tcp round {}: {}: bulk {gbps:.2} Gbit/s",
                round + 1,
                bed.gateway.label()
            ));
            result.bulk_gbps.push(gbps);
        }
        for (bed, result) in beds.iter().zip(results.iter_mut()) {
            let rr = bed.request_response(rr_seconds)?;
            let (crr, failed) = bed.connect_request_response(rr_seconds)?;
            log(&format!(
                "tcp round {}: {}: {rr:.0} requests/s, {crr:.0} connections/s ({failed} failed)",
                round + 1,
                bed.gateway.label()
            ));
            result.rr_per_s.push(rr);
            result.crr_per_s.push(crr);
            result.crr_failed += failed;
        }
    }
    Ok(results)
}
