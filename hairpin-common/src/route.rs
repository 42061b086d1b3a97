//! When a forwarding result cached in a conntrack entry may stand in for a
//! `bpf_fib_lookup`.
//!
//! The daemon moves `RouteCache::generation` on with every change of the
//! routing tables, rules, neighbours, addresses or links (rtnetlink), and
//! keeps `RouteCache::valid_until_ns` a few seconds ahead while it runs, so
//! a cached result is never used after a change it was not told about.

use crate::{CachedRoute, RouteCache};

/// An entry idle longer than this looks its route up again: the 16-bit
/// generation of an entry idle through 65536 changes could match again.
/// Active entries are refreshed every second, so they stay well inside it.
pub const MAX_IDLE_NS: u64 = 2_000_000_000;

/// How far ahead of its clock the daemon keeps `RouteCache::valid_until_ns`,
/// and so how long a killed daemon's cache outlives it.
pub const LIFETIME_NS: u64 = 3_000_000_000;

impl RouteCache {
    /// Whether cached results may be used at `now_ns`.
    #[inline(always)]
    pub const fn usable(&self, now_ns: u64) -> bool {
        self.generation != 0 && now_ns < self.valid_until_ns
    }

    /// The generation after `generation`: never 0, which marks an entry
    /// with nothing cached.
    pub const fn next_generation(generation: u16) -> u16 {
        match generation.wrapping_add(1) {
            0 => 1,
            next => next,
        }
    }
}

/// Whether `route`, cached in an entry last seen at `last_seen_ns`, may send
/// on a packet of `tot_len` bytes (IPv4 total length) that came in on
/// `ingress` at `now_ns`.
#[inline(always)]
pub const fn cached_route_valid(
    cache: &RouteCache,
    route: &CachedRoute,
    last_seen_ns: u64,
    ingress: u32,
    tot_len: u16,
    now_ns: u64,
) -> bool {
    cache.usable(now_ns)
        && route.generation == cache.generation
        && route.ingress == ingress
        && tot_len <= route.mtu
        && now_ns.saturating_sub(last_seen_ns) <= MAX_IDLE_NS
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;
    use crate::FlowEntry;

    const NOW: u64 = 100_000_000_000;
    const LAN1: u32 = 4;

    fn cache(generation: u16, valid_until_ns: u64) -> RouteCache {
        RouteCache { generation, valid_until_ns, ..Default::default() }
    }

    fn entry_cached(generation: u16, ingress: u32, mtu: u16, last_seen_ns: u64) -> FlowEntry {
        FlowEntry {
            last_seen_ns,
            route: CachedRoute { generation, mtu, ingress, egress: 3, ..Default::default() },
            ..Default::default()
        }
    }

    #[rstest]
    #[case::fresh(cache(7, NOW + 1), entry_cached(7, LAN1, 1500, NOW), 1500, true)]
    #[case::smaller_packet(cache(7, NOW + 1), entry_cached(7, LAN1, 1500, NOW), 60, true)]
    #[case::idle_at_limit(cache(7, NOW + 1), entry_cached(7, LAN1, 1500, NOW - MAX_IDLE_NS), 60, true)]
    #[case::routes_changed(cache(8, NOW + 1), entry_cached(7, LAN1, 1500, NOW), 60, false)]
    #[case::daemon_gone(cache(7, NOW), entry_cached(7, LAN1, 1500, NOW), 60, false)]
    #[case::never_enabled(cache(0, u64::MAX), entry_cached(0, LAN1, 1500, NOW), 60, false)]
    #[case::larger_than_allowed(cache(7, NOW + 1), entry_cached(7, LAN1, 1500, NOW), 1501, false)]
    #[case::idle_too_long(
        cache(7, NOW + 1),
        entry_cached(7, LAN1, 1500, NOW - MAX_IDLE_NS - 1),
        60,
        false
    )]
    fn cached_route_is_used_only_while_valid(
        #[case] cache: RouteCache,
        #[case] entry: FlowEntry,
        #[case] tot_len: u16,
        #[case] expected: bool,
    ) {
        assert_eq!(
            cached_route_valid(&cache, &entry.route, entry.last_seen_ns, LAN1, tot_len, NOW),
            expected,
            "cache {cache:?}, entry route {:?}, last seen {} ns ago, packet {tot_len} bytes",
            entry.route,
            NOW - entry.last_seen_ns
        );
    }

    #[test]
    fn cached_route_is_not_used_for_another_ingress_interface() {
        let entry = entry_cached(7, LAN1, 1500, NOW);
        assert!(
            !cached_route_valid(&cache(7, NOW + 1), &entry.route, NOW, LAN1 + 1, 60, NOW),
            "a route looked up for packets from ifindex {LAN1} was used for another interface's"
        );
    }

    #[rstest]
    #[case(1, 2)]
    #[case(41, 42)]
    #[case(u16::MAX, 1)]
    #[case(0, 1)]
    fn generations_skip_zero(#[case] generation: u16, #[case] next: u16) {
        assert_eq!(RouteCache::next_generation(generation), next);
    }
}
