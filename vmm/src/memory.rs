//! Guest RAM as the VMM holds it.
//!
//! Every region carries a dirty bitmap (one bit per 4 KiB page) that
//! vm-memory sets whenever the VMM itself writes guest memory: virtio rings
//! and buffers, boot tables. KVM's dirty log covers what vCPUs write; live
//! migration needs both.

use std::fs::File;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

/// Guest RAM: anonymous memory or a shared memfd at boot (see [`allocate`]),
/// or a private mapping of a snapshot's memory file after a restore.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Copies guest RAM out `chunk` bytes at a time, regions back to back, and
/// hands each piece to `f` with its offset in that image (a snapshot's memory
/// file, a checksum).
pub fn for_each_chunk<E: From<vm_memory::GuestMemoryError>>(
    memory: &GuestRam,
    chunk: usize,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    use vm_memory::{Address, Bytes, GuestMemoryRegion};
    let mut buffer = vec![0u8; chunk];
    let mut image_offset = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let piece = &mut buffer[..n];
            memory.read_slice(piece, region.start_addr().unchecked_add(done as u64))?;
            f(image_offset + done as u64, piece)?;
            done += n;
        }
        image_offset += len as u64;
    }
    Ok(())
}

/// Why guest RAM could not be made, or taken over from another VMM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating the guest memory file: {0}")]
    Create(std::io::Error),
    #[error("mapping guest memory: {0}")]
    Map(String),
    #[error("the handed-over guest memory is not a sealed memfd: {0}")]
    NotSealed(String),
    #[error("the handed-over guest memory holds {given} bytes, the machine has {expected}")]
    WrongSize { given: u64, expected: u64 },
}

/// The seals a memfd of guest RAM carries: its size is fixed for good, so
/// no process holding it (a hostile peer included) can shrink it under a
/// VMM's mapping, which would fault the VMM with SIGBUS.
const GUEST_RAM_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Guest RAM at the guest addresses `ranges` give. Anonymous memory, or,
/// `shared`, one sealed memfd mapped shared with the regions back to back
/// in it: a VMM on the same host can then take the very same memory over
/// (a live update of the VMM binary copies no page).
pub fn allocate(ranges: &[(GuestAddress, usize)], shared: bool) -> Result<GuestRam, MemoryError> {
    if !shared {
        return GuestRam::from_ranges(ranges).map_err(|e| MemoryError::Map(e.to_string()));
    }
    let total: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    let file = memfd::create("bulkhead-guest-ram").map_err(MemoryError::Create)?;
    file.set_len(total).map_err(MemoryError::Create)?;
    memfd::add_seals(&file, GUEST_RAM_SEALS).map_err(MemoryError::Create)?;
    map_shared(&file, ranges)
}

/// Maps guest memory another VMM handed over, after checking what a
/// hostile sender could get wrong: it must be a memfd sealed at exactly
/// the size of this machine's RAM.
pub fn take_over(file: File, ranges: &[(GuestAddress, usize)]) -> Result<GuestRam, MemoryError> {
    let seals = memfd::seals(&file).map_err(|e| MemoryError::NotSealed(e.to_string()))?;
    if seals & GUEST_RAM_SEALS != GUEST_RAM_SEALS {
        return Err(MemoryError::NotSealed(format!(
            "seals {seals:#x}, shrink, grow and seal needed"
        )));
    }
    let given = file
        .metadata()
        .map_err(|e| MemoryError::NotSealed(e.to_string()))?
        .len();
    let expected: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    if given != expected {
        return Err(MemoryError::WrongSize { given, expected });
    }
    map_shared(&file, ranges)
}

fn map_shared(file: &File, ranges: &[(GuestAddress, usize)]) -> Result<GuestRam, MemoryError> {
    map_file(file, ranges, libc::MAP_SHARED).map_err(MemoryError::Map)
}

/// Maps `file` at the guest addresses `ranges` give, the regions back to
/// back in it; `sharing` is `MAP_SHARED` or `MAP_PRIVATE`.
pub fn map_file(
    file: &File,
    ranges: &[(GuestAddress, usize)],
    sharing: libc::c_int,
) -> Result<GuestRam, String> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let clone = file.try_clone().map_err(|e| e.to_string())?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(sharing | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| format!("{e:?}"))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| format!("region at {:#x} wraps around", start.0))?,
        );
        offset += len as u64;
    }
    GuestRam::from_regions(regions).map_err(|e| format!("{e:?}"))
}

