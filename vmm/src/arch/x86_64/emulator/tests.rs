//! Unit tests: a fake vCPU over real guest memory holding page tables built here. Every
//! expected value is worked out by hand in the comments, not recomputed by the emulator.

use std::cell::{Cell, RefCell};

use crate::memory::GuestRam;
use kvm_bindings::{kvm_run__bindgen_ty_1__bindgen_ty_13, kvm_segment, kvm_xcr};
use vm_memory::{Bytes, GuestAddress};

use super::mmu::{self, Access, Paging, PF_FETCH, PF_PROTECTION, PF_RESERVED, PF_USER, PF_WRITE};
use super::xsave::XsaveLayout;
use super::*;

const RAM_SIZE: usize = 8 << 20;
const PML4: u64 = 0x1000;
/// Page tables built by `Guest::map` come from here up.
const FIRST_TABLE: u64 = 0x2000;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

const CODE: u64 = 0x40_0000;
const CODE_PHYS: u64 = 0x10_0000;
const DATA: u64 = 0x60_0000;
const DATA_PHYS: u64 = 0x20_0000;
/// The page after DATA, mapped far from DATA_PHYS + 4 KiB.
const DATA_NEXT: u64 = 0x60_1000;
const DATA_NEXT_PHYS: u64 = 0x35_0000;
const UNMAPPED: u64 = 0x70_0000;
const USER: u64 = 0x80_0000;
const USER_PHYS: u64 = 0x24_0000;
const READ_ONLY: u64 = 0x90_0000;
const READ_ONLY_PHYS: u64 = 0x26_0000;
/// Mapped to a guest-physical address beyond RAM.
const BEYOND_RAM: u64 = 0xa0_0000;

const RFLAGS_FIXED: u64 = 0x2;

struct Guest {
    mem: GuestRam,
    next_table: Cell<u64>,
}

impl Guest {
    /// RAM with 4-level page tables: CODE, DATA, DATA_NEXT (supervisor), USER, a
    /// read-only page, and a page whose frame is outside RAM.
    fn new() -> Self {
        let guest = Guest {
            mem: GuestRam::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap(),
            next_table: Cell::new(FIRST_TABLE),
        };
        guest.map(CODE, CODE_PHYS, P, 1);
        guest.map(DATA, DATA_PHYS, P | RW | NX, 1);
        guest.map(DATA_NEXT, DATA_NEXT_PHYS, P | RW | NX, 1);
        guest.map(USER, USER_PHYS, P | RW | US | NX, 1);
        guest.map(READ_ONLY, READ_ONLY_PHYS, P | NX, 1);
        guest.map(BEYOND_RAM, 0x1_0000_0000, P | RW | NX, 1);
        guest
    }

