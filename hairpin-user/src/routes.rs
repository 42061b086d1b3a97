//! Keeping the routes cached in conntrack entries honest.
//!
//! The datapath caches each flow's `bpf_fib_lookup` result in its entry.
//! [`RouteCacheKeeper`] listens to rtnetlink for changes of IPv4 routes,
//! rules, nexthops, neighbours, addresses and links in its network namespace
//! and, for each that can change a cached result, moves the cache's
//! generation on, which makes every cached result stale; and it keeps the
//! cache usable for only a few seconds at a time, so that when nobody
//! listens any more (the daemon was killed), the datapath soon looks every
//! packet up again.
//!
//! Neighbours are most of the traffic (a busy LAN confirms its neighbours
//! all the time, IPv6 neighbour discovery never stops) and almost none of
//! it changes a result: only an IPv4 neighbour of a managed interface
//! whose address becomes usable, unusable or another one does
//! ([`NeighbourBook`]). IPv6 messages are ignored. A message that cannot
//! be read counts as a change.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use hairpin_common::{RouteCache, route::LIFETIME_NS};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use netlink_sys::{
    AsyncSocket as _, AsyncSocketExt as _, Socket, SocketAddr, TokioSocket,
    protocols::NETLINK_ROUTE,
};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use thiserror::Error;

use crate::{
    datapath::monotonic_coarse_ns,
    maps::{Maps, MapsError},
};

/// How often the keeper moves the cache's deadline ahead: well inside
/// `LIFETIME_NS`, so that a busy moment cannot let it lapse.
const KEEP_ALIVE_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum RouteCacheError {
    #[error("subscribing to routing changes (rtnetlink): {0}")]
    Subscribe(io::Error),
    #[error("reading routing changes (rtnetlink): {0}")]
    Read(io::Error),
    #[error("route cache map: {0}")]
    Map(aya::maps::MapError),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

// rtnetlink multicast groups (linux/rtnetlink.h).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
const RTNLGRP_NEXTHOP: u32 = 32;

/// What a neighbour entry gives `bpf_fib_lookup`: its link-layer address
/// while the entry is usable, nothing otherwise.
type NeighbourUse = Option<Vec<u8>>;

/// The IPv4 neighbours of the managed interfaces, as their last
/// notifications left them, to tell the notifications that change a
/// lookup's result from those that only confirm it.
#[derive(Debug, Default)]
pub struct NeighbourBook {
    managed: HashSet<u32>,
    known: HashMap<(u32, Ipv4Addr), NeighbourUse>,
}

/// Neighbours remembered at most; past it the book starts again (every
/// neighbour then counts as changed once).
const MAX_NEIGHBOURS: usize = 65_536;

impl NeighbourBook {
    /// A book for the interfaces `managed` (their indexes).
    pub fn new(managed: impl IntoIterator<Item = u32>) -> Self {
        Self { managed: managed.into_iter().collect(), known: HashMap::new() }
    }

    /// Whether `message` can change where a cached lookup sends a packet.
    pub fn changes_routing(&mut self, message: &RouteNetlinkMessage) -> bool {
        match message {
            RouteNetlinkMessage::NewNeighbour(neighbour) => self.update(neighbour, false),
            RouteNetlinkMessage::DelNeighbour(neighbour) => self.update(neighbour, true),
            RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
                route.header.address_family == AddressFamily::Inet
            }
            RouteNetlinkMessage::NewAddress(address) | RouteNetlinkMessage::DelAddress(address) => {
                address.header.family == AddressFamily::Inet
            }
            RouteNetlinkMessage::NewRule(rule) | RouteNetlinkMessage::DelRule(rule) => {
                rule.header.family == AddressFamily::Inet
            }
            // Links and nexthops (any interface's: a link going down moves
            // routes without a route message), and whatever else.
            _ => true,
        }
    }

    fn update(&mut self, neighbour: &NeighbourMessage, deleted: bool) -> bool {
        let header = &neighbour.header;
        if header.family != AddressFamily::Inet || !self.managed.contains(&header.ifindex) {
            return false;
        }
        let Some(address) = neighbour.attributes.iter().find_map(|attribute| match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(address)) => Some(*address),
            _ => None,
        }) else {
            return true;
        };
        // NUD_VALID (include/net/neighbour.h): what a lookup may use.
        let usable = matches!(
            header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Noarp
                | NeighbourState::Permanent
        );
        let link_address = neighbour.attributes.iter().find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => Some(bytes.clone()),
            _ => None,
        });
        let now: NeighbourUse = if usable && !deleted { link_address } else { None };
        if self.known.len() >= MAX_NEIGHBOURS {
            self.known.clear();
        }
        // One never heard of may have been used since before the book
        // began: it counts as changed.
        self.known.insert((header.ifindex, address), now.clone()) != Some(now)
    }
}

