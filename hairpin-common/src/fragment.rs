//! IPv4 fragments of tracked flows, as Cilium's fragment map: the first
//! fragment carries the ports and is translated from its flow; it leaves
//! behind how the datagram is translated, keyed by (source, destination,
//! protocol, IP ID), for its later fragments, which carry no ports.

use crate::{
    ADDRESS_PUBLIC, ADDRESS_SERVER, FRAGMENT_HELD, FRAGMENT_PASSED, FRAGMENT_TRANSLATED,
    FragmentEntry, FragmentKey,
};

/// How long a datagram's translation is kept for its later fragments. The
/// fragments of a datagram are sent back to back; a short lifetime limits
/// what an IP ID reused by the same sender could inherit.
pub const FRAGMENT_LIFETIME_NS: u64 = 2_000_000_000;

/// Datagrams whose translation is kept at once (an LRU table: a flood of
/// first fragments evicts the oldest).
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8192;

/// Fragments held at most per datagram until its first fragment comes
/// (a 20000-byte datagram at MTU 1500 has 13 after the first).
pub const MAX_QUEUED_PER_DATAGRAM: u32 = 16;

/// Fragments held at once over all datagrams (an LRU table).
pub const MAX_QUEUED_FRAGMENTS: u32 = 1024;

/// The most fragments a packet too big for its egress link is cut into,
/// and the most payload it may carry (the TC program's per-CPU buffer).
pub const MAX_SPLIT_FRAGMENTS: u32 = 16;
pub const MAX_SPLIT_PAYLOAD: usize = 16384;

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

/// What becomes of a later fragment that arrives before its datagram's
/// first fragment was translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Held as the first of its datagram (no entry yet, or a stale one).
    First,
    /// Held in the datagram's queue (its place claimed when it is copied).
    Queue,
    /// The datagram's queue is full: dropped.
    Full,
}

/// Where a fragment that came before its first fragment is held, given its
/// datagram's entry (if any, not translated) at `now`.
pub const fn hold(entry: Option<&FragmentEntry>, now: u64) -> Hold {
    let Some(entry) = entry else {
        return Hold::First;
    };
    if now.saturating_sub(entry.created_ns) > FRAGMENT_LIFETIME_NS {
        return Hold::First;
    }
    if entry.queued >= MAX_QUEUED_PER_DATAGRAM {
        return Hold::Full;
    }
    Hold::Queue
}

/// Whether a later fragment of no known datagram may be a flow's, and so
/// worth holding for its first fragment: one to a public address or to the
/// gateway's LAN address (`to_lan_addr`), or from a server. Any other is
/// passed untouched, as it came, whatever its order.
pub const fn may_be_a_flows(src_role: u8, dst_role: u8, to_lan_addr: bool) -> bool {
    to_lan_addr || dst_role & ADDRESS_PUBLIC != 0 || src_role & ADDRESS_SERVER != 0
}

/// How a packet too big for its egress link is cut: each fragment carries
/// `per_fragment` bytes of its payload (a multiple of 8), the last the
/// rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub per_fragment: u32,
    pub fragments: u32,
}

/// How a packet of `tot_len` with an IPv4 header of `header_len` is cut
/// for a link of `mtu`; `None` if it cannot be: too small an MTU, more than
/// the TC program can cut, or a fragment whose offset (`frag_off_be`) and
/// length pass what IPv4 can address.
pub const fn split(tot_len: u32, header_len: u32, mtu: u32, frag_off_be: u16) -> Option<Split> {
    // RFC 791: every router can take 68 bytes.
    if mtu < 68 || tot_len <= header_len || mtu <= header_len {
        return None;
    }
    let offset = (u16::from_be(frag_off_be) & OFFSET_MASK) as u32 * 8;
    if offset + tot_len - header_len > 65535 - header_len {
        return None;
    }
    let per_fragment = (mtu - header_len) & !7;
    let payload = tot_len - header_len;
    if payload as usize > MAX_SPLIT_PAYLOAD {
        return None;
    }
    let fragments = payload.div_ceil(per_fragment);
    if fragments > MAX_SPLIT_FRAGMENTS {
        return None;
    }
    Some(Split { per_fragment, fragments })
}

/// One fragment of a split packet: where its payload starts in the
/// packet's payload, how long it is, and its flags-and-offset field
/// (big-endian) given the packet's own (which may be a fragment already,
/// its offset `frag_off_be`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u32,
    pub len: u32,
    pub frag_off_be: u16,
}

