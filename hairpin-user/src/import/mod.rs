//! Port forwards from `iptables-save` output: the DNAT rules of the `nat`
//! table that hairpin can take over, as mappings, and every other rule of
//! that table with the reason it was left out.

pub mod nft;

use std::net::Ipv4Addr;

use crate::config::{Mapping, PortRange, Proto, parse_endpoint, parse_network, parse_port_range};

/// What an import found: the DNAT rules turned into mappings, in the order of
/// the input, and the rules left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub mappings: Vec<Mapping>,
    pub skipped: Vec<Skipped>,
}

/// A rule of the `nat` table that did not become a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number in the input.
    pub line: usize,
    /// The rule as written, without surrounding whitespace.
    pub rule: String,
    /// Why the rule was left out, for the operator.
    pub reason: String,
}

const SNAT_REASON: &str = "SNAT/MASQUERADE: hairpin does the hairpin SNAT itself";

/// Turns the `*nat` section of `iptables-save` output into mappings.
///
/// A rule becomes a mapping when it is a tcp or udp DNAT port forward of one
/// public address (`-d A` or `-d A/32`) and a port or port range (`--dport P`
/// or `--dport P1:P2`) to one server (`--to-destination S`, `S:P` or
/// `S:P1-P2`, `--to` too). Its conditions are kept or the rule is refused,
/// so that an import is never wider than its rule: `-s NET` becomes the
/// mapping's `allow`, `-i IFACE` its `interfaces` (IFACE must be one of
/// `interfaces`, the instance's LAN and WAN interfaces; without them, `-i`
/// is refused); `-m tcp`, `-m udp` and `-m comment` change nothing. Any
/// other match or option (`-o`, negations, `--sport`, other `-m` modules
/// such as `iprange`, `multiport`, `conntrack` or `addrtype`, ...) refuses the
/// rule with the reason. Public port `P1 + i` goes to server port `first + i`, where `first` is the
/// first `--to-destination` port, or `P1` when it names no port. That is what
/// a range-to-range DNAT is written for, and exactly what the kernel does
/// with the `S:P1-P2/BASE` form when BASE is the first public port; without
/// `/BASE` the kernel instead gives each connection the first free port of
/// the server's range.
///
/// DNAT rules of user chains are refused: the conditions of the rules that
/// jump to them would be lost. Every other `-A` rule of the `nat` table
/// is skipped with the reason, as is a mapping that overlaps one imported
/// from an earlier line. Other tables, chain declarations, comments and empty
/// lines are not rules and not reported.
#[must_use]
pub fn import_iptables_save(text: &str, interfaces: Option<&[String]>) -> Imported {
    let mut imported = Imported::default();
    let mut mapping_lines: Vec<usize> = Vec::new();
    // The mapping the last rule became, if it became one.
    let mut previous: Option<usize> = None;
    let mut table: Option<&str> = None;
    let mut user_chains: Vec<&str> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.trim());
            user_chains.clear();
            continue;
        }
        if line == "COMMIT" {
            table = None;
            continue;
        }
        if table != Some("nat") || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(declaration) = line.strip_prefix(':') {
            // `:NAME POLICY [packets:bytes]`, where only user chains have the policy `-`.
            let mut fields = declaration.split_whitespace();
            if let (Some(chain), Some("-")) = (fields.next(), fields.next()) {
                user_chains.push(chain);
            }
            continue;
        }
        let reason = match import_rule(line, &user_chains, interfaces) {
            Err(reason) => reason,
            Ok(mapping) => {
                // The same forward as the rule just before, for other sources:
                // one mapping allowing both. Only then: a rule in between could
                // have sent some of those sources elsewhere.
                if let Some(previous) = previous.and_then(|i| imported.mappings.get_mut(i))
                    && same_but_sources(previous, &mapping)
                {
                    let new: Vec<_> =
                        mapping.allow.into_iter().filter(|n| !previous.allow.contains(n)).collect();
                    previous.allow.extend(new);
                    continue;
                }
                let earlier = mapping_lines
                    .iter()
                    .zip(&imported.mappings)
                    .find(|(_, earlier)| earlier.overlaps(&mapping));
                match earlier {
                    None => {
                        previous = Some(imported.mappings.len());
                        imported.mappings.push(mapping);
                        mapping_lines.push(line_number);
                        continue;
                    }
                    Some((earlier_line, earlier)) => {
                        format!("{mapping} overlaps {earlier}, imported from line {earlier_line}")
                    }
                }
            }
        };
        previous = None;
        imported.skipped.push(Skipped { line: line_number, rule: line.to_string(), reason });
    }
    imported
}