/// A non-blocking rtnetlink socket subscribed to everything that can change
/// where `bpf_fib_lookup` sends a packet.
pub struct RouteChanges {
    socket: Source,
    book: NeighbourBook,
}

/// The subscription's socket: read when asked (the tests, the benchmark's
/// thread), or woken by the daemon's runtime.
enum Source {
    Blocking(Socket),
    Tokio(TokioSocket),
}

impl Source {
    fn socket(&self) -> &Socket {
        match self {
            Source::Blocking(socket) => socket,
            Source::Tokio(socket) => socket.socket_ref(),
        }
    }
}

/// Joins the groups of the changes that matter, non-blocking.
fn subscribe_to_changes(socket: &mut Socket) -> io::Result<()> {
    let groups =
        RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
    socket.bind(&SocketAddr::new(0, groups))?;
    // Nexthop objects (`ip nexthop`) only have a group above 31.
    // Kernels without them refuse; routes then carry their next hops.
    if let Err(e) = socket.add_membership(RTNLGRP_NEXTHOP) {
        log::debug!("no nexthop notifications ({e}): routes carry their next hops");
    }
    socket.set_non_blocking(true)
}

impl RouteChanges {
    /// Subscribes in the calling thread's network namespace, for the
    /// interfaces `managed`.
    pub fn subscribe(managed: impl IntoIterator<Item = u32>) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        subscribe_to_changes(&mut socket)?;
        Ok(Self { socket: Source::Blocking(socket), book: NeighbourBook::new(managed) })
    }

    /// Moves the subscription onto a socket the calling tokio runtime wakes
    /// [`RouteChanges::next`] for; whether what the former socket still
    /// held changes a lookup (it is read after the new one subscribed, so
    /// that no change falls between the two).
    fn onto_tokio(&mut self) -> io::Result<bool> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        subscribe_to_changes(socket.socket_mut())?;
        let pending = self.drain()?;
        self.socket = Source::Tokio(socket);
        Ok(pending)
    }

    /// Waits for the next notification (on a tokio socket), then reads every
    /// pending one; whether any can change a lookup.
    async fn next(&mut self) -> io::Result<bool> {
        let Source::Tokio(socket) = &self.socket else {
            return Err(io::Error::other("the subscription is not on the runtime"));
        };
        let mut datagram = Vec::with_capacity(64 * 1024);
        let first = match socket.recv(&mut datagram).await {
            Ok(()) => self.datagram_changes_routing(&datagram),
            // ENOBUFS: notifications were lost, which is a change.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
            Err(e) => return Err(e),
        };
        Ok(self.drain()? | first)
    }

    /// Reads every pending notification; whether any can change a lookup's
    /// result. Notifications lost to a full socket buffer count as a change.
    pub fn drain(&mut self) -> io::Result<bool> {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut changed = false;
        loop {
            match self.socket.socket().recv(&mut &mut buffer[..], 0) {
                Ok(0) => return Ok(changed),
                Ok(read) => {
                    changed |= self.datagram_changes_routing(&buffer[..read.min(buffer.len())])
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(changed),
                    io::ErrorKind::Interrupted => {}
                    // ENOBUFS: notifications were lost, which is a change.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                    _ => return Err(e),
                },
            }
        }
    }

    /// Whether any message of one datagram can change a lookup's result
    /// (every message is read: the book must see them all).
    fn datagram_changes_routing(&mut self, mut bytes: &[u8]) -> bool {
        let mut changed = false;
        while !bytes.is_empty() {
            let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
                Ok(message) => message,
                Err(e) => {
                    log::debug!("an rtnetlink notification hairpin cannot read ({e}): a change");
                    return true;
                }
            };
            let length = (message.header.length as usize).next_multiple_of(4);
            changed |= match &message.payload {
                NetlinkPayload::InnerMessage(inner) => self.book.changes_routing(inner),
                NetlinkPayload::Overrun(_) => true,
                _ => false,
            };
            if length == 0 || length > bytes.len() {
                break;
            }
            bytes = &bytes[length..];
        }
        changed
    }
    /// Waits up to `timeout` for a notification.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut fds = [PollFd::new(self.socket.socket(), PollFlags::IN)];
        let timeout = Timespec::try_from(timeout).map_err(io::Error::other)?;
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Owns the datapath's route cache while it may be used.
pub struct RouteCacheKeeper {
    changes: RouteChanges,
    cache: CacheCell,
}

