//! Frames seen on one interface of a namespace, recorded by an `AF_PACKET`
//! socket: what a host really received (or sent), whatever its stack then
//! did with it (a segment out of window, a datagram with no listener).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::Netns;

/// One frame, destination MAC first.
#[derive(Clone, Debug)]
pub struct Captured {
    /// Sent by the host itself (`PACKET_OUTGOING`), not received.
    pub outgoing: bool,
    pub frame: Vec<u8>,
}

/// Records every frame of one interface from [`Capture::start`] until it is
/// dropped.
pub struct Capture {
    frames: Arc<Mutex<Vec<Captured>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts recording `interface` of `netns`. The socket is bound when
    /// this returns: every frame from then on is recorded (up to what a
    /// 4 MiB receive buffer holds between two reads).
    pub fn start(netns: &Netns, interface: &str) -> Self {
        let fd = open(netns, interface);
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (frames, stop) = (frames.clone(), stop.clone());
            thread::spawn(move || record(&fd, &frames, &stop))
        };
        Self { frames, stop, thread: Some(thread) }
    }

    /// The frames recorded so far.
    pub fn frames(&self) -> Vec<Captured> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Polls the recorded frames until `done` holds for them or `timeout`
    /// passes; whether it held.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[Captured]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.frames.lock().unwrap_or_else(|e| e.into_inner())) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open(netns: &Netns, interface: &str) -> OwnedFd {
    let interface = interface.to_string();
    let name = netns.name().to_string();
    netns.run_in(move || {
        let c_name = std::ffi::CString::new(interface.as_str()).expect("interface name");
        // SAFETY: a valid C string.
        let if_index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(if_index, 0, "no interface {interface} in {name}");
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all))
        };
        assert!(fd >= 0, "AF_PACKET socket in {name}: {}", io::Error::last_os_error());
        // SAFETY: the kernel returned a new fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let buffer: libc::c_int = 4 << 20;
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        for (option, value, len) in [
            (
                libc::SO_RCVBUFFORCE,
                (&buffer as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>(),
            ),
            (
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>(),
            ),
        ] {
            // SAFETY: a valid option value of the length passed.
            let rc = unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, option, value, len as u32)
            };
            assert_eq!(rc, 0, "setsockopt {option} in {name}: {}", io::Error::last_os_error());
        }
        crate::raw::bind_to_interface(&fd, if_index, all)
            .unwrap_or_else(|e| panic!("bind the capture to {interface} in {name}: {e}"));
        fd
    })
}

fn record(fd: &OwnedFd, frames: &Mutex<Vec<Captured>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: valid buffers of the lengths passed.
        let len = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if len < 0 {
            // The receive timeout, so that `stop` is seen.
            continue;
        }
        let captured = Captured {
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
            frame: buf[..len as usize].to_vec(),
        };
        frames.lock().unwrap_or_else(|e| e.into_inner()).push(captured);
    }
}
