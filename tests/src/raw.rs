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

/// Sets the IPv4 header checksum of an Ethernet frame.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let header_len = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let check = hairpin_common::checksum::full(&frame[14..14 + header_len]);
    frame[24..26].copy_from_slice(&check.to_ne_bytes());
}

/// Sets the flags-and-offset field of an IPv4 frame (fixing its checksum).
pub fn with_frag_off(mut frame: Vec<u8>, frag_off: u16) -> Vec<u8> {
    frame[20..22].copy_from_slice(&frag_off.to_be_bytes());
    fix_ipv4_checksum(&mut frame);
    frame
}

/// An IPv4 datagram (a whole Ethernet frame, header without options) cut
/// into fragments carrying at most `per_fragment` bytes of its payload
/// each (a multiple of 8), in order.
pub fn ipv4_fragments(frame: &[u8], per_fragment: usize) -> Vec<Vec<u8>> {
    assert_eq!(per_fragment % 8, 0, "fragments carry multiples of 8 bytes");
    let payload = &frame[34..];
    payload
        .chunks(per_fragment)
        .enumerate()
        .map(|(index, chunk)| {
            let mut fragment = frame[..34].to_vec();
            fragment.extend_from_slice(chunk);
            let tot_len = (20 + chunk.len()) as u16;
            fragment[16..18].copy_from_slice(&tot_len.to_be_bytes());
            let more = (index + 1) * per_fragment < payload.len();
            let frag_off = ((index * per_fragment / 8) as u16) | if more { 0x2000 } else { 0 };
            with_frag_off(fragment, frag_off)
        })
        .collect()
}