/// Whether `a` and `b` are the same forward, both limited to sources, so
/// that one mapping allowing the sources of both is exactly the two rules.
fn same_but_sources(a: &Mapping, b: &Mapping) -> bool {
    !a.allow.is_empty()
        && !b.allow.is_empty()
        && Mapping { allow: Vec::new(), ..a.clone() } == Mapping { allow: Vec::new(), ..b.clone() }
}

/// The options of one rule that decide whether it is a port forward.
#[derive(Default)]
struct RuleOptions<'a> {
    protocol: Option<&'a str>,
    destination: Option<&'a str>,
    destination_ports: Option<&'a str>,
    target: Option<&'a str>,
    sources: Vec<&'a str>,
    in_interface: Option<&'a str>,
    to_destinations: Vec<&'a str>,
    random_ports: bool,
    /// The first condition or option hairpin cannot honour, as the reason to
    /// skip the rule.
    unsupported: Option<String>,
}

impl<'a> RuleOptions<'a> {
    fn parse(words: &'a [String]) -> Self {
        let mut rule = Self::default();
        let mut words = words.iter().map(String::as_str).peekable();
        while let Some(option) = words.next() {
            match option {
                "!" => {
                    let negated = words.peek().copied().unwrap_or_default();
                    rule.refuse(format!("the negated match `! {negated}` is not supported"));
                }
                "-p" | "--protocol" => rule.protocol = words.next(),
                "-d" | "--destination" | "--dst" => rule.destination = words.next(),
                "--dport" | "--destination-port" => rule.destination_ports = words.next(),
                "-s" | "--source" | "--src" => rule.sources.extend(words.next()),
                "-i" | "--in-interface" => rule.in_interface = words.next(),
                "--comment" => {
                    words.next();
                }
                "-m" | "--match" => match words.next() {
                    Some("tcp" | "udp" | "comment") => {}
                    Some("multiport") => rule.refuse("multiport is not supported"),
                    Some(other) => rule.refuse(format!("the match `-m {other}` is not supported")),
                    None => rule.refuse("`-m` without a match name"),
                },
                "--sport" | "--source-port" => {
                    words.next();
                    rule.refuse("a source port match (`--sport`) is not supported");
                }
                "-j" | "--jump" | "-g" | "--goto" => rule.target = words.next(),
                "--to-destination" | "--to" => rule.to_destinations.extend(words.next()),
                "--random" | "--random-fully" => rule.random_ports = true,
                "--persistent" => {}
                other if other.starts_with('-') => {
                    rule.refuse(format!("the option `{other}` is not supported"));
                }
                // An argument of an option refused above.
                _ => {}
            }
        }
        rule
    }

    fn refuse(&mut self, reason: impl Into<String>) {
        self.unsupported.get_or_insert_with(|| reason.into());
    }
}

