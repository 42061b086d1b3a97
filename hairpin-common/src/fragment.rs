//! IPv4 fragments of tracked flows, as Cilium's fragment map: the first
//! fragment carries the ports and is translated from its flow; it leaves
//! behind how the datagram is translated, keyed by (source, destination,
//! protocol, IP ID), for its later fragments, which carry no ports.

use crate::{Counter, FragmentEntry, FragmentKey};

/// How long a datagram's translation is kept for its later fragments. The
/// fragments of a datagram are sent back to back; a short lifetime limits
/// what an IP ID reused by the same sender could inherit.
pub const FRAGMENT_LIFETIME_NS: u64 = 2_000_000_000;

/// Datagrams whose translation is kept at once (an LRU table: a flood of
/// first fragments evicts the oldest).
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8192;

const MORE_FRAGMENTS: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0, more to come: carries the L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

impl Fragment {
    /// From the IPv4 header's flags-and-offset field (big-endian).
    pub const fn of(frag_off_be: u16) -> Self {
        let frag_off = u16::from_be(frag_off_be);
        if frag_off & OFFSET_MASK != 0 {
            Fragment::Later
        } else if frag_off & MORE_FRAGMENTS != 0 {
            Fragment::First
        } else {
            Fragment::Whole
        }
    }
}

impl FragmentKey {
    /// The datagram a fragment belongs to (addresses and ID as on the wire).
    pub const fn new(src_addr: u32, dst_addr: u32, id: u16, proto: u8) -> Self {
        Self { src_addr, dst_addr, id, proto, _pad: 0 }
    }
}

/// Whether a later fragment arriving on `ingress` at `now` may be translated
/// by `entry`: only within its lifetime, and only on the interface its
/// first fragment came from.
pub const fn translation_usable(
    entry: &FragmentEntry,
    ingress: u32,
    now: u64,
) -> Result<(), Counter> {
    if now.saturating_sub(entry.created_ns) > FRAGMENT_LIFETIME_NS {
        return Err(Counter::FragmentExpired);
    }
    if entry.ingress != ingress {
        return Err(Counter::WrongInterface);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::whole(0x0000, Fragment::Whole)]
    #[case::dont_fragment(0x4000, Fragment::Whole)]
    #[case::first(0x2000, Fragment::First)]
    #[case::middle(0x2000 | 185, Fragment::Later)]
    #[case::last(185, Fragment::Later)]
    #[case::last_with_df_set_wrongly(0x4000 | 185, Fragment::Later)]
    fn fragment_position(#[case] frag_off: u16, #[case] expected: Fragment) {
        assert_eq!(Fragment::of(frag_off.to_be()), expected, "frag_off {frag_off:#06x}");
    }

    fn entry(created_ns: u64, ingress: u32) -> FragmentEntry {
        FragmentEntry { created_ns, ingress, ..FragmentEntry::default() }
    }

    #[rstest]
    #[case::fresh(10_000_000_000, 3, Ok(()))]
    #[case::at_its_lifetime(10_000_000_000 + FRAGMENT_LIFETIME_NS, 3, Ok(()))]
    #[case::past_its_lifetime(10_000_000_001 + FRAGMENT_LIFETIME_NS, 3, Err(Counter::FragmentExpired))]
    #[case::other_interface(10_000_000_000, 4, Err(Counter::WrongInterface))]
    fn later_fragment_admission(
        #[case] now: u64,
        #[case] ingress: u32,
        #[case] expected: Result<(), Counter>,
    ) {
        assert_eq!(translation_usable(&entry(10_000_000_000, 3), ingress, now), expected);
    }
}
