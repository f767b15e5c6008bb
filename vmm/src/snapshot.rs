//! Snapshots: the whole state of a paused VM in a directory, and reading it back.
//!
//! ```text
//! DIR/memory         guest RAM, regions back to back (sparse: zero pages are holes)
//! DIR/state.json     vCPUs, KVM's irqchip/PIT/clock, devices, the machine (VmState)
//! DIR/manifest.json  format name and version, each file's size and CRC-32; written last
//! ```
//!
//! A snapshot is written into a hidden sibling directory and renamed into
//! place once complete, so a writer killed half-way leaves nothing at DIR.
//! Restoring maps `memory` privately (copy-on-write): pages are read from the
//! file when the guest first touches them, and two restores of one snapshot
//! are independent clones.

use crate::arch::x86_64::state::{VcpuState, VmState};
use crate::config::VmSpec;
use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const FORMAT: &str = "bulkhead-snapshot";
/// The format this Bulkhead writes.
///
/// Compatibility rules: a snapshot of any version from [`MIN_READABLE_VERSION`]
/// to [`VERSION`] restores. A field added to the state carries a serde default,
/// a board device added later is absent from older states and starts as at
/// power-on (`persist.rs`); neither changes the version. The version is bumped when a field changes meaning;
/// [`MIN_READABLE_VERSION`] is raised only when the old meaning cannot be
/// read any more, which breaks every older snapshot and is said in the
/// release notes. `cli/tests/fixtures/` holds a snapshot of each readable
/// version, written once by the Bulkhead of its time, that every later one
/// must restore.
///
/// 2: the full ACPI platform (PM1 block), virtio IRQs without 9 (the SCI's).
/// 3: virtio devices' state keyed by device id, each device's own state
/// typed; a version 2 state is read by keying its list ([`SavedVm::decode`]).
/// 4: vCPUs' state keyed by vCPU id; an older state's list is keyed by position
/// (the list was in id order).
/// 5: the board's devices (UART, i8042, CMOS, PM1, PCI) in `devices` by id,
/// beside the virtio devices; an older state's fields are moved there.
/// 6: the machine is the API's VM spec ([`VmSpec`]: `nics`, `readonly`, MACs
/// as text, a vsock CID of 32 bits, the user's command line); an older
/// machine is brought to it by [`machine_as_spec`].
pub const VERSION: u32 = 6;
/// The oldest format this Bulkhead restores (1 had another interrupt layout).
pub const MIN_READABLE_VERSION: u32 = 2;
pub const MEMORY_FILE: &str = "memory";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const PAGE: usize = 4096;
/// Memory is copied out of the guest this much at a time.
const CHUNK: usize = 1 << 20;

/// Everything but guest RAM: what `state.json` holds, and what a migration
/// sends after the last memory pages.
#[derive(Serialize, Deserialize)]
pub struct SavedVm {
    pub machine: VmSpec,
    pub vm: VmState,
    /// Each vCPU's registers by vCPU id (0 to `machine.cpus - 1`).
    pub vcpus: std::collections::BTreeMap<u8, VcpuState>,
    /// Every device's state by its id: the board's (`serial`, `i8042`,
    /// `cmos`, `pm1`, `pci`) and each virtio device's
    /// ([`VmSpec::device_ids`]); each typed by its device
    /// (`persist.rs`). Before version 5 the board's were fields of their
    /// own, and before 3 the virtio devices a list in slot order: the rules
    /// in [`SavedVm::from_value`] bring such states to this one.
    pub devices: std::collections::BTreeMap<String, serde_json::Value>,
}

impl SavedVm {
    /// Reads a state written in format `version` (one this Bulkhead reads):
    /// older layouts are brought to this one first, each by its own rule.
    pub fn decode(bytes: &[u8], version: u32) -> Result<SavedVm, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        SavedVm::from_value(value, version)
    }

    /// [`SavedVm::decode`] of a state already parsed as JSON.
    pub fn from_value(mut value: serde_json::Value, version: u32) -> Result<SavedVm, String> {
        if version < 3 {
            key_devices_by_id(&mut value)?;
        }
        if version < 4 {
            key_vcpus_by_id(&mut value)?;
        }
        if version < 5 {
            key_board_by_id(&mut value)?;
        }
        if version < 6 {
            let machine = value.get_mut("machine").ok_or("machine: missing")?;
            machine_as_spec(machine).map_err(|e| format!("machine: {e}"))?;
        }
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
}

