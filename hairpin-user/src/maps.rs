//! Typed access to the datapath's maps, whether this process loaded them or
//! opened them from a running instance's pins.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key,
    },
};
use hairpin_common::{
    ADDRESS_PUBLIC, ADDRESS_SERVER, Counter, DIRECTION_ORIGINAL, FlowEntry, FlowKey, FragmentEntry,
    FragmentKey, KIND_PORT_FORWARD, LAYOUT_VERSION, MAPPING_ALLOWLIST, MAPPING_INTERFACE_BOUND,
    MAX_DENY_NETWORKS, MAX_MAPPING_INTERFACES, MAX_MAPPING_RULES, MAX_MAPPING_SOURCES,
    MAX_MAPPINGS, MappingKey, MappingStats, MappingValue, RouteCache, RuleInterface, RuleSource,
    Settings, mapping_ids, maps::names,
};
use thiserror::Error;

use crate::config::{Ipv4Net, Mapping, PortRange, Proto};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("eBPF map `{name}` is missing")]
    Missing { name: &'static str },
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: MapError },
    #[error(
        "the pinned maps at {dir} have layout {found:#x}, this hairpin expects {expected:#x}: \
         they belong to another version; stop that instance (hairpin stop, or remove {dir}) first"
    )]
    Layout { dir: String, found: u64, expected: u64 },
    #[error("{0}")]
    Mapping(String),
    #[error("reading eBPF map `{name}` in batches: {source}")]
    Batch { name: &'static str, source: std::io::Error },
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Another descriptor of map `name`.
fn dup(fd: BorrowedFd<'_>, name: &'static str) -> Result<OwnedFd, MapsError> {
    fd.try_clone_to_owned().map_err(|io_error| MapsError::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }),
    })
}

/// Addresses and ports as the maps store them: bytes in wire order.
pub fn wire_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn host_addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

/// The two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Established flows (TCP ESTABLISHED and later, UDP replied): never evicted.
    Established,
    /// Flows not established yet: LRU.
    New,
}

/// A mapping rule as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingRule {
    pub id: u16,
    pub mapping: Mapping,
}

pub struct Maps {
    /// The pin directory these maps were opened from, if they were.
    pinned_at: Option<std::path::PathBuf>,
    layout: Array<MapData, u64>,
    settings: Array<MapData, Settings>,
    route_cache: Array<MapData, RouteCache>,
    /// Another descriptor of `route_cache`, for [`Maps::route_cache_handle`].
    route_cache_fd: OwnedFd,
    lan_networks: LpmTrie<MapData, u32, u8>,
    interfaces: HashMap<MapData, u32, u8>,
    egress: DevMapHash<MapData>,
    mappings: HashMap<MapData, MappingKey, MappingValue>,
    established: HashMap<MapData, FlowKey, FlowEntry>,
    new: HashMap<MapData, FlowKey, FlowEntry>,
    counters: PerCpuArray<MapData, u64>,
    mapping_stats: PerCpuArray<MapData, MappingStats>,
    deny: LpmTrie<MapData, u32, u8>,
    mapping_sources: LpmTrie<MapData, RuleSource, u8>,
    mapping_interfaces: HashMap<MapData, RuleInterface, u8>,
    fragments: HashMap<MapData, FragmentKey, FragmentEntry>,
    flow_addresses: HashMap<MapData, u32, u8>,
    mapping_ids: Array<MapData, u64>,
}

/// What one read of both tables found for a reclaim: the entries of
/// expired flows, and which mapping rule ids live flows carry.
#[derive(Debug)]
pub struct ReclaimPlan {
    /// The expired entries as read, by table (established, new).
    pub expired: [Vec<(FlowKey, FlowEntry)>; 2],
    /// By rule id: whether an entry carrying it was read.
    pub ids_seen: Vec<bool>,
    /// When the read began (CLOCK_MONOTONIC_COARSE).
    pub read_from_ns: u64,
}

/// Why a network is in the deny set (the `DENY_NETWORKS` value; the datapath
/// denies whatever the value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyOrigin {
    /// `[deny] networks`: follows the file at every reload.
    Config,
    /// `hairpin deny add`: kept across reloads until `hairpin deny del`.
    Cli,
}

impl DenyOrigin {
    const fn value(self) -> u8 {
        match self {
            DenyOrigin::Config => 1,
            DenyOrigin::Cli => 2,
        }
    }

    const fn from_value(value: u8) -> Self {
        if value == 1 { DenyOrigin::Config } else { DenyOrigin::Cli }
    }
}

fn net_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(net.prefix_len().into(), wire_addr(net.network()))
}

fn key_net(key: &Key<u32>) -> Option<Ipv4Net> {
    Ipv4Net::new(host_addr(key.data()), key.prefix_len().try_into().ok()?).ok()
}

/// The `MAPPING_SOURCES` key of `net` in the allowlist of rule `id`.
fn source_key(id: u16, net: &Ipv4Net) -> Key<RuleSource> {
    Key::new(
        32 + u32::from(net.prefix_len()),
        RuleSource { rule: u32::from(id).to_be(), addr: wire_addr(net.network()) },
    )
}

