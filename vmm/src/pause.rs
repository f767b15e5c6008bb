//! Stopping a running VM's threads at a consistent point and starting them again.
//!
//! The host asks for a pause; each vCPU thread and the device thread notices
//! it at the top of its loop (vCPUs are knocked out of KVM_RUN by a signal,
//! the device thread by an eventfd), finishes what it was doing, and parks.
//! Once all have parked nothing touches guest memory or device state, so the
//! host can read both. Resuming releases them.

use crate::exit::ExitSignal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// Counts `wake_parked` calls, so a parked thread never misses one.
    wakes: u64,
}

/// The meeting point of the threads a pause must stop.
#[derive(Default)]
pub struct PauseGate {
    /// Read on every loop turn, so kept outside the lock.
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

/// How often a parked thread looks at the VM's exit signal.
const PARKED_EXIT_CHECK: Duration = Duration::from_millis(50);

impl PauseGate {
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks every thread to park; see [`PauseGate::wait_parked`].
    pub fn request(&self) {
        let mut state = crate::devices::lock(&self.state);
        state.paused = true;
        self.requested.store(true, Ordering::Release);
    }

    /// Waits until `count` threads have parked or `timeout` passes; true when
    /// they have.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = crate::devices::lock(&self.state);
        while state.parked < count {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Lets parked threads go on.
    pub fn release(&self) {
        let mut state = crate::devices::lock(&self.state);
        state.paused = false;
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wakes parked threads without releasing them, so they run their
    /// `while_parked` work again (handing over their state).
    pub fn wake_parked(&self) {
        let mut state = crate::devices::lock(&self.state);
        state.wakes += 1;
        self.changed.notify_all();
    }

    /// Called by a thread that saw [`PauseGate::is_requested`]: blocks until
    /// the pause is released or the VM is asked to exit, running
    /// `while_parked` once on parking and again after each `wake_parked`.
    pub fn park(&self, exit: &ExitSignal, mut while_parked: impl FnMut()) {
        let mut state = crate::devices::lock(&self.state);
        state.parked += 1;
        self.changed.notify_all();
        let mut served = None;
        while state.paused && !exit.is_requested() {
            if served != Some(state.wakes) {
                // A wake that comes while the work runs is seen on the next turn.
                served = Some(state.wakes);
                drop(state);
                while_parked();
                state = crate::devices::lock(&self.state);
                continue;
            }
            state = match self.changed.wait_timeout(state, PARKED_EXIT_CHECK) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.parked -= 1;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_park_until_released() {
        let gate = Arc::new(PauseGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let steps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (gate, exit, steps) = (gate.clone(), exit.clone(), steps.clone());
                std::thread::spawn(move || {
                    while !exit.is_requested() {
                        if gate.is_requested() {
                            gate.park(&exit, || {});
                        }
                        steps.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        gate.request();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        let frozen = steps.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(steps.load(Ordering::Relaxed), frozen, "a parked thread ran");
        gate.release();
        while steps.load(Ordering::Relaxed) == frozen {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A pause nobody answers times out rather than hanging.
        assert!(!PauseGate::default().wait_parked(1, Duration::from_millis(10)));
        // Exiting wakes parked threads.
        gate.request();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        exit.request(crate::exit::VmExit::Stopped);
        for worker in workers {
            worker.join().unwrap();
        }
    }
}