/// The mapping of one rule line, or why it is not one.
fn import_rule(
    line: &str,
    user_chains: &[&str],
    interfaces: Option<&[String]>,
) -> Result<Mapping, String> {
    let words = split_words(line)?;
    let mut words = words.as_slice();
    // `iptables-save -c` puts the counters first: `[packets:bytes] -A ...`.
    if let [counters, rest @ ..] = words
        && counters.starts_with('[')
        && counters.ends_with(']')
    {
        words = rest;
    }
    let (chain, options) = match words {
        [append, chain, options @ ..] if append == "-A" || append == "--append" => {
            (chain.as_str(), options)
        }
        _ => return Err("not an `-A CHAIN` rule".into()),
    };
    let rule = RuleOptions::parse(options);
    match rule.target {
        Some("DNAT") => {}
        Some("SNAT" | "MASQUERADE") => return Err(SNAT_REASON.into()),
        Some("REDIRECT") => {
            return Err("REDIRECT goes to the gateway itself, not to a server".into());
        }
        Some(target) if user_chains.contains(&target) => {
            return Err(format!(
                "a jump to the user chain `{target}`: its DNAT rules are imported on their own, without this rule's conditions"
            ));
        }
        Some(target) => return Err(format!("the target `{target}` is not a DNAT port forward")),
        None => return Err("no target (`-j`): not a DNAT port forward".into()),
    }
    match chain {
        "OUTPUT" => {
            return Err(
                "DNAT in OUTPUT is for the gateway's own connections, which hairpin does not see"
                    .into(),
            );
        }
        "INPUT" | "POSTROUTING" => return Err(format!("DNAT is not valid in {chain}")),
        _ if user_chains.contains(&chain) => {
            return Err(format!(
                "a DNAT in the user chain `{chain}`: the conditions of the rules that jump to it cannot be kept"
            ));
        }
        _ => {}
    }
    if let Some(reason) = rule.unsupported {
        return Err(reason);
    }

    let proto: Proto = match rule.protocol {
        None => {
            return Err(
                "DNAT without `-p tcp` or `-p udp`: hairpin forwards tcp and udp ports only".into()
            );
        }
        Some(protocol) => protocol.parse().map_err(|_| {
            format!("the protocol `{protocol}` is not supported: hairpin forwards tcp and udp ports only")
        })?,
    };
    let (public, public_ports) = public_endpoint(rule.destination, rule.destination_ports)?;

    let to_destination = match rule.to_destinations.as_slice() {
        [one] => *one,
        [] => return Err("DNAT without `--to-destination`".into()),
        _ => {
            return Err(
                "several `--to-destination` addresses: hairpin forwards to one server".into()
            );
        }
    };
    let (to, to_ports) = server_endpoint(to_destination, public_ports)?;
    if to_ports.len() != public_ports.len() {
        return Err(if to_ports.len() == 1 {
            format!(
                "the {} public ports {public_ports} all go to the one server port {to_ports}: hairpin maps port ranges one to one",
                public_ports.len()
            )
        } else {
            format!(
                "{} public port(s) {public_ports} for the {} server ports {to_ports}: hairpin maps ranges of equal lengths one to one",
                public_ports.len(),
                to_ports.len()
            )
        });
    }
    if rule.random_ports && to_ports.len() > 1 {
        return Err(
            "`--random` picks a random server port: hairpin maps port ranges one to one".into()
        );
    }
    let allow = rule
        .sources
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| parse_network(s).map_err(|e| format!("`-s {s}`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let interfaces = match rule.in_interface {
        None => Vec::new(),
        Some(name) => {
            let written = format!("`-i {name}`");
            vec![managed_interface(&written, name, name.ends_with('+'), interfaces)?.to_string()]
        }
    };
    Ok(Mapping { proto, public, public_ports, to, to_ports, allow, interfaces })
}

/// `name`, which a rule's condition `written` names, if it is one of the
/// instance's `interfaces`; else why the rule cannot be kept.
pub(super) fn managed_interface<'a>(
    written: &str,
    name: &'a str,
    wildcard: bool,
    interfaces: Option<&[String]>,
) -> Result<&'a str, String> {
    if wildcard {
        return Err(format!(
            "{written} is a wildcard: hairpin binds a mapping to named interfaces"
        ));
    }
    match interfaces {
        None => Err(format!(
            "{written}: no running instance to say whether it is a LAN or WAN interface of hairpin's"
        )),
        Some(managed) if !managed.iter().any(|m| m == name) => Err(format!(
            "{written} is not an interface hairpin manages ({}): hairpin would never see the rule's packets",
            managed.join(", ")
        )),
        Some(_) => Ok(name),
    }
}

/// The public address (`-d`, one address) and ports (`--dport P` or `P1:P2`).
fn public_endpoint(
    destination: Option<&str>,
    destination_ports: Option<&str>,
) -> Result<(Ipv4Addr, PortRange), String> {
    let destination = destination
        .ok_or("DNAT without `-d`: hairpin publishes ports of one address, not of every address")?;
    let address = match destination.split_once('/') {
        None => destination,
        Some((address, "32")) => address,
        Some(_) => {
            return Err(format!(
                "`-d {destination}` is a network: hairpin publishes ports of one address"
            ));
        }
    };
    let address: Ipv4Addr =
        address.parse().map_err(|_| format!("`-d {destination}` is not an IPv4 address"))?;
    let ports = destination_ports
        .ok_or("DNAT without `--dport`: hairpin forwards given ports, not a whole address")?;
    // iptables-save writes port ranges with a colon, the config with a dash.
    let (first, last) = parse_port_range(&ports.replacen(':', "-", 1))
        .map_err(|e| format!("`--dport {ports}`: {e}"))?;
    parse_endpoint(&format!("{address}:{}", PortRange { first, last }))
        .map_err(|e| format!("`-d {destination}`: {e}"))
}

/// The server of `--to-destination ADDRESS[:PORTS[/BASE]]`; without PORTS the
/// server ports are the public ports.
fn server_endpoint(
    to_destination: &str,
    public_ports: PortRange,
) -> Result<(Ipv4Addr, PortRange), String> {
    let option = format!("`--to-destination {to_destination}`");
    let (address, ports) = match to_destination.split_once(':') {
        Some((address, ports)) => (address, Some(ports)),
        None => (to_destination, None),
    };
    if address.contains('-') {
        return Err(format!("{option} is an address range: hairpin forwards to one server"));
    }
    let address: Ipv4Addr =
        address.parse().map_err(|_| format!("{option}: `{address}` is not an IPv4 address"))?;
    let ports = match ports.map(|ports| ports.split_once('/').ok_or(ports)) {
        None => public_ports.to_string(),
        Some(Err(ports)) => ports.to_string(),
        // The kernel sends public port p to `first + (p - BASE) % len`.
        Some(Ok((ports, base))) => {
            if base.parse::<u16>().ok() != Some(public_ports.first) {
                return Err(format!(
                    "{option}: the base port {base} is not the first public port {}, so the ports do not map one to one",
                    public_ports.first
                ));
            }
            ports.to_string()
        }
    };
    parse_endpoint(&format!("{address}:{ports}")).map_err(|e| format!("{option}: {e}"))
}

