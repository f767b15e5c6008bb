//! Power-off: the ACPI PM1a control register (SLP_EN), and the hardware-reduced
//! ACPI sleep control register the FADT names (SLP_EN with the S5 sleep type).

use super::super::BusDevice;
use crate::arch::x86_64::acpi::{S5_SLEEP_TYPE, SLEEP_ENABLE, SLEEP_TYPE_SHIFT};
use crate::arch::x86_64::layout::PM1_SLP_EN;
use crate::exit::{ExitSignal, VmExit};
use std::sync::Arc;

pub struct PowerControl(pub Arc<ExitSignal>);

impl BusDevice for PowerControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut value = [0u8; 2];
        let n = data.len().min(2);
        value[..n].copy_from_slice(&data[..n]);
        if offset == 0 && u16::from_le_bytes(value) & PM1_SLP_EN != 0 {
            self.0.request(VmExit::PowerOff);
        }
    }
}

pub struct AcpiSleepControl(pub Arc<ExitSignal>);

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = data.first().copied().unwrap_or(0);
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & 0x7;
        if value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE {
            self.0.request(VmExit::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_sleep_enable_powers_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut control = AcpiSleepControl(exit.clone());
        control.write(0, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        control.write(0, &[(3 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]);
        assert!(!exit.is_requested());
        control.write(0, &[(S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]);
        assert!(exit.is_requested());
    }
}