    /// Maps `linear` at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB); intermediate tables allow
    /// everything so the leaf decides.
    fn map(&self, linear: u64, phys: u64, flags: u64, level: u32) {
        let mut table = PML4;
        for upper in (level + 1..=4).rev() {
            let entry_address = table + ((linear >> (12 + 9 * (upper - 1))) & 0x1ff) * 8;
            let mut entry = self.u64_at(entry_address);
            if entry & P == 0 {
                let new_table = self.next_table.get();
                self.next_table.set(new_table + 0x1000);
                entry = new_table | P | RW | US;
                self.put_u64(entry_address, entry);
            }
            table = entry & 0x000f_ffff_ffff_f000;
        }
        let entry_address = table + ((linear >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
        self.put_u64(entry_address, phys | flags | if level > 1 { PS } else { 0 });
    }

    /// The 4 KiB leaf entry mapping `linear`.
    fn leaf_entry(&self, linear: u64) -> u64 {
        let mut table = PML4;
        for level in (2..=4).rev() {
            table = self.u64_at(table + ((linear >> (12 + 9 * (level - 1))) & 0x1ff) * 8)
                & 0x000f_ffff_ffff_f000;
        }
        self.u64_at(table + ((linear >> 12) & 0x1ff) * 8)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(gpa)).unwrap();
        bytes
    }

    fn u64_at(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn put_u64(&self, gpa: u64, value: u64) {
        self.mem.write_obj(value, GuestAddress(gpa)).unwrap();
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn put_u32(&self, gpa: u64, value: u32) {
        self.mem.write_obj(value, GuestAddress(gpa)).unwrap();
    }
}

struct FakeVcpu {
    regs: RefCell<kvm_regs>,
    sregs: RefCell<kvm_sregs>,
    xsave: RefCell<Vec<u8>>,
    xcrs: RefCell<kvm_xcrs>,
    events: RefCell<kvm_vcpu_events>,
    xss: Cell<Option<u64>>,
    set_xsave_calls: Cell<usize>,
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

impl FakeVcpu {
    /// A 64-bit kernel: CPL0, 4-level paging from PML4, WP, NXE, SMEP, SMAP, OSXSAVE;
    /// XCR0 = x87|SSE|AVX; x87/SSE state at reset values.
    fn long_mode_kernel() -> Self {
        let regs = kvm_regs {
            rip: CODE,
            rflags: RFLAGS_FIXED,
            ..Default::default()
        };
        let data = segment(0x18, 0x3, false);
        let sregs = kvm_sregs {
            cs: segment(0x10, 0xb, true),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            cr0: 0x8005_0033, // PG WP NE ET MP PE
            cr3: PML4,
            cr4: 0x0034_0620, // SMAP SMEP OSXSAVE OSXMMEXCPT OSFXSR PAE
            efer: 0xd01,      // NXE LMA LME SCE
            ..Default::default()
        };
        let mut xsave = vec![0u8; 4096];
        xsave[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW
        xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        xsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0] = kvm_xcr {
            xcr: 0,
            reserved: 0,
            value: 0x7,
        };
        FakeVcpu {
            regs: RefCell::new(regs),
            sregs: RefCell::new(sregs),
            xsave: RefCell::new(xsave),
            xcrs: RefCell::new(xcrs),
            events: RefCell::new(kvm_vcpu_events::default()),
            xss: Cell::new(Some(0)),
            set_xsave_calls: Cell::new(0),
        }
    }

    /// 32-bit protected mode, flat segments, paging off.
    fn protected_mode_32bit() -> Self {
        let vcpu = Self::long_mode_kernel();
        {
            let mut sregs = vcpu.sregs.borrow_mut();
            sregs.cs = segment(0x08, 0xb, false);
            sregs.cr0 = 0x31; // NE ET PE
            sregs.cr4 = 0x0004_0600; // OSXSAVE OSXMMEXCPT OSFXSR
            sregs.efer = 0;
        }
        vcpu.regs.borrow_mut().rip = 0x1000;
        vcpu
    }

    fn edit_regs(&self, edit: impl FnOnce(&mut kvm_regs)) {
        edit(&mut self.regs.borrow_mut());
    }

    fn edit_sregs(&self, edit: impl FnOnce(&mut kvm_sregs)) {
        edit(&mut self.sregs.borrow_mut());
    }

    fn edit_area(&self, edit: impl FnOnce(&mut [u8])) {
        edit(&mut self.xsave.borrow_mut());
    }

    fn area(&self) -> Vec<u8> {
        self.xsave.borrow().clone()
    }

    fn set_xcr0(&self, value: u64) {
        self.xcrs.borrow_mut().xcrs[0].value = value;
    }

    fn xcr0(&self) -> u64 {
        self.xcrs.borrow().xcrs[0].value
    }

    fn rip(&self) -> u64 {
        self.regs.borrow().rip
    }
}

impl VcpuState for FakeVcpu {
    fn regs(&self) -> Result<kvm_regs, EmulationError> {
        Ok(*self.regs.borrow())
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), EmulationError> {
        *self.regs.borrow_mut() = *regs;
        Ok(())
    }
    fn sregs(&self) -> Result<kvm_sregs, EmulationError> {
        Ok(*self.sregs.borrow())
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), EmulationError> {
        *self.sregs.borrow_mut() = *sregs;
        Ok(())
    }
    fn xsave(&self) -> Result<kvm_xsave, EmulationError> {
        let mut kvm = kvm_xsave::default();
        for (word, bytes) in kvm
            .region
            .iter_mut()
            .zip(self.xsave.borrow().chunks_exact(4))
        {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        Ok(kvm)
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), EmulationError> {
        let mut area = self.xsave.borrow_mut();
        for (bytes, word) in area.chunks_exact_mut(4).zip(xsave.region.iter()) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        self.set_xsave_calls.set(self.set_xsave_calls.get() + 1);
        Ok(())
    }
    fn xcrs(&self) -> Result<kvm_xcrs, EmulationError> {
        Ok(*self.xcrs.borrow())
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), EmulationError> {
        *self.xcrs.borrow_mut() = *xcrs;
        Ok(())
    }
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, EmulationError> {
        Ok(*self.events.borrow())
    }
    fn set_vcpu_events(&self, ev: &kvm_vcpu_events) -> Result<(), EmulationError> {
        *self.events.borrow_mut() = *ev;
        Ok(())
    }
    fn read_msr(&self, index: u32) -> Result<Option<u64>, EmulationError> {
        Ok(if index == MSR_IA32_XSS {
            self.xss.get()
        } else {
            None
        })
    }
}

/// The CPU the tests model: the usual AVX/AVX-512 XSAVE layout, MAXPHYADDR 46.
fn test_cpu() -> CpuModel {
    let mut layout = XsaveLayout::legacy_with(&[
        (2, 576, 256, false),
        (5, 1088, 64, false),
        (6, 1152, 512, false),
        (7, 1664, 1024, false),
    ]);
    layout.xcr0_supported = 0xe7;
    layout.xsaveopt = true;
    layout.xsavec = true;
    layout.xgetbv1 = true;
    layout.xsaves = true;
    CpuModel {
        xsave: layout,
        phys_addr_bits: 46,
        rdrand: std::arch::is_x86_feature_detected!("rdrand"),
        rdseed: std::arch::is_x86_feature_detected!("rdseed"),
    }
}

fn run(vcpu: &FakeVcpu, guest: &Guest, bytes: &[u8]) -> Result<Outcome, EmulationError> {
    InstructionEmulator::with_cpu(test_cpu()).handle(vcpu, &guest.mem, bytes)
}

/// Runs an instruction that must complete, and checks RIP moved past it.
fn complete(vcpu: &FakeVcpu, guest: &Guest, bytes: &[u8]) {
    let rip = vcpu.rip();
    assert_eq!(run(vcpu, guest, bytes).unwrap(), Outcome::Completed);
    assert_eq!(vcpu.rip(), rip + bytes.len() as u64);
}

/// Runs an instruction that must fault with `vector`; checks RIP and the registers did
/// not change; returns the injected event's error code (None if it has none).
fn fault(vcpu: &FakeVcpu, guest: &Guest, bytes: &[u8], vector: u8) -> Option<u32> {
    let regs_before = *vcpu.regs.borrow();
    let area_before = vcpu.area();
    assert_eq!(
        run(vcpu, guest, bytes).unwrap(),
        Outcome::ExceptionInjected { vector }
    );
    assert_eq!(
        *vcpu.regs.borrow(),
        regs_before,
        "a faulting instruction changes no register"
    );
    assert_eq!(
        vcpu.area(),
        area_before,
        "a faulting instruction changes no FPU/SSE state"
    );
    let events = vcpu.events.borrow();
    assert_eq!(events.exception.injected, 1);
    assert_eq!(events.exception.nr, vector);
    (events.exception.has_error_code != 0).then_some(events.exception.error_code)
}

fn flags(vcpu: &FakeVcpu) -> u64 {
    vcpu.regs.borrow().rflags
}

// ---------------------------------------------------------------- breakpoints and traps

#[test]
fn int3_advances_rip_and_injects_breakpoint() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    assert_eq!(
        run(&vcpu, &guest, &[0xcc]).unwrap(),
        Outcome::ExceptionInjected { vector: 3 }
    );
    assert_eq!(vcpu.rip(), CODE + 1);
    let events = vcpu.events.borrow();
    assert_eq!(
        (
            events.exception.injected,
            events.exception.nr,
            events.exception.has_error_code
        ),
        (1, 3, 0)
    );
}

#[test]
fn int1_traps_with_debug_vector_and_into_only_on_overflow() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    assert_eq!(
        run(&vcpu, &guest, &[0xf1]).unwrap(),
        Outcome::ExceptionInjected { vector: 1 }
    );
    assert_eq!(vcpu.rip(), CODE + 1);

    // INTO exists outside 64-bit mode only.
    let vcpu = FakeVcpu::protected_mode_32bit();
    complete(&vcpu, &guest, &[0xce]);
    vcpu.edit_regs(|r| r.rflags |= RFLAGS_OF);
    assert_eq!(
        run(&vcpu, &guest, &[0xce]).unwrap(),
        Outcome::ExceptionInjected { vector: 4 }
    );
    assert_eq!(vcpu.rip(), 0x1002);
}

// ---------------------------------------------------------------- bit counting

#[test]
fn popcnt_register_64_clears_the_other_arithmetic_flags() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // 0xf0f0_0000_0000_0001 has 4 + 4 + 1 = 9 bits set.
    vcpu.edit_regs(|r| {
        r.rbx = 0xf0f0_0000_0000_0001;
        r.rflags = RFLAGS_FIXED | RFLAGS_ARITH;
    });
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]); // popcnt rax, rbx
    assert_eq!(vcpu.regs.borrow().rax, 9);
    assert_eq!(flags(&vcpu), RFLAGS_FIXED);
}

#[test]
fn popcnt_of_zero_sets_zf() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rax = 0x1234);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 0);
    assert_eq!(flags(&vcpu), RFLAGS_FIXED | RFLAGS_ZF);
}

#[test]
fn popcnt_16bit_memory_operand_reads_two_bytes_and_keeps_upper_bits() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // Word 0x8003 (3 bits); the ff ff after it must not be counted.
    guest.write(DATA_PHYS + 0x10, &[0x03, 0x80, 0xff, 0xff]);
    vcpu.edit_regs(|r| {
        r.rsi = DATA + 0x10;
        r.rax = 0x1111_2222_3333_4444;
    });
    complete(&vcpu, &guest, &[0x66, 0xf3, 0x0f, 0xb8, 0x06]); // popcnt ax, [rsi]
    assert_eq!(vcpu.regs.borrow().rax, 0x1111_2222_3333_0003);
}

#[test]
fn popcnt_32bit_rip_relative_operand_zero_extends() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // popcnt ecx, [rip + 0x200018]: next RIP 0x400008 + 0x200018 = 0x600020 (DATA + 0x20).
    guest.write(DATA_PHYS + 0x20, &[0xff, 0xff, 0xff, 0xff, 0xff]);
    vcpu.edit_regs(|r| r.rcx = 0xdead_beef_0000_0000);
    complete(
        &vcpu,
        &guest,
        &[0xf3, 0x0f, 0xb8, 0x0d, 0x18, 0x00, 0x20, 0x00],
    );
    assert_eq!(vcpu.regs.borrow().rcx, 32);
}

#[test]
fn popcnt_with_fs_override_adds_the_fs_base() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // popcnt rax, fs:[0x10] with FS.base = DATA + 0x100 → DATA + 0x110.
    guest.write(DATA_PHYS + 0x110, &[0xff, 0x01, 0, 0, 0, 0, 0, 0x80]);
    vcpu.edit_sregs(|s| s.fs.base = DATA + 0x100);
    complete(
        &vcpu,
        &guest,
        &[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0],
    );
    assert_eq!(vcpu.regs.borrow().rax, 10); // 8 + 1 + 1
}

