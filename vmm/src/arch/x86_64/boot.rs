//! Loading a kernel and writing what it needs to start: the Linux zero page or
//! the PVH start info, the e820 memory map, the command line and the initrd.

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::mptable::RESERVED_LOW_START;
use crate::memory::GuestRam;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{self, BzImage, KernelLoader, KernelLoaderResult};
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
/// Highest address the initrd may end at when the kernel does not say (the
/// boot protocol's historical default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("not a kernel image: neither an ELF vmlinux nor a bzImage")]
    NotAKernel,
    #[error("truncated kernel image: its headers describe {needed} bytes but the file has {size}")]
    Truncated { needed: u64, size: u64 },
    #[error("cannot read the kernel image: {0}")]
    Read(std::io::Error),
    #[error("invalid ELF kernel: {0}")]
    Elf(linux_loader::loader::elf::Error),
    #[error("invalid bzImage kernel: {0}")]
    BzImage(linux_loader::loader::bzimage::Error),
    #[error("kernel image does not fit in guest memory ({0})")]
    KernelDoesNotFit(String),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("kernel command line is longer than {CMDLINE_MAX_SIZE} bytes")]
    CmdlineTooLong,
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdDoesNotFit { size: u64, limit: u64 },
    #[error("cannot read the initrd: {0}")]
    InitrdRead(std::io::Error),
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot CPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = zero page.
    Linux64(GuestAddress),
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh(GuestAddress),
}

impl EntryPoint {
    pub fn describe(&self) -> &'static str {
        match self {
            EntryPoint::Linux64(_) => "64-bit Linux boot protocol",
            EntryPoint::Pvh(_) => "PVH entry",
        }
    }
}

/// A kernel that is loaded into guest memory and how to start it.
#[derive(Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub format: KernelFormat,
    result: KernelLoaderResult,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Guest RAM regions for `size` bytes: below the MMIO gap, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    regions
}

/// The e820 map for a guest with `size` bytes of RAM: conventional memory,
/// the reserved BIOS area (MP table, EBDA, VGA, ROM), then RAM from 1 MiB.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, RESERVED_LOW_START, E820_RAM),
        (
            RESERVED_LOW_START,
            HIMEM_START - RESERVED_LOW_START,
            E820_RESERVED,
        ),
    ];
    let low_end = size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Loads an ELF (preferring its PVH entry) or a bzImage kernel.
pub fn load_kernel<F>(mem: &GuestRam, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    check_complete(image)?;
    match Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(address) => EntryPoint::Pvh(address),
                _ => EntryPoint::Linux64(result.kernel_load),
            };
            return Ok(LoadedKernel {
                entry,
                format: KernelFormat::Elf,
                result,
            });
        }
        Err(loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {}
        Err(loader::Error::Elf(ElfError::ReadElfHeader)) => return Err(BootError::NotAKernel),
        Err(loader::Error::Elf(e)) => return Err(elf_error(e)),
        Err(e) => return Err(BootError::KernelDoesNotFit(e.to_string())),
    }
    match BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            // The 64-bit entry of a bzImage is 0x200 past where the protected-mode
            // part was loaded.
            let entry = EntryPoint::Linux64(result.kernel_load.unchecked_add(0x200));
            Ok(LoadedKernel {
                entry,
                format: KernelFormat::BzImage,
                result,
            })
        }
        Err(loader::Error::Bzimage(linux_loader::loader::bzimage::Error::InvalidBzImage)) => {
            Err(BootError::NotAKernel)
        }
        Err(loader::Error::Bzimage(e)) => Err(BootError::BzImage(e)),
        Err(e) => Err(BootError::KernelDoesNotFit(e.to_string())),
    }
}

/// Fails with [`BootError::Truncated`] when the image is shorter than its own
/// headers say (a cut-off download), so that it is not half-loaded and run.
fn check_complete<F: Read + Seek>(image: &mut F) -> Result<(), BootError> {
    let size = image.seek(SeekFrom::End(0)).map_err(BootError::Read)?;
    let mut header = vec![0u8; size.min(4096) as usize];
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    image.read_exact(&mut header).map_err(BootError::Read)?;
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let needed = image_extent(&header).unwrap_or(0);
    if needed > size {
        return Err(BootError::Truncated { needed, size });
    }
    Ok(())
}

