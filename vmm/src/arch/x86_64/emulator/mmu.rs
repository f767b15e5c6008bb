//! Guest linear → guest-physical translation, walking the guest's page tables the way the
//! CPU does for a data access or instruction fetch (SDM vol. 3, chapter 4): all paging
//! modes, large pages, access rights, Accessed/Dirty updates and #PF error codes. Also the
//! guest-physical read/write/compare-exchange helpers, which never touch host memory
//! outside guest RAM.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{EmulationError, Exception, Step};
use super::{CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE};

pub const PAGE_SIZE: u64 = 4096;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;
const PTE_NO_EXECUTE: u64 = 1 << 63;

/// #PF error-code bits.
pub const PF_PROTECTION: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RESERVED: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

/// A walk whose entries change under it (another vCPU editing them) is retried this often.
const WALK_ATTEMPTS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Execute,
}

/// What translation depends on: control registers, EFER, CPL and RFLAGS.AC.
#[derive(Clone, Copy, Debug)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: u8,
    /// RFLAGS.AC: lets supervisor code touch user pages under SMAP.
    pub alignment_check: bool,
    /// MAXPHYADDR.
    pub phys_addr_bits: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    pub page_size: u64,
}

/// A guest-physically contiguous piece of a linear range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub gpa: u64,
    pub len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 32-bit paging: two levels of 4-byte entries.
    Legacy,
    /// PAE: a 4-entry PDPT, then two levels of 8-byte entries.
    Pae,
    FourLevel,
    FiveLevel,
}

/// One level of the walk: which linear-address bits index it, and whether its entries
/// may map a page directly (PS=1).
struct Level {
    shift: u32,
    index_bits: u32,
    maps_pages: bool,
}

const LEGACY_LEVELS: [Level; 2] = [
    Level {
        shift: 22,
        index_bits: 10,
        maps_pages: true,
    },
    Level {
        shift: 12,
        index_bits: 10,
        maps_pages: true,
    },
];
const PAE_LEVELS: [Level; 3] = [
    Level {
        shift: 30,
        index_bits: 2,
        maps_pages: false,
    },
    Level {
        shift: 21,
        index_bits: 9,
        maps_pages: true,
    },
    Level {
        shift: 12,
        index_bits: 9,
        maps_pages: true,
    },
];
const FIVE_LEVELS: [Level; 5] = [
    Level {
        shift: 48,
        index_bits: 9,
        maps_pages: false,
    },
    Level {
        shift: 39,
        index_bits: 9,
        maps_pages: false,
    },
    Level {
        shift: 30,
        index_bits: 9,
        maps_pages: true,
    },
    Level {
        shift: 21,
        index_bits: 9,
        maps_pages: true,
    },
    Level {
        shift: 12,
        index_bits: 9,
        maps_pages: true,
    },
];

pub fn is_canonical(address: u64, la57: bool) -> bool {
    let unused_bits = if la57 { 64 - 57 } else { 64 - 48 };
    (((address << unused_bits) as i64) >> unused_bits) as u64 == address
}

/// Translates one linear address. With paging off the linear address is the physical one.
pub fn translate<M: GuestMemory>(
    mem: &M,
    paging: &Paging,
    linear: u64,
    access: Access,
) -> Step<Translation> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(Translation {
            gpa: linear,
            page_size: PAGE_SIZE,
        });
    }
    for _ in 0..WALK_ATTEMPTS {
        if let Some(translation) = walk(mem, paging, linear, access)? {
            return Ok(translation);
        }
    }
    Err(EmulationError::PageTableContention { linear }.into())
}

/// Translates `len` bytes at `linear` into guest-physical chunks, one per page at most
/// (merged when physically adjacent). Linear addresses wrap within `linear_mask`.
pub fn translate_range<M: GuestMemory>(
    mem: &M,
    paging: &Paging,
    linear: u64,
    len: usize,
    access: Access,
    linear_mask: u64,
) -> Step<Vec<Chunk>> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut done = 0usize;
    while done < len {
        let address = linear.wrapping_add(done as u64) & linear_mask;
        let translation = translate(mem, paging, address, access)?;
        let left_in_page = translation.page_size - (address & (translation.page_size - 1));
        let take = (len - done).min(usize::try_from(left_in_page).unwrap_or(usize::MAX));
        match chunks.last_mut() {
            Some(last) if last.gpa.wrapping_add(last.len as u64) == translation.gpa => {
                last.len += take
            }
            _ => chunks.push(Chunk {
                gpa: translation.gpa,
                len: take,
            }),
        }
        done += take;
    }
    Ok(chunks)
}

