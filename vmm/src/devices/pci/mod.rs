//! A minimal PCI root: configuration mechanism #1 (ports 0xcf8/0xcfc) on bus 0,
//! and routing of accesses in the PCI MMIO window to device BARs.

pub mod pvpanic;

use super::{lock, BusDevice};
use std::sync::{Arc, Mutex};

pub const CONFIG_SPACE_SIZE: usize = 256;
const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const INTERRUPT_LINE: usize = 0x3c;
const ENABLE_BIT: u32 = 1 << 31;

/// A PCI function with a type-0 header and at most one 32-bit memory BAR.
pub trait PciFunction: Send {
    /// The 256-byte configuration space (read as the guest sees it).
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// A configuration space with per-byte write masks and one sizeable BAR.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bar0_size: u32,
}

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bar0_size: 0,
        };
        space.bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        space.bytes[2..4].copy_from_slice(&device.to_le_bytes());
        space.bytes[8] = revision;
        space.bytes[9..12].copy_from_slice(&class.to_le_bytes()[..3]);
        space.bytes[0x2c..0x2e].copy_from_slice(&vendor.to_le_bytes()); // subsystem vendor
        space.bytes[0x2e..0x30].copy_from_slice(&device.to_le_bytes());
        // I/O space, memory space and bus master enables are the guest's to set.
        space.writable[COMMAND] = 0x07;
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// Gives the function a 32-bit memory BAR of `size` bytes (a power of two,
    /// at least 16) placed at `address`.
    pub fn with_memory_bar(mut self, address: u32, size: u32) -> Self {
        debug_assert!(size.is_power_of_two() && size >= 16);
        self.bar0_size = size;
        self.bytes[BAR0..BAR0 + 4].copy_from_slice(&address.to_le_bytes());
        self
    }

    pub fn bar0(&self) -> Option<(u64, u64)> {
        (self.bar0_size != 0).then(|| {
            (
                u64::from(self.read_u32(BAR0) & !0xf),
                u64::from(self.bar0_size),
            )
        })
    }

    pub fn read_u32(&self, register: usize) -> u32 {
        let r = register & 0xfc;
        u32::from_le_bytes(self.bytes[r..r + 4].try_into().expect("4 bytes"))
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        if (BAR0..BAR0 + 4).contains(&offset) && self.bar0_size != 0 {
            // BAR sizing: the low bits below the size read back as zero.
            let mut value = self.read_u32(BAR0).to_le_bytes();
            let start = offset - BAR0;
            for (i, byte) in data.iter().enumerate().take(4 - start) {
                value[start + i] = *byte;
            }
            let address = u32::from_le_bytes(value) & !(self.bar0_size - 1);
            self.bytes[BAR0..BAR0 + 4].copy_from_slice(&address.to_le_bytes());
            return;
        }
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SPACE_SIZE {
                let mask = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
            }
        }
    }

    fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }
}

/// Bus 0 with up to 32 single-function devices.
#[derive(Default)]
pub struct PciRoot {
    slots: Vec<(u8, Box<dyn PciFunction>)>,
    config_address: u32,
}

/// What the guest wrote into the PCI root: its address latch and every
/// function's configuration space (BARs it placed, command bits).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    pub config_address: u32,
    pub functions: Vec<(u8, Vec<u8>)>,
}

impl crate::persist::Persist for PciRoot {
    const ID: &'static str = "pci";
    type State = PciState;

    fn save(&self) -> PciState {
        PciState {
            config_address: self.config_address,
            functions: self
                .slots
                .iter()
                .map(|(slot, f)| (*slot, f.config().bytes.to_vec()))
                .collect(),
        }
    }

    fn restore(&mut self, state: PciState) -> Result<(), String> {
        for (slot, bytes) in &state.functions {
            let function = self
                .slots
                .iter_mut()
                .find(|(s, _)| s == slot)
                .map(|(_, f)| f)
                .ok_or_else(|| format!("PCI slot {slot} is in the snapshot, not in this VM"))?;
            let config = function.config_mut();
            if bytes.len() != CONFIG_SPACE_SIZE || bytes[..4] != config.bytes[..4] {
                return Err(format!(
                    "PCI slot {slot}: a different device in the snapshot"
                ));
            }
            config.bytes.copy_from_slice(bytes);
        }
        self.config_address = state.config_address;
        Ok(())
    }
}

impl PciRoot {
    pub fn add(&mut self, slot: u8, function: Box<dyn PciFunction>) {
        self.slots.push((slot, function));
    }

