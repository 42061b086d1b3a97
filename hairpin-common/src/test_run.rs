//! The context a `BPF_PROG_TEST_RUN` of an XDP program takes, as the kernel
//! lays out `struct xdp_md` (linux/bpf.h): the explainer, the packet tests
//! and the benchmark run packets through programs with it.

/// `struct xdp_md` as user space passes it in `ctx_in`: `data` is 0 and
/// `data_end` the frame's length; the kernel fills in the rest of what it
/// needs and refuses a `data_meta` or an `egress_ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

impl XdpMd {
    /// A frame of `len` bytes received on the interface `ingress_ifindex`,
    /// queue 0.
    pub const fn received(len: usize, ingress_ifindex: u32) -> Self {
        Self {
            data: 0,
            data_end: len as u32,
            data_meta: 0,
            ingress_ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        }
    }

    /// The bytes `ctx_in` takes.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_is_the_kernels_six_words() {
        let context = XdpMd::received(60, 7);
        let words: Vec<u32> = context
            .as_bytes()
            .chunks(4)
            .map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes")))
            .collect();
        assert_eq!(words, [0, 60, 0, 7, 0, 0], "data, data_end, data_meta, ingress, queue, egress");
    }
}