#[test]
fn lzcnt_and_tzcnt_count_within_the_operand_width() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // lzcnt eax, ebx with only bit 12 set: 31 - 12 = 19 leading zeros.
    vcpu.edit_regs(|r| {
        r.rax = u64::MAX;
        r.rbx = 0x1000;
        r.rflags = RFLAGS_FIXED | RFLAGS_CF | RFLAGS_ZF;
    });
    complete(&vcpu, &guest, &[0xf3, 0x0f, 0xbd, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 19);
    assert_eq!(flags(&vcpu) & (RFLAGS_CF | RFLAGS_ZF), 0);

    // lzcnt rax, rbx of zero: 64, CF=1, ZF=0.
    vcpu.edit_regs(|r| r.rbx = 0);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xbd, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 64);
    assert_eq!(flags(&vcpu) & (RFLAGS_CF | RFLAGS_ZF), RFLAGS_CF);

    // tzcnt rax, rbx of bit 63: 63.
    vcpu.edit_regs(|r| r.rbx = 1 << 63);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xbc, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 63);
    assert_eq!(flags(&vcpu) & (RFLAGS_CF | RFLAGS_ZF), 0);

    // tzcnt ax, bx of 1: result 0 sets ZF; bits above AX are kept.
    vcpu.edit_regs(|r| {
        r.rax = 0xaaaa_bbbb_cccc_dddd;
        r.rbx = 0xffff_0001;
    });
    complete(&vcpu, &guest, &[0x66, 0xf3, 0x0f, 0xbc, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 0xaaaa_bbbb_cccc_0000);
    assert_eq!(flags(&vcpu) & (RFLAGS_CF | RFLAGS_ZF), RFLAGS_ZF);

    // tzcnt ax, bx of zero: 16 and CF.
    vcpu.edit_regs(|r| r.rbx = 0xffff_0000);
    complete(&vcpu, &guest, &[0x66, 0xf3, 0x0f, 0xbc, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 0xaaaa_bbbb_cccc_0010);
    assert_eq!(flags(&vcpu) & (RFLAGS_CF | RFLAGS_ZF), RFLAGS_CF);
}

#[test]
fn bsf_and_bsr_find_bit_indexes_and_leave_the_destination_on_zero() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| {
        r.rbx = 0x50; // bits 4 and 6
        r.rflags = RFLAGS_FIXED | RFLAGS_ZF;
    });
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xbc, 0xc3]); // bsf rax, rbx
    assert_eq!(vcpu.regs.borrow().rax, 4);
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, 0);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xbd, 0xc3]); // bsr rax, rbx
    assert_eq!(vcpu.regs.borrow().rax, 6);

    vcpu.edit_regs(|r| {
        r.rbx = 0;
        r.rax = 0x77;
    });
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xbd, 0xc3]);
    assert_eq!(vcpu.regs.borrow().rax, 0x77);
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, RFLAGS_ZF);
}

// ---------------------------------------------------------------- XCR access

#[test]
fn xgetbv_reads_xcr0_and_the_in_use_bitmap() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| {
        r.rax = u64::MAX;
        r.rdx = u64::MAX;
        r.rcx = 0;
    });
    complete(&vcpu, &guest, &[0x0f, 0x01, 0xd0]);
    assert_eq!((vcpu.regs.borrow().rax, vcpu.regs.borrow().rdx), (0x7, 0));

    // ECX=1: XCR0 (0b111) & XINUSE; KVM's XSTATE_BV says x87 and AVX (0b101) are in use.
    vcpu.edit_area(|a| a[512] = 0b101);
    vcpu.edit_regs(|r| r.rcx = 1);
    complete(&vcpu, &guest, &[0x0f, 0x01, 0xd0]);
    assert_eq!(vcpu.regs.borrow().rax, 0b101);

    vcpu.edit_regs(|r| r.rcx = 2);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd0], 13), Some(0));

    vcpu.edit_regs(|r| r.rcx = 0);
    vcpu.edit_sregs(|s| s.cr4 &= !CR4_OSXSAVE);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd0], 6), None);
}

#[test]
fn xsetbv_validates_and_sets_xcr0() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| {
        r.rcx = 0;
        r.rax = 0xe7;
        r.rdx = 0;
    });
    complete(&vcpu, &guest, &[0x0f, 0x01, 0xd1]);
    assert_eq!(vcpu.xcr0(), 0xe7);

    // AVX without SSE.
    vcpu.edit_regs(|r| r.rax = 0b101);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd1], 13), Some(0));
    // Only part of the AVX-512 group.
    vcpu.edit_regs(|r| r.rax = 0x27);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd1], 13), Some(0));
    // A component the CPU lacks (MPX).
    vcpu.edit_regs(|r| r.rax = 0x1f);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd1], 13), Some(0));
    // XCR1 is not writable.
    vcpu.edit_regs(|r| {
        r.rax = 0x7;
        r.rcx = 1;
    });
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd1], 13), Some(0));
    // CPL 3.
    vcpu.edit_regs(|r| r.rcx = 0);
    vcpu.edit_sregs(|s| s.ss.dpl = 3);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xd1], 13), Some(0));
    assert_eq!(vcpu.xcr0(), 0xe7);
}

// ---------------------------------------------------------------- flags and x87

#[test]
fn stac_and_clac_toggle_ac_at_cpl0_only() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    complete(&vcpu, &guest, &[0x0f, 0x01, 0xcb]);
    assert_eq!(flags(&vcpu), RFLAGS_FIXED | RFLAGS_AC);
    complete(&vcpu, &guest, &[0x0f, 0x01, 0xca]);
    assert_eq!(flags(&vcpu), RFLAGS_FIXED);
    vcpu.edit_sregs(|s| s.ss.dpl = 3);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0x01, 0xcb], 6), None);
}

#[test]
fn fwait_raises_mf_only_for_an_unmasked_pending_exception() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    complete(&vcpu, &guest, &[0x9b]);
    // FSW: IE and ES set; FCW 0x037f masks IE: nothing to report.
    vcpu.edit_area(|a| a[2..4].copy_from_slice(&0x0081u16.to_le_bytes()));
    complete(&vcpu, &guest, &[0x9b]);
    // FCW 0x037e unmasks IE.
    vcpu.edit_area(|a| a[0..2].copy_from_slice(&0x037eu16.to_le_bytes()));
    assert_eq!(fault(&vcpu, &guest, &[0x9b], 16), None);
    // CR0.MP and CR0.TS: #NM first.
    vcpu.edit_sregs(|s| s.cr0 |= CR0_TS);
    assert_eq!(fault(&vcpu, &guest, &[0x9b], 7), None);
}

// ---------------------------------------------------------------- MXCSR

#[test]
fn ldmxcsr_and_stmxcsr_move_mxcsr_through_memory() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // ldmxcsr [rsp+4] with RSP = DATA + 0x200.
    guest.put_u32(DATA_PHYS + 0x204, 0x9fc0);
    vcpu.edit_regs(|r| r.rsp = DATA + 0x200);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x54, 0x24, 0x04]);
    let area = vcpu.area();
    assert_eq!(&area[24..28], &0x9fc0u32.to_le_bytes());
    // A non-default MXCSR is marked in KVM's XSTATE_BV (SSE) so KVM loads it.
    assert_eq!(area[512] & 0b10, 0b10);

    // stmxcsr [rdi].
    vcpu.edit_regs(|r| r.rdi = DATA + 0x300);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x1f]);
    assert_eq!(guest.u32_at(DATA_PHYS + 0x300), 0x9fc0);

    // VEX forms.
    guest.put_u32(DATA_PHYS + 0x300, 0x1f80);
    complete(&vcpu, &guest, &[0xc5, 0xf8, 0xae, 0x17]); // vldmxcsr [rdi]
    assert_eq!(&vcpu.area()[24..28], &0x1f80u32.to_le_bytes());
    vcpu.edit_regs(|r| r.rdi = DATA + 0x310);
    complete(&vcpu, &guest, &[0xc5, 0xf8, 0xae, 0x1f]); // vstmxcsr [rdi]
    assert_eq!(guest.u32_at(DATA_PHYS + 0x310), 0x1f80);
}

