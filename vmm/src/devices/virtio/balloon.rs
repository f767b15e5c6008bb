//! virtio-balloon: the host sets a target, the guest driver gives pages back
//! (inflate) or takes them again (deflate); memory statistics and free-page
//! reporting. Pages the guest gives up are dropped from the host with
//! madvise(MADV_DONTNEED), so the VMM's resident set falls.

use super::chain::ParsedChain;
use super::{
    device_type, drain_queue, ActivateError, Activation, Chain, DeviceEvents, Drained, Interrupt,
    Queue, QueueT, VirtioDevice,
};
use crate::config::BalloonConfig;
use crate::memory::GuestRam;
use event_manager::EventSet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

const QUEUE_SIZE: u16 = 128;
/// The balloon counts in 4 KiB pages whatever the guest's page size.
const PAGE_SHIFT: u64 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// How often the guest is asked for fresh statistics.
const STATS_PERIOD: Duration = Duration::from_secs(2);
/// Linux sends at most 256 PFNs per inflate buffer; allow more, not unbounded.
const MAX_PFN_BUFFER: u64 = 64 << 10;
const MAX_REPORT_CHAIN: u64 = 1 << 40;

mod feature {
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_REPORTING: u64 = 1 << 5;
}

const TOKEN_STATS_TIMER: u32 = 0;
const TOKEN_STATS_REQUEST: u32 = 1;

/// Statistic tags (virtio 1.2, 5.5.6.3) and the names reported for them.
fn stat_name(tag: u16) -> Option<&'static str> {
    Some(match tag {
        0 => "swap_in",
        1 => "swap_out",
        2 => "major_faults",
        3 => "minor_faults",
        4 => "free_memory",
        5 => "total_memory",
        6 => "available_memory",
        7 => "disk_caches",
        8 => "hugetlb_allocations",
        9 => "hugetlb_failures",
        _ => return None,
    })
}

/// What a balloon keeps in a snapshot besides its queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBalloon {
    pub target_pages: u32,
    pub actual_pages: u32,
    /// The statistics buffer the device holds until it wants new figures.
    pub stats_head: Option<u16>,
}

/// What the host sees of the balloon, shared with the control socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatus {
    pub target_mib: u64,
    /// What the guest says it has given back.
    pub actual_mib: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    /// The guest's last statistics report (bytes or counts, by name).
    pub stats: BTreeMap<String, u64>,
}

/// The host's handle on a balloon: set the target, read the status.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the device to ask the guest for statistics now.
    stats_request: EventFd,
}

#[derive(Default)]
struct State {
    target_pages: u32,
    actual_pages: u32,
    inflated_pages: u64,
    deflated_pages: u64,
    reported_bytes: u64,
    stats: BTreeMap<String, u64>,
    /// Set once the driver is running: raising it tells the driver the target moved.
    interrupt: Option<Interrupt>,
}

impl BalloonHandle {
    /// Asks the guest to hold `mib` MiB in its balloon.
    pub fn set_target_mib(&self, mib: u64) {
        let mut state = crate::devices::lock(&self.shared.state);
        state.target_pages = u32::try_from((mib << 20) >> PAGE_SHIFT).unwrap_or(u32::MAX);
        if let Some(interrupt) = &state.interrupt {
            interrupt.signal_config_change();
        }
    }

    pub fn status(&self) -> BalloonStatus {
        let state = crate::devices::lock(&self.shared.state);
        let _ = self.shared.stats_request.write(1);
        BalloonStatus {
            target_mib: (u64::from(state.target_pages) << PAGE_SHIFT) >> 20,
            actual_mib: (u64::from(state.actual_pages) << PAGE_SHIFT) >> 20,
            inflated_pages: state.inflated_pages,
            deflated_pages: state.deflated_pages,
            reported_bytes: state.reported_bytes,
            stats: state.stats.clone(),
        }
    }
}

struct Running {
    memory: GuestRam,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    reporting: Option<Queue>,
    interrupt: Interrupt,
    /// The statistics buffer the guest left with us, returned to ask for more.
    stats_head: Option<u16>,
}

