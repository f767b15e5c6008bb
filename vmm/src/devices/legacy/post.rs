//! The POST diagnostic port (0x80). Guests write progress codes here; the first
//! write is the earliest moment the VMM can see guest code running, so it is
//! time-stamped for the start-up benchmark.

use super::super::BusDevice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// CLOCK_MONOTONIC in nanoseconds; comparable across processes on one host.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[derive(Default)]
pub struct PostCodes {
    first_write_ns: AtomicU64,
    last_code: AtomicU64,
}

impl PostCodes {
    /// When the guest first wrote a POST code (CLOCK_MONOTONIC ns), if it has.
    pub fn first_write_ns(&self) -> Option<u64> {
        Some(self.first_write_ns.load(Ordering::Acquire)).filter(|&t| t != 0)
    }

    pub fn last_code(&self) -> u8 {
        self.last_code.load(Ordering::Relaxed) as u8
    }
}

pub struct PostPort(pub Arc<PostCodes>);

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.0.last_code.store(u64::from(code), Ordering::Relaxed);
        }
        let _ = self.0.first_write_ns.compare_exchange(
            0,
            monotonic_ns(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}
