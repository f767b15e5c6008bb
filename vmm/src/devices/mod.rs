//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod event_loop;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start of
/// the range the device was registered at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {start:#x}+{len:#x} overlaps an existing device")]
    Overlap { start: u64, len: u64 },
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

struct Range {
    start: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space of non-overlapping device ranges, sorted by start.
/// Devices are registered before the vCPUs start, so lookups need no lock.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn insert(
        &mut self,
        start: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(start));
        }
        let end = start
            .checked_add(len)
            .ok_or(BusError::Overlap { start, len })?;
        if self
            .ranges
            .iter()
            .any(|r| start < r.start + r.len && r.start < end)
        {
            return Err(BusError::Overlap { start, len });
        }
        let at = self.ranges.partition_point(|r| r.start < start);
        self.ranges.insert(at, Range { start, len, device });
        Ok(())
    }

    fn find(&self, address: u64, size: usize) -> Option<(&Range, u64)> {
        let index = self
            .ranges
            .partition_point(|r| r.start <= address)
            .checked_sub(1)?;
        let range = &self.ranges[index];
        let offset = address - range.start;
        (offset + size as u64 <= range.len).then_some((range, offset))
    }

    /// Reads from the device at `address`; returns false (and leaves `data`
    /// all ones, like an unclaimed bus) when nothing is there.
    pub fn read(&self, address: u64, data: &mut [u8]) -> bool {
        match self.find(address, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `address`; returns false when nothing is there.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: a device's
/// state is plain data, and one failed access must not take the VM down.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let a = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .unwrap();
        assert_eq!(
            bus.insert(0x3fc, 8, a.clone()),
            Err(BusError::Overlap {
                start: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(0x3f0, 9, a.clone()),
            Err(BusError::Overlap {
                start: 0x3f0,
                len: 9
            })
        );
        assert_eq!(bus.insert(0x10, 0, a.clone()), Err(BusError::Empty(0x10)));
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![(3, vec![7])]);
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fe, &mut data));
        assert_eq!(data, [6, 6]);
        // Accesses that run past the end of a range, or hit nothing, are unclaimed.
        assert!(!bus.read(0x3ff, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(u64::MAX, &[1]));
    }
}
