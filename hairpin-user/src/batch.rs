//! Reading a BPF hash map many entries per system call
//! (`BPF_MAP_LOOKUP_BATCH`): aya has no batch operations, and entry by
//! entry a table of millions takes two system calls per entry.

use std::{io, os::fd::BorrowedFd};

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
pub fn for_each_entry<K: Pod, V: Pod, E>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V) -> Result<(), E>,
) -> Result<(), Stopped<E>> {
    let mut keys = vec![K::zeroed(); BATCH_LEN];
    let mut values = vec![V::zeroed(); BATCH_LEN];
    // A hash map's batch token is the index of the bucket to go on from.
    let mut token = 0u32;
    let mut next = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_LEN as u32,
            map_fd: fd_number(map),
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
                _ => return Err(Stopped::Read(error)),
            }
        };
        let found = (attr.count as usize).min(BATCH_LEN);
        for (key, value) in keys[..found].iter().zip(&values[..found]) {
            each(key, value).map_err(Stopped::By)?;
        }
        if done {
            return Ok(());
        }
        token = next;
        first = false;
    }
}

fn fd_number(fd: BorrowedFd<'_>) -> u32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd() as u32
}
