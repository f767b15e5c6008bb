//! pvpanic as a PCI function (1b36:0011): the guest kernel writes to BAR0 when
//! it panics, which ends the VM with a non-zero status.

use super::{ConfigSpace, PciFunction};
use crate::exit::{ExitSignal, VmExit};
use std::sync::Arc;

const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;
pub const BAR_SIZE: u32 = 0x1000;

pub struct PvPanic {
    config: ConfigSpace,
    exit: Arc<ExitSignal>,
}

impl PvPanic {
    pub fn new(bar_address: u32, exit: Arc<ExitSignal>) -> Self {
        // Class 08.80.00: other system peripheral, as QEMU's pvpanic-pci.
        let config =
            ConfigSpace::new(0x1b36, 0x0011, 0x08_80_00, 1).with_memory_bar(bar_address, BAR_SIZE);
        PvPanic { config, exit }
    }
}

impl PciFunction for PvPanic {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = PANICKED | CRASH_LOADED;
            }
        }
    }
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&events)) if events & PANICKED != 0 => self.exit.request(VmExit::GuestPanic),
            (0, Some(&events)) if events & CRASH_LOADED != 0 => {
                tracing::warn!("guest reports a crash kernel was loaded after a panic")
            }
            _ => {}
        }
    }
}
