//! The smallest ELF64 executable a kernel loader accepts: one loadable
//! segment holding code and data, no sections.

/// Size of the ELF header plus one program header; the code follows them.
pub const HEADERS_SIZE: u64 = 64 + 56;

/// Wraps `image` (assembled to run at `load_address + HEADERS_SIZE`) in an
/// ELF64 file whose single PT_LOAD segment maps the file at `load_address`
/// with `memory_size` bytes (the tail past the file is zeroed, like .bss).
pub fn executable(load_address: u64, image: &[u8], memory_size: u64) -> Vec<u8> {
    let file_size = HEADERS_SIZE + image.len() as u64;
    let mut elf = Vec::with_capacity(file_size as usize);
    // ELF header
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(load_address + HEADERS_SIZE).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers offset
    elf.extend_from_slice(&0u64.to_le_bytes()); // section headers offset
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // header size
    elf.extend_from_slice(&56u16.to_le_bytes()); // program header size
    elf.extend_from_slice(&1u16.to_le_bytes()); // program header count
    elf.extend_from_slice(&[0; 6]); // no section headers
                                    // PT_LOAD, read/write/execute
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&7u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // file offset
    elf.extend_from_slice(&load_address.to_le_bytes()); // virtual
    elf.extend_from_slice(&load_address.to_le_bytes()); // physical
    elf.extend_from_slice(&file_size.to_le_bytes());
    elf.extend_from_slice(&memory_size.max(file_size).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // alignment
    debug_assert_eq!(elf.len() as u64, HEADERS_SIZE);
    elf.extend_from_slice(image);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let elf = executable(0x10_0000, &[0x90, 0xf4], 0x2000);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf.len() as u64, HEADERS_SIZE + 2);
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, 0x10_0000 + HEADERS_SIZE);
        let file_size = u64::from_le_bytes(elf[96..104].try_into().unwrap());
        let memory_size = u64::from_le_bytes(elf[104..112].try_into().unwrap());
        assert_eq!(file_size, HEADERS_SIZE + 2);
        assert_eq!(memory_size, 0x2000);
        assert_eq!(&elf[HEADERS_SIZE as usize..], &[0x90, 0xf4]);
    }
}
