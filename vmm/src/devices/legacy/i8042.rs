//! The i8042 keyboard controller: its reset line (Linux's `reboot=k`) and a
//! keyboard that does nothing but press Ctrl-Alt-Del when the host asks the
//! guest to shut down (as Firecracker's SendCtrlAltDel does). A Linux kernel
//! reboots on it by itself; an init system turns it into an orderly
//! shutdown. The VM ends on the guest's reset either way.
//!
//! Enough of the controller and keyboard protocol is answered for Linux's
//! i8042 and atkbd drivers to find a keyboard quickly: the controller
//! self-test, the command byte, the keyboard's ACKs and ID. There is no
//! auxiliary (mouse) port.

use super::super::BusDevice;
use crate::exit::{ExitSignal, VmExit};
use std::collections::VecDeque;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Always set: the keyboard is not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KEYBOARD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KEYBOARD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
/// The controller translates the keyboard's set 2 codes into set 1.
const CTR_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
/// An AUX port test result meaning "clock line stuck": no mouse port.
const AUX_TEST_FAILED: u8 = 0x01;

const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
/// An MF2 keyboard, as set 2 and as translated to set 1.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];

/// Ctrl, Alt, Delete pressed and released, in scan code set 1 (what the
/// guest reads with translation on) and set 2.
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// The offsets of the data (0x60) and status/command (0x64) ports.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// What a snapshot or migration keeps of the controller.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedI8042 {
    pub ctr: u8,
    pub status: u8,
    /// Bytes the guest has not read yet (at most a few dozen).
    pub output: Vec<u8>,
    pub controller_argument: Option<u8>,
    pub keyboard_argument: Option<u8>,
}

/// More than the controller ever queues; a longer saved buffer is hostile.
const MAX_SAVED_OUTPUT: usize = 64;

pub struct I8042 {
    exit: Arc<ExitSignal>,
    /// IRQ 1, raised for each byte the keyboard puts in the output buffer.
    irq: EventFd,
    ctr: u8,
    status: u8,
    output: VecDeque<u8>,
    /// A controller command waiting for its data byte.
    controller_argument: Option<u8>,
    /// A keyboard command waiting for its argument.
    keyboard_argument: Option<u8>,
}

impl crate::persist::Persist for I8042 {
    const ID: &'static str = "i8042";
    type State = SavedI8042;

    fn save(&self) -> SavedI8042 {
        SavedI8042 {
            ctr: self.ctr,
            status: self.status,
            output: self.output.iter().copied().collect(),
            controller_argument: self.controller_argument,
            keyboard_argument: self.keyboard_argument,
        }
    }

