//! Loading the eBPF object, filling its maps from a [`Config`], attaching it.

use std::{ffi::CString, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        xdp::{XdpLinkId, XdpMode as AttachMode},
    },
};
use hairpin_common::{
    Counter, FlowEntry, FlowKey, MappingKey, MappingValue, ROLE_LAN, ROLE_WAN, Settings,
    maps::names, maps::programs,
};
use log::warn;
use thiserror::Error;

use crate::config::{Config, Mapping, XdpMode};

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "this hairpin was built without its eBPF program (the eBPF toolchain was missing); run `cargo xtask setup` and rebuild"
    )]
    NoEbpfObject,
    #[error("interface `{0}` does not exist")]
    UnknownInterface(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("eBPF map `EGRESS_DEVICES`: {0}")]
    Devmap(aya::maps::xdp::XdpMapError),
    #[error("attaching XDP to `{interface}` in {mode} mode: {source}")]
    AttachXdp { interface: String, mode: &'static str, source: aya::programs::ProgramError },
    #[error("attaching the TC ingress program to `{interface}`: {source}")]
    AttachTc { interface: String, source: aya::programs::ProgramError },
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The interface index of `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> Result<u32, DatapathError> {
    let c_name = CString::new(name).map_err(|_| DatapathError::UnknownInterface(name.into()))?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(DatapathError::UnknownInterface(name.into())),
        index => Ok(index),
    }
}

/// Addresses and ports as the maps store them: bytes in wire order.
pub fn wire_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn host_addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

/// An interface the XDP program is attached to.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub interface: String,
    pub if_index: u32,
    pub mode: &'static str,
}

/// The loaded eBPF object. Dropping it detaches everything it attached.
pub struct Datapath {
    ebpf: Ebpf,
    attachments: Vec<(Attachment, XdpLinkId)>,
}

impl Datapath {
    /// Loads the programs and creates the maps, sized from `config`; attaches
    /// nothing.
    pub fn load(config: &Config) -> Result<Self, DatapathError> {
        if crate::EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoEbpfObject);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, config.conntrack_capacity)
            .map_max_entries(names::CONNTRACK_NEW, config.conntrack_capacity)
            .load(crate::EBPF_OBJECT)?;
        let xdp: &mut Xdp = program(&mut ebpf, programs::XDP)?;
        xdp.load().map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
        let tc: &mut SchedClassifier = program(&mut ebpf, programs::TC_INGRESS)?;
        tc.load()
            .map_err(|source| DatapathError::Program { name: programs::TC_INGRESS, source })?;
        Ok(Self { ebpf, attachments: Vec::new() })
    }

    /// Takes the aya-log ring buffer, for the caller to drain.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| warn!("eBPF log messages will not be shown: {e}"))
            .ok()
    }

    /// Writes settings, LAN networks, egress devices and mappings. The LAN
    /// (and WAN) interfaces must exist in the calling thread's namespace.
    pub fn configure(&mut self, config: &Config) -> Result<(), DatapathError> {
        let mut settings_map: Array<&mut MapData, Settings> = self.map_mut(names::SETTINGS)?;
        settings_map.set(0, settings(config), 0).map_err(map_error(names::SETTINGS))?;

        let mut networks: LpmTrie<&mut MapData, u32, u8> = self.map_mut(names::LAN_NETWORKS)?;
        for net in &config.lan.networks {
            networks
                .insert(&Key::new(net.prefix_len.into(), wire_addr(net.addr)), 1, 0)
                .map_err(map_error(names::LAN_NETWORKS))?;
        }

        let mut roles: HashMap<&mut MapData, u32, u8> = self.map_mut(names::INTERFACES)?;
        for (name, role) in managed_interfaces(config) {
            roles.insert(if_index(name)?, role, 0).map_err(map_error(names::INTERFACES))?;
        }

        let mut egress: DevMapHash<&mut MapData> = self.map_mut(names::EGRESS_DEVICES)?;
        for (name, _) in managed_interfaces(config) {
            let index = if_index(name)?;
            egress.insert(index, index, None, 0).map_err(|e| match e {
                aya::maps::xdp::XdpMapError::MapError(source) => {
                    DatapathError::Map { name: names::EGRESS_DEVICES, source }
                }
                other => DatapathError::Devmap(other),
            })?;
        }

        for mapping in &config.mappings {
            self.insert_mapping(mapping)?;
        }
        Ok(())
    }

    /// Publishes every port of `mapping`.
    pub fn insert_mapping(&mut self, mapping: &Mapping) -> Result<(), DatapathError> {
        let mut mappings: HashMap<&mut MapData, MappingKey, MappingValue> =
            self.map_mut(names::MAPPINGS)?;
        for (public_port, server_port) in mapping.port_pairs() {
            let key = MappingKey {
                public_addr: wire_addr(mapping.public),
                public_port: public_port.to_be(),
                proto: mapping.proto.number(),
                _pad: 0,
            };
            let value = MappingValue {
                server_addr: wire_addr(mapping.to),
                server_port: server_port.to_be(),
                _pad: [0; 2],
            };
            mappings.insert(key, value, 0).map_err(map_error(names::MAPPINGS))?;
        }
        Ok(())
    }

    /// Attaches XDP and the TC ingress helper to every LAN and WAN
    /// interface. On any failure, what was attached so far is detached again.
    pub fn attach(&mut self, config: &Config) -> Result<Vec<Attachment>, DatapathError> {
        let result = managed_interfaces(config)
            .try_for_each(|(name, _)| self.attach_interface(name, config.xdp_mode));
        if let Err(error) = result {
            self.detach();
            return Err(error);
        }
        Ok(self.attachments.iter().map(|(a, _)| a.clone()).collect())
    }

    fn attach_interface(&mut self, name: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let index = if_index(name)?;
        let xdp: &mut Xdp = program(&mut self.ebpf, programs::XDP)?;
        let attempt = |xdp: &mut Xdp, flags, mode_name| {
            xdp.attach_to_if_index(index, flags).map_err(|source| DatapathError::AttachXdp {
                interface: name.into(),
                mode: mode_name,
                source,
            })
        };
        let (link, mode_name) = match mode {
            XdpMode::Native => (attempt(xdp, AttachMode::Driver, "native")?, "native"),
            XdpMode::Skb => (attempt(xdp, AttachMode::Skb, "skb")?, "skb"),
            XdpMode::Auto => match attempt(xdp, AttachMode::Driver, "native") {
                Ok(link) => (link, "native"),
                Err(error) => {
                    warn!("{error}; falling back to skb (generic) mode, which is slower");
                    (attempt(xdp, AttachMode::Skb, "skb")?, "skb")
                }
            },
        };
        let attachment = Attachment { interface: name.into(), if_index: index, mode: mode_name };
        self.attachments.push((attachment, link));

        let tc: &mut SchedClassifier = program(&mut self.ebpf, programs::TC_INGRESS)?;
        if let Err(source) = tc.attach(name, TcAttachType::Ingress) {
            // Kernels before TCX (6.6) need a clsact qdisc first.
            let _ = aya::programs::tc::qdisc_add_clsact(name);
            tc.attach(name, TcAttachType::Ingress)
                .map_err(|_| DatapathError::AttachTc { interface: name.into(), source })?;
        }
        Ok(())
    }

    /// Detaches the XDP program from every interface (the TC program goes
    /// when the datapath is dropped).
    pub fn detach(&mut self) {
        if let Ok(xdp) = program::<Xdp>(&mut self.ebpf, programs::XDP) {
            for (attachment, link) in self.attachments.drain(..) {
                if let Err(e) = xdp.detach(link) {
                    warn!("detaching XDP from {}: {e}", attachment.interface);
                }
            }
        }
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, programs::XDP)
    }

    /// Every counter summed over the CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        let map = self.ebpf.map(names::COUNTERS).ok_or(DatapathError::Map {
            name: names::COUNTERS,
            source: aya::maps::MapError::InvalidName { name: names::COUNTERS.into() },
        })?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_error(names::COUNTERS))?;
        Counter::ALL
            .iter()
            .map(|&counter| {
                let values =
                    counters.get(&(counter as u32), 0).map_err(map_error(names::COUNTERS))?;
                Ok((counter, values.iter().sum()))
            })
            .collect()
    }

    /// All entries of one conntrack table (both directions of every flow).
    pub fn conntrack(&self, table: Table) -> Result<Vec<(FlowKey, FlowEntry)>, DatapathError> {
        let name = table.map_name();
        let map = self.ebpf.map(name).ok_or(DatapathError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let entries: HashMap<&MapData, FlowKey, FlowEntry> =
            HashMap::try_from(map).map_err(map_error(name))?;
        entries.iter().collect::<Result<_, _>>().map_err(map_error(name))
    }

    /// Removes the flows idle past their timeout (both entries of a flow,
    /// once both are), as the datapath treats them as absent anyway.
    /// Returns how many entries were removed from each table.
    pub fn reclaim_expired(
        &mut self,
        settings: &Settings,
        now_ns: u64,
    ) -> Result<[usize; 2], DatapathError> {
        let mut reclaimed = [0; 2];
        for (slot, table) in [Table::Established, Table::New].into_iter().enumerate() {
            let entries = self.conntrack(table)?;
            let expired = crate::conntrack::expired_flows(&entries, settings, now_ns);
            let name = table.map_name();
            let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> = self.map_mut(name)?;
            for key in &expired {
                // Gone already when the datapath or the LRU removed it.
                if map.remove(key).is_ok() {
                    reclaimed[slot] += 1;
                }
            }
        }
        Ok(reclaimed)
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        T::try_from(map).map_err(map_error(name))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The LAN interfaces, then the WAN one, with their roles.
fn managed_interfaces(config: &Config) -> impl Iterator<Item = (&String, u8)> {
    let lan = config.lan.interfaces.iter().map(|name| (name, ROLE_LAN));
    lan.chain(config.wan.iter().map(|wan| (&wan.interface, ROLE_WAN)))
}

const NANOS: u64 = 1_000_000_000;

/// The two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Established flows (TCP ESTABLISHED, UDP replied): never evicted.
    Established,
    /// Flows not established yet (and closing ones): LRU.
    New,
}

impl Table {
    pub const fn map_name(self) -> &'static str {
        match self {
            Table::Established => names::CONNTRACK,
            Table::New => names::CONNTRACK_NEW,
        }
    }
}

/// The clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * NANOS + now.tv_nsec as u64
}

/// The settings the datapath is configured with.
pub fn settings(config: &Config) -> Settings {
    let (snat_port_first, snat_port_last) = config.lan.snat_ports;
    Settings {
        lan_addr: wire_addr(config.lan.address),
        snat_port_first,
        snat_port_last,
        tcp_established_ns: config.timeouts.tcp_established * NANOS,
        tcp_transitory_ns: config.timeouts.tcp_transitory * NANOS,
        udp_ns: config.timeouts.udp * NANOS,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}
