//! How many entries the conntrack tables hold, counted in the kernel: the
//! `hairpin-count` program is loaded over the instance's pinned tables and
//! run once per table, both at once. Reading a million-flow table in
//! batches takes about a second (the kernel copies every entry out); the
//! program visits the entries in place in a fraction of that, and copies
//! nothing. The daemon loads it once and pins it beside the maps, so that
//! a `stats` neither parses the object and the kernel's BTF nor waits for
//! the verifier: it opens the pin and runs it.

use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    maps::{Map, MapInfo},
    programs::{TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use hairpin_common::maps::names;
use thiserror::Error;

use crate::maps::Maps;

/// The program's name in `hairpin-count`.
const PROGRAM: &str = "hairpin_count_entries";
/// Where the daemon pins it, in the instance's pin directory.
pub const PIN: &str = "count_entries";
/// What the program writes when the kernel refused the walk.
const WALK_FAILED: u64 = u64::MAX;
/// Where in the frame the program writes the count (native-endian).
const COUNT_AT: usize = 8;
/// `xdp_action::XDP_PASS`: the program's return when it counted.
const XDP_PASS: u32 = 2;
/// The tables, in the order of the frame's first byte.
const TABLES: [&str; 2] = [names::CONNTRACK, names::CONNTRACK_NEW];

#[derive(Debug, Error)]
pub enum CountError {
    #[error("built without the eBPF programs")]
    NoProgram,
    #[error("the maps were not opened from pins")]
    NotPinned,
    #[error("no daemon pinned a counter")]
    NoPin,
    #[error("{0} is no longer the instance's table (the instance stopped meanwhile)")]
    TableGone(&'static str),
    #[error("the counting program: {0}")]
    Load(String),
}

/// The counting program over one instance's tables, to be run as often as
/// wanted: loading it costs more than a small table's run (the object and
/// the kernel's BTF are parsed, the verifier checks it), so the daemon keeps
/// one for its scrapes and pins it for the CLI.
pub struct EntryCounter {
    program: Program,
}

enum Program {
    /// Loaded by this process (the program is in the object).
    Loaded(Box<aya::Ebpf>),
    /// Opened from the daemon's pin.
    Pinned(Box<Xdp>),
}

/// The path of the pinned counter for the maps pinned in `maps_dir`.
pub fn pin_path(maps_dir: &Path) -> Option<PathBuf> {
    maps_dir.parent().map(|dir| dir.join(PIN))
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
        Ok(Self { program: Program::Loaded(Box::new(ebpf)) })
    }

    /// Opens the counter the instance's daemon pinned for the tables of
    /// `maps` (opened from their pins), if it pinned one over those tables.
    pub fn open_pinned(maps: &Maps) -> Result<Self, CountError> {
        let dir = maps.pinned_at().ok_or(CountError::NotPinned)?;
        let path = pin_path(dir).ok_or(CountError::NotPinned)?;
        if !path.exists() {
            return Err(CountError::NoPin);
        }
        let program = Xdp::from_pin(&path, XdpAttachType::Interface)
            .map_err(|e| CountError::Load(format!("opening {}: {e}", path.display())))?;
        let expected = maps.conntrack_table_ids().map_err(|e| CountError::Load(e.to_string()))?;
        let uses = program
            .info()
            .and_then(|info| info.map_ids())
            .map_err(|e| CountError::Load(format!("{}: {e}", path.display())))?
            .unwrap_or_default();
        // A pin left by an earlier instance counts tables that are gone.
        if let Some(index) = expected.iter().position(|id| !uses.contains(id)) {
            return Err(CountError::TableGone(TABLES[index]));
        }
        Ok(Self { program: Program::Pinned(Box::new(program)) })
    }

    /// Pins the program at `path` (replacing what is there) for the CLI.
    pub fn pin(&mut self, path: &Path) -> Result<(), CountError> {
        let _ = std::fs::remove_file(path);
        let pinned = match &mut self.program {
            Program::Loaded(ebpf) => program(ebpf)?.pin(path),
            Program::Pinned(program) => program.pin(path),
        };
        pinned.map_err(|e| CountError::Load(format!("pinning at {}: {e}", path.display())))
    }

    /// Entries in the established and the new-flow table now, each table
    /// counted on its own CPU at the same time. Entries the datapath adds
    /// or removes meanwhile may or may not be counted, as with any read of
    /// a live table.
    pub fn count(&mut self) -> Result<[u64; 2], CountError> {
        let program: &Xdp = match &mut self.program {
            Program::Loaded(ebpf) => program(ebpf)?,
            Program::Pinned(program) => program,
        };
        std::thread::scope(|scope| {
            let runs = [0u8, 1].map(|slot| scope.spawn(move || run(program, slot)));
            let [established, new] = runs.map(|run| {
                run.join().map_err(|_| CountError::Load("a counting thread panicked".into()))?
            });
            Ok([established?, new?])
        })
    }
}

/// One run of the program, counting the table `slot` names.
fn run(program: &Xdp, slot: u8) -> Result<u64, CountError> {
    // The smallest frame a test run takes; its first byte names the table,
    // the program writes the count into it.
    let mut frame = [0u8; 64];
    frame[0] = slot;
    // A program that did not write its count reads back as a failed walk,
    // not as an empty table.
    frame[COUNT_AT..COUNT_AT + 8].copy_from_slice(&WALK_FAILED.to_ne_bytes());
    let mut out = [0u8; 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .map_err(|e| CountError::Load(format!("running: {e}")))?;
    let table = TABLES[usize::from(slot)];
    if result.return_value != XDP_PASS {
        return Err(CountError::Load(format!(
            "counting {table} ended with action {}",
            result.return_value
        )));
    }
    if (result.data_size_out as usize) < COUNT_AT + 8 {
        return Err(CountError::Load(format!("counting {table}: no count in the frame")));
    }
    let count = u64::from_ne_bytes(out[COUNT_AT..COUNT_AT + 8].try_into().expect("8 bytes"));
    if count == WALK_FAILED {
        return Err(CountError::Load(format!("the kernel refused to walk {table}")));
    }
    Ok(count)
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

/// One [`EntryCounter::count`] with the daemon's pinned counter, else with
/// one loaded for it.
pub fn conntrack_entries(maps: &Maps) -> Result<[u64; 2], CountError> {
    match EntryCounter::open_pinned(maps) {
        Ok(mut counter) => counter.count(),
        Err(e) => {
            log::debug!("no pinned counter: {e}; loading one");
            EntryCounter::load(maps)?.count()
        }
    }
}

fn program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, CountError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| CountError::Load(format!("no program {PROGRAM}")))?
        .try_into()
        .map_err(|e| CountError::Load(format!("program type: {e}")))
}
