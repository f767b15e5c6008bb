//! How much host memory the VMM process uses, and how much of it is guest RAM.

use crate::memory::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Resident memory of this process, split into guest RAM and the VMM's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryUsage {
    pub process_rss_kib: u64,
    /// Guest RAM pages resident on the host (what the guest touched).
    pub guest_resident_kib: u64,
    /// Everything else: the VMM's code, heap, stacks and page tables.
    pub vmm_overhead_kib: u64,
}

/// /proc/self/status, opened once: a sandboxed VMM no longer sees /proc,
/// but the descriptor it opened before still reads its own status.
static PROC_STATUS: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// This program's own code and the read-only data mapped before it, as
/// address ranges: pages a start-up touched that a running VM may not need.
static PROGRAM_PAGES: std::sync::OnceLock<Vec<(usize, usize)>> = std::sync::OnceLock::new();

/// Opens what [`measure`] reads and finds what [`trim_program_pages`] drops,
/// before a sandbox hides /proc.
pub fn prepare() {
    PROC_STATUS.get_or_init(|| std::fs::File::open("/proc/self/status").ok());
    PROGRAM_PAGES.get_or_init(|| {
        let exe = std::fs::read_link("/proc/self/exe").ok();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        exe.map(|exe| program_pages(&maps, &exe.to_string_lossy()))
            .unwrap_or_default()
    });
}

/// From /proc/self/maps: the executable's code mapping (`r-xp`) and the
/// read-only mappings at lower file offsets (its read-only data, before
/// the code). Never one after the code: there lies the data the loader
/// relocated and then made read-only, whose pages are private copies.
fn program_pages(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    let mappings: Vec<(usize, usize, &str, u64)> = maps
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [range, perms, offset, _, _, path] = fields[..] else {
                return None;
            };
            if path != exe {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
                perms,
                u64::from_str_radix(offset, 16).ok()?,
            ))
        })
        .collect();
    let Some(code_offset) = mappings
        .iter()
        .find(|(_, _, perms, _)| *perms == "r-xp")
        .map(|m| m.3)
    else {
        return Vec::new();
    };
    mappings
        .into_iter()
        .filter(|&(_, _, perms, offset)| {
            perms == "r-xp" || (perms == "r--p" && offset < code_offset)
        })
        .map(|(start, end, _, _)| (start, end))
        .collect()
}

/// Drops this process's mappings of its own code and read-only data, once
/// its VM runs: start-up (argument parsing, loading the kernel, building
/// the machine) touched far more of the program than a running VM uses,
/// and the kernel maps file pages in 64 KiB windows around each one
/// touched. The pages stay in the page cache, shared with every other VMM;
/// what the VM still runs maps back in on first use. Its resident set is
/// then what it needs, not what starting it needed.
pub fn trim_program_pages() {
    prepare();
    for &(start, end) in PROGRAM_PAGES.get().map(Vec::as_slice).unwrap_or_default() {
        // SAFETY: the range is a private, read-only mapping of this program
        // file that was never written (see `program_pages`): dropping its
        // pages only makes later reads fault them back from the file.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn process_rss_kib() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    prepare();
    let file = PROC_STATUS.get()?.as_ref()?;
    let mut buffer = vec![0u8; 8192];
    let n = file.read_at(&mut buffer, 0).ok()?;
    let status = String::from_utf8_lossy(&buffer[..n]);
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counts resident pages of every guest region with mincore(2).
fn guest_resident_kib(memory: &GuestRam) -> u64 {
    let page = 4096usize;
    let mut resident_pages = 0u64;
    let mut vector = Vec::new();
    for region in memory.iter() {
        let len = region.len() as usize;
        vector.resize(len.div_ceil(page), 0u8);
        // SAFETY: the region is a live page-aligned mapping of `len` bytes and
        // `vector` has one byte per page, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vector.as_mut_ptr()) };
        if rc == 0 {
            resident_pages += vector.iter().filter(|&&b| b & 1 != 0).count() as u64;
        }
    }
    resident_pages * (page as u64 / 1024)
}

pub fn measure(memory: &GuestRam) -> MemoryUsage {
    let process = process_rss_kib().unwrap_or(0);
    let guest = guest_resident_kib(memory);
    MemoryUsage {
        process_rss_kib: process,
        guest_resident_kib: guest,
        vmm_overhead_kib: process.saturating_sub(guest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn only_the_code_and_the_read_only_data_before_it_are_trimmed() {
        let maps = "\
55d0a000-55d0b000 r--p 00000000 fd:01 7 /usr/bin/vmm
55d0b000-55d0f000 r-xp 00001000 fd:01 7 /usr/bin/vmm
55d0f000-55d10000 r--p 00005000 fd:01 7 /usr/bin/vmm
55d10000-55d11000 rw-p 00006000 fd:01 7 /usr/bin/vmm
7f000000-7f001000 r-xp 00000000 fd:01 9 /usr/lib/libc.so.6
7f002000-7f003000 rw-p 00000000 00:00 0
";
        assert_eq!(
            program_pages(maps, "/usr/bin/vmm"),
            [(0x55d0a000, 0x55d0b000), (0x55d0b000, 0x55d0f000)]
        );
        assert!(program_pages(maps, "/other").is_empty());
    }

    /// Resident KiB of this program's code and read-only data mappings.
    fn program_resident_kib() -> u64 {
        let ranges = PROGRAM_PAGES.get().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut counting = false;
        let mut total = 0;
        for line in smaps.lines() {
            // A mapping's header: "start-end perms offset ...".
            if let Some(Ok(start)) = line
                .split_once('-')
                .map(|(start, _)| usize::from_str_radix(start, 16))
            {
                counting = ranges.iter().any(|&(s, _)| s == start);
                continue;
            }
            if counting {
                if let Some(kib) = line.strip_prefix("Rss:") {
                    total += kib
                        .trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            }
        }
        total
    }

    #[test]
    fn the_program_runs_on_after_its_pages_are_trimmed() {
        prepare();
        assert!(!PROGRAM_PAGES.get().unwrap().is_empty());
        let before = program_resident_kib();
        trim_program_pages();
        let after = program_resident_kib();
        assert!(
            after * 2 < before,
            "{before} KiB resident before, {after} KiB after"
        );
        // Code and constants fault back in: this very test goes on.
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(measure(&memory).process_rss_kib > 0);
        assert_eq!(format!("{:x}", 0xabcu32), "abc");
    }

    #[test]
    fn touched_guest_pages_are_counted_as_guest_memory() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let before = measure(&memory);
        for page in 0..256u64 {
            memory.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = measure(&memory);
        assert_eq!(after.guest_resident_kib - before.guest_resident_kib, 1024);
        assert!(after.process_rss_kib >= after.guest_resident_kib);
    }
}
