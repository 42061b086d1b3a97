//! The configuration's domain types, and the TOML file they are read from
//! (its shape in [`file`]), parsed and validated before anything is loaded.

mod file;

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Syntax(String),
    #[error("`{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => hairpin_common::IPPROTO_TCP,
            Proto::Udp => hairpin_common::IPPROTO_UDP,
        }
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol `{other}` (expected tcp or udp)")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

pub use ipnet::Ipv4Net;

/// An IPv4 network such as `192.168.0.0/24`; a bare address is a /32.
/// Refused with host bits set, which is almost always a typo.
pub fn parse_network(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = match text.parse::<Ipv4Addr>() {
        Ok(addr) => Ipv4Net::from(addr),
        Err(_) => text.parse().map_err(|_| {
            match text.split_once('/').map(|(a, len)| (a.parse::<Ipv4Addr>(), len.parse::<u8>())) {
                Some((Ok(_), _)) => format!("`{text}`: the prefix length must be 0 to 32"),
                _ => format!("`{text}` is not an IPv4 network (like 192.168.0.0/24)"),
            }
        })?,
    };
    if net.trunc() != net {
        return Err(format!("`{text}` has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Where the datapath runs on an interface, as `[datapath] attach` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Decided per interface from what the kernel says of the device.
    #[default]
    Auto,
    /// Native (driver) XDP; generic (skb) XDP is never used.
    Xdp,
    /// The TC ingress classifier, on skbs.
    Tc,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Xdp => "xdp",
            AttachMode::Tc => "tc",
        })
    }
}

/// `[datapath]`: the attach mode for every interface, and the interfaces
/// that have one of their own.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Attach {
    pub default: AttachMode,
    pub interfaces: BTreeMap<String, AttachMode>,
}

impl Attach {
    /// The mode `interface` is to be attached in.
    pub fn mode_for(&self, interface: &str) -> AttachMode {
        self.interfaces.get(interface).copied().unwrap_or(self.default)
    }
}

/// An inclusive port range; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        Self { first: port, last: port }
    }

    pub const fn len(&self) -> u32 {
        (self.last - self.first) as u32 + 1
    }

    pub const fn is_empty(&self) -> bool {
        false
    }

    pub const fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `public` (address and port range) is published and served at `to`; port
/// `public_ports.first + i` goes to `to_ports.first + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub proto: Proto,
    pub public: Ipv4Addr,
    pub public_ports: PortRange,
    pub to: Ipv4Addr,
    pub to_ports: PortRange,
    /// New flows only from these source networks; empty: from anywhere.
    pub allow: Vec<Ipv4Net>,
    /// New flows only from these interfaces (configured LAN or WAN ones);
    /// empty: from any.
    pub interfaces: Vec<String>,
}

impl Mapping {
    /// A mapping open to every source on every interface.
    pub fn open(
        proto: Proto,
        (public, public_ports): (Ipv4Addr, PortRange),
        (to, to_ports): (Ipv4Addr, PortRange),
    ) -> Self {
        Self {
            proto,
            public,
            public_ports,
            to,
            to_ports,
            allow: Vec::new(),
            interfaces: Vec::new(),
        }
    }

    /// Every (public port, server port) pair of the mapping.
    pub fn port_pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (self.public_ports.first..=self.public_ports.last)
            .zip(self.to_ports.first..=self.to_ports.last)
    }

    /// Whether both publish a port in common.
    pub fn overlaps(&self, other: &Mapping) -> bool {
        self.proto == other.proto
            && self.public == other.public
            && self.public_ports.overlaps(&other.public_ports)
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{} -> {}:{}",
            self.proto, self.public, self.public_ports, self.to, self.to_ports
        )?;
        if !self.allow.is_empty() {
            let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
            write!(f, " from {}", allow.join(","))?;
        }
        if !self.interfaces.is_empty() {
            write!(f, " on {}", self.interfaces.join(","))?;
        }
        Ok(())
    }
}

/// Idle timeouts, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: u64,
    /// The closing states, FIN_WAIT to CLOSE.
    pub tcp_transitory: u64,
    pub udp: u64,
    /// The opening states, SYN_SENT and SYN_RECV (RFC 7857 §2.1).
    pub tcp_opening: u64,
}