pub struct Balloon {
    config: BalloonConfig,
    shared: Arc<Shared>,
    stats_timer: TimerFd,
    running: Option<Running>,
    broken: bool,
}

impl Balloon {
    pub fn new(config: &BalloonConfig) -> std::io::Result<Balloon> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stats_request: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let balloon = Balloon {
            config: config.clone(),
            shared,
            stats_timer: TimerFd::new()?,
            running: None,
            broken: false,
        };
        balloon.handle().set_target_mib(config.target_mib);
        Ok(balloon)
    }

    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::devices::lock(&self.shared.state)
    }

    fn config_space(&self) -> [u8; 8] {
        let state = self.state();
        let mut config = [0u8; 8];
        config[0..4].copy_from_slice(&state.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&state.actual_pages.to_le_bytes());
        config
    }

    fn break_device(&mut self, reason: &str) {
        tracing::warn!("balloon: driver error, device needs reset: {reason}");
        self.broken = true;
        if let Some(running) = &self.running {
            running.interrupt.signal_config_change();
        }
    }

    /// Inflate (give pages to the host) or deflate (take them back).
    fn process_pfns(&mut self, inflate: bool) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let queue = if inflate {
            &mut running.inflate
        } else {
            &mut running.deflate
        };
        let mut pages = 0u64;
        let mut error = None;
        let drained = drain_queue(queue, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(chain, &memory, MAX_PFN_BUFFER) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            let mut bytes = Vec::with_capacity(parsed.readable_len() as usize);
            // What cannot be read is not there: the list ends early.
            if let Ok(mut list) = parsed.reader() {
                let _ = list.read_to_end(&mut bytes);
            }
            let pfns = bytes
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            for (start, count) in contiguous_runs(pfns) {
                pages += count;
                // Deflated pages need nothing: they fault back in when touched.
                if inflate {
                    discard(&memory, start << PAGE_SHIFT, count << PAGE_SHIFT);
                }
            }
            if queue.add_used(&memory, parsed.head, 0).is_err() {
                error = Some("cannot write the used ring".into());
                return Chain::Broken;
            }
            Chain::Done
        });
        running.interrupt.signal_used_buffer();
        {
            let mut state = self.state();
            if inflate {
                state.inflated_pages += pages;
            } else {
                state.deflated_pages += pages;
            }
        }
        if drained == Drained::Broken {
            self.break_device(&error.unwrap_or_else(|| "the ring is invalid".into()));
        }
    }

    /// Free-page reporting: every buffer is a free range the host may drop.
    fn process_reports(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let Some(queue) = running.reporting.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let mut reported = 0u64;
        let mut error = None;
        let drained = drain_queue(queue, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(chain, &memory, MAX_REPORT_CHAIN) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            for buffer in parsed.readable.iter().chain(&parsed.writable) {
                discard(&memory, buffer.addr.0, u64::from(buffer.len));
                reported += u64::from(buffer.len);
            }
            if queue.add_used(&memory, parsed.head, 0).is_err() {
                error = Some("cannot write the used ring".into());
                return Chain::Broken;
            }
            Chain::Done
        });
        running.interrupt.signal_used_buffer();
        self.state().reported_bytes += reported;
        if drained == Drained::Broken {
            self.break_device(&error.unwrap_or_else(|| "the reporting ring is invalid".into()));
        }
    }

    /// The guest sent statistics: keep them and hold its buffer.
    fn process_stats(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let Some(queue) = running.stats.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let mut received = None;
        let mut error = None;
        let mut previous = running.stats_head.take();
        let drained = drain_queue(queue, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(chain, &memory, 64 << 10) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            // A driver sends one buffer at a time; give back an older one.
            if let Some(head) = previous.replace(parsed.head) {
                if queue.add_used(&memory, head, 0).is_err() {
                    return Chain::Broken;
                }
            }
            let mut bytes = Vec::with_capacity(parsed.readable_len() as usize);
            if let Ok(mut stats) = parsed.reader() {
                let _ = stats.read_to_end(&mut bytes);
            }
            received = Some(parse_stats(&bytes));
            Chain::Done
        });
        running.stats_head = previous;
        if let Some(stats) = received {
            self.state().stats = stats;
        }
        if drained == Drained::Broken {
            self.break_device(&error.unwrap_or_else(|| "the statistics ring is invalid".into()));
        }
    }

    /// Serves queue `index`, whose role depends on the agreed features.
    fn serve_queue(&mut self, index: usize) {
        let Some(running) = &self.running else {
            return;
        };
        let has_stats = running.stats.is_some();
        match (index, has_stats) {
            (0, _) => self.process_pfns(true),
            (1, _) => self.process_pfns(false),
            (2, true) => self.process_stats(),
            (2, false) | (3, true) => self.process_reports(),
            _ => {}
        }
    }

    /// Returns the held statistics buffer: the driver refills and resends it.
    fn request_stats(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let (Some(queue), Some(head)) = (running.stats.as_mut(), running.stats_head.take()) else {
            return;
        };
        if queue.add_used(&running.memory, head, 0).is_ok() {
            running.interrupt.signal_used_buffer();
        }
    }
}

