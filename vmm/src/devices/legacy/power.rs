//! The ACPI PM1a register blocks of a full (not hardware-reduced) ACPI
//! platform, at the I/O ports the FADT names:
//!
//! ```text
//! 0x600  PM1_STS  16 bits, write 1 to clear (PWRBTN_STS, WAK_STS, ...)
//! 0x602  PM1_EN   16 bits, read/write (PWRBTN_EN, GBL_EN, ...)
//! 0x604  PM1_CNT  16 bits: SCI_EN (reads 1), SLP_TYP, SLP_EN (write-only)
//! ```
//!
//! The SCI is a level-triggered line (GSI 9): raised while any status bit
//! is set whose enable bit is set. The host "presses" the fixed-feature
//! power button by setting PWRBTN_STS; whether an ACPI OS listens to it is
//! whether it set PWRBTN_EN (Linux's button driver does when it binds).

use super::super::BusDevice;
use crate::arch::x86_64::acpi::S5_SLEEP_TYPE;
use crate::exit::{ExitSignal, VmExit};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Bytes the three registers take (PM1_STS, PM1_EN, PM1_CNT).
pub const PM1_BLOCK_LEN: u64 = 6;

/// PM1_STS / PM1_EN bits (ACPI 6.5, 4.8.3.1).
pub const PWRBTN: u16 = 1 << 8;
pub const WAK_STS: u16 = 1 << 15;
/// PM1_CNT bits (ACPI 6.5, 4.8.3.2).
pub const SCI_EN: u16 = 1 << 0;
pub const SLP_TYP_SHIFT: u16 = 10;
pub const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
pub const SLP_EN: u16 = 1 << 13;
/// PM1_CNT bits that are stored (BM_RLD and SLP_TYP); GBL_RLS and SLP_EN
/// are write-only, SCI_EN always reads 1 (there is no legacy mode).
const CNT_STORED: u16 = (1 << 1) | SLP_TYP_MASK;

/// What snapshots and migration carry of the PM1 block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPm1 {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

/// Drives the SCI line: `true` raises it, `false` lowers it.
pub type SciLine = Box<dyn FnMut(bool) + Send>;

pub struct Pm1 {
    status: u16,
    enable: u16,
    control: u16,
    /// The level last driven on the SCI line.
    sci_level: bool,
    sci: SciLine,
    exit: Arc<ExitSignal>,
}

impl crate::persist::Persist for Pm1 {
    const ID: &'static str = "pm1";
    type State = SavedPm1;