/// RFC 5382 REQ-5: established at least 2 h 4 min, transitory 4 min;
/// RFC 4787 REQ-5: UDP at least 2 min (5 min recommended); RFC 7857 §2.1: a
/// shorter timeout for half-open connections.
pub const DEFAULT_TIMEOUTS: Timeouts =
    Timeouts { tcp_established: 7440, tcp_transitory: 240, udp: 300, tcp_opening: 60 };
pub const RFC_MINIMUM_TIMEOUTS: Timeouts =
    Timeouts { tcp_established: 7440, tcp_transitory: 240, udp: 120, tcp_opening: 1 };

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lan {
    pub interfaces: Vec<String>,
    pub networks: Vec<Ipv4Net>,
    pub address: Ipv4Addr,
    /// SNAT source ports, inclusive.
    pub snat_ports: (u16, u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wan {
    pub interface: String,
    pub addresses: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub lan: Lan,
    pub wan: Option<Wan>,
    pub attach: Attach,
    /// The deprecated `[xdp] mode` this configuration still gives, if any
    /// (`attach.default` holds what it means now).
    pub legacy_xdp_mode: Option<String>,
    pub conntrack_capacity: u32,
    pub timeouts: Timeouts,
    /// Where the Prometheus endpoint listens; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub mappings: Vec<Mapping>,
    /// `[deny] networks`: sources no new WAN flow is accepted from.
    pub deny: Vec<Ipv4Net>,
}

impl Config {
    /// Settings that are allowed but not what an operator would normally
    /// want, as sentences for the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(mode) = &self.legacy_xdp_mode {
            warnings.push(format!(
                "`[xdp] mode = \"{mode}\"` is deprecated: write `[datapath] attach = \"{}\"` instead",
                self.attach.default
            ));
        }
        let (t, min) = (self.timeouts, RFC_MINIMUM_TIMEOUTS);
        for (key, value, minimum, rfc) in [
            ("tcp_established", t.tcp_established, min.tcp_established, "RFC 5382 REQ-5"),
            ("tcp_transitory", t.tcp_transitory, min.tcp_transitory, "RFC 5382 REQ-5"),
            ("udp", t.udp, min.udp, "RFC 4787 REQ-5"),
        ] {
            if value < minimum {
                warnings.push(format!(
                    "timeouts.{key} = {value} s is shorter than {rfc} allows ({minimum} s): idle connections may break"
                ));
            }
        }
        warnings
    }
}

pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        text.parse()
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        file::parse(text)
    }
}

/// `A-B` or a single port, 1 to 65535, A <= B.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) => Err("port 0 is not a valid port".into()),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("`{text}` is not a port or port range (like 20000-29999)")),
        }
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("`{text}` is reversed: the first port must not exceed the last"));
    }
    Ok((first, last))
}

/// `ADDRESS:PORT` or `ADDRESS:FIRST-LAST`.
pub fn parse_endpoint(text: &str) -> Result<(Ipv4Addr, PortRange), String> {
    let form = || {
        format!(
            "`{text}` is not an IPv4 address and port or port range (like 203.0.113.1:80 or 203.0.113.1:8000-8099)"
        )
    };
    let (addr, ports) = text.rsplit_once(':').ok_or_else(form)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| form())?;
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(format!("{addr} is not a unicast address"));
    }
    let (first, last) = parse_port_range(ports)?;
    Ok((addr, PortRange { first, last }))
}

#[cfg(test)]
pub(crate) mod tests {
    use rstest::rstest;

    use super::*;

    pub(crate) const SEED: &str = r#"
[lan]
interfaces = ["gw-lan"]
networks = ["192.168.0.0/24"]
address = "192.168.0.1"

[wan]
interface = "gw-wan"
addresses = ["203.0.113.1"]

[datapath]
attach = "auto"

[[mapping]]
proto = "tcp"
public = "203.0.113.1:80"
to = "192.168.0.2:80"
"#;

