//! Port forwards from nftables: the `dnat` rules of NAT prerouting chains in
//! `nft -j list ruleset` output, as mappings, and every other rule of a NAT
//! chain with the reason it was left out.
//!
//! As with iptables, an import is never wider than its rule: `ip saddr`
//! (an address, a prefix or a set of them) becomes the mapping's `allow`,
//! `iifname` its `interfaces`; a counter changes nothing. Anything else (a
//! negation, a set of ports, `fib daddr type local`, `oifname`, a `log`,
//! several servers, ...) refuses the rule with the reason.

use std::net::Ipv4Addr;

use serde_json::Value;

use crate::config::{Ipv4Net, Mapping, PortRange, Proto, parse_network};

/// What an import of a ruleset found, in the order of the ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftImported {
    pub mappings: Vec<Mapping>,
    pub skipped: Vec<NftSkipped>,
}

/// A rule of a NAT chain that did not become a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSkipped {
    /// `family table chain`, e.g. `ip nat prerouting`.
    pub chain: String,
    /// The rule's handle (`nft -a list ruleset` shows it).
    pub handle: u64,
    /// Why the rule was left out, for the operator.
    pub reason: String,
}

/// Why a whole ruleset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not `nft -j list ruleset` output: no `nftables` array")]
    NotRuleset,
}

/// A chain of the ruleset, as far as the import cares.
struct Chain {
    family: String,
    table: String,
    name: String,
    kind: ChainKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChainKind {
    /// `type nat hook prerouting` of an `ip` or `inet` table: port forwards.
    NatPrerouting,
    /// Another NAT base chain, or a user chain of a table that has NAT
    /// chains: its rules are reported, none imported.
    OtherNat,
    /// Filter chains, other families: not NAT, not reported.
    Other,
}

/// Turns the `dnat` rules of the ruleset's NAT prerouting chains into
/// mappings. `interfaces` are the instance's LAN and WAN interfaces, which
/// an `iifname` must name; without them an `iifname` rule is refused.
/// IPv6 (`ip6`) tables are not read.
pub fn import_nft_ruleset(
    json: &str,
    interfaces: Option<&[String]>,
) -> Result<NftImported, NftError> {
    let ruleset: Value = serde_json::from_str(json)?;
    let items = ruleset.get("nftables").and_then(Value::as_array).ok_or(NftError::NotRuleset)?;
    let text =
        |value: &Value, key: &str| value.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let declared: Vec<&Value> = items.iter().filter_map(|item| item.get("chain")).collect();
    let ipv4 = |chain: &Value| matches!(text(chain, "family").as_str(), "ip" | "inet");
    let nat_tables: Vec<(String, String)> = declared
        .iter()
        .filter(|chain| ipv4(chain) && text(chain, "type") == "nat")
        .map(|chain| (text(chain, "family"), text(chain, "table")))
        .collect();
    let chains: Vec<Chain> = declared
        .iter()
        .map(|chain| {
            let (family, table) = (text(chain, "family"), text(chain, "table"));
            let kind = match (text(chain, "type").as_str(), text(chain, "hook").as_str()) {
                _ if !ipv4(chain) => ChainKind::Other,
                ("nat", "prerouting") => ChainKind::NatPrerouting,
                ("nat", _) => ChainKind::OtherNat,
                ("", _) if nat_tables.contains(&(family.clone(), table.clone())) => {
                    ChainKind::OtherNat
                }
                _ => ChainKind::Other,
            };
            Chain { family, table, name: text(chain, "name"), kind }
        })
        .collect();
    let mut imported = NftImported::default();
    let mut handles: Vec<u64> = Vec::new();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let Some(chain) = chains.iter().find(|c| {
            c.family == text(rule, "family")
                && c.table == text(rule, "table")
                && c.name == text(rule, "chain")
        }) else {
            continue;
        };
        let exprs = rule.get("expr").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        let has = |name: &str| exprs.iter().any(|e| e.get(name).is_some());
        let reason = match chain.kind {
            ChainKind::Other => continue,
            ChainKind::OtherNat if has("dnat") => Some(
                "dnat outside a NAT prerouting chain: the conditions that lead to it would be lost"
                    .to_string(),
            ),
            ChainKind::OtherNat if has("masquerade") || has("snat") => {
                Some(super::SNAT_REASON.to_string())
            }
            ChainKind::OtherNat => Some("no dnat".to_string()),
            ChainKind::NatPrerouting => match forward(exprs, interfaces) {
                Err(reason) => Some(reason),
                Ok(mapping) => match imported.mappings.iter().position(|m| m.overlaps(&mapping)) {
                    Some(earlier) => Some(format!(
                        "overlaps the mapping of rule handle {} ({})",
                        handles[earlier], imported.mappings[earlier]
                    )),
                    None => {
                        imported.mappings.push(mapping);
                        handles.push(rule.get("handle").and_then(Value::as_u64).unwrap_or(0));
                        None
                    }
                },
            },
        };
        if let Some(reason) = reason {
            imported.skipped.push(NftSkipped {
                chain: format!("{} {} {}", chain.family, chain.table, chain.name),
                handle: rule.get("handle").and_then(Value::as_u64).unwrap_or(0),
                reason,
            });
        }
    }
    Ok(imported)
}

