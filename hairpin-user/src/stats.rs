//! Presenting the datapath's counters.

use std::fmt::Write as _;

use hairpin_common::Counter;

/// One `name value` line per counter, non-zero ones only unless `all`.
pub fn format_counters(counters: &[(Counter, u64)], all: bool) -> String {
    let width = Counter::ALL
        .iter()
        .map(|c| c.name().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (counter, value) in counters {
        if all || *value != 0 {
            let _ = writeln!(out, "  {:<width$}  {value}", counter.name());
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
    fn zero_counters_hidden_unless_all() {
        let counters = [(Counter::Hairpinned, 3), (Counter::PassNoMapping, 0)];
        let text = format_counters(&counters, false);
        assert!(text.contains("hairpinned") && text.contains('3'), "{text}");
        assert!(!text.contains("pass_no_mapping"), "{text}");
        assert!(format_counters(&counters, true).contains("pass_no_mapping"));
    }
}
