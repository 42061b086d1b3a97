//! Delivered packets per second: 64-byte UDP frames of many flows from the
//! live-frame generator at the client, through the gateway, counted by the
//! sink at the server.

use std::{any::Any, net::Ipv4Addr, thread, time::Duration};

use anyhow::{Context as _, bail, ensure};
use hairpin::datapath::Datapath;
use hairpin_common::bench::GeneratorConfig;
use hairpin_tests::Netns;

use crate::{
    beds::{
        Bed, BedKind, FloorBed, GATEWAY_LAN, Gateway, HOST_IF, Hosts, PUBLIC, SERVER, UDP_PORT,
    },
    programs::{Generator, Sink},
};

/// The first client port of the generated flows.
pub const CLIENT_PORT: u16 = 1024;
/// Client ports per destination port: flows beyond it use the next
/// published port.
pub const PORTS_PER_DESTINATION: u32 = 62_500;

/// A UDP frame of 60 bytes (64 on the wire with the FCS).
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut frame, &[0x5a; 18])
        .expect("building a UDP frame");
    frame
}

/// The generator's settings for `flows` client flows (swapped: the
/// server's replies to them).
pub fn flows_config(flows: u32, replies: bool) -> GeneratorConfig {
    GeneratorConfig {
        flows,
        many_count: flows.min(PORTS_PER_DESTINATION),
        many_base: CLIENT_PORT,
        few_base: UDP_PORT,
        udp_check: 0,
        swap: replies as u8,
        _pad: 0,
        frame: [0; hairpin_common::bench::GENERATOR_FRAME_LEN / 4],
    }
}

/// What a measurement saw.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub frames: u32,
    pub delivered: u64,
    pub elapsed: Duration,
}

impl Sample {
    /// Nanoseconds of the whole path per delivered packet.
    pub fn ns_per_packet(&self) -> f64 {
        if self.delivered == 0 {
            return f64::INFINITY;
        }
        self.elapsed.as_nanos() as f64 / self.delivered as f64
    }

    pub fn delivered_share(&self) -> f64 {
        self.delivered as f64 / self.frames as f64
    }
}

enum Topology {
    Floor(FloorBed),
    Gateway(Box<Bed>),
}

/// A bed set up for one configuration, with its generator and sinks.
pub struct LoadBed {
    pub kind: Option<BedKind>,
    pub gateway: Option<Gateway>,
    topology: Topology,
    generator: Generator,
    server_sink: Sink,
    /// Replies of the server to the client's flows (NAT configurations).
    replies: Option<(Generator, Sink)>,
    /// What keeps the gateway's configuration in place.
    pub configured: Box<dyn Any>,
    pub flows: u32,
}

impl LoadBed {
    /// The generator straight into the sink.
    pub fn floor(flows: u32) -> anyhow::Result<Self> {
        let bed = FloorBed::new();
        let server_sink = Sink::attach(&bed.server, HOST_IF)?;
        let frame = udp_frame(
            bed.client.mac(HOST_IF),
            bed.server.mac(HOST_IF),
            (crate::beds::ROUTED_CLIENT, CLIENT_PORT),
            (SERVER, UDP_PORT),
        );
        let generator = Generator::new(&bed.client, HOST_IF, frame, flows_config(flows, false))?;
        Ok(Self {
            kind: None,
            gateway: None,
            topology: Topology::Floor(bed),
            generator,
            server_sink,
            replies: None,
            configured: Box::new(()),
            flows,
        })
    }

    /// `gateway` on a new bed of `kind`, conntrack tables of `capacity`
    /// entries for hairpin.
    pub fn new(kind: BedKind, gateway: Gateway, flows: u32, capacity: u32) -> anyhow::Result<Self> {
        let bed = Bed::new(kind, Hosts::Bare);
        let configured = bed
            .configure(gateway, true, capacity)
            .with_context(|| format!("setting up {} on the {kind} bed", gateway.label()))?;
        let server_sink = Sink::attach(bed.server(), HOST_IF)?;
        let (to_client_side, to_server_side) = bed.gateway_macs();
        let destination = if gateway.translates() { PUBLIC } else { SERVER };
        let frame = udp_frame(
            bed.client().mac(HOST_IF),
            to_client_side,
            (bed.client_addr(), CLIENT_PORT),
            (destination, UDP_PORT),
        );
        let generator = Generator::new(bed.client(), HOST_IF, frame, flows_config(flows, false))?;
        let replies = if gateway.translates() {
            let frame = udp_frame(
                bed.server().mac(HOST_IF),
                to_server_side,
                (SERVER, UDP_PORT),
                (GATEWAY_LAN, CLIENT_PORT),
            );
            let generator =
                Generator::new(bed.server(), HOST_IF, frame, flows_config(flows, true))?;
            Some((generator, Sink::attach(bed.client(), HOST_IF)?))
        } else {
            None
        };
        Ok(Self {
            kind: Some(kind),
            gateway: Some(gateway),
            topology: Topology::Gateway(Box::new(bed)),
            generator,
            server_sink,
            replies,
            configured,
            flows,
        })
    }

