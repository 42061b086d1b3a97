//! Reading a BPF hash map many entries per system call
//! (`BPF_MAP_LOOKUP_BATCH`): aya has no batch operations, and entry by
//! entry a table of millions takes two system calls per entry.

use std::{io, os::fd::BorrowedFd, sync::mpsc};

use bytemuck::Pod;

/// `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`; the kernel zero-fills the rest
/// of the union from the size given.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// How many entries one call asks for.
pub const BATCH_LEN: usize = 4096;

/// Why a walk stopped before the end.
#[derive(Debug)]
pub enum Stopped<E> {
    /// The kernel could not read the map.
    Read(io::Error),
    /// The caller's callback failed.
    By(E),
}

/// Calls `each` with every entry of the hash map `map` (keys `K`, values
/// `V`, not per-CPU), `BATCH_LEN` entries per system call. An entry the
/// datapath adds or removes meanwhile may or may not be seen, as with any
/// walk of a live map; none is seen twice.
///
/// The kernel copies the next batch out on a second thread while `each`
/// goes through this one: at a million entries the copying is a quarter of
/// a listing's time. Three batches' buffers at most exist at once.
pub fn for_each_entry<K: Pod + Send, V: Pod + Send, E>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V) -> Result<(), E>,
) -> Result<(), Stopped<E>> {
    // Filled batches go to the caller, emptied ones come back for reuse.
    let (filled_tx, filled) = mpsc::sync_channel::<Batch<K, V>>(1);
    let (emptied, emptied_rx) = mpsc::channel::<Batch<K, V>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut walk = Walk::new(map);
            loop {
                let mut batch = emptied_rx.try_recv().unwrap_or_else(|_| Batch::new());
                let done = walk.next(&mut batch)?;
                // The caller stopped: nothing more to read.
                if filled_tx.send(batch).is_err() || done {
                    return Ok(());
                }
            }
        });
        let mut stopped = None;
        for batch in filled.iter() {
            let entries = batch.keys[..batch.found].iter().zip(&batch.values[..batch.found]);
            if let Some(error) = entries.map(|(key, value)| each(key, value)).find_map(Result::err)
            {
                stopped = Some(Stopped::By(error));
                break;
            }
            let _ = emptied.send(batch);
        }
        // Ends the reader's sends, whether the caller stopped or not.
        drop(filled);
        let read = reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (stopped, read) {
            (Some(stopped), _) => Err(stopped),
            (None, Err(error)) => Err(Stopped::Read(error)),
            (None, Ok(())) => Ok(()),
        }
    })
}

/// One batch's buffers and how many entries the kernel put in them.
struct Batch<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    found: usize,
}

impl<K: Pod, V: Pod> Batch<K, V> {
    fn new() -> Self {
        Self { keys: vec![K::zeroed(); BATCH_LEN], values: vec![V::zeroed(); BATCH_LEN], found: 0 }
    }
}

/// Where a walk of one map is.
struct Walk<'fd> {
    map: BorrowedFd<'fd>,
    // A hash map's batch token is the index of the bucket to go on from.
    token: u32,
    first: bool,
}

impl<'fd> Walk<'fd> {
    fn new(map: BorrowedFd<'fd>) -> Self {
        Self { map, token: 0, first: true }
    }

    /// Fills `batch` with the next entries; whether the walk is over.
    fn next<K: Pod, V: Pod>(&mut self, batch: &mut Batch<K, V>) -> io::Result<bool> {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if self.first { 0 } else { (&raw const self.token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: batch.keys.as_mut_ptr() as u64,
            values: batch.values.as_mut_ptr() as u64,
            count: BATCH_LEN as u32,
            map_fd: fd_number(self.map),
            ..Default::default()
        };
        // SAFETY: the kernel reads `attr` (its size given) and writes at
        // most `count` keys and values into the buffers, which hold that
        // many, and one token into `next`; all outlive the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let done = if result == 0 {
            false
        } else {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // The walk is over; `count` says what the last call found.
                Some(libc::ENOENT) => true,
                _ => return Err(error),
            }
        };
        batch.found = (attr.count as usize).min(BATCH_LEN);
        self.token = next;
        self.first = false;
        Ok(done)
    }
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd() as u32
}
