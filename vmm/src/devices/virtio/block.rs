//! virtio-blk backed by a host file: read, write, flush, discard,
//! write-zeroes and get-id, one queue, synchronous I/O on the device thread.

use super::chain::ParsedChain;
use super::{
    device_type, drain_queue, read_config_bytes, ActivateError, Activation, ActiveQueue, Chain,
    DeviceEvents, Drained, QueueT, VirtioDevice,
};
use crate::config::DiskSpec;
use crate::devices::rate_limiter::RateLimiter;
use event_manager::EventSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Longest request accepted: Linux's default max_sectors_kb is far below.
const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Discard and write-zeroes take one range per request.
const MAX_RANGES: u32 = 1;
const ID_BYTES: usize = 20;
const LIMITER_TOKEN: u32 = 0;

/// Feature bits (virtio-bindings numbers them; these are the masks).
mod feature {
    use virtio_bindings::virtio_blk as blk;
    pub const SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
    pub const DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES;
}

mod request {
    use virtio_bindings::virtio_blk as blk;
    pub const IN: u32 = blk::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = blk::VIRTIO_BLK_T_OUT;
    pub const FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = blk::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = blk::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// The status byte at the end of every request.
pub mod status {
    use virtio_bindings::virtio_blk as blk;
    pub const OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
    pub const IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
    pub const UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;
}

const WRITE_ZEROES_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the rate-limit timer for disk {path}: {source}")]
    Timer {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is empty or smaller than one 512-byte sector")]
    TooSmall { path: String },
}

/// What the disk served, for reports (read under the transport's lock).
#[derive(Debug, Default)]
struct BlockStats {
    requests: u64,
    bytes_read: u64,
    bytes_written: u64,
    flushes: u64,
    errors: u64,
}

pub struct Block {
    name: String,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    running: Option<ActiveQueue>,
    broken: bool,
    stats: BlockStats,
    limiter: Option<RateLimiter>,
}

impl Block {
    /// Opens `config`'s file with the rights of this process (`bulkhead run`);
    /// a daemon-started VMM gets the file open instead.
    pub fn open_file(config: &DiskSpec) -> Result<File, BlockError> {
        OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.display().to_string(),
                source,
            })
    }

    /// `config`'s disk on `file`, opened for writing unless the disk is read-only.
    pub fn new(config: &DiskSpec, file: File, name: &str) -> Result<Block, BlockError> {
        let path = config.path.display().to_string();
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall { path });
        }
        if len % SECTOR_SIZE != 0 {
            tracing::warn!(
                disk = path,
                "the last {} bytes are not a whole sector and are not visible",
                len % SECTOR_SIZE
            );
        }
        let limiter =
            match config.rate_limit.is_unlimited() {
                true => None,
                false => Some(RateLimiter::new(&config.rate_limit).map_err(|source| {
                    BlockError::Timer {
                        path: path.clone(),
                        source,
                    }
                })?),
            };
        let id_source = config.id.clone().unwrap_or_else(|| {
            config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut id = [0u8; ID_BYTES];
        let n = id_source.len().min(ID_BYTES);
        id[..n].copy_from_slice(&id_source.as_bytes()[..n]);
        Ok(Block {
            name: name.to_string(),
            file,
            read_only: config.readonly,
            capacity_sectors,
            id,
            config: config_space(capacity_sectors),
            running: None,
            broken: false,
            stats: BlockStats::default(),
            limiter,
        })
    }

    fn process_queue(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        let mut used_any = false;
        let mut broken = None;
        let memory = running.memory.clone();
        let drained = drain_queue(&mut running.queue, &memory, |queue, chain| {
            let parsed = match ParsedChain::parse(chain, &memory, MAX_REQUEST_BYTES + 4096) {
                Ok(parsed) => parsed,
                Err(e) => {
                    broken = Some(e.to_string());
                    return Chain::Broken;
                }
            };
            if let Some(limiter) = &mut self.limiter {
                let data = parsed.readable_len() + parsed.writable_len();
                if !limiter.consume(data.saturating_sub(17)) {
                    return Chain::Throttled;
                }
            }
            let Some(written) = self.execute(&parsed) else {
                broken = Some("a request has no status byte".into());
                return Chain::Broken;
            };
            if queue.add_used(&memory, parsed.head, written).is_err() {
                broken = Some("cannot write the used ring".into());
                return Chain::Broken;
            }
            used_any = true;
            Chain::Done
        });
        if used_any && running.queue.needs_notification(&memory).unwrap_or(true) {
            running.interrupt.signal_used_buffer();
        }
        if drained == Drained::Broken {
            let reason = broken.unwrap_or_else(|| "the available ring is invalid".into());
            tracing::warn!(
                device = self.name,
                "driver error, device needs reset: {reason}"
            );
            self.broken = true;
            running.interrupt.signal_config_change();
        }
        self.running = Some(running);
    }

    /// Runs one request; returns the bytes written to the guest (data and
    /// status), or None when there is nowhere to put the status.
    fn execute(&mut self, chain: &ParsedChain<'_>) -> Option<u32> {
        let writable = chain.writable_len();
        if writable == 0 {
            return None;
        }
        let status_offset = writable - 1;
        self.stats.requests += 1;
        let (status, data_written) = match self.serve(chain, status_offset) {
            Ok(written) => (status::OK, written),
            Err(status) => {
                self.stats.errors += 1;
                (status, 0)
            }
        };
        chain.write_at(status_offset, &[status]);
        Some((data_written + 1) as u32)
    }

    /// Returns the data bytes written to the guest, or the error status.
    fn serve(&mut self, chain: &ParsedChain<'_>, data_in_len: u64) -> Result<u64, u8> {
        let mut request = chain.reader().map_err(|_| status::IOERR)?;
        let mut header = [0u8; 16];
        if request.read_exact(&mut header).is_err() {
            return Err(status::IOERR);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_out_len = chain.readable_len() - 16;
        match kind {
            request::IN => {
                let offset = self.checked_range(sector, data_in_len)?;
                let iovecs = chain.writable_iovecs(0, data_in_len);
                transfer_all(&self.file, iovecs, offset, Direction::FromFile)
                    .map_err(|e| self.io_error("read", e))?;
                self.stats.bytes_read += data_in_len;
                Ok(data_in_len)
            }
            request::OUT => {
                if self.read_only {
                    return Err(status::IOERR);
                }
                let offset = self.checked_range(sector, data_out_len)?;
                let iovecs = chain.readable_iovecs(16, data_out_len);
                transfer_all(&self.file, iovecs, offset, Direction::ToFile)
                    .map_err(|e| self.io_error("write", e))?;
                self.stats.bytes_written += data_out_len;
                Ok(0)
            }
            request::FLUSH => {
                self.stats.flushes += 1;
                if !self.read_only {
                    self.file
                        .sync_data()
                        .map_err(|e| self.io_error("flush", e))?;
                }
                Ok(0)
            }
            request::GET_ID => {
                let n = (ID_BYTES as u64).min(data_in_len);
                let mut reply = chain.writer().map_err(|_| status::IOERR)?;
                Ok(reply.write(&self.id[..n as usize]).unwrap_or(0) as u64)
            }
            request::DISCARD | request::WRITE_ZEROES => {
                if self.read_only {
                    return Err(status::IOERR);
                }
                if data_out_len != 16 * u64::from(MAX_RANGES) {
                    return Err(status::UNSUPP);
                }
                let mut range = [0u8; 16];
                if request.read_exact(&mut range).is_err() {
                    return Err(status::IOERR);
                }
                let start = u64::from_le_bytes(range[0..8].try_into().unwrap());
                let sectors = u64::from(u32::from_le_bytes(range[8..12].try_into().unwrap()));
                let flags = u32::from_le_bytes(range[12..16].try_into().unwrap());
                let offset = self.checked_range(start, sectors * SECTOR_SIZE)?;
                let unmap = kind == request::DISCARD || flags & WRITE_ZEROES_UNMAP != 0;
                zero_range(&self.file, offset, sectors * SECTOR_SIZE, unmap)
                    .map_err(|e| self.io_error("discard or write-zeroes", e))?;
                Ok(0)
            }
            _ => Err(status::UNSUPP),
        }
    }

    /// The byte offset of `sector`, if `len` bytes from there are on the disk
    /// and `len` is whole sectors.
    fn checked_range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        let sectors = len / SECTOR_SIZE;
        if !len.is_multiple_of(SECTOR_SIZE)
            || sector
                .checked_add(sectors)
                .is_none_or(|end| end > self.capacity_sectors)
        {
            return Err(status::IOERR);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn io_error(&self, what: &str, error: std::io::Error) -> u8 {
        tracing::warn!(device = self.name, "{what} failed: {error}");
        status::IOERR
    }
}

/// The virtio-blk configuration space (virtio 1.2, 5.2.4).
fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; 60];
    config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    // seg_max: a chain holds the header and status besides the data.
    config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    let max_sectors = (u32::MAX >> 9).to_le_bytes();
    // max_discard_sectors, max_discard_seg, discard_sector_alignment
    config[36..40].copy_from_slice(&max_sectors);
    config[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes());
    config[44..48].copy_from_slice(&8u32.to_le_bytes());
    // max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
    config[48..52].copy_from_slice(&max_sectors);
    config[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes());
    config[56] = 1;
    config
}

