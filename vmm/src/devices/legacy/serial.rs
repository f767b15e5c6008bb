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

/// The UART's registers and pending input (vm-superio's `SerialState`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedSerial {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl crate::persist::Persist for SerialPort {
    const ID: &'static str = "serial";
    type State = SavedSerial;

    fn save(&self) -> SavedSerial {
        let s = self.0.state();
        SavedSerial {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The registers and pending input `saved` holds; the interrupt line
    /// and the output stay this port's.
    fn restore(&mut self, saved: SavedSerial) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer,
        };
        let irq = self
            .0
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial port interrupt: {e}"))?;
        let placeholder: SerialOutput = Box::new(std::io::sink());
        let mut restored = Serial::from_state(
            &state,
            IrqFdTrigger(irq),
            vm_superio::serial::NoEvents,
            placeholder,
        )
        .map_err(|e| format!("serial port state: {e:?}"))?;
        std::mem::swap(restored.writer_mut(), self.0.writer_mut());
        self.0 = restored;
        Ok(())
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
