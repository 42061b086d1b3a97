//! Which mapping rule ids may be given out (`MAPPING_IDS`, one slot per
//! id, kept by user space only). A flow carries its rule's id for its whole
//! life, also after the rule is withdrawn: an id given out again while such
//! flows live would count their traffic under the new rule. So a withdrawn
//! id is retired, not freed, and becomes free again only once a walk of the
//! tables (the daemon's reclaim) has found no flow that carries it, and so
//! `mapping add` finds a free id without reading the tables.

/// Never given out, or retired and found in no flow since.
pub const FREE: u64 = 0;
/// A published rule's.
pub const PUBLISHED: u64 = u64::MAX;

/// The datapath finds a rule in `MAPPINGS` and enters its flow a few
/// microseconds later: a flow of a rule withdrawn just before a walk began
/// may be entered behind the walk. Only ids retired this long before the
/// walk began can be freed by it.
pub const SETTLE_NS: u64 = 1_000_000_000;

/// The slot of an id withdrawn at `now_ns` (CLOCK_MONOTONIC_COARSE).
pub const fn retired(now_ns: u64) -> u64 {
    if now_ns == FREE {
        1
    } else if now_ns == PUBLISHED {
        PUBLISHED - 1
    } else {
        now_ns
    }
}

/// Whether a walk of both tables that began at `walk_started_ns` and found
/// no flow with this id may free an id whose slot is `slot`.
pub const fn may_free(slot: u64, walk_started_ns: u64) -> bool {
    slot != FREE && slot != PUBLISHED && slot.saturating_add(SETTLE_NS) <= walk_started_ns
}

/// Whether an id whose slot is `slot` may be given to a new rule at once,
/// without reading the tables (`published`: a rule has it).
pub const fn is_free(slot: u64, published: bool) -> bool {
    slot == FREE && !published
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rstest::rstest]
    #[case::never_used(FREE, 10 * SETTLE_NS, false)]
    #[case::published(PUBLISHED, 10 * SETTLE_NS, false)]
    #[case::retired_long_before(retired(SETTLE_NS), 3 * SETTLE_NS, true)]
    #[case::retired_exactly_settled(retired(SETTLE_NS), 2 * SETTLE_NS, true)]
    #[case::retired_as_the_walk_began(retired(3 * SETTLE_NS), 3 * SETTLE_NS, false)]
    #[case::retired_after_the_walk_began(retired(4 * SETTLE_NS), 3 * SETTLE_NS, false)]
    #[case::retired_at_boot(retired(0), 2 * SETTLE_NS, true)]
    fn a_walk_frees_only_ids_retired_before_it_settled(
        #[case] slot: u64,
        #[case] walk_started_ns: u64,
        #[case] expected: bool,
    ) {
        assert_eq!(
            may_free(slot, walk_started_ns),
            expected,
            "slot {slot}, walk from {walk_started_ns} ns"
        );
    }

    #[test]
    fn a_retired_slot_is_neither_free_nor_published() {
        for now in [0, 1, 5, u64::MAX - 1, u64::MAX] {
            let slot = retired(now);
            assert!(slot != FREE && slot != PUBLISHED, "retired({now}) = {slot}");
            assert!(!is_free(slot, false), "an id retired at {now} is not free");
        }
        assert!(is_free(FREE, false));
        assert!(!is_free(FREE, true), "a published rule's id is not free");
    }
}