#[test]
fn ldmxcsr_with_reserved_bits_raises_gp() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // MXCSR_MASK is 0xffff: bit 16 is reserved.
    guest.put_u32(DATA_PHYS + 0x300, 0x1_1f80);
    vcpu.edit_regs(|r| r.rdi = DATA + 0x300);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0xae, 0x17], 13), Some(0));
    assert_eq!(vcpu.set_xsave_calls.get(), 0);
    // Without CR4.OSFXSR the instruction does not exist.
    vcpu.edit_sregs(|s| s.cr4 &= !CR4_OSFXSR);
    assert_eq!(fault(&vcpu, &guest, &[0x0f, 0xae, 0x17], 6), None);
}

// ---------------------------------------------------------------- CMPXCHG8B/16B

#[test]
fn cmpxchg16b_exchanges_on_match_and_loads_rdx_rax_on_mismatch() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    let operand = DATA_PHYS + 0x400;
    guest.put_u64(operand, 0x1111);
    guest.put_u64(operand + 8, 0x2222);
    vcpu.edit_regs(|r| {
        r.rdi = DATA + 0x400;
        (r.rax, r.rdx, r.rbx, r.rcx) = (0x1111, 0x2222, 0x3333, 0x4444);
    });
    let lock_cmpxchg16b = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];
    complete(&vcpu, &guest, &lock_cmpxchg16b);
    assert_eq!(
        (guest.u64_at(operand), guest.u64_at(operand + 8)),
        (0x3333, 0x4444)
    );
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, RFLAGS_ZF);

    // Now memory holds 0x4444:0x3333, RDX:RAX still 0x2222:0x1111: mismatch.
    complete(&vcpu, &guest, &lock_cmpxchg16b);
    assert_eq!(
        (guest.u64_at(operand), guest.u64_at(operand + 8)),
        (0x3333, 0x4444)
    );
    assert_eq!(
        (vcpu.regs.borrow().rax, vcpu.regs.borrow().rdx),
        (0x3333, 0x4444)
    );
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, 0);
}

#[test]
fn misaligned_cmpxchg16b_raises_gp() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rdi = DATA + 0x408);
    assert_eq!(
        fault(&vcpu, &guest, &[0xf0, 0x48, 0x0f, 0xc7, 0x0f], 13),
        Some(0)
    );
}

#[test]
fn cmpxchg8b_across_a_page_boundary_uses_both_distant_physical_pages() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // The qword at DATA + 0xffc: low dword at DATA_PHYS + 0xffc, high dword at
    // DATA_NEXT_PHYS (not DATA_PHYS + 0x1000).
    guest.put_u32(DATA_PHYS + 0xffc, 0xaaaa_aaaa);
    guest.put_u32(DATA_NEXT_PHYS, 0xbbbb_bbbb);
    vcpu.edit_regs(|r| {
        r.rdi = DATA + 0xffc;
        (r.rax, r.rdx) = (0xaaaa_aaaa, 0xbbbb_bbbb);
        (r.rbx, r.rcx) = (0x9abc_def0, 0x1234_5678);
    });
    complete(&vcpu, &guest, &[0x0f, 0xc7, 0x0f]);
    assert_eq!(guest.read(DATA_PHYS + 0xffc, 4), [0xf0, 0xde, 0xbc, 0x9a]);
    assert_eq!(guest.read(DATA_NEXT_PHYS, 4), [0x78, 0x56, 0x34, 0x12]);
    assert_eq!(
        guest.u32_at(DATA_PHYS + 0x1000),
        0,
        "the physically adjacent page is untouched"
    );
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, RFLAGS_ZF);

    // Mismatch: EDX:EAX get the operand (0x12345678:9abcdef0), zero-extended.
    vcpu.edit_regs(|r| (r.rax, r.rdx) = (0xffff_ffff_0000_0000, 0xffff_ffff_0000_0000));
    complete(&vcpu, &guest, &[0x0f, 0xc7, 0x0f]);
    assert_eq!(
        (vcpu.regs.borrow().rax, vcpu.regs.borrow().rdx),
        (0x9abc_def0, 0x1234_5678)
    );
    assert_eq!(flags(&vcpu) & RFLAGS_ZF, 0);
}

// ---------------------------------------------------------------- paging through handle()

#[test]
fn not_present_page_raises_pf_with_cr2_and_rip_unchanged() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rsi = UNMAPPED + 0x10);
    // Read at CPL0 of a not-present page: error code 0.
    assert_eq!(
        fault(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06], 14),
        Some(0)
    );
    assert_eq!(vcpu.sregs.borrow().cr2, UNMAPPED + 0x10);
    assert_eq!(vcpu.rip(), CODE);

    // A store: W set.
    vcpu.edit_regs(|r| r.rdi = UNMAPPED + 0x20);
    assert_eq!(
        fault(&vcpu, &guest, &[0x0f, 0xae, 0x1f], 14),
        Some(PF_WRITE)
    );
    assert_eq!(vcpu.sregs.borrow().cr2, UNMAPPED + 0x20);
}

#[test]
fn user_page_read_from_cpl0_under_smap_faults_unless_ac_is_set() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    guest.put_u64(USER_PHYS, 0xff);
    vcpu.edit_regs(|r| r.rsi = USER);
    assert_eq!(
        fault(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06], 14),
        Some(PF_PROTECTION)
    );
    assert_eq!(vcpu.sregs.borrow().cr2, USER);

    vcpu.edit_regs(|r| r.rflags |= RFLAGS_AC);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06]);
    assert_eq!(vcpu.regs.borrow().rax, 8);
}

#[test]
fn cpl3_access_to_a_supervisor_page_faults_with_user_bit() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_sregs(|s| s.ss.dpl = 3);
    vcpu.edit_regs(|r| r.rsi = DATA);
    assert_eq!(
        fault(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06], 14),
        Some(PF_PROTECTION | PF_USER)
    );
}

#[test]
fn supervisor_write_to_read_only_page_faults_only_with_cr0_wp() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rdi = READ_ONLY + 8);
    assert_eq!(
        fault(&vcpu, &guest, &[0x0f, 0xae, 0x1f], 14),
        Some(PF_PROTECTION | PF_WRITE)
    );
    vcpu.edit_sregs(|s| s.cr0 &= !CR0_WP);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x1f]);
    assert_eq!(guest.u32_at(READ_ONLY_PHYS + 8), 0x1f80);
}

#[test]
fn accesses_set_accessed_and_stores_set_dirty() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    assert_eq!(guest.leaf_entry(DATA) & (ACCESSED | DIRTY), 0);
    vcpu.edit_regs(|r| r.rsi = DATA);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06]);
    assert_eq!(guest.leaf_entry(DATA) & (ACCESSED | DIRTY), ACCESSED);
    assert_eq!(guest.u64_at(PML4) & ACCESSED, ACCESSED);
    vcpu.edit_regs(|r| r.rdi = DATA);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x1f]);
    assert_eq!(
        guest.leaf_entry(DATA) & (ACCESSED | DIRTY),
        ACCESSED | DIRTY
    );
}

#[test]
fn read_across_a_page_boundary_gathers_from_both_distant_pages() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // Low 4 bytes (32 ones) at the end of DATA_PHYS's page, high 4 bytes (one bit) at
    // DATA_NEXT_PHYS. The physically adjacent bytes would add 16 more.
    guest.write(DATA_PHYS + 0xffc, &[0xff; 4]);
    guest.write(DATA_NEXT_PHYS, &[0x01, 0, 0, 0]);
    guest.write(DATA_PHYS + 0x1000, &[0xff, 0xff]);
    vcpu.edit_regs(|r| r.rsi = DATA + 0xffc);
    complete(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06]);
    assert_eq!(vcpu.regs.borrow().rax, 33);
}

