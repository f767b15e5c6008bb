//! What a machine's devices stand on in the host, already open: disk files,
//! attached TAPs, the vsock listener.
//!
//! `bulkhead run` opens them from the paths in its machine, with the rights
//! of whoever runs it ([`DeviceBackings::open`]). A VMM the daemon starts
//! opens no host path: the daemon resolves, opens and locks each one and
//! passes the descriptors ([`crate::launch`]); [`DeviceBackings::from_descriptors`]
//! checks that each is the kind of thing the machine says it is.
//!
//! A restored or migrated-in VM is rebuilt on the backings of the machine its
//! own host describes, never on paths found in a snapshot or a stream: see
//! [`check_same_shape`].

use crate::config::VmSpec;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("descriptor for {what}: {why}")]
    Descriptor { what: String, why: String },
    #[error("the machine in {from} does not fit the machine of this VM: {why}")]
    Shape { from: &'static str, why: String },
}

/// The open host side of every device of one machine, in the machine's order.
#[derive(Debug, Default)]
pub struct DeviceBackings {
    pub disks: Vec<File>,
    pub taps: Vec<Tap>,
    pub vsock: Option<UnixListener>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("name", &self.name()).finish()
    }
}

impl DeviceBackings {
    /// Opens (and for TAPs creates, for vsock binds) what `machine` names.
    pub fn open(machine: &VmSpec) -> Result<DeviceBackings, BackingError> {
        Self::open_with_taps(machine, None)
    }

    /// [`DeviceBackings::open`], with the TAPs already open when `taps` are
    /// given (handed over by a migration source): each must be the TAP its
    /// NIC names.
    pub fn open_with_taps(
        machine: &VmSpec,
        taps: Option<Vec<File>>,
    ) -> Result<DeviceBackings, BackingError> {
        let taps = match taps {
            None => machine
                .nics
                .iter()
                .map(|net| Tap::open(&net.tap))
                .collect::<Result<_, _>>()?,
            Some(files) => {
                if files.len() != machine.nics.len() {
                    return Err(BackingError::Descriptor {
                        what: "the TAPs handed over".into(),
                        why: format!("{} for {} NICs", files.len(), machine.nics.len()),
                    });
                }
                machine
                    .nics
                    .iter()
                    .zip(files)
                    .map(|(net, file)| Tap::from_descriptor(file, &net.tap))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(DeviceBackings {
            disks: machine
                .disks
                .iter()
                .map(Block::open_file)
                .collect::<Result<_, _>>()?,
            taps,
            vsock: machine.vsock.as_ref().map(Vsock::bind).transpose()?,
        })
    }

    /// Takes descriptors passed by the daemon, one per disk, TAP and vsock
    /// socket of `machine` in that order, checking each one's kind.
    pub fn from_descriptors(
        machine: &VmSpec,
        descriptors: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<DeviceBackings, BackingError> {
        let mut next = |what: String| {
            descriptors.next().ok_or_else(|| BackingError::Descriptor {
                what,
                why: "missing".into(),
            })
        };
        let mut disks = Vec::with_capacity(machine.disks.len());
        for (index, disk) in machine.disks.iter().enumerate() {
            let what = format!("disk {index} ({})", disk.path.display());
            let file = File::from(next(what.clone())?);
            check_disk_file(&file, disk.readonly)
                .map_err(|why| BackingError::Descriptor { what, why })?;
            disks.push(file);
        }
        let mut taps = Vec::with_capacity(machine.nics.len());
        for net in &machine.nics {
            let file = File::from(next(format!("TAP {}", net.tap))?);
            taps.push(Tap::from_descriptor(file, &net.tap)?);
        }
        let vsock = match &machine.vsock {
            Some(_) => {
                let what = "the vsock socket".to_string();
                let fd = next(what.clone())?;
                let listener = UnixListener::from(fd);
                listener
                    .local_addr()
                    .map_err(|e| BackingError::Descriptor {
                        what,
                        why: format!("not a listening Unix socket ({e})"),
                    })?;
                Some(listener)
            }
            None => None,
        };
        Ok(DeviceBackings { disks, taps, vsock })
    }
}

/// A disk must be a regular file or a block device, and writable unless read-only.
fn check_disk_file(file: &File, read_only: bool) -> Result<(), String> {
    let kind = file
        .metadata()
        .map_err(|e| format!("cannot stat it ({e})"))?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err("not a regular file or a block device".into());
    }
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(file), libc::F_GETFL) };
    if flags < 0 {
        return Err(format!("F_GETFL: {}", std::io::Error::last_os_error()));
    }
    if !read_only && flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err("a writable disk must be open for reading and writing".into());
    }
    Ok(())
}

