//! The FXSAVE and XSAVE memory images (SDM vol. 1, chapter 13), converted to and from the
//! vCPU's state as KVM_GET_XSAVE gives it: a 4 KiB area in the standard (non-compacted)
//! format, whose FIP/FDP are in the 64-bit form and whose header XSTATE_BV says which
//! components are not in their initial state.

use super::{Exception, Step};

pub const KVM_AREA_SIZE: usize = 4096;
pub const HEADER_OFFSET: usize = 512;
pub const HEADER_SIZE: usize = 64;
/// Where the first extended component sits in the compacted format.
const EXTENDED_OFFSET: usize = 576;
/// FXSAVE/XSAVE areas carry at most this much legacy (x87 + SSE) state.
pub const LEGACY_SIZE: usize = 512;

pub const XFEATURE_X87: u64 = 1 << 0;
pub const XFEATURE_SSE: u64 = 1 << 1;
pub const XFEATURE_AVX: u64 = 1 << 2;
pub const XCOMP_BV_COMPACTED: u64 = 1 << 63;

pub const MXCSR_DEFAULT: u32 = 0x1f80;
/// MXCSR_MASK of CPUs that store 0 there.
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;
const FCW_DEFAULT: u16 = 0x037f;

/// Legacy-region layout: FCW..FDS, MXCSR, MXCSR_MASK, ST0-7, XMM0-15.
const X87_ENVIRONMENT_LEN: usize = 24;
const MXCSR_OFFSET: usize = 24;
const MXCSR_MASK_OFFSET: usize = 28;
const ST_OFFSET: usize = 32;
const ST_LEN: usize = 128;
const XMM_OFFSET: usize = 160;

/// One extended state component (index ≥ 2), from CPUID leaf 0xD.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Component {
    /// Offset in the standard format (0 for supervisor components, which have none).
    pub offset: usize,
    /// Size in bytes; 0 if the CPU does not have the component.
    pub size: usize,
    /// Starts on a 64-byte boundary in the compacted format.
    pub align64: bool,
}

/// The CPU's XSAVE facts: components, which XCR0/IA32_XSS bits exist, which instructions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XsaveLayout {
    pub components: [Component; 64],
    pub xcr0_supported: u64,
    pub xss_supported: u64,
    pub xsaveopt: bool,
    pub xsavec: bool,
    pub xgetbv1: bool,
    pub xsaves: bool,
}

impl XsaveLayout {
    /// A CPU without XSAVE: x87 and SSE only.
    /// The legacy layout plus the given components, as
    /// `(index, standard offset, size, 64-byte aligned when compacted)`.
    #[cfg(test)]
    pub(crate) fn legacy_with(components: &[(usize, usize, usize, bool)]) -> Self {
        let mut layout = Self::legacy_only();
        for &(index, offset, size, align64) in components {
            layout.components[index] = Component {
                offset,
                size,
                align64,
            };
        }
        layout
    }

    pub fn legacy_only() -> Self {
        XsaveLayout {
            components: [Component::default(); 64],
            xcr0_supported: XFEATURE_X87 | XFEATURE_SSE,
            xss_supported: 0,
            xsaveopt: false,
            xsavec: false,
            xgetbv1: false,
            xsaves: false,
        }
    }

    pub fn from_host() -> Self {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
        if __cpuid(0).eax < 0xd || __cpuid(1).ecx & CPUID_1_ECX_XSAVE == 0 {
            return Self::legacy_only();
        }
        let main = __cpuid_count(0xd, 0);
        let sub1 = __cpuid_count(0xd, 1);
        let mut layout = XsaveLayout {
            components: [Component::default(); 64],
            xcr0_supported: u64::from(main.eax) | (u64::from(main.edx) << 32),
            xss_supported: u64::from(sub1.ecx) | (u64::from(sub1.edx) << 32),
            xsaveopt: sub1.eax & (1 << 0) != 0,
            xsavec: sub1.eax & (1 << 1) != 0,
            xgetbv1: sub1.eax & (1 << 2) != 0,
            xsaves: sub1.eax & (1 << 3) != 0,
        };
        let all = layout.xcr0_supported | layout.xss_supported;
        for (index, component) in layout.components.iter_mut().enumerate().take(63).skip(2) {
            if all & (1 << index) != 0 {
                let leaf = __cpuid_count(0xd, index as u32);
                *component = Component {
                    offset: leaf.ebx as usize,
                    size: leaf.eax as usize,
                    align64: leaf.ecx & (1 << 1) != 0,
                };
            }
        }
        layout
    }

