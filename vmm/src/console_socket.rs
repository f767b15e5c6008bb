//! The serial console on a Unix socket (`bulkhead run --console-socket PATH`),
//! for VMs that run without a terminal, such as those the host daemon starts.
//!
//! Every client receives the recent output (a backlog) and then everything the
//! guest prints; whatever a client sends is typed into the UART. Each client
//! has its own bounded queue and sending thread: a client that falls more than
//! [`CLIENT_QUEUE_BYTES`] behind is disconnected rather than allowed to stall
//! the vCPU that writes the UART. Which client may type is the daemon's decision, not ours.

use crate::devices::legacy::serial::SerialPort;
use crate::devices::lock;
use crate::exit::ExitSignal;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How much recent output a new client is sent first.
pub const BACKLOG_BYTES: usize = 64 << 10;

/// After each send, a client's thread lets output gather this long before
/// the next: a guest prints a byte per exit, and a write per byte (with the
/// wake-ups it causes down the line: the daemon, the console client) costs far
/// more than the byte. The first output after a quiet spell goes out at once.
pub const GATHER: Duration = Duration::from_millis(5);

/// How much output may wait for one client before it counts as too slow.
/// Generous, because the guest prints a byte per exit and a busy host may
/// not schedule the client's reader for a while; bounded, because a client
/// that stops reading must not grow the VMM without limit.
pub const CLIENT_QUEUE_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Clients {
    queues: Vec<Arc<ClientQueue>>,
    backlog: VecDeque<u8>,
}

impl Drop for Clients {
    /// The VM is gone: every client gets what is queued, then end of stream.
    fn drop(&mut self) {
        for queue in &self.queues {
            queue.finish();
        }
    }
}

/// Output waiting for one client, sent by that client's own thread, so the
/// vCPU that writes the UART only ever copies bytes into memory.
struct ClientQueue {
    stream: UnixStream,
    pending: Mutex<Pending>,
    ready: Condvar,
    /// How many writes the sending thread made to the socket.
    sends: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    finished: bool,
    /// The sending thread sleeps on `ready`: only then is it woken (the
    /// vCPU makes no wake-up call per byte while output gathers).
    sender_waiting: bool,
}

impl ClientQueue {
    /// Queues `bytes`; false (and the client cut off) if it fell too far behind.
    fn push(&self, bytes: &[u8]) -> bool {
        let mut pending = lock(&self.pending);
        if pending.bytes.len() + bytes.len() > CLIENT_QUEUE_BYTES {
            pending.finished = true;
            pending.bytes.clear();
            // Unblocks a send in progress; the client sees its stream end.
            let _ = self.stream.shutdown(Shutdown::Both);
            self.ready.notify_one();
            return false;
        }
        pending.bytes.extend_from_slice(bytes);
        if pending.sender_waiting {
            self.ready.notify_one();
        }
        true
    }

    fn finish(&self) {
        lock(&self.pending).finished = true;
        self.ready.notify_one();
    }

    /// The client's sending thread: blocks on the socket, never on the guest.
    fn send_until_finished(&self) {
        let mut stream = &self.stream;
        loop {
            let (bytes, finished) = {
                let mut pending = lock(&self.pending);
                while pending.bytes.is_empty() && !pending.finished {
                    pending.sender_waiting = true;
                    pending = self
                        .ready
                        .wait(pending)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    pending.sender_waiting = false;
                }
                (std::mem::take(&mut pending.bytes), pending.finished)
            };
            self.sends
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if stream.write_all(&bytes).is_err() || finished {
                let _ = self.stream.shutdown(Shutdown::Write);
                return;
            }
            std::thread::sleep(GATHER);
        }
    }
}

/// The console's fan-out: a writer for the UART and the clients it feeds.
#[derive(Clone, Default)]
pub struct ConsoleHub {
    clients: Arc<Mutex<Clients>>,
}

impl ConsoleHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// The UART's output sink.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(HubWriter(self.clone()))
    }

    fn broadcast(&self, bytes: &[u8]) {
        let mut clients = lock(&self.clients);
        let backlog = &mut clients.backlog;
        backlog.extend(bytes);
        let excess = backlog.len().saturating_sub(BACKLOG_BYTES);
        backlog.drain(..excess);
        clients.queues.retain(|queue| queue.push(bytes));
    }

    fn add_client(&self, stream: UnixStream) {
        let mut clients = lock(&self.clients);
        let queue = Arc::new(ClientQueue {
            stream,
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
            sends: Default::default(),
        });
        // The backlog is queued with the lock held, so no output can slip in
        // between it and the live stream.
        let (front, back) = clients.backlog.as_slices();
        if !(queue.push(front) && queue.push(back)) {
            return;
        }
        let sender = queue.clone();
        let spawned = std::thread::Builder::new()
            .name("console-output".into())
            .spawn(move || sender.send_until_finished());
        match spawned {
            Ok(_) => clients.queues.push(queue),
            Err(e) => tracing::warn!("console client gets no output thread: {e}"),
        }
    }

    /// Accepts clients at `path` until the VM exits, then removes the socket.
    /// Input from clients goes to `serial`.
    pub fn serve(
        &self,
        path: &Path,
        serial: Arc<Mutex<SerialPort>>,
        exit: Arc<ExitSignal>,
    ) -> std::io::Result<JoinHandle<()>> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let hub = self.clone();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || hub.accept_loop(listener, path, serial, exit))
    }

    fn accept_loop(
        self,
        listener: UnixListener,
        path: PathBuf,
        serial: Arc<Mutex<SerialPort>>,
        exit: Arc<ExitSignal>,
    ) {
        crate::control::accept_until_exit(&listener, &exit, |stream| {
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            self.add_client(stream);
            let serial = serial.clone();
            let exit = exit.clone();
            let spawned = std::thread::Builder::new()
                .name("console-input".into())
                .spawn(move || pump_input(reader, &serial, &exit));
            if let Err(e) = spawned {
                tracing::warn!("console client gets no input thread: {e}");
            }
        });
        let _ = std::fs::remove_file(&path);
    }
}

