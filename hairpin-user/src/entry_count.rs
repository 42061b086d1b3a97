//! How many entries the conntrack tables hold, counted in the kernel: the
//! `hairpin-count` program is loaded over the instance's pinned tables and
//! run once. Reading a million-flow table in batches takes about a second
//! (the kernel copies every entry out); the program visits the entries in
//! place in a fraction of that, and copies nothing.

use std::path::Path;

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use hairpin_common::maps::names;
use thiserror::Error;

/// The program's name in `hairpin-count` and its result map's.
const PROGRAM: &str = "hairpin_count_entries";
const COUNTS: &str = "ENTRY_COUNTS";

#[derive(Debug, Error)]
pub enum CountError {
    #[error("built without the eBPF programs")]
    NoProgram,
    #[error("the counting program: {0}")]
    Load(String),
}

/// The counting program loaded over one instance's tables, to be run as
/// often as wanted: loading it (aya parses the kernel's BTF) costs more
/// than a run, so the daemon keeps one for its scrapes.
pub struct EntryCounter {
    ebpf: aya::Ebpf,
}

impl EntryCounter {
    /// Loads the program over the tables pinned in `maps_dir` (of
    /// `capacity` entries each).
    pub fn load(maps_dir: &Path, capacity: u32) -> Result<Self, CountError> {
        if crate::COUNT_EBPF_OBJECT.is_empty() {
            return Err(CountError::NoProgram);
        }
        let established = maps_dir.join(names::CONNTRACK);
        let new = maps_dir.join(names::CONNTRACK_NEW);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, capacity)
            .map_max_entries(names::CONNTRACK_NEW, capacity)
            .map_pin_path(names::CONNTRACK, &established)
            .map_pin_path(names::CONNTRACK_NEW, &new)
            .load(crate::COUNT_EBPF_OBJECT)
            .map_err(|e| CountError::Load(format!("loading: {e}")))?;
        program(&mut ebpf)?.load().map_err(|e| CountError::Load(format!("verifying: {e}")))?;
        Ok(Self { ebpf })
    }

    /// Entries in the established and the new-flow table now. Entries the
    /// datapath adds or removes meanwhile may or may not be counted, as
    /// with any read of a live table.
    pub fn count(&mut self) -> Result<[u64; 2], CountError> {
        // The smallest frame a test run takes; the program does not read it.
        let frame = [0u8; 64];
        program(&mut self.ebpf)?
            .test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })
            .map_err(|e| CountError::Load(format!("running: {e}")))?;
        let counts: aya::maps::Array<_, u64> = self
            .ebpf
            .map(COUNTS)
            .ok_or_else(|| CountError::Load(format!("no map {COUNTS}")))?
            .try_into()
            .map_err(|e| CountError::Load(format!("result map: {e}")))?;
        let read = |slot| {
            counts.get(&slot, 0).map_err(|e| CountError::Load(format!("reading the counts: {e}")))
        };
        Ok([read(0)?, read(1)?])
    }
}

fn program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, CountError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| CountError::Load(format!("no program {PROGRAM}")))?
        .try_into()
        .map_err(|e| CountError::Load(format!("program type: {e}")))
}

/// [`EntryCounter::load`] and one [`EntryCounter::count`].
pub fn conntrack_entries(maps_dir: &Path, capacity: u32) -> Result<[u64; 2], CountError> {
    EntryCounter::load(maps_dir, capacity)?.count()
}
