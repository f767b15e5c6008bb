//! Virtio devices, kept apart from the transport that exposes them.
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features,
//! queues, config space) and what it does with its queues once the driver has
//! activated it. The transport ([`mmio::MmioTransport`] today, virtio-pci
//! later) owns the registers, the queue set-up and the feature negotiation, and
//! hands the device its queues at DRIVER_OK. Device work runs on the device
//! event-loop thread (`devices::event_loop`), never on a vCPU thread.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
#[doc(hidden)]
pub mod testing;
pub mod vsock;

use crate::memory::GuestRam;
use event_manager::{EventOps, EventSet, Events};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// A queue's set-up and ring positions, as a snapshot stores them
/// (virtio-queue's `QueueState`, which has no serde support of its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for SavedQueue {
    fn from(queue: &Queue) -> Self {
        let state = queue.state();
        SavedQueue {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            event_idx: state.event_idx_enabled,
            next_avail: state.next_avail,
            next_used: state.next_used,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
        }
    }
}

impl SavedQueue {
    /// Rebuilds the queue; a state that no valid queue has (a size that is not
    /// a power of two, misaligned rings) is refused.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Feature bits common to every device (virtio 1.2, section 6).
pub mod features {
    use virtio_bindings::{virtio_config, virtio_ring};
    pub const VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
    pub const RING_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    pub const RING_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// What every Bulkhead device offers besides its own features.
    pub const COMMON: u64 = VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX;
}

/// Device type numbers (virtio 1.2, section 5).
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    pub const BALLOON: u32 = ids::VIRTIO_ID_BALLOON;
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
}

/// Bits of the interrupt status register.
const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt line: the status bits the driver reads and
/// acknowledges, and the irqfd that raises the line in KVM's IOAPIC.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_buffer(&self) {
        self.raise(INTERRUPT_USED_BUFFER);
    }

    /// The device changed its configuration space (or needs a reset).
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // A full eventfd counter still has the line raised, so an error here
        // loses nothing.
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Puts back the status bits of a restored device, and raises the line
    /// again if any is set (a spurious interrupt is harmless, a lost one is not).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
        if bits != 0 {
            let _ = self.irqfd.write(1);
        }
    }

    /// Raises the line again if any status bit is set. A restore calls it
    /// once KVM's interrupt controllers and vCPUs hold their saved state:
    /// an edge raised while a device took back its state (the vsock's
    /// transport-reset event) found no vCPU and an IOAPIC at power-on, and
    /// was lost.
    pub fn raise_if_pending(&self) {
        if self.status() != 0 {
            let _ = self.irqfd.write(1);
        }
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver activates it.
pub struct Activation {
    pub memory: GuestRam,
    /// The queues the driver set up, in device order; ready ones are valid.
    pub queues: Vec<Queue>,
    pub interrupt: Interrupt,
    /// The features both sides agreed on.
    pub features: u64,
}

/// A running single-queue device's queue, and what serving it needs.
pub struct ActiveQueue {
    pub memory: GuestRam,
    pub queue: Queue,
    pub interrupt: Interrupt,
}

impl Activation {
    /// The one queue of a single-queue device (block, rng), which must be ready.
    pub fn single_queue(self) -> Result<ActiveQueue, ActivateError> {
        let queue = self
            .queues
            .into_iter()
            .next()
            .filter(|queue| queue.ready())
            .ok_or(ActivateError::QueueNotReady(0))?;
        Ok(ActiveQueue {
            memory: self.memory,
            queue,
            interrupt: self.interrupt,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("{0}")]
    Device(String),
}

/// Event-source tokens a device registers with the event loop start here;
/// lower values are the transport's queue notifications.
pub const DEVICE_TOKEN_BASE: u32 = 1 << 16;

/// Lets a device add and remove its own event sources (a TAP device, a
/// socket, a timer) on the event loop while it runs.
pub trait DeviceEvents {
    /// Watches `fd` for `events`; `token` comes back to the device.
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet);
    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet);
    fn remove(&mut self, fd: RawFd);
}

/// [`DeviceEvents`] on the device thread's event loop.
pub struct LoopEvents<'a, 'b> {
    ops: &'a mut EventOps<'b>,
}

impl<'a, 'b> LoopEvents<'a, 'b> {
    pub fn new(ops: &'a mut EventOps<'b>) -> Self {
        LoopEvents { ops }
    }
}

impl DeviceEvents for LoopEvents<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) {
        let registered = Events::with_data_raw(fd, DEVICE_TOKEN_BASE + token, events);
        if let Err(e) = self.ops.add(registered) {
            tracing::warn!(fd, token, "cannot watch a device event source: {e:?}");
        }
    }

    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) {
        let registered = Events::with_data_raw(fd, DEVICE_TOKEN_BASE + token, events);
        if let Err(e) = self.ops.modify(registered) {
            tracing::warn!(fd, token, "cannot change a device event source: {e:?}");
        }
    }

    fn remove(&mut self, fd: RawFd) {
        // EventOps::remove looks the source up by fd only.
        if let Err(e) = self.ops.remove(Events::empty_raw(fd)) {
            tracing::debug!(fd, "cannot unwatch a device event source: {e:?}");
        }
    }
}