    /// The `saved` state, checked as hostile input.
    fn restore(&mut self, saved: SavedI8042) -> Result<(), String> {
        if saved.output.len() > MAX_SAVED_OUTPUT {
            return Err(format!(
                "the i8042 state holds {} output bytes, at most {MAX_SAVED_OUTPUT} fit",
                saved.output.len()
            ));
        }
        self.ctr = saved.ctr;
        // The status bits the controller derives are derived again.
        self.status = (saved.status & !STATUS_OUTPUT_FULL) | STATUS_UNLOCKED;
        self.output = saved.output.into_iter().collect();
        self.controller_argument = saved.controller_argument;
        self.keyboard_argument = saved.keyboard_argument;
        Ok(())
    }
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>, irq: EventFd) -> Self {
        I8042 {
            exit,
            irq,
            ctr: CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_TRANSLATE | CTR_AUX_DISABLED,
            status: STATUS_SYSTEM_FLAG | STATUS_UNLOCKED,
            output: VecDeque::new(),
            controller_argument: None,
            keyboard_argument: None,
        }
    }

    /// Types Ctrl-Alt-Del: the host's request that the guest shut down.
    pub fn press_ctrl_alt_del(&mut self) {
        let codes = if self.ctr & CTR_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.output.extend(codes);
        self.raise_keyboard_interrupt();
    }

    /// A byte from the controller itself (answers to commands): no interrupt.
    fn controller_reply(&mut self, byte: u8) {
        self.output.push_back(byte);
    }

    /// A byte from the keyboard: an interrupt when the guest enabled them.
    fn keyboard_reply(&mut self, bytes: &[u8]) {
        self.output.extend(bytes);
        self.raise_keyboard_interrupt();
    }

    fn raise_keyboard_interrupt(&self) {
        if self.ctr & CTR_KEYBOARD_INTERRUPT != 0 && !self.output.is_empty() {
            let _ = self.irq.write(1);
        }
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        self.controller_argument = None;
        match command {
            CMD_READ_CTR => self.controller_reply(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KEYBOARD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.controller_argument = Some(command),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_TEST_AUX => self.controller_reply(AUX_TEST_FAILED),
            CMD_SELF_TEST => {
                self.status |= STATUS_SYSTEM_FLAG;
                self.controller_reply(SELF_TEST_PASSED);
            }
            CMD_TEST_KEYBOARD => self.controller_reply(0),
            CMD_DISABLE_KEYBOARD => self.ctr |= CTR_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.ctr &= !CTR_KEYBOARD_DISABLED,
            // Bit 0 is the CPU reset line (kept high), bit 1 the A20 gate.
            CMD_READ_OUTPUT_PORT => self.controller_reply(0x03),
            CMD_PULSE_RESET => self.exit.request(VmExit::Reset),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.controller_argument.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = byte;
                self.raise_keyboard_interrupt();
            }
            Some(CMD_WRITE_OUTPUT_PORT) if byte & 0x01 == 0 => self.exit.request(VmExit::Reset),
            Some(CMD_WRITE_OUTPUT_PORT) => {}
            Some(CMD_WRITE_KEYBOARD_OUTPUT) => self.keyboard_reply(&[byte]),
            // The loop-back comes back without the AUX flag: Linux decides at
            // once that there is no mouse port instead of waiting it out.
            Some(CMD_WRITE_AUX_OUTPUT) => self.controller_reply(byte),
            // No auxiliary device: its bytes go nowhere.
            Some(_) => {}
            None => self.keyboard_command(byte),
        }
    }

    /// A byte written to the keyboard itself.
    fn keyboard_command(&mut self, byte: u8) {
        if self.keyboard_argument.take().is_some() {
            // The argument of SET_LEDS, SET_TYPEMATIC or SCANCODE_SET.
            self.keyboard_reply(&[KBD_ACK]);
            return;
        }
        match byte {
            KBD_SET_LEDS | KBD_SET_TYPEMATIC | KBD_SCANCODE_SET => {
                self.keyboard_argument = Some(byte);
                self.keyboard_reply(&[KBD_ACK]);
            }
            KBD_ECHO => self.keyboard_reply(&[KBD_ECHO]),
            KBD_GET_ID => {
                let id = if self.ctr & CTR_TRANSLATE != 0 {
                    KBD_ID_TRANSLATED
                } else {
                    KBD_ID
                };
                self.keyboard_reply(&[KBD_ACK, id[0], id[1]]);
            }
            KBD_RESET => self.keyboard_reply(&[KBD_ACK, KBD_SELF_TEST_PASSED]),
            // Enable, disable, defaults, typematic modes: acknowledged.
            _ => self.keyboard_reply(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                let byte = self.output.pop_front().unwrap_or(0);
                // Each byte the keyboard sends gets its own edge.
                self.raise_keyboard_interrupt();
                byte
            }
            COMMAND => {
                let full = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                self.status | full
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(byte) = data.first_mut() {
            *byte = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    fn device() -> (I8042, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(exit.clone(), irq), exit)
    }

    fn read(device: &mut I8042, offset: u64) -> u8 {
        let mut byte = [0u8];
        device.read(offset, &mut byte);
        byte[0]
    }

    /// Reads everything in the output buffer, as a driver does.
    fn drain(device: &mut I8042) -> Vec<u8> {
        let mut bytes = Vec::new();
        while read(device, COMMAND) & STATUS_OUTPUT_FULL != 0 {
            bytes.push(read(device, DATA));
        }
        bytes
    }

    #[test]
    fn a_saved_controller_comes_back_as_it_was() {
        let (mut i8042, _) = device();
        // The guest turns translation off and has a command half-written.
        i8042.write(COMMAND, &[CMD_WRITE_CTR]);
        i8042.write(DATA, &[CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM_FLAG]);
        i8042.write(COMMAND, &[CMD_READ_CTR]);
        i8042.write(COMMAND, &[CMD_WRITE_CTR]);
        let saved = i8042.save();
        let (mut restored, _) = device();
        restored.restore(saved.clone()).unwrap();
        assert_eq!(restored.save(), saved);
        // The unread reply is still there, the pending command still waits.
        assert_eq!(
            drain(&mut restored),
            [CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM_FLAG]
        );
        restored.write(DATA, &[CTR_TRANSLATE]);
        restored.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut restored), [CTR_TRANSLATE]);
        // Without translation, Ctrl-Alt-Del comes in set 2, as before the save.
        let (mut fresh, _) = device();
        fresh
            .restore(SavedI8042 {
                ctr: CTR_KEYBOARD_INTERRUPT,
                ..saved.clone()
            })
            .unwrap();
        drain(&mut fresh);
        fresh.press_ctrl_alt_del();
        assert_eq!(drain(&mut fresh), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn a_saved_output_buffer_longer_than_the_controller_keeps_is_refused() {
        let (i8042, _) = device();
        let mut saved = i8042.save();
        saved.output = vec![0; MAX_SAVED_OUTPUT + 1];
        let (mut restored, _) = device();
        let error = restored.restore(saved).unwrap_err();
        assert!(error.contains("output bytes"), "{error}");
    }

    #[test]
    fn linux_probe_sequence_is_answered() {
        let (mut i8042, _) = device();
        assert!(drain(&mut i8042).is_empty());
        i8042.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut i8042), [SELF_TEST_PASSED]);
        i8042.write(COMMAND, &[CMD_READ_CTR]);
        let ctr = drain(&mut i8042)[0];
        assert_ne!(ctr & CTR_TRANSLATE, 0);
        i8042.write(COMMAND, &[CMD_WRITE_CTR]);
        i8042.write(DATA, &[ctr & !CTR_KEYBOARD_INTERRUPT]);
        i8042.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut i8042), [ctr & !CTR_KEYBOARD_INTERRUPT]);
        // No mouse port: the loop-back is not marked AUX, the port test fails.
        i8042.write(COMMAND, &[CMD_WRITE_AUX_OUTPUT]);
        i8042.write(DATA, &[0x5a]);
        assert_eq!(read(&mut i8042, COMMAND) & 0x20, 0);
        assert_eq!(drain(&mut i8042), [0x5a]);
        i8042.write(COMMAND, &[CMD_TEST_AUX]);
        assert_eq!(drain(&mut i8042), [AUX_TEST_FAILED]);
        // The keyboard: its ID (translated), LEDs with their argument, enable.
        i8042.write(DATA, &[KBD_GET_ID]);
        assert_eq!(drain(&mut i8042), [KBD_ACK, 0xab, 0x41]);
        i8042.write(DATA, &[KBD_SET_LEDS]);
        i8042.write(DATA, &[0]);
        assert_eq!(drain(&mut i8042), [KBD_ACK, KBD_ACK]);
        i8042.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut i8042), [KBD_ACK, KBD_SELF_TEST_PASSED]);
    }

    #[test]
    fn ctrl_alt_del_is_typed_in_the_set_the_guest_reads() {
        let (mut i8042, _) = device();
        i8042.press_ctrl_alt_del();
        assert_eq!(drain(&mut i8042), CTRL_ALT_DEL_SET1);
        i8042.write(COMMAND, &[CMD_WRITE_CTR]);
        i8042.write(DATA, &[CTR_KEYBOARD_INTERRUPT]);
        i8042.press_ctrl_alt_del();
        assert_eq!(drain(&mut i8042), CTRL_ALT_DEL_SET2);
        // Each byte raised an interrupt.
        assert!(i8042.irq.read().unwrap() > 0);
    }

    #[test]
    fn the_reset_line_resets_the_vm() {
        let (mut i8042, exit) = device();
        i8042.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        i8042.write(DATA, &[0x03]);
        assert!(!exit.is_requested());
        i8042.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
