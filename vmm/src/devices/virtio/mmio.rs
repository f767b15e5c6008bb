//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 registers).
//!
//! Linux finds each device from `virtio_mmio.device=4K@ADDRESS:IRQ` on its
//! command line. Queue notifications are caught by KVM through an ioeventfd
//! per queue and reach the device on the event-loop thread; the device raises
//! its interrupt through an irqfd. Register accesses run on vCPU threads.

use super::{
    features, ActivateError, Activation, Interrupt, LoopEvents, Queue, QueueT, SavedQueue,
    VirtioDevice, DEVICE_TOKEN_BASE,
};
use crate::devices::BusDevice;
use crate::memory::GuestRam;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// Each device's register window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Where in the window the driver writes a queue's index to notify it.
pub const QUEUE_NOTIFY_OFFSET: u64 = register::QUEUE_NOTIFY;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "BLKH": the vendor ID this VMM reports.
const VENDOR_ID: u32 = 0x484b_4c42;

/// Register offsets (virtio-bindings' `virtio_mmio`; the driver and device
/// areas are its AVAIL and USED).
mod register {
    use virtio_bindings::virtio_mmio as mmio;
    pub const MAGIC_VALUE: u64 = mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = mmio::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = mmio::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = mmio::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = mmio::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = mmio::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = mmio::VIRTIO_MMIO_CONFIG as u64;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    use virtio_bindings::virtio_config as config;
    pub const ACKNOWLEDGE: u32 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = config::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = config::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = config::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const NEEDS_RESET: u32 = config::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = config::VIRTIO_CONFIG_S_FAILED;
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestRam,
    interrupt: Interrupt,
    queue_events: Vec<EventFd>,
    /// Queue set-up as the driver writes it; handed to the device at DRIVER_OK.
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestRam,
        interrupt: Interrupt,
    ) -> std::io::Result<Self> {
        let queue_events = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queues = fresh_queues(device.as_ref());
        Ok(MmioTransport {
            device,
            memory,
            interrupt,
            queue_events,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        })
    }

    /// One eventfd per queue, to register as KVM ioeventfds on QueueNotify.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        features::COMMON | self.device.device_features()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            // Queue set-up is frozen once the device runs.
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            register::MAGIC_VALUE => MAGIC_VALUE,
            register::VERSION => VERSION,
            register::DEVICE_ID => self.device.device_type(),
            register::VENDOR_ID => VENDOR_ID,
            register::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            register::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            register::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            register::INTERRUPT_STATUS => self.interrupt.status(),
            register::STATUS => {
                let broken = self.activated && self.device.is_broken();
                self.status | if broken { status::NEEDS_RESET } else { 0 }
            }
            register::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            register::DEVICE_FEATURES_SEL => self.device_features_select = value,
            register::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            register::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            register::QUEUE_SEL => self.queue_select = value,
            register::QUEUE_NUM => {
                if let Some(queue) = self.selected_queue() {
                    // The queue refuses sizes that are not a power of two or
                    // exceed its maximum; it then fails validation at DRIVER_OK.
                    queue.set_size(value as u16);
                }
            }
            register::QUEUE_READY => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            register::QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            register::QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            register::QUEUE_DRIVER_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            register::QUEUE_DRIVER_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            register::QUEUE_DEVICE_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            register::QUEUE_DEVICE_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            register::QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd takes this write before the VMM sees
                // it; when it could not be registered, signal the queue here.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            register::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            register::STATUS => self.write_status(value),
            _ => tracing::debug!(
                device = self.device.name(),
                offset = format_args!("{offset:#x}"),
                "write to a read-only or unknown virtio-mmio register"
            ),
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if self.status & status::FEATURES_OK == 0 {
            return;
        }
        if let Some(queue) = self.selected_queue() {
            set(queue);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is ignored.
        if value & self.status != self.status {
            tracing::debug!(
                device = self.device.name(),
                value,
                "status write drops bits"
            );
            return;
        }
        let added = value & !self.status;
        let mut value = value;
        if added & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                tracing::warn!(
                    device = self.device.name(),
                    features = format_args!("{:#x}", self.driver_features),
                    "driver asked for features this device does not offer, or no VERSION_1"
                );
                value &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            if let Err(e) = self.activate() {
                tracing::warn!(device = self.device.name(), "cannot activate: {e}");
                value |= status::NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
        self.status = value;
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if queue.ready() && !queue.is_valid(&self.memory) {
                return Err(ActivateError::QueueNotReady(index));
            }
            queue.set_event_idx(event_idx);
        }
        let queues = std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
        self.device.activate(Activation {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        })?;
        self.activated = true;
        // Drivers may queue buffers and notify before DRIVER_OK (Linux's
        // balloon primes its statistics queue that way): look at every queue
        // once now.
        for event in &self.queue_events {
            let _ = event.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.queues = fresh_queues(self.device.as_ref());
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.acknowledge(u32::MAX);
    }
}

