//! What the benchmark's eBPF programs (`hairpin-bench` object) and its
//! runner agree on: map names, the traffic generator's settings and the
//! flow each generated frame belongs to.

use bytemuck::{Pod, Zeroable};

use crate::checksum;

pub mod names {
    /// `Array<GeneratorConfig>`, one element.
    pub const GENERATOR_CONFIG: &str = "GENERATOR_CONFIG";
    /// `PerCpuArray<u64>`, one element: frames generated on each CPU.
    pub const GENERATOR_COUNTER: &str = "GENERATOR_COUNTER";
    /// `PerCpuArray<u64>`, indexed by the `SINK_*` slots.
    pub const SINK_COUNTS: &str = "SINK_COUNTS";
    /// `DevMapHash` of the interfaces the forwarder may redirect to.
    pub const FORWARD_DEVICES: &str = "FORWARD_DEVICES";
}

/// Program names in the `hairpin-bench` object.
pub mod programs {
    /// Returns `XDP_PASS`, nothing else: the cost of running any program.
    pub const EMPTY: &str = "bench_empty";
    /// Counts and drops every frame.
    pub const SINK: &str = "bench_sink";
    /// A router without NAT: `bpf_fib_lookup`, MAC rewrite, TTL, redirect.
    pub const FORWARD: &str = "bench_forward";
    /// The same router on skbs (tcx ingress): `bpf_redirect` instead.
    pub const FORWARD_TC: &str = "bench_forward_tc";
    /// Rewrites the ports of its frame to the next flow and sends it out.
    pub const GENERATOR: &str = "bench_generator";
}

/// `SINK_COUNTS` slot of IPv4 UDP frames.
pub const SINK_UDP: u32 = 0;
/// `SINK_COUNTS` slot of every other frame.
pub const SINK_OTHER: u32 = 1;
pub const SINK_SLOTS: u32 = 2;

pub const MAX_FORWARD_DEVICES: u32 = 64;

/// The length of the generator's frames: a 64-byte frame on the wire
/// without its FCS.
pub const GENERATOR_FRAME_LEN: usize = 60;

/// How the generator varies its UDP frame. Flow `i` (of `flows`, taken in
/// turn) has the "many" port `many_base + i % many_count` and the "few" port
/// `few_base + i / many_count`; without `swap` the many port is the source
/// port (a client's), with it the destination port (replies to clients).
/// `frame` is flow 0's frame with its valid UDP checksum `udp_check` (as
/// loaded from the frame). The generator copies it into every frame it
/// sends before setting the ports and checksum: live frames are recycled
/// with whatever the path downstream wrote into them (a router's MAC
/// addresses and TTL, a NAT's addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct GeneratorConfig {
    pub flows: u32,
    pub many_count: u32,
    /// host order
    pub many_base: u16,
    /// host order
    pub few_base: u16,
    /// The template frame's UDP checksum, raw.
    pub udp_check: u16,
    pub swap: u8,
    pub _pad: u8,
    /// The frame's bytes as native-order words (bytemuck has no `Pod` for
    /// 60-byte arrays).
    pub frame: [u32; GENERATOR_FRAME_LEN / 4],
}

#[cfg(feature = "user")]
// SAFETY: `Pod` (checked by bytemuck's derive: no padding).
unsafe impl aya::Pod for GeneratorConfig {}

/// The UDP ports and checksum of one generated frame: ports in wire order,
/// the checksum raw, as they are stored into the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratedFlow {
    pub src_port: u16,
    pub dst_port: u16,
    pub check: u16,
}

impl GeneratorConfig {
    /// Flow 0's (source, destination) ports, host order.
    #[inline(always)]
    pub const fn template_ports(&self) -> (u16, u16) {
        self.ordered(self.many_base, self.few_base)
    }

    #[inline(always)]
    const fn ordered(&self, many: u16, few: u16) -> (u16, u16) {
        if self.swap != 0 { (few, many) } else { (many, few) }
    }

    /// The ports and checksum of the frame numbered `counter`.
    #[inline(always)]
    pub fn flow(&self, counter: u64) -> GeneratedFlow {
        let flows = if self.flows == 0 { 1 } else { self.flows };
        let many_count = if self.many_count == 0 { 1 } else { self.many_count };
        let index = (counter % flows as u64) as u32;
        let many = self.many_base.wrapping_add((index % many_count) as u16);
        let few = self.few_base.wrapping_add((index / many_count) as u16);
        let (src, dst) = self.ordered(many, few);
        let (src0, dst0) = self.template_ports();
        let mut check = checksum::replace_u16(self.udp_check, src0.to_be(), src.to_be());
        check = checksum::replace_u16(check, dst0.to_be(), dst.to_be());
        if check == 0 {
            check = 0xffff;
        }
        GeneratedFlow { src_port: src.to_be(), dst_port: dst.to_be(), check }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A UDP header and payload with its pseudo-header, as the checksum covers it.
    fn udp_check(src_port: u16, dst_port: u16) -> u16 {
        let payload = [7u8; 18];
        let len = (8 + payload.len()) as u16;
        let mut data: Vec<u8> = Vec::new();
        data.extend([192, 168, 1, 2, 192, 168, 0, 2, 0, 17]);
        data.extend(len.to_be_bytes());
        data.extend(src_port.to_be_bytes());
        data.extend(dst_port.to_be_bytes());
        data.extend(len.to_be_bytes());
        data.extend([0, 0]);
        data.extend(payload);
        match checksum::full(&data) {
            0 => 0xffff,
            check => check,
        }
    }

    #[test]
    fn every_flow_gets_its_ports_and_a_valid_checksum() {
        for swap in [0, 1] {
            let (src0, dst0) = if swap == 1 { (10000, 1024) } else { (1024, 10000) };
            let config = GeneratorConfig {
                flows: 1000,
                many_count: 300,
                many_base: 1024,
                few_base: 10000,
                udp_check: udp_check(src0, dst0),
                swap,
                _pad: 0,
                frame: [0; GENERATOR_FRAME_LEN / 4],
            };
            for counter in [0u64, 1, 299, 300, 999, 1000, 123_456_789] {
                let index = (counter % 1000) as u16;
                let (many, few) = (1024 + index % 300, 10000 + index / 300);
                let (src, dst) = if swap == 1 { (few, many) } else { (many, few) };
                let flow = config.flow(counter);
                assert_eq!((flow.src_port, flow.dst_port), (src.to_be(), dst.to_be()));
                assert_eq!(flow.check, udp_check(src, dst), "counter {counter} swap {swap}");
            }
        }
    }
}
