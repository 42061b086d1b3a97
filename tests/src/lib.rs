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
    ffi::CString,
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Output},
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU32, Ordering},
    },
    thread,
};

/// Fails the test unless the caller may create namespaces and load eBPF.
/// Tests that call it are `#[ignore = "needs root"]`: `cargo test` leaves
/// them out, saying so, and `cargo xtask test` runs them as root; one run
/// without root fails instead of passing untested.
pub fn require_root(test: &str) {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
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
            // SAFETY: signalling a child of ours.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for item in &live {
        match item {
            Live::Process(pid) => unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            },
            Live::Netns(name) => {
                let _ = Command::new("ip").args(["netns", "delete", name]).status();
                // What a daemon of a bed whose gateway this was left behind.
                let _ = std::fs::remove_dir_all(daemon::pin_dir_for(name));
                let _ = std::fs::remove_file(daemon::state_file_for(name));
            }
        }
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
}

/// On SIGINT or SIGTERM: runs `first` (to stop what the caller started on
/// its own), then [`emergency_cleanup`], and exits with 130. Destructors do
/// not run when a signal ends a process; `what` says what is being removed.
pub fn clean_up_on_signal(what: &'static str, first: fn()) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    let reader = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only calls write(2).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    thread::spawn(move || {
        let mut byte = [0u8; 1];
        // SAFETY: reading one byte into a one-byte buffer.
        unsafe { libc::read(reader.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
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
    // SAFETY: a valid namespace fd; setns changes only the calling thread.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
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

/// Attaches an XDP program that passes every packet to `interface` (native
/// mode) and keeps it attached while the returned link lives.
///
/// XDP_TX and XDP_REDIRECT into a veth only deliver when the peer end has an
/// XDP program, so every veth peer a datapath transmits on gets one.
pub fn attach_xdp_pass(netns: &Netns, interface: &str) -> OwnedFd {
    let interface = interface.to_string();
    netns.run_in(move || {
        let name = CString::new(interface.as_str()).expect("interface name");
        // SAFETY: a valid C string.
        let if_index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(if_index, 0, "no interface {interface}");
        let program = load_xdp_pass();
        xdp_link_create(&program, if_index)
    })
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn bpf(command: libc::c_long, attr: &mut [u8; 128]) -> OwnedFd {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len()) };
    assert!(fd >= 0, "bpf({command}): {}", std::io::Error::last_os_error());
    // SAFETY: the kernel returned a new fd.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `r0 = XDP_PASS; exit`.
fn load_xdp_pass() -> OwnedFd {
    let instructions: [u8; 16] = [
        0xb7, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, // mov64 r0, 2
        0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // exit
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(instructions.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // BPF_F_XDP_HAS_FRAGS: may attach to interfaces with jumbo MTUs.
    attr[44..48].copy_from_slice(&(1u32 << 5).to_ne_bytes());
    attr[48..57].copy_from_slice(b"xdp_pass\0");
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

fn xdp_link_create(program: &OwnedFd, if_index: u32) -> OwnedFd {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&if_index.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
    attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}