/// One walk. `Ok(None)` asks for a retry: an entry changed before its A/D bits were set.
fn walk<M: GuestMemory>(
    mem: &M,
    paging: &Paging,
    linear: u64,
    access: Access,
) -> Step<Option<Translation>> {
    let mode = if paging.cr4 & CR4_PAE == 0 {
        Mode::Legacy
    } else if paging.efer & EFER_LMA == 0 {
        Mode::Pae
    } else if paging.cr4 & CR4_LA57 != 0 {
        Mode::FiveLevel
    } else {
        Mode::FourLevel
    };
    let phys_limit = (1u64 << paging.phys_addr_bits) - 1;
    let frame_mask = phys_limit & !(PAGE_SIZE - 1);
    let nx_enabled = paging.efer & EFER_NXE != 0;
    let (mut table, levels, entry_size): (u64, &[Level], u64) = match mode {
        Mode::Legacy => (paging.cr3 & 0xffff_f000, &LEGACY_LEVELS, 4),
        Mode::Pae => (paging.cr3 & 0xffff_ffe0, &PAE_LEVELS, 8),
        Mode::FourLevel => (paging.cr3 & frame_mask, &FIVE_LEVELS[1..], 8),
        Mode::FiveLevel => (paging.cr3 & frame_mask, &FIVE_LEVELS, 8),
    };

    let user_mode = paging.cpl == 3;
    let fetch_flag = if access == Access::Execute && (nx_enabled || paging.cr4 & CR4_SMEP != 0) {
        PF_FETCH
    } else {
        0
    };
    let fault_code = fetch_flag
        | if access == Access::Write { PF_WRITE } else { 0 }
        | if user_mode { PF_USER } else { 0 };
    let fault = |extra: u32| Exception::page_fault(linear, fault_code | extra).into();

    // Entries whose Accessed bit the walk must set: (guest-physical address, value).
    let mut visited: [(u64, u64); 5] = [(0, 0); 5];
    let mut visited_count = 0;
    let (mut user, mut writable, mut executable) = (true, true, true);

    for (depth, level) in levels.iter().enumerate() {
        let index = (linear >> level.shift) & ((1 << level.index_bits) - 1);
        let entry_address = table + index * entry_size;
        let entry = read_entry(mem, entry_address, entry_size)?;
        if entry & PTE_PRESENT == 0 {
            return Err(fault(0));
        }
        let pae_pdpte = mode == Mode::Pae && depth == 0;
        let last_level = depth + 1 == levels.len();
        let large = !last_level
            && level.maps_pages
            && entry & PTE_LARGE != 0
            && (mode != Mode::Legacy || paging.cr4 & CR4_PSE != 0);
        if reserved_bits(
            mode,
            level,
            entry,
            large,
            pae_pdpte,
            paging.phys_addr_bits,
            nx_enabled,
        ) {
            return Err(fault(PF_PROTECTION | PF_RESERVED));
        }
        if pae_pdpte {
            // PAE PDPTEs carry no access rights and no Accessed bit.
            table = entry & frame_mask;
            continue;
        }
        user &= entry & PTE_USER != 0;
        writable &= entry & PTE_WRITABLE != 0;
        executable &= !(nx_enabled && entry & PTE_NO_EXECUTE != 0);
        visited[visited_count] = (entry_address, entry);
        visited_count += 1;

        if !(large || last_level) {
            table = if mode == Mode::Legacy {
                entry & 0xffff_f000
            } else {
                entry & frame_mask
            };
            continue;
        }

        let page_size = 1u64 << level.shift;
        let base = if mode == Mode::Legacy && large {
            // 4 MiB page: bits 20:13 of the entry hold physical-address bits 39:32 (PSE-36).
            (entry & 0xffc0_0000) | (((entry >> 13) & 0xff) << 32)
        } else if mode == Mode::Legacy {
            entry & 0xffff_f000
        } else {
            entry & frame_mask & !(page_size - 1)
        };

        let smap_blocks =
            !user_mode && user && paging.cr4 & CR4_SMAP != 0 && !paging.alignment_check;
        let denied = match access {
            Access::Read => (user_mode && !user) || smap_blocks,
            Access::Write if user_mode => !user || !writable,
            Access::Write => smap_blocks || (!writable && paging.cr0 & CR0_WP != 0),
            Access::Execute if user_mode => !user || !executable,
            Access::Execute => !executable || (user && paging.cr4 & CR4_SMEP != 0),
        };
        if denied {
            return Err(fault(PF_PROTECTION));
        }

        for (i, &(address, value)) in visited[..visited_count].iter().enumerate() {
            let leaf = i + 1 == visited_count;
            let wanted = PTE_ACCESSED
                | if leaf && access == Access::Write {
                    PTE_DIRTY
                } else {
                    0
                };
            if value & wanted != wanted
                && !update_entry(mem, address, entry_size, value, value | wanted)?
            {
                return Ok(None);
            }
        }
        return Ok(Some(Translation {
            gpa: base | (linear & (page_size - 1)),
            page_size,
        }));
    }
    // Every level list ends in a 4 KiB level, which always returns above.
    Err(EmulationError::PageTableContention { linear }.into())
}

