//! Flow scale (hairpin's packet rate with 1 k, 100 k and 1 M established
//! flows) and memory per connection: hairpin's from its maps' information,
//! nf_conntrack's measured from the slab caches on the same kernel.

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, ensure};
use aya::maps::MapInfo;
use hairpin::datapath::Datapath;
use hairpin_common::{Counter, maps::names};

use crate::{
    beds::{BedKind, Gateway},
    load::LoadBed,
    stats::median,
};

/// The memory of one map, as the kernel accounts it (`memlock` of its
/// fdinfo, what bpftool shows as `bytes_memlock`).
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub bytes: u64,
}

impl MapMemory {
    pub fn per_entry(&self) -> f64 {
        self.bytes as f64 / f64::from(self.max_entries)
    }
}

/// The conntrack tables of a loaded datapath.
pub fn conntrack_maps(datapath: &mut Datapath) -> anyhow::Result<Vec<MapMemory>> {
    let info = datapath.xdp()?.info().context("program info")?;
    let ids = info.map_ids().context("the program's maps")?.unwrap_or_default();
    let mut maps = Vec::new();
    for id in ids {
        let map = MapInfo::from_id(id).context("map info")?;
        let name = map.name_as_str().unwrap_or_default().to_string();
        if name != names::CONNTRACK && name != names::CONNTRACK_NEW {
            continue;
        }
        let fd = map.fd().context("map fd")?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&fd));
        let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
            .context("reading the map's fdinfo")?;
        let bytes = fdinfo
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse().ok())
            .context("no memlock in the map's fdinfo")?;
        maps.push(MapMemory {
            name,
            max_entries: map.max_entries(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            bytes,
        });
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(maps.len() == 2, "found {} conntrack maps, expected 2", maps.len());
    Ok(maps)
}

pub fn counter(datapath: &Datapath, counter: Counter) -> anyhow::Result<u64> {
    Ok(datapath
        .maps
        .counters()?
        .iter()
        .find(|(c, _)| *c == counter)
        .map(|(_, value)| *value)
        .unwrap_or(0))
}

/// One flow count's measurements.
#[derive(Clone, Debug)]
pub struct ScalePoint {
    pub flows: u32,
    pub established: u64,
    /// ns per delivered packet of each round.
    pub rounds: Vec<f64>,
    /// ns per delivered packet while the flows were being opened (new-flow path).
    pub opening_ns: f64,
    pub frames: u32,
}

impl ScalePoint {
    pub fn median_ns(&self) -> f64 {
        median(&self.rounds)
    }
}

#[derive(Clone, Debug)]
pub struct Scale {
    pub capacity: u32,
    pub points: Vec<ScalePoint>,
    pub maps: Vec<MapMemory>,
}

impl Scale {
    /// Bytes per connection counting the established table only (a
    /// connection is two entries there).
    pub fn per_connection_established(&self) -> f64 {
        self.maps
            .iter()
            .find(|m| m.name == names::CONNTRACK)
            .map(|m| 2.0 * m.per_entry())
            .unwrap_or(f64::NAN)
    }

    /// Bytes per connection as configured: both tables (each of `capacity`
    /// entries, preallocated) for `capacity / 2` connections.
    pub fn per_connection_configured(&self) -> f64 {
        let total: u64 = self.maps.iter().map(|m| m.bytes).sum();
        total as f64 / (f64::from(self.capacity) / 2.0)
    }
}

/// hairpin on the routed bed with each of `flow_counts` established flows
/// (tables of `capacity` entries), measured in interleaved rounds.
pub fn flow_scale(
    flow_counts: &[u32],
    capacity: u32,
    frames: u32,
    rounds: usize,
    cpu: usize,
    log: &dyn Fn(&str),
) -> anyhow::Result<Scale> {
    let mut beds = Vec::new();
    for &flows in flow_counts {
        log(&format!("flow scale: opening {flows} flows"));
        let mut bed = LoadBed::new(BedKind::Routed, Gateway::Hairpin, flows, capacity)?;
        let (opened, _) = bed.open_flows(cpu)?;
        let established = counter(bed.hairpin().context("hairpin")?, Counter::FlowEstablished)?;
        beds.push((bed, established, opened.ns_per_packet()));
    }
    let maps = conntrack_maps(beds[0].0.hairpin_mut().context("hairpin")?)?;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); beds.len()];
    for round in 0..rounds {
        for (slot, (bed, _, _)) in beds.iter_mut().enumerate() {
            let frames = frames.max(bed.flows);
            let sample = bed.measure(frames, cpu)?;
            log(&format!(
                "flow scale round {}: {} flows: {:.0} ns/packet",
                round + 1,
                bed.flows,
                sample.ns_per_packet()
            ));
            results[slot].push(sample.ns_per_packet());
        }
    }
    let points = beds
        .iter()
        .zip(results)
        .map(|((bed, established, opening_ns), rounds)| ScalePoint {
            flows: bed.flows,
            established: *established,
            rounds,
            opening_ns: *opening_ns,
            frames: frames.max(bed.flows),
        })
        .collect();
    Ok(Scale { capacity, points, maps })
}

