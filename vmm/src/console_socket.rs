//! The serial console on a Unix socket (`bulkhead run --console-socket PATH`),
//! for VMs that run without a terminal, such as those the host daemon starts.
//!
//! Every client receives the recent output (a backlog) and then everything the
//! guest prints; whatever a client sends is typed into the UART. A client that
//! does not keep up is disconnected rather than allowed to stall the vCPU that
//! writes the UART. Which client may type is the daemon's decision, not ours.

use crate::devices::legacy::serial::SerialPort;
use crate::devices::lock;
use crate::exit::ExitSignal;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How much recent output a new client is sent first.
pub const BACKLOG_BYTES: usize = 64 << 10;

#[derive(Default)]
struct Clients {
    streams: Vec<UnixStream>,
    backlog: VecDeque<u8>,
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
        clients
            .streams
            .retain(|stream| send_all_now(stream, bytes).is_ok());
    }

    fn add_client(&self, stream: UnixStream) {
        let mut clients = lock(&self.clients);
        let (front, back) = clients.backlog.as_slices();
        // The backlog goes out with the lock held, so no output can slip in
        // between it and the live stream.
        if send_all_now(&stream, front).is_ok() && send_all_now(&stream, back).is_ok() {
            clients.streams.push(stream);
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

/// Sends without blocking; a short send counts as failure (the client is
/// too slow and is dropped).
fn send_all_now(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: sends from a valid buffer on a valid socket; MSG_NOSIGNAL keeps a
    // closed peer from raising SIGPIPE.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent == bytes.len() as isize {
        Ok(())
    } else {
        Err(std::io::Error::other("console client too slow or gone"))
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
        assert!(lock(&hub.clients).streams.is_empty());
    }
}