/// Whether `entry` has bits set that this paging mode reserves (a #PF with RSVD set).
fn reserved_bits(
    mode: Mode,
    level: &Level,
    entry: u64,
    large: bool,
    pae_pdpte: bool,
    phys_addr_bits: u8,
    nx_enabled: bool,
) -> bool {
    if mode == Mode::Legacy {
        if !large {
            return false;
        }
        // Bit 21 and any PSE-36 address bits beyond MAXPHYADDR.
        let high_bits = u32::from(phys_addr_bits.min(40)).saturating_sub(32);
        let reserved = (1 << 21) | ((0xffu64 << 13) & !(((1u64 << high_bits) - 1) << 13));
        return entry & reserved != 0;
    }
    let above_maxphyaddr = ((1u64 << 52) - 1) & !((1u64 << phys_addr_bits) - 1);
    let mut reserved = above_maxphyaddr;
    if pae_pdpte {
        reserved |= 0b1_1110_0110 | PTE_NO_EXECUTE;
    } else if !nx_enabled {
        reserved |= PTE_NO_EXECUTE;
    }
    // PS is reserved in PML5/PML4 entries.
    if !level.maps_pages && !pae_pdpte && entry & PTE_LARGE != 0 {
        return true;
    }
    if large {
        // Address bits below the large page's alignment, above the PAT bit (12).
        reserved |= ((1u64 << level.shift) - 1) & !((1u64 << 13) - 1);
    }
    entry & reserved != 0
}

fn read_entry<M: GuestMemory>(mem: &M, gpa: u64, size: u64) -> Step<u64> {
    let address = GuestAddress(gpa);
    let value = if size == 4 {
        mem.load::<u32>(address, Ordering::Acquire).map(u64::from)
    } else {
        mem.load::<u64>(address, Ordering::Acquire)
    };
    Ok(value.map_err(|_| EmulationError::GuestPhysical {
        gpa,
        len: size as usize,
    })?)
}

/// Sets bits in a paging-structure entry atomically, as the CPU does. False if the entry
/// no longer holds `old`.
fn update_entry<M: GuestMemory>(mem: &M, gpa: u64, size: u64, old: u64, new: u64) -> Step<bool> {
    match compare_exchange_phys(mem, gpa, size as usize, u128::from(old), u128::from(new))? {
        Some(previous) => Ok(previous == u128::from(old)),
        // Entries are naturally aligned, so this means the table is not ordinary RAM.
        None => Err(EmulationError::GuestPhysical {
            gpa,
            len: size as usize,
        }
        .into()),
    }
}

pub fn read_phys<M: GuestMemory>(mem: &M, gpa: u64, buf: &mut [u8]) -> Result<(), EmulationError> {
    let outside = || EmulationError::GuestPhysical {
        gpa,
        len: buf.len(),
    };
    if !mem.check_range(GuestAddress(gpa), buf.len(), Permissions::Read) {
        return Err(outside());
    }
    let len = buf.len();
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|_| EmulationError::GuestPhysical { gpa, len })
}