/// Whether `saved` (from a snapshot or a migration stream) describes the same
/// machine as `ours` (from this host's record) in everything the guest's
/// state depends on: vCPUs, memory, and the devices in their order. Host
/// paths, TAP names and rate limits are this host's business and may differ.
pub fn check_same_shape(
    from: &'static str,
    saved: &VmSpec,
    ours: &VmSpec,
) -> Result<(), BackingError> {
    let shape = |why: String| BackingError::Shape { from, why };
    if saved.cpus != ours.cpus {
        return Err(shape(format!(
            "{} vCPUs there, {} here",
            saved.cpus, ours.cpus
        )));
    }
    if saved.memory_mib != ours.memory_mib {
        return Err(shape(format!(
            "{} MiB of memory there, {} here",
            saved.memory_mib, ours.memory_mib
        )));
    }
    if saved.disks.len() != ours.disks.len() {
        return Err(shape(format!(
            "{} disks there, {} here",
            saved.disks.len(),
            ours.disks.len()
        )));
    }
    for (index, (theirs, mine)) in saved.disks.iter().zip(&ours.disks).enumerate() {
        if theirs.readonly != mine.readonly {
            return Err(shape(format!("disk {index} differs in being read-only")));
        }
    }
    if saved.nics.len() != ours.nics.len() {
        return Err(shape(format!(
            "{} network interfaces there, {} here",
            saved.nics.len(),
            ours.nics.len()
        )));
    }
    // The guest keeps its MACs (`rebuilt_machine`): what the state says
    // must be one before a device is built on it.
    for (index, nic) in saved.nics.iter().enumerate() {
        if let Some(mac) = &nic.mac {
            crate::config::parse_mac(mac)
                .map_err(|why| shape(format!("network interface {index}'s MAC: {why}")))?;
        }
    }
    if saved.rng != ours.rng {
        return Err(shape("an entropy device on one side only".into()));
    }
    if saved.balloon.is_some() != ours.balloon.is_some() {
        return Err(shape("a balloon on one side only".into()));
    }
    match (&saved.vsock, &ours.vsock) {
        (None, None) => {}
        (Some(theirs), Some(mine)) if theirs.cid == mine.cid => {}
        (Some(theirs), Some(mine)) => {
            return Err(shape(format!(
                "vsock CID {} there, {} here",
                theirs.cid, mine.cid
            )))
        }
        _ => return Err(shape("a vsock device on one side only".into())),
    }
    Ok(())
}