/// The memfd behind guest RAM [`allocate`] made shared (or [`take_over`]
/// mapped), if it is such memory.
pub fn shared_file(memory: &GuestRam) -> Option<&File> {
    let mut files = memory.iter().map(|region| {
        (region.flags() & libc::MAP_SHARED != 0)
            .then(|| region.file_offset().map(FileOffset::file))
            .flatten()
    });
    let first = files.next().flatten()?;
    let identity = |file: &File| {
        use std::os::unix::fs::MetadataExt;
        file.metadata().ok().map(|m| (m.dev(), m.ino()))
    };
    let id = identity(first)?;
    files
        .all(|file| file.is_some_and(|file| identity(file) == Some(id)))
        .then_some(first)
}

/// memfd_create(2) and its seals, which std does not wrap.
mod memfd {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    pub fn create(name: &str) -> std::io::Result<File> {
        let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: `name` is a valid C string; the flags are constants.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a descriptor nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn add_seals(file: &File, seals: libc::c_int) -> std::io::Result<()> {
        // SAFETY: F_ADD_SEALS takes an int and changes nothing but the file's seals.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The file's seals; EINVAL for a file that cannot be sealed (not a memfd).
    pub fn seals(file: &File) -> std::io::Result<libc::c_int> {
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(seals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const RANGES: &[(GuestAddress, usize)] =
        &[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];

    fn shared() -> GuestRam {
        allocate(RANGES, true).unwrap()
    }

    #[test]
    fn shared_memory_is_one_sealed_memfd_and_anonymous_memory_is_none() {
        let memory = shared();
        let file = shared_file(&memory).expect("a memfd");
        assert_eq!(file.metadata().unwrap().len(), 3 << 20);
        let seals = memfd::seals(file).unwrap();
        assert_eq!(
            seals,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        // Sealed: nobody can shrink it under a mapping, grow it, or seal
        // it further (against writes, say).
        assert!(file.set_len(1 << 20).is_err());
        assert!(file.set_len(4 << 20).is_err());
        assert!(memfd::add_seals(file, libc::F_SEAL_FUTURE_WRITE).is_err());
        assert!(shared_file(&allocate(RANGES, false).unwrap()).is_none());
    }

    /// A snapshot's memory file, mapped privately, is no memory to hand over.
    #[test]
    fn a_private_file_mapping_is_not_shared_memory() {
        let file = memfd::create("a snapshot's memory").unwrap();
        file.set_len(3 << 20).unwrap();
        let memory = map_file(&file, RANGES, libc::MAP_PRIVATE).unwrap();
        assert!(shared_file(&memory).is_none());
        assert!(shared_file(&map_file(&file, RANGES, libc::MAP_SHARED).unwrap()).is_some());
    }

    #[test]
    fn memory_taken_over_is_the_same_pages() {
        let memory = shared();
        let file = shared_file(&memory).unwrap().try_clone().unwrap();
        let taken = take_over(file, RANGES).unwrap();
        // The second region starts 1 MiB into the file.
        memory.write_obj(0xfeed_u64, GuestAddress(4 << 20)).unwrap();
        assert_eq!(
            taken.read_obj::<u64>(GuestAddress(4 << 20)).unwrap(),
            0xfeed
        );
        taken.write_obj(7u64, GuestAddress(0x1000)).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
        assert!(shared_file(&taken).is_some());
    }

    #[test]
    fn a_file_that_is_not_a_memfd_is_refused() {
        let path = std::env::temp_dir().join(format!("bulkhead-ram-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(3 << 20).unwrap();
        let error = take_over(file, RANGES).unwrap_err();
        assert!(matches!(error, MemoryError::NotSealed(_)), "{error}");
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let file = memfd::create("unsealed").unwrap();
        file.set_len(3 << 20).unwrap();
        let error = take_over(file, RANGES).unwrap_err().to_string();
        assert!(error.contains("shrink, grow and seal needed"), "{error}");
    }

    #[test]
    fn a_memfd_of_another_size_is_refused() {
        for len in [2 << 20, 4 << 20] {
            let file = memfd::create("wrong size").unwrap();
            file.set_len(len).unwrap();
            memfd::add_seals(&file, GUEST_RAM_SEALS).unwrap();
            let error = take_over(file, RANGES).unwrap_err();
            assert!(
                matches!(error, MemoryError::WrongSize { given, expected: 3145728 } if given == len),
                "{error}"
            );
        }
    }
}