pub fn write_phys<M: GuestMemory>(mem: &M, gpa: u64, data: &[u8]) -> Result<(), EmulationError> {
    let outside = || EmulationError::GuestPhysical {
        gpa,
        len: data.len(),
    };
    // Checked first so that a range running off the end of RAM writes nothing.
    if !mem.check_range(GuestAddress(gpa), data.len(), Permissions::Write) {
        return Err(outside());
    }
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|_| outside())
}

pub fn read_chunks<M: GuestMemory>(
    mem: &M,
    chunks: &[Chunk],
    buf: &mut [u8],
) -> Result<(), EmulationError> {
    let mut offset = 0;
    for chunk in chunks {
        let end = (offset + chunk.len).min(buf.len());
        read_phys(mem, chunk.gpa, &mut buf[offset..end])?;
        offset = end;
    }
    Ok(())
}

pub fn write_chunks<M: GuestMemory>(
    mem: &M,
    chunks: &[Chunk],
    data: &[u8],
) -> Result<(), EmulationError> {
    for chunk in chunks {
        if !mem.check_range(GuestAddress(chunk.gpa), chunk.len, Permissions::Write) {
            return Err(EmulationError::GuestPhysical {
                gpa: chunk.gpa,
                len: chunk.len,
            });
        }
    }
    let mut offset = 0;
    for chunk in chunks {
        let end = (offset + chunk.len).min(data.len());
        write_phys(mem, chunk.gpa, &data[offset..end])?;
        offset = end;
    }
    Ok(())
}

/// Atomically compares `width` (4, 8 or 16) bytes at `gpa` with `expected` and, if equal,
/// stores `new`; returns the previous contents. `Ok(None)` when the bytes are not one
/// naturally aligned piece of host memory, so no single host atomic can cover them.
pub fn compare_exchange_phys<M: GuestMemory>(
    mem: &M,
    gpa: u64,
    width: usize,
    expected: u128,
    new: u128,
) -> Result<Option<u128>, EmulationError> {
    let outside = || EmulationError::GuestPhysical { gpa, len: width };
    if !matches!(width, 4 | 8 | 16)
        || !mem.check_range(GuestAddress(gpa), width, Permissions::Write)
    {
        return Err(outside());
    }
    let mut slices = mem
        .get_slices(GuestAddress(gpa), width, Permissions::Write)
        .map_err(|_| outside())?;
    let Some(Ok(slice)) = slices.next() else {
        return Err(outside());
    };
    if slice.len() != width || (width == 16 && !std::arch::is_x86_feature_detected!("cmpxchg16b")) {
        return Ok(None);
    }
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    if !(ptr as usize).is_multiple_of(width) {
        return Ok(None);
    }
    let previous = match width {
        4 => {
            // SAFETY: `ptr` points to 4 writable bytes of mapped guest RAM (checked range,
            // one slice of exactly `width` bytes), 4-byte aligned, kept mapped by `guard`.
            // Guest RAM is shared with the guest, so it is only ever accessed atomically here.
            let cell = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
            let (old, new) = (expected as u32, new as u32);
            u128::from(
                cell.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                    .unwrap_or_else(|v| v),
            )
        }
        8 => {
            // SAFETY: as above, for 8 bytes, 8-byte aligned.
            let cell = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
            let (old, new) = (expected as u64, new as u64);
            u128::from(
                cell.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                    .unwrap_or_else(|v| v),
            )
        }
        _ => {
            // SAFETY: as above, for 16 bytes, 16-byte aligned; the host has CMPXCHG16B
            // (checked above).
            unsafe { host_cmpxchg16b(ptr, expected, new) }
        }
    };
    if previous == expected {
        slice.bitmap().mark_dirty(0, width);
    }
    Ok(Some(previous))
}

/// `lock cmpxchg16b` on host memory; returns the previous 16 bytes.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned, and the CPU
/// must support CMPXCHG16B.
unsafe fn host_cmpxchg16b(ptr: *mut u8, expected: u128, new: u128) -> u128 {
    let mut low = expected as u64;
    let mut high = (expected >> 64) as u64;
    // SAFETY: the caller guarantees `ptr`; RBX cannot be named as an operand (LLVM
    // reserves it), so the new low half is swapped into it and RBX restored afterwards.
    unsafe {
        core::arch::asm!(
            "xchg {new_low}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {new_low}",
            ptr = in(reg) ptr,
            new_low = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") low,
            inout("rdx") high,
            options(nostack),
        );
    }
    (u128::from(high) << 64) | u128::from(low)
}
