//! The command line: what `hairpin` takes, as clap parses it. The binary
//! runs the commands; the man page and the shell completions are generated
//! from this model, and bad input is refused here, before any map is
//! touched.

use std::{net::SocketAddrV4, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::config::Proto;

/// hairpin: hairpin NAT and port forwards for Linux gateways, in XDP.
#[derive(Parser)]
#[command(name = "hairpin", version, about)]
pub struct Cli {
    /// Where a running instance keeps its maps and links (bpffs).
    #[arg(long, global = true, env = "HAIRPIN_PIN_DIR", default_value = "/sys/fs/bpf/hairpin")]
    pub pin_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the datapath (or take over a running one's), attach it and stay in
    /// the foreground. SIGHUP re-reads the configuration; SIGINT or SIGTERM
    /// detach and remove everything.
    Run {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the counters every this many seconds (0: only at exit).
        #[arg(long, default_value_t = 0)]
        stats_interval: u64,
        /// On SIGINT/SIGTERM leave the datapath attached with its state, for
        /// an upgrade: the next `hairpin run` takes it over.
        #[arg(long)]
        keep_attached: bool,
    },
    /// Check a configuration file and print what it would do.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Publish, withdraw or list mappings of the running instance.
    #[command(subcommand)]
    Mapping(MappingCommand),
    /// List or flush the running instance's flows.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Refuse new WAN flows from networks (for ban tools such as fail2ban).
    #[command(subcommand)]
    Deny(DenyCommand),
    /// Counters per verdict and per mapping, table fill.
    Stats {
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<u64>,
    },
    /// Interfaces with their attach modes and why, programs, table fill,
    /// configuration file.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run one packet through the running instance's program and show what
    /// it does (verdict, rewritten headers), leaving no state behind.
    Explain {
        proto: Proto,
        /// Source, ADDRESS:PORT.
        src: SocketAddrV4,
        /// Destination, ADDRESS:PORT.
        dst: SocketAddrV4,
        /// The interface the packet arrives on (default: the first LAN one).
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Turn iptables-save output's DNAT port forwards into mappings.
    ImportIptables {
        /// The iptables-save output; `-` or nothing for standard input.
        file: Option<PathBuf>,
        /// Only print what would be published.
        #[arg(long)]
        dry_run: bool,
    },
    /// Turn nftables' DNAT port forwards (`nft -j list ruleset`) into mappings.
    ImportNft {
        /// A saved `nft -j list ruleset`; `-` for standard input; nothing:
        /// run `nft -j list ruleset` here.
        file: Option<PathBuf>,
        /// Only print what would be published.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the completions for SHELL (e.g. `hairpin completions bash >
    /// /etc/bash_completion.d/hairpin`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or write it and one page per command
    /// (`hairpin-mapping-add.1`, ...) into DIR, as the package installs them.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum MappingCommand {
    /// Publish PUBLIC (ADDRESS:PORT[-PORT]) at SERVER (ADDRESS:PORT[-PORT]).
    Add {
        proto: Proto,
        public: String,
        server: String,
        /// Accept new flows only from this source network (repeatable).
        #[arg(long = "allow", value_name = "CIDR")]
        allow: Vec<String>,
        /// Accept new flows only arriving on this LAN or WAN interface
        /// (repeatable).
        #[arg(long = "interface", value_name = "NAME")]
        interfaces: Vec<String>,
    },
    /// Withdraw the mapping publishing PUBLIC (ADDRESS:PORT[-PORT]). Its
    /// established flows go on until they end or expire.
    Del { proto: Proto, public: String },
    /// List the published mappings.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DenyCommand {
    /// Deny new WAN flows from CIDR, and end its open port-forward flows.
    /// Kept across reloads until `deny del`.
    Add { cidr: String },
    /// Remove exactly CIDR from the deny set.
    Del { cidr: String },
    /// The deny set, with where each network came from.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConntrackCommand {
    /// The tracked flows, like `conntrack -L`.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove every tracked flow (their packets then go to the kernel).
    Flush,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    #[test]
    fn the_model_is_consistent() {
        Cli::command().debug_assert();
    }

    #[rstest::rstest]
    #[case::unknown_command(&["hairpin", "frobnicate"], ErrorKind::InvalidSubcommand)]
    #[case::run_without_config(&["hairpin", "run"], ErrorKind::MissingRequiredArgument)]
    #[case::bad_proto(&["hairpin", "mapping", "add", "sctp", "203.0.113.1:80", "192.168.0.2:80"], ErrorKind::ValueValidation)]
    #[case::mapping_add_without_server(&["hairpin", "mapping", "add", "tcp", "203.0.113.1:80"], ErrorKind::MissingRequiredArgument)]
    #[case::explain_without_port(&["hairpin", "explain", "tcp", "192.168.0.3", "203.0.113.1:80"], ErrorKind::ValueValidation)]
    #[case::explain_ipv6(&["hairpin", "explain", "udp", "[::1]:53", "203.0.113.1:53"], ErrorKind::ValueValidation)]
    #[case::negative_watch(&["hairpin", "stats", "--watch", "-1"], ErrorKind::UnknownArgument)]
    #[case::stats_interval_not_a_number(&["hairpin", "run", "-c", "x.toml", "--stats-interval", "soon"], ErrorKind::ValueValidation)]
    #[case::unknown_shell(&["hairpin", "completions", "cmd.exe"], ErrorKind::InvalidValue)]
    #[case::conntrack_flush_takes_nothing(&["hairpin", "conntrack", "flush", "all"], ErrorKind::UnknownArgument)]
    fn bad_input_is_refused_before_anything_runs(#[case] args: &[&str], #[case] kind: ErrorKind) {
        match Cli::try_parse_from(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => assert_eq!(e.kind(), kind, "{args:?}: {e}"),
        }
    }

    #[rstest::rstest]
    #[case::watch_defaults_to_one_second(&["hairpin", "stats", "--watch"], Some(1))]
    #[case::watch_seconds(&["hairpin", "stats", "--watch", "5"], Some(5))]
    #[case::no_watch(&["hairpin", "stats"], None)]
    fn stats_watch(#[case] args: &[&str], #[case] expected: Option<u64>) {
        match Cli::try_parse_from(args).expect("valid").command {
            Command::Stats { watch, .. } => assert_eq!(watch, expected, "{args:?}"),
            _ => panic!("{args:?} is not stats"),
        }
    }

    #[test]
    fn the_pin_dir_is_global_with_a_default() {
        let cli = Cli::try_parse_from(["hairpin", "status"]).expect("valid");
        assert_eq!(cli.pin_dir, PathBuf::from("/sys/fs/bpf/hairpin"));
        let cli =
            Cli::try_parse_from(["hairpin", "conntrack", "list", "--pin-dir", "/sys/fs/bpf/x"])
                .expect("valid");
        assert_eq!(cli.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
    }
}