#[test]
fn fault_in_the_second_page_reports_that_page() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // DATA_NEXT + 0x1000 is not mapped.
    vcpu.edit_regs(|r| r.rsi = DATA_NEXT + 0xffc);
    assert_eq!(
        fault(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06], 14),
        Some(0)
    );
    assert_eq!(vcpu.sregs.borrow().cr2, DATA_NEXT + 0x1000);
}

#[test]
fn store_across_pages_writes_nothing_if_the_second_page_faults() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    guest.write(DATA_NEXT_PHYS + 0xffe, &[0xee, 0xee]);
    vcpu.edit_regs(|r| r.rdi = DATA_NEXT + 0xffe);
    assert_eq!(
        fault(&vcpu, &guest, &[0x0f, 0xae, 0x1f], 14),
        Some(PF_WRITE)
    );
    assert_eq!(vcpu.sregs.borrow().cr2, DATA_NEXT + 0x1000);
    assert_eq!(guest.read(DATA_NEXT_PHYS + 0xffe, 2), [0xee, 0xee]);
}

#[test]
fn guest_physical_address_outside_ram_is_an_error() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rsi = BEYOND_RAM);
    let error = run(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06]).unwrap_err();
    assert!(
        matches!(
            error,
            EmulationError::GuestPhysical {
                gpa: 0x1_0000_0000,
                len: 8
            }
        ),
        "{error}"
    );
    assert_eq!(vcpu.rip(), CODE);
}

#[test]
fn non_canonical_address_raises_gp() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rsi = 0x0000_8000_0000_0000);
    assert_eq!(
        fault(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8, 0x06], 13),
        Some(0)
    );
}

// ---------------------------------------------------------------- instruction fetch

#[test]
fn instruction_is_fetched_from_guest_memory_when_missing_or_cut_short() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    guest.write(CODE_PHYS, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]); // popcnt rax, rbx
    vcpu.edit_regs(|r| r.rbx = 0b1011);
    assert_eq!(run(&vcpu, &guest, &[]).unwrap(), Outcome::Completed);
    assert_eq!((vcpu.rip(), vcpu.regs.borrow().rax), (CODE + 5, 3));

    vcpu.edit_regs(|r| (r.rip, r.rax) = (CODE, 0));
    assert_eq!(
        run(&vcpu, &guest, &[0xf3, 0x48, 0x0f, 0xb8]).unwrap(),
        Outcome::Completed
    );
    assert_eq!((vcpu.rip(), vcpu.regs.borrow().rax), (CODE + 5, 3));
}

#[test]
fn instruction_running_into_an_unmapped_page_raises_a_fetch_fault() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    // Two bytes of popcnt at the end of the code page; the next page is not mapped.
    guest.write(CODE_PHYS + 0xffe, &[0xf3, 0x48]);
    vcpu.edit_regs(|r| r.rip = CODE + 0xffe);
    assert_eq!(fault(&vcpu, &guest, &[], 14), Some(PF_FETCH));
    assert_eq!(vcpu.sregs.borrow().cr2, CODE + 0x1000);
}

// ---------------------------------------------------------------- FXSAVE/FXRSTOR

/// Distinct x87/SSE state: FCW 0x027f, FSW 0x0120, FTW 0x80, FOP 0x05d9,
/// FIP 0x1122334455667788, FDP 0x99aabbccddeeff00, MXCSR 0x1fa0, ST bytes = offset,
/// XMM bytes = 3 × offset (mod 256).
fn distinct_legacy_state(vcpu: &FakeVcpu) {
    vcpu.edit_area(|a| {
        a[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
        a[2..4].copy_from_slice(&0x0120u16.to_le_bytes());
        a[4] = 0x80;
        a[6..8].copy_from_slice(&0x05d9u16.to_le_bytes());
        a[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        a[16..24].copy_from_slice(&0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        a[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        for (offset, byte) in a.iter_mut().enumerate().take(160).skip(32) {
            *byte = offset as u8;
        }
        for (offset, byte) in a.iter_mut().enumerate().take(416).skip(160) {
            *byte = (offset * 3) as u8;
        }
        a[512] = 0b11;
    });
}

#[test]
fn fxsave64_then_fxrstor64_round_trips_the_legacy_region() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    distinct_legacy_state(&vcpu);
    let original = vcpu.area();
    guest.write(DATA_PHYS + 0x600, &[0xee; 512]);
    vcpu.edit_regs(|r| r.rdi = DATA + 0x600);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x07]); // fxsave64 [rdi]
    let image = guest.read(DATA_PHYS + 0x600, 512);
    assert_eq!(&image[0..2], &[0x7f, 0x02]);
    assert_eq!(&image[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&image[24..28], &0x1fa0u32.to_le_bytes());
    assert_eq!(image[160 + 255], (415 * 3) as u8, "XMM15's last byte");
    assert_eq!(&image[..416], &original[..416]);
    assert!(
        image[416..].iter().all(|&b| b == 0xee),
        "reserved and software bytes untouched"
    );

    // Wipe everything but MXCSR_MASK, a CPU constant that FXRSTOR does not load.
    vcpu.edit_area(|a| {
        a[..28].fill(0);
        a[32..416].fill(0);
        a[512] = 0;
    });
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x0f]); // fxrstor64 [rdi]
    let restored = vcpu.area();
    assert_eq!(&restored[..416], &original[..416]);
    assert_eq!(restored[512], 0b11, "x87 and SSE marked in use for KVM");
}

#[test]
fn fxsave_without_rex_w_stores_32_bit_pointers_and_fxrstor_zero_extends_them() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    distinct_legacy_state(&vcpu);
    vcpu.edit_regs(|r| r.rdi = DATA + 0x600);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x07]); // fxsave [rdi]
    let image = guest.read(DATA_PHYS + 0x600, 32);
    // FIP low half, FCS 0, reserved; FDP low half, FDS 0, reserved.
    assert_eq!(&image[8..16], &[0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0]);
    assert_eq!(&image[16..24], &[0x00, 0xff, 0xee, 0xdd, 0, 0, 0, 0]);

    // Selectors in the image are dropped on restore: FIP = 0x55667788.
    guest.write(DATA_PHYS + 0x600 + 12, &[0x33, 0x00]);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x0f]); // fxrstor [rdi]
    assert_eq!(&vcpu.area()[8..16], &0x5566_7788u64.to_le_bytes());
}

#[test]
fn fxsave_alignment_and_fxrstor_mxcsr_checks_raise_gp() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rdi = DATA + 0x608);
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x07], 13), Some(0));

    guest.write(DATA_PHYS + 0x600, &[0; 512]);
    guest.put_u32(DATA_PHYS + 0x600 + 24, 0xffff_0000);
    vcpu.edit_regs(|r| r.rdi = DATA + 0x600);
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x0f], 13), Some(0));

    vcpu.edit_sregs(|s| s.cr0 |= CR0_TS);
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x07], 7), None);
}

// ---------------------------------------------------------------- XSAVE family

/// XCR0 = x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM, all in use, with AVX bytes 0xa1,
/// opmask 0xb2, ZMM_Hi256 0xc3, Hi16_ZMM 0xd4 in KVM's standard-format area.
fn avx512_state(vcpu: &FakeVcpu) {
    vcpu.set_xcr0(0xe7);
    vcpu.edit_area(|a| {
        a[576..832].fill(0xa1);
        a[1088..1152].fill(0xb2);
        a[1152..1664].fill(0xc3);
        a[1664..2688].fill(0xd4);
        a[512] = 0xe7;
    });
    vcpu.edit_regs(|r| (r.rax, r.rdx) = (0xffff_ffff, 0xffff_ffff));
}

fn fresh_area(guest: &Guest, gpa: u64) {
    guest.write(gpa, &[0xee; 4096]);
    guest.write(gpa + 512, &[0; 64]);
}

