//! The COM1 16550 UART (vm-superio), interrupting through an irqfd.

use super::super::BusDevice;
use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt line by signalling an eventfd registered as an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialPort(pub Serial<IrqFdTrigger, vm_superio::serial::NoEvents, SerialOutput>);

impl SerialPort {
    pub fn new(irq: EventFd, output: SerialOutput) -> Self {
        SerialPort(Serial::new(IrqFdTrigger(irq), output))
    }

    /// Queues host input for the guest; returns how many bytes fit the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.0.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn input_room(&self) -> usize {
        self.0.fifo_capacity()
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(byte) = data.first_mut() {
            *byte = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&byte) = data.first() {
            // An output error (closed terminal) must not stop the guest.
            let _ = self.0.write(offset as u8, byte);
        }
    }
}
