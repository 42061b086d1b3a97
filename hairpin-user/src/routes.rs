//! Keeping the routes cached in conntrack entries honest.
//!
//! The datapath caches each flow's `bpf_fib_lookup` result in its entry.
//! [`RouteCacheKeeper`] listens to rtnetlink for every change of routes,
//! rules, nexthops, neighbours, addresses and links in its network namespace
//! and moves the cache's generation on, which makes every cached result
//! stale; and it keeps the cache usable for only a few seconds at a time, so
//! that when nobody listens any more (the daemon was killed), the datapath
//! soon looks every packet up again.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use hairpin_common::{RouteCache, route::LIFETIME_NS};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
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

/// A non-blocking rtnetlink socket subscribed to everything that can change
/// where `bpf_fib_lookup` sends a packet.
pub struct RouteChanges {
    socket: Socket,
}

impl RouteChanges {
    /// Subscribes in the calling thread's network namespace.
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups =
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
        socket.bind(&SocketAddr::new(0, groups))?;
        // Nexthop objects (`ip nexthop`) only have a group above 31.
        // Kernels without them refuse; routes then carry their next hops.
        if let Err(e) = socket.add_membership(RTNLGRP_NEXTHOP) {
            log::debug!("no nexthop notifications ({e}): routes carry their next hops");
        }
        socket.set_non_blocking(true)?;
        Ok(Self { socket })
    }

    /// Reads every pending notification; whether there was any. Notifications
    /// lost to a full socket buffer count as a change too.
    pub fn drain(&self) -> io::Result<bool> {
        let mut buffer = vec![0u8; 16 * 1024];
        let mut changed = false;
        loop {
            match self.socket.recv(&mut &mut buffer[..], 0) {
                Ok(0) => return Ok(changed),
                Ok(_) => changed = true,
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

    /// Waits up to `timeout` for a notification.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
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
    cache: Array<MapData, RouteCache>,
}

impl RouteCacheKeeper {
    /// Starts watching the calling thread's network namespace, and turns
    /// the cache on with a new generation: whatever an earlier keeper left
    /// cached is stale.
    pub fn start(maps: &Maps) -> Result<Self, RouteCacheError> {
        let changes = RouteChanges::subscribe().map_err(RouteCacheError::Subscribe)?;
        let mut keeper = Self { changes, cache: maps.route_cache_handle()? };
        keeper.invalidate()?;
        Ok(keeper)
    }

    fn read(&self) -> Result<RouteCache, RouteCacheError> {
        self.cache.get(&0, 0).map_err(RouteCacheError::Map)
    }

    fn write(&mut self, cache: RouteCache) -> Result<(), RouteCacheError> {
        self.cache.set(0, cache, 0).map_err(RouteCacheError::Map)
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

    /// Reads the pending change notifications without waiting, and
    /// invalidates the cache if there were any.
    pub fn on_changes(&mut self) -> Result<bool, RouteCacheError> {
        let changed = self.changes.drain().map_err(RouteCacheError::Read)?;
        if changed {
            self.invalidate()?;
        }
        Ok(changed)
    }

    /// Turns the cache off: every packet is looked up again.
    pub fn stop(mut self) -> Result<(), RouteCacheError> {
        self.turn_off()
    }

    fn turn_off(&mut self) -> Result<(), RouteCacheError> {
        let cache = self.read()?;
        self.write(RouteCache { valid_until_ns: 0, ..cache })
    }

    /// Keeps the cache on a thread of its own, so that nothing else a
    /// program does (a long reclaim, a reload) delays an invalidation or
    /// lets the cache lapse; dropping the handle turns the cache off.
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
        // Whatever ended the loop, nobody watches for changes any more.
        match kept.and_then(|()| self.turn_off()) {
            Ok(()) => {}
            Err(e) => {
                log::error!("route cache off, every packet is looked up: {e}");
                if let Err(e) = self.turn_off() {
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
                self.keep_alive()?;
                next_keep_alive = Instant::now() + KEEP_ALIVE_PERIOD;
            }
        }
        Ok(())
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