/// What the conditions of a rule said so far.
#[derive(Default)]
struct Conditions {
    public: Option<Ipv4Addr>,
    proto: Option<Proto>,
    public_ports: Option<PortRange>,
    allow: Vec<Ipv4Net>,
    interfaces: Vec<String>,
    server: Option<(Ipv4Addr, Option<PortRange>)>,
}

/// The mapping a prerouting rule is, or why it is none.
fn forward(exprs: &[Value], interfaces: Option<&[String]>) -> Result<Mapping, String> {
    let mut c = Conditions::default();
    for expr in exprs {
        let Some((kind, body)) = expr.as_object().and_then(|o| o.iter().next()) else {
            return Err(format!("`{expr}`: not an expression hairpin reads"));
        };
        match kind.as_str() {
            "match" => condition(&mut c, body, interfaces)?,
            "counter" => {}
            "dnat" => {
                if c.server.is_some() {
                    return Err("two dnat statements".into());
                }
                c.server = Some(dnat(body)?);
            }
            "jump" | "goto" => {
                return Err(format!(
                    "{kind} to a user chain: its rules are not imported, the conditions of this one would be lost"
                ));
            }
            "masquerade" | "snat" => return Err(super::SNAT_REASON.into()),
            other => return Err(format!("`{other}`: a statement hairpin does not carry out")),
        }
    }
    let Some((to, to_ports)) = c.server else {
        return Err("no dnat".into());
    };
    let public = c.public.ok_or("no `ip daddr`: hairpin needs the public address")?;
    let proto = c.proto.ok_or("no `tcp dport` or `udp dport`: hairpin forwards ports")?;
    let public_ports = c.public_ports.ok_or("no destination port: hairpin forwards ports")?;
    let to_ports = to_ports.unwrap_or(public_ports);
    if to_ports.len() != public_ports.len() {
        return Err(format!(
            "{} public port(s) to {} server port(s): hairpin maps ports one to one",
            public_ports.len(),
            to_ports.len()
        ));
    }
    Ok(Mapping {
        proto,
        public,
        public_ports,
        to,
        to_ports,
        allow: c.allow,
        interfaces: c.interfaces,
    })
}

/// One `match`: kept in `c`, or the reason the rule cannot be kept.
fn condition(
    c: &mut Conditions,
    body: &Value,
    interfaces: Option<&[String]>,
) -> Result<(), String> {
    let (left, right) = (&body["left"], &body["right"]);
    let described = || format!("`{left} {} {right}`", body["op"].as_str().unwrap_or("?"));
    if body["op"].as_str() != Some("==") {
        return Err(format!("{}: negations and comparisons cannot be kept", described()));
    }
    let payload = |protocol: &str, field: &str| {
        left["payload"]["protocol"].as_str() == Some(protocol)
            && left["payload"]["field"].as_str() == Some(field)
    };
    if payload("ip", "daddr") {
        let net = network(right).ok_or_else(|| format!("{}: not one address", described()))?;
        if net.prefix_len() != 32 || c.public.is_some() {
            return Err(format!("{}: hairpin publishes one address per mapping", described()));
        }
        c.public = Some(net.addr());
    } else if payload("ip", "saddr") {
        let nets: Option<Vec<Ipv4Net>> = match right.get("set").and_then(Value::as_array) {
            Some(set) => set.iter().map(network).collect(),
            None => network(right).map(|net| vec![net]),
        };
        let nets = nets.ok_or_else(|| format!("{}: not addresses or networks", described()))?;
        if !c.allow.is_empty() {
            return Err(format!("{}: a second source condition", described()));
        }
        c.allow = nets;
    } else if let Some(protocol @ ("tcp" | "udp")) = left["payload"]["protocol"].as_str()
        && left["payload"]["field"].as_str() == Some("dport")
    {
        same_protocol(c, protocol.parse()?, &described)?;
        c.public_ports = Some(ports(right).ok_or_else(|| {
            format!("{}: a set of ports; write one rule per port or port range", described())
        })?);
    } else if left["meta"]["key"].as_str() == Some("l4proto") || payload("ip", "protocol") {
        let proto = right.as_str().unwrap_or("").parse();
        same_protocol(c, proto.map_err(|e| format!("{}: {e}", described()))?, &described)?;
    } else if left["meta"]["key"].as_str() == Some("iifname") {
        let name = right.as_str().ok_or_else(|| format!("{}: not one interface", described()))?;
        let wildcard = name.contains(['*', '?', '[']);
        let name = super::managed_interface(&described(), name, wildcard, interfaces)?;
        if !c.interfaces.is_empty() {
            return Err(format!("{}: a second interface condition", described()));
        }
        c.interfaces.push(name.to_string());
    } else if left.get("fib").is_some() {
        return Err(format!(
            "{}: the gateway's own addresses; give the public address (`ip daddr`) instead",
            described()
        ));
    } else {
        return Err(format!("{}: a condition hairpin cannot keep", described()));
    }
    Ok(())
}