pub const fn piece(split: &Split, payload_len: u32, index: u32, frag_off_be: u16) -> Piece {
    let frag_off = u16::from_be(frag_off_be);
    let offset = index * split.per_fragment;
    let last = index + 1 == split.fragments;
    let len = if last { payload_len - offset } else { split.per_fragment };
    // The packet's own more-fragments flag stays on its last piece.
    let more = if last { frag_off & MORE_FRAGMENTS } else { MORE_FRAGMENTS };
    let units = (frag_off & OFFSET_MASK) + (offset / 8) as u16;
    Piece { offset, len, frag_off_be: (more | units).to_be() }
}

/// What becomes of a later fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Later {
    /// Translated and sent as its first fragment was.
    Translate,
    /// Its first fragment went to the kernel: so does it, untouched.
    Pass,
    /// It came before its first fragment: held until that comes.
    Hold(Hold),
    /// Its datagram arrives on another interface: no flow's, untouched.
    WrongInterface,
}

/// What becomes of a later fragment arriving on `ingress` at `now`, given
/// its datagram's entry. An entry past its lifetime counts as none: the
/// fragment may be the first of a new datagram with the same IP ID.
pub const fn later(entry: Option<&FragmentEntry>, ingress: u32, now: u64) -> Later {
    let Some(found) = entry else {
        return Later::Hold(Hold::First);
    };
    if now.saturating_sub(found.created_ns) > FRAGMENT_LIFETIME_NS {
        return Later::Hold(Hold::First);
    }
    if found.ingress != ingress {
        return Later::WrongInterface;
    }
    match found.verdict {
        FRAGMENT_TRANSLATED => Later::Translate,
        FRAGMENT_PASSED => Later::Pass,
        _ => Later::Hold(hold(entry, now)),
    }
}