    #[test]
    fn seed_config_parses() {
        let config: Config = SEED.parse().expect("the seed config is valid");
        assert_eq!(config.lan.interfaces, ["gw-lan"]);
        assert_eq!(config.lan.networks, ["192.168.0.0/24".parse().unwrap()]);
        assert_eq!(config.lan.address, Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(config.lan.snat_ports, DEFAULT_SNAT_PORTS);
        assert_eq!(config.wan.as_ref().unwrap().interface, "gw-wan");
        assert_eq!(config.attach, Attach::default());
        assert_eq!(config.legacy_xdp_mode, None);
        assert_eq!(
            config.mappings,
            [Mapping {
                proto: Proto::Tcp,
                public: Ipv4Addr::new(203, 0, 113, 1),
                public_ports: PortRange::single(80),
                to: Ipv4Addr::new(192, 168, 0, 2),
                to_ports: PortRange::single(80),
                allow: vec![],
                interfaces: vec![],
            }]
        );
        assert_eq!(config.timeouts, DEFAULT_TIMEOUTS);
        assert!(config.deny.is_empty());
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn single_interface_key_is_accepted() {
        let text = SEED.replace(r#"interfaces = ["gw-lan"]"#, r#"interface = "br-lan""#);
        let config: Config = text.parse().expect("`interface` is accepted");
        assert_eq!(config.lan.interfaces, ["br-lan"]);
    }

    #[test]
    fn minimal_config_without_wan_or_mappings() {
        let config: Config =
            "[lan]\ninterface = \"eth1\"\nnetworks = [\"10.0.0.0/8\"]\naddress = \"10.0.0.1\"\n"
                .parse()
                .expect("wan, xdp and mappings are optional");
        assert!(config.wan.is_none());
        assert!(config.mappings.is_empty());
    }

    #[rstest]
    #[case::bad_lan_address(
        r#"address = "192.168.0.1""#,
        r#"address = "192.168.0.300""#,
        "lan.address"
    )]
    #[case::bad_network(
        r#"networks = ["192.168.0.0/24"]"#,
        r#"networks = ["192.168.0.0/33"]"#,
        "lan.networks[0]"
    )]
    #[case::host_bits(
        r#"networks = ["192.168.0.0/24"]"#,
        r#"networks = ["192.168.0.7/24"]"#,
        "lan.networks[0]"
    )]
    #[case::unknown_key(
        r#"attach = "auto""#,
        r#"attach = "auto"
turbo = true"#,
        "turbo"
    )]
    #[case::unknown_attach_mode(r#"attach = "auto""#, r#"attach = "fast""#, "datapath.attach")]
    #[case::unknown_interface_attach_mode(
        r#"attach = "auto""#,
        "attach = \"auto\"\n[datapath.interfaces]\ngw-wan = \"skb\"",
        "datapath.interfaces.gw-wan"
    )]
    #[case::attach_for_an_unconfigured_interface(
        r#"attach = "auto""#,
        "attach = \"auto\"\n[datapath.interfaces]\neth9 = \"tc\"",
        "datapath.interfaces.eth9"
    )]
    #[case::skb_mode_is_refused(
        "[datapath]\nattach = \"auto\"",
        "[xdp]\nmode = \"skb\"",
        "xdp.mode"
    )]
    #[case::unknown_xdp_mode("[datapath]\nattach = \"auto\"", "[xdp]\nmode = \"fast\"", "xdp.mode")]
    #[case::xdp_mode_and_attach("[datapath]", "[xdp]\nmode = \"native\"\n\n[datapath]", "xdp.mode")]
    #[case::public_port_zero(
        r#"public = "203.0.113.1:80""#,
        r#"public = "203.0.113.1:0""#,
        "mapping[0].public"
    )]
    #[case::server_port_zero(
        r#"to = "192.168.0.2:80""#,
        r#"to = "192.168.0.2:0""#,
        "mapping[0].to"
    )]
    #[case::public_without_port(
        r#"public = "203.0.113.1:80""#,
        r#"public = "203.0.113.1""#,
        "mapping[0].public"
    )]
    #[case::unknown_proto(r#"proto = "tcp""#, r#"proto = "sctp""#, "mapping[0].proto")]
    #[case::missing_interface(r#"interfaces = ["gw-lan"]"#, "", "lan.interfaces")]
    #[case::empty_interfaces(r#"interfaces = ["gw-lan"]"#, "interfaces = []", "lan.interfaces")]
    #[case::bad_interface_name(
        r#"interfaces = ["gw-lan"]"#,
        r#"interfaces = ["a-name-far-too-long"]"#,
        "lan.interfaces[0]"
    )]
    #[case::missing_wan_interface(r#"interface = "gw-wan""#, "", "wan.interface")]
    #[case::bad_wan_address(
        r#"addresses = ["203.0.113.1"]"#,
        r#"addresses = ["wan"]"#,
        "wan.addresses[0]"
    )]
    #[case::duplicate_mapping(
        "[datapath]",
        r#"[[mapping]]
