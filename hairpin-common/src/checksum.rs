//! Incremental Internet checksum updates (RFC 1624, eqn. 3).
//!
//! All values are raw 16-bit words as loaded from the packet in native byte
//! order; one's complement addition does not care about byte order as long
//! as every operand is loaded the same way.

use crate::{FlowKey, packet::Ipv4Header};

#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word of the covered data changed.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// The checksum after one 32-bit value (two words) of the covered data changed.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let check = replace_u16(check, old as u16, new as u16);
    replace_u16(check, (old >> 16) as u16, (new >> 16) as u16)
}

/// The TCP/UDP checksum after the tuple changed from `from` to `to`: the
/// addresses are covered through the pseudo-header, the ports directly.
///
/// A UDP checksum of zero means "no checksum" and stays zero; a computed zero
/// is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn l4_after_rewrite(check: u16, from: &FlowKey, to: &FlowKey, udp: bool) -> u16 {
    if udp && check == 0 {
        return 0;
    }
    let mut check = replace_u32(check, from.src_addr, to.src_addr);
    check = replace_u32(check, from.dst_addr, to.dst_addr);
    check = replace_u16(check, from.src_port, to.src_port);
    check = replace_u16(check, from.dst_port, to.dst_port);
    if udp && check == 0 { 0xffff } else { check }
}

/// One's complement sum that turns a checksum over `old` into one over
/// `new` (a `__wsum` as `bpf_l4_csum_replace` takes it with no field size):
/// `~old + new`, with the carries folded back in.
#[inline(always)]
pub const fn diff_u32(old: u32, new: u32) -> u32 {
    let (sum, carry) = (!old).overflowing_add(new);
    sum + carry as u32
}

/// Adds two 32-bit one's complement sums.
#[inline(always)]
pub const fn add32(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + carry as u32
}

/// The change of the pseudo-header's addresses from `from` to `to`, for
/// `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR`: on a packet whose
/// checksum is left to offload (CHECKSUM_PARTIAL) the field holds the
/// pseudo-header sum, and only this part changes it.
#[inline(always)]
pub const fn addresses_diff(from: &FlowKey, to: &FlowKey) -> u32 {
    add32(diff_u32(from.src_addr, to.src_addr), diff_u32(from.dst_addr, to.dst_addr))
}

/// The change of the ports from `from` to `to` (covered by the checksum
/// directly, so untouched on a CHECKSUM_PARTIAL packet).
#[inline(always)]
pub const fn ports_diff(from: &FlowKey, to: &FlowKey) -> u32 {
    let old = from.src_port as u32 | (from.dst_port as u32) << 16;
    let new = to.src_port as u32 | (to.dst_port as u32) << 16;
    diff_u32(old, new)
}

/// A checksum after a change whose `diff` (see `diff_u32`) is known, as the
/// kernel applies it to a complete checksum.
#[inline(always)]
pub const fn apply_diff(check: u16, diff: u32) -> u16 {
    !fold(add32(diff, !check as u32))
}

/// The checksum field of a CHECKSUM_PARTIAL packet (the folded
/// pseudo-header sum, which offload completes) after a pseudo-header change
/// of `diff`, as the kernel applies it with `BPF_F_PSEUDO_HDR`.
#[inline(always)]
pub const fn apply_diff_partial(field: u16, diff: u32) -> u16 {
    fold(add32(diff, field as u32))
}

/// The IPv4 header checksum after the addresses changed and the TTL was
/// decremented. `ttl_proto` is the header's raw TTL/protocol word.
#[inline(always)]
pub const fn ipv4_after_rewrite(
    check: u16,
    from: &FlowKey,
    to: &FlowKey,
    old_ttl_proto: u16,
    new_ttl_proto: u16,
) -> u16 {
    let mut check = replace_u32(check, from.src_addr, to.src_addr);
    check = replace_u32(check, from.dst_addr, to.dst_addr);
    replace_u16(check, old_ttl_proto, new_ttl_proto)
}