#[test]
fn xsave_uses_standard_offsets_and_xsavec_packs_components() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    avx512_state(&vcpu);

    fresh_area(&guest, DATA_PHYS);
    vcpu.edit_regs(|r| r.rdi = DATA);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x27]); // xsave64 [rdi]
    let standard = guest.read(DATA_PHYS, 4096);
    assert_eq!(guest.u64_at(DATA_PHYS + 512), 0xe7, "XSTATE_BV");
    assert_eq!(guest.u64_at(DATA_PHYS + 520), 0, "XCOMP_BV not written");
    assert!(
        standard[576..832].iter().all(|&b| b == 0xa1),
        "AVX at its CPUID offset 576"
    );
    assert!(
        standard[832..1088].iter().all(|&b| b == 0xee),
        "MPX gap untouched"
    );
    assert!(
        standard[1088..1152].iter().all(|&b| b == 0xb2),
        "opmask at 1088"
    );
    assert!(
        standard[1152..1664].iter().all(|&b| b == 0xc3),
        "ZMM_Hi256 at 1152"
    );
    assert!(
        standard[1664..2688].iter().all(|&b| b == 0xd4),
        "Hi16_ZMM at 1664"
    );
    assert!(
        standard[464..512].iter().all(|&b| b == 0xee),
        "software-available bytes untouched"
    );
    assert_eq!(&standard[24..28], &0x1f80u32.to_le_bytes(), "MXCSR");

    // Compacted: 576 AVX (256) → 832 opmask (64) → 896 ZMM_Hi256 (512) → 1408 Hi16_ZMM.
    fresh_area(&guest, DATA_NEXT_PHYS);
    vcpu.edit_regs(|r| r.rdi = DATA_NEXT);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x27]); // xsavec64 [rdi]
    let compacted = guest.read(DATA_NEXT_PHYS, 4096);
    assert_eq!(guest.u64_at(DATA_NEXT_PHYS + 512), 0xe7, "XSTATE_BV");
    assert_eq!(
        guest.u64_at(DATA_NEXT_PHYS + 520),
        0x8000_0000_0000_00e7,
        "XCOMP_BV"
    );
    assert!(compacted[576..832].iter().all(|&b| b == 0xa1));
    assert!(compacted[832..896].iter().all(|&b| b == 0xb2));
    assert!(compacted[896..1408].iter().all(|&b| b == 0xc3));
    assert!(compacted[1408..2432].iter().all(|&b| b == 0xd4));
    assert!(compacted[2432..].iter().all(|&b| b == 0xee));
}

#[test]
fn xsavec_skips_components_in_their_initial_state_but_keeps_their_space() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    avx512_state(&vcpu);
    vcpu.edit_area(|a| a[512] = 0xe3); // AVX not in use
    fresh_area(&guest, DATA_PHYS);
    vcpu.edit_regs(|r| r.rdi = DATA);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x27]);
    let compacted = guest.read(DATA_PHYS, 4096);
    assert_eq!(guest.u64_at(DATA_PHYS + 512), 0xe3);
    assert_eq!(guest.u64_at(DATA_PHYS + 520), 0x8000_0000_0000_00e7);
    assert!(
        compacted[576..832].iter().all(|&b| b == 0xee),
        "AVX not written"
    );
    assert!(
        compacted[832..896].iter().all(|&b| b == 0xb2),
        "opmask still at 832"
    );
}

#[test]
fn xsaveopt_with_partial_mask_keeps_other_xstate_bv_bits() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    avx512_state(&vcpu);
    fresh_area(&guest, DATA_PHYS);
    guest.put_u64(DATA_PHYS + 512, 0x20); // opmask bit from an earlier save
                                          // EDX:EAX = AVX only; XINUSE[AVX] = 1.
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0b100, 0, DATA));
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x37]); // xsaveopt64 [rdi]
    let image = guest.read(DATA_PHYS, 4096);
    assert_eq!(guest.u64_at(DATA_PHYS + 512), 0x24);
    assert!(image[576..832].iter().all(|&b| b == 0xa1));
    assert!(
        image[1088..1152].iter().all(|&b| b == 0xee),
        "opmask not requested"
    );
    assert_eq!(
        &image[24..32],
        &[0x80, 0x1f, 0, 0, 0xff, 0xff, 0, 0],
        "AVX requests MXCSR too"
    );
    assert!(image[0..24].iter().all(|&b| b == 0xee), "x87 not requested");
}

#[test]
fn xrstor_standard_loads_marked_components_and_initializes_the_rest() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_area(|a| {
        a[576..832].fill(0x11); // AVX state that XRSTOR must initialize
        a[512] = 0b111;
    });
    let mut image = vec![0u8; 1024];
    image[0..2].copy_from_slice(&0x0372u16.to_le_bytes());
    image[24..28].copy_from_slice(&0x1f00u32.to_le_bytes());
    image[32..160].fill(0x24);
    image[160..416].fill(0x42);
    image[512] = 0b011; // XSTATE_BV: x87, SSE
    image[576..832].fill(0x99); // present in memory, but not marked: ignored
    guest.write(DATA_PHYS, &image);
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0b111, 0, DATA));
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x2f]); // xrstor64 [rdi]
    let area = vcpu.area();
    assert_eq!(&area[0..2], &[0x72, 0x03]);
    assert_eq!(&area[24..28], &0x1f00u32.to_le_bytes());
    assert!(area[32..160].iter().all(|&b| b == 0x24));
    assert!(area[160..416].iter().all(|&b| b == 0x42));
    assert!(area[576..832].iter().all(|&b| b == 0), "AVX initialized");
    assert_eq!(area[512], 0b011, "KVM's XSTATE_BV follows the image");
    assert_eq!(vcpu.set_xsave_calls.get(), 1);
}

#[test]
fn xrstor_raises_gp_for_bad_headers_and_mxcsr() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0b111, 0, DATA));
    let xrstor64 = [0x48, 0x0f, 0xae, 0x2f];
    guest.write(DATA_PHYS, &[0; 1024]);
    guest.put_u32(DATA_PHYS + 24, 0x1f80);
    // XSTATE_BV bit 3 is not in XCR0.
    guest.put_u64(DATA_PHYS + 512, 0b1000);
    assert_eq!(fault(&vcpu, &guest, &xrstor64, 13), Some(0));
    // Reserved header bytes 16..23 of a standard-form header.
    guest.put_u64(DATA_PHYS + 512, 0b11);
    guest.put_u64(DATA_PHYS + 528, 1);
    assert_eq!(fault(&vcpu, &guest, &xrstor64, 13), Some(0));
    // MXCSR with a reserved bit.
    guest.put_u64(DATA_PHYS + 528, 0);
    guest.put_u32(DATA_PHYS + 24, 0x10_0000);
    assert_eq!(fault(&vcpu, &guest, &xrstor64, 13), Some(0));
    // Misaligned area.
    vcpu.edit_regs(|r| r.rdi = DATA + 0x20);
    assert_eq!(fault(&vcpu, &guest, &xrstor64, 13), Some(0));
    assert_eq!(vcpu.set_xsave_calls.get(), 0);
}

#[test]
fn xrstor_of_a_compacted_image_reads_packed_offsets() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.set_xcr0(0xe7);
    vcpu.edit_area(|a| {
        a[160..416].fill(0x55);
        a[1152..2688].fill(0x77);
        a[24..28].copy_from_slice(&0x1fc0u32.to_le_bytes());
        a[512] = 0xe7;
    });
    // XCOMP_BV: x87, AVX, opmask → AVX at 576, opmask at 832. XSTATE_BV the same.
    let mut image = vec![0u8; 1024];
    image[0..2].copy_from_slice(&0x0360u16.to_le_bytes());
    image[32..160].fill(0x24);
    image[512..520].copy_from_slice(&0x25u64.to_le_bytes());
    image[520..528].copy_from_slice(&(0x8000_0000_0000_0000u64 | 0x25).to_le_bytes());
    image[576..832].fill(0x5a);
    image[832..896].fill(0x6b);
    guest.write(DATA_PHYS, &image);
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0xffff_ffff, 0xffff_ffff, DATA));
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x2f]);
    let area = vcpu.area();
    assert_eq!(&area[0..2], &[0x60, 0x03]);
    assert!(
        area[576..832].iter().all(|&b| b == 0x5a),
        "AVX into its standard offset"
    );
    assert!(
        area[1088..1152].iter().all(|&b| b == 0x6b),
        "opmask into 1088"
    );
    assert!(
        area[160..416].iter().all(|&b| b == 0),
        "SSE not in XSTATE_BV: XMM initialized"
    );
    assert_eq!(
        &area[24..28],
        &0x1f80u32.to_le_bytes(),
        "compacted form initializes MXCSR with SSE"
    );
    assert!(
        area[1152..2688].iter().all(|&b| b == 0),
        "ZMM components initialized"
    );
    assert_eq!(area[512], 0x25);
}

