//! virtio-vsock: stream sockets between the guest and host programs, the host
//! side on Unix sockets in the convention Firecracker users know:
//! - host → guest: connect to the device's socket PATH, write
//!   `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is the
//!   connection to the guest's port;
//! - guest → host: a guest connection to host (CID 2) port P is forwarded to a
//!   listener at `PATH_P`.
//!
//! Connections live in an epoll of the device's own (one event source on the
//! device thread), so they come and go without touching the event loop.
//! Flow control is virtio-vsock's credit scheme both ways.

use super::chain::ParsedChain;
use super::{
    device_type, drain_queue, read_config_bytes, ActivateError, Activation, Chain, DeviceEvents,
    Drained, Interrupt, Queue, QueueOwnedT, QueueT, VirtioDevice,
};
use crate::config::VsockSpec;
use crate::memory::GuestRam;
use event_manager::EventSet;
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as EpollSet};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
pub const HOST_CID: u64 = 2;
pub const HEADER_LEN: usize = 44;
/// Largest payload taken from the guest in one packet.
const MAX_PAYLOAD: u32 = 64 << 10;
/// Bytes from the guest buffered per connection while the host reader is
/// slow; the guest may not send more than this (our credit).
const BUFFER_SIZE: u32 = 256 << 10;
/// Host ports handed to host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
const CONNECT_LINE_MAX: usize = 32;
const INNER_TOKEN: u32 = 0;
/// Inner epoll data: the listener, or a connection key.
const LISTENER_KEY: u64 = u64::MAX;

mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
const TYPE_STREAM: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is reserved (use 3 or more)")]
    Cid(u64),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("vsock epoll: {0}")]
    Epoll(std::io::Error),
}

/// One virtio-vsock packet header (virtio 1.2, 5.10.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A host program connected and has not sent its `CONNECT` line yet.
    AwaitingConnectLine(Vec<u8>),
    /// REQUEST sent to the guest; waiting for its RESPONSE.
    Connecting,
    Established,
}

/// (host port, guest port)
type Key = (u32, u32);

struct Connection {
    stream: UnixStream,
    state: State,
    /// The guest's receive buffer size and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest on this connection.
    tx_cnt: u32,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_told: u32,
    /// Guest data the host stream has not taken yet.
    to_host: VecDeque<u8>,
    /// The host stream may have data to read (edge-triggered).
    readable: bool,
    host_closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: VecDeque::new(),
            readable: false,
            host_closed: false,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes buffered guest data to the host stream; false on a broken stream.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// What the device did, for reports.
#[derive(Debug, Default)]
struct VsockStats {
    connections_from_host: u64,
    connections_from_guest: u64,
    bytes_to_guest: u64,
    bytes_to_host: u64,
    resets_sent: u64,
    resets_received: u64,
    rx_buffers_offered: u64,
}

struct Running {
    memory: GuestRam,
    rx: Queue,
    tx: Queue,
    /// Only used to tell the driver its connections are gone (after a restore).
    event: Option<Queue>,
    interrupt: Interrupt,
}

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    connections: BTreeMap<Key, Connection>,
    /// Host programs connected to the listener that have not said CONNECT yet.
    next_host_port: u32,
    /// Control packets (RESPONSE, RST, CREDIT_UPDATE, ...) waiting for an rx buffer.
    control: VecDeque<Header>,
    running: Option<Running>,
    broken: bool,
    stats: VsockStats,
    /// Config reads of the CID happen through `&self`.
    cid_reads: std::cell::Cell<u64>,
    read_buffer: Vec<u8>,
}

/// The packet a transmit chain carries: its header and payload (None when
/// the chain is shorter than a header, or than the payload its header says).
fn read_packet(parsed: &ParsedChain<'_>) -> Option<(Header, Vec<u8>)> {
    let mut packet = parsed.reader().ok()?;
    let mut header = [0u8; HEADER_LEN];
    packet.read_exact(&mut header).ok()?;
    let header = Header::from_bytes(&header);
    if header.len as usize > packet.available_bytes() {
        return None;
    }
    let mut payload = vec![0u8; header.len as usize];
    packet.read_exact(&mut payload).ok()?;
    Some((header, payload))
}