/// Splits a rule into words as iptables-restore does: double quotes group
/// words, and inside them a backslash escapes the next character.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut in_quotes = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                // `""` is an empty word, not none.
                word.get_or_insert_with(String::new);
            }
            '\\' if in_quotes => {
                let escaped = chars.next().ok_or("unterminated double quote")?;
                word.get_or_insert_with(String::new).push(escaped);
            }
            c if c.is_whitespace() && !in_quotes => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if in_quotes {
        return Err("unterminated double quote".into());
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    /// The interfaces of the instance the tests import into.
    fn import(text: &str) -> Imported {
        import_iptables_save(text, Some(&["eth0".to_string(), "br-lan".to_string()]))
    }

    use rstest::rstest;

    use super::*;
    use crate::config::Config;

    fn mapping(proto: Proto, public: &str, to: &str) -> Mapping {
        let (public, public_ports) = parse_endpoint(public).expect("test setup: public endpoint");
        let (to, to_ports) = parse_endpoint(to).expect("test setup: server endpoint");
        Mapping::open(proto, (public, public_ports), (to, to_ports))
    }

    fn restricted(mapping: Mapping, allow: &[&str], interfaces: &[&str]) -> Mapping {
        Mapping {
            allow: allow.iter().map(|net| parse_network(net).expect("test setup: net")).collect(),
            interfaces: interfaces.iter().map(ToString::to_string).collect(),
            ..mapping
        }
    }

    /// One rule in a nat section: the rule is on line 4.
    fn nat_section(rule: &str) -> String {
        format!("*nat\n:PREROUTING ACCEPT [0:0]\n:FWD - [0:0]\n{rule}\nCOMMIT\n")
    }

    const SEED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 10:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -s 192.168.0.0/24 -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80
-A POSTROUTING -s 192.168.0.0/24 -d 192.168.0.0/24 -j SNAT --to-source 192.168.0.1
COMMIT
";

    #[test]
    fn seed_rules() {
        assert_eq!(
            import(SEED),
            Imported {
                mappings: vec![restricted(
                    mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80"),
                    &["192.168.0.0/24"],
                    &[]
                )],
                skipped: vec![Skipped {
                    line: 8,
                    rule: "-A POSTROUTING -s 192.168.0.0/24 -d 192.168.0.0/24 -j SNAT --to-source 192.168.0.1".into(),
                    reason: SNAT_REASON.into(),
                }],
            }
        );
    }

    #[test]
    fn crlf_line_endings_and_indentation() {
        let text = SEED.replace('\n', "\r\n  ");
        assert_eq!(import(&text), import(SEED));
    }

    #[rstest]
    #[case::wan_forward_with_interface(
        "-A PREROUTING -d 203.0.113.1/32 -i eth0 -p tcp -m tcp --dport 443 -j DNAT --to-destination 192.168.0.2:8443",
        restricted(mapping(Proto::Tcp, "203.0.113.1:443", "192.168.0.2:8443"), &[], &["eth0"])
    )]
    #[case::source_kept_as_allow(
        "-A PREROUTING -s 198.51.100.0/24 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5",
        restricted(mapping(Proto::Tcp, "203.0.113.1:22", "192.168.0.5:22"), &["198.51.100.0/24"], &[])
    )]
    #[case::source_address_and_lan_interface(
        "-A PREROUTING -s 192.168.0.9/32 -i br-lan -d 203.0.113.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 192.168.0.2",
        restricted(mapping(Proto::Udp, "203.0.113.1:53", "192.168.0.2:53"), &["192.168.0.9/32"], &["br-lan"])
    )]
    #[case::udp_range(
        "-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000-9099",
        mapping(Proto::Udp, "203.0.113.1:8000-8099", "192.168.0.2:9000-9099")
    )]
    #[case::range_with_base_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000-9099/8000",
        mapping(Proto::Tcp, "203.0.113.1:8000-8099", "192.168.0.2:9000-9099")
    )]
    #[case::no_server_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5",
        mapping(Proto::Tcp, "203.0.113.1:22", "192.168.0.5:22")
    )]
    #[case::no_server_port_range(
        "-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 5000:5009 -j DNAT --to-destination 192.168.0.3",
        mapping(Proto::Udp, "203.0.113.1:5000-5009", "192.168.0.3:5000-5009")
    )]
    #[case::destination_without_prefix_length(
        "-A PREROUTING -d 203.0.113.1 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2:8080",
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:8080")
    )]
    #[case::to_abbreviation(
        "-A PREROUTING -p tcp -d 203.0.113.1 --dport 80 -j DNAT --to 192.168.0.2:80",
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")
    )]
    #[case::long_options(
        "--append PREROUTING --source 192.168.0.0/24 --in-interface eth0 --destination 203.0.113.1/32 --protocol tcp --match tcp --destination-port 80 --jump DNAT --to-destination 192.168.0.2:80",
        restricted(mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80"), &["192.168.0.0/24"], &["eth0"])
    )]
    #[case::quoted_comment(
        r#"-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 443 -m comment --comment "web server" -j DNAT --to-destination 192.168.0.2:8443"#,
        mapping(Proto::Tcp, "203.0.113.1:443", "192.168.0.2:8443")
    )]
    #[case::quoted_comment_with_escapes_and_options(
        r#"-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -m comment --comment "say \"-j ACCEPT\" \\ ! -d" -j DNAT --to-destination 192.168.0.2"#,
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")
    )]
    #[case::unquoted_comment(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -m comment --comment web -j DNAT --to-destination 192.168.0.2",
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")
    )]
    #[case::counters(
        "[12:720] -A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80",
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")
    )]
    #[case::random_and_persistent_with_one_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2 --random --persistent",
        mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")
    )]
    #[case::whole_port_space(
        "-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 1:65535 -j DNAT --to-destination 192.168.0.2",
        mapping(Proto::Udp, "203.0.113.1:1-65535", "192.168.0.2:1-65535")
    )]
    fn dnat_port_forwards_become_mappings(#[case] rule: &str, #[case] expected: Mapping) {
        let imported = import(&nat_section(rule));
        assert_eq!(imported.skipped, []);
        assert_eq!(imported.mappings, [expected]);
    }

    #[rstest]
    #[case::masquerade("-A POSTROUTING -o eth0 -j MASQUERADE", SNAT_REASON)]
    #[case::masquerade_with_negation(
        "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        SNAT_REASON
    )]
    #[case::snat("-A POSTROUTING -o eth0 -j SNAT --to-source 203.0.113.1", SNAT_REASON)]
    #[case::multiport(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m multiport --dports 25,587 -j DNAT --to-destination 192.168.0.4",
        "multiport is not supported"
    )]
    #[case::negated_source(
        "-A PREROUTING ! -s 10.0.0.0/8 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5:22",
        "negated match `! -s`"
    )]
    #[case::negated_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp ! --dport 22 -j DNAT --to-destination 192.168.0.5",
        "negated match `! --dport`"
    )]
    #[case::range_to_one_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000",
        "the 100 public ports 8000-8099 all go to the one server port 9000"
    )]
    #[case::unequal_ranges(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8000:8009 -j DNAT --to-destination 192.168.0.2:9000-9004",
        "10 public port(s) 8000-8009 for the 5 server ports 9000-9004"
    )]
    #[case::one_port_to_a_range(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:8080-8081",
        "1 public port(s) 80 for the 2 server ports 8080-8081"
    )]
    #[case::base_port_not_the_first_public_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000-9099/8050",
        "the base port 8050 is not the first public port 8000"
    )]
    #[case::random_port_of_a_range(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8000:8001 -j DNAT --to-destination 192.168.0.2:9000-9001 --random",
        "`--random` picks a random server port"
    )]
    #[case::no_protocol(
        "-A PREROUTING -d 203.0.113.1/32 -j DNAT --to-destination 192.168.0.2",
        "DNAT without `-p tcp` or `-p udp`"
    )]
    #[case::other_protocol(
        "-A PREROUTING -d 203.0.113.1/32 -p sctp -m sctp --dport 80 -j DNAT --to-destination 192.168.0.2:80",
        "the match `-m sctp` is not supported"
    )]
    #[case::other_protocol_without_match(
        "-A PREROUTING -d 203.0.113.1/32 -p icmp -j DNAT --to-destination 192.168.0.2",
        "the protocol `icmp` is not supported"
    )]
    #[case::no_destination(
        "-A PREROUTING -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80",
        "DNAT without `-d`"
    )]
    #[case::destination_network(
        "-A PREROUTING -d 203.0.113.0/24 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "`-d 203.0.113.0/24` is a network"
    )]
    #[case::no_destination_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -j DNAT --to-destination 192.168.0.2",
        "DNAT without `--dport`"
    )]
    #[case::server_address_range(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.0.6-192.168.0.7:80",
        "`--to-destination 192.168.0.6-192.168.0.7:80` is an address range"
    )]
    #[case::several_servers(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2 --to-destination 192.168.0.3",
        "several `--to-destination` addresses"
    )]
    #[case::server_list(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2,192.168.0.3",
        "`192.168.0.2,192.168.0.3` is not an IPv4 address"
    )]
    #[case::no_server(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT",
        "DNAT without `--to-destination`"
    )]
    #[case::malformed_public_address(
        "-A PREROUTING -d 203.0.113.300/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "`-d 203.0.113.300/32` is not an IPv4 address"
    )]
    #[case::malformed_server_address(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.256:80",
        "`192.168.0.256` is not an IPv4 address"
    )]
    #[case::multicast_public_address(
        "-A PREROUTING -d 224.0.0.1/32 -p udp -m udp --dport 5353 -j DNAT --to-destination 192.168.0.2",
        "224.0.0.1 is not a unicast address"
    )]
    #[case::unspecified_server_address(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 0.0.0.0:80",
        "0.0.0.0 is not a unicast address"
    )]
    #[case::public_port_zero(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 0 -j DNAT --to-destination 192.168.0.2",
        "`--dport 0`: port 0 is not a valid port"
    )]
    #[case::server_port_zero(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:0",
        "port 0 is not a valid port"
    )]
    #[case::malformed_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport http -j DNAT --to-destination 192.168.0.2",
        "`http` is not a port or port range"
    )]
    #[case::source_port(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --sport 1024:65535 --dport 81 -j DNAT --to-destination 192.168.0.2:81",
        "source port match (`--sport`)"
    )]
    #[case::other_match(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the match `-m conntrack` is not supported"
    )]
    #[case::other_option(
        "-A PREROUTING -d 203.0.113.1/32 -f -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the option `-f` is not supported"
    )]
    #[case::output_chain(
        "-A OUTPUT -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "DNAT in OUTPUT is for the gateway's own connections"
    )]
    #[case::dnat_in_user_chain(
        "-A FWD -d 203.0.113.1/32 -p tcp -m tcp --dport 3389 -j DNAT --to-destination 192.168.0.8",
        "the conditions of the rules that jump to it cannot be kept"
    )]
    #[case::negated_interface(
        "-A PREROUTING ! -i eth0 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the negated match `! -i`"
    )]
    #[case::unmanaged_interface(
        "-A PREROUTING -i eth7 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "`-i eth7` is not an interface hairpin manages (eth0, br-lan)"
    )]
    #[case::interface_wildcard(
        "-A PREROUTING -i eth+ -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "`-i eth+` is a wildcard"
    )]
    #[case::out_interface(
        "-A PREROUTING -o eth0 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the option `-o` is not supported"
    )]
    #[case::source_range(
        "-A PREROUTING -m iprange --src-range 198.51.100.1-198.51.100.9 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the match `-m iprange` is not supported"
    )]
    #[case::local_destinations(
        "-A PREROUTING -m addrtype --dst-type LOCAL -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the match `-m addrtype` is not supported"
    )]
    #[case::conntrack_state(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m conntrack --ctstate NEW --dport 80 -j DNAT --to-destination 192.168.0.2",
        "the match `-m conntrack` is not supported"
    )]
    #[case::tcp_flags(
        "-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 --syn -j DNAT --to-destination 192.168.0.2",
        "the option `--syn` is not supported"
    )]
    #[case::bad_source(
        "-A PREROUTING -s 198.51.100.0/40 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2",
        "`-s 198.51.100.0/40`"
    )]
    #[case::jump_to_user_chain("-A PREROUTING -i eth0 -j FWD", "a jump to the user chain `FWD`")]
    #[case::goto_user_chain("-A PREROUTING -g FWD", "a jump to the user chain `FWD`")]
    #[case::redirect(
        "-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3128",
        "REDIRECT goes to the gateway itself"
    )]
    #[case::return_target("-A FWD -s 10.0.0.0/8 -j RETURN", "the target `RETURN` is not a DNAT")]
    #[case::undeclared_chain("-A PREROUTING -j NOWHERE", "the target `NOWHERE` is not a DNAT")]
    #[case::no_target("-A PREROUTING -d 203.0.113.1/32 -p tcp", "no target (`-j`)")]
    #[case::unterminated_quote(
        r#"-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -m comment --comment "web -j DNAT --to-destination 192.168.0.2"#,
        "unterminated double quote"
    )]
    #[case::not_an_append("-I PREROUTING 1 -j ACCEPT", "not an `-A CHAIN` rule")]
    #[case::append_without_chain("-A", "not an `-A CHAIN` rule")]
    #[case::chain_without_options("-A PREROUTING", "no target (`-j`)")]
    fn other_rules_are_skipped_with_the_reason(#[case] rule: &str, #[case] reason: &str) {
        let imported = import(&nat_section(rule));
        assert_eq!(imported.mappings, []);
        assert_eq!(imported.skipped.len(), 1, "{:?}", imported.skipped);
        let skipped = &imported.skipped[0];
        assert_eq!((skipped.line, skipped.rule.as_str()), (4, rule));
        assert!(skipped.reason.contains(reason), "`{}` does not say `{reason}`", skipped.reason);
    }

    #[test]
    fn other_tables_are_ignored() {
        let text = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
-A FORWARD -d 192.168.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
-A FORWARD -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.9
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
COMMIT
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 81 -j DNAT --to-destination 192.168.0.2:81
";
        assert_eq!(
            import(text),
            Imported {
                mappings: vec![mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80")],
                skipped: vec![],
            }
        );
    }

    #[rstest]
    #[case::nothing("")]
    #[case::declarations_comments_and_blank_lines(
        "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:FWD - [0:0]\n\n   \n# a comment\nCOMMIT\n# Completed\n"
    )]
    #[case::nat_table_without_commit("*nat\n:PREROUTING ACCEPT [0:0]\n")]
    fn lines_that_are_not_rules_are_not_reported(#[case] text: &str) {
        assert_eq!(import(text), Imported::default());
    }

    #[test]
    fn overlapping_mappings_are_skipped_naming_the_earlier_line() {
        let text = "\
*nat
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80
-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000-9099
-A PREROUTING -i eth0 -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80
-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 8099:8100 -j DNAT --to-destination 192.168.0.3
-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 80 -j DNAT --to-destination 192.168.0.2
-A PREROUTING -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.4
COMMIT
";
        let imported = import(text);
        assert_eq!(
            imported.mappings,
            [
                mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80"),
                mapping(Proto::Udp, "203.0.113.1:8000-8099", "192.168.0.2:9000-9099"),
                mapping(Proto::Udp, "203.0.113.1:80", "192.168.0.2:80"),
                mapping(Proto::Tcp, "198.51.100.1:80", "192.168.0.4:80"),
            ]
        );
        let skipped: Vec<_> =
            imported.skipped.iter().map(|s| (s.line, s.reason.as_str())).collect();
        assert_eq!(
            skipped,
            [
                (
                    4,
                    "tcp 203.0.113.1:80 -> 192.168.0.2:80 on eth0 overlaps tcp 203.0.113.1:80 -> 192.168.0.2:80, imported from line 2"
                ),
                (
                    5,
                    "udp 203.0.113.1:8099-8100 -> 192.168.0.3:8099-8100 overlaps udp 203.0.113.1:8000-8099 -> 192.168.0.2:9000-9099, imported from line 3"
                ),
            ]
        );
    }

    /// Produced by `iptables-save` v1.8.9 (nf_tables) in a scratch network
    /// namespace, from `iptables -t nat -A` commands (`--to` among them,
    /// which it writes as `--to-destination`).
    const REAL_IPTABLES_SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 18:21:45 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -d 192.168.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
