//! The PC platform devices every guest expects.

pub mod cmos;
pub mod post;
pub mod power;
pub mod reset;
pub mod serial;