/// Versions 2 to 5 described the machine in a shape of its own
/// (`MachineConfig`): bring it to the VM spec's. Its `kernel` named the file
/// or "embedded guest", its `cmdline` was the final one (kept: a restored
/// guest does not boot again), NICs were `nets` with MACs as byte arrays,
/// disks said `read_only`, and it had no name.
pub fn machine_as_spec(machine: &mut serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let Value::Object(fields) = machine else {
        return Err("not an object".into());
    };
    fields
        .entry("name")
        .or_insert_with(|| Value::from("restored"));
    match fields.remove("kernel") {
        Some(Value::String(kernel)) if kernel != "embedded guest" && !kernel.is_empty() => {
            fields.insert("kernel".into(), Value::String(kernel));
        }
        Some(Value::String(_)) | None => {}
        Some(_) => return Err("kernel: not a string".into()),
    }
    if let Some(Value::String(cmdline)) = fields.get("cmdline") {
        if cmdline.is_empty() {
            fields.remove("cmdline");
        }
    }
    if let Some(Value::Array(disks)) = fields.get_mut("disks") {
        for (index, disk) in disks.iter_mut().enumerate() {
            let disk = disk
                .as_object_mut()
                .ok_or_else(|| format!("disks[{index}]: not an object"))?;
            if let Some(read_only) = disk.remove("read_only") {
                disk.insert("readonly".into(), read_only);
            }
        }
    }
    if let Some(nets) = fields.remove("nets") {
        let Value::Array(mut nics) = nets else {
            return Err("nets: not a list".into());
        };
        for (index, nic) in nics.iter_mut().enumerate() {
            let nic = nic
                .as_object_mut()
                .ok_or_else(|| format!("nets[{index}]: not an object"))?;
            match nic.remove("mac") {
                None | Some(Value::Null) => {}
                Some(mac) => {
                    let bytes: [u8; 6] = serde_json::from_value(mac)
                        .map_err(|e| format!("nets[{index}].mac: {e}"))?;
                    nic.insert(
                        "mac".into(),
                        Value::String(crate::config::format_mac(&bytes)),
                    );
                }
            }
        }
        fields.insert("nics".into(), Value::Array(nics));
    }
    match fields.remove("vsock") {
        None | Some(Value::Null) => {}
        Some(Value::Object(mut vsock)) => {
            let cid = vsock.get("cid").and_then(Value::as_u64).unwrap_or(0);
            let cid = u32::try_from(cid).map_err(|_| format!("vsock.cid: {cid} is not 32 bits"))?;
            vsock.insert("cid".into(), Value::from(cid));
            fields.insert("vsock".into(), Value::Object(vsock));
        }
        Some(_) => return Err("vsock: not an object".into()),
    }
    Ok(())
}

/// Version 2 listed the virtio devices in slot order: key each by the id its
/// machine gives that slot.
fn key_devices_by_id(state: &mut serde_json::Value) -> Result<(), String> {
    let mut machine = state["machine"].clone();
    machine_as_spec(&mut machine).map_err(|e| format!("machine: {e}"))?;
    let machine: VmSpec = serde_json::from_value(machine).map_err(|e| format!("machine: {e}"))?;
    let ids = machine.device_ids();
    let Some(serde_json::Value::Array(list)) = state.get_mut("devices").map(std::mem::take) else {
        return Err("devices: not a list (a version 2 state lists them)".into());
    };
    if list.len() != ids.len() {
        return Err(format!(
            "devices: {} listed, the machine has {}",
            list.len(),
            ids.len()
        ));
    }
    state["devices"] = serde_json::Value::Object(ids.into_iter().zip(list).collect());
    Ok(())
}

/// Versions 2 and 3 listed the vCPUs in id order: key each by its position.
fn key_vcpus_by_id(state: &mut serde_json::Value) -> Result<(), String> {
    let Some(serde_json::Value::Array(list)) = state.get_mut("vcpus").map(std::mem::take) else {
        return Err("vcpus: not a list (states before version 4 list them)".into());
    };
    if list.len() > usize::from(u8::MAX) {
        return Err(format!("vcpus: {} listed, at most 255 exist", list.len()));
    }
    state["vcpus"] = serde_json::Value::Object(
        list.into_iter()
            .enumerate()
            .map(|(id, vcpu)| (id.to_string(), vcpu))
            .collect(),
    );
    Ok(())
}