/// Keeps `proto` as the rule's protocol, unless the rule named another.
fn same_protocol(
    c: &mut Conditions,
    proto: Proto,
    described: &dyn Fn() -> String,
) -> Result<(), String> {
    if c.proto.is_some_and(|p| p != proto) {
        return Err(format!("{}: another protocol than the rule's", described()));
    }
    c.proto = Some(proto);
    Ok(())
}

/// `"a.b.c.d"` or `{"prefix": {"addr": ..., "len": n}}`.
fn network(value: &Value) -> Option<Ipv4Net> {
    match value {
        Value::String(addr) => addr.parse::<Ipv4Addr>().ok().map(Ipv4Net::from),
        _ => {
            let prefix = value.get("prefix")?;
            let text = format!("{}/{}", prefix["addr"].as_str()?, prefix["len"].as_u64()?);
            parse_network(&text).ok()
        }
    }
}

/// `80` or `{"range": [8000, 8099]}`.
fn ports(value: &Value) -> Option<PortRange> {
    let port = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0);
    match value.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        Some([first, last]) => {
            let (first, last) = (port(first)?, port(last)?);
            (first <= last).then_some(PortRange { first, last })
        }
        Some(_) => None,
        None => port(value).map(PortRange::single),
    }
}

/// The server of a `dnat` statement and its port(s), if it names them.
fn dnat(body: &Value) -> Result<(Ipv4Addr, Option<PortRange>), String> {
    if let Some(family) = body.get("family").and_then(Value::as_str)
        && family != "ip"
    {
        return Err(format!("dnat {family}: hairpin forwards IPv4"));
    }
    let addr = body.get("addr").ok_or("a dnat without an address")?;
    let server: Ipv4Addr = addr
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("dnat to `{addr}`: hairpin forwards to one server"))?;
    if server.is_unspecified() || server.is_broadcast() || server.is_multicast() {
        return Err(format!("dnat to {server}: not a unicast address"));
    }
    if body.get("flags").is_some() {
        return Err(format!("dnat flags `{}`: hairpin maps ports one to one", body["flags"]));
    }
    let ports = match body.get("port") {
        None => None,
        Some(value) => {
            Some(ports(value).ok_or_else(|| format!("dnat port `{value}`: not a port or range"))?)
        }
    };
    Ok((server, ports))
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;
    use crate::config::parse_endpoint;

    /// Real `nft -j list ruleset` output (nftables 1.0.6) of a ruleset with
    /// a dozen kinds of port forwards, a masquerade and a filter table.
    const RULESET: &str = include_str!("nft-ruleset.json");

    fn managed() -> Vec<String> {
        vec!["gw-lan".into(), "gw-wan".into()]
    }

    fn mapping(
        proto: Proto,
        public: &str,
        to: &str,
        allow: &[&str],
        interfaces: &[&str],
    ) -> Mapping {
        let (public, public_ports) = parse_endpoint(public).expect("test setup: public");
        let (to, to_ports) = parse_endpoint(to).expect("test setup: server");
        Mapping {
            proto,
            public,
            public_ports,
            to,
            to_ports,
            allow: allow.iter().map(|n| parse_network(n).expect("test setup: net")).collect(),
            interfaces: interfaces.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_rulesets_port_forwards_become_mappings_kept_as_narrow_as_their_rules() {
        let imported = import_nft_ruleset(RULESET, Some(&managed())).expect("a ruleset");
        assert_eq!(
            imported.mappings,
            [
                mapping(Proto::Tcp, "203.0.113.1:80", "192.168.0.2:80", &[], &[]),
                mapping(Proto::Udp, "203.0.113.1:53", "192.168.0.2:53", &[], &[]),
                mapping(Proto::Tcp, "203.0.113.1:8000-8099", "192.168.0.3:9000-9099", &[], &[]),
                mapping(
                    Proto::Tcp,
                    "203.0.113.1:443",
                    "192.168.0.2:443",
                    &["198.51.100.0/24"],
                    &["gw-wan"]
                ),
                mapping(
                    Proto::Tcp,
                    "203.0.113.1:2222",
                    "192.168.0.4:22",
                    &["192.0.2.0/28", "198.51.100.7"],
                    &[]
                ),
                mapping(Proto::Tcp, "203.0.113.1:7002", "192.168.0.2:7002", &[], &[]),
            ]
        );
    }

    #[rstest]
    #[case::user_chain_dnat(4, "outside a NAT prerouting chain")]
    #[case::gateway_addresses(11, "the gateway's own addresses")]
    #[case::port_set(13, "a set of ports")]
    #[case::negation(14, "negations")]
    #[case::several_servers(15, "one server")]
    #[case::jump(16, "jump to a user chain")]
    #[case::log(17, "`log`")]
    #[case::masquerade(19, "SNAT/MASQUERADE")]
    fn every_other_nat_rule_is_reported_with_its_reason(#[case] handle: u64, #[case] reason: &str) {
        let imported = import_nft_ruleset(RULESET, Some(&managed())).expect("a ruleset");
        let skipped =
            imported.skipped.iter().find(|s| s.handle == handle).unwrap_or_else(|| {
                panic!("rule {handle} is not reported: {:#?}", imported.skipped)
            });
        assert!(skipped.reason.contains(reason), "rule {handle}: {skipped:?}");
    }

    #[test]
    fn only_nat_rules_are_reported() {
        let imported = import_nft_ruleset(RULESET, Some(&managed())).expect("a ruleset");
        assert_eq!(imported.skipped.len(), 8, "{:#?}", imported.skipped);
        assert!(imported.skipped.iter().all(|s| s.chain.starts_with("ip nat ")));
    }

    #[test]
    fn without_an_instance_interface_rules_are_refused() {
        let imported = import_nft_ruleset(RULESET, None).expect("a ruleset");
        let refused = imported.skipped.iter().find(|s| s.handle == 8).expect("rule 8 reported");
        assert!(refused.reason.contains("no running instance"), "{refused:?}");
        assert_eq!(imported.mappings.len(), 5);
    }

    #[rstest]
    #[case::not_json("iptables -t nat -A PREROUTING ...")]
    #[case::not_a_ruleset(r#"{"rules": []}"#)]
    fn what_is_no_ruleset_is_an_error(#[case] text: &str) {
        assert!(import_nft_ruleset(text, None).is_err());
    }

    #[test]
    fn imported_mappings_pass_the_config_validation() {
        let imported = import_nft_ruleset(RULESET, Some(&managed())).expect("a ruleset");
        let mut text = String::from(
            "[lan]\ninterfaces = [\"gw-lan\"]\nnetworks = [\"192.168.0.0/24\"]\naddress = \"192.168.0.1\"\n\
             [wan]\ninterface = \"gw-wan\"\n",
        );
        for m in &imported.mappings {
            let allow: Vec<String> = m.allow.iter().map(|n| format!("\"{n}\"")).collect();
            let interfaces: Vec<String> = m.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
            text.push_str(&format!(
                "[[mapping]]\nproto = \"{}\"\npublic = \"{}:{}\"\nto = \"{}:{}\"\nallow = [{}]\ninterfaces = [{}]\n",
                m.proto,
                m.public,
                m.public_ports,
                m.to,
                m.to_ports,
                allow.join(", "),
                interfaces.join(", ")
            ));
        }
        let config: crate::config::Config = text.parse().expect("the imported mappings are valid");
        assert_eq!(config.mappings, imported.mappings);
    }
}
