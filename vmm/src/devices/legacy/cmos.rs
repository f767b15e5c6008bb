//! The MC146818 CMOS real-time clock at ports 0x70/0x71: Linux reads the wall
//! clock from it at boot, and polls its "update in progress" bit, so an
//! unclaimed port (which reads 0xff, UIP set) would stall it.

use super::super::BusDevice;
use std::time::{SystemTime, UNIX_EPOCH};

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Divider 32.768 kHz, 1024 Hz rate; update-in-progress clear.
const STATUS_A_DEFAULT: u8 = 0x26;
/// 24-hour mode, BCD values.
const STATUS_B_DEFAULT: u8 = 0x02;
/// Battery good: the time is valid.
const STATUS_D_VALID: u8 = 0x80;

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(unix_seconds)
    }
}

fn bcd(value: u64) -> u8 {
    (((value / 10) % 10) << 4 | (value % 10)) as u8
}

/// Converts days since 1970-01-01 to (year, month, day) in the Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The index latch and the NVRAM bytes (the clock is the host's).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedCmos {
    pub index: u8,
    pub nvram: Vec<u8>,
}

impl crate::persist::Persist for Cmos {
    const ID: &'static str = "cmos";
    type State = SavedCmos;

    fn save(&self) -> SavedCmos {
        SavedCmos {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    fn restore(&mut self, saved: SavedCmos) -> Result<(), String> {
        self.nvram = saved.nvram[..]
            .try_into()
            .map_err(|_| format!("{} NVRAM bytes saved, 128 expected", saved.nvram.len()))?;
        self.index = saved.index;
        Ok(())
    }
}

impl Cmos {
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(STATUS_A)] = STATUS_A_DEFAULT;
        nvram[usize::from(STATUS_B)] = STATUS_B_DEFAULT;
        nvram[usize::from(STATUS_D)] = STATUS_D_VALID;
        Cmos {
            index: 0,
            nvram,
            now,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let seconds = (self.now)();
        let days = (seconds / 86_400) as i64;
        let (year, month, day) = civil_from_days(days);
        let time_of_day = seconds % 86_400;
        match index {
            SECONDS => bcd(time_of_day % 60),
            MINUTES => bcd(time_of_day / 60 % 60),
            HOURS => bcd(time_of_day / 3600),
            WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday
            DAY => bcd(day),
            MONTH => bcd(month),
            YEAR => bcd(year as u64 % 100),
            CENTURY => bcd(year as u64 / 100),
            STATUS_C => 0, // no interrupt flags
            other => self.nvram[usize::from(other & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; ignored here.
            0 => self.index = value & 0x7f,
            1 => match self.index {
                // The clock follows the host; writes to the time are dropped.
                SECONDS..=YEAR | CENTURY | STATUS_C | STATUS_D => {}
                index => self.nvram[usize::from(index)] = value,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut data = [0];
        cmos.read(1, &mut data);
        data[0]
    }

    #[test]
    fn reports_the_date_in_bcd() {
        // 2026-11-23 03:35:27 UTC, a Monday.
        let mut cmos = Cmos::with_clock(|| 1_795_404_927);
        assert_eq!(read(&mut cmos, SECONDS), 0x27);
        assert_eq!(read(&mut cmos, MINUTES), 0x35);
        assert_eq!(read(&mut cmos, HOURS), 0x03);
        assert_eq!(read(&mut cmos, DAY), 0x23);
        assert_eq!(read(&mut cmos, MONTH), 0x11);
        assert_eq!(read(&mut cmos, YEAR), 0x26);
        assert_eq!(read(&mut cmos, CENTURY), 0x20);
        assert_eq!(read(&mut cmos, WEEKDAY), 0x02);
        assert_eq!(
            read(&mut cmos, STATUS_A) & 0x80,
            0,
            "update in progress must read clear"
        );
        assert_eq!(read(&mut cmos, STATUS_D), STATUS_D_VALID);
    }

    #[test]
    fn leap_days_and_nvram() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let mut cmos = Cmos::default();
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        assert_eq!(read(&mut cmos, 0x40), 0x5a);
        cmos.write(0, &[SECONDS | 0x80]);
        cmos.write(1, &[0x99]);
        assert_ne!(read(&mut cmos, SECONDS), 0x99);
    }
}