/// The route cache's one slot.
struct CacheCell(Array<MapData, RouteCache>);

impl CacheCell {
    fn read(&self) -> Result<RouteCache, RouteCacheError> {
        self.0.get(&0, 0).map_err(RouteCacheError::Map)
    }

    fn write(&mut self, cache: RouteCache) -> Result<(), RouteCacheError> {
        self.0.set(0, cache, 0).map_err(RouteCacheError::Map)
    }

    /// Makes everything cached so far stale, and the cache usable for
    /// another `LIFETIME_NS`.
    fn invalidate(&mut self) -> Result<(), RouteCacheError> {
        let generation = RouteCache::next_generation(self.read()?.generation);
        self.write(RouteCache {
            generation,
            valid_until_ns: monotonic_coarse_ns() + LIFETIME_NS,
            ..Default::default()
        })
    }

    /// Keeps the cache usable for another `LIFETIME_NS`.
    fn keep_alive(&mut self) -> Result<(), RouteCacheError> {
        let cache = self.read()?;
        self.write(RouteCache { valid_until_ns: monotonic_coarse_ns() + LIFETIME_NS, ..cache })
    }

    fn turn_off(&mut self) -> Result<(), RouteCacheError> {
        let cache = self.read()?;
        self.write(RouteCache { valid_until_ns: 0, ..cache })
    }
}

impl RouteCacheKeeper {
    /// Starts watching the calling thread's network namespace, and turns
    /// the cache on with a new generation: whatever an earlier keeper left
    /// cached is stale.
    pub fn start(maps: &Maps) -> Result<Self, RouteCacheError> {
        let changes = RouteChanges::subscribe(maps.managed_if_indexes()?)
            .map_err(RouteCacheError::Subscribe)?;
        let mut keeper = Self { changes, cache: CacheCell(maps.route_cache_handle()?) };
        keeper.cache.invalidate()?;
        Ok(keeper)
    }

    /// Reads the pending change notifications without waiting, and
    /// invalidates the cache if there were any.
    pub fn on_changes(&mut self) -> Result<bool, RouteCacheError> {
        let changed = self.changes.drain().map_err(RouteCacheError::Read)?;
        if changed {
            self.cache.invalidate()?;
        }
        Ok(changed)
    }

    /// Turns the cache off: every packet is looked up again.
    pub fn stop(mut self) -> Result<(), RouteCacheError> {
        self.cache.turn_off()
    }