/// A transport and its device, as a snapshot stores them.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub interrupt_status: u32,
    /// Queue set-up the driver has written but not yet activated.
    pub setup_queues: Vec<SavedQueue>,
    /// The queues the running device serves; None before DRIVER_OK.
    pub active_queues: Option<Vec<SavedQueue>>,
    pub device: super::SavedDeviceState,
}

impl MmioTransport {
    /// The transport's and device's state. The device thread must be parked.
    pub fn save(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            setup_queues: self.queues.iter().map(SavedQueue::from).collect(),
            active_queues: self.activated.then(|| self.device.queue_states()),
            device: self.device.save_state(),
        }
    }

    /// Raises the interrupt line again if the driver has a reason pending
    /// (see [`Interrupt::raise_if_pending`]).
    pub fn raise_pending_interrupt(&self) {
        self.interrupt.raise_if_pending();
    }

    /// Puts a saved state into a freshly built transport of the same device.
    /// Nothing in `state` is trusted: a state this device cannot have is refused.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let name = self.device.name();
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "{name}: the snapshot has device type {} here, this VM has {}",
                state.device_type,
                self.device.device_type()
            ));
        }
        let max_sizes = self.device.queue_max_sizes().to_vec();
        let rebuild = |saved: &[SavedQueue]| -> Result<Vec<Queue>, String> {
            if saved.len() > max_sizes.len() {
                return Err(format!(
                    "{name}: {} queues saved, the device has {}",
                    saved.len(),
                    max_sizes.len()
                ));
            }
            saved
                .iter()
                .zip(&max_sizes)
                .enumerate()
                .map(|(index, (queue, &max))| {
                    if queue.max_size != max {
                        return Err(format!(
                            "{name}: queue {index} had room for {} entries, now {max}",
                            queue.max_size
                        ));
                    }
                    queue
                        .to_queue()
                        .map_err(|e| format!("{name}: queue {index}: {e:?}"))
                })
                .collect()
        };
        let setup = rebuild(&state.setup_queues)?;
        if setup.len() != max_sizes.len() {
            return Err(format!(
                "{name}: {} queue set-ups saved, the device has {}",
                setup.len(),
                max_sizes.len()
            ));
        }
        self.queues = setup;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        // The saved bits first: activating and restoring the device may raise
        // more (the vsock's transport-reset event), which must not be lost.
        self.interrupt.restore_status(state.interrupt_status);
        if let Some(active) = &state.active_queues {
            let queues = rebuild(active)?;
            for (index, queue) in queues.iter().enumerate() {
                if queue.ready() && !queue.is_valid(&self.memory) {
                    return Err(format!("{name}: queue {index} lies outside guest memory"));
                }
            }
            self.device
                .activate(Activation {
                    memory: self.memory.clone(),
                    queues,
                    interrupt: self.interrupt.clone(),
                    features: self.driver_features,
                })
                .map_err(|e| format!("{name}: {e}"))?;
            self.activated = true;
        }
        self.device.restore_state(&state.device)?;
        // Notifications that were pending when the snapshot was taken are not
        // in it: look at every queue once.
        for event in &self.queue_events {
            let _ = event.write(1);
        }
        Ok(())
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= register::CONFIG {
            self.device.read_config(offset - register::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= register::CONFIG {
            self.device.write_config(offset - register::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                tracing::error!(
                    device = self.device.name(),
                    "cannot watch queue {index}: {e:?}"
                );
            }
        }
        for (fd, token, events) in self.device.initial_event_sources() {
            let registered = Events::with_data_raw(fd, DEVICE_TOKEN_BASE + token, events);
            if let Err(e) = ops.add(registered) {
                tracing::error!(
                    device = self.device.name(),
                    "cannot watch an event source: {e:?}"
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data < DEVICE_TOKEN_BASE {
            let index = data as usize;
            if let Some(event) = self.queue_events.get(index) {
                let _ = event.read();
            }
            if self.activated && !self.device.is_broken() {
                self.device.queue_notified(index, &mut LoopEvents::new(ops));
            }
        } else {
            self.device.handle_event(
                data - DEVICE_TOKEN_BASE,
                events.event_set(),
                &mut LoopEvents::new(ops),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::DeviceEvents;
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activations: Arc<Mutex<Vec<(u64, usize)>>>,
        resets: Arc<Mutex<usize>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xa, 0xb, 0xc, 0xd], offset, data);
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            let ready = activation.queues.iter().filter(|q| q.ready()).count();
            self.activations
                .lock()
                .unwrap()
                .push((activation.features, ready));
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
        fn queue_notified(&mut self, _: usize, _: &mut dyn DeviceEvents) {}
        fn name(&self) -> String {
            "probe".into()
        }
        fn queue_states(&self) -> Vec<SavedQueue> {
            Vec::new()
        }
    }

    type Activations = Arc<Mutex<Vec<(u64, usize)>>>;

    fn transport() -> (MmioTransport, Activations, Arc<Mutex<usize>>) {
        let probe = Probe::default();
        let (activations, resets) = (probe.activations.clone(), probe.resets.clone());
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(Box::new(probe), memory, interrupt).unwrap();
        (transport, activations, resets)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// What Linux's virtio_mmio driver does, up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        write(t, register::STATUS, status::ACKNOWLEDGE);
        write(t, register::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, register::DRIVER_FEATURES_SEL, 0);
        write(t, register::DRIVER_FEATURES, features as u32);
        write(t, register::DRIVER_FEATURES_SEL, 1);
        write(t, register::DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            register::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        read(t, register::STATUS)
    }

    fn set_up_queue(t: &mut MmioTransport, index: u32, size: u32, base: u32) {
        write(t, register::QUEUE_SEL, index);
        write(t, register::QUEUE_NUM, size);
        write(t, register::QUEUE_DESC_LOW, base);
        write(t, register::QUEUE_DESC_HIGH, 0);
        write(t, register::QUEUE_DRIVER_LOW, base + 0x1000);
        write(t, register::QUEUE_DRIVER_HIGH, 0);
        write(t, register::QUEUE_DEVICE_LOW, base + 0x2000);
        write(t, register::QUEUE_DEVICE_HIGH, 0);
        write(t, register::QUEUE_READY, 1);
    }

    #[test]
    fn identifies_itself_and_offers_features_by_halves() {
        let (mut t, _, _) = transport();
        assert_eq!(read(&mut t, register::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read(&mut t, register::VERSION), 2);
        assert_eq!(read(&mut t, register::DEVICE_ID), 42);
        write(&mut t, register::DEVICE_FEATURES_SEL, 0);
        let low = read(&mut t, register::DEVICE_FEATURES);
        write(&mut t, register::DEVICE_FEATURES_SEL, 1);
        let high = read(&mut t, register::DEVICE_FEATURES);
        assert_eq!(
            u64::from(high) << 32 | u64::from(low),
            features::COMMON | 1 << 3
        );
        write(&mut t, register::QUEUE_SEL, 1);
        assert_eq!(read(&mut t, register::QUEUE_NUM_MAX), 8);
        write(&mut t, register::QUEUE_SEL, 2);
        assert_eq!(read(&mut t, register::QUEUE_NUM_MAX), 0);
        let mut config = [0u8; 2];
        t.read(register::CONFIG + 1, &mut config);
        assert_eq!(config, [0xb, 0xc]);
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_legacy_drivers() {
        let (mut t, _, _) = transport();
        let status = negotiate(&mut t, features::VERSION_1 | 1 << 5);
        assert_eq!(status & status::FEATURES_OK, 0);
        write(&mut t, register::STATUS, 0);
        let status = negotiate(&mut t, 1 << 3);
        assert_eq!(status & status::FEATURES_OK, 0);
        write(&mut t, register::STATUS, 0);
        let status = negotiate(&mut t, features::VERSION_1 | 1 << 3);
        assert_ne!(status & status::FEATURES_OK, 0);
    }

    #[test]
    fn activates_with_the_agreed_features_and_resets() {
        let (mut t, activations, resets) = transport();
        negotiate(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
        set_up_queue(&mut t, 0, 16, 0x10000);
        write(&mut t, register::STATUS, 0xf);
        assert!(t.is_activated());
        // Every queue is looked at once, for buffers queued before DRIVER_OK.
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert_eq!(
            *activations.lock().unwrap(),
            vec![(features::VERSION_1 | features::RING_EVENT_IDX, 1)]
        );
        // Queue set-up is frozen while the device runs.
        write(&mut t, register::QUEUE_SEL, 1);
        write(&mut t, register::QUEUE_READY, 1);
        assert_eq!(read(&mut t, register::QUEUE_READY), 0);
        write(&mut t, register::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(*resets.lock().unwrap(), 1);
        assert_eq!(read(&mut t, register::STATUS), 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_activated() {
        let (mut t, activations, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        set_up_queue(&mut t, 0, 16, 0xfff0_0000);
        write(&mut t, register::STATUS, 0xf);
        assert!(!t.is_activated());
        assert!(activations.lock().unwrap().is_empty());
        assert_ne!(read(&mut t, register::STATUS) & status::NEEDS_RESET, 0);
        assert_ne!(read(&mut t, register::INTERRUPT_STATUS) & 2, 0);
    }

    #[test]
    fn notify_writes_reaching_the_vmm_signal_the_queue() {
        let (mut t, _, _) = transport();
        write(&mut t, register::QUEUE_NOTIFY, 1);
        write(&mut t, register::QUEUE_NOTIFY, 7);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err());
    }
}