#[test]
fn xsaves_and_xrstors_round_trip_at_cpl0() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_area(|a| {
        a[576..832].fill(0xa1);
        a[512] = 0b111;
    });
    fresh_area(&guest, DATA_PHYS);
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0b111, 0, DATA));
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x2f]); // xsaves64 [rdi]
    assert_eq!(guest.u64_at(DATA_PHYS + 520), 0x8000_0000_0000_0007);
    assert!(guest.read(DATA_PHYS + 576, 256).iter().all(|&b| b == 0xa1));

    vcpu.edit_area(|a| {
        a[576..832].fill(0);
        a[512] = 0b011;
    });
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x1f]); // xrstors64 [rdi]
    let area = vcpu.area();
    assert!(area[576..832].iter().all(|&b| b == 0xa1));
    assert_eq!(area[512], 0b111);

    vcpu.edit_sregs(|s| s.ss.dpl = 3);
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x2f], 13), Some(0));
}

#[test]
fn xsaves_of_supervisor_components_is_unsupported() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.xss.set(Some(1 << 11));
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0xffff_ffff, 0, DATA));
    let error = run(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0x2f]).unwrap_err();
    assert!(error.to_string().contains("supervisor state"), "{error}");
}

#[test]
fn xsave_family_checks_alignment_and_osxsave() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| (r.rax, r.rdx, r.rdi) = (0b111, 0, DATA + 0x20));
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x27], 13), Some(0));
    vcpu.edit_sregs(|s| s.cr4 &= !CR4_OSXSAVE);
    assert_eq!(fault(&vcpu, &guest, &[0x48, 0x0f, 0xae, 0x27], 6), None);
}

// ---------------------------------------------------------------- other modes

#[test]
fn protected_mode_32bit_adds_the_segment_base_and_saves_eight_xmm_registers() {
    let (vcpu, guest) = (FakeVcpu::protected_mode_32bit(), Guest::new());
    // popcnt eax, [esi]: DS.base 0x1000 + ESI 0x200000 = physical 0x201000 (paging off).
    guest.put_u32(0x20_1000, 0x7);
    vcpu.edit_sregs(|s| s.ds.base = 0x1000);
    vcpu.edit_regs(|r| r.rsi = 0x20_0000);
    complete(&vcpu, &guest, &[0xf3, 0x0f, 0xb8, 0x06]);
    assert_eq!(vcpu.regs.borrow().rax, 3);

    // fxsave [edi]: 32-bit pointers, XMM0-7 only (bytes 160..288).
    distinct_legacy_state(&vcpu);
    guest.write(0x20_0800, &[0xee; 512]);
    vcpu.edit_sregs(|s| s.ds.base = 0);
    vcpu.edit_regs(|r| r.rdi = 0x20_0800);
    complete(&vcpu, &guest, &[0x0f, 0xae, 0x07]);
    let image = guest.read(0x20_0800, 512);
    assert_eq!(&image[8..16], &[0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0]);
    assert_eq!(&image[160..288], &vcpu.area()[160..288]);
    assert!(image[288..].iter().all(|&b| b == 0xee));
}

#[test]
fn real_mode_uses_16_bit_addressing_and_the_ds_base() {
    let (vcpu, guest) = (FakeVcpu::protected_mode_32bit(), Guest::new());
    vcpu.edit_sregs(|s| {
        s.cr0 = 0x10; // ET only: real mode
        s.cs = kvm_segment {
            base: 0xf_0000,
            selector: 0xf000,
            limit: 0xffff,
            present: 1,
            s: 1,
            type_: 0xb,
            ..Default::default()
        };
        s.ds.base = 0x2000;
    });
    // popcnt ax, [si]: 0x2000 + 0x10.
    guest.write(0x2010, &[0xff, 0xff, 0xff]);
    vcpu.edit_regs(|r| {
        r.rip = 0x100;
        r.rsi = 0x10;
        r.rax = 0xabcd_0000;
    });
    complete(&vcpu, &guest, &[0xf3, 0x0f, 0xb8, 0x04]);
    assert_eq!(vcpu.regs.borrow().rax, 0xabcd_0010);
}

#[test]
fn rdrand_delivers_a_host_value_and_reports_it_in_cf() {
    if !std::arch::is_x86_feature_detected!("rdrand") {
        return;
    }
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    vcpu.edit_regs(|r| r.rflags = RFLAGS_FIXED | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
    complete(&vcpu, &guest, &[0x48, 0x0f, 0xc7, 0xf0]); // rdrand rax
    let regs = *vcpu.regs.borrow();
    // Either a value with CF=1, or 0 with CF=0; the other arithmetic flags are cleared.
    assert!(
        regs.rflags == RFLAGS_FIXED | RFLAGS_CF || (regs.rflags == RFLAGS_FIXED && regs.rax == 0)
    );
}

// ---------------------------------------------------------------- reporting

#[test]
fn unknown_instruction_is_unsupported_with_bytes_disassembly_and_rip() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    let mut emulator = InstructionEmulator::with_cpu(test_cpu());
    let error = emulator
        .handle(&vcpu, &guest.mem, &[0x0f, 0xa2])
        .unwrap_err();
    assert!(
        matches!(&error, EmulationError::Unsupported { rip: CODE, bytes, .. } if bytes == &[0x0f, 0xa2])
    );
    let message = error.to_string();
    assert!(
        message.starts_with("cannot emulate \"cpuid\" (0f a2) at guest RIP 0x400000"),
        "{message}"
    );
    assert_eq!(vcpu.rip(), CODE);
    assert!(emulator.counts().is_empty());

    // Bytes that do not decode (in guest memory too): no disassembly.
    guest.write(CODE_PHYS, &[0x06]);
    let message = emulator
        .handle(&vcpu, &guest.mem, &[0x06])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("undecodable") && message.contains("(06 00 00"),
        "{message}"
    );
    assert!(message.contains("guest RIP 0x400000"), "{message}");
}

#[test]
fn counts_group_handled_instructions_by_lowercase_mnemonic() {
    let (vcpu, guest) = (FakeVcpu::long_mode_kernel(), Guest::new());
    let mut emulator = InstructionEmulator::with_cpu(test_cpu());
    for bytes in [
        &[0xcc][..],
        &[0xcc],
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        &[0x48, 0x0f, 0xc7, 0x27],
    ] {
        vcpu.edit_regs(|r| r.rdi = DATA);
        emulator.handle(&vcpu, &guest.mem, bytes).unwrap();
    }
    let counts: Vec<_> = emulator
        .counts()
        .iter()
        .map(|(name, count)| (name.as_str(), *count))
        .collect();
    assert_eq!(counts, [("int3", 2), ("popcnt", 1), ("xsavec64", 1)]);
}