    /// Keeps the cache on a thread of its own, for programs without a
    /// tokio runtime (the benchmark's beds); dropping the handle turns the
    /// cache off.
    pub fn spawn(self) -> KeeperThread {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || self.run_until(&stop))
        };
        KeeperThread { stop, thread: Some(thread) }
    }

    fn run_until(mut self, stop: &AtomicBool) {
        let kept = self.keep_until(stop);
        self.finish(kept);
    }

    /// Turns the cache off once the keeper stops, however it stopped: nobody
    /// watches for changes any more.
    fn finish(mut self, kept: Result<(), RouteCacheError>) {
        match kept.and_then(|()| self.cache.turn_off()) {
            Ok(()) => {}
            Err(e) => {
                log::error!("route cache off, every packet is looked up: {e}");
                if let Err(e) = self.cache.turn_off() {
                    log::warn!(
                        "turning the route cache off: {e} (it lapses within seconds anyway)"
                    );
                }
            }
        }
    }

    fn keep_until(&mut self, stop: &AtomicBool) -> Result<(), RouteCacheError> {
        let mut next_keep_alive = Instant::now() + KEEP_ALIVE_PERIOD;
        while !stop.load(Ordering::Relaxed) {
            // Short, so that `stop` is noticed soon.
            self.changes.wait(Duration::from_millis(100)).map_err(RouteCacheError::Read)?;
            self.on_changes()?;
            if Instant::now() >= next_keep_alive {
                self.cache.keep_alive()?;
                next_keep_alive = Instant::now() + KEEP_ALIVE_PERIOD;
            }
        }
        Ok(())
    }

    /// Keeps the cache as a task of the calling tokio runtime (the
    /// daemon's), woken by the notifications themselves and by the
    /// keep-alive timer. [`KeeperTask::stop`] turns the cache off.
    pub fn spawn_task(mut self) -> Result<KeeperTask, RouteCacheError> {
        let moved = self.changes.onto_tokio().map_err(RouteCacheError::Subscribe);
        if let Err(e) =
            moved.and_then(|pending| if pending { self.cache.invalidate() } else { Ok(()) })
        {
            // Nobody will watch: the cache goes off now, not when it lapses.
            let _ = self.cache.turn_off();
            return Err(e);
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let kept = keep_until_stopped(&mut self.changes, &mut self.cache, stopped).await;
            self.finish(kept);
        });
        Ok(KeeperTask { stop, task })
    }
}

async fn keep_until_stopped(
    changes: &mut RouteChanges,
    cache: &mut CacheCell,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), RouteCacheError> {
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE_PERIOD);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return Ok(()),
            changed = changes.next() => {
                if changed.map_err(RouteCacheError::Read)? {
                    cache.invalidate()?;
                }
            }
            _ = keep_alive.tick() => cache.keep_alive()?,
        }
    }
}

/// A [`RouteCacheKeeper`] running as a tokio task; it logs its errors.
pub struct KeeperTask {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl KeeperTask {
    /// Stops the keeper and waits until it has turned the cache off.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if self.task.await.is_err() {
            log::error!("the route cache keeper panicked (the cache lapses within seconds)");
        }
    }
}