impl Vsock {
    /// Binds the host side of `config`'s socket (`bulkhead run`; the daemon
    /// binds it for the VMMs it starts).
    pub fn bind(config: &VsockSpec) -> Result<UnixListener, VsockError> {
        let socket = config.socket_path();
        if socket.exists() && UnixStream::connect(&socket).is_err() {
            // Left by a VMM that died.
            let _ = std::fs::remove_file(&socket);
        }
        UnixListener::bind(&socket).map_err(|source| VsockError::Listen {
            path: socket.display().to_string(),
            source,
        })
    }

    /// `config`'s device, serving host programs that connect to `listener`.
    pub fn new(config: &VsockSpec, listener: UnixListener) -> Result<Vsock, VsockError> {
        if config.cid < 3 || config.cid == u32::MAX {
            return Err(VsockError::Cid(u64::from(config.cid)));
        }
        let name = config.socket_path().display().to_string();
        // Edge-triggered like the streams: every event is drained at once,
        // so the device thread never spins on a pending connection.
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Listen { path: name, source })?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EpollSet::IN | EpollSet::EDGE_TRIGGERED, LISTENER_KEY),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Vsock {
            cid: u64::from(config.cid),
            path: config.socket_path(),
            listener,
            epoll,
            connections: BTreeMap::new(),
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            running: None,
            broken: false,
            stats: VsockStats::default(),
            cid_reads: Default::default(),
            read_buffer: vec![0; MAX_PAYLOAD as usize],
        })
    }

    fn header(&self, key: Key, op: u16) -> Header {
        let (fwd_cnt, buf_alloc) = match self.connections.get(&key) {
            Some(c) => (c.fwd_cnt, BUFFER_SIZE),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, key: Key, op: u16) {
        let header = self.header(key, op);
        if op == op::RST {
            self.stats.resets_sent += 1;
        }
        if let Some(c) = self.connections.get_mut(&key) {
            c.fwd_cnt_told = c.fwd_cnt;
        }
        self.control.push_back(header);
    }

    fn watch(&self, key: Key, stream: &UnixStream) {
        let data = (u64::from(key.0) << 32) | u64::from(key.1);
        let events =
            EpollSet::IN | EpollSet::OUT | EpollSet::EDGE_TRIGGERED | EpollSet::READ_HANG_UP;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, data),
        ) {
            tracing::warn!("vsock: cannot watch a connection: {e}");
        }
    }

    fn close(&mut self, key: Key) {
        if let Some(connection) = self.connections.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                connection.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Host programs connecting to the device's socket.
    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // The guest port is unknown until the CONNECT line: key by
                    // a fresh host port and guest port 0 meanwhile.
                    let key = (self.allocate_host_port(), 0);
                    self.watch(key, &stream);
                    let mut connection =
                        Connection::new(stream, State::AwaitingConnectLine(Vec::new()));
                    connection.readable = true;
                    self.connections.insert(key, connection);
                    self.read_connect_line(key);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn allocate_host_port(&mut self) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.connections.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }

    /// Reads `CONNECT <port>\n` from a new host connection, then asks the
    /// guest to accept it.
    fn read_connect_line(&mut self, key: Key) {
        let Some(connection) = self.connections.get_mut(&key) else {
            return;
        };
        let State::AwaitingConnectLine(line) = &mut connection.state else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match connection.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    break std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                }
                Ok(1) if line.len() < CONNECT_LINE_MAX => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    connection.readable = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EOF, an overlong line or an error: drop the host connection.
                _ => break None,
            }
        };
        let Some(port) = port else {
            self.close(key);
            return;
        };
        let Some(mut connection) = self.connections.remove(&key) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            connection.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        connection.state = State::Connecting;
        let new_key = (key.0, port);
        self.watch(new_key, &connection.stream);
        self.connections.insert(new_key, connection);
        self.stats.connections_from_host += 1;
        self.send_control(new_key, op::REQUEST);
    }

    /// A packet the guest sent.
    fn handle_guest_packet(&mut self, header: Header, payload: &[u8]) {
        if header.kind != TYPE_STREAM || header.src_cid != self.cid || header.dst_cid != HOST_CID {
            if header.op != op::RST {
                self.reply_reset(&header);
            }
            return;
        }
        let key = (header.dst_port, header.src_port);
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.peer_buf_alloc = header.buf_alloc;
            connection.peer_fwd_cnt = header.fwd_cnt;
        }
        match header.op {
            op::REQUEST => self.guest_connects(key, &header),
            op::RESPONSE => {
                let established = match self.connections.get_mut(&key) {
                    Some(c) if c.state == State::Connecting => {
                        c.state = State::Established;
                        let reply = format!("OK {}\n", key.0);
                        c.stream.write_all(reply.as_bytes()).is_ok()
                    }
                    _ => false,
                };
                if !established {
                    self.reply_reset(&header);
                    self.close(key);
                }
            }
            op::RW => {
                let ok = match self.connections.get_mut(&key) {
                    Some(c) if c.state == State::Established => {
                        // More than our credit allows breaks the protocol.
                        if c.to_host.len() + payload.len() > BUFFER_SIZE as usize {
                            false
                        } else {
                            c.to_host.extend(payload);
                            c.flush_to_host()
                        }
                    }
                    _ => false,
                };
                if ok {
                    self.stats.bytes_to_host += payload.len() as u64;
                    self.maybe_credit_update(key);
                } else {
                    self.reply_reset(&header);
                    self.close(key);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if self.connections.contains_key(&key) {
                    self.send_control(key, op::CREDIT_UPDATE);
                } else {
                    self.reply_reset(&header);
                }
            }
            op::SHUTDOWN => {
                if let Some(c) = self.connections.get(&key) {
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                    self.send_control(key, op::RST);
                    self.close(key);
                }
            }
            op::RST => {
                self.stats.resets_received += 1;
                self.close(key);
            }
            _ => self.reply_reset(&header),
        }
    }

    /// The guest connects to host port `key.0`: forward to the listener at `PATH_<port>`.
    fn guest_connects(&mut self, key: Key, header: &Header) {
        if self.connections.contains_key(&key) {
            self.reply_reset(header);
            return;
        }
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                self.watch(key, &stream);
                let mut connection = Connection::new(stream, State::Established);
                connection.peer_buf_alloc = header.buf_alloc;
                connection.peer_fwd_cnt = header.fwd_cnt;
                self.connections.insert(key, connection);
                self.stats.connections_from_guest += 1;
                self.send_control(key, op::RESPONSE);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to host port {}: {e}", key.0);
                self.reply_reset(header);
            }
        }
    }

    /// Tells the guest how much it may send again, once it used a good part.
    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.connections.get(&key) {
            if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUFFER_SIZE / 4 {
                self.send_control(key, op::CREDIT_UPDATE);
            }
        }
    }

    fn reply_reset(&mut self, to: &Header) {
        self.stats.resets_sent += 1;
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        });
    }

    /// Packets from the guest's transmit queue.
    fn process_tx(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        let memory = running.memory.clone();
        let mut packets = Vec::new();
        let mut error = None;
        let drained = drain_queue(&mut running.tx, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(
                chain,
                &memory,
                HEADER_LEN as u64 + u64::from(MAX_PAYLOAD),
            ) {
                Ok(parsed) => parsed,
                Err(e) => {
                    error = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            packets.extend(read_packet(&parsed));
            if queue.add_used(&memory, parsed.head, 0).is_err() {
                return Chain::Broken;
            }
            Chain::Done
        });
        if running.tx.needs_notification(&memory).unwrap_or(true) {
            running.interrupt.signal_used_buffer();
        }
        self.running = Some(running);
        for (header, payload) in packets {
            self.handle_guest_packet(header, &payload);
        }
        if drained == Drained::Broken {
            self.break_device(&error.unwrap_or_else(|| "the transmit ring is invalid".into()));
            return;
        }
        self.process_rx();
    }

    /// Fills the guest's receive buffers: control packets first, then data
    /// from host streams the guest has credit for.
    fn process_rx(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        let memory = running.memory.clone();
        let mut delivered = false;
        let mut error = None;
        while let Some(work) = self.next_rx_work() {
            let chain = match running.rx.iter(&memory) {
                Ok(mut chains) => chains.next(),
                Err(_) => {
                    error = Some("the receive ring is invalid".to_string());
                    self.requeue(work);
                    break;
                }
            };
            let Some(chain) = chain else {
                self.requeue(work);
                match running.rx.enable_notification(&memory) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(_) => error = Some("the receive ring is invalid".to_string()),
                }
                break;
            };
            let parsed = match ParsedChain::parse(chain, &memory, u64::MAX) {
                Ok(parsed) if parsed.writable_len() >= HEADER_LEN as u64 => parsed,
                Ok(_) => {
                    error = Some("a receive buffer is smaller than a packet header".into());
                    self.requeue(work);
                    break;
                }
                Err(e) => {
                    error = Some(format!("receive chain: {e}"));
                    self.requeue(work);
                    break;
                }
            };
            self.stats.rx_buffers_offered += 1;
            let room =
                (parsed.writable_len() - HEADER_LEN as u64).min(u64::from(MAX_PAYLOAD)) as usize;
            let written = match work {
                RxWork::Control(header) => {
                    parsed.write_at(0, &header.to_bytes());
                    HEADER_LEN
                }
                RxWork::Data(key) => self.read_host_data(key, &parsed, room),
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
        self.running = Some(running);
        if let Some(reason) = error {
            self.break_device(&reason);
        }
    }

    fn next_rx_work(&mut self) -> Option<RxWork> {
        if let Some(header) = self.control.pop_front() {
            return Some(RxWork::Control(header));
        }
        for (key, connection) in self.connections.iter_mut() {
            if connection.state != State::Established
                || !connection.readable
                || connection.peer_credit() == 0
            {
                continue;
            }
            // Only take a receive buffer for data (or an end of stream)
            // that is really there.
            if has_data_or_end(&connection.stream) {
                return Some(RxWork::Data(*key));
            }
            connection.readable = false;
        }
        None
    }

    fn requeue(&mut self, work: RxWork) {
        if let RxWork::Control(header) = work {
            self.control.push_front(header);
        }
    }

    /// Reads host data for `key` straight into a receive buffer; returns the
    /// bytes written (header included; a header alone when the stream ended).
    fn read_host_data(&mut self, key: Key, parsed: &ParsedChain<'_>, room: usize) -> usize {
        let Some(connection) = self.connections.get_mut(&key) else {
            return 0;
        };
        let want = room
            .min(connection.peer_credit() as usize)
            .min(self.read_buffer.len());
        let result = loop {
            match connection.stream.read(&mut self.read_buffer[..want]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let mut header = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            kind: TYPE_STREAM,
            buf_alloc: BUFFER_SIZE,
            fwd_cnt: connection.fwd_cnt,
            ..Default::default()
        };
        connection.fwd_cnt_told = connection.fwd_cnt;
        match result {
            Ok(n) if n > 0 => {
                header.op = op::RW;
                header.len = n as u32;
                connection.tx_cnt = connection.tx_cnt.wrapping_add(n as u32);
                parsed.write_at(HEADER_LEN as u64, &self.read_buffer[..n]);
                parsed.write_at(0, &header.to_bytes());
                self.stats.bytes_to_guest += n as u64;
                HEADER_LEN + n
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                connection.readable = false;
                // Nothing to send after all: a credit update is harmless.
                header.op = op::CREDIT_UPDATE;
                parsed.write_at(0, &header.to_bytes());
                HEADER_LEN
            }
            _ => {
                // The host side closed: tell the guest no more data comes.
                connection.readable = false;
                connection.host_closed = true;
                header.op = op::SHUTDOWN;
                header.flags = 3;
                parsed.write_at(0, &header.to_bytes());
                HEADER_LEN
            }
        }
    }

    /// Events from the device's own epoll: the listener and host streams.
    fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(0, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock epoll: {e}");
                    return;
                }
            };
            if count == 0 {
                break;
            }
            for event in &events[..count] {
                let data = event.data();
                if data == LISTENER_KEY {
                    self.accept_host_connections();
                    continue;
                }
                let key = ((data >> 32) as u32, data as u32);
                let set = event.event_set();
                let Some(connection) = self.connections.get_mut(&key) else {
                    continue;
                };
                if set.intersects(EpollSet::OUT) && !connection.flush_to_host() {
                    self.send_control(key, op::RST);
                    self.close(key);
                    continue;
                }
                if set.intersects(EpollSet::IN | EpollSet::READ_HANG_UP | EpollSet::HANG_UP) {
                    connection.readable = true;
                    if matches!(connection.state, State::AwaitingConnectLine(_)) {
                        self.read_connect_line(key);
                    }
                }
                self.maybe_credit_update(key);
            }
        }
        self.process_rx();
    }

    fn break_device(&mut self, reason: &str) {
        tracing::warn!("vsock: driver error, device needs reset: {reason}");
        self.broken = true;
        if let Some(running) = &self.running {
            running.interrupt.signal_config_change();
        }
    }
}