/// How long an image's headers say it is: the end of the last PT_LOAD
/// segment of an ELF64, or setup plus protected-mode code of a bzImage.
/// None when the headers are not there to say.
fn image_extent(header: &[u8]) -> Option<u64> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(header.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?));
    if header.starts_with(b"\x7fELF") && header.get(4) == Some(&2) {
        let program_headers = u64_at(32)?;
        let entry_size = u64::from(u16_at(54)?);
        let count = u64::from(u16_at(56)?);
        let mut end = program_headers.checked_add(entry_size.checked_mul(count)?)?;
        for i in 0..count {
            let at = usize::try_from(program_headers + i * entry_size).ok()?;
            const PT_LOAD: u32 = 1;
            if u32_at(at)? == PT_LOAD {
                let segment_end = u64_at(at + 8)?.checked_add(u64_at(at + 32)?)?;
                end = end.max(segment_end);
            }
        }
        return Some(end);
    }
    if u32_at(0x202)? == u32::from_le_bytes(*b"HdrS") {
        let setup_sectors = match header.get(0x1f1)? {
            0 => 4,
            n => u64::from(*n),
        };
        let protected_mode_bytes = u64::from(u32_at(0x1f4)?) * 16;
        return Some((setup_sectors + 1) * 512 + protected_mode_bytes);
    }
    None
}

fn elf_error(e: ElfError) -> BootError {
    match e {
        ElfError::ReadKernelImage | ElfError::ReadProgramHeader | ElfError::ReadNoteHeader => {
            BootError::Elf(e) // truncated images land here; the message says "unable to read"
        }
        other => BootError::Elf(other),
    }
}

/// The highest page-aligned address at which `size` bytes end at or below `limit`
/// and above the kernel.
fn initrd_address(
    mem: &GuestRam,
    kernel_end: u64,
    size: u64,
    limit: u64,
) -> Result<u64, BootError> {
    let ram_top = mem.last_addr().raw_value().min(MMIO_GAP_START - 1);
    let top = ram_top.min(limit) + 1;
    let start = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    match start {
        Some(start) if start >= kernel_end => Ok(start),
        _ => Err(BootError::InitrdDoesNotFit { size, limit: top }),
    }
}

/// Places the initrd in guest memory; returns (address, size).
pub fn load_initrd<F: Read + ReadVolatile + Seek>(
    mem: &GuestRam,
    kernel: &LoadedKernel,
    initrd: &mut F,
) -> Result<(u64, u64), BootError> {
    let size = initrd
        .seek(std::io::SeekFrom::End(0))
        .map_err(BootError::InitrdRead)?;
    initrd.rewind().map_err(BootError::InitrdRead)?;
    let limit = match &kernel.result.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let kernel_end = kernel.result.kernel_load.raw_value() + kernel.result.kernel_end;
    let address = initrd_address(mem, kernel_end, size, limit)?;
    mem.read_exact_volatile_from(GuestAddress(address), initrd, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => BootError::InitrdRead(io),
            other => BootError::GuestMemory(other),
        })?;
    Ok((address, size))
}

/// Writes the command line (NUL-terminated) at its fixed address.
pub fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong);
    }
    let mut line =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &line)
        .map_err(|e| BootError::KernelDoesNotFit(format!("command line: {e}")))?;
    Ok(())
}

/// Writes the boot information for the chosen entry point.
pub fn write_boot_info(
    mem: &GuestRam,
    kernel: &LoadedKernel,
    memory_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: GuestAddress,
) -> Result<(), BootError> {
    let map = e820_map(memory_size);
    match kernel.entry {
        EntryPoint::Linux64(_) => {
            let mut params = zero_page(kernel, &map, cmdline_len, initrd);
            params.acpi_rsdp_addr = acpi_rsdp.raw_value();
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
        }
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, &map, initrd, acpi_rsdp)?,
    }
    Ok(())
}