    /// Whether every extended component in `features` exists and lies inside KVM's 4 KiB
    /// area (true of everything but AMX tile data).
    pub fn fits_kvm_area(&self, features: u64) -> bool {
        extended_indices(features).all(|index| {
            let component = self.components[index];
            component.size > 0
                && component.offset >= EXTENDED_OFFSET
                && component.offset + component.size <= KVM_AREA_SIZE
        })
    }

    /// Offsets of the components of `xcomp_bv` in the compacted format.
    pub fn compacted_offsets(&self, xcomp_bv: u64) -> [usize; 64] {
        let mut offsets = [0usize; 64];
        let mut next = EXTENDED_OFFSET;
        for index in extended_indices(xcomp_bv) {
            let component = self.components[index];
            if component.align64 {
                next = next.next_multiple_of(64);
            }
            offsets[index] = next;
            next += component.size;
        }
        offsets
    }
}

fn extended_indices(features: u64) -> impl Iterator<Item = usize> {
    (2..63).filter(move |index| features & (1 << index) != 0)
}

/// How the instruction lays out what differs between operating modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// 64-bit mode: 16 vector registers instead of 8.
    pub long_mode: bool,
    /// The REX.W forms (FXSAVE64, XSAVE64, ...): 64-bit FIP/FDP instead of 32-bit
    /// offsets with FCS/FDS selectors.
    pub wide_pointers: bool,
}

impl Format {
    fn xmm_len(self) -> usize {
        if self.long_mode {
            256
        } else {
            128
        }
    }

    /// Bytes of extended component `index` that exist in this mode: outside 64-bit mode
    /// only vector registers 0-7 exist, so only their parts are saved and restored.
    fn component_len(self, index: usize, size: usize) -> usize {
        if self.long_mode {
            return size;
        }
        match index {
            2 => size.min(128), // upper halves of YMM0-7
            6 => size.min(256), // upper halves of ZMM0-7
            7 => 0,             // ZMM16-31
            _ => size,
        }
    }
}

/// A run of bytes at an offset from the start of the guest's save area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub bytes: Vec<u8>,
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

pub fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(raw)
}

fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

pub fn fcw(state: &[u8]) -> u16 {
    u16_at(state, 0)
}

pub fn fsw(state: &[u8]) -> u16 {
    u16_at(state, 2)
}

pub fn mxcsr(state: &[u8]) -> u32 {
    u32_at(state, MXCSR_OFFSET)
}

/// Whether MXCSR may hold `value`: no bit outside MXCSR_MASK.
pub fn mxcsr_allowed(state: &[u8], value: u32) -> bool {
    let mask = match u32_at(state, MXCSR_MASK_OFFSET) {
        0 => MXCSR_MASK_DEFAULT,
        mask => mask,
    };
    value & !mask == 0
}

pub fn set_mxcsr(state: &mut [u8], value: u32) {
    put_u32(state, MXCSR_OFFSET, value);
}

pub fn xstate_bv(state: &[u8]) -> u64 {
    u64_at(state, HEADER_OFFSET)
}

fn set_xstate_bv(state: &mut [u8], value: u64) {
    put_u64(state, HEADER_OFFSET, value);
}

/// XINUSE as far as KVM shows it: its XSTATE_BV, with SSE counted in use whenever MXCSR
/// is not at its default (the CPU treats it so for the init optimization).
pub fn in_use(state: &[u8], xcr0: u64) -> u64 {
    let mut in_use = xstate_bv(state);
    if mxcsr(state) != MXCSR_DEFAULT {
        in_use |= XFEATURE_SSE;
    }
    in_use & xcr0
}

