// TEMPORARY: hand-made guest until the guests crate lands.
fn main() {
    let code: Vec<u8> = vec![
        0xb0, 0x42, 0xe6, 0x80, // mov al,0x42; out 0x80,al
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, b'\n', 0xee, 0x66, 0xba,
        0x04, 0x06, 0x66, 0xb8, 0x00, 0x20, 0x66, 0xef, 0xf4,
    ];
    let load: u64 = 0x100000;
    let mut elf = vec![0u8; 0x78];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&(load + 0x78).to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&load.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&load.to_le_bytes());
    let size = (0x78 + code.len()) as u64;
    elf[ph + 32..ph + 40].copy_from_slice(&size.to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&size.to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("default-guest.elf");
    std::fs::write(out, elf).unwrap();
}