    pub fn label(&self) -> String {
        match self.gateway {
            None => "floor (generator into the sink)".into(),
            Some(gateway) => gateway.label().into(),
        }
    }

    pub fn bed(&self) -> Option<&Bed> {
        match &self.topology {
            Topology::Floor(_) => None,
            Topology::Gateway(bed) => Some(bed),
        }
    }

    fn client(&self) -> &Netns {
        match &self.topology {
            Topology::Floor(bed) => &bed.client,
            Topology::Gateway(bed) => bed.client(),
        }
    }

    fn server(&self) -> &Netns {
        match &self.topology {
            Topology::Floor(bed) => &bed.server,
            Topology::Gateway(bed) => bed.server(),
        }
    }

    /// Sends `frames` frames of the client's flows and counts what the
    /// server's sink received.
    pub fn measure(&mut self, frames: u32, cpu: usize) -> anyhow::Result<Sample> {
        let before = self.server_sink.udp()?;
        let client = match &self.topology {
            Topology::Floor(bed) => &bed.client,
            Topology::Gateway(bed) => bed.client(),
        };
        let burst = self.generator.run(client, frames, cpu)?;
        if burst.frames == 0 {
            bail!("no frames sent");
        }
        settle();
        let delivered = self.server_sink.udp()? - before;
        Ok(Sample { frames, delivered, elapsed: burst.elapsed })
    }

    /// Opens every flow (one packet each) and, through a NAT, answers each
    /// from the server, so that the measured packets find established
    /// flows. Fails when the path does not deliver.
    pub fn open_flows(&mut self, cpu: usize) -> anyhow::Result<(Sample, Option<Sample>)> {
        let opened = self.measure(self.flows, cpu)?;
        ensure!(
            opened.delivered_share() > 0.5,
            "{}: only {} of {} packets reached the server{}",
            self.label(),
            opened.delivered,
            opened.frames,
            self.diagnostics()
        );
        let replied = match &mut self.replies {
            None => None,
            Some((generator, client_sink)) => {
                let server = match &self.topology {
                    Topology::Floor(bed) => &bed.server,
                    Topology::Gateway(bed) => bed.server(),
                };
                let before = client_sink.udp()?;
                let burst = generator.run(server, self.flows, cpu)?;
                settle();
                let delivered = client_sink.udp()? - before;
                if delivered * 2 < u64::from(self.flows) {
                    bail!(
                        "{}: only {delivered} of {} replies reached the client",
                        self.label(),
                        self.flows
                    );
                }
                Some(Sample { frames: self.flows, delivered, elapsed: burst.elapsed })
            }
        };
        Ok((opened, replied))
    }

    /// The interfaces' counters and the gateway's drop counters, for
    /// failure messages.
    fn diagnostics(&self) -> String {
        let mut text = String::new();
        let mut namespaces = vec![("client", self.client()), ("server", self.server())];
        if let Some(bed) = self.bed() {
            namespaces.push(("gateway", bed.gateway()));
        }
        for (role, netns) in namespaces {
            let links = netns.try_exec("ip", &["-s", "-s", "link"]);
            text.push_str(&format!(
                "\n--- {role}: ip -s link\n{}",
                String::from_utf8_lossy(&links.stdout)
            ));
        }
        if let Some(bed) = self.bed() {
            let nstat = bed.gateway().try_exec("nstat", &["-az"]);
            let interesting: Vec<String> = String::from_utf8_lossy(&nstat.stdout)
                .lines()
                .filter(|line| line.split_whitespace().nth(1).is_some_and(|v| v != "0"))
                .map(str::to_string)
                .collect();
            text.push_str(&format!("\n--- gateway: nstat\n{}", interesting.join("\n")));
        }
        text
    }

    /// hairpin's datapath, when this bed runs it.
    pub fn hairpin(&self) -> Option<&Datapath> {
        self.configured
            .downcast_ref::<Vec<Box<dyn Any>>>()?
            .iter()
            .find_map(|item| item.downcast_ref::<Datapath>())
    }

    pub fn hairpin_mut(&mut self) -> Option<&mut Datapath> {
        self.configured
            .downcast_mut::<Vec<Box<dyn Any>>>()?
            .iter_mut()
            .find_map(|item| item.downcast_mut::<Datapath>())
    }
}

/// Lets the last batch drain through the softirqs before the sinks are read.
fn settle() {
    thread::sleep(Duration::from_millis(30));
}
