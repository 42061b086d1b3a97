//! Reading the conntrack tables: which flows have expired.

use hairpin_common::{FlowEntry, FlowKey, Settings};

/// Whether the flow of `entry` has expired: a flow is idle when both
/// directions are, so that a one-way stream keeps its flow alive; an entry
/// whose partner is missing expires on its own. `partner` finds the other
/// direction's entry by its key; it is asked only when `entry` itself is
/// idle, which in a live table is the rare case (one lookup per candidate,
/// not per entry).
pub fn flow_expired(
    entry: &FlowEntry,
    partner: impl FnOnce(&FlowKey) -> Option<FlowEntry>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    if !settings.expired(entry.state, entry.last_seen_ns, now_ns) {
        return false;
    }
    let partner_last_seen = partner(&entry.translated.reversed()).map(|p| p.last_seen_ns);
    settings.flow_expired(entry.state, entry.last_seen_ns, partner_last_seen, now_ns)
}

/// Whether an entry found expired (`first`) may be deleted now that it
/// reads `current` (and its partner `partner`): only if it is the same flow
/// (created at the same time, translated the same way) and both directions
/// are still idle. A flow recreated under the same key, or one that saw a
/// packet since, stays.
pub fn still_expired(
    first: &FlowEntry,
    current: Option<&FlowEntry>,
    partner: Option<&FlowEntry>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    let Some(current) = current else {
        return false;
    };
    current.created_s == first.created_s
        && current.translated == first.translated
        && current.direction == first.direction
        && settings.flow_expired(
            current.state,
            current.last_seen_ns,
            partner.map(|partner| partner.last_seen_ns),
            now_ns,
        )
}

#[cfg(test)]
mod tests {
    use hairpin_common::{FlowKey, MappingValue, nat, state};

    use super::*;

    /// The keys of every entry in `entries` whose flow has expired, the
    /// partners looked up among `entries`.
    fn expired_flows(
        entries: &[(FlowKey, FlowEntry)],
        settings: &Settings,
        now_ns: u64,
    ) -> Vec<FlowKey> {
        let by_key: std::collections::HashMap<FlowKey, FlowEntry> =
            entries.iter().copied().collect();
        entries
            .iter()
            .filter(|(_, entry)| {
                flow_expired(entry, |key| by_key.get(key).copied(), settings, now_ns)
            })
            .map(|(key, _)| *key)
            .collect()
    }

    #[test]
    fn the_partner_is_looked_up_only_for_an_idle_entry() {
        let entries = flow(3000, state::UDP_REPLIED, 20 * SECOND, 0);
        let asked = std::cell::Cell::new(0);
        let lookup = |_: &FlowKey| {
            asked.set(asked.get() + 1);
            Some(entries[0].1)
        };
        assert!(!flow_expired(&entries[0].1, lookup, &settings(), 31 * SECOND));
        assert_eq!(asked.get(), 0, "a direction seen 11 s ago is not idle: no lookup");
        assert!(!flow_expired(&entries[1].1, lookup, &settings(), 31 * SECOND));
        assert_eq!(asked.get(), 1, "an idle direction asks for its partner, which is not idle");
    }

    const SECOND: u64 = 1_000_000_000;

    fn settings() -> Settings {
        Settings {
            tcp_established_ns: 100 * SECOND,
            tcp_transitory_ns: 10 * SECOND,
            udp_ns: 30 * SECOND,
            ..Default::default()
        }
    }

    fn flow(
        client_port: u16,
        flow_state: u8,
        original_seen: u64,
        reply_seen: u64,
    ) -> Vec<(FlowKey, FlowEntry)> {
        let packet = FlowKey::new(3, 100, client_port.to_be(), 80u16.to_be(), 6);
        let server =
            MappingValue { server_addr: 2, server_port: 80u16.to_be(), ..Default::default() };
        let mut pair = nat::FlowPair::default();
        let sides = nat::Sides { original: 1, reply: 1 };
        nat::hairpin_flow(&mut pair, &packet, &server, 1, client_port.to_be(), &sides, 0);
        pair.original.state = flow_state;
        pair.reply.state = flow_state;
        pair.original.last_seen_ns = original_seen;
        pair.reply.last_seen_ns = reply_seen;
        vec![(pair.original_key, pair.original), (pair.reply_key, pair.reply)]
    }

    #[test]
    fn a_flow_expires_when_both_directions_are_idle() {
        let mut entries = flow(1000, state::TCP_ESTABLISHED, 0, 0);
        entries.extend(flow(1001, state::TCP_ESTABLISHED, 0, 150 * SECOND));
        entries.extend(flow(1002, state::TCP_TIME_WAIT, 195 * SECOND, 195 * SECOND));
        entries.extend(flow(1003, state::TCP_TIME_WAIT, 130 * SECOND, 130 * SECOND));

        let expired = expired_flows(&entries, &settings(), 200 * SECOND);

        let ports: Vec<u16> =
            expired.iter().filter(|k| k.src_addr == 3).map(|k| u16::from_be(k.src_port)).collect();
        assert_eq!(
            ports,
            [1000, 1003],
            "idle established flow and old TIME_WAIT go; the others stay"
        );
        assert_eq!(expired.len(), 4, "both entries of each expired flow");
    }

    fn entry(created_s: u32, last_seen_ns: u64, snat_port: u16) -> FlowEntry {
        let mut entry = flow(snat_port, state::UDP_REPLIED, last_seen_ns, last_seen_ns)[0].1;
        entry.created_s = created_s;
        entry
    }

    #[rstest::rstest]
    #[case::unchanged(Some(entry(5, 0, 1000)), None, true)]
    #[case::unchanged_with_idle_partner(Some(entry(5, 0, 1000)), Some(entry(5, 0, 1000)), true)]
    #[case::gone(None, None, false)]
    #[case::recreated_later(Some(entry(6, 0, 1000)), None, false)]
    #[case::recreated_with_another_translation(Some(entry(5, 0, 1001)), None, false)]
    #[case::seen_since(Some(entry(5, 40 * SECOND, 1000)), None, false)]
    #[case::partner_seen_since(Some(entry(5, 0, 1000)), Some(entry(5, 40 * SECOND, 1000)), false)]
    fn an_entry_is_deleted_only_if_still_the_expired_one(
        #[case] current: Option<FlowEntry>,
        #[case] partner: Option<FlowEntry>,
        #[case] delete: bool,
    ) {
        let first = entry(5, 0, 1000);
        let now = 45 * SECOND;
        assert!(settings().expired(first.state, first.last_seen_ns, now), "test setup");
        assert_eq!(
            still_expired(&first, current.as_ref(), partner.as_ref(), &settings(), now),
            delete,
            "current {current:?}"
        );
    }

    #[test]
    fn an_orphan_entry_expires_on_its_own() {
        let entries = flow(2000, state::UDP_REPLIED, 0, 0);
        let orphan = [entries[0]];
        assert_eq!(expired_flows(&orphan, &settings(), 31 * SECOND).len(), 1);
        assert!(expired_flows(&orphan, &settings(), 29 * SECOND).is_empty());
    }
}
