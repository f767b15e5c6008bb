//! virtio-net backed by a host TAP device: one receive and one transmit
//! queue; checksum and segmentation offloads are offered when the TAP takes
//! virtio-net headers with them, so large TCP segments cross as one frame.

pub mod tap;

use super::chain::ParsedChain;
use super::{
    device_type, drain_queue, ActivateError, Activation, Chain, DeviceEvents, Drained, Interrupt,
    Queue, QueueOwnedT, QueueT, VirtioDevice,
};
use crate::config::NicSpec;
use crate::devices::rate_limiter::RateLimiter;
use crate::memory::GuestRam;
use event_manager::EventSet;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use tap::{Tap, TapError, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Largest frame with its header: a 64 KiB GSO segment plus Ethernet and VLAN headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65536 + 18;
const TAP_TOKEN: u32 = 0;
const RX_LIMITER_TOKEN: u32 = 1;
const TX_LIMITER_TOKEN: u32 = 2;

/// Feature bits (virtio-bindings numbers them; these are the masks).
mod feature {
    use virtio_bindings::virtio_net as net;
    pub const CSUM: u64 = 1 << net::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << net::VIRTIO_NET_F_GUEST_CSUM;
    pub const MAC: u64 = 1 << net::VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_UFO: u64 = 1 << net::VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_UFO: u64 = 1 << net::VIRTIO_NET_F_HOST_UFO;
    pub const OFFLOADS: u64 =
        CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_UFO | HOST_TSO4 | HOST_TSO6 | HOST_UFO;
}

/// TUN_F_* flags for the receive offloads the guest agreed to.
fn tap_offloads(features: u64) -> libc::c_uint {
    let mut flags = 0;
    if features & feature::GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if features & feature::GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if features & feature::GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if features & feature::GUEST_UFO != 0 {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

/// A random locally administered unicast address (02:xx:xx:xx:xx:xx).
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: fills our 6-byte buffer; on failure the bytes stay zero,
    // which still gives a valid (if fixed) address below.
    unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    mac[0] = 0x02;
    mac
}

#[derive(Debug, Default)]
struct NetStats {
    rx_frames: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    tx_frames: u64,
    tx_bytes: u64,
    tx_errors: u64,
}

struct Running {
    memory: GuestRam,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

pub struct Net {
    name: String,
    tap: Tap,
    mac: [u8; 6],
    offloads: bool,
    running: Option<Running>,
    /// A frame read from the TAP that waits for a receive buffer.
    pending: Option<usize>,
    frame: Vec<u8>,
    /// Whether the TAP is watched for incoming frames (not while the guest
    /// has no receive buffers).
    tap_watched: bool,
    broken: bool,
    stats: NetStats,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

fn is_throttled(limiter: &Option<RateLimiter>) -> bool {
    limiter.as_ref().is_some_and(RateLimiter::is_throttled)
}

impl Net {
    /// `config`'s interface on `tap`, attached already ([`Tap::open`] or
    /// [`Tap::from_descriptor`]).
    pub fn new(config: &NicSpec, tap: Tap, name: &str) -> Result<Net, TapError> {
        let limiter = || -> Result<Option<RateLimiter>, TapError> {
            if config.rate_limit.is_unlimited() {
                return Ok(None);
            }
            RateLimiter::new(&config.rate_limit)
                .map(Some)
                .map_err(|source| TapError::Timer {
                    name: config.tap.clone(),
                    source,
                })
        };
        let mac = match config.mac.as_deref() {
            Some(text) => crate::config::parse_mac(text).map_err(|message| TapError::Mac {
                name: config.tap.clone(),
                message,
            })?,
            None => random_mac(),
        };
        // Offer offloads only if this TAP takes every one of them.
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO;
        let offloads = tap.set_offloads(all) && tap.set_offloads(0);
        Ok(Net {
            name: name.to_string(),
            tap,
            mac,
            offloads,
            running: None,
            pending: None,
            frame: vec![0; MAX_FRAME],
            tap_watched: true,
            broken: false,
            stats: NetStats::default(),
            rx_limiter: limiter()?,
            tx_limiter: limiter()?,
        })
    }

    fn break_device(&mut self, reason: &str) {
        tracing::warn!(
            device = self.name,
            "driver error, device needs reset: {reason}"
        );
        self.broken = true;
        if let Some(running) = &self.running {
            running.interrupt.signal_config_change();
        }
    }

    /// Moves frames from the TAP into receive buffers until one side runs dry.
    fn receive(&mut self, events: &mut dyn DeviceEvents) {
        let Some(running) = self.running.as_mut() else {
            // Not activated: frames are dropped so the TAP does not stay readable.
            while let Ok(Some(_)) = self.tap.read_frame(&mut self.frame) {}
            return;
        };
        let memory = running.memory.clone();
        let mut delivered = false;
        let mut error = None;
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(device = self.name, "TAP read: {e}");
                        break;
                    }
                },
            };
            let chain = match running.rx.iter(&memory) {
                Ok(mut chains) => chains.next(),
                Err(_) => {
                    error = Some("the receive ring is invalid".to_string());
                    break;
                }
            };
            let Some(chain) = chain else {
                // Out of buffers: keep the frame, ask the guest to say when it
                // adds some, and stop watching the TAP until then.
                self.pending = Some(len);
                match running.rx.enable_notification(&memory) {
                    Ok(true) => continue,
                    Ok(false) => {
                        if self.tap_watched {
                            events.modify(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::empty());
                            self.tap_watched = false;
                        }
                    }
                    Err(_) => error = Some("the receive ring is invalid".to_string()),
                }
                break;
            };
            if let Some(limiter) = &mut self.rx_limiter {
                if !limiter.consume(len as u64) {
                    // Over the limit: the frame waits, the TAP is not read
                    // until the limiter's timer fires.
                    running.rx.go_to_previous_position();
                    self.pending = Some(len);
                    if self.tap_watched {
                        events.modify(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::empty());
                        self.tap_watched = false;
                    }
                    break;
                }
            }
            let parsed = match ParsedChain::parse(chain, &memory, u64::MAX) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(format!("receive chain: {e}"));
                    break;
                }
            };
            let written = if (parsed.writable_len() as usize) < len {
                // Buffers too small for this frame: drop it, give them back empty.
                self.stats.rx_dropped += 1;
                0
            } else {
                let written = parsed.writer().map_or(0, |mut buffers| {
                    buffers.write(&self.frame[..len]).unwrap_or(0)
                });
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += (len - VNET_HDR_LEN.min(len)) as u64;
                written
            };
            if running
                .rx
                .add_used(&memory, parsed.head, written as u32)
                .is_err()
            {
                error = Some("cannot write the receive used ring".into());
                break;
            }
            delivered = true;
        }
        if delivered && running.rx.needs_notification(&memory).unwrap_or(true) {
            running.interrupt.signal_used_buffer();
        }
        if let Some(reason) = error {
            self.break_device(&reason);
        }
    }

    /// The guest added receive buffers: deliver what waits, watch the TAP again.
    fn rx_buffers_added(&mut self, events: &mut dyn DeviceEvents) {
        if is_throttled(&self.rx_limiter) {
            return;
        }
        if !self.tap_watched {
            events.modify(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN);
            self.tap_watched = true;
        }
        self.receive(events);
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let mut sent_any = false;
        let mut error = None;
        let tap = &self.tap;
        let stats = &mut self.stats;
        let limiter = &mut self.tx_limiter;
        let drained = drain_queue(&mut running.tx, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(chain, &memory, MAX_FRAME as u64) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(format!("transmit chain: {e}"));
                    return Chain::Broken;
                }
            };
            let len = parsed.readable_len();
            if let Some(limiter) = limiter.as_mut() {
                if !limiter.consume(len.saturating_sub(VNET_HDR_LEN as u64)) {
                    return Chain::Throttled;
                }
            }
            if len as usize <= VNET_HDR_LEN {
                stats.tx_errors += 1;
            } else {
                match tap.write_frame(&parsed.readable_iovecs(0, len)) {
                    Ok(_) => {
                        stats.tx_frames += 1;
                        stats.tx_bytes += len - VNET_HDR_LEN as u64;
                    }
                    Err(e) => {
                        stats.tx_errors += 1;
                        tracing::debug!("TAP write: {e}");
                    }
                }
            }
            if queue.add_used(&memory, parsed.head, 0).is_err() {
                error = Some("cannot write the transmit used ring".into());
                return Chain::Broken;
            }
            sent_any = true;
            Chain::Done
        });
        if sent_any && running.tx.needs_notification(&memory).unwrap_or(true) {
            running.interrupt.signal_used_buffer();
        }
        if drained == Drained::Broken {
            self.break_device(&error.unwrap_or_else(|| "the transmit ring is invalid".into()));
        }
    }
}