/// KVM loads MXCSR only when x87, SSE or AVX is marked present in XSTATE_BV; mark SSE
/// so that a changed MXCSR is not dropped.
pub fn normalize_for_kvm(state: &mut [u8]) {
    if mxcsr(state) != MXCSR_DEFAULT {
        let bv = xstate_bv(state);
        set_xstate_bv(state, bv | XFEATURE_SSE);
    }
}

/// FCW..FDS in the image's format; KVM's area holds the 64-bit FIP/FDP form. The 32-bit
/// form keeps the low 32 bits and zero selectors (modern CPUs no longer track FCS/FDS),
/// which is the same byte transformation in both directions.
fn convert_x87_environment(source: &[u8], format: Format) -> [u8; X87_ENVIRONMENT_LEN] {
    let mut environment = [0u8; X87_ENVIRONMENT_LEN];
    environment.copy_from_slice(&source[..X87_ENVIRONMENT_LEN]);
    if !format.wide_pointers {
        environment[12..16].fill(0);
        environment[20..24].fill(0);
    }
    environment
}

fn initialize_x87(state: &mut [u8]) {
    state[..X87_ENVIRONMENT_LEN].fill(0);
    state[..2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
    state[ST_OFFSET..ST_OFFSET + ST_LEN].fill(0);
}

/// The bytes FXSAVE stores: x87 state, MXCSR and MXCSR_MASK, the XMM registers of the
/// current mode. Bytes 416-511 (reserved and software-available) are left alone.
pub fn fxsave_spans(state: &[u8], format: Format) -> Vec<Span> {
    let end = XMM_OFFSET + format.xmm_len();
    let mut bytes = state[..end].to_vec();
    bytes[..X87_ENVIRONMENT_LEN].copy_from_slice(&convert_x87_environment(state, format));
    vec![Span { offset: 0, bytes }]
}

/// FXRSTOR from a 512-byte image; #GP(0) if its MXCSR sets reserved bits.
pub fn fxrstor(state: &mut [u8], image: &[u8], format: Format) -> Step<()> {
    let new_mxcsr = u32_at(image, MXCSR_OFFSET);
    if !mxcsr_allowed(state, new_mxcsr) {
        return Err(Exception::general_protection().into());
    }
    state[..X87_ENVIRONMENT_LEN].copy_from_slice(&convert_x87_environment(image, format));
    set_mxcsr(state, new_mxcsr);
    state[ST_OFFSET..ST_OFFSET + ST_LEN].copy_from_slice(&image[ST_OFFSET..ST_OFFSET + ST_LEN]);
    let xmm = XMM_OFFSET..XMM_OFFSET + format.xmm_len();
    state[xmm.clone()].copy_from_slice(&image[xmm]);
    let bv = xstate_bv(state);
    set_xstate_bv(state, bv | XFEATURE_X87 | XFEATURE_SSE);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveForm {
    /// XSAVE and XSAVEOPT (whose optional skipping of unmodified state is not used).
    Standard,
    /// XSAVEC and XSAVES.
    Compacted,
}

/// What an XSAVE-family store writes into the guest's area, for requested-feature bitmap
/// `rfbm` and XINUSE `in_use`. `old_xstate_bv` is the area's XSTATE_BV before the store
/// (the standard form keeps its bits outside `rfbm`).
pub fn save_spans(
    layout: &XsaveLayout,
    state: &[u8],
    rfbm: u64,
    in_use: u64,
    form: SaveForm,
    format: Format,
    old_xstate_bv: u64,
) -> Vec<Span> {
    let mut spans = Vec::new();
    let stored = match form {
        SaveForm::Standard => rfbm,
        // The init optimization: components in their initial state are not written.
        SaveForm::Compacted => rfbm & in_use,
    };
    let mxcsr_stored = match form {
        SaveForm::Standard => rfbm & (XFEATURE_SSE | XFEATURE_AVX) != 0,
        SaveForm::Compacted => stored & XFEATURE_SSE != 0,
    };
    if stored & XFEATURE_X87 != 0 {
        spans.push(Span {
            offset: 0,
            bytes: convert_x87_environment(state, format).to_vec(),
        });
        spans.push(Span {
            offset: ST_OFFSET,
            bytes: state[ST_OFFSET..ST_OFFSET + ST_LEN].to_vec(),
        });
    }
    if mxcsr_stored {
        spans.push(Span {
            offset: MXCSR_OFFSET,
            bytes: state[MXCSR_OFFSET..MXCSR_OFFSET + 8].to_vec(),
        });
    }
    if stored & XFEATURE_SSE != 0 {
        spans.push(Span {
            offset: XMM_OFFSET,
            bytes: state[XMM_OFFSET..XMM_OFFSET + format.xmm_len()].to_vec(),
        });
    }
    let offsets = match form {
        SaveForm::Standard => layout.components.map(|component| component.offset),
        SaveForm::Compacted => layout.compacted_offsets(rfbm),
    };
    for index in extended_indices(stored) {
        let component = layout.components[index];
        let len = format.component_len(index, component.size);
        if len > 0 {
            spans.push(Span {
                offset: offsets[index],
                bytes: state[component.offset..component.offset + len].to_vec(),
            });
        }
    }
    let header = match form {
        SaveForm::Standard => ((old_xstate_bv & !rfbm) | (in_use & rfbm))
            .to_le_bytes()
            .to_vec(),
        SaveForm::Compacted => {
            let mut header = (in_use & rfbm).to_le_bytes().to_vec();
            header.extend_from_slice(&(rfbm | XCOMP_BV_COMPACTED).to_le_bytes());
            header
        }
    };
    spans.push(Span {
        offset: HEADER_OFFSET,
        bytes: header,
    });
    spans
}

/// Checks an XRSTOR/XRSTORS header and tells its form; `None` means #GP(0).
/// `enabled` is XCR0 (| IA32_XSS for XRSTORS).
pub fn restore_form(
    header: &[u8; HEADER_SIZE],
    enabled: u64,
    compaction_supported: bool,
    supervisor: bool,
) -> Option<SaveForm> {
    let xstate_bv = u64_at(header, 0);
    let xcomp_bv = u64_at(header, 8);
    if xcomp_bv & XCOMP_BV_COMPACTED == 0 {
        let rest_clear = header[8..24].iter().all(|&byte| byte == 0);
        (!supervisor && rest_clear && xstate_bv & !enabled == 0).then_some(SaveForm::Standard)
    } else {
        let components = xcomp_bv & !XCOMP_BV_COMPACTED;
        let rest_clear = header[16..].iter().all(|&byte| byte == 0);
        let valid = compaction_supported
            && rest_clear
            && components & !enabled == 0
            && xstate_bv & !components == 0;
        valid.then_some(SaveForm::Compacted)
    }
}

/// XRSTOR(S): loads the components of `rfbm` marked in the image's XSTATE_BV, initializes
/// the others of `rfbm`, leaves the rest. `read(offset, buf)` reads the guest's area.
/// `state` is only a copy: if this fails midway the caller discards it.
pub fn restore(
    layout: &XsaveLayout,
    state: &mut [u8],
    header: &[u8; HEADER_SIZE],
    rfbm: u64,
    form: SaveForm,
    format: Format,
    read: &mut dyn FnMut(usize, &mut [u8]) -> Step<()>,
) -> Step<()> {
    let loaded = u64_at(header, 0) & rfbm;

    // The standard form loads MXCSR whenever SSE or AVX is requested; the compacted one
    // treats it as part of the SSE component.
    let mxcsr_loaded = match form {
        SaveForm::Standard => rfbm & (XFEATURE_SSE | XFEATURE_AVX) != 0,
        SaveForm::Compacted => loaded & XFEATURE_SSE != 0,
    };
    if mxcsr_loaded {
        let mut raw = [0u8; 4];
        read(MXCSR_OFFSET, &mut raw)?;
        let value = u32::from_le_bytes(raw);
        if !mxcsr_allowed(state, value) {
            return Err(Exception::general_protection().into());
        }
        set_mxcsr(state, value);
    } else if form == SaveForm::Compacted && rfbm & XFEATURE_SSE != 0 {
        set_mxcsr(state, MXCSR_DEFAULT);
    }

    if loaded & XFEATURE_X87 != 0 {
        let mut environment = [0u8; X87_ENVIRONMENT_LEN];
        read(0, &mut environment)?;
        state[..X87_ENVIRONMENT_LEN]
            .copy_from_slice(&convert_x87_environment(&environment, format));
        read(ST_OFFSET, &mut state[ST_OFFSET..ST_OFFSET + ST_LEN])?;
    } else if rfbm & XFEATURE_X87 != 0 {
        initialize_x87(state);
    }

    let xmm = XMM_OFFSET..XMM_OFFSET + format.xmm_len();
    if loaded & XFEATURE_SSE != 0 {
        read(XMM_OFFSET, &mut state[xmm])?;
    } else if rfbm & XFEATURE_SSE != 0 {
        state[xmm].fill(0);
    }

    let offsets = match form {
        SaveForm::Standard => layout.components.map(|component| component.offset),
        SaveForm::Compacted => layout.compacted_offsets(u64_at(header, 8) & !XCOMP_BV_COMPACTED),
    };
    for index in extended_indices(rfbm) {
        let component = layout.components[index];
        let target =
            component.offset..component.offset + format.component_len(index, component.size);
        if loaded & (1 << index) != 0 {
            read(offsets[index], &mut state[target])?;
        } else {
            // Every extended component's initial state is all zeros.
            state[target].fill(0);
        }
    }

    let bv = xstate_bv(state);
    set_xstate_bv(state, (bv & !rfbm) | loaded);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_with_aligned_component() -> XsaveLayout {
        XsaveLayout::legacy_with(&[
            (2, 576, 256, false),
            (5, 1088, 64, false),
            (9, 2688, 8, false),
            (10, 2752, 40, true),
        ])
    }

    #[test]
    fn compacted_offsets_pack_components_and_honour_64_byte_alignment() {
        let offsets = layout_with_aligned_component()
            .compacted_offsets((1 << 2) | (1 << 5) | (1 << 9) | (1 << 10));
        // 576 + 256 = 832 (opmask), + 64 = 896 (PKRU), + 8 = 904 → aligned up to 960.
        assert_eq!(offsets[2], 576);
        assert_eq!(offsets[5], 832);
        assert_eq!(offsets[9], 896);
        assert_eq!(offsets[10], 960);
    }

    #[test]
    fn compacted_offsets_skip_components_not_in_xcomp_bv() {
        let offsets = layout_with_aligned_component().compacted_offsets((1 << 5) | (1 << 10));
        assert_eq!(offsets[5], 576);
        assert_eq!(offsets[10], 640);
    }

    #[test]
    fn fits_kvm_area_rejects_missing_and_oversized_components() {
        let mut layout = layout_with_aligned_component();
        assert!(layout.fits_kvm_area(XFEATURE_X87 | XFEATURE_SSE | XFEATURE_AVX));
        assert!(!layout.fits_kvm_area(1 << 3));
        layout.components[18] = Component {
            offset: 2816,
            size: 8192,
            align64: true,
        };
        assert!(!layout.fits_kvm_area(1 << 18));
    }

    #[test]
    fn restore_form_validates_headers() {
        let mut header = [0u8; HEADER_SIZE];
        header[0] = 0b111;
        assert_eq!(
            restore_form(&header, 0b111, true, false),
            Some(SaveForm::Standard)
        );
        // XSTATE_BV bit beyond XCR0.
        assert_eq!(restore_form(&header, 0b011, true, false), None);
        // XRSTORS refuses the standard form.
        assert_eq!(restore_form(&header, 0b111, true, true), None);
        // Compacted: XCOMP_BV = bit 63 | 0b011 while XSTATE_BV = 0b111 has AVX outside it.
        header[8..16].copy_from_slice(&(XCOMP_BV_COMPACTED | 0b011).to_le_bytes());
        assert_eq!(restore_form(&header, 0b111, true, false), None);
        header[0] = 0b011;
        assert_eq!(
            restore_form(&header, 0b111, true, false),
            Some(SaveForm::Compacted)
        );
        assert_eq!(restore_form(&header, 0b111, false, false), None);
        header[40] = 1; // reserved header byte
        assert_eq!(restore_form(&header, 0b111, true, false), None);
    }
}