    fn selected(&mut self) -> Option<(&mut (dyn PciFunction + 'static), usize)> {
        let address = self.config_address;
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as u8;
        let function = (address >> 8) & 0x7;
        if address & ENABLE_BIT == 0 || bus != 0 || function != 0 {
            return None;
        }
        let register = (address & 0xfc) as usize;
        self.slots
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .map(|(_, f)| (f.as_mut(), register))
    }

    fn config_io_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.config_address.to_le_bytes();
                let start = offset as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(start + i).copied().unwrap_or(0xff);
                }
            }
            _ => match self.selected() {
                Some((function, register)) => function
                    .config()
                    .read(register + (offset as usize - 4), data),
                None => data.fill(0xff),
            },
        }
    }

    fn config_io_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0..=3 => {
                let mut bytes = self.config_address.to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(offset as usize + i) {
                        *slot = *b;
                    }
                }
                self.config_address = u32::from_le_bytes(bytes);
            }
            _ => {
                if let Some((function, register)) = self.selected() {
                    function
                        .config_mut()
                        .write(register + (offset as usize - 4), data);
                }
            }
        }
    }

    fn mmio(&mut self, address: u64) -> Option<(&mut (dyn PciFunction + 'static), u64)> {
        self.slots.iter_mut().find_map(|(_, f)| {
            let (base, size) = f.config().bar0()?;
            (base != 0 && (base..base + size).contains(&address))
                .then_some((f.as_mut(), address - base))
        })
    }
}

/// The root's face on the port bus (0xcf8..0xd00).
pub struct PciConfigPorts(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).config_io_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).config_io_write(offset, data);
    }
}

/// The root's face on the MMIO bus: the whole PCI window, routed to BARs.
pub struct PciMmioWindow {
    pub root: Arc<Mutex<PciRoot>>,
    pub window_start: u64,
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = lock(&self.root);
        match root.mmio(self.window_start + offset) {
            Some((function, bar_offset)) => function.bar_read(bar_offset, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.root);
        if let Some((function, bar_offset)) = root.mmio(self.window_start + offset) {
            function.bar_write(bar_offset, data);
        }
    }
}

/// The host bridge at 00:00.0, which Linux's conf1 sanity check looks for.
pub struct HostBridge(ConfigSpace);

impl HostBridge {
    pub fn new() -> Self {
        // Red Hat's generic PCIe host bridge ID; class 06.00.00 (host bridge).
        HostBridge(ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_read32(root: &mut PciRoot, slot: u8, register: u32) -> u32 {
        root.config_io_write(
            0,
            &(ENABLE_BIT | (u32::from(slot) << 11) | register).to_le_bytes(),
        );
        let mut data = [0u8; 4];
        root.config_io_read(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn config_write32(root: &mut PciRoot, slot: u8, register: u32, value: u32) {
        root.config_io_write(
            0,
            &(ENABLE_BIT | (u32::from(slot) << 11) | register).to_le_bytes(),
        );
        root.config_io_write(4, &value.to_le_bytes());
    }

    #[test]
    fn enumerates_devices_and_sizes_bars() {
        let mut root = PciRoot::default();
        root.add(0, Box::new(HostBridge::new()));
        root.add(
            1,
            Box::new(pvpanic::PvPanic::new(
                0xc000_0000,
                std::sync::Arc::new(crate::exit::ExitSignal::new().unwrap()),
            )),
        );
        assert_eq!(config_read32(&mut root, 0, 0), 0x0008_1b36);
        assert_eq!(config_read32(&mut root, 1, 0), 0x0011_1b36);
        assert_eq!(config_read32(&mut root, 2, 0), 0xffff_ffff, "empty slot");
        assert_eq!(config_read32(&mut root, 0, 8) >> 8, 0x06_00_00);
        // BAR sizing protocol.
        assert_eq!(config_read32(&mut root, 1, 0x10), 0xc000_0000);
        config_write32(&mut root, 1, 0x10, 0xffff_ffff);
        assert_eq!(config_read32(&mut root, 1, 0x10), !(pvpanic::BAR_SIZE - 1));
        config_write32(&mut root, 1, 0x10, 0xc000_1000);
        assert_eq!(config_read32(&mut root, 1, 0x10), 0xc000_1000);
        // Read-only fields ignore writes.
        config_write32(&mut root, 1, 0, 0xdead_beef);
        assert_eq!(config_read32(&mut root, 1, 0), 0x0011_1b36);
        // Config address reads back; disabled addresses read all ones.
        root.config_io_write(0, &0x0000_0800u32.to_le_bytes());
        let mut data = [0u8; 4];
        root.config_io_read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x800);
        root.config_io_read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