/// Statistics entries are packed (u16 tag, u64 value) pairs.
fn parse_stats(bytes: &[u8]) -> BTreeMap<String, u64> {
    bytes
        .chunks_exact(10)
        .filter_map(|entry| {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let value = u64::from_le_bytes(entry[2..10].try_into().ok()?);
            Some((stat_name(tag)?.to_string(), value))
        })
        .collect()
}

/// Groups page frame numbers into (first, count) runs of consecutive pages.
fn contiguous_runs(pfns: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for pfn in pfns {
        match runs.last_mut() {
            Some((start, count)) if *start + *count == pfn => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Drops host pages behind a guest range; ranges outside guest RAM (a
/// hostile or confused driver) are ignored.
fn discard(memory: &GuestRam, addr: u64, len: u64) {
    let Some(region) = memory.find_region(GuestAddress(addr)) else {
        return;
    };
    let offset = addr - region.start_addr().raw_value();
    if len == 0
        || !offset.is_multiple_of(PAGE_SIZE)
        || !len.is_multiple_of(PAGE_SIZE)
        || offset.checked_add(len).is_none_or(|end| end > region.len())
    {
        return;
    }
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
        return;
    };
    // Pages of shared memory (a memfd) stay in the file unless removed.
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: [host, host + len) lies inside one guest mapping; the advice
    // only drops its pages, which read back as zero (or, in a snapshot's
    // private mapping, as the file has them).
    let rc = unsafe { libc::madvise(host.cast(), len as usize, advice) };
    if rc != 0 {
        tracing::debug!("madvise: {}", std::io::Error::last_os_error());
    }
}

impl VirtioDevice for Balloon {
    fn queue_states(&self) -> Vec<super::SavedQueue> {
        let Some(running) = &self.running else {
            return Vec::new();
        };
        [
            Some(&running.inflate),
            Some(&running.deflate),
            running.stats.as_ref(),
            running.reporting.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(super::SavedQueue::from)
        .collect()
    }

    fn save_state(&self) -> super::SavedDeviceState {
        let state = self.state();
        super::SavedDeviceState::Balloon(SavedBalloon {
            target_pages: state.target_pages,
            actual_pages: state.actual_pages,
            stats_head: self.running.as_ref().and_then(|r| r.stats_head),
        })
    }

    fn restore_state(&mut self, saved: &super::SavedDeviceState) -> Result<(), String> {
        let super::SavedDeviceState::Balloon(saved) = saved else {
            return Err(format!(
                "balloon: a saved state of another device: {saved:?}"
            ));
        };
        let (target, actual, stats_head) =
            (saved.target_pages, saved.actual_pages, saved.stats_head);
        {
            let mut state = self.state();
            state.target_pages = target;
            state.actual_pages = actual;
        }
        if let Some(running) = self.running.as_mut() {
            running.stats_head = stats_head;
        }
        Ok(())
    }

    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // inflate, deflate, and up to two more whose roles depend on features.
        &[QUEUE_SIZE; 4]
    }

    fn device_features(&self) -> u64 {
        let mut features = feature::STATS_VQ;
        if self.config.deflate_on_oom {
            features |= feature::DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            features |= feature::FREE_PAGE_REPORTING;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.state().actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues.into_iter();
        let mut next = |index: usize| match queues.next() {
            Some(queue) if queue.ready() => Ok(queue),
            _ => Err(ActivateError::QueueNotReady(index)),
        };
        let inflate = next(0)?;
        let deflate = next(1)?;
        // Queues are numbered in feature order, skipping absent ones.
        let mut index = 2;
        let stats = if activation.features & feature::STATS_VQ != 0 {
            index += 1;
            Some(next(index - 1)?)
        } else {
            None
        };
        let reporting = if activation.features & feature::FREE_PAGE_REPORTING != 0 {
            Some(next(index)?)
        } else {
            None
        };
        if stats.is_some() {
            self.stats_timer
                .reset(STATS_PERIOD, Some(STATS_PERIOD))
                .map_err(|e| ActivateError::Device(format!("statistics timer: {e}")))?;
        }
        self.state().interrupt = Some(activation.interrupt.clone());
        self.broken = false;
        self.running = Some(Running {
            memory: activation.memory,
            inflate,
            deflate,
            stats,
            reporting,
            interrupt: activation.interrupt,
            stats_head: None,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
        self.broken = false;
        let _ = self.stats_timer.clear();
        let mut state = self.state();
        state.interrupt = None;
        state.actual_pages = 0;
    }

    fn queue_notified(&mut self, index: usize, _events: &mut dyn DeviceEvents) {
        self.serve_queue(index);
    }

    fn initial_event_sources(&self) -> Vec<(RawFd, u32, EventSet)> {
        vec![
            (
                self.stats_timer.as_raw_fd(),
                TOKEN_STATS_TIMER,
                EventSet::IN,
            ),
            (
                self.shared.stats_request.as_raw_fd(),
                TOKEN_STATS_REQUEST,
                EventSet::IN,
            ),
        ]
    }

    fn handle_event(&mut self, token: u32, _events: EventSet, _ops: &mut dyn DeviceEvents) {
        match token {
            TOKEN_STATS_TIMER => {
                let _ = self.stats_timer.wait();
            }
            _ => {
                let _ = self.shared.stats_request.read();
            }
        }
        if !self.broken {
            self.request_stats();
        }
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn name(&self) -> String {
        "balloon".into()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let state = self.state();
        vec![
            ("target_pages", u64::from(state.target_pages)),
            ("actual_pages", u64::from(state.actual_pages)),
            ("inflated_pages", state.inflated_pages),
            ("deflated_pages", state.deflated_pages),
            ("reported_bytes", state.reported_bytes),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{device_queue, device_queue_at, TestQueue, DATA};
    use super::*;
    use vm_memory::Bytes;

    fn resident_pages(memory: &GuestRam, addr: u64, pages: u64) -> u64 {
        let host = memory.get_host_address(GuestAddress(addr)).unwrap();
        let mut vector = vec![0u8; pages as usize];
        // SAFETY: the range is inside the test's guest memory; one byte per page.
        let rc = unsafe {
            libc::mincore(
                host.cast(),
                (pages * PAGE_SIZE) as usize,
                vector.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        vector.iter().filter(|&&b| b & 1 != 0).count() as u64
    }

    fn activated(q: &TestQueue, features: u64) -> Balloon {
        let mut balloon = Balloon::new(&BalloonConfig {
            target_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
        })
        .unwrap();
        let mut queues = vec![device_queue(), device_queue()];
        if features & (feature::STATS_VQ | feature::FREE_PAGE_REPORTING) != 0 {
            queues.push(device_queue());
        }
        balloon
            .activate(Activation {
                memory: q.memory.clone(),
                queues,
                interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                features,
            })
            .unwrap();
        balloon
    }

    #[test]
    fn groups_pfns_into_runs() {
        assert_eq!(
            contiguous_runs([5, 6, 7, 9, 3, 4].into_iter()),
            vec![(5, 3), (9, 1), (3, 2)]
        );
    }

    #[test]
    fn inflating_drops_the_pages_from_the_host() {
        let mut q = TestQueue::new();
        let mut balloon = activated(&q, 0);
        let target = 0x80000u64;
        q.memory
            .write_slice(&[1u8; 8 * 4096], GuestAddress(target))
            .unwrap();
        assert_eq!(resident_pages(&q.memory, target, 8), 8);
        let pfns: Vec<u8> = (0..8u32)
            .flat_map(|i| ((target >> 12) as u32 + i).to_le_bytes())
            .collect();
        // A PFN outside guest memory is ignored, not followed.
        let mut all = pfns.clone();
        all.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
        q.memory.write_slice(&all, GuestAddress(DATA)).unwrap();
        q.offer_chain(&[(DATA, all.len() as u32, false)]);
        balloon.process_pfns(true);
        assert_eq!(resident_pages(&q.memory, target, 8), 0);
        assert_eq!(balloon.state().inflated_pages, 9);
        assert_eq!(q.used_index(), 1);
    }

    #[test]
    fn the_target_is_read_by_the_driver_and_actual_written_back() {
        let q = TestQueue::new();
        let mut balloon = activated(&q, 0);
        let handle = balloon.handle();
        handle.set_target_mib(64);
        let mut num_pages = [0u8; 4];
        balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 64 * 256);
        balloon.write_config(4, &(32u32 * 256).to_le_bytes());
        // The driver may not move the target.
        balloon.write_config(0, &1u32.to_le_bytes());
        let status = handle.status();
        assert_eq!((status.target_mib, status.actual_mib), (64, 32));
    }

    #[test]
    fn keeps_the_guest_statistics_and_asks_again() {
        let mut q = TestQueue::new();
        let mut balloon = activated(&q, feature::STATS_VQ);
        let mut stats = Vec::new();
        for (tag, value) in [(4u16, 100u64 << 20), (5, 256 << 20), (99, 1)] {
            stats.extend_from_slice(&tag.to_le_bytes());
            stats.extend_from_slice(&value.to_le_bytes());
        }
        q.memory.write_slice(&stats, GuestAddress(DATA)).unwrap();
        q.offer_chain(&[(DATA, stats.len() as u32, false)]);
        balloon.serve_queue(2);
        let status = balloon.handle().status();
        assert_eq!(status.stats.get("free_memory"), Some(&(100 << 20)));
        assert_eq!(status.stats.get("total_memory"), Some(&(256 << 20)));
        assert_eq!(status.stats.len(), 2);
        // The buffer is held until the host wants fresh numbers.
        assert_eq!(q.used_index(), 0);
        balloon.request_stats();
        assert_eq!(q.used_index(), 1);
    }

    fn balloon(deflate_on_oom: bool, free_page_reporting: bool) -> Balloon {
        Balloon::new(&BalloonConfig {
            target_mib: 1,
            deflate_on_oom,
            free_page_reporting,
        })
        .unwrap()
    }

    /// The guest may deflate under memory pressure only if the device offers
    /// DEFLATE_ON_OOM (virtio 1.2, 5.5.6.1): the bit is offered exactly when
    /// `--balloon ...,deflate_on_oom` asked for it, whatever else was asked.
    #[test]
    fn deflate_on_oom_is_offered_exactly_when_configured() {
        for reporting in [false, true] {
            let offered = balloon(true, reporting).device_features();
            assert_ne!(offered & feature::DEFLATE_ON_OOM, 0, "{offered:#x}");
            let offered = balloon(false, reporting).device_features();
            assert_eq!(offered & feature::DEFLATE_ON_OOM, 0, "{offered:#x}");
            assert_eq!(
                offered & feature::FREE_PAGE_REPORTING != 0,
                reporting,
                "{offered:#x}"
            );
        }
        // Bit 2 is VIRTIO_BALLOON_F_DEFLATE_ON_OOM (virtio 1.2, 5.5.3), the
        // bit Linux tests (virtio-bindings has no balloon header to name it).
        assert_eq!(feature::DEFLATE_ON_OOM, 1 << 2);
    }

    /// Linux with DEFLATE_ON_OOM takes pages back from an inflated balloon
    /// when it runs out of memory (its OOM notifier), without the host
    /// lowering the target: the device serves that deflate like any other,
    /// counts it, keeps the host's target, and shows the smaller `actual`
    /// the driver writes back.
    #[test]
    fn a_deflate_the_guest_makes_below_the_target_is_served_and_counted() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (inflate_base, deflate_base) = (0x1000, 0x5000);
        let mut inflate = TestQueue::at(memory.clone(), inflate_base);
        let mut deflate = TestQueue::at(memory.clone(), deflate_base);
        let mut balloon = balloon(true, false);
        let features = feature::DEFLATE_ON_OOM | feature::STATS_VQ;
        balloon
            .activate(Activation {
                memory: memory.clone(),
                // DEFLATE_ON_OOM adds no queue: inflate, deflate, statistics.
                queues: vec![
                    device_queue_at(inflate_base),
                    device_queue_at(deflate_base),
                    device_queue_at(0x9000),
                ],
                interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                features,
            })
            .unwrap();
        let counter = |balloon: &Balloon, name: &str| {
            balloon
                .counters()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
        };
        // The host's target (1 MiB: 256 pages); the driver inflates to it,
        // pages 1 MiB..2 MiB, and says so.
        let pfn_list = |first: u32, count: u32| -> Vec<u8> {
            (first..first + count).flat_map(u32::to_le_bytes).collect()
        };
        let list = pfn_list(0x100, 256);
        memory.write_slice(&list, GuestAddress(DATA)).unwrap();
        inflate.offer_chain(&[(DATA, list.len() as u32, false)]);
        balloon.serve_queue(0);
        balloon.write_config(4, &256u32.to_le_bytes());
        assert_eq!(inflate.used_index(), 1);
        assert_eq!(counter(&balloon, "inflated_pages"), 256);
        assert_eq!(counter(&balloon, "actual_pages"), 256);

        // Out of memory, the guest takes 64 pages back on its own.
        let list = pfn_list(0x100, 64);
        memory.write_slice(&list, GuestAddress(DATA)).unwrap();
        deflate.offer_chain(&[(DATA, list.len() as u32, false)]);
        balloon.serve_queue(1);
        assert_eq!(deflate.used_index(), 1, "the deflate was not acknowledged");
        assert_eq!(deflate.used_element(0), (0, 0));
        balloon.write_config(4, &192u32.to_le_bytes());
        assert!(!balloon.is_broken());
        assert_eq!(counter(&balloon, "deflated_pages"), 64);
        assert_eq!(counter(&balloon, "actual_pages"), 192);
        // The host's wish stands; the driver reads it unchanged.
        assert_eq!(counter(&balloon, "target_pages"), 256);
        let mut num_pages = [0u8; 4];
        balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 256);
        let status = balloon.handle().status();
        assert_eq!((status.target_mib, status.deflated_pages), (1, 64));
        // The pages it took back are the guest's again: written, read back.
        memory
            .write_slice(&[0x5a; 4096], GuestAddress(0x100 << 12))
            .unwrap();
        let mut page = [0u8; 4096];
        memory
            .read_slice(&mut page, GuestAddress(0x100 << 12))
            .unwrap();
        assert_eq!(page, [0x5a; 4096]);
    }

    #[test]
    fn reported_free_ranges_are_dropped_from_the_host() {
        let mut q = TestQueue::new();
        // Without STATS_VQ, the reporting queue is the third.
        let mut balloon = activated(&q, feature::FREE_PAGE_REPORTING);
        let range = 0x40000u64;
        q.memory
            .write_slice(&[7u8; 16 * 4096], GuestAddress(range))
            .unwrap();
        q.offer_chain(&[(range, 16 * 4096, true)]);
        balloon.serve_queue(2);
        assert_eq!(resident_pages(&q.memory, range, 16), 0);
        assert_eq!(balloon.handle().status().reported_bytes, 16 * 4096);
    }
}
