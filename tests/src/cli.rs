//! The `hairpin` command line run inside a bed's gateway namespace, against
//! the instance pinned in that bed's pin directory.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{
    Netns,
    daemon::{hairpin_binary, pin_dir},
};

/// How long one command may take before it is killed and the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// What one `hairpin` command did.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for failure messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code; panics when the command was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("`{}` was killed: {self}", self.command))
    }

    /// Panics, showing the output, unless the command succeeded.
    #[track_caller]
    pub fn expect_success(self) -> Self {
        assert!(self.success(), "`{}` failed: {self}", self.command);
        self
    }

    /// Standard output parsed as JSON; panics when it is not.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}` did not print JSON ({e}): {self}", self.command))
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n--- stdout:\n{}--- stderr:\n{}", self.status, self.stdout, self.stderr)
    }
}

/// The `hairpin` command line of one instance: run inside `netns` (network
/// namespace only, so the host's bpffs stays visible) with
/// `HAIRPIN_PIN_DIR` set to the instance's pin directory.
pub struct Cli<'a> {
    netns: &'a Netns,
    pin_dir: PathBuf,
}

impl<'a> Cli<'a> {
    /// The CLI of the instance a [`crate::daemon::Daemon`] runs in `gateway`.
    pub fn new(gateway: &'a Netns) -> Self {
        Self { netns: gateway, pin_dir: pin_dir(gateway) }
    }

    /// The CLI aimed at another pin directory (e.g. one where nothing runs).
    pub fn with_pin_dir(netns: &'a Netns, pin_dir: impl Into<PathBuf>) -> Self {
        Self { netns, pin_dir: pin_dir.into() }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `hairpin ARGS`, whatever its exit status.
    /// `hairpin ARGS` inside the namespace, aimed at this instance.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.netns.command(hairpin_binary().to_str().expect("utf-8 path"));
        command.args(args).env("HAIRPIN_PIN_DIR", &self.pin_dir).env_remove("RUST_LOG");
        command
    }

    pub fn run(&self, args: &[&str]) -> CliOutput {
        self.run_with_stdin(args, b"")
    }

    /// `hairpin ARGS` with `stdin` on its standard input.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        let command = format!("hairpin {}", args.join(" "));
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        crate::track_process(child.id());
        let mut input = child.stdin.take().expect("stdin");
        let stdin = stdin.to_vec();
        // A command that does not read its input gets EPIPE: not an error here.
        let writer = thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let stdout = reader(child.stdout.take().expect("stdout"));
        let stderr = reader(child.stderr.take().expect("stderr"));
        let status = match wait_timeout::ChildExt::wait_timeout(&mut child, COMMAND_TIMEOUT) {
            Ok(Some(status)) => status,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                crate::untrack_process(child.id());
                panic!("`{command}` did not finish within {COMMAND_TIMEOUT:?}");
            }
            Err(e) => panic!("waiting for `{command}`: {e}"),
        };
        crate::untrack_process(child.id());
        let _ = writer.join();
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        CliOutput { command, status, stdout, stderr }
    }

    /// `hairpin ARGS`, panicking unless it succeeds; its standard output.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args).expect_success().stdout
    }

    /// `hairpin ARGS`, panicking unless it succeeds and prints JSON.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.run(args).expect_success().json()
    }
}

/// A command that runs until stopped (`stats --watch`), its standard output
/// line by line; killed on drop.
pub struct Running {
    pub command: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// The next line of standard output, or `None` when none came within
    /// `timeout` (or the command ended).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Whether the command is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::untrack_process(self.child.id());
    }
}

impl Cli<'_> {
    /// Starts `hairpin ARGS` and leaves it running.
    pub fn spawn(&self, args: &[&str]) -> Running {
        let command = format!("hairpin {}", args.join(" "));
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        crate::track_process(child.id());
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { command, child, lines }
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Panics unless `hairpin status --json` of the instance in `gateway` says
/// each of `interfaces` is attached with the TC datapath (`tc`: true, its
/// mode naming TC and no XDP link pinned for it) or with native XDP.
#[track_caller]
pub fn assert_datapath(gateway: &Netns, interfaces: &[&str], tc: bool) {
    let status = Cli::new(gateway).json(&["status", "--json"]);
    let rows = status["interfaces"].as_array().cloned().unwrap_or_default();
    let links: Vec<String> = status["links"]
        .as_array()
        .map(|links| links.iter().filter_map(|l| l["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for interface in interfaces {
        let mode = rows
            .iter()
            .find(|row| row["interface"] == *interface)
            .and_then(|row| row["mode"].as_str())
            .unwrap_or_else(|| panic!("status --json shows no mode for {interface}:\n{status:#}"));
        let xdp_link = links.iter().any(|link| *link == format!("xdp_{interface}"));
        if tc {
            assert!(
                mode.to_ascii_lowercase().contains("tc") && !xdp_link,
                "{interface} should be attached with the TC datapath, status --json says mode `{mode}`, links {links:?}:\n{status:#}"
            );
        } else {
            assert!(
                mode == "xdp" && xdp_link,
                "{interface} should be attached in native XDP mode, status --json says mode `{mode}`, links {links:?}:\n{status:#}"
            );
        }
    }
}
