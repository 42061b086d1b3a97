//! The configuration file's shape, typed with serde: what a value must be
//! (an address, a network, a port range, a number in range) is checked as
//! it is read, and an error names the value's key path
//! (`mapping[1].allow[0]`, through serde_path_to_error). What needs more
//! than one value (overlapping mappings, an interface a mapping names, the
//! deprecated `[xdp] mode`) is checked after, in [`parse`].

use std::{collections::BTreeMap, net::Ipv4Addr, net::SocketAddr};

use serde::Deserialize;

use super::{
    Attach, AttachMode, Config, ConfigError, DEFAULT_SNAT_PORTS, DEFAULT_TIMEOUTS, Ipv4Net, Lan,
    Mapping, PortRange, Proto, Timeouts, Wan, invalid, parse_endpoint, parse_network,
    parse_port_range,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    lan: LanFile,
    wan: Option<WanFile>,
    /// The deprecated name of `[datapath] attach`.
    xdp: Option<XdpFile>,
    #[serde(default)]
    datapath: DatapathFile,
    #[serde(default)]
    conntrack: ConntrackFile,
    #[serde(default)]
    timeouts: TimeoutsFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    deny: DenyFile,
    #[serde(default)]
    mapping: Vec<MappingFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LanFile {
    /// `interfaces`, or `interface` for one: either, not both.
    interfaces: Option<Vec<InterfaceName>>,
    interface: Option<InterfaceName>,
    networks: Vec<Network>,
    address: SourceAddress,
    #[serde(default = "default_snat_ports")]
    snat_ports: Ports,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WanFile {
    interface: InterfaceName,
    #[serde(default)]
    addresses: Vec<Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct XdpFile {
    mode: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatapathFile {
    /// Absent and `"auto"` differ only next to `[xdp] mode`.
    attach: Option<AttachMode>,
    #[serde(default)]
    interfaces: BTreeMap<String, AttachMode>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConntrackFile {
    #[serde(default)]
    capacity: Capacity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    #[serde(default = "default_tcp_established")]
    tcp_established: Seconds,
    #[serde(default = "default_tcp_transitory")]
    tcp_transitory: Seconds,
    #[serde(default = "default_tcp_opening")]
    tcp_opening: Seconds,
    #[serde(default = "default_udp")]
    udp: Seconds,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self {
            tcp_established: default_tcp_established(),
            tcp_transitory: default_tcp_transitory(),
            tcp_opening: default_tcp_opening(),
            udp: default_udp(),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<ListenAddress>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    #[serde(default)]
    networks: Vec<Network>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    proto: ProtoName,
    public: Endpoint,
    to: Endpoint,
    #[serde(default)]
    allow: Vec<Network>,
    #[serde(default)]
    interfaces: Vec<String>,
}

/// A value written as text and read by one of the parsers the command
/// line shares (its errors are theirs).
macro_rules! read_as_text {
    ($(#[$doc:meta])* $name:ident($inner:ty) by $parse:expr) => {
        $(#[$doc])*
        #[derive(Deserialize)]
        #[serde(try_from = "String")]
        struct $name($inner);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                $parse(&text).map($name)
            }
        }
    };
}

read_as_text!(
    /// A network, as [`parse_network`] reads it.
    Network(Ipv4Net) by parse_network
);
read_as_text!(
    /// An address and a port or port range, as [`parse_endpoint`] reads it.
    Endpoint((Ipv4Addr, PortRange)) by parse_endpoint
);
read_as_text!(
    /// A port range, as [`parse_port_range`] reads it.
    Ports((u16, u16)) by parse_port_range
);
read_as_text!(
    /// `tcp` or `udp`.
    ProtoName(Proto) by str::parse::<Proto>
);

fn default_snat_ports() -> Ports {
    Ports(DEFAULT_SNAT_PORTS)
}

/// A name the kernel could give an interface.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct InterfaceName(String);

impl TryFrom<String> for InterfaceName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(format!("`{name}` is not a valid interface name"));
        }
        Ok(InterfaceName(name))
    }
}

/// An address packets can come from: not 0.0.0.0, broadcast or multicast.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct SourceAddress(Ipv4Addr);

impl TryFrom<String> for SourceAddress {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let address: Ipv4Addr =
            text.parse().map_err(|_| format!("`{text}` is not an IPv4 address"))?;
        if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
            return Err(format!("{address} cannot be a source address"));
        }
        Ok(SourceAddress(address))
    }
}

/// Where the metrics endpoint listens.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct ListenAddress(SocketAddr);

impl TryFrom<String> for ListenAddress {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
            .map(ListenAddress)
            .map_err(|_| format!("`{text}` is not an address and port (like 127.0.0.1:9654)"))
    }
}