/// Full one's complement sum of `data` folded to 16 bits (odd length padded
/// with a zero byte), as 16-bit words in native byte order.
pub fn sum_words(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for word in &mut chunks {
        sum += u16::from_ne_bytes([word[0], word[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u32
}

/// The checksum of `data` computed from scratch (used by tests and user space).
pub fn full(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// The checksum of an IPv4 header without options (its `check` field
/// taken as 0), over its words as they lie in memory.
#[inline(always)]
pub const fn ipv4_header(header: &Ipv4Header) -> u16 {
    let [s0, s1, s2, s3] = header.src_addr.to_ne_bytes();
    let [d0, d1, d2, d3] = header.dst_addr.to_ne_bytes();
    let words = [
        u16::from_ne_bytes([header.version_ihl, header.tos]),
        header.tot_len,
        header.id,
        header.frag_off,
        u16::from_ne_bytes([header.ttl, header.proto]),
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([d0, d1]),
        u16::from_ne_bytes([d2, d3]),
    ];
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        sum += words[i] as u32;
        i += 1;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    fn ipv4_header(src: u32, dst: u32, ttl: u8, proto: u8, id: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&60u16.to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[8] = ttl;
        h[9] = proto;
        h[12..16].copy_from_slice(&src.to_ne_bytes());
        h[16..20].copy_from_slice(&dst.to_ne_bytes());
        let check = full(&h);
        h[10..12].copy_from_slice(&check.to_ne_bytes());
        h
    }

    /// Checksum of a TCP/UDP segment with its pseudo-header, `check_at` being
    /// the offset of the checksum field (zeroed for the computation).
    fn l4_checksum(tuple: &FlowKey, segment: &[u8], check_at: usize) -> u16 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&tuple.src_addr.to_ne_bytes());
        pseudo.extend_from_slice(&tuple.dst_addr.to_ne_bytes());
        pseudo.extend_from_slice(&[0, tuple.proto]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        let mut segment = segment.to_vec();
        segment[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        segment[0..2].copy_from_slice(&tuple.src_port.to_ne_bytes());
        segment[2..4].copy_from_slice(&tuple.dst_port.to_ne_bytes());
        let sum = sum_words(&segment, sum_words(&pseudo, 0));
        !fold(sum)
    }

    fn tuple() -> impl Strategy<Value = FlowKey> {
        (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>(), prop_oneof![Just(6u8), Just(17u8)])
            .prop_map(|(s, d, sp, dp, p)| FlowKey::new(s, d, sp, dp, p))
    }

    proptest! {
        #[test]
        fn ipv4_incremental_equals_full(
            from in tuple(), to in tuple(), ttl in 2u8.., id in any::<u16>(),
        ) {
            let before = ipv4_header(from.src_addr, from.dst_addr, ttl, from.proto, id);
            let after = ipv4_header(to.src_addr, to.dst_addr, ttl - 1, from.proto, id);
            let check = u16::from_ne_bytes([before[10], before[11]]);
            let old_ttl_proto = u16::from_ne_bytes([ttl, from.proto]);
            let new_ttl_proto = u16::from_ne_bytes([ttl - 1, from.proto]);
            let incremental = ipv4_after_rewrite(check, &from, &to, old_ttl_proto, new_ttl_proto);
            prop_assert_eq!(incremental, u16::from_ne_bytes([after[10], after[11]]));
        }

        #[test]
        fn l4_incremental_equals_full(
            from in tuple(), to in tuple(),
            payload in proptest::collection::vec(any::<u8>(), 8..200),
        ) {
            let to = FlowKey { proto: from.proto, ..to };
            let udp = from.proto == 17;
            let check_at = if udp { 6 } else { 16 };
            let mut segment = payload;
            if !udp && segment.len() < 20 {
                segment.resize(20, 0);
            }
            let before = l4_checksum(&from, &segment, check_at);
            let mut expected = l4_checksum(&to, &segment, check_at);
            if udp && expected == 0 {
                expected = 0xffff;
            }
            let incremental = l4_after_rewrite(before, &from, &to, udp);
            // 0 and 0xffff are the same one's complement value; UDP maps a
            // computed 0 to 0xffff, so compare as the receiver verifies.
            prop_assert!(
                incremental == expected || (!udp && (incremental | expected) == 0xffff && (incremental & expected) == 0),
                "incremental {incremental:#06x} != full {expected:#06x}"
            );
        }
    }

    /// The folded pseudo-header sum a sender leaves in the checksum field
    /// of a CHECKSUM_PARTIAL segment for offload to complete.
    fn pseudo_header_field(tuple: &FlowKey, len: u16) -> u16 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&tuple.src_addr.to_ne_bytes());
        pseudo.extend_from_slice(&tuple.dst_addr.to_ne_bytes());
        pseudo.extend_from_slice(&[0, tuple.proto]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        fold(sum_words(&pseudo, 0))
    }

    proptest! {
        #[test]
        fn address_and_port_diffs_equal_the_full_rewrite(
            from in tuple(), to in tuple(),
            payload in proptest::collection::vec(any::<u8>(), 20..200),
        ) {
            let to = FlowKey { proto: from.proto, ..to };
            let check_at = if from.proto == 17 { 6 } else { 16 };
            let before = l4_checksum(&from, &payload, check_at);
            let expected = l4_checksum(&to, &payload, check_at);
            let updated = apply_diff(
                apply_diff(before, addresses_diff(&from, &to)),
                ports_diff(&from, &to),
            );
            prop_assert!(
                updated == expected || (updated | expected) == 0xffff && (updated & expected) == 0,
                "diffs give {updated:#06x}, full {expected:#06x}"
            );
        }

        #[test]
        fn a_partial_checksum_takes_only_the_address_diff(
            from in tuple(), to in tuple(), len in 8u16..9000,
        ) {
            let to = FlowKey { proto: from.proto, ..to };
            let field = pseudo_header_field(&from, len);
            let updated = apply_diff_partial(field, addresses_diff(&from, &to));
            let expected = pseudo_header_field(&to, len);
            prop_assert!(
                updated == expected || (updated | expected) == 0xffff && (updated & expected) == 0,
                "partial field {updated:#06x}, expected {expected:#06x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let from = FlowKey::new(1, 2, 3, 4, 17);
        let to = FlowKey::new(5, 6, 7, 8, 17);
        assert_eq!(l4_after_rewrite(0, &from, &to, true), 0);
    }

    #[test]
    fn udp_computed_zero_becomes_ffff() {
        let zero = FlowKey::new(0, 0, 0, 0, 17);
        assert_eq!(
            l4_after_rewrite(0xffff, &zero, &zero, false),
            0,
            "premise: the update computes zero"
        );
        assert_eq!(l4_after_rewrite(0xffff, &zero, &zero, true), 0xffff);
    }
}
