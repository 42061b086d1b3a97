//! The benchmark's own programs (the `hairpin-bench` eBPF object): the
//! live-frame generator, the counting sink, the empty program and the
//! no-NAT forwarders (XDP and TC).

use hairpin_common::test_run::XdpMd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode,
    },
    util::nr_cpus,
};
use hairpin_common::bench::{GENERATOR_FRAME_LEN, GeneratorConfig, SINK_UDP, names, programs};
use hairpin_tests::Netns;

/// A fresh copy of the bench object (its own maps), nothing loaded.
fn object() -> anyhow::Result<Ebpf> {
    if hairpin::BENCH_EBPF_OBJECT.is_empty() {
        bail!("built without the eBPF programs: run it through `cargo xtask bench`");
    }
    EbpfLoader::new().load(hairpin::BENCH_EBPF_OBJECT).context("loading")
}

/// A fresh copy of the bench object, with the XDP `program` loaded.
fn load(program: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = object()?;
    xdp(&mut ebpf, program)?.load().with_context(|| format!("loading {program}"))?;
    Ok(ebpf)
}

fn xdp<'a>(ebpf: &'a mut Ebpf, program: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(program)
        .with_context(|| format!("no program {program}"))?
        .try_into()
        .with_context(|| format!("{program} is not XDP"))
}

fn if_index(name: &str) -> anyhow::Result<u32> {
    hairpin::datapath::if_index(name).with_context(|| format!("interface {name}"))
}

/// Loads `program` and attaches it (native mode) to `interface` of `netns`;
/// detached when the returned object is dropped.
fn attach(netns: &Netns, interface: &str, program: &'static str) -> anyhow::Result<Ebpf> {
    let interface = interface.to_string();
    netns.run_in(move || {
        let mut ebpf = load(program)?;
        let index = if_index(&interface)?;
        xdp(&mut ebpf, program)?
            .attach_to_if_index(index, XdpMode::Driver)
            .with_context(|| format!("attaching {program} to {interface}"))?;
        Ok(ebpf)
    })
}

/// Counts and drops every frame arriving on an interface.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    pub fn attach(netns: &Netns, interface: &str) -> anyhow::Result<Self> {
        Ok(Self { ebpf: attach(netns, interface, programs::SINK)? })
    }

    fn slot(&self, slot: u32) -> anyhow::Result<u64> {
        let counts: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(names::SINK_COUNTS).context("sink map")?)?;
        Ok(counts.get(&slot, 0)?.iter().sum())
    }

    /// IPv4 UDP frames received so far.
    pub fn udp(&self) -> anyhow::Result<u64> {
        self.slot(SINK_UDP)
    }
}

/// The forwarder without NAT, attached to a gateway's ingress interface.
pub struct Forwarder {
    _ebpf: Ebpf,
}

