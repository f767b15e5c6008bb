//! The device thread: one epoll loop (rust-vmm's `event-manager`) that serves
//! every device's queue notifications, backend descriptors and timers, so
//! vCPU threads only ever touch device registers.

use crate::exit::ExitSignal;
use crate::pause::PauseGate;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the loop when the VM's exit is requested: the exit eventfd is left
/// unread so others waiting on it still see it.
struct StopWatch {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            tracing::error!("device loop cannot watch the exit signal: {e:?}");
        }
    }

    fn process(&mut self, _: Events, ops: &mut EventOps) {
        // Level-triggered and never read: stop watching, the loop ends.
        let _ = ops.remove(Events::new(self.exit.event(), EventSet::IN));
    }
}

/// Parks the device thread while the VM is paused: the host writes `kick`
/// after asking for a pause, and this subscriber blocks the loop in the gate.
struct PauseWatch {
    kick: EventFd,
    gate: Arc<PauseGate>,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for PauseWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            tracing::error!("device loop cannot watch for pauses: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.kick.read();
        if self.gate.is_requested() {
            self.gate.park(&self.exit, || {});
        }
    }
}

pub struct DeviceEventLoop {
    manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
}

impl DeviceEventLoop {
    pub fn new(exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("epoll: {e:?}")))?;
        manager.add_subscriber(Arc::new(Mutex::new(StopWatch { exit: exit.clone() })));
        Ok(DeviceEventLoop { manager, exit })
    }

    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Makes the loop park in `gate` when the returned eventfd is written
    /// while a pause is requested.
    pub fn watch_pauses(&mut self, gate: Arc<PauseGate>) -> std::io::Result<EventFd> {
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        self.add(Arc::new(Mutex::new(PauseWatch {
            kick: kick.try_clone()?,
            gate,
            exit: self.exit.clone(),
        })));
        Ok(kick)
    }

    /// Runs the loop on its own thread until the VM's exit is requested.
    pub fn spawn(mut self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !self.exit.is_requested() {
                    if let Err(e) = self.manager.run() {
                        tracing::error!("device event loop: {e:?}");
                        break;
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    struct Counter {
        event: EventFd,
        seen: Arc<Mutex<u64>>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            *self.seen.lock().unwrap() += self.event.read().unwrap();
        }
    }

    #[test]
    fn serves_events_until_the_vm_exits() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut event_loop = DeviceEventLoop::new(exit.clone()).unwrap();
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        event_loop.add(Arc::new(Mutex::new(Counter {
            event: event.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let thread = event_loop.spawn().unwrap();
        event.write(3).unwrap();
        while *seen.lock().unwrap() != 3 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        exit.request(VmExit::Stopped);
        thread.join().unwrap();
        // The exit event is still readable for anyone else waiting on it.
        assert_eq!(exit.event().read().unwrap(), 1);
    }
}
