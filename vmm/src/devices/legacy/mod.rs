//! The PC platform devices every guest expects.

pub mod post;
pub mod power;
pub mod reset;
pub mod serial;