COMMIT
# Completed on Fri Nov 27 18:21:45 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 18:21:45 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FWD - [0:0]
-A PREROUTING -s 192.168.0.0/24 -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.2:80
-A PREROUTING -d 203.0.113.1/32 -i eth0 -p tcp -m tcp --dport 443 -m comment --comment "web server" -j DNAT --to-destination 192.168.0.2:8443
-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 8000:8099 -j DNAT --to-destination 192.168.0.2:9000-9099
-A PREROUTING -d 203.0.113.1/32 -p udp -m udp --dport 5000:5009 -j DNAT --to-destination 192.168.0.3
-A PREROUTING -d 203.0.113.1/32 -p tcp -m multiport --dports 25,587 -j DNAT --to-destination 192.168.0.4
-A PREROUTING ! -s 10.0.0.0/8 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5:22
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp ! --dport 22 -j DNAT --to-destination 192.168.0.5
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.0.6-192.168.0.7:80
-A PREROUTING -j FWD
-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3128
-A PREROUTING -d 203.0.113.1/32 -p sctp -m sctp --dport 80 -j DNAT --to-destination 192.168.0.2:80
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --sport 1024:65535 --dport 81 -j DNAT --to-destination 192.168.0.2:81
-A POSTROUTING -s 192.168.0.0/24 -d 192.168.0.0/24 -j SNAT --to-source 192.168.0.1
-A POSTROUTING -o eth0 -j MASQUERADE
-A FWD -d 203.0.113.1/32 -p tcp -m tcp --dport 3389 -j DNAT --to-destination 192.168.0.8
COMMIT
# Completed on Fri Nov 27 18:21:45 2026
"#;

    #[test]
    fn real_iptables_save_output() {
        let imported = import(REAL_IPTABLES_SAVE);
        assert_eq!(
            imported.mappings,
            [
                restricted(
                    mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80"),
                    &["192.168.0.0/24"],
                    &[]
                ),
                restricted(
                    mapping(Proto::Tcp, "203.0.113.1:443", "192.168.0.2:8443"),
                    &[],
                    &["eth0"]
                ),
                mapping(Proto::Udp, "203.0.113.1:8000-8099", "192.168.0.2:9000-9099"),
                mapping(Proto::Udp, "203.0.113.1:5000-5009", "192.168.0.3:5000-5009"),
            ]
        );
        let expected_skips = [
            (20, "multiport is not supported"),
            (21, "the negated match `! -s` is not supported"),
            (22, "the negated match `! --dport` is not supported"),
            (23, "is an address range"),
            (24, "a jump to the user chain `FWD`"),
            (25, "REDIRECT goes to the gateway itself"),
            (26, "the match `-m sctp` is not supported"),
            (27, "source port match (`--sport`)"),
            (28, SNAT_REASON),
            (29, SNAT_REASON),
            (30, "the conditions of the rules that jump to it cannot be kept"),
        ];
        assert_eq!(imported.skipped.len(), expected_skips.len(), "{:#?}", imported.skipped);
        let lines: Vec<&str> = REAL_IPTABLES_SAVE.lines().collect();
        for (skipped, (line, reason)) in imported.skipped.iter().zip(expected_skips) {
            assert_eq!(skipped.line, line, "{skipped:?}");
            assert_eq!(skipped.rule, lines[line - 1]);
            assert!(skipped.reason.contains(reason), "line {line}: `{}`", skipped.reason);
        }
    }

    #[test]
    fn one_forward_for_several_sources_is_one_mapping_allowing_them_all() {
        let text = "\
*nat
-A PREROUTING -s 198.51.100.0/24 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5
-A PREROUTING -s 192.0.2.7/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5
-A PREROUTING -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5
-A PREROUTING -s 192.0.2.8/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.6
-A PREROUTING -s 192.0.2.9/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 22 -j DNAT --to-destination 192.168.0.5
COMMIT
";
        let imported = import(text);
        assert_eq!(
            imported.mappings,
            [restricted(
                mapping(Proto::Tcp, "203.0.113.1:22", "192.168.0.5:22"),
                &["198.51.100.0/24", "192.0.2.7/32"],
                &[]
            )]
        );
        let skipped: Vec<usize> = imported.skipped.iter().map(|s| s.line).collect();
        assert_eq!(
            skipped,
            [4, 5, 6],
            "an open rule and another server overlap, and after them the same forward \
             is not merged (the rules between sent its sources elsewhere): {imported:?}"
        );
    }

    #[test]
    fn without_an_instance_interface_rules_are_refused() {
        let rule = "-A PREROUTING -i eth0 -d 203.0.113.1/32 -p tcp --dport 80 -j DNAT --to-destination 192.168.0.2";
        let imported = import_iptables_save(&nat_section(rule), None);
        assert_eq!(imported.mappings, []);
        assert!(
            imported.skipped[0].reason.contains("no running instance"),
            "{:?}",
            imported.skipped
        );
    }

    #[test]
    fn imported_mappings_pass_the_config_validation() {
        let mut text = String::from(
            "[lan]\ninterface = \"br-lan\"\nnetworks = [\"192.168.0.0/24\"]\naddress = \"192.168.0.1\"\n\n[wan]\ninterface = \"eth0\"\n",
        );
        let imported = import(REAL_IPTABLES_SAVE);
        let quoted = |items: Vec<String>| {
            items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
        };
        for m in &imported.mappings {
            text += &format!(
                "\n[[mapping]]\nproto = \"{}\"\npublic = \"{}:{}\"\nto = \"{}:{}\"\nallow = [{}]\ninterfaces = [{}]\n",
                m.proto,
                m.public,
                m.public_ports,
                m.to,
                m.to_ports,
                quoted(m.allow.iter().map(ToString::to_string).collect()),
                quoted(m.interfaces.clone()),
            );
        }
        let config: Config = text.parse().expect("the imported mappings are a valid config");
        assert_eq!(config.mappings, imported.mappings);
    }

    #[rstest]
    #[case::plain("-A  PREROUTING\t-j DNAT", &["-A", "PREROUTING", "-j", "DNAT"])]
    #[case::quoted(r#"--comment "web server" -j"#, &["--comment", "web server", "-j"])]
    #[case::escapes(r#""say \"hi\" \\ back""#, &[r#"say "hi" \ back"#])]
    #[case::empty_quotes(r#"--comment """#, &["--comment", ""])]
    #[case::backslash_outside_quotes(r"a\b", &[r"a\b"])]
    fn words_respect_double_quotes(#[case] line: &str, #[case] expected: &[&str]) {
        assert_eq!(split_words(line).expect("valid words"), expected);
    }
}