/// Entries per conntrack table: 16 to 2^24.
#[derive(Deserialize)]
#[serde(try_from = "i64")]
struct Capacity(u32);

impl Default for Capacity {
    fn default() -> Self {
        Capacity(hairpin_common::DEFAULT_CONNTRACK_CAPACITY)
    }
}

impl TryFrom<i64> for Capacity {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        match u32::try_from(n) {
            Ok(n) if (16..=1 << 24).contains(&n) => Ok(Capacity(n)),
            _ => Err(format!("{n} is out of range (16 to 16777216 entries)")),
        }
    }
}

/// A timeout: 1 s to 30 days.
#[derive(Deserialize)]
#[serde(try_from = "i64")]
struct Seconds(u64);

impl TryFrom<i64> for Seconds {
    type Error = String;
    fn try_from(s: i64) -> Result<Self, String> {
        match u64::try_from(s) {
            Ok(s) if (1..=30 * 86_400).contains(&s) => Ok(Seconds(s)),
            _ => Err(format!("{s} is out of range (1 to 2592000 seconds)")),
        }
    }
}

fn default_tcp_established() -> Seconds {
    Seconds(DEFAULT_TIMEOUTS.tcp_established)
}
fn default_tcp_transitory() -> Seconds {
    Seconds(DEFAULT_TIMEOUTS.tcp_transitory)
}
fn default_tcp_opening() -> Seconds {
    Seconds(DEFAULT_TIMEOUTS.tcp_opening)
}
fn default_udp() -> Seconds {
    Seconds(DEFAULT_TIMEOUTS.udp)
}

/// What to say of a key that must be given and is not.
fn missing_hint(key: &str) -> &'static str {
    match key {
        "lan.networks" => "missing: list the LAN networks to hairpin",
        "lan.address" => "missing: the gateway's LAN address (the SNAT source)",
        "wan.interface" => "missing: name the WAN interface",
        key if key.ends_with(".proto") => "missing: tcp or udp",
        key if key.ends_with(".public") => "missing: the published address and port",
        key if key.ends_with(".to") => "missing: the server's address and port",
        _ => "missing",
    }
}

/// Parses and checks a configuration.
pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    let file: ConfigFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|error| read_error(text, &error))?;
    let lan = file.lan.into_lan()?;
    let wan = file.wan.map(|wan| Wan { interface: wan.interface.0, addresses: wan.addresses });
    let managed: Vec<&str> = lan
        .interfaces
        .iter()
        .chain(wan.as_ref().map(|w| &w.interface))
        .map(String::as_str)
        .collect();
    let legacy_xdp_mode = file.xdp.and_then(|xdp| xdp.mode);
    let attach = attach(file.datapath, legacy_xdp_mode.as_deref(), &managed)?;
    let t = file.timeouts;
    let timeouts = Timeouts {
        tcp_established: t.tcp_established.0,
        tcp_transitory: t.tcp_transitory.0,
        udp: t.udp.0,
        tcp_opening: t.tcp_opening.0,
    };
    let mut mappings: Vec<Mapping> = Vec::new();
    let mut published_ports = 0u32;
    for (index, mapping) in file.mapping.into_iter().enumerate() {
        let mapping = mapping.into_mapping(index, &managed)?;
        if let Some(other) = mappings.iter().position(|m| m.overlaps(&mapping)) {
            return Err(invalid(
                format!("mapping[{index}].public"),
                format!(
                    "{} {}:{} is already published by mapping[{other}]",
                    mapping.proto, mapping.public, mapping.public_ports
                ),
            ));
        }
        published_ports += mapping.public_ports.len();
        if published_ports > hairpin_common::MAX_MAPPINGS {
            return Err(invalid(
                format!("mapping[{index}].public"),
                format!("more than {} published ports in all", hairpin_common::MAX_MAPPINGS),
            ));
        }
        mappings.push(mapping);
    }
    let deny: Vec<Ipv4Net> = file.deny.networks.into_iter().map(|net| net.0).collect();
    if deny.len() > hairpin_common::MAX_DENY_NETWORKS as usize {
        return Err(invalid(
            "deny.networks",
            format!("more than {} networks", hairpin_common::MAX_DENY_NETWORKS),
        ));
    }
    Ok(Config {
        lan,
        wan,
        attach,
        legacy_xdp_mode,
        conntrack_capacity: file.conntrack.capacity.0,
        timeouts,
        metrics_listen: file.metrics.listen.map(|listen| listen.0),
        mappings,
        deny,
    })
}