proto = "tcp"
public = "203.0.113.1:80"
to = "192.168.0.5:80"

[datapath]"#,
        "mapping[1].public"
    )]
    #[case::unequal_ranges(
        r#"to = "192.168.0.2:80""#,
        r#"to = "192.168.0.2:80-81""#,
        "mapping[0].to"
    )]
    #[case::reversed_public_range(
        r#"public = "203.0.113.1:80""#,
        r#"public = "203.0.113.1:90-80""#,
        "mapping[0].public"
    )]
    #[case::overlapping_range(
        "[datapath]",
        r#"[[mapping]]
proto = "tcp"
public = "203.0.113.1:70-85"
to = "192.168.0.5:70-85"

[datapath]"#,
        "mapping[1].public"
    )]
    #[case::zero_timeout("[datapath]", "[timeouts]\nudp = 0\n\n[datapath]", "timeouts.udp")]
    #[case::unknown_timeout("[datapath]", "[timeouts]\nicmp = 30\n\n[datapath]", "icmp")]
    #[case::bad_metrics_listen(
        "[datapath]",
        "[metrics]\nlisten = \"localhost\"\n\n[datapath]",
        "metrics.listen"
    )]
    #[case::bad_allow(
        r#"to = "192.168.0.2:80""#,
        r#"to = "192.168.0.2:80"
allow = ["198.51.100.1/24"]"#,
        "mapping[0].allow[0]"
    )]
    #[case::unconfigured_mapping_interface(
        r#"to = "192.168.0.2:80""#,
        r#"to = "192.168.0.2:80"
interfaces = ["eth9"]"#,
        "mapping[0].interfaces[0]"
    )]
    #[case::mapping_interface_twice(
        r#"to = "192.168.0.2:80""#,
        r#"to = "192.168.0.2:80"
interfaces = ["gw-lan", "gw-lan"]"#,
        "mapping[0].interfaces[1]"
    )]
    #[case::bad_deny(
        "[datapath]",
        "[deny]\nnetworks = [\"10.0.0.0/40\"]\n\n[datapath]",
        "deny.networks[0]"
    )]
    #[case::unknown_deny_key("[datapath]", "[deny]\nbans = []\n\n[datapath]", "bans")]
    #[case::zero_opening_timeout(
        "[datapath]",
        "[timeouts]\ntcp_opening = 0\n\n[datapath]",
        "timeouts.tcp_opening"
    )]
    #[case::reversed_snat_ports(
        r#"address = "192.168.0.1""#,
        r#"address = "192.168.0.1"