    fn save(&self) -> SavedPm1 {
        SavedPm1 {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    /// The registers `saved` holds. The SCI line is driven by
    /// [`Pm1::drive_sci`] once KVM's interrupt controllers are restored.
    fn restore(&mut self, saved: SavedPm1) -> Result<(), String> {
        self.status = saved.status;
        self.enable = saved.enable;
        self.control = saved.control & CNT_STORED;
        Ok(())
    }
}

impl Pm1 {
    pub fn new(exit: Arc<ExitSignal>, sci: SciLine) -> Self {
        Pm1 {
            status: 0,
            enable: 0,
            control: 0,
            sci_level: false,
            sci,
            exit,
        }
    }

    /// Presses the fixed-feature power button: PWRBTN_STS, and the SCI if
    /// the guest enabled the event.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// Whether the guest listens to the power button (PWRBTN_EN is set).
    pub fn power_button_armed(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    /// Whether the SCI is asserted: an enabled event is pending.
    pub fn sci_pending(&self) -> bool {
        self.status & self.enable != 0
    }

    /// Drives the SCI line to its level whether or not it changed (after a
    /// restore, KVM's line state is not part of the saved irqchip).
    pub fn drive_sci(&mut self) {
        self.sci_level = self.sci_pending();
        (self.sci)(self.sci_level);
    }

    fn update_sci(&mut self) {
        if self.sci_pending() != self.sci_level {
            self.drive_sci();
        }
    }

    fn registers(&self) -> [u8; PM1_BLOCK_LEN as usize] {
        let mut bytes = [0; PM1_BLOCK_LEN as usize];
        bytes[0..2].copy_from_slice(&self.status.to_le_bytes());
        bytes[2..4].copy_from_slice(&self.enable.to_le_bytes());
        bytes[4..6].copy_from_slice(&(self.control | SCI_EN).to_le_bytes());
        bytes
    }

    fn write_control(&mut self, value: u16, mask: u16) {
        self.control = (self.control & !(mask & CNT_STORED)) | (value & mask & CNT_STORED);
        if value & mask & SLP_EN == 0 {
            return;
        }
        let sleep_type = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if sleep_type == u16::from(S5_SLEEP_TYPE) {
            self.exit.request(VmExit::PowerOff);
        } else {
            // Only \_S5 is offered; a guest entering another state wakes at
            // once (ACPICA waits for WAK_STS after setting SLP_EN).
            self.status |= WAK_STS;
        }
    }
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let registers = self.registers();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| registers.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Each 16-bit register gets the bytes of the write that fall in it.
        let mut values = [0u16; 3];
        let mut masks = [0u16; 3];
        for (i, &byte) in data.iter().enumerate() {
            let Some(at) = usize::try_from(offset).ok().map(|o| o + i) else {
                return;
            };
            if at >= PM1_BLOCK_LEN as usize {
                break;
            }
            let shift = 8 * (at % 2);
            values[at / 2] |= u16::from(byte) << shift;
            masks[at / 2] |= 0xff << shift;
        }
        if masks[0] != 0 {
            self.status &= !(values[0] & masks[0]);
        }
        if masks[1] != 0 {
            self.enable = (self.enable & !masks[1]) | (values[1] & masks[1]);
        }
        if masks[2] != 0 {
            self.write_control(values[2], masks[2]);
        }
        self.update_sci();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;
    use std::sync::Mutex;

    /// A PM1 block whose SCI line is recorded in the returned log.
    fn pm1() -> (Pm1, Arc<ExitSignal>, Arc<Mutex<Vec<bool>>>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let sci: SciLine = Box::new(move |level| sink.lock().unwrap().push(level));
        (Pm1::new(exit.clone(), sci), exit, log)
    }

    fn read16(pm1: &mut Pm1, offset: u64) -> u16 {
        let mut data = [0; 2];
        pm1.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn write16(pm1: &mut Pm1, offset: u64, value: u16) {
        pm1.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn status_bits_clear_when_written_with_one() {
        let (mut pm1, _, _) = pm1();
        pm1.press_power_button();
        pm1.status |= WAK_STS;
        assert_eq!(read16(&mut pm1, 0), PWRBTN | WAK_STS);
        write16(&mut pm1, 0, 0);
        assert_eq!(read16(&mut pm1, 0), PWRBTN | WAK_STS, "0 bits leave status");
        write16(&mut pm1, 0, WAK_STS);
        assert_eq!(read16(&mut pm1, 0), PWRBTN);
        // A byte write reaches only its own byte.
        pm1.write(0, &[0xff]);
        assert_eq!(read16(&mut pm1, 0), PWRBTN);
        pm1.write(1, &[(PWRBTN >> 8) as u8]);
        assert_eq!(read16(&mut pm1, 0), 0);
    }

    #[test]
    fn enable_is_read_write_and_control_reads_sci_en() {
        let (mut pm1, _, _) = pm1();
        assert_eq!(read16(&mut pm1, 2), 0);
        write16(&mut pm1, 2, PWRBTN | (1 << 5));
        assert_eq!(read16(&mut pm1, 2), PWRBTN | (1 << 5));
        assert!(pm1.power_button_armed());
        write16(&mut pm1, 2, 1 << 5);
        assert!(!pm1.power_button_armed());
        assert_eq!(read16(&mut pm1, 4) & SCI_EN, SCI_EN);
        write16(&mut pm1, 4, 3 << SLP_TYP_SHIFT);
        assert_eq!(read16(&mut pm1, 4), SCI_EN | (3 << SLP_TYP_SHIFT));
        // A 32-bit read of STS and EN together.
        let mut both = [0; 4];
        pm1.read(0, &mut both);
        assert_eq!(both, [0, 0, 1 << 5, 0]);
    }

    #[test]
    fn the_sci_follows_status_and_enable() {
        let (mut pm1, _, log) = pm1();
        pm1.press_power_button();
        assert!(!pm1.sci_pending(), "not enabled: no SCI");
        assert!(log.lock().unwrap().is_empty());
        write16(&mut pm1, 2, PWRBTN);
        assert!(pm1.sci_pending());
        assert_eq!(*log.lock().unwrap(), [true]);
        // Unrelated accesses leave the line alone.
        read16(&mut pm1, 0);
        write16(&mut pm1, 4, 0);
        assert_eq!(*log.lock().unwrap(), [true]);
        write16(&mut pm1, 0, PWRBTN);
        assert!(!pm1.sci_pending());
        assert_eq!(*log.lock().unwrap(), [true, false]);
        // Pressed while enabled: raised at once; disabling lowers it.
        pm1.press_power_button();
        write16(&mut pm1, 2, 0);
        assert_eq!(*log.lock().unwrap(), [true, false, true, false]);
    }

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let (mut pm1, exit, _) = pm1();
        write16(&mut pm1, 4, u16::from(S5_SLEEP_TYPE) << SLP_TYP_SHIFT);
        assert!(!exit.is_requested(), "SLP_TYP without SLP_EN");
        write16(&mut pm1, 4, SLP_EN);
        assert!(!exit.is_requested(), "SLP_EN with SLP_TYP 0");
        assert_ne!(
            read16(&mut pm1, 0) & WAK_STS,
            0,
            "another state wakes at once"
        );
        write16(&mut pm1, 4, (3 << SLP_TYP_SHIFT) | SLP_EN);
        assert!(!exit.is_requested());
        assert_eq!(read16(&mut pm1, 4) & SLP_EN, 0, "SLP_EN reads 0");
        write16(
            &mut pm1,
            4,
            (u16::from(S5_SLEEP_TYPE) << SLP_TYP_SHIFT) | SLP_EN,
        );
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    #[test]
    fn saved_state_round_trips() {
        let (mut pm1, _, _) = pm1();
        write16(&mut pm1, 2, PWRBTN);
        pm1.press_power_button();
        write16(&mut pm1, 4, 2 << SLP_TYP_SHIFT);
        let saved = pm1.save();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let levels = Arc::new(Mutex::new(Vec::new()));
        let sink = levels.clone();
        let mut restored = Pm1::new(
            exit.clone(),
            Box::new(move |level| sink.lock().unwrap().push(level)),
        );
        restored.restore(saved).unwrap();
        assert_eq!(restored.save(), saved);
        restored.drive_sci();
        assert_eq!(*levels.lock().unwrap(), [true]);
        // The hardware-reduced byte register of version 1 is gone.
        restored.write(0, &[(S5_SLEEP_TYPE << 2) | (1 << 5)]);
        assert!(!exit.is_requested());
    }
}