/// Whether `entry` (at `key`) is a port forward from a client inside `net`.
pub fn forward_from(net: &Ipv4Net, key: &FlowKey, entry: &FlowEntry) -> bool {
    let client = if entry.direction == DIRECTION_ORIGINAL { key.src_addr } else { key.dst_addr };
    entry.kind == KIND_PORT_FORWARD && net.contains(&host_addr(client))
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::build(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Opens a running instance's maps from their pins in `dir`, refusing
    /// another layout than this build's.
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        check_layout(dir)?;
        let mut maps = Self::build(|name| {
            let data = MapData::from_pin(dir.join(name)).map_err(map_error(name))?;
            Map::from_map_data(data).map_err(map_error(name))
        })?;
        maps.pinned_at = Some(dir.to_path_buf());
        Ok(maps)
    }

    fn build(
        mut map: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        macro_rules! typed {
            ($name:expr) => {
                map($name)?.try_into().map_err(map_error($name))?
            };
        }
        let route_cache = map(names::ROUTE_CACHE)?;
        let Map::Array(data) = &route_cache else {
            return Err(MapsError::Missing { name: names::ROUTE_CACHE });
        };
        let route_cache_fd = dup(data.fd().as_fd(), names::ROUTE_CACHE)?;
        Ok(Self {
            pinned_at: None,
            route_cache: route_cache.try_into().map_err(map_error(names::ROUTE_CACHE))?,
            route_cache_fd,
            layout: typed!(names::LAYOUT),
            settings: typed!(names::SETTINGS),
            lan_networks: typed!(names::LAN_NETWORKS),
            interfaces: typed!(names::INTERFACES),
            egress: typed!(names::EGRESS_DEVICES),
            mappings: typed!(names::MAPPINGS),
            established: typed!(names::CONNTRACK),
            new: typed!(names::CONNTRACK_NEW),
            counters: typed!(names::COUNTERS),
            mapping_stats: typed!(names::MAPPING_STATS),
            deny: typed!(names::DENY_NETWORKS),
            mapping_sources: typed!(names::MAPPING_SOURCES),
            mapping_interfaces: typed!(names::MAPPING_INTERFACES),
            fragments: typed!(names::FRAGMENTS),
            flow_addresses: typed!(names::FLOW_ADDRESSES),
            mapping_ids: typed!(names::MAPPING_IDS),
        })
    }

    pub fn stamp_layout(&mut self) -> Result<(), MapsError> {
        self.layout.set(0, LAYOUT_VERSION, 0).map_err(map_error(names::LAYOUT))
    }

    pub fn settings(&self) -> Result<Settings, MapsError> {
        self.settings.get(&0, 0).map_err(map_error(names::SETTINGS))
    }

    pub fn set_settings(&mut self, settings: Settings) -> Result<(), MapsError> {
        self.settings.set(0, settings, 0).map_err(map_error(names::SETTINGS))
    }

    pub fn route_cache(&self) -> Result<RouteCache, MapsError> {
        self.route_cache.get(&0, 0).map_err(map_error(names::ROUTE_CACHE))
    }

    pub fn set_route_cache(&mut self, cache: RouteCache) -> Result<(), MapsError> {
        self.route_cache.set(0, cache, 0).map_err(map_error(names::ROUTE_CACHE))
    }

    /// The route cache's map on its own, for a task that keeps it.
    pub fn route_cache_handle(&self) -> Result<Array<MapData, RouteCache>, MapsError> {
        let name = names::ROUTE_CACHE;
        let data =
            MapData::from_fd(dup(self.route_cache_fd.as_fd(), name)?).map_err(map_error(name))?;
        Map::from_map_data(data).and_then(TryInto::try_into).map_err(map_error(name))
    }

    /// Makes the LAN networks exactly `networks`.
    pub fn set_lan_networks(&mut self, networks: &[Ipv4Net]) -> Result<(), MapsError> {
        let wanted: Vec<Key<u32>> = networks.iter().map(net_key).collect();
        for key in &wanted {
            self.lan_networks.insert(key, 1, 0).map_err(map_error(names::LAN_NETWORKS))?;
        }
        let present: Vec<Key<u32>> = self.lan_networks.keys().filter_map(Result::ok).collect();
        for key in present {
            let keep =
                wanted.iter().any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data());
            if !keep {
                let _ = self.lan_networks.remove(&key);
            }
        }
        Ok(())
    }

    /// The indexes of the managed interfaces.
    pub fn managed_if_indexes(&self) -> Result<Vec<u32>, MapsError> {
        self.interfaces.keys().collect::<Result<_, _>>().map_err(map_error(names::INTERFACES))
    }

    /// Makes the managed interfaces exactly `interfaces` (index, role).
    pub fn set_interfaces(&mut self, interfaces: &[(u32, u8)]) -> Result<(), MapsError> {
        for &(index, role) in interfaces {
            self.interfaces.insert(index, role, 0).map_err(map_error(names::INTERFACES))?;
        }
        let wanted: BTreeSet<u32> = interfaces.iter().map(|(index, _)| *index).collect();
        let stale: Vec<u32> =
            self.interfaces.keys().filter_map(Result::ok).filter(|i| !wanted.contains(i)).collect();
        for index in stale {
            let _ = self.interfaces.remove(&index);
        }
        Ok(())
    }

    /// Makes the devices XDP redirects into exactly `devices` (the
    /// interfaces in XDP mode); packets for any other go to TC.
    pub fn set_egress_devices(&mut self, devices: &[u32]) -> Result<(), MapsError> {
        for &index in devices {
            self.egress.insert(index, index, None, 0).map_err(|e| match e {
                aya::maps::xdp::XdpMapError::MapError(source) => {
                    MapsError::Map { name: names::EGRESS_DEVICES, source }
                }
                other => MapsError::Mapping(format!("eBPF map `EGRESS_DEVICES`: {other}")),
            })?;
        }
        let stale: Vec<u32> =
            self.egress.keys().filter_map(Result::ok).filter(|i| !devices.contains(i)).collect();
        for index in stale {
            let _ = self.egress.remove(index);
        }
        Ok(())
    }

    /// The names of the managed interfaces (LAN and WAN).
    pub fn managed_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .interfaces
            .keys()
            .filter_map(Result::ok)
            .filter_map(crate::datapath::if_name)
            .collect();
        names.sort();
        names
    }

    /// The mapping rules, in order of their public address and ports.
    pub fn mapping_rules(&self) -> Result<Vec<MappingRule>, MapsError> {
        let mut allow: BTreeMap<u16, Vec<Ipv4Net>> = BTreeMap::new();
        for key in self.mapping_sources.keys() {
            let key = key.map_err(map_error(names::MAPPING_SOURCES))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32);
            if let Ok(net) = Ipv4Net::new(host_addr(data.addr), prefix as u8) {
                allow.entry(u32::from_be(data.rule) as u16).or_default().push(net);
            }
        }
        let mut interfaces: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for key in self.mapping_interfaces.keys() {
            let key = key.map_err(map_error(names::MAPPING_INTERFACES))?;
            let name = crate::datapath::if_name(key.ifindex)
                .unwrap_or_else(|| format!("ifindex {}", key.ifindex));
            interfaces.entry(key.rule).or_default().push(name);
        }
        let mut by_id: BTreeMap<u16, Vec<(MappingKey, MappingValue)>> = BTreeMap::new();
        for entry in self.mappings.iter() {
            let (key, value) = entry.map_err(map_error(names::MAPPINGS))?;
            by_id.entry(value.id).or_default().push((key, value));
        }
        let mut rules: Vec<MappingRule> = by_id
            .into_iter()
            .filter_map(|(id, mut ports)| {
                ports.sort_by_key(|(k, _)| u16::from_be(k.public_port));
                let (first_key, first_value) = *ports.first()?;
                let (last_key, last_value) = *ports.last()?;
                let proto = match first_key.proto {
                    hairpin_common::IPPROTO_TCP => Proto::Tcp,
                    _ => Proto::Udp,
                };
                let mapping = Mapping {
                    proto,
                    public: host_addr(first_key.public_addr),
                    public_ports: PortRange {
                        first: u16::from_be(first_key.public_port),
                        last: u16::from_be(last_key.public_port),
                    },
                    to: host_addr(first_value.server_addr),
                    to_ports: PortRange {
                        first: u16::from_be(first_value.server_port),
                        last: u16::from_be(last_value.server_port),
                    },
                    allow: if first_value.flags & MAPPING_ALLOWLIST != 0 {
                        let mut nets = allow.remove(&id).unwrap_or_default();
                        nets.sort();
                        nets
                    } else {
                        Vec::new()
                    },
                    interfaces: if first_value.flags & MAPPING_INTERFACE_BOUND != 0 {
                        let mut names = interfaces.remove(&id).unwrap_or_default();
                        names.sort();
                        names
                    } else {
                        Vec::new()
                    },
                };
                Some(MappingRule { id, mapping })
            })
            .collect();
        rules.sort_by_key(|r| {
            (r.mapping.public, r.mapping.public_ports.first, r.mapping.proto.number())
        });
        Ok(rules)
    }

    /// Publishes `mapping` under a free rule id, all ports or none. Refused
    /// when it overlaps a rule already published, or when it names an
    /// interface that is not a managed one (looked up in the calling thread's
    /// namespace).
    pub fn add_mapping(&mut self, mapping: &Mapping) -> Result<u16, MapsError> {
        let mut if_indexes = Vec::new();
        for name in &mapping.interfaces {
            let index = crate::datapath::if_index(name)
                .ok()
                .filter(|index| self.interfaces.get(index, 0).is_ok())
                .ok_or_else(|| {
                    MapsError::Mapping(format!(
                        "`{name}` is not an interface this instance manages (its LAN and WAN interfaces)"
                    ))
                })?;
            if_indexes.push(index);
        }
        let rules = self.mapping_rules()?;
        if let Some(other) = rules.iter().find(|r| r.mapping.overlaps(mapping)) {
            return Err(MapsError::Mapping(format!(
                "{} {}:{} is already published ({})",
                mapping.proto, mapping.public, mapping.public_ports, other.mapping
            )));
        }
        let published: u32 = rules.iter().map(|r| r.mapping.public_ports.len()).sum();
        if published + mapping.public_ports.len() > MAX_MAPPINGS {
            return Err(MapsError::Mapping(format!(
                "{published} ports are published: {} more would pass the limit of {MAX_MAPPINGS}",
                mapping.public_ports.len()
            )));
        }
        let id = self.free_mapping_id(&rules)?;
        let stats_zero = aya::maps::PerCpuValues::try_from(vec![
            MappingStats::default();
            aya::util::nr_cpus().map_err(
                |(_, e)| MapsError::Mapping(format!("counting CPUs: {e}"))
            )?
        ])
        .map_err(|e| MapsError::Mapping(format!("per-CPU values: {e}")))?;
        self.mapping_stats
            .set(id as u32, stats_zero, 0)
            .map_err(map_error(names::MAPPING_STATS))?;
        self.set_mapping_id(id, mapping_ids::PUBLISHED)?;

        // The restrictions go in before the ports that need them, so that no
        // packet sees a flag without its entries; and whatever a rule with
        // this id left behind (a crash between two writes) goes first.
        let restricted = self
            .remove_restrictions(id)
            .and_then(|()| self.add_restrictions(id, mapping, &if_indexes));
        if let Err(error) = restricted {
            let _ = self.remove_restrictions(id);
            let _ = self.set_mapping_id(id, mapping_ids::FREE);
            return Err(error);
        }
        let flags = if mapping.allow.is_empty() { 0 } else { MAPPING_ALLOWLIST }
            | if mapping.interfaces.is_empty() { 0 } else { MAPPING_INTERFACE_BOUND };
        let mut inserted = Vec::new();
        for (public_port, server_port) in mapping.port_pairs() {
            let key = mapping_key(mapping.proto, mapping.public, public_port);
            let value = MappingValue {
                server_addr: wire_addr(mapping.to),
                server_port: server_port.to_be(),
                id,
                flags,
                _pad0: 0,
                _pad1: 0,
            };
            if let Err(source) = self.mappings.insert(key, value, BPF_NOEXIST) {
                // The ports published meanwhile may have opened flows.
                let _ = self.retire_mapping_id(id);
                for key in inserted {
                    let _ = self.mappings.remove(&key);
                }
                let _ = self.remove_restrictions(id);
                return Err(MapsError::Map { name: names::MAPPINGS, source });
            }
            inserted.push(key);
        }
        self.refresh_flow_addresses()?;
        Ok(id)
    }

    fn mapping_id_slots(&self) -> Result<Vec<u64>, MapsError> {
        (0..MAX_MAPPING_RULES)
            .map(|id| self.mapping_ids.get(&id, 0).map_err(map_error(names::MAPPING_IDS)))
            .collect()
    }

    fn set_mapping_id(&mut self, id: u16, slot: u64) -> Result<(), MapsError> {
        self.mapping_ids.set(u32::from(id), slot, 0).map_err(map_error(names::MAPPING_IDS))
    }

    fn retire_mapping_id(&mut self, id: u16) -> Result<(), MapsError> {
        self.set_mapping_id(id, mapping_ids::retired(crate::datapath::monotonic_coarse_ns()))
    }

    /// An id for a new rule: a free one, found in `MAPPING_IDS` alone. Only
    /// when every id is published or retired are the tables read, to find
    /// the retired ids no flow carries any more (the daemon's reclaim
    /// frees them as it goes, so without a daemon this is how they come
    /// back).
    fn free_mapping_id(&mut self, rules: &[MappingRule]) -> Result<u16, MapsError> {
        let mut published = vec![false; MAX_MAPPING_RULES as usize];
        for rule in rules {
            if let Some(slot) = published.get_mut(rule.id as usize) {
                *slot = true;
            }
        }
        let slots = self.mapping_id_slots()?;
        let free = |slots: &[u64]| {
            slots
                .iter()
                .zip(&published)
                .position(|(&slot, &published)| mapping_ids::is_free(slot, published))
                .map(|id| id as u16)
        };
        if let Some(id) = free(&slots) {
            return Ok(id);
        }
        let read_from_ns = crate::datapath::monotonic_coarse_ns();
        let mut ids_seen = vec![false; MAX_MAPPING_RULES as usize];
        for table in [Table::Established, Table::New] {
            self.for_each_conntrack_entry(table, |_, entry| -> Result<(), MapsError> {
                if let Some(seen) = ids_seen.get_mut(entry.mapping_id as usize) {
                    *seen = true;
                }
                Ok(())
            })?;
        }
        // A published slot without its rule is what an add that stopped
        // half-way leaves: free once no flow carries it.
        for (id, slot) in slots.iter().enumerate() {
            let abandoned = *slot == mapping_ids::PUBLISHED && !published[id];
            let settled = mapping_ids::may_free(*slot, read_from_ns) || abandoned;
            if settled && !ids_seen[id] {
                self.set_mapping_id(id as u16, mapping_ids::FREE)?;
            }
        }
        free(&self.mapping_id_slots()?).ok_or_else(|| {
            MapsError::Mapping(format!(
                "no room for more than {MAX_MAPPING_RULES} mapping rules (ids of withdrawn rules come back once their flows are gone)"
            ))
        })
    }

    /// Frees the retired ids `plan` found no flow of (see
    /// [`mapping_ids::may_free`]); how many.
    pub fn free_retired_mapping_ids(&mut self, plan: &ReclaimPlan) -> Result<usize, MapsError> {
        let mut freed = 0;
        for (id, slot) in self.mapping_id_slots()?.into_iter().enumerate() {
            if mapping_ids::may_free(slot, plan.read_from_ns) && !plan.ids_seen[id] {
                self.set_mapping_id(id as u16, mapping_ids::FREE)?;
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Makes `FLOW_ADDRESSES` say which addresses are the published rules'
    /// public and server addresses (the datapath holds early fragments only
    /// of datagrams that may be a flow's).
    fn refresh_flow_addresses(&mut self) -> Result<(), MapsError> {
        let mut wanted: BTreeMap<u32, u8> = BTreeMap::new();
        for rule in self.mapping_rules()? {
            *wanted.entry(wire_addr(rule.mapping.public)).or_default() |= ADDRESS_PUBLIC;
            *wanted.entry(wire_addr(rule.mapping.to)).or_default() |= ADDRESS_SERVER;
        }
        let present: Vec<u32> = self
            .flow_addresses
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(names::FLOW_ADDRESSES))?;
        for addr in present.iter().filter(|addr| !wanted.contains_key(addr)) {
            let _ = self.flow_addresses.remove(addr);
        }
        for (addr, role) in wanted {
            self.flow_addresses.insert(addr, role, 0).map_err(map_error(names::FLOW_ADDRESSES))?;
        }
        Ok(())
    }

    fn add_restrictions(
        &mut self,
        id: u16,
        mapping: &Mapping,
        if_indexes: &[u32],
    ) -> Result<(), MapsError> {
        let sources = self.mapping_sources.keys().count();
        if sources + mapping.allow.len() > MAX_MAPPING_SOURCES as usize {
            return Err(MapsError::Mapping(format!(
                "{sources} allowed networks are in use: {} more would pass the limit of {MAX_MAPPING_SOURCES}",
                mapping.allow.len()
            )));
        }
        let bound = self.mapping_interfaces.keys().count();
        if bound + if_indexes.len() > MAX_MAPPING_INTERFACES as usize {
            return Err(MapsError::Mapping(format!(
                "{bound} mapping interfaces are in use: {} more would pass the limit of {MAX_MAPPING_INTERFACES}",
                if_indexes.len()
            )));
        }
        for net in &mapping.allow {
            self.mapping_sources
                .insert(&source_key(id, net), 1, 0)
                .map_err(map_error(names::MAPPING_SOURCES))?;
        }
        for &ifindex in if_indexes {
            let key = RuleInterface { ifindex, rule: id, _pad: 0 };
            self.mapping_interfaces
                .insert(key, 1, 0)
                .map_err(map_error(names::MAPPING_INTERFACES))?;
        }
        Ok(())
    }

    /// Removes rule `id`'s allowlist and interfaces.
    fn remove_restrictions(&mut self, id: u16) -> Result<(), MapsError> {
        let rule = u32::from(id).to_be();
        let sources: Vec<Key<RuleSource>> = self
            .mapping_sources
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.data().rule == rule)
            .collect();
        for key in sources {
            self.mapping_sources.remove(&key).map_err(map_error(names::MAPPING_SOURCES))?;
        }
        let bound: Vec<RuleInterface> = self
            .mapping_interfaces
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.rule == id)
            .collect();
        for key in bound {
            self.mapping_interfaces.remove(&key).map_err(map_error(names::MAPPING_INTERFACES))?;
        }
        Ok(())
    }

    /// The deny set, with where each network came from.
    pub fn deny_networks(&self) -> Result<Vec<(Ipv4Net, DenyOrigin)>, MapsError> {
        let mut networks = Vec::new();
        for entry in self.deny.iter() {
            let (key, value) = entry.map_err(map_error(names::DENY_NETWORKS))?;
            networks.extend(key_net(&key).map(|net| (net, DenyOrigin::from_value(value))));
        }
        networks.sort();
        Ok(networks)
    }

    /// Adds `net` to the deny set; false if it was there already (an entry
    /// of the configuration becomes one of the command line's, so that a
    /// reload keeps it).
    pub fn add_deny(&mut self, net: &Ipv4Net, origin: DenyOrigin) -> Result<bool, MapsError> {
        let key = net_key(net);
        let present = self.deny.get(&key, 0).ok();
        if present.is_none() && self.deny.keys().count() >= MAX_DENY_NETWORKS as usize {
            return Err(MapsError::Mapping(format!(
                "the deny set is full ({MAX_DENY_NETWORKS} networks)"
            )));
        }
        if present.map(DenyOrigin::from_value) != Some(DenyOrigin::Cli) {
            self.deny.insert(&key, origin.value(), 0).map_err(map_error(names::DENY_NETWORKS))?;
        }
        Ok(present.is_none())
    }

    /// Removes exactly `net` from the deny set; false if it was not there.
    pub fn remove_deny(&mut self, net: &Ipv4Net) -> Result<bool, MapsError> {
        let key = net_key(net);
        if self.deny.get(&key, 0).is_err() {
            return Ok(false);
        }
        self.deny.remove(&key).map_err(map_error(names::DENY_NETWORKS))?;
        Ok(true)
    }

    /// Makes the configuration's part of the deny set exactly `networks`;
    /// the command line's entries stay.
    pub fn set_config_deny(&mut self, networks: &[Ipv4Net]) -> Result<(), MapsError> {
        for net in networks {
            self.add_deny(net, DenyOrigin::Config)?;
        }
        for (net, origin) in self.deny_networks()? {
            if origin == DenyOrigin::Config && !networks.contains(&net) {
                self.remove_deny(&net)?;
            }
        }
        Ok(())
    }

    /// Removes the port-forward flows of clients inside `net` (both entries
    /// of each); how many flows.
    pub fn remove_forwards_from(&mut self, net: &Ipv4Net) -> Result<usize, MapsError> {
        let mut flows = 0;
        for table in [Table::Established, Table::New] {
            let mut keys = Vec::new();
            for (key, entry) in self.conntrack(table)? {
                if forward_from(net, &key, &entry) {
                    keys.push(key);
                    if entry.direction == DIRECTION_ORIGINAL {
                        flows += 1;
                    }
                }
            }
            self.remove_flows(table, &keys);
        }
        Ok(flows)
    }

    /// Withdraws the rule publishing exactly `proto public:ports`.
    pub fn remove_mapping(
        &mut self,
        proto: Proto,
        public: Ipv4Addr,
        ports: PortRange,
    ) -> Result<MappingRule, MapsError> {
        let rules = self.mapping_rules()?;
        let rule = rules
            .into_iter()
            .find(|r| {
                r.mapping.proto == proto
                    && r.mapping.public == public
                    && r.mapping.public_ports == ports
            })
            .ok_or_else(|| {
                MapsError::Mapping(format!("no mapping publishes {proto} {public}:{ports}"))
            })?;
        // Retired before its ports go: a crash in between leaves the id
        // retired, never free while its flows may live.
        self.retire_mapping_id(rule.id)?;
        for (public_port, _) in rule.mapping.port_pairs() {
            let key = mapping_key(proto, public, public_port);
            self.mappings.remove(&key).map_err(map_error(names::MAPPINGS))?;
        }
        self.remove_restrictions(rule.id)?;
        self.refresh_flow_addresses()?;
        Ok(rule)
    }

    /// Makes the published rules exactly `wanted`: rules already published
    /// as wanted keep their id (and statistics), others are withdrawn, new
    /// ones added. Returns (added, removed).
    pub fn replace_mappings(
        &mut self,
        wanted: &[Mapping],
    ) -> Result<(Vec<Mapping>, Vec<Mapping>), MapsError> {
        let present = self.mapping_rules()?;
        let mut removed = Vec::new();
        for rule in &present {
            if !wanted.contains(&rule.mapping) {
                let m = &rule.mapping;
                self.remove_mapping(m.proto, m.public, m.public_ports)?;
                removed.push(rule.mapping.clone());
            }
        }
        let mut added = Vec::new();
        for mapping in wanted {
            if !present.iter().any(|r| &r.mapping == mapping) {
                self.add_mapping(mapping)?;
                added.push(mapping.clone());
            }
        }
        Ok((added, removed))
    }

    pub fn conntrack(&self, table: Table) -> Result<Vec<(FlowKey, FlowEntry)>, MapsError> {
        let mut entries = Vec::new();
        self.for_each_conntrack_entry(table, |key, entry| {
            entries.push((*key, *entry));
            Ok(())
        })?;
        Ok(entries)
    }

    fn conntrack_map(&self, table: Table) -> (&HashMap<MapData, FlowKey, FlowEntry>, &'static str) {
        match table {
            Table::Established => (&self.established, names::CONNTRACK),
            Table::New => (&self.new, names::CONNTRACK_NEW),
        }
    }

    /// Calls `each` with every entry of one conntrack table as it is read,
    /// thousands per system call: the table is not copied.
    pub fn for_each_conntrack_entry<E: From<MapsError>>(
        &self,
        table: Table,
        mut each: impl FnMut(&FlowKey, &FlowEntry) -> Result<(), E>,
    ) -> Result<(), E> {
        use aya::maps::IterableMap as _;
        let (map, name) = self.conntrack_map(table);
        crate::batch::for_each_entry(map.map().fd().as_fd(), &mut each).map_err(|stopped| {
            match stopped {
                crate::batch::Stopped::Read(source) => MapsError::Batch { name, source }.into(),
                crate::batch::Stopped::By(error) => error,
            }
        })
    }

    /// How many entries each conntrack table holds at most, as the pinned
    /// map says (not a configuration that may have changed since).
    pub fn conntrack_capacity(&self) -> Result<u32, MapsError> {
        use aya::maps::IterableMap as _;
        let info = self.established.map().info().map_err(map_error(names::CONNTRACK))?;
        Ok(info.max_entries())
    }

    /// The entry keyed by `key` in `table`, if it is there.
    pub fn flow_in(&self, table: Table, key: &FlowKey) -> Option<FlowEntry> {
        self.conntrack_map(table).0.get(key, 0).ok()
    }

    /// The entry keyed by `key`, from whichever table holds it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.established.get(key, 0).or_else(|_| self.new.get(key, 0)).ok()
    }

    /// Removes `keys` from `table`; how many were there.
    pub fn remove_flows(&mut self, table: Table, keys: &[FlowKey]) -> usize {
        let map = match table {
            Table::Established => &mut self.established,
            Table::New => &mut self.new,
        };
        keys.iter().filter(|key| map.remove(key).is_ok()).count()
    }

    /// Puts an entry back as it was (best effort: the datapath may race).
    /// The fragmented datagrams the datapath knows what to do with.
    pub fn fragments(&self) -> Result<Vec<(FragmentKey, FragmentEntry)>, MapsError> {
        self.fragments.iter().collect::<Result<Vec<_>, _>>().map_err(map_error(names::FRAGMENTS))
    }

    /// Overwrites a datagram's fragment entry (tests age entries this way).
    pub fn put_fragment(&mut self, key: &FragmentKey, entry: &FragmentEntry) {
        let _ = self.fragments.insert(key, entry, 0);
    }

    pub fn put_flow(&mut self, table: Table, key: &FlowKey, entry: &FlowEntry) {
        let map = match table {
            Table::Established => &mut self.established,
            Table::New => &mut self.new,
        };
        let _ = map.insert(key, entry, 0);
    }

    /// The keys of one conntrack table, without copying its entries.
    pub fn conntrack_keys(&self, table: Table) -> Result<Vec<FlowKey>, MapsError> {
        let (map, name) = self.conntrack_map(table);
        map.keys().collect::<Result<_, _>>().map_err(map_error(name))
    }

    /// How many entries one conntrack table holds, counted as it is read in
    /// batches.
    pub fn conntrack_len(&self, table: Table) -> Result<usize, MapsError> {
        let mut len = 0;
        self.for_each_conntrack_entry(table, |_, _| -> Result<(), MapsError> {
            len += 1;
            Ok(())
        })?;
        Ok(len)
    }

    /// How many entries the established and the new-flow table hold. Pinned
    /// tables are counted in the kernel ([`crate::entry_count`]); where
    /// that cannot run, they are read in batches.
    pub fn conntrack_entry_counts(&self) -> Result<[usize; 2], MapsError> {
        if self.pinned_at.is_some() {
            match crate::entry_count::conntrack_entries(self) {
                Ok(counts) => return Ok(counts.map(|count| count as usize)),
                Err(e) => log::debug!("counting the tables in the kernel: {e}; reading them"),
            }
        }
        self.conntrack_entry_counts_read()
    }

    /// The pin directory these maps were opened from, if they were.
    pub fn pinned_at(&self) -> Option<&Path> {
        self.pinned_at.as_deref()
    }

    /// The kernel's ids of the established and the new-flow table.
    pub fn conntrack_table_ids(&self) -> Result<[u32; 2], MapsError> {
        use aya::maps::IterableMap as _;
        let id = |map: &HashMap<MapData, FlowKey, FlowEntry>, name| {
            map.map().info().map(|info| info.id()).map_err(map_error(name))
        };
        Ok([id(&self.established, names::CONNTRACK)?, id(&self.new, names::CONNTRACK_NEW)?])
    }

    /// [`Maps::conntrack_entry_counts`] by reading both tables in batches.
    pub fn conntrack_entry_counts_read(&self) -> Result<[usize; 2], MapsError> {
        Ok([self.conntrack_len(Table::Established)?, self.conntrack_len(Table::New)?])
    }

    /// Empties both conntrack tables; how many entries there were. The ids
    /// of rules withdrawn before it began are free again: no flow carries
    /// them any more.
    pub fn flush_conntrack(&mut self) -> Result<usize, MapsError> {
        let started_ns = crate::datapath::monotonic_coarse_ns();
        let mut removed = 0;
        for table in [Table::Established, Table::New] {
            let keys = self.conntrack_keys(table)?;
            removed += self.remove_flows(table, &keys);
        }
        for (id, slot) in self.mapping_id_slots()?.into_iter().enumerate() {
            if mapping_ids::may_free(slot, started_ns) {
                self.set_mapping_id(id as u16, mapping_ids::FREE)?;
            }
        }
        Ok(removed)
    }

    /// Removes the entries of flows expired at `now_ns` from both tables,
    /// and frees the retired rule ids no flow carries; how many entries
    /// from each table (established, new).
    pub fn reclaim_expired(
        &mut self,
        settings: &Settings,
        now_ns: u64,
    ) -> Result<[usize; 2], MapsError> {
        let plan = self.reclaim_plan(settings, now_ns)?;
        self.free_retired_mapping_ids(&plan)?;
        Ok(self.remove_if_still_expired(&plan, settings, now_ns))
    }

    /// Reads both tables in batches, from `now_ns` on: the entries of flows
    /// expired at `now_ns` (only those are kept), what
    /// `remove_if_still_expired` may remove, and the rule ids the entries
    /// carry.
    pub fn reclaim_plan(&self, settings: &Settings, now_ns: u64) -> Result<ReclaimPlan, MapsError> {
        let mut plan = ReclaimPlan {
            expired: [Vec::new(), Vec::new()],
            ids_seen: vec![false; MAX_MAPPING_RULES as usize],
            read_from_ns: now_ns,
        };
        for (slot, table) in [Table::Established, Table::New].into_iter().enumerate() {
            let (map, _) = self.conntrack_map(table);
            let expired = &mut plan.expired[slot];
            let ids_seen = &mut plan.ids_seen;
            self.for_each_conntrack_entry(table, |key, entry| -> Result<(), MapsError> {
                if let Some(seen) = ids_seen.get_mut(entry.mapping_id as usize) {
                    *seen = true;
                }
                let partner = |partner: &FlowKey| map.get(partner, 0).ok();
                if crate::conntrack::flow_expired(entry, partner, settings, now_ns) {
                    expired.push((*key, *entry));
                }
                Ok(())
            })?;
        }
        Ok(plan)
    }

    /// Removes each entry of `plan` that is still the expired entry it was
    /// when read: the datapath may have refreshed it, or removed it and
    /// opened a new flow under the same key, in the meantime. BPF has no
    /// compare-and-delete: each entry is read again just before it goes,
    /// which leaves the window of two system calls. How many were removed
    /// from each table.
    pub fn remove_if_still_expired(
        &mut self,
        plan: &ReclaimPlan,
        settings: &Settings,
        now_ns: u64,
    ) -> [usize; 2] {
        let mut reclaimed = [0; 2];
        for (slot, table) in [Table::Established, Table::New].into_iter().enumerate() {
            let map = match table {
                Table::Established => &mut self.established,
                Table::New => &mut self.new,
            };
            for (key, first) in &plan.expired[slot] {
                let current = map.get(key, 0).ok();
                let partner = current.and_then(|c| map.get(&c.translated.reversed(), 0).ok());
                let still = crate::conntrack::still_expired(
                    first,
                    current.as_ref(),
                    partner.as_ref(),
                    settings,
                    now_ns,
                );
                if still && map.remove(key).is_ok() {
                    reclaimed[slot] += 1;
                }
            }
        }
        reclaimed
    }

    /// Every counter summed over the CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let values =
                    self.counters.get(&(counter as u32), 0).map_err(map_error(names::COUNTERS))?;
                Ok((counter, values.iter().sum()))
            })
            .collect()
    }

    /// Adds to a counter kept by user space (the first CPU's slot; only one
    /// process writes it).
    pub fn add_to_counter(&mut self, counter: Counter, amount: u64) -> Result<(), MapsError> {
        let name = names::COUNTERS;
        let values = self.counters.get(&(counter as u32), 0).map_err(map_error(name))?;
        let mut values: Vec<u64> = values.iter().copied().collect();
        values[0] += amount;
        let values = aya::maps::PerCpuValues::try_from(values)
            .map_err(|e| MapsError::Mapping(format!("per-CPU values: {e}")))?;
        self.counters.set(counter as u32, values, 0).map_err(map_error(name))
    }

    /// A mapping rule's traffic summed over the CPUs.
    pub fn mapping_stats(&self, id: u16) -> Result<MappingStats, MapsError> {
        let values =
            self.mapping_stats.get(&(id as u32), 0).map_err(map_error(names::MAPPING_STATS))?;
        Ok(values.iter().fold(MappingStats::default(), |sum, v| MappingStats {
            flows: sum.flows + v.flows,
            packets: sum.packets + v.packets,
            bytes: sum.bytes + v.bytes,
        }))
    }
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

fn mapping_key(proto: Proto, public: Ipv4Addr, port: u16) -> MappingKey {
    MappingKey {
        public_addr: wire_addr(public),
        public_port: port.to_be(),
        proto: proto.number(),
        _pad: 0,
    }
}

/// Refuses pinned maps stamped with another layout than this build's.
pub fn check_layout(dir: &Path) -> Result<(), MapsError> {
    let name = names::LAYOUT;
    let data = MapData::from_pin(dir.join(name)).map_err(map_error(name))?;
    let layout: Array<MapData, u64> =
        Map::from_map_data(data).map_err(map_error(name))?.try_into().map_err(map_error(name))?;
    let found = layout.get(&0, 0).map_err(map_error(name))?;
    if found != LAYOUT_VERSION {
        return Err(MapsError::Layout {
            dir: dir.display().to_string(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    Ok(())
}
