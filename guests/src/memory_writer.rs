//! A guest that never stops changing its memory and counting on the serial
//! port: the subject of snapshot and live-migration tests.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};

/// What the guest dirties and how fast.
#[derive(Clone, Copy, Debug)]
pub struct MemoryWriter {
    /// First byte of the region it writes (page aligned, above the guest image).
    pub region_start: u64,
    /// Pages each round writes one 8-byte word in.
    pub region_pages: u32,
    /// With a value, rounds sweep through this many pages from
    /// `region_start`, `region_pages` at a time, wrapping at the end; without,
    /// every round writes the same `region_pages`.
    pub sweep_pages: Option<u32>,
    /// Each round lasts at least this many TSC ticks (0: as fast as it can),
    /// which sets the dirtying rate.
    pub round_tsc_ticks: u64,
    /// Stop dirtying after this many rounds and spin on POST-code writes
    /// (port 0x80), which leave memory alone but show the vCPU runs.
    pub rounds: Option<u32>,
}

impl Default for MemoryWriter {
    fn default() -> Self {
        MemoryWriter {
            region_start: 4 << 20,
            region_pages: 1024,
            sweep_pages: None,
            round_tsc_ticks: 0,
            rounds: None,
        }
    }
}

/// Counts rounds from 0. Round n writes n + 1 into word (n mod 512) of every page
/// of the region, then prints "n\n" on COM1 — so the memory is a function of
/// the count, and the count on the console has no gap or repeat.
pub fn memory_writer(w: MemoryWriter) -> Result<Vec<u8>> {
    let mut p = Program::new("memory_writer")?;
    let mut round = p.a.create_label();
    let mut page = p.a.create_label();
    let mut wait = p.a.create_label();
    p.a.xor(r15d, r15d)?; // the count
    p.a.mov(rdi, w.region_start)?;
    p.a.set_label(&mut round)?;
    p.a.rdtsc()?;
    p.a.shl(rdx, 32)?;
    p.a.or(rax, rdx)?;
    p.a.mov(r13, rax)?; // round start
    p.a.mov(rbx, r15)?;
    p.a.and(ebx, 511)?;
    p.a.shl(ebx, 3)?; // word offset in each page
    match w.sweep_pages {
        // Go on from where the last round stopped, wrapping at the end.
        Some(sweep) => {
            let mut inside = p.a.create_label();
            p.a.mov(
                rax,
                w.region_start + u64::from(sweep.saturating_sub(w.region_pages)) * 4096,
            )?;
            p.a.cmp(rdi, rax)?;
            p.a.jbe(inside)?;
            p.a.mov(rdi, w.region_start)?;
            p.a.set_label(&mut inside)?;
        }
        None => p.a.mov(rdi, w.region_start)?,
    }
    p.a.mov(ecx, w.region_pages)?;
    p.a.lea(rdx, qword_ptr(r15 + 1))?; // never zero, so every round's data is real
    p.a.set_label(&mut page)?;
    p.a.mov(qword_ptr(rdi + rbx), rdx)?;
    p.a.add(rdi, 4096)?;
    p.a.dec(ecx)?;
    p.a.jnz(page)?;
    p.a.mov(rax, r15)?;
    p.print_rax_decimal()?;
    p.print("\n")?;
    p.a.inc(r15)?;
    if let Some(rounds) = w.rounds {
        let mut more = p.a.create_label();
        let mut spin = p.a.create_label();
        p.a.cmp(r15, rounds as i32)?;
        p.a.jb(more)?;
        p.a.set_label(&mut spin)?;
        p.a.out(0x80, al)?;
        p.a.jmp(spin)?;
        p.a.set_label(&mut more)?;
        p.a.nop()?;
    }
    if w.round_tsc_ticks > 0 {
        p.a.mov(r14, w.round_tsc_ticks)?;
        p.a.set_label(&mut wait)?;
        p.a.pause()?;
        p.a.rdtsc()?;
        p.a.shl(rdx, 32)?;
        p.a.or(rax, rdx)?;
        p.a.sub(rax, r13)?;
        p.a.cmp(rax, r14)?;
        p.a.jb(wait)?;
    }
    p.a.jmp(round)?;
    p.finish()
}