impl Forwarder {
    /// Attaches to `ingress`; it may redirect to any of `egress`.
    pub fn attach(netns: &Netns, ingress: &str, egress: &[&str]) -> anyhow::Result<Self> {
        let egress: Vec<String> = egress.iter().map(|name| name.to_string()).collect();
        let ingress = ingress.to_string();
        let ebpf = netns.run_in(move || {
            let mut ebpf = load(programs::FORWARD)?;
            let mut devices =
                DevMapHash::try_from(ebpf.map_mut(names::FORWARD_DEVICES).context("devmap")?)?;
            for name in &egress {
                let index = if_index(name)?;
                devices.insert(index, index, None, 0)?;
            }
            let index = if_index(&ingress)?;
            xdp(&mut ebpf, programs::FORWARD)?
                .attach_to_if_index(index, XdpMode::Driver)
                .with_context(|| format!("attaching the forwarder to {ingress}"))?;
            anyhow::Ok(ebpf)
        })?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// The forwarder without NAT on skbs, on a gateway's ingress interface's
/// tcx ingress (it redirects anywhere; the egress needs no devmap).
pub struct TcForwarder {
    _ebpf: Ebpf,
}

impl TcForwarder {
    pub fn attach(netns: &Netns, ingress: &str) -> anyhow::Result<Self> {
        let ingress = ingress.to_string();
        let ebpf = netns.run_in(move || {
            let mut ebpf = object()?;
            let program: &mut SchedClassifier = ebpf
                .program_mut(programs::FORWARD_TC)
                .context("no TC forwarder")?
                .try_into()
                .context("the TC forwarder is not a classifier")?;
            program.load().context("loading the TC forwarder")?;
            // tcx where the kernel has it, else a clsact qdisc (as hairpin).
            if program.attach(&ingress, TcAttachType::Ingress).is_err() {
                let _ = aya::programs::tc::qdisc_add_clsact(&ingress);
                program
                    .attach(&ingress, TcAttachType::Ingress)
                    .with_context(|| format!("attaching the TC forwarder to {ingress}"))?;
            }
            anyhow::Ok(ebpf)
        })?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// The live-frame generator: a UDP frame sent again and again out of an
/// interface (`XDP_TX` of a BPF_PROG_TEST_RUN in live-frame mode), each
/// copy with the ports of the next flow.
pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    /// Names the interface the frames leave from.
    context: XdpMd,
}

/// One run of the generator.
#[derive(Clone, Copy, Debug)]
pub struct Burst {
    pub frames: u32,
    pub elapsed: Duration,
}

impl Generator {
    /// A generator sending `frame` out of `interface` of `netns`, varied as
    /// `config` says (its `udp_check` is taken from the frame).
    pub fn new(
        netns: &Netns,
        interface: &str,
        frame: Vec<u8>,
        mut config: GeneratorConfig,
    ) -> anyhow::Result<Self> {
        let interface = interface.to_string();
        let index = netns.run_in(move || if_index(&interface))?;
        let mut ebpf = load(programs::GENERATOR)?;
        config.udp_check = u16::from_ne_bytes([frame[40], frame[41]]);
        ensure!(
            frame.len() == GENERATOR_FRAME_LEN,
            "the generator's frame must be {GENERATOR_FRAME_LEN} bytes"
        );
        for (word, bytes) in config.frame.iter_mut().zip(frame.chunks_exact(4)) {
            *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let mut settings: Array<_, GeneratorConfig> =
            Array::try_from(ebpf.map_mut(names::GENERATOR_CONFIG).context("config map")?)?;
        settings.set(0, config, 0)?;
        let context = XdpMd::received(frame.len(), index);
        Ok(Self { ebpf, frame, context })
    }

    /// Sends `frames` frames from flow 0 on, on a thread of `netns` pinned
    /// to `cpu`; how long the kernel took to generate and hand them on
    /// (everything downstream on veth runs in the same CPU's softirq).
    pub fn run(&mut self, netns: &Netns, frames: u32, cpu: usize) -> anyhow::Result<Burst> {
        let mut counter: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map_mut(names::GENERATOR_COUNTER).context("counter")?)?;
        let cpus = nr_cpus().map_err(|(_, e)| e).context("number of CPUs")?;
        counter.set(0, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        let program: &Xdp = self
            .ebpf
            .program(programs::GENERATOR)
            .context("generator program")?
            .try_into()
            .context("generator is XDP")?;
        let (frame, context) = (&self.frame, &self.context);
        netns.run_in(move || {
            pin_to_cpu(cpu)?;
            let start = Instant::now();
            program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(context.as_bytes()),
                    repeat: frames,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN with live frames")?;
            Ok(Burst { frames, elapsed: start.elapsed() })
        })
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).context(format!("pinning to CPU {cpu}"))
}

/// The empty program, loaded (for its cost through BPF_PROG_TEST_RUN).
pub fn empty_program() -> anyhow::Result<Ebpf> {
    load(programs::EMPTY)
}

/// The forwarder, loaded but not attached, its devmap holding `egress`
/// (for its cost through BPF_PROG_TEST_RUN; call inside the namespace).
pub fn forward_program(egress: &[&str]) -> anyhow::Result<Ebpf> {
    let mut ebpf = load(programs::FORWARD)?;
    let mut devices =
        DevMapHash::try_from(ebpf.map_mut(names::FORWARD_DEVICES).context("devmap")?)?;
    for name in egress {
        let index = if_index(name)?;
        devices.insert(index, index, None, 0)?;
    }
    Ok(ebpf)
}

/// The XDP program `name` of a loaded bench object.
pub fn program<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Xdp> {
    ebpf.program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not XDP"))
}