snat_ports = "30000-20000""#,
        "lan.snat_ports"
    )]
    fn invalid_configs_are_refused_naming_the_key(
        #[case] from: &str,
        #[case] to: &str,
        #[case] key: &str,
    ) {
        assert!(SEED.contains(from), "test setup: `{from}` not in the seed config");
        let text = SEED.replacen(from, to, 1);
        let error = text.parse::<Config>().expect_err("invalid config accepted").to_string();
        assert!(error.contains(key), "error does not name `{key}`: {error}");
    }

    #[rstest]
    #[case::bad_table_header("[lan\ninterfaces = []", "line 1")]
    #[case::unterminated_string("[lan]\naddress = \"192.168.0.1\n", "line 2")]
    #[case::unknown_top_level_key("colour = 1\n[lan]", "colour")]
    fn syntax_errors_are_one_line_saying_where(#[case] text: &str, #[case] expected: &str) {
        let error = text.parse::<Config>().expect_err("invalid TOML accepted").to_string();
        assert!(!error.contains('\n'), "not one line: {error:?}");
        assert!(error.contains(expected), "{error:?} does not say {expected:?}");
    }

    #[test]
    fn port_ranges_and_timeouts() {
        let text = format!(
            "{SEED}\n[timeouts]\ntcp_established = 600\nudp = 30\n\n[[mapping]]\nproto = \"tcp\"\npublic = \"198.51.100.1:8000-8002\"\nto = \"192.168.0.2:9000-9002\"\n"
        );
        let config: Config = text.parse().expect("valid");
        let pairs: Vec<_> = config.mappings[1].port_pairs().collect();
        assert_eq!(pairs, [(8000, 9000), (8001, 9001), (8002, 9002)]);
        assert_eq!(
            config.timeouts,
            Timeouts { tcp_established: 600, tcp_transitory: 240, udp: 30, tcp_opening: 60 }
        );
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("tcp_established") && warnings[1].contains("udp"),
            "{warnings:?}"
        );
    }

    #[test]
    fn same_port_on_tcp_and_udp_is_not_a_duplicate() {
        let text = format!(
            "{SEED}\n[[mapping]]\nproto = \"udp\"\npublic = \"203.0.113.1:80\"\nto = \"192.168.0.2:80\"\n"
        );
        let config: Config = text.parse().expect("tcp and udp may share a port");
        assert_eq!(config.mappings.len(), 2);
    }

    #[rstest]
    #[case("20000-20015", Ok((20000, 20015)))]
    #[case("443", Ok((443, 443)))]
    #[case("0-10", Err(()))]
    #[case("10-5", Err(()))]
    #[case("a-b", Err(()))]
    #[case("1-65536", Err(()))]
    fn port_ranges(#[case] text: &str, #[case] expected: Result<(u16, u16), ()>) {
        assert_eq!(parse_port_range(text).map_err(|_| ()), expected);
    }

    #[test]
    fn network_contains() {
        let net: Ipv4Net = "192.168.0.0/24".parse().unwrap();
        assert!(net.contains(&Ipv4Addr::new(192, 168, 0, 200)));
        assert!(!net.contains(&Ipv4Addr::new(192, 168, 1, 1)));
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&Ipv4Addr::new(8, 8, 8, 8)));
    }

    #[rstest]
    #[case("192.168.0.0/24", Ok("192.168.0.0/24"))]
    #[case("198.51.100.7", Ok("198.51.100.7/32"))]
    #[case("0.0.0.0/0", Ok("0.0.0.0/0"))]
    #[case("192.168.0.7/24", Err("host bits set; did you mean 192.168.0.0/24?"))]
    #[case("192.168.0.0/33", Err("the prefix length must be 0 to 32"))]
    #[case("lan", Err("not an IPv4 network"))]
    #[case("2001:db8::/32", Err("not an IPv4 network"))]
    fn networks(#[case] text: &str, #[case] expected: Result<&str, &str>) {
        match (parse_network(text), expected) {
            (Ok(net), Ok(wanted)) => assert_eq!(net.to_string(), wanted, "`{text}`"),
            (Err(e), Err(wanted)) => {
                assert!(e.contains(wanted), "`{text}`: {e:?} lacks {wanted:?}")
            }
            (got, wanted) => panic!("`{text}`: got {got:?}, expected {wanted:?}"),
        }
    }

    #[test]
    fn allow_interfaces_deny_and_opening_timeout() {
        let text = SEED
            .replace(
                r#"to = "192.168.0.2:80""#,
                r#"to = "192.168.0.2:80"
allow = ["198.51.100.0/24", "192.0.2.9"]
interfaces = ["gw-wan"]"#,
            )
            .replace("[datapath]", "[deny]\nnetworks = [\"203.0.113.128/25\"]\n\n[timeouts]\ntcp_opening = 20\n\n[datapath]");
        let config: Config = text.parse().expect("valid");
        let mapping = &config.mappings[0];
        assert_eq!(
            mapping.allow,
            [parse_network("198.51.100.0/24").unwrap(), parse_network("192.0.2.9/32").unwrap()]
        );
        assert_eq!(mapping.interfaces, ["gw-wan"]);
        assert_eq!(config.deny, [parse_network("203.0.113.128/25").unwrap()]);
        assert_eq!(config.timeouts.tcp_opening, 20);
        assert_eq!(config.timeouts.tcp_transitory, DEFAULT_TIMEOUTS.tcp_transitory);
        assert_eq!(
            mapping.to_string(),
            "tcp 203.0.113.1:80 -> 192.168.0.2:80 from 198.51.100.0/24,192.0.2.9/32 on gw-wan"
        );
    }
    #[rstest]
    #[case::nothing_given("", AttachMode::Auto, &[], None)]
    #[case::attach_xdp("[datapath]\nattach = \"xdp\"\n", AttachMode::Xdp, &[], None)]
    #[case::attach_tc("[datapath]\nattach = \"tc\"\n", AttachMode::Tc, &[], None)]
    #[case::per_interface(
        "[datapath]\nattach = \"auto\"\n[datapath.interfaces]\ngw-wan = \"tc\"\ngw-lan = \"xdp\"\n",
        AttachMode::Auto,
        &[("gw-lan", AttachMode::Xdp), ("gw-wan", AttachMode::Tc)],
        None
    )]
    #[case::only_per_interface(
        "[datapath.interfaces]\ngw-wan = \"tc\"\n",
        AttachMode::Auto,
        &[("gw-wan", AttachMode::Tc)],
        None
    )]
    #[case::empty_legacy_table("[xdp]\n", AttachMode::Auto, &[], None)]
    #[case::legacy_native("[xdp]\nmode = \"native\"\n", AttachMode::Xdp, &[], Some("native"))]
    #[case::legacy_auto("[xdp]\nmode = \"auto\"\n", AttachMode::Auto, &[], Some("auto"))]
    #[case::legacy_with_per_interface(
        "[xdp]\nmode = \"native\"\n[datapath.interfaces]\ngw-wan = \"tc\"\n",
        AttachMode::Xdp,
        &[("gw-wan", AttachMode::Tc)],
        Some("native")
    )]
    fn attach_modes(
        #[case] section: &str,
        #[case] default: AttachMode,
        #[case] interfaces: &[(&str, AttachMode)],
        #[case] legacy: Option<&str>,
    ) {
        let text = format!("{}\n{section}", SEED.replace("[datapath]\nattach = \"auto\"", ""));
        let config: Config = text.parse().unwrap_or_else(|e| panic!("{section:?}: {e}"));
        assert_eq!(config.attach.default, default);
        let expected: BTreeMap<String, AttachMode> =
            interfaces.iter().map(|(name, mode)| (name.to_string(), *mode)).collect();
        assert_eq!(config.attach.interfaces, expected);
        assert_eq!(config.legacy_xdp_mode.as_deref(), legacy);
        for (name, mode) in interfaces {
            assert_eq!(config.attach.mode_for(name), *mode);
        }
        let warnings = config.warnings();
        match legacy {
            Some(old) => {
                assert_eq!(warnings.len(), 1, "{warnings:?}");
                let wanted = format!("attach = \"{default}\"");
                assert!(warnings[0].contains(old) && warnings[0].contains(&wanted), "{warnings:?}");
                assert!(!warnings[0].contains('\n'), "not one line: {warnings:?}");
            }
            None => assert!(warnings.is_empty(), "{warnings:?}"),
        }
    }

    #[test]
    fn the_example_configuration_parses_without_warnings() {
        let config: Config =
            include_str!("../../../examples/hairpin.toml").parse().expect("the example is valid");
        assert_eq!(config.attach, Attach::default());
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    }

    #[test]
    fn skb_mode_is_refused_saying_why_and_what_to_use() {
        let text = SEED.replace("[datapath]\nattach = \"auto\"", "[xdp]\nmode = \"skb\"");
        let error = text.parse::<Config>().expect_err("skb mode accepted").to_string();
        for wanted in ["skb", "GRO", "CHECKSUM_PARTIAL", "attach = \"tc\""] {
            assert!(error.contains(wanted), "{error:?} does not say {wanted:?}");
        }
    }
}