impl LanFile {
    fn into_lan(self) -> Result<Lan, ConfigError> {
        let names = match (self.interfaces, self.interface) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "lan.interface",
                    "give either `interface` or `interfaces`, not both",
                ));
            }
            (Some(list), None) => list,
            (None, Some(one)) => vec![one],
            (None, None) => {
                return Err(invalid("lan.interfaces", "missing: name the LAN interface(s)"));
            }
        };
        if names.is_empty() {
            return Err(invalid("lan.interfaces", "empty: name at least one LAN interface"));
        }
        let mut interfaces: Vec<String> = Vec::new();
        for (index, InterfaceName(name)) in names.into_iter().enumerate() {
            if interfaces.contains(&name) {
                return Err(invalid(
                    format!("lan.interfaces[{index}]"),
                    format!("`{name}` is listed twice"),
                ));
            }
            interfaces.push(name);
        }
        if self.networks.is_empty() {
            return Err(invalid("lan.networks", "empty: list at least one LAN network"));
        }
        Ok(Lan {
            interfaces,
            networks: self.networks.into_iter().map(|net| net.0).collect(),
            address: self.address.0,
            snat_ports: self.snat_ports.0,
        })
    }
}

impl MappingFile {
    fn into_mapping(self, index: usize, managed: &[&str]) -> Result<Mapping, ConfigError> {
        let key = |field: &str| format!("mapping[{index}].{field}");
        let (Endpoint((public, public_ports)), Endpoint((to, to_ports))) = (self.public, self.to);
        if public_ports.len() != to_ports.len() {
            return Err(invalid(
                key("to"),
                format!(
                    "{} port(s) for the {} public port(s) {public}:{public_ports}: the ranges must have equal lengths",
                    to_ports.len(),
                    public_ports.len()
                ),
            ));
        }
        let mut interfaces: Vec<String> = Vec::new();
        for (i, name) in self.interfaces.into_iter().enumerate() {
            let key = key(&format!("interfaces[{i}]"));
            if !managed.contains(&name.as_str()) {
                return Err(invalid(
                    key,
                    format!(
                        "`{name}` is not a configured LAN or WAN interface (those are {})",
                        managed.join(", ")
                    ),
                ));
            }
            if interfaces.contains(&name) {
                return Err(invalid(key, format!("`{name}` is listed twice")));
            }
            interfaces.push(name);
        }
        Ok(Mapping {
            proto: self.proto.0,
            public,
            public_ports,
            to,
            to_ports,
            allow: self.allow.into_iter().map(|net| net.0).collect(),
            interfaces,
        })
    }
}

/// `[datapath]`, or what the deprecated `[xdp] mode` means in its terms.
fn attach(
    datapath: DatapathFile,
    legacy_xdp_mode: Option<&str>,
    managed: &[&str],
) -> Result<Attach, ConfigError> {
    let default = match (legacy_xdp_mode, datapath.attach) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "xdp.mode",
                "give `[datapath] attach` only: `[xdp] mode` is its deprecated former name",
            ));
        }
        (None, attach) => attach.unwrap_or_default(),
        (Some("auto"), None) => AttachMode::Auto,
        (Some("native"), None) => AttachMode::Xdp,
        (Some("skb"), None) => {
            return Err(invalid(
                "xdp.mode",
                "`skb` (generic XDP) is no longer supported: it breaks GRO aggregates and \
                 offloaded (CHECKSUM_PARTIAL) checksums; use `[datapath] attach = \"tc\"`",
            ));
        }
        (Some(other), None) => {
            return Err(invalid(
                "xdp.mode",
                format!(
                    "unknown mode `{other}` (`[xdp] mode` is deprecated: use `[datapath] attach = \"auto\" | \"xdp\" | \"tc\"`)"
                ),
            ));
        }
    };
    for name in datapath.interfaces.keys() {
        if !managed.contains(&name.as_str()) {
            return Err(invalid(
                format!("datapath.interfaces.{name}"),
                format!(
                    "`{name}` is not a configured LAN or WAN interface (those are {})",
                    managed.join(", ")
                ),
            ));
        }
    }
    Ok(Attach { default, interfaces: datapath.interfaces })
}

/// A reading error on one line: where, whose value (its key path), and
/// what; a syntax error has no key.
fn read_error(text: &str, error: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let inner = error.inner();
    let message = inner.message().trim().replace('\n', "; ");
    let path = error.path().to_string();
    let key = (path != ".").then_some(path);
    // "missing field `x`" is said of the table: name the key instead.
    let (key, message) = match (key, message.strip_prefix("missing field `")) {
        (key, Some(rest)) => {
            let field = rest.trim_end_matches('`');
            let key = match key {
                Some(table) => format!("{table}.{field}"),
                None => field.to_string(),
            };
            let hint = missing_hint(&key);
            (Some(key), hint.to_string())
        }
        (key, None) => (key, message),
    };
    let place = inner.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    let place = place.unwrap_or_default();
    ConfigError::Syntax(match key {
        Some(key) => format!("{place}`{key}`: {message}"),
        None => format!("{place}{message}"),
    })
}