/// A [`RouteCacheKeeper`] running on its own thread; it logs its errors.
pub struct KeeperThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for KeeperThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the route cache keeper panicked (the cache lapses within seconds)");
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        neighbour::NeighbourHeader,
        route::{RouteHeader, RouteMessage},
    };

    use super::*;

    const LAN: u32 = 2;
    const OTHER: u32 = 9;

    fn neighbour(
        family: AddressFamily,
        ifindex: u32,
        state: NeighbourState,
        mac: Option<[u8; 6]>,
    ) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header = NeighbourHeader { family, ifindex, state, ..Default::default() };
        let destination = match family {
            AddressFamily::Inet => NeighbourAddress::Inet(Ipv4Addr::new(192, 168, 0, 2)),
            _ => NeighbourAddress::Inet6("fe80::2".parse().expect("an address")),
        };
        message.attributes.push(NeighbourAttribute::Destination(destination));
        if let Some(mac) = mac {
            message.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        message
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const NEW_MAC: [u8; 6] = [2, 0, 0, 0, 0xaa, 2];

    /// A neighbour's notifications, one after the other, and whether each
    /// can change a lookup's result.
    #[rstest::rstest]
    #[case::first_heard_of(&[(NeighbourState::Reachable, Some(MAC), true)])]
    #[case::confirmed_again(&[
        (NeighbourState::Reachable, Some(MAC), true),
        (NeighbourState::Stale, Some(MAC), false),
        (NeighbourState::Delay, Some(MAC), false),
        (NeighbourState::Probe, Some(MAC), false),
        (NeighbourState::Reachable, Some(MAC), false),
    ])]
    #[case::moved_to_another_mac(&[
        (NeighbourState::Reachable, Some(MAC), true),
        (NeighbourState::Reachable, Some(NEW_MAC), true),
    ])]
    #[case::gone_unreachable_and_back(&[
        (NeighbourState::Reachable, Some(MAC), true),
        (NeighbourState::Failed, None, true),
        (NeighbourState::Incomplete, None, false),
        (NeighbourState::Reachable, Some(MAC), true),
    ])]
    fn a_managed_ipv4_neighbour_changes_routing_when_its_use_changes(
        #[case] steps: &[(NeighbourState, Option<[u8; 6]>, bool)],
    ) {
        let mut book = NeighbourBook::new([LAN]);
        for (n, (state, mac, changes)) in steps.iter().enumerate() {
            let message = neighbour(AddressFamily::Inet, LAN, *state, *mac);
            let message = RouteNetlinkMessage::NewNeighbour(message);
            assert_eq!(book.changes_routing(&message), *changes, "step {n}: {state:?} {mac:?}");
        }
    }

    #[test]
    fn a_deleted_neighbour_changes_routing() {
        let mut book = NeighbourBook::new([LAN]);
        let known = neighbour(AddressFamily::Inet, LAN, NeighbourState::Reachable, Some(MAC));
        assert!(book.changes_routing(&RouteNetlinkMessage::NewNeighbour(known.clone())));
        assert!(book.changes_routing(&RouteNetlinkMessage::DelNeighbour(known)));
    }

    #[rstest::rstest]
    #[case::ipv6_neighbour_discovery(AddressFamily::Inet6, LAN)]
    #[case::unmanaged_interface(AddressFamily::Inet, OTHER)]
    fn neighbours_no_lookup_uses_change_nothing(
        #[case] family: AddressFamily,
        #[case] ifindex: u32,
    ) {
        let mut book = NeighbourBook::new([LAN]);
        for mac in [MAC, NEW_MAC] {
            let message = neighbour(family, ifindex, NeighbourState::Reachable, Some(mac));
            assert!(!book.changes_routing(&RouteNetlinkMessage::NewNeighbour(message)));
        }
    }

    #[rstest::rstest]
    #[case::ipv4(AddressFamily::Inet, true)]
    #[case::ipv6(AddressFamily::Inet6, false)]
    fn only_ipv4_routes_change_routing(#[case] family: AddressFamily, #[case] changes: bool) {
        let mut book = NeighbourBook::new([LAN]);
        let mut route = RouteMessage::default();
        route.header = RouteHeader { address_family: family, ..Default::default() };
        assert_eq!(book.changes_routing(&RouteNetlinkMessage::NewRoute(route)), changes);
    }

    #[test]
    fn an_unreadable_notification_is_a_change() {
        let socket_less = |bytes: &[u8]| {
            let mut changes = RouteChanges {
                socket: Source::Blocking(Socket::new(NETLINK_ROUTE).expect("a netlink socket")),
                book: NeighbourBook::new([LAN]),
            };
            changes.datagram_changes_routing(bytes)
        };
        assert!(socket_less(&[0xff; 40]), "garbage");
        let mut buffer = vec![0u8; 256];
        let ipv6 = neighbour(AddressFamily::Inet6, LAN, NeighbourState::Reachable, Some(MAC));
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(ipv6));
        message.finalize();
        let length = message.buffer_len();
        message.serialize(&mut buffer[..length]);
        assert!(!socket_less(&buffer[..length]), "a well-formed IPv6 neighbour message");
    }
}
