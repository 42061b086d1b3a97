//! An L3 link between two namespaces: a tun device in each (IP packets, no
//! Ethernet header, like WireGuard or PPP), joined by a relay thread that
//! copies every packet one device's queue yields into the other's.
//!
//! This kernel has no WireGuard; tun gives the same kind of interface
//! (`link/none`, ARPHRD_NONE) for a datapath to attach to.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::Netns;

/// Two tun devices and the relay between them; the relay stops (and the
/// devices go, their only descriptors closed) on drop.
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    relayed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TunRelay {
    /// Creates tun `a_name` in `a` and `b_name` in `b`, both up, and starts
    /// relaying between them.
    pub fn start(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Self {
        let a_tun = open_tun(a, a_name);
        let b_tun = open_tun(b, b_name);
        a.ip(&["link", "set", a_name, "up"]);
        b.ip(&["link", "set", b_name, "up"]);
        let stop = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, relayed) = (stop.clone(), relayed.clone());
            std::thread::spawn(move || relay(a_tun, b_tun, &stop, &relayed))
        };
        Self { stop, relayed, thread: Some(thread) }
    }

    /// Packets relayed so far, both ways.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens /dev/net/tun in `netns` and makes it the tun device `name`
/// (IFF_TUN | IFF_NO_PI: each read and write is one bare IP packet).
fn open_tun(netns: &Netns, name: &str) -> File {
    let name = name.to_string();
    netns.run_in(move || {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        assert!(name.len() < libc::IFNAMSIZ, "tun name {name} too long");
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the
        // call; the device is created in this thread's network namespace.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        file
    })
}

/// Copies packets between the two devices until `stop`; looks at `stop`
/// at least every 50 ms.
fn relay(mut a: File, mut b: File, stop: &AtomicBool, relayed: &AtomicU64) {
    let mut packet = vec![0u8; 65536];
    let tick = Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
    while !stop.load(Ordering::Relaxed) {
        let (a_ready, b_ready) = {
            let mut fds = [PollFd::new(&a, PollFlags::IN), PollFd::new(&b, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("tun relay: poll: {e}"),
            }
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
        };
        if a_ready {
            forward(&mut a, &mut b, &mut packet, relayed);
        }
        if b_ready {
            forward(&mut b, &mut a, &mut packet, relayed);
        }
    }
}

/// One packet from `from` to `to`. A packet the other side refuses (its
/// device down, say) is lost, as on a real link.
fn forward(from: &mut File, to: &mut File, packet: &mut [u8], relayed: &AtomicU64) {
    match from.read(packet) {
        Ok(0) => {}
        Ok(len) => {
            if to.write(&packet[..len]).is_ok() {
                relayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => panic!("tun relay: read: {e}"),
    }
}
