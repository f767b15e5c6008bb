//! The seed corpus in `fuzz/seeds/<target>/`: a few valid inputs per target,
//! built here with the encodings the targets decode, so that a bounded run
//! starts from requests a driver really sends instead of from nothing.
//!
//! Rewrite them after changing an encoding (the `seeds_on_disk_are_current`
//! test fails until then), from `fuzz/`:
//!
//! ```text
//! cargo test --lib write_seeds -- --ignored
//! ```

use std::path::{Path, PathBuf};

use vmm::devices::virtio::testing::{F_INDIRECT, F_NEXT, F_WRITE, QUEUE_SIZE};
use vmm::devices::virtio::vsock::{Header as VsockHeader, HEADER_LEN as VSOCK_HEADER, HOST_CID};

use crate::emulator::{self, Input, Mode, FLAG_USER, RFLAGS_FIXED, RFLAGS_OF};

/// One seed file: `fuzz/seeds/<target>/<name>`.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (target, list) in [
        ("block", block()),
        ("net", net()),
        ("rng", rng()),
        ("balloon", balloon()),
        ("vsock", vsock()),
    ] {
        seeds.extend(list.into_iter().map(|(name, image)| Seed {
            target,
            name,
            bytes: image.bytes(),
        }));
    }
    seeds.extend(emulator_seeds().into_iter().map(|(name, input, _)| Seed {
        target: "emulator",
        name,
        bytes: input.encode(),
    }));
    seeds
}

pub fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

// ---------------------------------------------------------------- virtio devices

/// `fuzz_device`'s first byte: bit 0 turns on EVENT_IDX, the rest (replicated
/// to every byte) masks the device's features. These take them all.
const ALL_FEATURES: u8 = 0xff;
/// Neither EVENT_IDX nor any device feature (indirect descriptors stay: every
/// device offers them).
const NO_FEATURES: u8 = 0x00;

/// Where `fuzz_device` puts queue `i`'s rings: `i * QUEUE_STRIDE`, the
/// available ring `AVAIL` and the used ring `USED` bytes further.
const QUEUE_STRIDE: u64 = 0x400;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Buffers whose contents matter sit between a queue's available and used
/// rings (past the EVENT_IDX word), so the image stays short.
const INLINE_DATA: u64 = 0x130;
/// Buffers whose contents do not matter (device-writable ones, zeros to
/// send) sit here and beyond, past the image: guest RAM there is zero.
const SPARE: u64 = 0x8000;

/// A buffer of a descriptor chain.
enum Buffer {
    /// Device-readable, with these contents.
    Bytes(Vec<u8>),
    /// Device-readable, `len` zero bytes.
    Zeros(u32),
    /// Device-writable, `len` bytes.
    Writable(u32),
}

/// The guest memory image `fuzz_device` reads after its first byte, filled
/// the way a driver fills its queues.
struct DriverImage {
    choice: u8,
    memory: Vec<u8>,
    next_descriptor: Vec<u16>,
    next_avail: Vec<u16>,
    next_inline: Vec<u64>,
    next_spare: u64,
}

impl DriverImage {
    fn new(choice: u8, queues: usize) -> Self {
        DriverImage {
            choice,
            memory: Vec::new(),
            next_descriptor: vec![0; queues],
            next_avail: vec![0; queues],
            next_inline: (0..queues as u64)
                .map(|i| i * QUEUE_STRIDE + INLINE_DATA)
                .collect(),
            next_spare: SPARE,
        }
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let (start, end) = (at as usize, at as usize + bytes.len());
        if self.memory.len() < end {
            self.memory.resize(end, 0);
        }
        self.memory[start..end].copy_from_slice(bytes);
    }

    /// Room for `len` bytes of contents in `queue`'s inline area.
    fn inline(&mut self, queue: usize, len: usize) -> u64 {
        let at = self.next_inline[queue];
        self.next_inline[queue] += len as u64;
        assert!(
            self.next_inline[queue] <= queue as u64 * QUEUE_STRIDE + USED,
            "queue {queue}'s inline data runs into its used ring"
        );
        at
    }

    /// Room for `len` bytes nobody reads before the device, page-aligned.
    fn spare(&mut self, len: u32) -> u64 {
        let at = self.next_spare;
        self.next_spare += u64::from(len).next_multiple_of(0x1000);
        at
    }