/// [`DeviceEvents`] for a device driven outside the event loop (unit tests,
/// fuzzing, benchmarks): changes to event sources are ignored.
pub struct DetachedEvents;

impl DeviceEvents for DetachedEvents {
    fn add(&mut self, _: RawFd, _: u32, _: EventSet) {}
    fn modify(&mut self, _: RawFd, _: u32, _: EventSet) {}
    fn remove(&mut self, _: RawFd) {}
}

/// One virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific features offered, on top of [`features::COMMON`].
    fn device_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Drivers may write some config fields (the balloon's actual size).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver wrote 0 to the status register: drop the queues and return
    /// to the state before activation.
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn queue_notified(&mut self, index: usize, events: &mut dyn DeviceEvents);
    /// Event sources the device watches from the start (registered once).
    fn initial_event_sources(&self) -> Vec<(RawFd, u32, EventSet)> {
        Vec::new()
    }
    /// One of the device's own event sources fired.
    fn handle_event(&mut self, _token: u32, _events: EventSet, _ops: &mut dyn DeviceEvents) {}
    /// Whether the device stopped serving its queues because the driver broke
    /// the rules (the transport then reports DEVICE_NEEDS_RESET).
    fn is_broken(&self) -> bool {
        false
    }
    /// A short name for logs and reports ("vda", "rng").
    fn name(&self) -> String;
    /// What the device did so far (requests, bytes), for reports.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The running device's queues, in the order `activate` took them, for a
    /// snapshot; restoring hands them back to `activate` in that order.
    fn queue_states(&self) -> Vec<SavedQueue>;
    /// What the device keeps besides its queues (a request it holds, a size
    /// the driver wrote), for a snapshot. Taken while the device thread is parked.
    fn save_state(&self) -> SavedDeviceState {
        SavedDeviceState::None
    }
    /// Puts back what `save_state` returned, after `activate` on restore; a
    /// state of another kind of device is refused.
    fn restore_state(&mut self, state: &SavedDeviceState) -> Result<(), String> {
        match state {
            SavedDeviceState::None => Ok(()),
            other => Err(format!(
                "{}: a saved state of another device: {other:?}",
                self.name()
            )),
        }
    }
}

/// What a device saves besides its transport and queues, one variant per
/// device that keeps anything. In the state file a device that keeps
/// nothing is `null` and the others are their own fields (as version 2
/// wrote them), so each variant's fields must tell it apart.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SavedDeviceState {
    #[default]
    None,
    Balloon(balloon::SavedBalloon),
}

/// Copies `data` into a config-space read, at `offset`, for any width the
/// driver asks for; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < config.len() {
        let n = data.len().min(config.len() - offset);
        data[..n].copy_from_slice(&config[offset..offset + n]);
    }
}

/// What a device did with one descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// Served and put in the used ring.
    Done,
    /// Not served: a rate limit is reached. The chain goes back to the
    /// available ring, to be served when the limiter's timer fires.
    Throttled,
    /// The driver broke the rules; the device stops serving the queue.
    Broken,
}

/// Why [`drain_queue`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    Empty,
    Throttled,
    /// The queue itself is broken (the guest claims more chains than it
    /// holds, or its rings are unreadable), or a chain was.
    Broken,
}

/// Pops descriptor chains off `queue` until it is empty, re-enabling guest
/// notifications in a way that cannot miss a chain added meanwhile (the
/// EVENT_IDX dance).
pub fn drain_queue<F>(queue: &mut Queue, memory: &GuestRam, mut handle: F) -> Drained
where
    F: FnMut(&mut Queue, virtio_queue::DescriptorChain<&GuestRam>) -> Chain,
{
    loop {
        if queue.disable_notification(memory).is_err() {
            return Drained::Broken;
        }
        loop {
            let chain = match queue.iter(memory) {
                Ok(mut chains) => chains.next(),
                Err(_) => return Drained::Broken,
            };
            let Some(chain) = chain else { break };
            match handle(queue, chain) {
                Chain::Done => {}
                Chain::Throttled => {
                    queue.go_to_previous_position();
                    return Drained::Throttled;
                }
                Chain::Broken => return Drained::Broken,
            }
        }
        match queue.enable_notification(memory) {
            Ok(true) => continue,
            Ok(false) => return Drained::Empty,
            Err(_) => return Drained::Broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_of_any_width_and_past_the_end() {
        let config = [1u8, 2, 3, 4, 5];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 0, &mut data);
        assert_eq!(data, [1, 2, 3, 4]);
        read_config_bytes(&config, 3, &mut data);
        assert_eq!(data, [4, 5, 0, 0]);
        read_config_bytes(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acknowledged() {
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        interrupt.signal_used_buffer();
        interrupt.signal_config_change();
        assert_eq!(interrupt.status(), 3);
        assert_eq!(interrupt.irqfd().read().unwrap(), 2);
        interrupt.acknowledge(INTERRUPT_USED_BUFFER);
        assert_eq!(interrupt.status(), INTERRUPT_CONFIG_CHANGE);
    }
}
