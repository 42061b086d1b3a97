//! Presenting the datapath's counters and the conntrack tables' fill.

use std::fmt::Write as _;

use hairpin_common::Counter;

/// Counters and table fill at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every datapath counter, summed over the CPUs.
    pub counters: Vec<(Counter, u64)>,
    /// Entries (two per flow) in the established and new-flow tables.
    pub established_entries: usize,
    pub new_entries: usize,
    /// Table capacity, entries each.
    pub capacity: u32,
    /// Entries removed by user space because their flows had expired.
    pub reclaimed_established: u64,
    pub reclaimed_new: u64,
}

impl Snapshot {
    /// Reads the counters and the tables' fill.
    pub fn read(maps: &crate::maps::Maps, capacity: u32) -> Result<Self, crate::maps::MapsError> {
        Self::read_counted(maps, capacity, maps.conntrack_entry_counts()?)
    }

    /// Reads the counters, the tables' fill counted already (established,
    /// new).
    pub fn read_counted(
        maps: &crate::maps::Maps,
        capacity: u32,
        [established_entries, new_entries]: [usize; 2],
    ) -> Result<Self, crate::maps::MapsError> {
        let counters = maps.counters()?;
        let value = |c: Counter| counters.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v);
        Ok(Snapshot {
            reclaimed_established: value(Counter::ReclaimedEstablished),
            reclaimed_new: value(Counter::ReclaimedNew),
            established_entries,
            new_entries,
            capacity,
            counters,
        })
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.iter().find(|(c, _)| *c == counter).map_or(0, |(_, v)| *v)
    }

    /// New flows that left the new-flow table without being established,
    /// expiring or being reclaimed: evicted by its LRU under pressure.
    pub fn new_flows_evicted(&self) -> u64 {
        let accounted = self.counter(Counter::FlowEstablished)
            + self.counter(Counter::FlowExpired)
            + (self.new_entries as u64 + self.reclaimed_new) / 2;
        self.counter(Counter::FlowCreated).saturating_sub(accounted)
    }

    /// Name-value pairs: the counters, then the derived figures.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let mut values: Vec<_> = self.counters.iter().map(|(c, v)| (c.name(), *v)).collect();
        values.extend([
            ("new_flows_evicted", self.new_flows_evicted()),
            ("established_entries", self.established_entries as u64),
            ("new_entries", self.new_entries as u64),
        ]);
        values
    }
}

/// One `name value` line each, zero values only when `all`.
pub fn format_values(values: &[(&str, u64)], all: bool) -> String {
    let width = values.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (name, value) in values {
        if all || *value != 0 {
            let _ = writeln!(out, "  {name:<width$}  {value}");
        }
    }
    if out.is_empty() {
        out.push_str("  (all counters are zero)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_hidden_unless_all() {
        let values = [("hairpinned", 3), ("pass_no_mapping", 0)];
        let text = format_values(&values, false);
        assert!(text.contains("hairpinned") && text.contains('3'), "{text}");
        assert!(!text.contains("pass_no_mapping"), "{text}");
        assert!(format_values(&values, true).contains("pass_no_mapping"));
    }

    #[test]
    fn evictions_are_what_is_left_unaccounted() {
        let snapshot = Snapshot {
            counters: vec![
                (Counter::FlowCreated, 100),
                (Counter::FlowEstablished, 10),
                (Counter::FlowExpired, 5),
            ],
            new_entries: 40,
            reclaimed_new: 10,
            ..Default::default()
        };
        // 100 created - 10 established - 5 expired - 20 live - 5 reclaimed.
        assert_eq!(snapshot.new_flows_evicted(), 60);
    }
}

/// A mapping rule and its traffic: a row of `mapping list --json` and
/// `stats --json`, and the labels and values of the per-mapping metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MappingRow {
    pub id: u16,
    /// `"tcp"` or `"udp"`.
    pub proto: String,
    /// The published address and port (or port range), e.g. `"203.0.113.1:80"`.
    pub public: String,
    /// The server's address and port (or port range).
    pub to: String,
    /// Source networks new flows may come from; empty: any.
    pub allow: Vec<String>,
    /// Interfaces new flows may arrive on; empty: any managed one.
    pub interfaces: Vec<String>,
    /// Flows opened through the mapping.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl MappingRow {
    /// Every published rule with its traffic, summed over the CPUs.
    pub fn read_all(maps: &crate::maps::Maps) -> Result<Vec<Self>, crate::maps::MapsError> {
        maps.mapping_rules()?
            .into_iter()
            .map(|rule| {
                let stats = maps.mapping_stats(rule.id)?;
                let m = &rule.mapping;
                Ok(MappingRow {
                    id: rule.id,
                    proto: m.proto.to_string(),
                    public: format!("{}:{}", m.public, m.public_ports),
                    to: format!("{}:{}", m.to, m.to_ports),
                    allow: m.allow.iter().map(ToString::to_string).collect(),
                    interfaces: m.interfaces.clone(),
                    flows: stats.flows,
                    packets: stats.packets,
                    bytes: stats.bytes,
                })
            })
            .collect()
    }
}