    /// (address, length, flags) of a buffer, its contents placed.
    fn place(&mut self, queue: usize, buffer: &Buffer) -> (u64, u32, u16) {
        match buffer {
            Buffer::Bytes(bytes) => {
                let at = self.inline(queue, bytes.len());
                self.put(at, bytes);
                (at, bytes.len() as u32, 0)
            }
            Buffer::Zeros(len) => (self.spare(*len), *len, 0),
            Buffer::Writable(len) => (self.spare(*len), *len, F_WRITE),
        }
    }

    fn descriptor(
        &mut self,
        table: u64,
        index: u16,
        (addr, len, flags): (u64, u32, u16),
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + u64::from(index) * 16, &raw);
    }

    /// Puts `head` in `queue`'s available ring and publishes it.
    fn offer(&mut self, queue: usize, head: u16) {
        let avail = queue as u64 * QUEUE_STRIDE + AVAIL;
        let slot = u64::from(self.next_avail[queue] % QUEUE_SIZE);
        self.put(avail + 4 + slot * 2, &head.to_le_bytes());
        self.next_avail[queue] += 1;
        let index = self.next_avail[queue];
        self.put(avail + 2, &index.to_le_bytes());
    }

    /// A chain of `buffers` in `queue`'s descriptor table, offered.
    fn chain(&mut self, queue: usize, buffers: &[Buffer]) -> &mut Self {
        let table = queue as u64 * QUEUE_STRIDE;
        let head = self.next_descriptor[queue];
        for (i, buffer) in buffers.iter().enumerate() {
            let index = head + i as u16;
            let (addr, len, mut flags) = self.place(queue, buffer);
            if i + 1 < buffers.len() {
                flags |= F_NEXT;
            }
            self.descriptor(table, index, (addr, len, flags), index + 1);
        }
        self.next_descriptor[queue] += buffers.len() as u16;
        self.offer(queue, head);
        self
    }

    /// A chain of `buffers` in an indirect table, one descriptor pointing at it.
    fn indirect_chain(&mut self, queue: usize, buffers: &[Buffer]) -> &mut Self {
        let table = self.inline(queue, buffers.len() * 16);
        for (i, buffer) in buffers.iter().enumerate() {
            let (addr, len, mut flags) = self.place(queue, buffer);
            if i + 1 < buffers.len() {
                flags |= F_NEXT;
            }
            self.descriptor(table, i as u16, (addr, len, flags), i as u16 + 1);
        }
        let head = self.next_descriptor[queue];
        let indirect = (table, buffers.len() as u32 * 16, F_INDIRECT);
        self.descriptor(queue as u64 * QUEUE_STRIDE, head, indirect, 0);
        self.next_descriptor[queue] += 1;
        self.offer(queue, head);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut bytes = vec![self.choice];
        bytes.extend_from_slice(&self.memory);
        bytes
    }
}

fn block_header(kind: u32, sector: u64) -> Buffer {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    Buffer::Bytes(header.to_vec())
}

/// A discard/write-zeroes range: sector, sector count, flags.
fn block_range(sector: u64, sectors: u32, flags: u32) -> Buffer {
    let mut range = sector.to_le_bytes().to_vec();
    range.extend_from_slice(&sectors.to_le_bytes());
    range.extend_from_slice(&flags.to_le_bytes());
    Buffer::Bytes(range)
}