#[test]
fn reported_instruction_reads_the_bytes_after_the_length_byte() {
    let mut run = kvm_run {
        exit_reason: KVM_EXIT_INTERNAL_ERROR,
        ..Default::default()
    };
    // data[0] = flags (bytes valid); data[1] = length 4, then f3 48 0f b8 from byte 1 on.
    let mut data = [0u64; 16];
    data[0] = 1;
    data[1] = 0x00_00_00_b8_0f_48_f3_04;
    run.__bindgen_anon_1.internal = kvm_run__bindgen_ty_1__bindgen_ty_13 {
        suberror: 1,
        ndata: 3,
        data,
    };
    assert_eq!(
        reported_instruction(&run),
        Some(vec![0xf3, 0x48, 0x0f, 0xb8])
    );

    // 15 bytes spill into data[2].
    data[1] = 0x0706_0504_0302_010f;
    data[2] = 0x0f0e_0d0c_0b0a_0908;
    run.__bindgen_anon_1.internal = kvm_run__bindgen_ty_1__bindgen_ty_13 {
        suberror: 1,
        ndata: 3,
        data,
    };
    assert_eq!(
        reported_instruction(&run),
        Some((1..=15).collect::<Vec<u8>>())
    );

    data[0] = 0;
    run.__bindgen_anon_1.internal = kvm_run__bindgen_ty_1__bindgen_ty_13 {
        suberror: 1,
        ndata: 3,
        data,
    };
    assert_eq!(reported_instruction(&run), None);
    run.exit_reason = 2; // KVM_EXIT_IO
    assert_eq!(reported_instruction(&run), None);
}

// ---------------------------------------------------------------- page walker modes

fn paging(cr0: u64, cr4: u64, efer: u64, cr3: u64) -> Paging {
    Paging {
        cr0,
        cr3,
        cr4,
        efer,
        cpl: 0,
        alignment_check: false,
        phys_addr_bits: 46,
    }
}

fn page_fault_code(result: Step<mmu::Translation>) -> u32 {
    match result {
        Err(Stop::Exception(Exception {
            vector: 14,
            error_code: Some(code),
            ..
        })) => code,
        other => panic!("expected #PF, got {other:?}"),
    }
}

#[test]
fn paging_off_maps_linear_to_physical() {
    let guest = Guest::new();
    let translation = mmu::translate(
        &guest.mem,
        &paging(0x11, 0, 0, 0),
        0x1234_5678,
        Access::Write,
    )
    .unwrap();
    assert_eq!(translation.gpa, 0x1234_5678);
}

#[test]
fn legacy_32bit_paging_with_4k_and_4m_pages() {
    let guest = Guest::new();
    let p = paging(0x8000_0011, 0x10, 0, 0x5_0000); // PG, PSE
                                                    // 0x00403123: directory index 1, table index 3.
    guest.put_u32(0x5_0004, 0x5_1000 | 0x3);
    guest.put_u32(0x5_100c, 0x12_3000 | 0x3);
    assert_eq!(
        mmu::translate(&guest.mem, &p, 0x0040_3123, Access::Read)
            .unwrap()
            .gpa,
        0x12_3123
    );
    assert_eq!(
        guest.u32_at(0x5_0004) & 0x20,
        0x20,
        "Accessed set in the 4-byte PDE"
    );
    // 0x0089abcd: directory index 2, a 4 MiB page at 0xc00000 plus PSE-36 bit 32.
    guest.put_u32(0x5_0008, 0x00c0_0000 | (1 << 13) | 0x83);
    let translation = mmu::translate(&guest.mem, &p, 0x0089_abcd, Access::Write).unwrap();
    assert_eq!(
        (translation.gpa, translation.page_size),
        (0x1_00c9_abcd, 4 << 20)
    );
    assert_eq!(
        guest.u32_at(0x5_0008) & 0x60,
        0x60,
        "Accessed and Dirty set"
    );
    // Bit 21 of a 4 MiB PDE is reserved.
    guest.put_u32(0x5_0008, 0x00c0_0000 | (1 << 21) | 0x83);
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x0089_abcd, Access::Read)),
        PF_PROTECTION | PF_RESERVED
    );
}

#[test]
fn pae_paging_with_nx_and_2m_pages() {
    let guest = Guest::new();
    let p = paging(0x8001_0011, 0x20, 0x800, 0x5_2000); // PG WP, PAE, NXE
                                                        // 0x40201abc: PDPT index 1, directory index 1, table index 1.
    guest.put_u64(0x5_2008, 0x5_3000 | P);
    guest.put_u64(0x5_3008, 0x5_4000 | 0x7);
    guest.put_u64(0x5_4008, 0x7_7000 | 0x7 | NX);
    assert_eq!(
        mmu::translate(&guest.mem, &p, 0x4020_1abc, Access::Read)
            .unwrap()
            .gpa,
        0x7_7abc
    );
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x4020_1abc, Access::Execute)),
        PF_PROTECTION | PF_FETCH
    );
    // 0x40412345: directory index 2 maps a 2 MiB page at 0x600000.
    guest.put_u64(0x5_3010, 0x60_0000 | PS | 0x7);
    assert_eq!(
        mmu::translate(&guest.mem, &p, 0x4041_2345, Access::Execute)
            .unwrap()
            .gpa,
        0x61_2345
    );
    // RW in a PAE PDPTE is reserved.
    guest.put_u64(0x5_2008, 0x5_3000 | P | RW);
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x4020_1abc, Access::Read)),
        PF_PROTECTION | PF_RESERVED
    );
}

#[test]
fn five_level_paging_with_a_1g_page() {
    let guest = Guest::new();
    let p = paging(0x8001_0011, 0x1020, 0xd00, 0x6_0000); // LA57 PAE, LMA NXE
                                                          // 0x0100_0000_4000_1234: PML5 index 256, PML4 index 0, PDPT index 1 (1 GiB page).
    guest.put_u64(0x6_0800, 0x6_1000 | 0x7);
    guest.put_u64(0x6_1000, 0x6_2000 | 0x7);
    guest.put_u64(0x6_2008, 0x8000_0000 | PS | 0x7);
    let translation = mmu::translate(&guest.mem, &p, 0x0100_0000_4000_1234, Access::Read).unwrap();
    assert_eq!(
        (translation.gpa, translation.page_size),
        (0x8000_1234, 1 << 30)
    );
}

#[test]
fn four_level_walk_checks_reserved_bits_user_rights_and_smep() {
    let guest = Guest::new();
    let mut p = paging(0x8001_0011, 0x30_0020, 0xd00, PML4); // SMAP SMEP PAE
                                                             // A frame address above MAXPHYADDR (46).
    guest.map(0x7f_0000, (1 << 46) | 0x5000, P | RW, 1);
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x7f_0000, Access::Read)),
        PF_PROTECTION | PF_RESERVED
    );
    // Supervisor fetch from an executable user page under SMEP.
    guest.map(0x7d_0000, 0x5000, P | US, 1);
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x7d_0000, Access::Execute)),
        PF_PROTECTION | PF_FETCH
    );
    // User-mode write to a read-only user page.
    guest.map(0x7e_0000, 0x5000, P | US, 1);
    p.cpl = 3;
    assert_eq!(
        page_fault_code(mmu::translate(&guest.mem, &p, 0x7e_0000, Access::Write)),
        PF_PROTECTION | PF_WRITE | PF_USER
    );
    assert_eq!(
        mmu::translate(&guest.mem, &p, 0x7e_0010, Access::Read)
            .unwrap()
            .gpa,
        0x5010
    );
    // A 2 MiB page.
    guest.map(0x4000_0000, 0x60_0000, P | RW, 2);
    p.cpl = 0;
    assert_eq!(
        mmu::translate(&guest.mem, &p, 0x4001_2345, Access::Write)
            .unwrap()
            .gpa,
        0x61_2345
    );
}

#[test]
fn page_tables_outside_ram_are_an_error() {
    let guest = Guest::new();
    let p = paging(0x8001_0011, 0x20, 0xd00, 0x1_0000_0000);
    let result = mmu::translate(&guest.mem, &p, 0x1000, Access::Read);
    assert!(
        matches!(
            result,
            Err(Stop::Error(EmulationError::GuestPhysical {
                gpa: 0x1_0000_0000,
                len: 8
            }))
        ),
        "{result:?}"
    );
}
