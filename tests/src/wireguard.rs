//! A real WireGuard link between two namespaces, in userspace: a
//! `wireguard-go` process in each (it makes the interface, a tun device, and
//! runs the protocol), keys and peers set with `wg`, the encrypted UDP
//! carried by an underlay veth pair between the same two namespaces.
//!
//! This kernel has no WireGuard module; wireguard-go's interface is the same
//! kind of device a datapath meets on a WireGuard WAN (`link/none`, no
//! Ethernet header, MTU 1420).
//!
//! wireguard-go puts its control socket at `/run/wireguard/<interface>.sock`,
//! a path shared by every namespace on the machine, and two beds (or a host
//! WireGuard) would meet there. So each wireguard-go runs in a mount
//! namespace of its own with a fresh tmpfs on `/run`, and `wg` is run inside
//! that same mount namespace (`nsenter -t <pid> -m -n`): nothing of the link
//! is visible outside the bed's namespaces.

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Netns, track_process, untrack_process, veth};

/// The underlay: a veth pair with this name at both ends, made inside the
/// bed's own two namespaces (never in the host's), so unique per bed.
const UNDERLAY: &str = "wg-under";
const UNDERLAY_A_ADDR: &str = "198.51.100.1";
const UNDERLAY_B_ADDR: &str = "198.51.100.2";
const LISTEN_PORT: u16 = 51820;

/// How long wireguard-go may take to make its interface and socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Two wireguard-go processes, each the far end's only peer; both stop (and
/// their interfaces go) on drop.
pub struct WireGuardLink {
    a: Endpoint,
    b: Endpoint,
}

/// One end: the wireguard-go process and the interface it made.
struct Endpoint {
    child: Child,
    interface: String,
    private_key: String,
}

impl WireGuardLink {
    /// Creates the underlay between `a` and `b`, WireGuard interface
    /// `a_name` in `a` and `b_name` in `b`, each with the other as its
    /// peer (allowed IPs 0.0.0.0/0), both up. The caller adds the tunnel
    /// addresses and then waits with [`WireGuardLink::wait_for_handshake`].
    pub fn start(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Self {
        veth(a, UNDERLAY, b, UNDERLAY);
        a.ip(&["addr", "add", &format!("{UNDERLAY_A_ADDR}/24"), "dev", UNDERLAY]);
        b.ip(&["addr", "add", &format!("{UNDERLAY_B_ADDR}/24"), "dev", UNDERLAY]);

        let link = Self { a: Endpoint::spawn(a, a_name), b: Endpoint::spawn(b, b_name) };
        link.a.configure(&public_key(&link.b.private_key), UNDERLAY_B_ADDR);
        link.b.configure(&public_key(&link.a.private_key), UNDERLAY_A_ADDR);
        a.ip(&["link", "set", a_name, "up"]);
        b.ip(&["link", "set", b_name, "up"]);
        link
    }

    /// Pings `to` from `from` across the tunnel until a reply comes (the
    /// first packets wait for the handshake); panics after 10 s.
    pub fn wait_for_handshake(&self, from: &Netns, to: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = from.try_exec("ping", &["-c", "1", "-W", "1", "-q", to]);
            if ping.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no ping reply from {to} across the WireGuard link in 10 s:\n{}{}\n{}",
                String::from_utf8_lossy(&ping.stdout),
                String::from_utf8_lossy(&ping.stderr),
                self.a.wg(&["show", &self.a.interface]),
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Bytes the `a` end's interface received and sent through the tunnel
    /// (`wg show <interface> transfer`: plaintext that wireguard-go
    /// decrypted and encrypted, handshakes and keepalives included).
    pub fn transfer(&self) -> (u64, u64) {
        let text = self.a.wg(&["show", &self.a.interface, "transfer"]);
        text.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let count = |i: usize| -> u64 {
                    fields
                        .get(i)
                        .and_then(|f| f.trim().parse().ok())
                        .unwrap_or_else(|| panic!("unexpected `wg show transfer` line: {line:?}"))
                };
                (count(1), count(2))
            })
            .fold((0, 0), |(rx, tx), (r, t)| (rx + r, tx + t))
    }
}

impl Endpoint {
    /// Starts wireguard-go in the foreground for interface `name` in
    /// `netns`, in a mount namespace of its own, and waits until `wg`
    /// reaches it.
    fn spawn(netns: &Netns, name: &str) -> Self {
        assert!(name.len() < libc::IFNAMSIZ, "interface name {name} too long");
        // nsenter, unshare and sh each exec the next: the child's pid is
        // wireguard-go's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path()))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs hairpin-wg /run && exec wireguard-go --foreground \"$0\"")
            .arg(name)
            .env("WG_PROCESS_FOREGROUND", "1")
            // A machine with the kernel module (CI's, perhaps) would make
            // wireguard-go refuse to start without it.
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start wireguard-go (apt install wireguard-go): {e}")
            });
        track_process(child.id());
        let mut endpoint =
            Self { child, interface: name.to_string(), private_key: run_wg(&["genkey"], None) };
        endpoint.wait_until_running();
        endpoint
    }

    fn wait_until_running(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wireguard-go {} exited at start ({status})", self.interface);
            }
            if self.try_wg(&["show", &self.interface]).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "wireguard-go {} did not come up in {START_TIMEOUT:?}",
                self.interface
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Our private key, a listen port, and the far end as our one peer.
    fn configure(&self, peer_public_key: &str, peer_address: &str) {
        let endpoint = format!("{peer_address}:{LISTEN_PORT}");
        let port = LISTEN_PORT.to_string();
        let args = [
            "set",
            &self.interface,
            "private-key",
            "/dev/stdin",
            "listen-port",
            &port,
            "peer",
            peer_public_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            "0.0.0.0/0",
        ];
        self.try_wg_with_input(&args, Some(&self.private_key))
            .unwrap_or_else(|e| panic!("wg {}: {e}", args.join(" ")));
    }

    /// `wg ARGS` against this wireguard-go (its network and mount
    /// namespaces); stdout, panicking on failure.
    fn wg(&self, args: &[&str]) -> String {
        self.try_wg(args).unwrap_or_else(|e| panic!("wg {}: {e}", args.join(" ")))
    }

    fn try_wg(&self, args: &[&str]) -> Result<String, String> {
        self.try_wg_with_input(args, None)
    }

    fn try_wg_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut command = Command::new("nsenter");
        command.args(["-t", &self.child.id().to_string(), "-m", "-n", "wg"]).args(args);
        output_of(command, input)
    }
}

impl Drop for Endpoint {
    /// SIGTERM (wireguard-go removes its interface), SIGKILL after 2 s.
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Some(child) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(child, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                untrack_process(pid);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack_process(pid);
    }
}

/// The public key of `private_key`.
fn public_key(private_key: &str) -> String {
    run_wg(&["pubkey"], Some(private_key))
}

/// `wg ARGS` outside any namespace (key generation only), with `input` on
/// its stdin; trimmed stdout.
fn run_wg(args: &[&str], input: Option<&str>) -> String {
    let mut command = Command::new("wg");
    command.args(args);
    output_of(command, input).unwrap_or_else(|e| panic!("wg {}: {e}", args.join(" ")))
}

/// Runs `command` with `input` (and a newline) on stdin; its trimmed stdout,
/// or what it said on failure.
fn output_of(mut command: Command, input: Option<&str>) -> Result<String, String> {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    if let Some(input) = input {
        stdin.write_all(format!("{input}\n").as_bytes()).map_err(|e| format!("stdin: {e}"))?;
    }
    drop(stdin);
    let output = child.wait_with_output().map_err(|e| format!("wait: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