struct HubWriter(ConsoleHub);

impl Write for HubWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.broadcast(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pump_input(mut stream: UnixStream, serial: &Mutex<SerialPort>, exit: &ExitSignal) {
    let mut buffer = [0u8; 256];
    loop {
        let n = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buffer[..n];
        // The UART FIFO is small: wait for the guest to drain it.
        while !rest.is_empty() {
            if exit.is_requested() {
                return;
            }
            let taken = lock(serial).enqueue_input(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_client_gets_the_recent_output_then_the_live_stream() {
        let hub = ConsoleHub::new();
        let mut writer = hub.writer();
        writer.write_all(&vec![b'a'; BACKLOG_BYTES]).unwrap();
        writer.write_all(b"tail").unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        hub.add_client(ours);
        writer.write_all(b"live").unwrap();
        drop(hub);
        drop(writer);
        let mut got = Vec::new();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = [0u8; 4096];
        while got.len() < BACKLOG_BYTES + 4 {
            let n = theirs.read(&mut buffer).unwrap();
            got.extend_from_slice(&buffer[..n]);
        }
        // The backlog keeps the newest bytes.
        assert_eq!(got.len(), BACKLOG_BYTES + 4);
        assert!(got.ends_with(b"taillive"));
        assert_eq!(got[0], b'a');
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_not_waited_for() {
        let hub = ConsoleHub::new();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        hub.add_client(ours);
        let mut writer = hub.writer();
        // Far more than a socket buffer holds; must not block.
        for _ in 0..64 {
            writer.write_all(&[b'x'; 64 << 10]).unwrap();
        }
        assert!(lock(&hub.clients).queues.is_empty());
    }

    #[test]
    fn a_client_reads_the_live_stream_while_the_vm_runs() {
        let hub = ConsoleHub::new();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        hub.add_client(ours);
        let mut writer = hub.writer();
        writer.write_all(b"now").unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 3];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"now");
        // The hub and its writer are still alive: nothing waited for the end.
        drop(writer);
    }

    #[test]
    fn a_client_may_fall_exactly_the_queue_behind_and_not_a_byte_more() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let queue = ClientQueue {
            stream: ours,
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
            sends: Default::default(),
        };
        assert!(queue.push(&vec![b'x'; CLIENT_QUEUE_BYTES - 1]));
        assert!(queue.push(b"y"));
        assert!(!queue.push(b"z"));
        assert!(lock(&queue.pending).finished);
    }

    /// What a client receives until the hub is gone and its stream ends.
    fn everything_sent(mut client: UnixStream) -> Vec<u8> {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        got
    }

    #[test]
    fn a_client_busy_elsewhere_gets_every_byte_of_a_burst_of_single_byte_writes() {
        // The guest prints a byte per exit. Sent one `send` each, a burst of a
        // few hundred overflowed a socket whose reader was briefly not
        // scheduled, and the console went silent mid-line.
        let hub = ConsoleHub::new();
        let (ours, theirs) = UnixStream::pair().unwrap();
        hub.add_client(ours);
        let mut writer = hub.writer();
        let burst: Vec<u8> = (0..256 << 10).map(|i| b'a' + (i % 26) as u8).collect();
        for byte in &burst {
            writer.write_all(std::slice::from_ref(byte)).unwrap();
        }
        drop(writer);
        drop(hub);
        let got = everything_sent(theirs);
        assert_eq!(got.len(), burst.len());
        assert!(got == burst);
    }

    #[test]
    fn output_printed_a_byte_at_a_time_is_sent_in_few_writes() {
        let hub = ConsoleHub::new();
        let (ours, theirs) = UnixStream::pair().unwrap();
        hub.add_client(ours);
        let queue = lock(&hub.clients).queues[0].clone();
        let mut writer = hub.writer();
        // 400 bytes over at least 40 ms, as a guest prints them.
        let printed: Vec<u8> = (0..400).map(|i| b'a' + (i % 26) as u8).collect();
        for byte in &printed {
            writer.write_all(std::slice::from_ref(byte)).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        drop(writer);
        drop(hub);
        assert!(everything_sent(theirs) == printed);
        // A send per GATHER at most (8 over 40 ms), and slack for a slow
        // machine; a send per byte would be 400.
        let sends = queue.sends.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sends <= 60, "{sends} sends for 400 bytes");
    }
}
