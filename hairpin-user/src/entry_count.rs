//! How many entries the conntrack tables hold, counted in the kernel: the
//! `hairpin-count` program is loaded over the instance's pinned tables and
//! run once per table, both at once. Reading a million-flow table in
//! batches takes about a second (the kernel copies every entry out); the
//! program visits the entries in place in a fraction of that, and copies
//! nothing.

use std::path::Path;

use aya::{
    EbpfLoader,
    maps::{Map, MapInfo},
    programs::{TestRun, TestRunOptions, Xdp},
};
use hairpin_common::maps::names;
use thiserror::Error;

use crate::maps::Maps;

/// The program's name in `hairpin-count` and its result map's.
const PROGRAM: &str = "hairpin_count_entries";
const COUNTS: &str = "ENTRY_COUNTS";
/// What the program leaves in a slot when the kernel refused the walk.
const WALK_FAILED: u64 = u64::MAX;
/// `xdp_action::XDP_PASS`: the program's return when it counted.
const XDP_PASS: u32 = 2;
/// The tables, in the order of the program's slots.
const TABLES: [&str; 2] = [names::CONNTRACK, names::CONNTRACK_NEW];

#[derive(Debug, Error)]
pub enum CountError {
    #[error("built without the eBPF programs")]
    NoProgram,
    #[error("the maps were not opened from pins")]
    NotPinned,
    #[error("{0} is no longer the instance's table (the instance stopped meanwhile)")]
    TableGone(&'static str),
    #[error("the counting program: {0}")]
    Load(String),
}

/// The counting program loaded over one instance's tables, to be run as
/// often as wanted: loading it costs more than a run (aya parses the
/// kernel's BTF, the verifier checks it), so the daemon keeps one for its
/// scrapes.
pub struct EntryCounter {
    ebpf: aya::Ebpf,
}

impl EntryCounter {
    /// Loads the program over the tables of `maps`, which must have been
    /// opened from their pins.
    pub fn load(maps: &Maps) -> Result<Self, CountError> {
        if crate::COUNT_EBPF_OBJECT.is_empty() {
            return Err(CountError::NoProgram);
        }
        let dir = maps.pinned_at().ok_or(CountError::NotPinned)?;
        let capacity = maps.conntrack_capacity().map_err(|e| CountError::Load(e.to_string()))?;
        let expected = maps.conntrack_table_ids().map_err(|e| CountError::Load(e.to_string()))?;
        let paths = TABLES.map(|name| dir.join(name));
        let mut loader = EbpfLoader::new();
        for (name, path) in TABLES.iter().zip(&paths) {
            loader.map_max_entries(name, capacity).map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(crate::COUNT_EBPF_OBJECT)
            .map_err(|e| CountError::Load(format!("loading: {e}")))?;
        // aya opens a pin, or creates the map and pins it where no pin is:
        // if the instance removed its pins since `maps` were opened, the
        // program holds a new, empty table, now pinned in the instance's
        // place. That pin goes again, and nothing is counted.
        let mut gone = None;
        for ((name, path), expected) in TABLES.into_iter().zip(&paths).zip(expected) {
            let loaded = map_id(&ebpf, name)?;
            if loaded != expected {
                remove_pin_of(path, loaded);
                gone = Some(name);
            }
        }
        if let Some(name) = gone {
            return Err(CountError::TableGone(name));
        }
        program(&mut ebpf)?.load().map_err(|e| CountError::Load(format!("verifying: {e}")))?;
        Ok(Self { ebpf })
    }

    /// Entries in the established and the new-flow table now, each table
    /// counted on its own CPU at the same time. Entries the datapath adds
    /// or removes meanwhile may or may not be counted, as with any read of
    /// a live table.
    pub fn count(&mut self) -> Result<[u64; 2], CountError> {
        let program = program(&mut self.ebpf)?;
        let program: &Xdp = program;
        std::thread::scope(|scope| {
            let runs = [0u8, 1].map(|slot| scope.spawn(move || run(program, slot)));
            runs.into_iter().try_for_each(|run| {
                run.join().map_err(|_| CountError::Load("a counting thread panicked".into()))?
            })
        })?;
        let counts: aya::maps::Array<_, u64> = self
            .ebpf
            .map(COUNTS)
            .ok_or_else(|| CountError::Load(format!("no map {COUNTS}")))?
            .try_into()
            .map_err(|e| CountError::Load(format!("result map: {e}")))?;
        let read = |slot: u32| match counts.get(&slot, 0) {
            Ok(WALK_FAILED) => Err(CountError::Load(format!(
                "the kernel refused to walk {}",
                TABLES[slot as usize]
            ))),
            Ok(count) => Ok(count),
            Err(e) => Err(CountError::Load(format!("reading the counts: {e}"))),
        };
        Ok([read(0)?, read(1)?])
    }
}

/// One run of the program, counting the table of `slot` into its slot.
fn run(program: &Xdp, slot: u8) -> Result<(), CountError> {
    // The smallest frame a test run takes; its first byte names the table.
    let mut frame = [0u8; 64];
    frame[0] = slot;
    let result = program
        .test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })
        .map_err(|e| CountError::Load(format!("running: {e}")))?;
    if result.return_value != XDP_PASS {
        return Err(CountError::Load(format!(
            "counting {} ended with action {}",
            TABLES[slot as usize], result.return_value
        )));
    }
    Ok(())
}

fn map_id(ebpf: &aya::Ebpf, name: &'static str) -> Result<u32, CountError> {
    let data = match ebpf.map(name) {
        Some(Map::HashMap(data) | Map::LruHashMap(data)) => data,
        _ => return Err(CountError::Load(format!("no hash map {name}"))),
    };
    data.info().map(|info| info.id()).map_err(|e| CountError::Load(format!("{name}: {e}")))
}

/// Removes the pin at `path` if it still is map `id`'s.
fn remove_pin_of(path: &Path, id: u32) {
    if MapInfo::from_pin(path).is_ok_and(|info| info.id() == id) {
        let _ = std::fs::remove_file(path);
    }
}

/// [`EntryCounter::load`] and one [`EntryCounter::count`].
pub fn conntrack_entries(maps: &Maps) -> Result<[u64; 2], CountError> {
    EntryCounter::load(maps)?.count()
}

fn program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, CountError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| CountError::Load(format!("no program {PROGRAM}")))?
        .try_into()
        .map_err(|e| CountError::Load(format!("program type: {e}")))
}
