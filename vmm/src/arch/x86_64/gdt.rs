//! The boot GDT and the KVM segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Access/flags words (access byte in bits 0..8, G/DB/L/AVL nibble in bits 12..16).
const CODE64: u16 = 0xa09b; // present, ring 0, code, read/exec, accessed; G, L
const CODE32: u16 = 0xc09b; // present, ring 0, code, read/exec, accessed; G, D
const DATA: u16 = 0xc093; // present, ring 0, data, read/write, accessed; G, B
const TSS: u16 = 0x808b; // present, busy 64-bit TSS; G

/// Selector of the boot code segment (GDT index 2), as Linux's boot protocol expects.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the boot data segment (GDT index 3).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the (unused but loaded) task state segment (GDT index 4).
pub const TSS_SELECTOR: u16 = 0x20;

/// Which mode the boot CPU starts in; decides the code segment's L/D bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    Long64,
    Protected32,
}

/// Encodes one flat segment descriptor.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    (limit & 0xffff)
        | ((base & 0x00ff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The five boot GDT entries: null, null, code, data, TSS.
pub fn boot_gdt(mode: CodeMode) -> [u64; 5] {
    let code = match mode {
        CodeMode::Long64 => CODE64,
        CodeMode::Protected32 => CODE32,
    };
    [
        0,
        0,
        descriptor(code, 0, 0xfffff),
        descriptor(DATA, 0, 0xfffff),
        descriptor(TSS, 0, 0xfffff),
    ]
}

/// Decodes a descriptor into the form KVM_SET_SREGS wants.
pub fn segment_from_descriptor(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let access = (entry >> 40) & 0xff;
    let flags = (entry >> 52) & 0xf;
    let granular = flags & 0x8 != 0;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: (access & 0xf) as u8,
        present: ((access >> 7) & 1) as u8,
        dpl: ((access >> 5) & 3) as u8,
        db: ((flags >> 2) & 1) as u8,
        s: ((access >> 4) & 1) as u8,
        l: ((flags >> 1) & 1) as u8,
        g: granular as u8,
        avl: (flags & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_64bit_code_descriptor_matches_the_architectural_encoding() {
        // Limit 0xfffff, base 0, access 0x9b, flags G|L: the canonical value
        // found in every 64-bit boot GDT.
        assert_eq!(descriptor(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn descriptor_round_trips_through_kvm_segment() {
        let seg = segment_from_descriptor(CODE_SELECTOR, descriptor(CODE64, 0x1234_5678, 0xabcde));
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!((seg.type_, seg.present, seg.dpl, seg.s), (0xb, 1, 0, 1));
        assert_eq!((seg.l, seg.db, seg.g), (1, 0, 1));
        let seg32 = segment_from_descriptor(CODE_SELECTOR, boot_gdt(CodeMode::Protected32)[2]);
        assert_eq!((seg32.l, seg32.db), (0, 1));
    }
}