/// Requests of each kind on the fuzz target's 1 MiB disk.
fn block() -> Vec<(&'static str, DriverImage)> {
    use virtio_bindings::virtio_blk::*;
    let status = || Buffer::Writable(1);
    let mut read_write = DriverImage::new(ALL_FEATURES, 1);
    read_write
        .chain(
            0,
            &[
                block_header(VIRTIO_BLK_T_IN, 1),
                Buffer::Writable(512),
                status(),
            ],
        )
        .chain(
            0,
            &[
                block_header(VIRTIO_BLK_T_OUT, 2),
                Buffer::Zeros(1024),
                status(),
            ],
        );
    let mut flush_id = DriverImage::new(ALL_FEATURES, 1);
    flush_id
        .chain(0, &[block_header(VIRTIO_BLK_T_FLUSH, 0), status()])
        .chain(
            0,
            &[
                block_header(VIRTIO_BLK_T_GET_ID, 0),
                Buffer::Writable(20),
                status(),
            ],
        );
    let mut ranges = DriverImage::new(ALL_FEATURES, 1);
    ranges
        .chain(
            0,
            &[
                block_header(VIRTIO_BLK_T_DISCARD, 0),
                block_range(4, 2, 0),
                status(),
            ],
        )
        .chain(
            0,
            &[
                block_header(VIRTIO_BLK_T_WRITE_ZEROES, 0),
                block_range(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                status(),
            ],
        );
    let mut indirect = DriverImage::new(NO_FEATURES, 1);
    indirect.indirect_chain(
        0,
        &[
            block_header(VIRTIO_BLK_T_OUT, 3),
            Buffer::Zeros(512),
            status(),
        ],
    );
    vec![
        ("read-write", read_write),
        ("flush-get-id", flush_id),
        ("discard-write-zeroes", ranges),
        ("indirect-write", indirect),
    ]
}

/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
fn net_header(flags: u8, csum_start: u16, csum_offset: u16) -> Vec<u8> {
    let mut header = vec![flags, 0];
    for field in [0u16, 0, csum_start, csum_offset, 0] {
        header.extend_from_slice(&field.to_le_bytes());
    }
    header
}

/// A broadcast IPv4/UDP frame with `payload`.
fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 255]);
    frame.extend_from_slice(&4000u16.to_be_bytes());
    frame.extend_from_slice(&4001u16.to_be_bytes());
    frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Frames sent whole and split, with a checksum to offload, and receive
/// buffers (queue 0 receives, 1 transmits).
fn net() -> Vec<(&'static str, DriverImage)> {
    use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM;
    let frame = udp_frame(b"bulkhead");
    let whole = [net_header(0, 0, 0), frame.clone()].concat();
    let mut transmit = DriverImage::new(ALL_FEATURES, 2);
    transmit.chain(1, &[Buffer::Bytes(whole)]).chain(
        1,
        &[
            Buffer::Bytes(net_header(0, 0, 0)),
            Buffer::Bytes(frame.clone()),
        ],
    );
    // UDP checksum at offset 6 of the UDP header, which starts at byte 34.
    let csum = net_header(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 34, 6);
    let mut offload = DriverImage::new(ALL_FEATURES, 2);
    offload
        .chain(0, &[Buffer::Writable(1526)])
        .chain(0, &[Buffer::Writable(12), Buffer::Writable(1514)])
        .chain(1, &[Buffer::Bytes([csum, frame].concat())]);
    vec![
        ("transmit", transmit),
        ("checksum-offload-receive", offload),
    ]
}

fn rng() -> Vec<(&'static str, DriverImage)> {
    let mut one = DriverImage::new(ALL_FEATURES, 1);
    one.chain(0, &[Buffer::Writable(64)]);
    let mut several = DriverImage::new(NO_FEATURES, 1);
    several
        .chain(0, &[Buffer::Writable(16), Buffer::Writable(32)])
        .chain(0, &[Buffer::Writable(8)]);
    vec![("one-buffer", one), ("two-chains", several)]
}

fn pfns(list: &[u32]) -> Buffer {
    Buffer::Bytes(list.iter().flat_map(|pfn| pfn.to_le_bytes()).collect())
}

/// Inflate and deflate page lists, statistics and a free-page report (with
/// every feature the queues are inflate, deflate, stats, reporting).
fn balloon() -> Vec<(&'static str, DriverImage)> {
    let mut stats = Vec::new();
    // free_memory, total_memory, available_memory (virtio 1.2, 5.5.6.3).
    for (tag, value) in [(4u16, 600u64 << 10), (5, 1 << 20), (6, 700 << 10)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&value.to_le_bytes());
    }
    let mut every_queue = DriverImage::new(ALL_FEATURES, 4);
    every_queue
        .chain(0, &[pfns(&[0x80, 0x81, 0x82, 0x90])])
        .chain(1, &[pfns(&[0x81])])
        .chain(2, &[Buffer::Bytes(stats)])
        .chain(3, &[Buffer::Writable(0x2000)]);
    let mut inflate = DriverImage::new(NO_FEATURES, 4);
    inflate.chain(0, &[pfns(&[0xa0, 0xa1]), pfns(&[0xb0])]);
    vec![("every-queue", every_queue), ("inflate-only", inflate)]
}