/// How many fragments held for the datagram of a first fragment arriving on
/// `ingress` at `now` are to be released with it: none unless they came on
/// the same interface, lately.
pub const fn held_for(entry: Option<&FragmentEntry>, ingress: u32, now: u64) -> u8 {
    match entry {
        Some(found)
            if found.verdict == FRAGMENT_HELD
                && found.ingress == ingress
                && now.saturating_sub(found.created_ns) <= FRAGMENT_LIFETIME_NS =>
        {
            if found.queued < MAX_QUEUED_PER_DATAGRAM {
                found.queued as u8
            } else {
                MAX_QUEUED_PER_DATAGRAM as u8
            }
        }
        _ => 0,
    }
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

    #[rstest]
    #[case::none_yet(None, Hold::First)]
    #[case::one_held(Some((10_000_000_000, 1)), Hold::Queue)]
    #[case::full(Some((10_000_000_000, MAX_QUEUED_PER_DATAGRAM)), Hold::Full)]
    #[case::stale(Some((1, 3)), Hold::First)]
    fn where_an_early_fragment_is_held(#[case] entry: Option<(u64, u32)>, #[case] expected: Hold) {
        let entry = entry.map(|(created_ns, queued)| FragmentEntry {
            created_ns,
            queued,
            ..FragmentEntry::default()
        });
        assert_eq!(hold(entry.as_ref(), 10_500_000_000), expected);
    }

    #[rstest]
    #[case::fits_in_two(1500, 20, 1400, Some(Split { per_fragment: 1376, fragments: 2 }))]
    #[case::eight_byte_units(1000, 20, 517, Some(Split { per_fragment: 496, fragments: 2 }))]
    #[case::jumbo_to_1280(9000, 20, 1280, Some(Split { per_fragment: 1256, fragments: 8 }))]
    #[case::too_many_pieces(9000, 20, 576, None)]
    #[case::mtu_below_the_minimum(1000, 20, 60, None)]
    #[case::more_than_the_buffer(20020, 20, 9000, None)]
    fn how_a_packet_is_cut(
        #[case] tot_len: u32,
        #[case] header_len: u32,
        #[case] mtu: u32,
        #[case] expected: Option<Split>,
    ) {
        assert_eq!(split(tot_len, header_len, mtu, 0), expected);
    }

    #[test]
    fn a_fragment_cut_past_what_ipv4_addresses_is_refused() {
        let near_the_end = (OFFSET_MASK - 10).to_be();
        assert_eq!(
            split(1500, 20, 1000, near_the_end),
            None,
            "the offset would spill into the flags"
        );
        assert!(split(1500, 20, 1000, 100u16.to_be()).is_some());
    }

    #[rstest]
    #[case::to_a_public_address(0, ADDRESS_PUBLIC, false, true)]
    #[case::to_the_gateway(0, 0, true, true)]
    #[case::from_a_server(ADDRESS_SERVER, 0, false, true)]
    #[case::a_server_to_a_public_address(ADDRESS_SERVER, ADDRESS_PUBLIC, false, true)]
    #[case::transit(0, 0, false, false)]
    #[case::from_a_public_address(ADDRESS_PUBLIC, 0, false, false)]
    #[case::to_a_server(0, ADDRESS_SERVER, false, false)]
    fn which_early_fragments_are_held(
        #[case] src_role: u8,
        #[case] dst_role: u8,
        #[case] to_lan_addr: bool,
        #[case] held: bool,
    ) {
        assert_eq!(may_be_a_flows(src_role, dst_role, to_lan_addr), held);
    }

    #[test]
    fn pieces_cover_the_payload_in_order() {
        let (tot_len, mtu) = (3028u32, 1500);
        let split = split(tot_len, 20, mtu, 0).expect("cut");
        let payload = tot_len - 20;
        let mut next = 0;
        for index in 0..split.fragments {
            let piece = piece(&split, payload, index, 0);
            assert_eq!(piece.offset, next, "piece {index} follows the one before");
            assert!(piece.len + 20 <= mtu, "piece {index} fits the link");
            let frag_off = u16::from_be(piece.frag_off_be);
            assert_eq!((frag_off & OFFSET_MASK) as u32 * 8, piece.offset);
            let last = index + 1 == split.fragments;
            assert_eq!(frag_off & MORE_FRAGMENTS == 0, last, "only the last has MF clear");
            next += piece.len;
        }
        assert_eq!(next, payload, "every byte is sent once");
    }

    #[test]
    fn a_first_fragment_cut_again_keeps_more_fragments_on_its_last_piece() {
        let split = split(1500, 20, 1000, 0).expect("cut");
        let first = piece(&split, 1480, 0, MORE_FRAGMENTS.to_be());
        let last = piece(&split, 1480, 1, MORE_FRAGMENTS.to_be());
        assert_eq!(u16::from_be(first.frag_off_be), MORE_FRAGMENTS);
        assert_eq!(u16::from_be(last.frag_off_be), MORE_FRAGMENTS | (976 / 8));
    }

    fn entry(created_ns: u64, ingress: u32, verdict: u8, queued: u32) -> FragmentEntry {
        FragmentEntry { created_ns, ingress, verdict, queued, ..FragmentEntry::default() }
    }

    const CREATED: u64 = 10_000_000_000;

    #[rstest]
    #[case::no_entry(None, 3, CREATED, Later::Hold(Hold::First))]
    #[case::translated(
        Some(entry(CREATED, 3, FRAGMENT_TRANSLATED, 0)),
        3,
        CREATED,
        Later::Translate
    )]
    #[case::at_its_lifetime(Some(entry(CREATED, 3, FRAGMENT_TRANSLATED, 0)), 3, CREATED + FRAGMENT_LIFETIME_NS, Later::Translate)]
    #[case::past_its_lifetime(Some(entry(CREATED, 3, FRAGMENT_TRANSLATED, 0)), 3, CREATED + FRAGMENT_LIFETIME_NS + 1, Later::Hold(Hold::First))]
    #[case::passed(Some(entry(CREATED, 3, FRAGMENT_PASSED, 0)), 3, CREATED, Later::Pass)]
    #[case::held(Some(entry(CREATED, 3, FRAGMENT_HELD, 2)), 3, CREATED, Later::Hold(Hold::Queue))]
    #[case::other_interface(
        Some(entry(CREATED, 3, FRAGMENT_TRANSLATED, 0)),
        4,
        CREATED,
        Later::WrongInterface
    )]
    #[case::held_from_another_interface(
        Some(entry(CREATED, 3, FRAGMENT_HELD, 1)),
        4,
        CREATED,
        Later::WrongInterface
    )]
    fn what_becomes_of_a_later_fragment(
        #[case] entry: Option<FragmentEntry>,
        #[case] ingress: u32,
        #[case] now: u64,
        #[case] expected: Later,
    ) {
        assert_eq!(later(entry.as_ref(), ingress, now), expected);
    }

    #[rstest]
    #[case::held_here(Some(entry(CREATED, 3, FRAGMENT_HELD, 2)), 3, CREATED, 2)]
    #[case::nothing_held(None, 3, CREATED, 0)]
    #[case::held_from_another_interface(Some(entry(CREATED, 4, FRAGMENT_HELD, 2)), 3, CREATED, 0)]
    #[case::held_too_long_ago(Some(entry(CREATED, 3, FRAGMENT_HELD, 2)), 3, CREATED + FRAGMENT_LIFETIME_NS + 1, 0)]
    #[case::already_translated(Some(entry(CREATED, 3, FRAGMENT_TRANSLATED, 0)), 3, CREATED, 0)]
    #[case::more_claimed_than_held(Some(entry(CREATED, 3, FRAGMENT_HELD, 20)), 3, CREATED, 16)]
    fn what_a_first_fragment_releases(
        #[case] entry: Option<FragmentEntry>,
        #[case] ingress: u32,
        #[case] now: u64,
        #[case] expected: u8,
    ) {
        assert_eq!(held_for(entry.as_ref(), ingress, now), expected);
    }
}