/// The machine to rebuild: `ours` (devices, host paths), with what only the
/// guest's past decided taken from `saved` (the command line it booted with,
/// the MACs it knows its interfaces by).
pub fn rebuilt_machine(saved: &VmSpec, ours: &VmSpec) -> VmSpec {
    let mut machine = ours.clone();
    machine.cmdline = saved.cmdline.clone();
    machine.kernel = saved.kernel.clone();
    for (mine, theirs) in machine.nics.iter_mut().zip(&saved.nics) {
        mine.mac = theirs.mac.clone();
    }
    machine
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskSpec, NicSpec, RateLimit, VsockSpec};

    fn machine() -> VmSpec {
        VmSpec {
            kernel: Some("vmlinux".into()),
            cmdline: Some("console=ttyS0".into()),
            cpus: 2,
            memory_mib: 256,
            disks: vec![DiskSpec {
                path: "/srv/a.img".into(),
                ..Default::default()
            }],
            nics: vec![NicSpec {
                tap: "tap0".into(),
                mac: Some("02:00:00:00:00:01".into()),
                rate_limit: RateLimit::default(),
            }],
            rng: true,
            vsock: Some(VsockSpec {
                cid: 3,
                socket: Some("vsock.sock".into()),
            }),
            ..VmSpec::named("m")
        }
    }

    #[test]
    fn host_paths_and_tap_names_may_differ() {
        let ours = machine();
        let mut saved = machine();
        saved.disks[0].path = "/etc/shadow".into();
        saved.nics[0].tap = "other".into();
        saved.vsock.as_mut().unwrap().socket = Some("/etc/passwd".into());
        check_same_shape("the snapshot", &saved, &ours).unwrap();
        let rebuilt = rebuilt_machine(&saved, &ours);
        assert_eq!(rebuilt.disks[0].path, ours.disks[0].path);
        assert_eq!(rebuilt.nics[0].tap, "tap0");
        assert_eq!(rebuilt.vsock.unwrap().socket, ours.vsock.unwrap().socket);
    }

    #[test]
    fn machines_without_the_optional_devices_fit_each_other() {
        let mut bare = machine();
        bare.vsock = None;
        bare.balloon = None;
        check_same_shape("the snapshot", &bare, &bare.clone()).unwrap();
    }

    #[test]
    fn a_read_only_disk_may_come_read_only_and_a_writable_one_read_write() {
        let mut m = machine();
        m.nics.clear();
        m.vsock = None;
        let file = tempfile_in_tmp("modes");
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        DeviceBackings::from_descriptors(&m, &mut std::iter::once(OwnedFd::from(rw))).unwrap();
        m.disks[0].readonly = true;
        let ro = File::open(&file).unwrap();
        DeviceBackings::from_descriptors(&m, &mut std::iter::once(OwnedFd::from(ro))).unwrap();
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn the_guest_keeps_its_command_line_and_macs() {
        let ours = machine();
        let mut saved = machine();
        saved.cmdline = Some("booted with this".into());
        saved.nics[0].mac = Some("02:09:09:09:09:09".into());
        let rebuilt = rebuilt_machine(&saved, &ours);
        assert_eq!(rebuilt.cmdline.as_deref(), Some("booted with this"));
        assert_eq!(rebuilt.nics[0].mac.as_deref(), Some("02:09:09:09:09:09"));
    }

    #[test]
    fn each_difference_the_guest_would_notice_is_refused_naming_it() {
        type Change = fn(&mut VmSpec);
        let cases: Vec<(&str, Change)> = vec![
            ("vCPUs", |m| m.cpus = 1),
            ("memory", |m| m.memory_mib = 512),
            ("disks", |m| m.disks.clear()),
            ("read-only", |m| m.disks[0].readonly = true),
            ("network", |m| m.nics.clear()),
            ("entropy", |m| m.rng = false),
            ("balloon", |m| m.balloon = Some(Default::default())),
            ("CID", |m| m.vsock.as_mut().unwrap().cid = 4),
            ("vsock device", |m| m.vsock = None),
            ("MAC: 'x' is not", |m| m.nics[0].mac = Some("x".into())),
            ("multicast", |m| {
                m.nics[0].mac = Some("01:00:00:00:00:01".into())
            }),
        ];
        for (word, change) in cases {
            let mut saved = machine();
            change(&mut saved);
            let error = check_same_shape("the snapshot", &saved, &machine()).unwrap_err();
            assert!(error.to_string().contains(word), "{word}: {error}");
        }
    }

    #[test]
    fn a_descriptor_of_the_wrong_kind_is_refused() {
        let mut m = machine();
        m.nics.clear();
        m.vsock = None;
        // A directory is no disk.
        let dir = File::open("/").unwrap();
        let error = DeviceBackings::from_descriptors(&m, &mut std::iter::once(OwnedFd::from(dir)))
            .unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        // A writable disk passed read-only.
        let file = tempfile_in_tmp("kinds");
        let read_only = File::open(&file).unwrap();
        let error =
            DeviceBackings::from_descriptors(&m, &mut std::iter::once(OwnedFd::from(read_only)))
                .unwrap_err();
        assert!(error.to_string().contains("reading and writing"), "{error}");
        // Too few.
        let error = DeviceBackings::from_descriptors(&m, &mut std::iter::empty()).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        // A plain file is not a TAP.
        let mut m = machine();
        m.disks.clear();
        m.vsock = None;
        let error = DeviceBackings::from_descriptors(
            &m,
            &mut std::iter::once(OwnedFd::from(File::open(&file).unwrap())),
        )
        .unwrap_err();
        assert!(error.to_string().contains("not an attached TAP"), "{error}");
        let _ = std::fs::remove_file(file);
    }

    fn tempfile_in_tmp(name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("bulkhead-backing-{}-{name}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        path
    }
}