/// Stream packets from the guest (CID 3, the target's) to the host.
fn vsock_packet(op: u16, payload: &[u8]) -> Buffer {
    let header = VsockHeader {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: 5000,
        len: payload.len() as u32,
        kind: 1, // VIRTIO_VSOCK_TYPE_STREAM
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    };
    Buffer::Bytes([&header.to_bytes()[..], payload].concat())
}

/// A connection's life on the transmit queue, with receive and event buffers;
/// and packets a driver should not send (queues: rx, tx, event).
fn vsock() -> Vec<(&'static str, DriverImage)> {
    // virtio 1.2, 5.10.6: the packet operations.
    const REQUEST: u16 = 1;
    const SHUTDOWN: u16 = 4;
    const RW: u16 = 5;
    const CREDIT_UPDATE: u16 = 6;
    const CREDIT_REQUEST: u16 = 7;
    let rx = VSOCK_HEADER as u32 + 256;
    let mut connection = DriverImage::new(ALL_FEATURES, 3);
    connection
        .chain(0, &[Buffer::Writable(rx)])
        .chain(
            0,
            &[Buffer::Writable(VSOCK_HEADER as u32), Buffer::Writable(256)],
        )
        .chain(1, &[vsock_packet(REQUEST, &[])])
        .chain(1, &[vsock_packet(RW, b"hello")])
        .chain(1, &[vsock_packet(CREDIT_UPDATE, &[])])
        .chain(1, &[vsock_packet(SHUTDOWN, &[])])
        .chain(2, &[Buffer::Writable(4)]);
    let mut odd = DriverImage::new(NO_FEATURES, 3);
    let mut wrong_cid = vsock_packet(CREDIT_REQUEST, &[]);
    if let Buffer::Bytes(bytes) = &mut wrong_cid {
        bytes[0] = 7;
    }
    let mut long_len = vsock_packet(RW, b"abc");
    if let Buffer::Bytes(bytes) = &mut long_len {
        bytes[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
    }
    odd.chain(0, &[Buffer::Writable(rx)])
        .chain(1, &[wrong_cid])
        .chain(1, &[long_len])
        .chain(1, &[vsock_packet(99, &[])]);
    vec![("connection", connection), ("bad-packets", odd)]
}

// ---------------------------------------------------------------- instruction emulator

/// What a seed's instruction must do on any host (or on this one only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Completed,
    Exception(u8),
    /// Depends on the host CPU's features (XSAVEC, RDRAND).
    HostDependent,
}

/// Where the seeds put code and data: physical 0x20 and 0x40 (64-byte
/// aligned, as XSAVE wants), the page tables below them.
const CODE: u64 = 0x20;
const DATA: u64 = 0x40;

/// The linear address at which `mode`'s seed page tables map physical 0.
fn linear_base(mode: Mode) -> u64 {
    match mode {
        Mode::Real | Mode::Protected16 | Mode::Protected32 => 0,
        Mode::Paging32 => 0x40_0000,
        Mode::Pae => 0x20_0000,
        Mode::Long | Mode::Long5 | Mode::Compat => 0x4000_0000,
    }
}