/// Versions 2 to 4 held the board's devices in fields of their own (the
/// CMOS in two): move each into `devices` under its id. The i8042 may be
/// absent (a state saved before it was: it then starts as at power-on).
fn key_board_by_id(state: &mut serde_json::Value) -> Result<(), String> {
    let serde_json::Value::Object(fields) = state else {
        return Err("the state is not an object".into());
    };
    let mut board = serde_json::Map::new();
    for id in ["serial", "pci", "pm1"] {
        let value = fields
            .remove(id)
            .ok_or_else(|| format!("{id}: missing (states before version 5 hold it)"))?;
        board.insert(id.into(), value);
    }
    match fields.remove("i8042") {
        None | Some(serde_json::Value::Null) => {}
        Some(i8042) => {
            board.insert("i8042".into(), i8042);
        }
    }
    let (Some(index), Some(nvram)) = (fields.remove("cmos_index"), fields.remove("cmos_nvram"))
    else {
        return Err("cmos_index, cmos_nvram: missing (states before version 5 hold them)".into());
    };
    board.insert(
        "cmos".into(),
        serde_json::json!({"index": index, "nvram": nvram}),
    );
    let devices = fields
        .get_mut("devices")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or("devices: not keyed by id")?;
    for (id, value) in board {
        if devices.insert(id.clone(), value).is_some() {
            return Err(format!(
                "devices: a virtio device has the board's id {id:?}"
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_unix: u64,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path} already exists; a snapshot never overwrites one")]
    Exists { path: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a complete Bulkhead snapshot (no {MANIFEST_FILE}): {source}")]
    NoManifest {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("cannot read the guest's memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot map {path}: {problem}")]
    Map { path: String, problem: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, problem: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// What writing a snapshot took.
#[derive(Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub memory_bytes: u64,
    /// Pages actually written (the rest were zero and left as holes).
    pub memory_pages_written: u64,
    pub state_bytes: u64,
}

/// Copies guest RAM into `file`, skipping zero pages (the file is sparse
/// there); returns the CRC-32 of the whole image and the pages written.
pub fn write_memory(memory: &GuestRam, file: &File) -> Result<(u32, u64), SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    let mut written = 0u64;
    crate::memory::for_each_chunk(memory, CHUNK, |at, chunk| {
        crc.update(chunk);
        // Runs of non-zero pages go out in one write each.
        let mut run_start = None;
        for (index, page) in chunk.chunks(PAGE).enumerate() {
            match (is_zero(page), run_start) {
                (false, None) => run_start = Some(index),
                (true, Some(start)) => {
                    write_pages(
                        file,
                        &chunk[start * PAGE..index * PAGE],
                        at + (start * PAGE) as u64,
                    )?;
                    written += (index - start) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            write_pages(file, &chunk[start * PAGE..], at + (start * PAGE) as u64)?;
            written += (chunk.len() / PAGE - start) as u64;
        }
        Ok::<(), SnapshotError>(())
    })?;
    let image_bytes: u64 = memory.iter().map(|r| r.len()).sum();
    file.set_len(image_bytes)
        .map_err(|source| SnapshotError::Io {
            what: "cannot size",
            path: MEMORY_FILE.into(),
            source,
        })?;
    Ok((crc.finalize(), written))
}

fn write_pages(file: &File, pages: &[u8], at: u64) -> Result<(), SnapshotError> {
    file.write_all_at(pages, at)
        .map_err(|source| SnapshotError::Io {
            what: "cannot write",
            path: MEMORY_FILE.into(),
            source,
        })
}

pub fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64; align_to keeps the
    // unaligned ends in the first and last slices.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io("cannot sync", path))
}

/// Writes a snapshot of a paused VM to `dir`, which must not exist.
pub fn write(
    dir: &Path,
    saved: &SavedVm,
    memory: &GuestRam,
) -> Result<SnapshotInfo, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists {
            path: dir.display().to_string(),
        });
    }
    let name = dir
        .file_name()
        .ok_or_else(|| invalid(dir, "a snapshot needs a directory name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io("cannot create", &staging))?;
    let result = write_staged(&staging, saved, memory);
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    sync_dir(&staging)?;
    if let Err(e) = std::fs::rename(&staging, dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io("cannot move the snapshot into", dir)(e));
    }
    sync_dir(&parent)?;
    Ok(SnapshotInfo {
        path: dir.to_path_buf(),
        ..info
    })
}

fn write_staged(
    staging: &Path,
    saved: &SavedVm,
    memory: &GuestRam,
) -> Result<SnapshotInfo, SnapshotError> {
    let memory_path = staging.join(MEMORY_FILE);
    let memory_file = File::create(&memory_path).map_err(io("cannot create", &memory_path))?;
    let (memory_crc, pages) = write_memory(memory, &memory_file)?;
    memory_file
        .sync_all()
        .map_err(io("cannot sync", &memory_path))?;
    let memory_bytes = memory.iter().map(|r| r.len()).sum();

    let state = serde_json::to_vec(saved)
        .map_err(|e| invalid(staging, format!("cannot encode the state: {e}")))?;
    let state_path = staging.join(STATE_FILE);
    write_synced(&state_path, &state)?;

    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        files: vec![
            FileEntry {
                name: STATE_FILE.into(),
                bytes: state.len() as u64,
                crc32: crc32fast::hash(&state),
            },
            FileEntry {
                name: MEMORY_FILE.into(),
                bytes: memory_bytes,
                crc32: memory_crc,
            },
        ],
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| invalid(staging, format!("cannot encode the manifest: {e}")))?;
    write_synced(&staging.join(MANIFEST_FILE), &manifest_bytes)?;
    Ok(SnapshotInfo {
        path: staging.to_path_buf(),
        memory_bytes,
        memory_pages_written: pages,
        state_bytes: state.len() as u64,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut file = File::create(path).map_err(io("cannot create", path))?;
    file.write_all(bytes).map_err(io("cannot write", path))?;
    file.sync_all().map_err(io("cannot sync", path))
}

/// A snapshot read back and checked, its memory not yet mapped.
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub saved: SavedVm,
    pub memory_file: File,
    memory_entry: FileEntry,
}

/// The largest state file accepted (a 255-vCPU VM's state is a few MiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Reads and checks a snapshot: format, version, the state's checksum, the
/// memory file's size. Nothing in it is trusted beyond what is checked here
/// and by the restore of each part.
pub fn read(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_bytes =
        std::fs::read(&manifest_path).map_err(|source| SnapshotError::NoManifest {
            path: dir.display().to_string(),
            source,
        })?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| invalid(&manifest_path, format!("not a snapshot manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(invalid(
            &manifest_path,
            format!("format {:?}, expected {FORMAT:?}", manifest.format),
        ));
    }
    if !(MIN_READABLE_VERSION..=VERSION).contains(&manifest.version) {
        return Err(invalid(
            &manifest_path,
            format!(
                "snapshot format version {}, this Bulkhead reads versions \
                 {MIN_READABLE_VERSION} to {VERSION}",
                manifest.version
            ),
        ));
    }
    let entry = |name: &str| {
        manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| invalid(&manifest_path, format!("lists no {name}")))
    };
    let state_entry = entry(STATE_FILE)?;
    let memory_entry = entry(MEMORY_FILE)?;

    let state_path = dir.join(STATE_FILE);
    if state_entry.bytes > MAX_STATE_BYTES {
        return Err(invalid(
            &state_path,
            "state file larger than any VM's state",
        ));
    }
    let mut state = Vec::new();
    File::open(&state_path)
        .map_err(io("cannot open", &state_path))?
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut state)
        .map_err(io("cannot read", &state_path))?;
    if state.len() as u64 != state_entry.bytes {
        return Err(invalid(
            &state_path,
            format!(
                "{} bytes, the manifest says {} (truncated or replaced)",
                state.len(),
                state_entry.bytes
            ),
        ));
    }
    let crc = crc32fast::hash(&state);
    if crc != state_entry.crc32 {
        return Err(invalid(
            &state_path,
            format!(
                "checksum {crc:#010x}, the manifest says {:#010x} (corrupted)",
                state_entry.crc32
            ),
        ));
    }
    let saved = SavedVm::decode(&state, manifest.version)
        .map_err(|e| invalid(&state_path, format!("cannot decode: {e}")))?;

    let memory_path = dir.join(MEMORY_FILE);
    let memory_file = File::open(&memory_path).map_err(io("cannot open", &memory_path))?;
    let size = memory_file
        .metadata()
        .map_err(io("cannot stat", &memory_path))?
        .len();
    if size != memory_entry.bytes || size != saved.machine.memory_bytes() {
        return Err(invalid(
            &memory_path,
            format!(
                "{size} bytes, the manifest says {} and the VM had {} MiB (truncated or replaced)",
                memory_entry.bytes, saved.machine.memory_mib
            ),
        ));
    }
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        saved,
        memory_file,
        memory_entry: FileEntry {
            name: memory_entry.name.clone(),
            bytes: memory_entry.bytes,
            crc32: memory_entry.crc32,
        },
    })
}

