//! The i8042 keyboard controller, kept for its reset line (Linux's `reboot=k`).

use super::super::BusDevice;
use crate::exit::{ExitSignal, VmExit};
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// Turns the controller's CPU-reset pulse into a VM reset request.
pub struct ResetLine(pub Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

pub struct I8042(pub I8042Device<ResetLine>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(byte) = data.first_mut() {
            *byte = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&byte) = data.first() {
            let _ = self.0.write(offset as u8, byte);
        }
    }
}
