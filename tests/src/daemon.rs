//! The `hairpin` binary run as a gateway's daemon inside a namespace.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{Netns, Signal};

/// The binary a program using these beds chose ([`use_binary`]).
static CHOSEN_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes `path` the `hairpin` binary the beds run, for programs (the demo)
/// that build their own; the first choice stays.
pub fn use_binary(path: PathBuf) {
    let _ = CHOSEN_BINARY.set(path);
}

/// The `hairpin` binary under test: the one chosen with [`use_binary`],
/// else `$HAIRPIN_BIN` (set by `cargo xtask test`), else the workspace's
/// debug build.
pub fn hairpin_binary() -> PathBuf {
    if let Some(path) = CHOSEN_BINARY.get() {
        return path.clone();
    }
    if let Some(path) = std::env::var_os("HAIRPIN_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/hairpin");
    assert!(
        path.exists(),
        "{} not found: build it (cargo build -p hairpin-user) or run `cargo xtask test`",
        path.display()
    );
    path
}

pub struct Daemon {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    /// Where this daemon pins its maps and links (`--pin-dir`).
    pub pin_dir: PathBuf,
    config: tempfile::TempPath,
}

/// The pin directory of the bed whose gateway is `netns`: its own, so that
/// beds never share state.
pub fn pin_dir(netns: &Netns) -> PathBuf {
    pin_dir_for(netns.name())
}

/// [`pin_dir`] by the gateway namespace's name.
pub fn pin_dir_for(netns_name: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(netns_name)
}

/// Where `hairpin run` for the bed whose gateway is `netns` keeps what
/// `hairpin status` reads about the daemon (named after the pin directory).
pub fn state_file(netns: &Netns) -> PathBuf {
    state_file_for(netns.name())
}

/// [`state_file`] by the gateway namespace's name.
pub fn state_file_for(netns_name: &str) -> PathBuf {
    PathBuf::from("/run/hairpin").join(format!("{netns_name}.json"))
}

impl Daemon {
    /// Starts `hairpin run` with `config` and waits until it is attached.
    pub fn start(netns: &Netns, config: &str) -> Self {
        Self::start_with(netns, config, &[])
    }

    /// Like [`Daemon::start`], with more arguments for `hairpin run`.
    pub fn start_with(netns: &Netns, config: &str, args: &[&str]) -> Self {
        Self::start_wrapped(netns, config, args, &[])
    }

    /// Like [`Daemon::start_with`], run through `wrapper` (a program and its
    /// arguments, e.g. `setpriv` to drop capabilities).
    pub fn start_wrapped(netns: &Netns, config: &str, args: &[&str], wrapper: &[&str]) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", netns.name()));
        std::fs::write(&path, config).expect("write config");
        let pin_dir = pin_dir(netns);
        let binary = hairpin_binary();
        let binary = binary.to_str().expect("utf-8 path");
        let (program, wrapper_args) = match wrapper {
            [program, rest @ ..] => {
                (*program, rest.iter().copied().chain([binary]).collect::<Vec<_>>())
            }
            [] => (binary, Vec::new()),
        };
        let mut child = netns
            .command(program)
            .args(wrapper_args)
            .args(["run", "--config", path.to_str().expect("utf-8 path")])
            .args(args)
            .env("HAIRPIN_PIN_DIR", &pin_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hairpin");
        crate::track_process(child.id());
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self {
            child,
            stderr: rx,
            log: Vec::new(),
            pin_dir,
            config: tempfile::TempPath::try_from_path(path).expect("an absolute path"),
        };
        daemon.wait_for_log("hairpin running", Duration::from_secs(30));
        daemon
    }

    /// Waits for a stderr line containing `needle`; panics with the log so
    /// far when it does not come.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.log.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "hairpin did not log `{needle}` (exit status {status:?}); its log:\n{}",
                        self.log.join("\n")
                    );
                }
            }
        }
    }

    /// What hairpin logged so far.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The configuration file it runs with (written by [`Daemon::start`]);
    /// edit it and [`Daemon::reload`] to change the configuration.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP: re-read the configuration file.
    pub fn reload(&self) {
        self.signal(Signal::HUP);
    }

    fn signal(&self, signal: Signal) {
        // Our own child, not waited for yet: its pid is still its own.
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("kill({}, {signal:?}): {e}", self.child.id()));
    }

    /// SIGKILL, as a crash would: the daemon gets no chance to detach, and
    /// its pins (maps and links, so the datapath too) stay for the next
    /// `hairpin run` to take over. The pins are not removed here either.
    pub fn kill(mut self) {
        self.signal(Signal::KILL);
        let status = self.child.wait().expect("wait for hairpin");
        crate::untrack_process(self.child.id());
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(Signal::KILL.as_raw()),
            "hairpin should have been killed by SIGKILL: {status}"
        );
    }

    /// Sends SIGTERM, waits for the exit and returns the counters it printed.
    /// The pins are left as the daemon left them (none, unless it runs with
    /// `--keep-attached`).
    pub fn stop(mut self) -> BTreeMap<String, u64> {
        self.signal(Signal::TERM);
        let mut stdout = String::new();
        self.child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
        let status = self.child.wait().expect("wait for hairpin");
        crate::untrack_process(self.child.id());
        assert!(status.success(), "hairpin exited with {status}; stdout:\n{stdout}");
        parse_counters(&stdout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Still running: the test failed before stopping it. A killed daemon
        // leaves its pins; nothing else may use this bed's.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        // The daemon's lock file outlives it (a daemon never removes the
        // lock it holds); this bed's goes once no daemon holds it.
        if let Some(name) = self.pin_dir.file_name().and_then(|n| n.to_str()) {
            let lock = state_file_for(name).with_extension("lock");
            if hairpin::lock::daemon_running(&lock).is_ok_and(|running| !running) {
                let _ = std::fs::remove_file(&lock);
            }
        }
        crate::untrack_process(self.child.id());
    }
}

/// The counters after the last `counters...:` heading of hairpin's output.
pub fn parse_counters(output: &str) -> BTreeMap<String, u64> {
    let last = output.rfind("counters").map_or("", |at| &output[at..]);
    last.lines()
        .skip(1)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((name.to_string(), value))
        })
        .collect()
}
