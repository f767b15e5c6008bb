//! The PC platform devices every guest expects.

pub mod cmos;
pub mod i8042;
pub mod post;
pub mod power;
pub mod serial;
