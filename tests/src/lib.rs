//! Test beds in network namespaces: each bed creates namespaces with unique
//! names, connects them with veth pairs and bridges, and removes exactly
//! those namespaces when dropped. Traffic never leaves them.

pub mod apps;
pub mod capture;
pub mod cli;
pub mod daemon;
pub mod differential;
pub mod netfilter;
pub mod raw;
pub mod seed;
pub mod tun;
pub mod wireguard;

use std::{
    fs::File,
    process::{Command, Output},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

pub use rustix::process::Signal;

/// Fails the test unless the caller may create namespaces and load eBPF.
/// Tests that call it are `#[ignore = "needs root"]`: `cargo test` leaves
/// them out, saying so, and `cargo xtask test` runs them as root; one run
/// without root fails instead of passing untested.
pub fn require_root(test: &str) {
    let root = rustix::process::geteuid().is_root();
    assert!(root, "{test} needs root for namespaces and eBPF: run `cargo xtask test`");
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Namespaces and processes this process made and has not removed yet, for
/// [`emergency_cleanup`].
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

#[derive(PartialEq)]
enum Live {
    Netns(String),
    Process(u32),
}

fn track(live: Live) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(live);
}

fn untrack(live: &Live) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|l| l != live);
}

/// Removes whatever this process made, when it is being interrupted and its
/// destructors will not run: stops its processes, deletes its namespaces.
pub fn emergency_cleanup() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for item in &live {
        if let Live::Process(pid) = item {
            signal_process(*pid, Signal::TERM);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for item in &live {
        match item {
            Live::Process(pid) => signal_process(*pid, Signal::KILL),
            Live::Netns(name) => {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
                // What a daemon of a bed whose gateway this was left behind.
                let _ = std::fs::remove_dir_all(daemon::pin_dir_for(name));
                let _ = std::fs::remove_file(daemon::state_file_for(name));
            }
        }
    }
}

/// Sends `signal` to the process `pid`; a process gone already is fine.
pub fn signal_process(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// On SIGINT or SIGTERM: runs `first` (to stop what the caller started on
/// its own), then [`emergency_cleanup`], and exits with 130. Destructors do
/// not run when a signal ends a process; `what` says what is being removed.
pub fn clean_up_on_signal(what: &'static str, first: fn()) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    thread::spawn(move || {
        if signals.forever().next().is_none() {
            return;
        }
        eprintln!("\ninterrupted: removing {what}");
        first();
        emergency_cleanup();
        std::process::exit(130);
    });
    Ok(())
}

pub(crate) fn track_process(pid: u32) {
    track(Live::Process(pid));
}

pub(crate) fn untrack_process(pid: u32) {
    untrack(&Live::Process(pid));
}

/// A network namespace this process made; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `hp<pid>-<n>-<role>`, with loopback up.
    pub fn new(role: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("hp{}-{id}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        track(Live::Netns(name.clone()));
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (network namespace only, so the
    /// host's mounts, bpffs included, stay visible), panicking on failure.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let path = self.path();
        let net = format!("--net={path}");
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// Like [`Netns::exec`], returning the output whatever the exit status.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot start nsenter {program}: {e}"))
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path())).arg(program);
        command
    }

    pub fn sysctl(&self, setting: &str) {
        self.exec("sysctl", &["-qw", setting]);
    }

    /// The value of a sysctl inside the namespace, e.g. `net.ipv4.ip_no_pmtu_disc`.
    pub fn sysctl_value(&self, key: &str) -> String {
        let output = self.exec("sysctl", &["-n", key]);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The MAC address of `interface`, from `ip -o link` inside the
    /// namespace (`/sys/class/net` would show the host's interfaces).
    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let output = self.ip(&["-o", "link", "show", "dev", interface]);
        let text = String::from_utf8_lossy(&output.stdout);
        let address = text
            .split_whitespace()
            .skip_while(|word| *word != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether address for {interface} in: {text}"));
        let bytes: Vec<u8> = address
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("bad MAC address `{address}` of {interface}: {e}"));
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("MAC address `{address}` of {interface} is not 6 bytes"))
    }

    /// The MTU of `interface`.
    pub fn mtu(&self, interface: &str) -> u32 {
        let output = self.ip(&["-o", "link", "show", "dev", interface]);
        let text = String::from_utf8_lossy(&output.stdout);
        text.split_whitespace()
            .skip_while(|word| *word != "mtu")
            .nth(1)
            .and_then(|mtu| mtu.parse().ok())
            .unwrap_or_else(|| panic!("no mtu for {interface} in: {text}"))
    }

    /// A counter of the namespace's `/proc/net/snmp`, e.g. `("Icmp",
    /// "OutDestUnreachs")`.
    pub fn snmp(&self, group: &str, field: &str) -> u64 {
        let output = self.exec("cat", &["/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&output.stdout);
        let prefix = format!("{group}:");
        let mut rows = text.lines().filter(|line| line.starts_with(&prefix));
        let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
            panic!("no {group} rows in /proc/net/snmp of {}", self.name);
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == field)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or_else(|| panic!("no {group} {field} in /proc/net/snmp of {}", self.name))
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens
    /// and interface indexes it looks up are this namespace's).
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let fd = self.open();
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&fd);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Spawns a detached thread in this namespace.
    pub fn spawn<F, R>(&self, f: F) -> thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = self.open();
        thread::spawn(move || {
            enter(&fd);
            f()
        })
    }

    fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path()))
    }
}

fn enter(netns: &File) {
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
    move_into_link_name_space(std::os::fd::AsFd::as_fd(netns), Some(LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("setns: {e}"));
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// Connects `a:a_name` and `b:b_name` with a veth pair, both ends up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name()]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// An XDP program that passes every packet, attached to one interface
/// while this lives (the program owns its link: dropped, it detaches).
pub struct XdpPass {
    _ebpf: aya::Ebpf,
}

/// Attaches an XDP program that passes every packet to `interface` (native
/// mode) and keeps it attached while the returned [`XdpPass`] lives: the
/// benchmark object's `xdp_pass`, loaded through aya.
///
/// XDP_TX and XDP_REDIRECT into a veth only deliver when the peer end has an
/// XDP program, so every veth peer a datapath transmits on gets one.
pub fn attach_xdp_pass(netns: &Netns, interface: &str) -> XdpPass {
    use aya::programs::{Xdp, xdp::XdpMode};
    assert!(
        !hairpin::BENCH_EBPF_OBJECT.is_empty(),
        "built without the eBPF programs: run `cargo xtask test`"
    );
    let interface = interface.to_string();
    netns.run_in(move || {
        let mut ebpf = aya::Ebpf::load(hairpin::BENCH_EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the benchmark object: {e}"));
        let program: &mut Xdp = ebpf
            .program_mut("xdp_pass")
            .expect("the benchmark object has xdp_pass")
            .try_into()
            .expect("xdp_pass is an XDP program");
        program.load().unwrap_or_else(|e| panic!("loading xdp_pass: {e}"));
        program
            .attach(&interface, XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching xdp_pass to {interface}: {e}"));
        XdpPass { _ebpf: ebpf }
    })
}