enum Direction {
    FromFile,
    ToFile,
}

/// preadv/pwritev until every byte moved, resuming after short transfers.
fn transfer_all(
    file: &File,
    mut iovecs: Vec<libc::iovec>,
    mut offset: u64,
    direction: Direction,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let count = (iovecs.len() - first).min(libc::UIO_MAXIOV as usize) as i32;
        // SAFETY: every iovec points into guest memory that stays mapped for
        // the VM's lifetime (checked when the chain was parsed), and `count`
        // entries from `first` exist.
        let done = unsafe {
            match direction {
                Direction::FromFile => libc::preadv(
                    file.as_raw_fd(),
                    iovecs[first..].as_ptr(),
                    count,
                    offset as i64,
                ),
                Direction::ToFile => libc::pwritev(
                    file.as_raw_fd(),
                    iovecs[first..].as_ptr(),
                    count,
                    offset as i64,
                ),
            }
        };
        if done < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if done == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the disk file is shorter than its capacity",
            ));
        }
        offset += done as u64;
        let mut left = done as usize;
        while left > 0 && first < iovecs.len() {
            let vec = &mut iovecs[first];
            if left >= vec.iov_len {
                left -= vec.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec's buffer.
                vec.iov_base = unsafe { vec.iov_base.cast::<u8>().add(left) }.cast();
                vec.iov_len -= left;
                left = 0;
            }
        }
        while first < iovecs.len() && iovecs[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// Zeroes `len` bytes at `offset`, deallocating them when `unmap` is allowed;
/// falls back to writing zeros where the file system cannot.
fn zero_range(file: &File, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn queue_states(&self) -> Vec<super::SavedQueue> {
        self.running
            .iter()
            .map(|running| super::SavedQueue::from(&running.queue))
            .collect()
    }

    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.read_only {
            features |= feature::RO;
        } else {
            features |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
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
        // While throttled, the limiter's timer resumes the queue.
        if !self.limiter.as_ref().is_some_and(RateLimiter::is_throttled) {
            self.process_queue();
        }
    }

    fn initial_event_sources(&self) -> Vec<(RawFd, u32, EventSet)> {
        self.limiter
            .iter()
            .map(|limiter| (limiter.timer_fd(), LIMITER_TOKEN, EventSet::IN))
            .collect()
    }

    fn handle_event(&mut self, token: u32, _events: EventSet, _ops: &mut dyn DeviceEvents) {
        if let (LIMITER_TOKEN, Some(limiter)) = (token, &mut self.limiter) {
            limiter.timer_fired();
            if !self.broken {
                self.process_queue();
            }
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
            ("requests", s.requests),
            ("bytes_read", s.bytes_read),
            ("bytes_written", s.bytes_written),
            ("flushes", s.flushes),
            ("errors", s.errors),
            (
                "throttled",
                self.limiter.as_ref().map_or(0, |l| l.throttled_count),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{device_queue, TestQueue, DATA};
    use super::super::Interrupt;
    use super::*;
    use crate::config::RateLimit;
    use vm_memory::{Bytes, GuestAddress};

    struct Harness {
        q: TestQueue,
        block: Block,
        file: tempfile_path::TempFile,
    }

    /// A temporary file that is deleted when dropped.
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(bytes: &[u8]) -> Self {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("bulkhead-block-{}-{n}", std::process::id()));
                std::fs::write(&path, bytes).unwrap();
                TempFile(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn harness(read_only: bool) -> Harness {
        harness_limited(read_only, RateLimit::default())
    }

    fn harness_limited(read_only: bool, rate_limit: RateLimit) -> Harness {
        let mut content = vec![0u8; 64 * 512];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let file = tempfile_path::TempFile::new(&content);
        let config = DiskSpec {
            path: file.0.clone(),
            readonly: read_only,
            id: Some("test-disk".into()),
            rate_limit,
        };
        let mut block = Block::new(&config, Block::open_file(&config).unwrap(), "vda").unwrap();
        let q = TestQueue::new();
        let interrupt =
            Interrupt::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        block
            .activate(Activation {
                memory: q.memory.clone(),
                queues: vec![device_queue()],
                interrupt,
                features: 0,
            })
            .unwrap();
        Harness { q, block, file }
    }

    const HEADER: u64 = DATA;
    const BUFFER: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    impl Harness {
        /// Submits one request; returns (status, used length).
        fn submit(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let memory = self.q.memory.clone();
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
            memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HEADER, 16, false)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, true));
            let before = self.q.used_index();
            self.q.offer_chain(&chain);
            self.block.process_queue();
            assert_eq!(
                self.q.used_index(),
                before.wrapping_add(1),
                "request not completed"
            );
            let (_, len) = self.q.used_element(before);
            (memory.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

    #[test]
    fn reads_and_writes_sectors_of_the_host_file() {
        let mut h = harness(false);
        let memory = h.q.memory.clone();
        assert_eq!(
            h.submit(request::IN, 3, &[(BUFFER, 1024, true)]),
            (status::OK, 1025)
        );
        let mut data = vec![0u8; 1024];
        memory.read_slice(&mut data, GuestAddress(BUFFER)).unwrap();
        assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));

        memory
            .write_slice(&[0xab; 512], GuestAddress(BUFFER))
            .unwrap();
        assert_eq!(
            h.submit(request::OUT, 10, &[(BUFFER, 512, false)]),
            (status::OK, 1)
        );
        assert_eq!(h.submit(request::FLUSH, 0, &[]), (status::OK, 1));
        let on_disk = std::fs::read(&h.file.0).unwrap();
        assert!(on_disk[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
        assert!(on_disk[11 * 512..12 * 512].iter().all(|&b| b == 11));
        assert_eq!(h.block.stats.bytes_written, 512);
    }

    #[test]
    fn refuses_requests_past_the_end_or_of_partial_sectors() {
        let mut h = harness(false);
        assert_eq!(
            h.submit(request::IN, 63, &[(BUFFER, 1024, true)]).0,
            status::IOERR
        );
        assert_eq!(
            h.submit(request::IN, u64::MAX, &[(BUFFER, 512, true)]).0,
            status::IOERR
        );
        assert_eq!(
            h.submit(request::OUT, 0, &[(BUFFER, 100, false)]).0,
            status::IOERR
        );
        assert_eq!(h.submit(77, 0, &[]).0, status::UNSUPP);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_with_an_error_status() {
        let mut h = harness(true);
        assert_ne!(h.block.device_features() & feature::RO, 0);
        assert_eq!(
            h.submit(request::OUT, 0, &[(BUFFER, 512, false)]).0,
            status::IOERR
        );
        assert_eq!(
            h.submit(request::IN, 0, &[(BUFFER, 512, true)]).0,
            status::OK
        );
        let on_disk = std::fs::read(&h.file.0).unwrap();
        assert!(on_disk[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn discards_and_zeroes_ranges_and_answers_its_id() {
        let mut h = harness(false);
        let memory = h.q.memory.clone();
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&2u64.to_le_bytes());
        range[8..12].copy_from_slice(&3u32.to_le_bytes());
        memory.write_slice(&range, GuestAddress(BUFFER)).unwrap();
        assert_eq!(
            h.submit(request::WRITE_ZEROES, 0, &[(BUFFER, 16, false)]).0,
            status::OK
        );
        assert_eq!(
            h.submit(request::DISCARD, 0, &[(BUFFER, 16, false)]).0,
            status::OK
        );
        let on_disk = std::fs::read(&h.file.0).unwrap();
        assert_eq!(on_disk.len(), 64 * 512);
        assert!(on_disk[2 * 512..5 * 512].iter().all(|&b| b == 0));
        assert!(on_disk[5 * 512..6 * 512].iter().all(|&b| b == 5));

        assert_eq!(
            h.submit(request::GET_ID, 0, &[(BUFFER, 20, true)]),
            (status::OK, 21)
        );
        let mut id = [0u8; 20];
        memory.read_slice(&mut id, GuestAddress(BUFFER)).unwrap();
        assert_eq!(&id[..9], b"test-disk");
    }

    #[test]
    fn a_chain_outside_memory_breaks_the_device_without_touching_the_file() {
        let mut h = harness(false);
        h.q.offer_chain(&[
            (HEADER, 16, false),
            (u64::MAX - 100, 512, false),
            (STATUS, 1, true),
        ]);
        h.block.process_queue();
        assert!(h.block.is_broken());
        assert_eq!(h.q.used_index(), 0);
        assert_eq!(h.block.stats.requests, 0);
    }

    #[test]
    fn a_driver_claiming_more_chains_than_the_queue_holds_breaks_the_device() {
        let mut h = harness(false);
        h.q.set_avail_index(100);
        h.block.process_queue();
        assert!(h.block.is_broken());
    }

    /// A capped disk moves no more than its cap (plus its burst) over a
    /// measured window, however hard the driver pushes; a slow machine can
    /// only make it move less.
    #[test]
    fn a_capped_disk_moves_no_more_than_its_cap() {
        const CAP: u64 = 256 << 10;
        let mut h = harness_limited(
            false,
            RateLimit {
                bytes_per_sec: Some(CAP),
                bytes_burst: Some(CAP / 4),
                ..Default::default()
            },
        );
        let window = std::time::Duration::from_millis(1500);
        let started = std::time::Instant::now();
        let mut completed = 0u64;
        while started.elapsed() < window {
            let before = h.q.used_index();
            h.q.offer_chain(&[(HEADER, 16, false), (BUFFER, 4096, true), (STATUS, 1, true)]);
            h.block.process_queue();
            while h.q.used_index() == before && started.elapsed() < window {
                // Throttled: wait for the limiter's timer as the event loop would.
                let limiter = h.block.limiter.as_mut().unwrap();
                assert!(limiter.is_throttled());
                let mut fds = [libc::pollfd {
                    fd: limiter.timer_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: polls one timerfd we own, 50 ms at most.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
                if fds[0].revents != 0 {
                    limiter.timer_fired();
                    h.block.process_queue();
                }
            }
            if h.q.used_index() != before {
                completed += 4096;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let allowed = (CAP as f64 * elapsed) as u64 + CAP / 4 + 4096;
        assert!(
            completed <= allowed,
            "{completed} bytes in {elapsed:.2}s, cap {CAP}/s"
        );
        assert!(completed >= CAP / 2, "only {completed} bytes passed");
        assert!(h.block.limiter.as_ref().unwrap().throttled_count > 0);
    }
}