impl VirtioDevice for Net {
    fn queue_states(&self) -> Vec<super::SavedQueue> {
        self.running
            .iter()
            .flat_map(|running| [(&running.rx).into(), (&running.tx).into()])
            .collect()
    }

    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        feature::MAC | if self.offloads { feature::OFFLOADS } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (not offered: the link is always up).
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady(RX_QUEUE));
        };
        for (index, queue) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        let offloads = tap_offloads(activation.features);
        if !self.tap.set_offloads(offloads) {
            return Err(ActivateError::Device(format!(
                "TAP {} refused offloads {offloads:#x}",
                self.tap.name()
            )));
        }
        self.broken = false;
        self.running = Some(Running {
            memory: activation.memory,
            rx,
            tx,
            interrupt: activation.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
        self.pending = None;
        self.broken = false;
    }

    fn queue_notified(&mut self, index: usize, events: &mut dyn DeviceEvents) {
        match index {
            RX_QUEUE => self.rx_buffers_added(events),
            TX_QUEUE if !is_throttled(&self.tx_limiter) => self.transmit(),
            _ => {}
        }
    }

    fn initial_event_sources(&self) -> Vec<(RawFd, u32, EventSet)> {
        let mut sources = vec![(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN)];
        for (limiter, token) in [
            (&self.rx_limiter, RX_LIMITER_TOKEN),
            (&self.tx_limiter, TX_LIMITER_TOKEN),
        ] {
            if let Some(limiter) = limiter {
                sources.push((limiter.timer_fd(), token, EventSet::IN));
            }
        }
        sources
    }

    fn handle_event(&mut self, token: u32, _events: EventSet, events: &mut dyn DeviceEvents) {
        match token {
            RX_LIMITER_TOKEN => {
                if let Some(limiter) = &mut self.rx_limiter {
                    limiter.timer_fired();
                }
                if !self.broken {
                    self.rx_buffers_added(events);
                }
            }
            TX_LIMITER_TOKEN => {
                if let Some(limiter) = &mut self.tx_limiter {
                    limiter.timer_fired();
                }
                if !self.broken {
                    self.transmit();
                }
            }
            _ if !self.broken && !is_throttled(&self.rx_limiter) => self.receive(events),
            _ => {}
        }
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("rx_frames", s.rx_frames),
            ("rx_bytes", s.rx_bytes),
            ("rx_dropped", s.rx_dropped),
            ("tx_frames", s.tx_frames),
            ("tx_bytes", s.tx_bytes),
            ("tx_errors", s.tx_errors),
            (
                "rx_throttled",
                self.rx_limiter.as_ref().map_or(0, |l| l.throttled_count),
            ),
            (
                "tx_throttled",
                self.tx_limiter.as_ref().map_or(0, |l| l.throttled_count),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_offloads_follow_the_agreed_features() {
        assert_eq!(tap_offloads(0), 0);
        // Segmentation offloads need checksum offload.
        assert_eq!(tap_offloads(feature::GUEST_TSO4), 0);
        assert_eq!(
            tap_offloads(feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_UFO),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_UFO
        );
    }
}