/// Whether a read on `stream` would return data or end-of-stream now.
fn has_data_or_end(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: peeks at most one byte into a local.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || std::io::Error::last_os_error().kind() != ErrorKind::WouldBlock
}

enum RxWork {
    Control(Header),
    Data(Key),
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Vsock {
    fn send_transport_reset(&mut self) {
        const EVENT_TRANSPORT_RESET: u32 = 0;
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let memory = running.memory.clone();
        let Some(queue) = running.event.as_mut() else {
            tracing::warn!("vsock: no event queue; the guest keeps its stale connections");
            return;
        };
        let chain = match queue.iter(&memory) {
            Ok(mut chains) => chains.next(),
            Err(_) => None,
        };
        let Some(chain) = chain else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let written = match ParsedChain::parse(chain, &memory, 64) {
            Ok(parsed) => parsed.write_at(0, &EVENT_TRANSPORT_RESET.to_le_bytes()),
            Err(_) => 0,
        };
        if queue.add_used(&memory, head, written as u32).is_ok() {
            running.interrupt.signal_used_buffer();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // rx, tx, event
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 {
            self.cid_reads.set(self.cid_reads.get() + 1);
        }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady(RX));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError::QueueNotReady(if rx.ready() {
                TX
            } else {
                RX
            }));
        }
        let event = queues.next().filter(|queue| queue.ready());
        self.broken = false;
        self.connections
            .retain(|_, c| matches!(c.state, State::AwaitingConnectLine(_) | State::Connecting));
        self.running = Some(Running {
            memory: activation.memory,
            rx,
            tx,
            event,
            interrupt: activation.interrupt,
        });
        Ok(())
    }

    fn queue_states(&self) -> Vec<super::SavedQueue> {
        let Some(running) = &self.running else {
            return Vec::new();
        };
        [Some(&running.rx), Some(&running.tx), running.event.as_ref()]
            .into_iter()
            .flatten()
            .map(super::SavedQueue::from)
            .collect()
    }

    /// Host sockets do not survive a restore or a migration: as Firecracker
    /// does, tell the driver its transport was reset, so it drops every
    /// connection (and re-reads the CID) instead of waiting on dead ones.
    fn restore_state(&mut self, state: &super::SavedDeviceState) -> Result<(), String> {
        if *state != super::SavedDeviceState::None {
            return Err(format!("vsock: a saved state of another device: {state:?}"));
        }
        self.send_transport_reset();
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
        self.broken = false;
        self.control.clear();
        let keys: Vec<Key> = self.connections.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
    }

    fn queue_notified(&mut self, index: usize, _events: &mut dyn DeviceEvents) {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn initial_event_sources(&self) -> Vec<(RawFd, u32, EventSet)> {
        vec![(self.epoll.as_raw_fd(), INNER_TOKEN, EventSet::IN)]
    }

    fn handle_event(&mut self, _token: u32, _events: EventSet, _ops: &mut dyn DeviceEvents) {
        if self.broken {
            // Drain the epoll so the loop does not spin; nothing is served.
            let mut events = [EpollEvent::default(); 64];
            while self.epoll.wait(0, &mut events).unwrap_or(0) > 0 {}
            return;
        }
        // Before activation host programs are accepted and their CONNECT
        // read; the requests wait for the guest's receive buffers.
        self.process_host_events();
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn name(&self) -> String {
        "vsock".into()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("cid_reads", self.cid_reads.get()),
            ("connections_from_host", s.connections_from_host),
            ("connections_from_guest", s.connections_from_guest),
            ("bytes_to_guest", s.bytes_to_guest),
            ("bytes_to_host", s.bytes_to_host),
            ("resets_sent", s.resets_sent),
            ("resets_received", s.resets_received),
            ("rx_buffers_offered", s.rx_buffers_offered),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{device_queue_at, TestQueue, DATA};
    use super::super::DetachedEvents;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 42;
    const RX_BASE: u64 = 0x1000;
    const TX_BASE: u64 = 0x5000;
    const EVENT_BASE: u64 = 0x9000;

    struct Harness {
        vsock: Vsock,
        rx: TestQueue,
        tx: TestQueue,
        path: PathBuf,
        rx_seen: u16,
        next_rx_desc: u16,
        _dir: TempDir,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn harness() -> Harness {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bulkhead-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let config = VsockSpec {
            cid: GUEST_CID as u32,
            socket: Some(path.clone()),
        };
        let mut vsock = Vsock::new(&config, Vsock::bind(&config).unwrap()).unwrap();
        let rx = TestQueue::new();
        let tx = TestQueue::at(rx.memory.clone(), TX_BASE);
        vsock
            .activate(Activation {
                memory: rx.memory.clone(),
                queues: vec![
                    device_queue_at(RX_BASE),
                    device_queue_at(TX_BASE),
                    device_queue_at(EVENT_BASE),
                ],
                interrupt: Interrupt::new(
                    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ),
                features: 0,
            })
            .unwrap();
        let mut h = Harness {
            vsock,
            rx,
            tx,
            path,
            rx_seen: 0,
            next_rx_desc: 0,
            _dir: TempDir(dir),
        };
        for _ in 0..8 {
            h.offer_rx_buffer();
        }
        h
    }

    impl Harness {
        fn offer_rx_buffer(&mut self) {
            let slot = u64::from(self.next_rx_desc % 16);
            let addr = DATA + slot * 0x2000;
            self.rx
                .offer_chain_at(self.next_rx_desc % 16, &[(addr, 0x2000, true)]);
            self.next_rx_desc = self.next_rx_desc.wrapping_add(1);
        }

        /// The packets the device put in the receive ring since last time.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            self.vsock
                .handle_event(INNER_TOKEN, EventSet::IN, &mut DetachedEvents);
            let mut packets = Vec::new();
            while self.rx_seen != self.rx.used_index() {
                let (head, len) = self.rx.used_element(self.rx_seen);
                let addr = DATA + u64::from(head) * 0x2000;
                let mut bytes = vec![0u8; len as usize];
                self.rx
                    .memory
                    .read_slice(&mut bytes, GuestAddress(addr))
                    .unwrap();
                let header = Header::from_bytes(bytes[..HEADER_LEN].try_into().unwrap());
                packets.push((header, bytes[HEADER_LEN..].to_vec()));
                self.rx_seen = self.rx_seen.wrapping_add(1);
                self.offer_rx_buffer();
            }
            self.vsock.queue_notified(RX, &mut DetachedEvents);
            packets
        }

        /// The guest sends one packet.
        fn send(&mut self, header: Header, payload: &[u8]) {
            let addr = 0xc0000;
            let mut bytes = header.to_bytes().to_vec();
            bytes.extend_from_slice(payload);
            self.tx
                .memory
                .write_slice(&bytes, GuestAddress(addr))
                .unwrap();
            self.tx.offer_chain(&[(addr, bytes.len() as u32, false)]);
            self.vsock.queue_notified(TX, &mut DetachedEvents);
        }

        fn guest_header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len,
                kind: TYPE_STREAM,
                op,
                buf_alloc: 64 << 10,
                ..Default::default()
            }
        }
    }

    fn read_exact_with_timeout(stream: &mut UnixStream, n: usize) -> Vec<u8> {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut data = vec![0u8; n];
        stream.read_exact(&mut data).unwrap();
        data
    }

    #[test]
    fn reports_the_guest_cid_in_its_config() {
        let h = harness();
        let mut cid = [0u8; 8];
        h.vsock.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        assert_eq!(h.vsock.cid_reads.get(), 1);
    }

    #[test]
    fn a_host_program_connects_to_a_guest_port_and_data_flows_both_ways() {
        let mut h = harness();
        let mut host = UnixStream::connect(&h.path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let packets = h.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let request = packets[0].0;
        assert_eq!(
            (
                request.op,
                request.dst_port,
                request.dst_cid,
                request.src_cid
            ),
            (op::REQUEST, 1234, GUEST_CID, HOST_CID)
        );
        let host_port = request.src_port;
        h.send(h.guest_header(1234, host_port, op::RESPONSE, 0), &[]);
        assert_eq!(
            read_exact_with_timeout(&mut host, 3 + host_port.to_string().len() + 1),
            format!("OK {host_port}\n").into_bytes()
        );

        host.write_all(b"ping from host").unwrap();
        let packets = h.received();
        let data: Vec<u8> = packets
            .iter()
            .filter(|(p, _)| p.op == op::RW)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(data, b"ping from host");

        h.send(
            h.guest_header(1234, host_port, op::RW, 15),
            b"pong from guest",
        );
        assert_eq!(read_exact_with_timeout(&mut host, 15), b"pong from guest");
        let counters: BTreeMap<_, _> = h.vsock.counters().into_iter().collect();
        assert_eq!(
            (counters["bytes_to_guest"], counters["bytes_to_host"]),
            (14, 15)
        );

        // The host closes: the guest is told no more data comes.
        drop(host);
        let packets = h.received();
        assert!(
            packets
                .iter()
                .any(|(p, _)| p.op == op::SHUTDOWN && p.dst_port == 1234),
            "{packets:?}"
        );
    }

    #[test]
    fn a_guest_connection_reaches_the_host_listener_for_its_port() {
        let mut h = harness();
        let mut port_path = h.path.clone().into_os_string();
        port_path.push("_5000");
        let listener = UnixListener::bind(&port_path).unwrap();
        h.send(h.guest_header(777, 5000, op::REQUEST, 0), &[]);
        let packets = h.received();
        assert_eq!(packets[0].0.op, op::RESPONSE, "{packets:?}");
        let (mut host, _) = listener.accept().unwrap();
        h.send(h.guest_header(777, 5000, op::RW, 5), b"hello");
        assert_eq!(read_exact_with_timeout(&mut host, 5), b"hello");
        host.write_all(b"world").unwrap();
        let packets = h.received();
        let data: Vec<u8> = packets
            .iter()
            .filter(|(p, _)| p.op == op::RW)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(data, b"world");
        assert_eq!(
            packets
                .iter()
                .find(|(p, _)| p.op == op::RW)
                .unwrap()
                .0
                .dst_port,
            777
        );
        // A port nobody listens on is refused with a reset.
        h.send(h.guest_header(778, 5001, op::REQUEST, 0), &[]);
        let packets = h.received();
        assert!(
            packets
                .iter()
                .any(|(p, _)| p.op == op::RST && p.dst_port == 778),
            "{packets:?}"
        );
    }

    /// Host sockets do not survive a snapshot: the driver must drop its
    /// connections. A connection is open when the snapshot is taken; the
    /// VMM goes (the host program sees its stream end); the device restored
    /// from the saved transport state (as `run --restore` and a migration's
    /// destination do) puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the event
    /// buffer the driver left, advances the event queue's used ring and
    /// interrupts. A device that was merely activated (a boot) sends nothing.
    #[test]
    fn a_restored_device_tells_the_driver_its_transport_was_reset() {
        use super::super::mmio::{MmioTransport, TransportState};
        use super::super::{features, SavedQueue};
        const EVENT_BUFFER: u64 = 0xd0000;
        let mut h = harness();
        // The driver keeps buffers in the event queue (Linux fills it at probe);
        // this one is marked so a write shows.
        let mut event = TestQueue::at(h.rx.memory.clone(), EVENT_BASE);
        let memory = h.rx.memory.clone();
        memory
            .write_slice(&[0xff; 8], GuestAddress(EVENT_BUFFER))
            .unwrap();
        event.offer_chain(&[(EVENT_BUFFER, 8, true)]);

        // A host program's connection, accepted by the guest.
        let mut host = UnixStream::connect(&h.path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let request = h.received()[0].0;
        h.send(h.guest_header(1234, request.src_port, op::RESPONSE, 0), &[]);
        let answer = format!("OK {}\n", request.src_port);
        assert_eq!(
            read_exact_with_timeout(&mut host, answer.len()),
            answer.as_bytes()
        );
        assert_eq!(event.used_index(), 0, "a booted device sent an event");

        // The snapshot: the transport's state as `MmioTransport::save` writes
        // it (queues as big as a transport makes them), through JSON.
        let to_transport_size = |mut queue: SavedQueue| {
            queue.max_size = QUEUE_SIZE;
            queue
        };
        let state = TransportState {
            device_type: device_type::VSOCK,
            status: 0xf,
            driver_features: features::VERSION_1,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            interrupt_status: 0,
            setup_queues: (0..3)
                .map(|_| SavedQueue::from(&Queue::new(QUEUE_SIZE).unwrap()))
                .collect(),
            active_queues: Some(
                h.vsock
                    .queue_states()
                    .into_iter()
                    .map(to_transport_size)
                    .collect(),
            ),
            device: h.vsock.save_state(),
        };
        let state: TransportState =
            serde_json::from_value(serde_json::to_value(&state).unwrap()).unwrap();
        let Harness {
            vsock, path, _dir, ..
        } = h;
        drop(vsock);
        // The old VMM is gone: the host program's stream ends.
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        assert!(
            matches!(host.read_to_end(&mut rest), Ok(0)),
            "the host connection outlived its VMM: {rest:?}"
        );

        // The restored VMM: a new device on the same socket and guest memory.
        let config = VsockSpec {
            cid: GUEST_CID as u32,
            socket: Some(path.clone()),
        };
        let restored = Vsock::new(&config, Vsock::bind(&config).unwrap()).unwrap();
        let interrupt =
            Interrupt::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut transport =
            MmioTransport::new(Box::new(restored), memory.clone(), interrupt.clone()).unwrap();
        transport.restore(&state).unwrap();
        assert!(transport.is_activated());
        assert_eq!(event.used_index(), 1, "no transport-reset event");
        // virtio 1.2, 5.10.6.5: the event's id is its first le32; RESET is 0.
        assert_eq!(event.used_element(0), (0, 4));
        let mut written = [0u8; 8];
        memory
            .read_slice(&mut written, GuestAddress(EVENT_BUFFER))
            .unwrap();
        assert_eq!(written, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_ne!(interrupt.status() & super::super::INTERRUPT_USED_BUFFER, 0);
    }

    #[test]
    fn packets_that_lie_about_their_source_length_or_connection_are_refused() {
        let mut h = harness();
        let mut spoofed = h.guest_header(1, 5000, op::REQUEST, 0);
        spoofed.src_cid = 99;
        h.send(spoofed, &[]);
        let packets = h.received();
        assert_eq!(packets.len(), 1);
        assert_eq!(packets[0].0.op, op::RST);
        // Data on a connection that does not exist.
        h.send(h.guest_header(5, 6, op::RW, 4), b"junk");
        assert_eq!(h.received()[0].0.op, op::RST);
        // A length beyond the buffer is refused, not read past.
        let mut liar = h.guest_header(5, 6, op::RW, 60000);
        liar.len = 60000;
        h.send(liar, b"short");
        assert!(h.received().is_empty());
        assert!(!h.vsock.is_broken());
    }
}
