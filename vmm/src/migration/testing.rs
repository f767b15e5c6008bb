//! A fake VM for the migration's unit tests, without KVM: real guest RAM
//! (vm-memory, whose bitmap logs every write, as it does the VMM's own in a
//! real VM), a "guest" that writes to it between rounds at a pace its
//! throttle sets, a pause, and the state of the checked-in snapshot fixture.

use super::progress::MigrationProgress;
use super::protocol::{self, Accept, Stream};
use super::source::{DirtyPages, Source};
use super::transport::Connection;
use super::MigrationError;
use crate::config::VmSpec;
use crate::memory::GuestRam;
use crate::snapshot::SavedVm;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const PAGE: u64 = 4096;

/// What the fake guest does each time it runs (between two looks at the
/// dirty log, and once more until it is parked): `run` counts from 1, and
/// `throttle` is the share of its time it is held back.
pub type Guest = Box<dyn FnMut(&GuestRam, u32, u32) + Send>;

pub struct FakeVm {
    pub machine: VmSpec,
    pub memory: GuestRam,
    /// The snapshot fixture's state, its machine replaced by ours.
    state: serde_json::Value,
    guest: Mutex<(Guest, u32)>,
    pub throttle: AtomicU32,
    /// Every throttle the migration set, in order.
    pub throttles: Mutex<Vec<u32>>,
    pub parked: AtomicBool,
    pub progress: Mutex<Option<MigrationProgress>>,
}

/// The state of the checked-in snapshot fixture of the current format.
fn fixture_state() -> serde_json::Value {
    let path = format!(
        "{}/../cli/tests/fixtures/snapshot-v{}/state.json",
        env!("CARGO_MANIFEST_DIR"),
        crate::snapshot::VERSION
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A byte pattern no page of fresh memory has: page `index`, written by `run`.
pub fn pattern(index: u64, run: u32) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (index.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (u64::from(run) * 13)) as u8 | 1)
        .collect()
}

/// Writes `pattern(page, run)` into each of `pages`.
pub fn write_pages(memory: &GuestRam, pages: impl IntoIterator<Item = u64>, run: u32) {
    for page in pages {
        memory
            .write_slice(&pattern(page, run), GuestAddress(page * PAGE))
            .unwrap();
    }
}

/// Every byte of guest RAM, regions back to back.
pub fn contents(memory: &GuestRam) -> Vec<u8> {
    let mut all = Vec::new();
    crate::memory::for_each_chunk(memory, 1 << 20, |_, chunk| {
        all.extend_from_slice(chunk);
        Ok::<(), MigrationError>(())
    })
    .unwrap();
    all
}

impl FakeVm {
    /// A machine of `memory_mib` whose first `written_pages` pages hold
    /// data (what the first round copies), with `guest` running in it.
    pub fn new(memory_mib: u64, written_pages: u64, guest: Guest) -> FakeVm {
        let mut state = fixture_state();
        let mut machine: VmSpec = serde_json::from_value(state["machine"].clone()).unwrap();
        machine.memory_mib = memory_mib;
        state["machine"] = serde_json::to_value(&machine).unwrap();
        let ranges = crate::arch::x86_64::boot::ram_regions(machine.memory_bytes());
        let memory = crate::memory::allocate(&ranges, false).unwrap();
        write_pages(&memory, 0..written_pages, 0);
        FakeVm {
            machine,
            memory,
            state,
            guest: Mutex::new((guest, 0)),
            throttle: AtomicU32::new(0),
            throttles: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            progress: Mutex::new(Some(MigrationProgress::default())),
        }
    }

    /// The guest runs for a while, unless it is parked.
    fn run_guest(&self) {
        if self.parked.load(Ordering::SeqCst) {
            return;
        }
        let mut guest = self.guest.lock().unwrap();
        guest.1 += 1;
        let run = guest.1;
        (guest.0)(&self.memory, run, self.throttle.load(Ordering::SeqCst));
    }

    /// Times the guest ran.
    pub fn runs(&self) -> u32 {
        self.guest.lock().unwrap().1
    }

    /// A stream to a destination, in memory: the source's end as a
    /// connection without descriptor passing, and the destination's end.
    pub fn pair() -> (Connection, UnixStream) {
        let (source, destination) = UnixStream::pair().unwrap();
        for end in [&source, &destination] {
            end.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
        }
        let connection = Connection {
            stream: Box::new(source) as Box<dyn Stream>,
            unix: None,
        };
        (connection, destination)
    }
}

struct FakeLog<'a>(&'a FakeVm);

impl DirtyPages for FakeLog<'_> {
    /// The guest ran since the last look; what it wrote is in the bitmap.
    fn take(&self) -> Result<Vec<Vec<u64>>, MigrationError> {
        self.0.run_guest();
        Ok(self
            .0
            .memory
            .iter()
            .map(|region| vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset())
            .collect())
    }
}

impl Source for FakeVm {
    fn machine(&self) -> &VmSpec {
        &self.machine
    }

    fn memory(&self) -> &GuestRam {
        &self.memory
    }

    fn hand_over(
        &self,
        _socket: Option<&UnixStream>,
        accept: &Accept,
    ) -> Result<(), MigrationError> {
        Err(protocol::ProtocolError::Malformed(
            protocol::Tag::Accept,
            format!("the fake hands nothing over, asked {accept:?}"),
        )
        .into())
    }

    fn dirty_log(&self) -> Result<Box<dyn DirtyPages + '_>, MigrationError> {
        // Logging starts clean: what was written before is in the first round.
        for region in self.memory.iter() {
            vm_memory::mmap::MmapRegion::bitmap(region).reset();
        }
        Ok(Box::new(FakeLog(self)))
    }

    fn set_throttle(&self, percent: u32) {
        self.throttle.store(percent, Ordering::SeqCst);
        self.throttles.lock().unwrap().push(percent);
    }

    /// The guest runs on until it is parked.
    fn park(&self) -> Result<(), MigrationError> {
        self.run_guest();
        self.parked.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn capture(&self) -> Result<SavedVm, MigrationError> {
        assert!(self.parked.load(Ordering::SeqCst), "captured while running");
        Ok(SavedVm::from_value(self.state.clone(), crate::snapshot::VERSION).unwrap())
    }

    fn progress(&self) -> &Mutex<Option<MigrationProgress>> {
        &self.progress
    }
}
