//! virtio-rng (entropy): fills the driver's buffers from the host's getrandom(2).

use super::chain::ParsedChain;
use super::{
    device_type, drain_queue, ActivateError, Activation, ActiveQueue, Chain, DeviceEvents, Drained,
    QueueT, VirtioDevice,
};
use std::io::Write;

const QUEUE_SIZE: u16 = 64;
/// Most bytes served per request; Linux asks for far less.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

#[derive(Default)]
pub struct Rng {
    running: Option<ActiveQueue>,
    broken: bool,
    bytes_served: u64,
    /// Grows to the largest request served, then is reused.
    random: Vec<u8>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }

    fn process_queue(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let mut used_any = false;
        let mut error = None;
        let random = &mut self.random;
        let bytes_served = &mut self.bytes_served;
        let drained = drain_queue(&mut running.queue, &memory, |queue, chain| {
            // Larger chains are refused whole: the limit bounds what one
            // request can make the host do.
            let parsed = match ParsedChain::parse(chain, &memory, MAX_REQUEST_BYTES) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            let want = parsed.writable_len() as usize;
            if random.len() < want {
                random.resize(want, 0);
            }
            let filled = match fill_random(&mut random[..want]) {
                Ok(()) => parsed
                    .writer()
                    .map_or(0, |mut buffers| buffers.write(&random[..want]).unwrap_or(0)),
                Err(e) => {
                    tracing::warn!("getrandom: {e}");
                    0
                }
            };
            if queue.add_used(&memory, parsed.head, filled as u32).is_err() {
                error = Some("cannot write the used ring".into());
                return Chain::Broken;
            }
            *bytes_served += filled as u64;
            used_any = true;
            Chain::Done
        });
        if used_any && running.queue.needs_notification(&memory).unwrap_or(true) {
            running.interrupt.signal_used_buffer();
        }
        if drained == Drained::Broken {
            tracing::warn!(
                "rng: driver error, device needs reset: {}",
                error.unwrap_or_else(|| "the available ring is invalid".into())
            );
            self.broken = true;
            running.interrupt.signal_config_change();
        }
    }
}

fn fill_random(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        // SAFETY: writes at most the remaining length into our own buffer.
        let n =
            unsafe { libc::getrandom(buffer[done..].as_mut_ptr().cast(), buffer.len() - done, 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn queue_states(&self) -> Vec<super::SavedQueue> {
        self.running
            .iter()
            .map(|running| super::SavedQueue::from(&running.queue))
            .collect()
    }

    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.running = Some(activation.single_queue()?);
        self.broken = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
        self.broken = false;
    }

    fn queue_notified(&mut self, _index: usize, _events: &mut dyn DeviceEvents) {
        self.process_queue();
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn name(&self) -> String {
        "rng".into()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes_served", self.bytes_served)]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{device_queue, TestQueue, DATA};
    use super::super::Interrupt;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn activated(q: &TestQueue) -> Rng {
        let mut rng = Rng::new();
        rng.activate(Activation {
            memory: q.memory.clone(),
            queues: vec![device_queue()],
            interrupt: Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ),
            features: 0,
        })
        .unwrap();
        rng
    }

    #[test]
    fn fills_writable_buffers_and_counts_the_bytes() {
        let mut q = TestQueue::new();
        let mut rng = activated(&q);
        q.offer_chain(&[(DATA, 100, true), (DATA + 0x1000, 28, true)]);
        rng.process_queue();
        assert_eq!(q.used_element(0), (0, 128));
        assert_eq!(rng.bytes_served, 128);
        let mut data = [0u8; 100];
        q.memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().any(|&b| b != 0));
    }

    #[test]
    fn an_oversized_request_breaks_the_device_and_serves_nothing() {
        let mut q = TestQueue::new();
        let mut rng = activated(&q);
        q.offer_chain(&[(DATA, MAX_REQUEST_BYTES as u32 + 1, true)]);
        rng.process_queue();
        assert!(rng.is_broken());
        assert_eq!(q.used_index(), 0);
        assert_eq!(rng.bytes_served, 0);
    }
}