/// `Σ active objects × object size` per slab cache.
fn slab_bytes() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let text = fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    let mut caches = BTreeMap::new();
    for line in text.lines().skip(2) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [name, active, _total, size, ..] = fields.as_slice()
            && let (Ok(active), Ok(size)) = (active.parse::<u64>(), size.parse::<u64>())
        {
            caches.insert(name.to_string(), (active, size));
        }
    }
    Ok(caches)
}

/// nf_conntrack's memory per connection.
#[derive(Clone, Debug)]
pub struct ConntrackMemory {
    pub entries: u64,
    /// The `nf_conntrack` slab object size.
    pub object_size: u64,
    /// Growth of the `nf_conntrack` cache per entry.
    pub conntrack_cache_per_entry: f64,
    /// Growth of every other slab cache per entry (extensions, NAT; noisy:
    /// anything else allocating meanwhile counts too).
    pub other_slab_per_entry: f64,
    /// The caches that grew most, with bytes per entry.
    pub top_caches: Vec<(String, f64)>,
    /// The global hash table: buckets and the entry limit.
    pub buckets: u64,
    pub max: u64,
}

impl ConntrackMemory {
    pub fn per_connection(&self) -> f64 {
        self.conntrack_cache_per_entry + self.other_slab_per_entry + self.bucket_share()
    }

    /// The preallocated hash table's 8-byte buckets spread over the
    /// largest possible table.
    pub fn bucket_share(&self) -> f64 {
        if self.max == 0 { 0.0 } else { 8.0 * self.buckets as f64 / self.max as f64 }
    }
}

/// Opens `flows` NAT connections (with replies) through the seed's iptables
/// rules on the routed bed and measures the slab caches' growth.
pub fn conntrack_memory(flows: u32, cpu: usize) -> anyhow::Result<ConntrackMemory> {
    let mut bed = LoadBed::new(BedKind::Routed, Gateway::Iptables, flows, 0)?;
    let gateway = bed.bed().context("gateway bed")?.gateway();
    let read = |key: &str| -> u64 { gateway.sysctl_value(key).parse().unwrap_or(0) };
    let buckets = read("net.netfilter.nf_conntrack_buckets");
    let max = read("net.netfilter.nf_conntrack_max");
    let before = slab_bytes()?;
    bed.open_flows(cpu)?;
    let after = slab_bytes()?;
    let gateway = bed.bed().context("gateway bed")?.gateway();
    let entries: u64 =
        gateway.sysctl_value("net.netfilter.nf_conntrack_count").parse().unwrap_or(0);
    ensure!(entries > 0, "no conntrack entries after {flows} flows");
    let mut growth: Vec<(String, f64)> = after
        .iter()
        .map(|(name, (active, size))| {
            let (old_active, _) = before.get(name).copied().unwrap_or((0, *size));
            let delta = (*active as f64 - old_active as f64) * *size as f64;
            (name.clone(), delta / entries as f64)
        })
        .collect();
    growth.sort_by(|a, b| b.1.total_cmp(&a.1));
    let conntrack = growth.iter().find(|(name, _)| name == "nf_conntrack").map(|(_, v)| *v);
    let other: f64 =
        growth.iter().filter(|(name, v)| name != "nf_conntrack" && *v > 0.0).map(|(_, v)| v).sum();
    let object_size = after.get("nf_conntrack").map(|(_, size)| *size).unwrap_or(0);
    Ok(ConntrackMemory {
        entries,
        object_size,
        conntrack_cache_per_entry: conntrack.unwrap_or(f64::NAN),
        other_slab_per_entry: other,
        top_caches: growth.into_iter().filter(|(_, v)| *v >= 4.0).take(6).collect(),
        buckets,
        max,
    })
}