/// The smallest page tables mapping physical 0 at `linear_base`, with
/// tables sharing page 0: one large page, 16 bytes of entries.
fn page_tables(mode: Mode, user: bool) -> Vec<u8> {
    const P_RW: u64 = 0x3;
    const US: u64 = 0x4;
    const PS: u64 = 0x80;
    let us = if user { US } else { 0 };
    let entries: Vec<u64> = match mode {
        Mode::Real | Mode::Protected16 | Mode::Protected32 => return Vec::new(),
        // PDE 1: a 4 MiB page at 0 (4-byte entries: the second word is PDE 1).
        Mode::Paging32 => vec![(P_RW | us | PS) << 32],
        // PDPTE 0 (present, no rights) → the PD at page 0, whose entry 1 is
        // a 2 MiB page at 0.
        Mode::Pae => vec![0x1, P_RW | us | PS],
        // PML5E 0 and PML4E 0 → page 0 again; PDPTE 1 is a 1 GiB page at 0.
        Mode::Long | Mode::Long5 | Mode::Compat => vec![P_RW | us, P_RW | us | PS],
    };
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// A vCPU in `mode` at the instruction `code` (also reported by KVM when
/// `reported`), RBX/RSI/RDI pointing at DATA, holding `data`.
fn instruction(mode: Mode, code: &[u8], reported: bool, data: &[u8]) -> Input {
    let base = linear_base(mode);
    let mut memory = page_tables(mode, false);
    memory.resize(CODE as usize, 0);
    memory.extend_from_slice(code);
    if !data.is_empty() {
        memory.resize(DATA as usize, 0);
        memory.extend_from_slice(data);
    }
    let mut gprs = [0u64; 16];
    for register in [3, 6, 7] {
        gprs[register] = base + DATA;
    }
    Input {
        mode: emulator::MODES.iter().position(|&m| m == mode).unwrap() as u8,
        reported: if reported { code.to_vec() } else { Vec::new() },
        rip: base + CODE,
        rflags: RFLAGS_FIXED,
        gprs,
        xcr0: 0x7,
        fcw: 0x037f,
        mxcsr: 0x1f80,
        mxcsr_mask: 0xffff,
        memory,
        ..Default::default()
    }
}

/// Each instruction the emulator implements, in the modes and paging modes it
/// must handle; fetched through the page tables where not reported.
pub fn emulator_seeds() -> Vec<(&'static str, Input, Expect)> {
    use Expect::*;
    use Mode::*;
    let with = |mut input: Input, edit: &dyn Fn(&mut Input)| {
        edit(&mut input);
        input
    };
    let value = |v: u64| v.to_le_bytes().to_vec();
    vec![
        (
            "popcnt-64",
            with(
                instruction(Long, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3], true, &[]),
                &|i| i.gprs[3] = 0xf0f0_0000_0000_0001,
            ),
            Completed,
        ),
        (
            "lzcnt-64-memory-fetched",
            instruction(
                Long,
                &[0xf3, 0x48, 0x0f, 0xbd, 0x03],
                false,
                &value(0xffff << 32),
            ),
            Completed,
        ),
        (
            "popcnt-la57-fetched",
            instruction(Long5, &[0xf3, 0x0f, 0xb8, 0x03], false, &value(0xff)),
            Completed,
        ),
        (
            "tzcnt-32-paging-fetched",
            with(
                instruction(Paging32, &[0xf3, 0x0f, 0xbc, 0xc1], false, &[]),
                &|i| i.gprs[1] = 0x100,
            ),
            Completed,
        ),
        (
            "bsf-pae-memory-fetched",
            instruction(Pae, &[0x0f, 0xbc, 0x03], false, &value(0x80)),
            Completed,
        ),
        (
            "bsr-real-fetched",
            with(instruction(Real, &[0x0f, 0xbd, 0xc3], false, &[]), &|i| {
                i.gprs[3] = 0x1234
            }),
            Completed,
        ),
        (
            "xgetbv",
            instruction(Long, &[0x0f, 0x01, 0xd0], true, &[]),
            Completed,
        ),
        (
            "xsetbv",
            with(instruction(Long, &[0x0f, 0x01, 0xd1], true, &[]), &|i| {
                (i.gprs[0], i.gprs[1]) = (0x3, 0)
            }),
            Completed,
        ),
        (
            "cmpxchg16b",
            instruction(Long, &[0xf0, 0x48, 0x0f, 0xc7, 0x0e], true, &[]),
            Completed,
        ),
        (
            "cmpxchg8b-compat",
            with(
                instruction(Compat, &[0x0f, 0xc7, 0x0e], true, &value(5)),
                &|i| i.gprs[0] = 1,
            ),
            Completed,
        ),
        (
            "fxsave64",
            instruction(Long, &[0x48, 0x0f, 0xae, 0x07], true, &[]),
            Completed,
        ),
        (
            "fxrstor-32",
            instruction(Protected32, &[0x0f, 0xae, 0x0f], false, &[]),
            Completed,
        ),
        (
            "xsave-64",
            with(instruction(Long, &[0x0f, 0xae, 0x27], true, &[]), &|i| {
                i.gprs[0] = 0x3
            }),
            Completed,
        ),
        (
            "xrstor-64",
            with(instruction(Long, &[0x0f, 0xae, 0x2f], true, &[]), &|i| {
                i.gprs[0] = 0x3
            }),
            Completed,
        ),
        (
            "xsavec-64",
            with(instruction(Long, &[0x0f, 0xc7, 0x27], true, &[]), &|i| {
                i.gprs[0] = 0x3
            }),
            HostDependent,
        ),
        (
            "ldmxcsr",
            instruction(Long, &[0x0f, 0xae, 0x17], false, &0x1f80u32.to_le_bytes()),
            Completed,
        ),
        (
            "vstmxcsr",
            instruction(Long, &[0xc5, 0xf8, 0xae, 0x1f], true, &[]),
            Completed,
        ),
        ("int3", instruction(Long, &[0xcc], true, &[]), Exception(3)),
        (
            "into-overflow",
            with(instruction(Protected32, &[0xce], false, &[]), &|i| {
                i.rflags |= RFLAGS_OF
            }),
            Exception(4),
        ),
        (
            "clac-user",
            with(instruction(Long, &[0x0f, 0x01, 0xca], false, &[]), &|i| {
                i.flags = FLAG_USER;
                i.memory[..16].copy_from_slice(&page_tables(Long, true));
            }),
            Exception(6),
        ),
        (
            "fwait-pending",
            with(instruction(Protected32, &[0x9b], true, &[]), &|i| {
                // Invalid operation flagged, and unmasked.
                (i.fsw, i.fcw) = (0x0001, 0x0000)
            }),
            Exception(16),
        ),
        (
            "rdrand",
            instruction(Long, &[0x48, 0x0f, 0xc7, 0xf0], true, &[]),
            HostDependent,
        ),
        (
            "page-fault",
            with(
                instruction(Long, &[0xf3, 0x48, 0x0f, 0xb8, 0x03], true, &[]),
                &|i| {
                    // PDPTE 2 is not present.
                    i.gprs[3] = 0x8000_0000
                },
            ),
            Exception(14),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vmm::arch::x86_64::emulator::Outcome;

    fn on_disk() -> BTreeMap<(String, String), Vec<u8>> {
        let mut files = BTreeMap::new();
        let Ok(targets) = std::fs::read_dir(seeds_dir()) else {
            return files;
        };
        for target in targets {
            let target = target.unwrap();
            for file in std::fs::read_dir(target.path()).unwrap() {
                let file = file.unwrap();
                files.insert(
                    (
                        target.file_name().to_string_lossy().into_owned(),
                        file.file_name().to_string_lossy().into_owned(),
                    ),
                    std::fs::read(file.path()).unwrap(),
                );
            }
        }
        files
    }

    fn generated() -> BTreeMap<(String, String), Vec<u8>> {
        all()
            .into_iter()
            .map(|seed| ((seed.target.into(), seed.name.into()), seed.bytes))
            .collect()
    }

    /// The documented way to (re)write `fuzz/seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds; run after changing an encoding"]
    fn write_seeds() {
        let dir = seeds_dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        for ((target, name), bytes) in generated() {
            std::fs::create_dir_all(dir.join(&target)).unwrap();
            std::fs::write(dir.join(&target).join(name), bytes).unwrap();
        }
    }

    #[test]
    fn seeds_on_disk_are_current() {
        assert!(
            on_disk() == generated(),
            "fuzz/seeds is stale: run `cargo test --lib write_seeds -- --ignored` in fuzz/"
        );
    }

    /// Each emulator seed gets past decoding and fetching to do what its
    /// instruction does, and passes the target's checks.
    #[test]
    fn emulator_seeds_do_what_they_say() {
        for (name, input, expect) in emulator_seeds() {
            let result = emulator::emulate(&input.encode());
            match expect {
                Expect::Completed => {
                    assert_eq!(result.unwrap(), Outcome::Completed, "{name}")
                }
                Expect::Exception(vector) => assert_eq!(
                    result.unwrap(),
                    Outcome::ExceptionInjected { vector },
                    "{name}"
                ),
                Expect::HostDependent => {}
            }
        }
    }

    #[test]
    fn seeds_are_small() {
        for seed in all() {
            assert!(seed.bytes.len() <= 4096, "{}/{}", seed.target, seed.name);
        }
    }
}