fn zero_page(
    kernel: &LoadedKernel,
    map: &[(u64, u64, u32)],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.result.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((address, size)) = initrd {
        params.hdr.ramdisk_image = address as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

fn write_pvh_start_info(
    mem: &GuestRam,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    acpi_rsdp: GuestAddress,
) -> Result<(), BootError> {
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )?;
    }
    let mut info = hvm_start_info {
        magic: PVH_START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: acpi_rsdp.raw_value(),
        ..Default::default()
    };
    if let Some((address, size)) = initrd {
        let modules_at = PVH_MEMMAP_START + map.len() as u64 * entry_size;
        let module = hvm_modlist_entry {
            paddr: address,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modules_at))?;
        info.nr_modules = 1;
        info.modlist_paddr = modules_at;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An ELF64 header with one PT_LOAD of `file_size` bytes at file offset 0x1000.
    fn elf_header(file_size: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 0x78];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        elf[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
        elf[96..104].copy_from_slice(&file_size.to_le_bytes());
        elf
    }

    #[test]
    fn truncated_elf_is_named() {
        let mut image = elf_header(0x10000);
        assert_eq!(image_extent(&image), Some(0x11000));
        let error = check_complete(&mut Cursor::new(image.clone())).unwrap_err();
        assert!(matches!(
            error,
            BootError::Truncated {
                needed: 0x11000,
                size: 0x78
            }
        ));
        image.resize(0x11000, 0);
        check_complete(&mut Cursor::new(image)).unwrap();
    }

    #[test]
    fn truncated_bzimage_is_named() {
        let mut image = vec![0u8; 0x1000];
        image[0x1f1] = 3; // setup sectors
        image[0x1f4..0x1f8].copy_from_slice(&0x100u32.to_le_bytes()); // 4 KiB of code
        image[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(image_extent(&image), Some(4 * 512 + 0x1000));
        assert!(matches!(
            check_complete(&mut Cursor::new(image.clone())),
            Err(BootError::Truncated { .. })
        ));
        image.resize(4 * 512 + 0x1000, 0);
        check_complete(&mut Cursor::new(image)).unwrap();
    }

    #[test]
    fn unknown_images_are_left_to_the_loader() {
        assert_eq!(image_extent(b"not a kernel"), None);
        check_complete(&mut Cursor::new(b"not a kernel".to_vec())).unwrap();
    }

    fn memory(size: u64) -> GuestRam {
        GuestRam::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn e820_covers_ram_around_the_bios_hole_and_the_mmio_gap() {
        assert_eq!(
            e820_map(64 << 20),
            vec![
                (0, 0x9f000, E820_RAM),
                (0x9f000, 0x61000, E820_RESERVED),
                (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM)
            ]
        );
        let big = e820_map(4 << 30);
        assert_eq!(big[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(big[3], (0x1_0000_0000, 1 << 30, E820_RAM));
        let ram: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the reserved BIOS area is usable.
        assert_eq!(ram, (4 << 30) - 0x61000);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(1 << 32), 1 << 30)
            ]
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = memory(16 << 20);
        let mut garbage = Cursor::new(vec![0x5au8; 8192]);
        assert!(matches!(
            load_kernel(&mem, &mut garbage),
            Err(BootError::NotAKernel)
        ));
        let mut empty = Cursor::new(Vec::new());
        assert!(matches!(
            load_kernel(&mem, &mut empty),
            Err(BootError::NotAKernel)
        ));
    }

    #[test]
    fn zero_page_layout_matches_the_boot_protocol_offsets() {
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        use std::mem::offset_of;
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(
            offset_of!(boot_params, hdr)
                + offset_of!(linux_loader::loader::bootparam::setup_header, cmd_line_ptr),
            0x228
        );
        assert_eq!(
            offset_of!(boot_params, hdr)
                + offset_of!(linux_loader::loader::bootparam::setup_header, ramdisk_image),
            0x218
        );
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_page_aligned() {
        let mem = memory(64 << 20);
        assert_eq!(
            initrd_address(&mem, 0x20_0000, 0x1800, DEFAULT_INITRD_ADDR_MAX).unwrap(),
            (64 << 20) - 0x2000
        );
        // Limited by the kernel's initrd_addr_max rather than RAM.
        assert_eq!(
            initrd_address(&mem, 0x20_0000, 0x1000, 0xff_ffff).unwrap(),
            0xff_f000
        );
        assert!(matches!(
            initrd_address(&mem, 0x20_0000, 63 << 20, DEFAULT_INITRD_ADDR_MAX),
            Err(BootError::InitrdDoesNotFit { .. })
        ));
    }
}