impl LoadedSnapshot {
    /// Reads the whole memory file and compares its checksum (restores do
    /// not, to stay fast; `--verify-memory` asks for it).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        let mut crc = crc32fast::Hasher::new();
        let mut buffer = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = self
                .memory_file
                .read_at(&mut buffer, offset)
                .map_err(io("cannot read", &path))?;
            if n == 0 {
                break;
            }
            crc.update(&buffer[..n]);
            offset += n as u64;
        }
        let crc = crc.finalize();
        if crc != self.memory_entry.crc32 {
            return Err(invalid(
                &path,
                format!(
                    "checksum {crc:#010x}, the manifest says {:#010x} (corrupted)",
                    self.memory_entry.crc32
                ),
            ));
        }
        Ok(())
    }

    /// Maps the memory file privately at the guest addresses `ranges` give,
    /// back to back in the file.
    pub fn map_memory(&self, ranges: &[(GuestAddress, usize)]) -> Result<GuestRam, SnapshotError> {
        map_private(&self.memory_file, ranges, &self.dir.join(MEMORY_FILE))
    }
}

fn map_private(
    file: &File,
    ranges: &[(GuestAddress, usize)],
    path: &Path,
) -> Result<GuestRam, SnapshotError> {
    crate::memory::map_file(file, ranges, libc::MAP_PRIVATE).map_err(|problem| SnapshotError::Map {
        path: path.display().to_string(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// A machine as versions 2 to 5 wrote it, every device present.
    fn machine_config_of_version_5() -> serde_json::Value {
        serde_json::json!({
            "kernel": "/images/vmlinux", "cmdline": "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5",
            "cpus": 2, "memory_mib": 64, "shared_memory": true,
            "disks": [{"path": "/d.img", "read_only": true, "id": null,
                       "rate_limit": {"bytes_per_sec": 1000, "bytes_burst": null,
                                      "ops_per_sec": null, "ops_burst": null}}],
            "nets": [{"tap": "tap0", "mac": [2, 0, 0, 0, 0, 0x1f],
                      "rate_limit": {"bytes_per_sec": null, "bytes_burst": null,
                                     "ops_per_sec": null, "ops_burst": null}},
                     {"tap": "tap1", "mac": null,
                      "rate_limit": {"bytes_per_sec": null, "bytes_burst": null,
                                     "ops_per_sec": null, "ops_burst": null}}],
            "rng": true, "balloon": null,
            "vsock": {"cid": 7, "socket": "/run/v.sock"}
        })
    }

    #[test]
    fn an_older_machine_is_read_as_the_vm_spec() {
        let mut machine = machine_config_of_version_5();
        machine_as_spec(&mut machine).unwrap();
        let spec: VmSpec = serde_json::from_value(machine).unwrap();
        assert_eq!(spec.name, "restored");
        assert_eq!(spec.kernel, Some(PathBuf::from("/images/vmlinux")));
        assert_eq!(
            spec.cmdline.as_deref(),
            Some("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5")
        );
        assert_eq!(
            (spec.cpus, spec.memory_mib, spec.shared_memory),
            (2, 64, true)
        );
        assert!(spec.disks[0].readonly);
        assert_eq!(spec.disks[0].rate_limit.bytes_per_sec, Some(1000));
        assert_eq!(spec.nics[0].mac.as_deref(), Some("02:00:00:00:00:1f"));
        assert_eq!(spec.nics[1].mac, None);
        assert_eq!(spec.nics[1].tap, "tap1");
        let vsock = spec.vsock.unwrap();
        assert_eq!((vsock.cid, vsock.socket), (7, Some("/run/v.sock".into())));
        assert!(spec.rng && spec.balloon.is_none());
        // The embedded guest's machine named no file.
        let mut embedded = machine_config_of_version_5();
        embedded["kernel"] = "embedded guest".into();
        machine_as_spec(&mut embedded).unwrap();
        assert!(embedded.get("kernel").is_none());
    }

    #[test]
    fn an_older_machine_that_cannot_be_one_is_refused_naming_the_field() {
        type Change = fn(&mut serde_json::Value);
        let cases: Vec<(&str, Change)> = vec![
            ("nets[0].mac", |m| {
                m["nets"][0]["mac"] = serde_json::json!([1, 2])
            }),
            ("nets: not a list", |m| m["nets"] = serde_json::json!({})),
            ("vsock.cid", |m| {
                m["vsock"]["cid"] = serde_json::json!(1u64 << 33)
            }),
            ("kernel", |m| m["kernel"] = serde_json::json!(3)),
            ("disks[0]", |m| m["disks"][0] = serde_json::json!("x")),
        ];
        for (field, change) in cases {
            let mut machine = machine_config_of_version_5();
            change(&mut machine);
            let error = machine_as_spec(&mut machine).unwrap_err();
            assert!(error.contains(field), "{field}: {error}");
        }
        // A machine in this version's shape is not read by the old rule.
        let mut state = serde_json::json!({"machine": machine_config_of_version_5()});
        let Err(error) = SavedVm::from_value(state.take(), VERSION) else {
            panic!("an old machine read as a version {VERSION} one");
        };
        assert!(error.contains("unknown field"), "{error}");
    }

    /// The version 2 fixture's state, with its device list replaced.
    fn v2_state_with(machine: serde_json::Value, devices: serde_json::Value) -> serde_json::Value {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cli/tests/fixtures/snapshot-v2/state.json"
        );
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
        for (key, value) in machine.as_object().unwrap() {
            state["machine"][key] = value.clone();
        }
        state["devices"] = devices;
        state
    }

    #[test]
    fn a_version_2_device_list_is_keyed_by_the_machines_device_ids() {
        let transport = |device: serde_json::Value| {
            serde_json::json!({"device_type": 4, "status": 0, "driver_features": 0,
                "queue_select": 0, "device_features_select": 0, "driver_features_select": 0,
                "interrupt_status": 0, "setup_queues": [], "active_queues": null, "device": device})
        };
        let balloon = serde_json::json!({"target_pages": 2, "actual_pages": 1, "stats_head": null});
        let machine = serde_json::json!({"rng": true,
            "balloon": {"target_mib": 0, "deflate_on_oom": false, "free_page_reporting": false}});
        let state = v2_state_with(
            machine.clone(),
            serde_json::json!([transport(serde_json::Value::Null), transport(balloon)]),
        );
        let saved = SavedVm::from_value(state.clone(), 2).unwrap();
        // The virtio devices by the machine's ids, the board's by theirs.
        assert_eq!(
            saved.devices.keys().collect::<Vec<_>>(),
            ["balloon", "cmos", "i8042", "pci", "pm1", "rng", "serial"]
        );
        let balloon: crate::devices::virtio::mmio::TransportState =
            serde_json::from_value(saved.devices["balloon"].clone()).unwrap();
        assert!(matches!(
            balloon.device,
            crate::devices::virtio::SavedDeviceState::Balloon(_)
        ));
        // Read as version 3, the same list is not a state.
        assert!(SavedVm::from_value(state, 3).is_err());
        // A list that does not match the machine is refused, naming both counts.
        let short = v2_state_with(
            machine,
            serde_json::json!([transport(serde_json::Value::Null)]),
        );
        let error = SavedVm::from_value(short, 2).err().unwrap();
        assert!(error.contains("1 listed, the machine has 2"), "{error}");
    }

    #[test]
    fn vcpus_listed_before_version_4_are_keyed_by_position() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cli/tests/fixtures/snapshot-v3/state.json"
        );
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
        let first = state["vcpus"][0].clone();
        let mut second = first.clone();
        // Told apart by their MSR lists.
        second["msrs"] = serde_json::json!([]);
        state["vcpus"] = serde_json::json!([first, second]);
        let saved = SavedVm::from_value(state.clone(), 3).unwrap();
        assert_eq!(saved.vcpus.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert!(saved.vcpus[&1].msrs.is_empty());
        assert!(!saved.vcpus[&0].msrs.is_empty());
        // Read as version 4, a list is not a state.
        assert!(SavedVm::from_value(state.clone(), 4).is_err());
        // Keyed, it is, and it round-trips keyed.
        let keyed = serde_json::to_value(&saved).unwrap();
        assert_eq!(keyed["vcpus"]["1"]["msrs"], serde_json::json!([]));
        let again = SavedVm::from_value(keyed, VERSION).unwrap();
        assert!(again.vcpus[&1].msrs.is_empty());
        // An older state without a list is refused, naming the field.
        state["vcpus"] = serde_json::json!({});
        let error = SavedVm::from_value(state, 3).err().unwrap();
        assert!(error.contains("vcpus: not a list"), "{error}");
    }

    fn v4_fixture() -> serde_json::Value {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cli/tests/fixtures/snapshot-v4/state.json"
        );
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap()
    }

    #[test]
    fn the_board_fields_before_version_5_are_keyed_by_id() {
        let state = v4_fixture();
        let saved = SavedVm::from_value(state.clone(), 4).unwrap();
        assert_eq!(
            saved.devices.keys().collect::<Vec<_>>(),
            ["balloon", "cmos", "i8042", "pci", "pm1", "rng", "serial"]
        );
        assert_eq!(saved.devices["cmos"]["index"], state["cmos_index"]);
        assert_eq!(saved.devices["cmos"]["nvram"], state["cmos_nvram"]);
        assert_eq!(saved.devices["serial"], state["serial"]);
        // Read as version 5, the old fields are not the board's state.
        let as_5 = SavedVm::from_value(state, 5).unwrap();
        assert!(!as_5.devices.contains_key("serial"));
    }

    #[test]
    fn a_state_before_version_5_without_its_i8042_has_none() {
        let mut state = v4_fixture();
        state["i8042"] = serde_json::Value::Null;
        let saved = SavedVm::from_value(state.clone(), 4).unwrap();
        assert!(!saved.devices.contains_key("i8042"));
        state.as_object_mut().unwrap().remove("i8042");
        let saved = SavedVm::from_value(state, 4).unwrap();
        assert!(!saved.devices.contains_key("i8042"));
    }

    #[test]
    fn a_state_before_version_5_missing_a_board_field_is_refused_by_name() {
        for field in ["serial", "pci", "pm1", "cmos_nvram"] {
            let mut state = v4_fixture();
            state.as_object_mut().unwrap().remove(field);
            let error = SavedVm::from_value(state, 4).err().unwrap();
            assert!(
                error.contains(field) && error.contains("missing"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_virtio_entry_under_a_board_id_before_version_5_is_refused() {
        let mut state = v4_fixture();
        state["devices"]["pm1"] = state["devices"]["rng"].clone();
        let error = SavedVm::from_value(state, 4).err().unwrap();
        assert!(error.contains("the board's id \"pm1\""), "{error}");
    }

    /// An older machine's empty kernel is no file, like the embedded guest's.
    #[test]
    fn an_older_machines_empty_kernel_names_no_file() {
        let mut machine = machine_config_of_version_5();
        machine["kernel"] = "".into();
        machine_as_spec(&mut machine).unwrap();
        assert!(machine.get("kernel").is_none(), "{machine}");
        let mut machine = machine_config_of_version_5();
        machine["cmdline"] = "".into();
        machine_as_spec(&mut machine).unwrap();
        assert!(machine.get("cmdline").is_none(), "{machine}");
    }

    /// A current state is read as it is: the older machines' rule, which
    /// drops an empty command line, is not applied to it.
    #[test]
    fn a_current_states_machine_is_taken_as_written() {
        let mut state = fixture_state(6);
        state["machine"]["cmdline"] = "".into();
        let saved = SavedVm::from_value(state, 6).unwrap();
        assert_eq!(saved.machine.cmdline.as_deref(), Some(""));
    }

    #[test]
    fn at_most_255_listed_vcpus_are_keyed() {
        let listed = |count: usize| serde_json::json!({"vcpus": vec![0; count]});
        let mut state = listed(255);
        key_vcpus_by_id(&mut state).unwrap();
        let keyed = state["vcpus"].as_object().unwrap();
        assert_eq!(keyed.len(), 255);
        assert!(keyed.contains_key("0") && keyed.contains_key("254"));
        assert_eq!(
            key_vcpus_by_id(&mut listed(256)),
            Err("vcpus: 256 listed, at most 255 exist".into())
        );
    }

    /// The state of the checked-in snapshot fixture of `version`, as JSON.
    fn fixture_state(version: u32) -> serde_json::Value {
        let path = format!(
            "{}/../cli/tests/fixtures/snapshot-v{version}/state.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// A directory under the temporary one, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("bulkhead-snapshot-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const RANGES: [(GuestAddress, usize); 2] =
        [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)];

    /// 2 MiB of guest RAM in two regions, a few pages written.
    fn some_memory() -> GuestRam {
        let memory = GuestRam::from_ranges(&RANGES).unwrap();
        memory.write_slice(b"first", GuestAddress(0x1234)).unwrap();
        memory
            .write_slice(&[0xee; 3 * PAGE], GuestAddress((5 << 20) - 3 * PAGE as u64))
            .unwrap();
        memory
    }

    /// The image a snapshot holds of `memory`: its regions back to back.
    fn image(memory: &GuestRam) -> Vec<u8> {
        let mut image = Vec::new();
        crate::memory::for_each_chunk(memory, CHUNK, |_, chunk| {
            image.extend_from_slice(chunk);
            Ok::<(), vm_memory::GuestMemoryError>(())
        })
        .unwrap();
        image
    }

    /// The version 6 fixture's saved VM, its machine of `mib` MiB.
    fn saved_vm(mib: u64) -> SavedVm {
        let mut saved = SavedVm::from_value(fixture_state(6), 6).unwrap();
        saved.machine.memory_mib = mib;
        saved
    }

    /// A snapshot of 2 MiB written in `scratch`, and its directory.
    fn written(scratch: &Scratch) -> PathBuf {
        let dir = scratch.0.join("snap");
        write(&dir, &saved_vm(2), &some_memory()).unwrap();
        dir
    }

    fn edit_manifest(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) {
        let path = dir.join(MANIFEST_FILE);
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        change(&mut manifest);
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    /// The problem `read` finds with the snapshot at `dir`.
    fn problem(dir: &Path) -> (PathBuf, String) {
        match read(dir) {
            Err(SnapshotError::Invalid { path, problem }) => (path.into(), problem),
            Err(e) => panic!("not an invalid snapshot: {e}"),
            Ok(_) => panic!("{} read as a snapshot", dir.display()),
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let scratch = Scratch::new("round-trip");
        let dir = scratch.0.join("snap");
        let (saved, memory) = (saved_vm(2), some_memory());
        let info = write(&dir, &saved, &memory).unwrap();
        let state_bytes = std::fs::metadata(dir.join(STATE_FILE)).unwrap().len();
        assert_eq!(
            info,
            SnapshotInfo {
                path: dir.clone(),
                memory_bytes: 2 << 20,
                memory_pages_written: 4,
                state_bytes,
            }
        );
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["snap"]);
        let loaded = read(&dir).unwrap();
        assert_eq!(
            serde_json::to_value(&loaded.saved).unwrap(),
            serde_json::to_value(&saved).unwrap()
        );
        loaded.verify_memory().unwrap();
        let restored = loaded.map_memory(&RANGES).unwrap();
        assert!(image(&restored) == image(&memory));
        // A second snapshot never replaces the first.
        assert!(matches!(
            write(&dir, &saved, &memory),
            Err(SnapshotError::Exists { path }) if path == dir.display().to_string()
        ));
    }

    /// What a writer killed half-way left in the parent is cleared, and the
    /// snapshot is staged beside where it goes.
    #[test]
    fn a_killed_writers_staging_directory_is_replaced() {
        let scratch = Scratch::new("staging");
        let staging = scratch
            .0
            .join(format!(".snap.partial-{}", std::process::id()));
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("stale"), b"x").unwrap();
        let dir = written(&scratch);
        assert!(!staging.exists());
        assert!(!dir.join("stale").exists());
        assert!(read(&dir).is_ok());
    }

    #[test]
    fn a_directory_without_a_manifest_is_no_snapshot() {
        let scratch = Scratch::new("no-manifest");
        assert!(matches!(
            read(&scratch.0),
            Err(SnapshotError::NoManifest { path, .. }) if path == scratch.0.display().to_string()
        ));
        std::fs::write(scratch.0.join(MANIFEST_FILE), b"{}").unwrap();
        let (path, why) = problem(&scratch.0);
        assert_eq!(path, scratch.0.join(MANIFEST_FILE));
        assert!(why.starts_with("not a snapshot manifest: "), "{why}");
    }

    #[test]
    fn a_manifest_of_another_format_is_refused() {
        let scratch = Scratch::new("format");
        let dir = written(&scratch);
        edit_manifest(&dir, |m| m["format"] = "qemu-savevm".into());
        assert_eq!(
            problem(&dir).1,
            "format \"qemu-savevm\", expected \"bulkhead-snapshot\""
        );
    }

    #[test]
    fn only_versions_min_readable_to_this_one_are_read() {
        let scratch = Scratch::new("versions");
        let dir = written(&scratch);
        for version in [0, MIN_READABLE_VERSION - 1, VERSION + 1] {
            edit_manifest(&dir, |m| m["version"] = version.into());
            assert_eq!(
                problem(&dir).1,
                format!(
                    "snapshot format version {version}, this Bulkhead reads versions \
                     {MIN_READABLE_VERSION} to {VERSION}"
                )
            );
        }
        // The oldest is read, by its rules (which this state does not follow).
        edit_manifest(&dir, |m| m["version"] = MIN_READABLE_VERSION.into());
        let (path, why) = problem(&dir);
        assert_eq!(path, dir.join(STATE_FILE));
        assert!(why.starts_with("cannot decode: "), "{why}");
    }

    #[test]
    fn a_manifest_must_list_the_state_and_the_memory() {
        let scratch = Scratch::new("entries");
        let dir = written(&scratch);
        for name in [STATE_FILE, MEMORY_FILE] {
            let kept = std::fs::read(dir.join(MANIFEST_FILE)).unwrap();
            edit_manifest(&dir, |m| {
                m["files"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|f| f["name"] != name)
            });
            assert_eq!(
                problem(&dir),
                (dir.join(MANIFEST_FILE), format!("lists no {name}"))
            );
            std::fs::write(dir.join(MANIFEST_FILE), kept).unwrap();
        }
        assert!(read(&dir).is_ok());
    }

    /// A manifest may claim a state of at most 64 MiB (it is read whole).
    #[test]
    fn a_state_larger_than_any_vms_is_refused_before_it_is_read() {
        let scratch = Scratch::new("state-size");
        let dir = written(&scratch);
        let state_bytes = std::fs::metadata(dir.join(STATE_FILE)).unwrap().len();
        let set_state_bytes = |bytes: u64| {
            edit_manifest(&dir, |m| {
                for file in m["files"].as_array_mut().unwrap() {
                    if file["name"] == STATE_FILE {
                        file["bytes"] = bytes.into();
                    }
                }
            })
        };
        assert_eq!(MAX_STATE_BYTES, 64 << 20);
        set_state_bytes(MAX_STATE_BYTES + 1);
        assert_eq!(
            problem(&dir),
            (
                dir.join(STATE_FILE),
                "state file larger than any VM's state".into()
            )
        );
        set_state_bytes(MAX_STATE_BYTES);
        assert_eq!(
            problem(&dir).1,
            format!(
                "{state_bytes} bytes, the manifest says {MAX_STATE_BYTES} (truncated or replaced)"
            )
        );
    }

    /// A state file longer than the largest the manifest may claim is
    /// read one byte past it, enough to see that it is not what was written.
    #[test]
    fn a_state_file_past_the_largest_is_not_read_whole() {
        let scratch = Scratch::new("state-past-max");
        let dir = written(&scratch);
        File::options()
            .write(true)
            .open(dir.join(STATE_FILE))
            .unwrap()
            .set_len(MAX_STATE_BYTES + 5)
            .unwrap();
        edit_manifest(&dir, |m| {
            for file in m["files"].as_array_mut().unwrap() {
                if file["name"] == STATE_FILE {
                    file["bytes"] = MAX_STATE_BYTES.into();
                }
            }
        });
        assert_eq!(
            problem(&dir).1,
            format!(
                "{} bytes, the manifest says {MAX_STATE_BYTES} (truncated or replaced)",
                MAX_STATE_BYTES + 1
            )
        );
    }

    #[test]
    fn a_state_of_another_length_or_checksum_is_refused() {
        let scratch = Scratch::new("state-crc");
        let dir = written(&scratch);
        let path = dir.join(STATE_FILE);
        let state = std::fs::read(&path).unwrap();
        let mut longer = state.clone();
        longer.push(b' ');
        std::fs::write(&path, &longer).unwrap();
        assert_eq!(
            problem(&dir),
            (
                path.clone(),
                format!(
                    "{} bytes, the manifest says {} (truncated or replaced)",
                    state.len() + 1,
                    state.len()
                )
            )
        );
        // Same length, one byte changed (JSON that still parses).
        let mut changed = state.clone();
        let last = changed.len() - 1;
        changed[last - 1..].copy_from_slice(b"} ");
        assert_ne!(changed, state);
        std::fs::write(&path, &changed).unwrap();
        let (at, why) = problem(&dir);
        assert_eq!(at, path);
        assert!(
            why.starts_with("checksum ") && why.ends_with(" (corrupted)"),
            "{why}"
        );
    }

    #[test]
    fn a_memory_file_of_another_size_than_the_manifests_or_the_machines_is_refused() {
        let scratch = Scratch::new("memory-size");
        let dir = written(&scratch);
        let path = dir.join(MEMORY_FILE);
        let refusal = |size: u64, manifest: u64| {
            (
                path.clone(),
                format!(
                    "{size} bytes, the manifest says {manifest} and the VM had 2 MiB \
                     (truncated or replaced)"
                ),
            )
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        assert_eq!(problem(&dir), refusal(1 << 20, 2 << 20));
        // The manifest changed to match: the machine still says otherwise.
        edit_manifest(&dir, |m| {
            for file in m["files"].as_array_mut().unwrap() {
                if file["name"] == MEMORY_FILE {
                    file["bytes"] = (1u64 << 20).into();
                }
            }
        });
        assert_eq!(problem(&dir), refusal(1 << 20, 1 << 20));
        // The file back to the machine's size, the manifest still not.
        file.set_len(2 << 20).unwrap();
        assert_eq!(problem(&dir), refusal(2 << 20, 1 << 20));
    }

    #[test]
    fn verifying_the_memory_finds_a_changed_byte() {
        let scratch = Scratch::new("verify");
        let dir = written(&scratch);
        read(&dir).unwrap().verify_memory().unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        file.write_all_at(b"\x01", (2 << 20) - 1).unwrap();
        let loaded = read(&dir).unwrap();
        match loaded.verify_memory() {
            Err(SnapshotError::Invalid { path, problem }) => {
                assert_eq!(path, dir.join(MEMORY_FILE).display().to_string());
                assert!(problem.ends_with("(corrupted)"), "{problem}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// Runs of written pages at a chunk's start, middle and end, and
    /// across chunks: each page goes where it was, only those are counted,
    /// and the checksum is the whole image's.
    #[test]
    fn every_written_page_and_only_those_reach_the_memory_file() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 2 * CHUNK)]).unwrap();
        let pages_per_chunk = CHUNK / PAGE;
        let written_pages = [0, 1, 2, 10, pages_per_chunk - 1]
            .into_iter()
            .chain(pages_per_chunk..pages_per_chunk + 1)
            .chain(2 * pages_per_chunk - 6..2 * pages_per_chunk);
        let mut count = 0;
        for page in written_pages {
            let at = (page * PAGE) as u64;
            memory
                .write_slice(format!("page {page}").as_bytes(), GuestAddress(at + 9))
                .unwrap();
            count += 1;
        }
        let scratch = Scratch::new("runs");
        let path = scratch.0.join(MEMORY_FILE);
        let file = File::create(&path).unwrap();
        let (crc, pages) = write_memory(&memory, &file).unwrap();
        let expected = image(&memory);
        assert_eq!(pages, count);
        assert_eq!(crc, crc32fast::hash(&expected));
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn zero_pages_are_recognised_at_any_alignment() {
        let mut bytes = vec![0u8; 3 * PAGE + 5];
        assert!(is_zero(&bytes[1..]));
        bytes[3 * PAGE + 4] = 1;
        assert!(!is_zero(&bytes[1..]));
        assert!(is_zero(&bytes[..3 * PAGE]));
    }

    /// One set byte is found in the unaligned head, the aligned words or
    /// the unaligned tail.
    #[test]
    fn a_set_byte_is_found_wherever_it_is() {
        let mut bytes = [0u8; 64];
        // 3 bytes before a u64 boundary, 40 bytes long: 3 + 4 words + 5.
        let start = bytes.as_ptr().align_offset(8) + 8 - 3;
        let window = &mut bytes[start..start + 40];
        assert!(is_zero(window));
        for set in 0..40 {
            window[set] = 0x80;
            assert!(!is_zero(window), "byte {set}");
            window[set] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file_and_a_private_mapping() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
        let memory = GuestRam::from_ranges(&ranges).unwrap();
        memory.write_slice(b"first", GuestAddress(0x1234)).unwrap();
        memory
            .write_slice(b"second", GuestAddress((5 << 20) + 7))
            .unwrap();
        let dir =
            std::env::temp_dir().join(format!("bulkhead-snapshot-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(MEMORY_FILE);
        let file = File::create(&path).unwrap();
        let (_, pages) = write_memory(&memory, &file).unwrap();
        assert_eq!(pages, 2, "only the two written pages go to the file");
        assert_eq!(file.metadata().unwrap().len(), 3 << 20);

        let file = File::open(&path).unwrap();
        let restored = map_private(&file, &ranges, &path).unwrap();
        let mut word = [0u8; 6];
        restored
            .read_slice(&mut word, GuestAddress((5 << 20) + 7))
            .unwrap();
        assert_eq!(&word, b"second");
        // Writes stay in this process: the file and other mappings keep theirs.
        restored
            .write_slice(b"CLONE", GuestAddress(0x1234))
            .unwrap();
        let clone = map_private(&file, &ranges, &path).unwrap();
        let mut first = [0u8; 5];
        clone.read_slice(&mut first, GuestAddress(0x1234)).unwrap();
        assert_eq!(&first, b"first");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
