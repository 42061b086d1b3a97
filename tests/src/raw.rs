//! Hand-made Ethernet frames sent from inside a namespace, through an
//! `AF_PACKET` socket bound to one interface (for spoofed or malformed
//! traffic no socket API would produce).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::Netns;

/// A raw socket that sends whole frames out of one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
}

impl PacketSocket {
    /// Opens the socket in `netns`, bound to `interface` there. It keeps
    /// sending into that namespace whatever thread uses it.
    pub fn open(netns: &Netns, interface: &str) -> Self {
        let interface = interface.to_string();
        let name = netns.name().to_string();
        netns.run_in(move || {
            let c_name = CString::new(interface.as_str()).expect("interface name");
            // SAFETY: a valid C string.
            let if_index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
            assert_ne!(if_index, 0, "no interface {interface} in {name}");
            // Protocol 0: send only, nothing is queued for reception.
            // SAFETY: plain socket creation.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0, "AF_PACKET socket in {name}: {}", io::Error::last_os_error());
            // SAFETY: the kernel returned a new fd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            bind_to_interface(&fd, if_index, (libc::ETH_P_IP as u16).to_be()).unwrap_or_else(|e| {
                panic!("bind the AF_PACKET socket to {interface} in {name}: {e}")
            });
            Self { fd, interface }
        })
    }

    /// Sends one frame (destination MAC first) as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: a valid buffer of the length passed.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != frame.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes on {}",
                frame.len(),
                self.interface
            )));
        }
        Ok(())
    }
}

/// Binds an `AF_PACKET` socket to the interface `if_index`, for the frames
/// of `protocol` (big-endian ethertype).
pub(crate) fn bind_to_interface(fd: &OwnedFd, if_index: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = if_index as i32;
    // SAFETY: a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
