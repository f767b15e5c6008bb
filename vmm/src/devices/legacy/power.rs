//! ACPI PM1a control register: the guest powers off by writing SLP_EN.

use super::super::BusDevice;
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
