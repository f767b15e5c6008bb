//! What a client asks for when it defines a VM, and the checks that keep a
//! bad or hostile spec from reaching a VMM.

use std::path::{Path, PathBuf};

/// The largest guest the daemon accepts, whatever the host has.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
const MIN_MEMORY_MIB: u64 = 16;

pub use vmm::config::{DiskSpec, NicSpec, VmSpec, VsockSpec};

/// A spec that cannot run, and which field says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `name` may name a VM, project or token: lower-case letters,
/// digits and '-', 1 to 63, not starting with '-'.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The checks a machine description passes before a VMM is started for it.
pub trait Validate {
    /// Checks everything that can be checked before a VMM runs: ranges,
    /// names, and that each file exists, is a regular file, and lies inside
    /// one of `allowed_dirs` (a tenant must not boot the host's own files);
    /// host resources the daemon places itself (the vsock socket) are refused.
    fn validate(&self, allowed_dirs: &[PathBuf]) -> Result<(), SpecError>;

    /// The same checks for a VM its user runs with their own rights
    /// (`bulkhead run --config`): any file they can open will do, and they
    /// place the vsock socket.
    fn validate_for_its_user(&self) -> Result<(), SpecError>;
}

impl Validate for VmSpec {
    fn validate(&self, allowed_dirs: &[PathBuf]) -> Result<(), SpecError> {
        if self.vsock.as_ref().is_some_and(|v| v.socket.is_some()) {
            return Err(invalid(
                "vsock.socket",
                "is the daemon's to place (vsock.sock in the VM's directory)",
            ));
        }
        check(self, |field, path| check_file(field, path, allowed_dirs))
    }

    fn validate_for_its_user(&self) -> Result<(), SpecError> {
        check(self, |_, _| Ok(()))
    }
}

fn check(
    spec: &VmSpec,
    check_file: impl Fn(&str, &Path) -> Result<(), SpecError>,
) -> Result<(), SpecError> {
    if !valid_name(&spec.name) {
        return Err(invalid(
            "name",
            "must be 1 to 63 lower-case letters, digits or '-', not starting with '-'",
        ));
    }
    if spec.cpus == 0 || spec.cpus > vmm::arch::x86_64::mptable::MAX_CPUS {
        return Err(invalid(
            "cpus",
            format!(
                "must be 1 to {}, not {}",
                vmm::arch::x86_64::mptable::MAX_CPUS,
                spec.cpus
            ),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(invalid(
            "memory_mib",
            format!(
                "must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, not {}",
                spec.memory_mib
            ),
        ));
    }
    if let Some(cmdline) = &spec.cmdline {
        if cmdline.len() > 2048 || cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(invalid("cmdline", "must be one line of at most 2048 bytes"));
        }
    }
    if let Some(kernel) = &spec.kernel {
        check_file("kernel", kernel)?;
    }
    if let Some(initrd) = &spec.initrd {
        if spec.kernel.is_none() {
            return Err(invalid("initrd", "needs a kernel"));
        }
        check_file("initrd", initrd)?;
    }
    if spec.disks.len() > 16 {
        return Err(invalid("disks", "at most 16 disks"));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        check_file(&format!("disks[{i}].path"), &disk.path)?;
        if let Some(id) = &disk.id {
            vmm::config::check_disk_id(id)
                .map_err(|message| invalid(format!("disks[{i}].id"), message))?;
            if spec.disks[..i]
                .iter()
                .any(|other| other.id.as_ref() == Some(id))
            {
                return Err(invalid(format!("disks[{i}].id"), "used twice"));
            }
        }
        disk.rate_limit
            .check()
            .map_err(|message| invalid(format!("disks[{i}].rate_limit"), message))?;
    }
    if spec.nics.len() > 8 {
        return Err(invalid("nics", "at most 8 interfaces"));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let tap_ok = (1..=15).contains(&nic.tap.len())
            && nic
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !tap_ok {
            return Err(invalid(
                format!("nics[{i}].tap"),
                "must be 1 to 15 letters, digits, '-' or '_'",
            ));
        }
        if spec.nics[..i].iter().any(|other| other.tap == nic.tap) {
            return Err(invalid(format!("nics[{i}].tap"), "used twice"));
        }
        if let Some(mac) = &nic.mac {
            vmm::config::parse_mac(mac)
                .map_err(|message| invalid(format!("nics[{i}].mac"), message))?;
        }
        nic.rate_limit
            .check()
            .map_err(|message| invalid(format!("nics[{i}].rate_limit"), message))?;
    }
    if let Some(balloon) = &spec.balloon {
        if balloon.target_mib > spec.memory_mib {
            return Err(invalid(
                "balloon.target_mib",
                format!("at most the VM's memory_mib ({})", spec.memory_mib),
            ));
        }
    }
    if let Some(vsock) = &spec.vsock {
        if vsock.cid < 3 || vsock.cid == u32::MAX {
            return Err(invalid("vsock.cid", "must be 3 or more (0-2 are reserved)"));
        }
    }
    Ok(())
}

fn check_file(field: &str, path: &Path, allowed_dirs: &[PathBuf]) -> Result<(), SpecError> {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        return Err(invalid(field, "must be an absolute path"));
    }
    // The VMM's option syntax separates items with commas.
    if text.contains(',') || text.contains('\n') {
        return Err(invalid(field, "must not contain ',' or a newline"));
    }
    let real = path
        .canonicalize()
        .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    // The daemon opens it without following links (see `resources`): say so now.
    if real != path {
        return Err(invalid(
            field,
            format!(
                "{} must name the file itself, without symbolic links, '.' or '..' (it is {})",
                path.display(),
                real.display()
            ),
        ));
    }
    if !allowed_dirs.iter().any(|dir| real.starts_with(dir)) {
        return Err(invalid(
            field,
            format!(
                "{} is outside the daemon's storage directories",
                path.display()
            ),
        ));
    }
    let metadata =
        std::fs::metadata(&real).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    if !metadata.is_file() {
        return Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::{BalloonConfig, RateLimit};

    fn spec() -> VmSpec {
        serde_json::from_str(r#"{"name":"a"}"#).unwrap()
    }

    /// Each limit's last accepted value is accepted and the next refused.
    #[test]
    fn limits_hold_at_their_edges() {
        let dir = std::env::temp_dir().join(format!("bulkhead-spec-edges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk");
        std::fs::write(&disk, b"x").unwrap();
        let allowed = [dir.canonicalize().unwrap()];
        let max_cpus = vmm::arch::x86_64::mptable::MAX_CPUS;
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let disks = |n: usize, path: PathBuf| -> Change {
            Box::new(move |s| {
                s.disks = (0..n)
                    .map(|_| DiskSpec {
                        path: path.clone(),
                        readonly: true,
                        ..Default::default()
                    })
                    .collect()
            })
        };
        let nics = |n: usize| -> Change {
            Box::new(move |s| {
                s.nics = (0..n)
                    .map(|i| NicSpec {
                        tap: format!("tap_{i}"),
                        ..Default::default()
                    })
                    .collect()
            })
        };
        let edges: Vec<(&str, Change, Change)> = vec![
            (
                "name",
                Box::new(|s| s.name = "web-1".into()),
                Box::new(|s| s.name = "web_1".into()),
            ),
            (
                "cpus",
                Box::new(move |s| s.cpus = max_cpus),
                Box::new(move |s| s.cpus = max_cpus + 1),
            ),
            (
                "cmdline",
                Box::new(|s| s.cmdline = Some("x".repeat(2048))),
                Box::new(|s| s.cmdline = Some("x".repeat(2049))),
            ),
            (
                "cmdline",
                Box::new(|s| s.cmdline = Some("a b".into())),
                Box::new(|s| s.cmdline = Some("a\0b".into())),
            ),
            ("disks", disks(16, disk.clone()), disks(17, disk.clone())),
            ("nics", nics(8), nics(9)),
            (
                "nics[0].tap",
                Box::new(|s| {
                    s.nics = vec![NicSpec {
                        tap: "a".repeat(15),
                        ..Default::default()
                    }]
                }),
                Box::new(|s| {
                    s.nics = vec![NicSpec {
                        tap: "a.b".into(),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "balloon.target_mib",
                Box::new(|s| {
                    s.balloon = Some(BalloonConfig {
                        target_mib: s.memory_mib,
                        ..Default::default()
                    })
                }),
                Box::new(|s| {
                    s.balloon = Some(BalloonConfig {
                        target_mib: s.memory_mib + 1,
                        ..Default::default()
                    })
                }),
            ),
            (
                "vsock.cid",
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: 3,
                        socket: None,
                    })
                }),
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: 2,
                        socket: None,
                    })
                }),
            ),
            (
                "vsock.cid",
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: u32::MAX - 1,
                        socket: None,
                    })
                }),
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: u32::MAX,
                        socket: None,
                    })
                }),
            ),
            (
                "disks[0].path",
                disks(1, disk.clone()),
                disks(1, dir.join("a,b")),
            ),
            (
                "disks[0].path",
                disks(1, disk.clone()),
                disks(1, dir.join("a\nb")),
            ),
        ];
        for (field, last_good, first_bad) in edges {
            let mut spec = spec();
            last_good(&mut spec);
            assert_eq!(spec.validate(&allowed), Ok(()), "{field}: the edge itself");
            let spec = spec_of(first_bad);
            assert_eq!(
                spec.validate(&allowed).map_err(|e| e.field),
                Err(field.to_string()),
                "{field}: past the edge"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn spec_of(change: Box<dyn Fn(&mut VmSpec)>) -> VmSpec {
        let mut spec = spec();
        change(&mut spec);
        spec
    }

    /// A VM its user runs (`bulkhead run --config`) gets the same checks,
    /// but may name any file they can open.
    #[test]
    fn a_spec_for_its_user_is_checked_without_the_storage_directories() {
        let mut spec = spec();
        spec.kernel = Some("/etc/hostname".into());
        assert_eq!(spec.validate_for_its_user(), Ok(()));
        assert_eq!(
            spec.validate(&[]).map_err(|e| e.field),
            Err("kernel".into())
        );
        spec.memory_mib = 1;
        assert_eq!(
            spec.validate_for_its_user().map_err(|e| e.field),
            Err("memory_mib".into())
        );
    }

    /// Unset options are left out of the spec the API shows; set ones appear.
    #[test]
    fn unset_rate_limits_are_not_shown() {
        let plain: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "disks": [{"path": "/d"}], "nics": [{"tap": "t0"}]
        }))
        .unwrap();
        let shown = serde_json::to_value(&plain).unwrap();
        assert!(shown["disks"][0].get("rate_limit").is_none(), "{shown}");
        assert!(shown["nics"][0].get("rate_limit").is_none(), "{shown}");
        assert!(
            shown.get("rng").is_none() && shown.get("balloon").is_none(),
            "{shown}"
        );
        let limited: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "disks": [{"path": "/d", "rate_limit": {"ops_per_sec": 5}}], "rng": true
        }))
        .unwrap();
        let shown = serde_json::to_value(&limited).unwrap();
        assert_eq!(shown["disks"][0]["rate_limit"]["ops_per_sec"], 5, "{shown}");
        assert_eq!(shown["rng"], true, "{shown}");
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec = spec();
        assert_eq!((spec.cpus, spec.memory_mib), (1, 128));
        assert_eq!(spec.validate(&[]), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let dir = std::env::temp_dir().join(format!("bulkhead-spec-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"x").unwrap();
        let disk = dir.join("disk");
        std::fs::write(&disk, b"x").unwrap();
        let (disk2, disk3, disk4) = (disk.clone(), disk.clone(), disk.clone());
        let allowed = [dir.canonicalize().unwrap()];
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("name", Box::new(|s| s.name = "Bad Name".into())),
            ("name", Box::new(|s| s.name = String::new())),
            ("cpus", Box::new(|s| s.cpus = 0)),
            ("memory_mib", Box::new(|s| s.memory_mib = 1)),
            ("memory_mib", Box::new(|s| s.memory_mib = u64::MAX)),
            ("kernel", Box::new(|s| s.kernel = Some("relative".into()))),
            (
                "kernel",
                Box::new(|s| s.kernel = Some("/etc/passwd".into())),
            ),
            ("initrd", Box::new(|s| s.initrd = Some("/x".into()))),
            (
                "disks[0].path",
                Box::new(|s| {
                    s.disks = vec![DiskSpec {
                        path: "/nonexistent".into(),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "disks[0].id",
                Box::new(move |s| {
                    s.disks = vec![DiskSpec {
                        path: disk.clone(),
                        id: Some("twenty-one-bytes-long".into()),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "disks[0].id",
                Box::new(move |s| {
                    s.disks = vec![DiskSpec {
                        path: disk2.clone(),
                        id: Some("tab\tin".into()),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "disks[1].id",
                Box::new(move |s| {
                    let disk = DiskSpec {
                        path: disk3.clone(),
                        id: Some("same".into()),
                        ..Default::default()
                    };
                    s.disks = vec![disk.clone(), disk];
                }),
            ),
            (
                "disks[0].rate_limit",
                Box::new(move |s| {
                    s.disks = vec![DiskSpec {
                        path: disk4.clone(),
                        rate_limit: RateLimit {
                            bytes_per_sec: Some(0),
                            ..Default::default()
                        },
                        ..Default::default()
                    }]
                }),
            ),
            (
                "nics[0].rate_limit",
                Box::new(|s| {
                    s.nics = vec![NicSpec {
                        tap: "t0".into(),
                        rate_limit: RateLimit {
                            ops_burst: Some(10),
                            ..Default::default()
                        },
                        ..Default::default()
                    }]
                }),
            ),
            (
                "balloon.target_mib",
                Box::new(|s| {
                    s.balloon = Some(BalloonConfig {
                        target_mib: s.memory_mib + 1,
                        ..Default::default()
                    })
                }),
            ),
            (
                "nics[0].tap",
                Box::new(|s| {
                    s.nics = vec![NicSpec {
                        tap: "much-too-long-name".into(),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "nics[0].mac",
                Box::new(|s| {
                    s.nics = vec![NicSpec {
                        tap: "t0".into(),
                        mac: Some("01:00:00:00:00:01".into()),
                        ..Default::default()
                    }]
                }),
            ),
            (
                "vsock.cid",
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: 2,
                        socket: None,
                    })
                }),
            ),
            ("cmdline", Box::new(|s| s.cmdline = Some("a\nb".into()))),
            (
                "vsock.socket",
                Box::new(|s| {
                    s.vsock = Some(VsockSpec {
                        cid: 3,
                        socket: Some("/etc/passwd".into()),
                    })
                }),
            ),
        ];
        for (field, change) in cases {
            let mut spec = spec();
            change(&mut spec);
            let error = spec.validate(&allowed).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        // Inside the allowed directory is fine; through '..' or a link it
        // is not (the daemon opens files without following either); a
        // directory is not a file.
        let mut ok = spec();
        assert_eq!(ok.validate(&allowed), Ok(()));
        // A VM its user runs places its own vsock socket.
        ok.vsock = Some(VsockSpec {
            cid: 3,
            socket: Some("v.sock".into()),
        });
        assert_eq!(ok.validate_for_its_user(), Ok(()));
        ok.vsock = None;
        ok.kernel = Some(dir.join("sub/../kernel"));
        let error = ok.validate(&allowed).unwrap_err();
        assert!(error.message.contains("without symbolic links"), "{error}");
        std::os::unix::fs::symlink(dir.join("kernel"), dir.join("link")).unwrap();
        ok.kernel = Some(dir.join("link"));
        assert_eq!(ok.validate(&allowed).unwrap_err().field, "kernel");
        ok.kernel = Some(dir.join("sub"));
        assert_eq!(ok.validate(&allowed).unwrap_err().field, "kernel");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A directory under the temporary one, removed when dropped.
    struct Storage(PathBuf);

    impl Storage {
        fn new(test: &str) -> Storage {
            let dir =
                std::env::temp_dir().join(format!("bulkhead-spec-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Storage(dir.canonicalize().unwrap())
        }

        /// A regular file `name` in it.
        fn file(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, b"x").unwrap();
            path
        }

        fn allowed(&self) -> [PathBuf; 1] {
            [self.0.clone()]
        }
    }

    impl Drop for Storage {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The error `spec` gets from the daemon's checks, as `field: message`.
    fn refusal(spec: &VmSpec, allowed: &[PathBuf]) -> String {
        spec.validate(allowed).unwrap_err().to_string()
    }

    fn with(change: impl FnOnce(&mut VmSpec)) -> VmSpec {
        let mut spec = spec();
        change(&mut spec);
        spec
    }

    #[test]
    fn a_name_is_lower_case_letters_digits_and_dashes_not_leading() {
        for good in ["a", "0", "web-1", "a-", "0a-9z", &"a".repeat(63)] {
            assert!(valid_name(good), "{good:?}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "", &too_long, "-a", "-", "A", "web_1", "a.b", "a b", "é", "a/b",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_name_is_refused_with_the_rule() {
        assert_eq!(
            refusal(&with(|s| s.name = "-web".into()), &[]),
            "name: must be 1 to 63 lower-case letters, digits or '-', not starting with '-'"
        );
    }

    #[test]
    fn cpus_are_1_to_max_cpus() {
        let max = vmm::arch::x86_64::mptable::MAX_CPUS;
        for cpus in [1, 2, max] {
            assert_eq!(with(|s| s.cpus = cpus).validate(&[]), Ok(()), "{cpus}");
        }
        assert_eq!(
            refusal(&with(|s| s.cpus = 0), &[]),
            format!("cpus: must be 1 to {max}, not 0")
        );
        assert_eq!(
            refusal(&with(|s| s.cpus = max + 1), &[]),
            format!("cpus: must be 1 to {max}, not {}", max + 1)
        );
    }

    #[test]
    fn memory_is_16_mib_to_1_tib_both_included() {
        assert_eq!(MAX_MEMORY_MIB, 1024 * 1024);
        for mib in [MIN_MEMORY_MIB, MAX_MEMORY_MIB] {
            assert_eq!(with(|s| s.memory_mib = mib).validate(&[]), Ok(()), "{mib}");
        }
        for mib in [0, MIN_MEMORY_MIB - 1, MAX_MEMORY_MIB + 1] {
            assert_eq!(
                refusal(&with(|s| s.memory_mib = mib), &[]),
                format!("memory_mib: must be 16 to 1048576, not {mib}")
            );
        }
    }

    #[test]
    fn a_cmdline_is_one_line_of_at_most_2048_bytes() {
        let refused = "cmdline: must be one line of at most 2048 bytes";
        for good in [String::new(), "a b\tc".into(), "x".repeat(2048)] {
            assert_eq!(with(|s| s.cmdline = Some(good)).validate(&[]), Ok(()));
        }
        for bad in ["x".repeat(2049), "a\nb".into(), "a\0b".into(), "\n".into()] {
            assert_eq!(
                refusal(&with(|s| s.cmdline = Some(bad.clone())), &[]),
                refused,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_initrd_needs_a_kernel() {
        let storage = Storage::new("initrd");
        let (kernel, initrd) = (storage.file("kernel"), storage.file("initrd"));
        let allowed = storage.allowed();
        assert_eq!(
            refusal(&with(|s| s.initrd = Some(initrd.clone())), &allowed),
            "initrd: needs a kernel"
        );
        let both = with(|s| {
            s.kernel = Some(kernel);
            s.initrd = Some(initrd);
        });
        assert_eq!(both.validate(&allowed), Ok(()));
        // The initrd is a file like the kernel, checked as one.
        let outside = with(|s| {
            s.kernel = both.kernel.clone();
            s.initrd = Some("/etc/hostname".into());
        });
        assert!(
            refusal(&outside, &allowed).starts_with("initrd: /etc/hostname is outside"),
            "{}",
            refusal(&outside, &allowed)
        );
    }

    #[test]
    fn a_relative_path_is_refused_as_relative() {
        assert_eq!(
            refusal(&with(|s| s.kernel = Some("kernel".into())), &[]),
            "kernel: must be an absolute path"
        );
    }

    /// A file that exists, inside the storage directory, is still refused
    /// for a comma or a newline in its path (the VMM's option syntax).
    #[test]
    fn a_path_with_a_comma_or_a_newline_is_refused_though_the_file_is_there() {
        let storage = Storage::new("separators");
        let allowed = storage.allowed();
        for name in ["a,b", "a\nb"] {
            let path = storage.file(name);
            assert_eq!(
                refusal(&with(|s| s.kernel = Some(path)), &allowed),
                "kernel: must not contain ',' or a newline",
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_refused_naming_it() {
        let storage = Storage::new("missing");
        let path = storage.0.join("absent");
        let error = refusal(&with(|s| s.kernel = Some(path.clone())), &storage.allowed());
        assert!(
            error.starts_with(&format!("kernel: {}: ", path.display())),
            "{error}"
        );
    }

    #[test]
    fn a_path_through_a_link_or_dot_dot_is_refused_with_the_file_it_names() {
        let storage = Storage::new("links");
        let kernel = storage.file("kernel");
        std::fs::create_dir(storage.0.join("sub")).unwrap();
        std::os::unix::fs::symlink(&kernel, storage.0.join("link")).unwrap();
        for indirect in [storage.0.join("link"), storage.0.join("sub/../kernel")] {
            assert_eq!(
                refusal(&with(|s| s.kernel = Some(indirect.clone())), &storage.allowed()),
                format!(
                    "kernel: {} must name the file itself, without symbolic links, '.' or '..' (it is {})",
                    indirect.display(),
                    kernel.display()
                )
            );
        }
        assert_eq!(
            with(|s| s.kernel = Some(kernel)).validate(&storage.allowed()),
            Ok(())
        );
    }

    #[test]
    fn a_file_outside_every_storage_directory_is_refused() {
        let (storage, other) = (Storage::new("inside"), Storage::new("outside"));
        let kernel = other.file("kernel");
        let spec = with(|s| s.kernel = Some(kernel.clone()));
        assert_eq!(
            refusal(&spec, &storage.allowed()),
            format!(
                "kernel: {} is outside the daemon's storage directories",
                kernel.display()
            )
        );
        assert_eq!(refusal(&spec, &[]), refusal(&spec, &storage.allowed()));
        // Any one of the directories will do.
        assert_eq!(spec.validate(&[storage.0.clone(), other.0.clone()]), Ok(()));
    }

    #[test]
    fn a_directory_is_not_a_file() {
        let storage = Storage::new("directory");
        let sub = storage.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(
            refusal(&with(|s| s.kernel = Some(sub.clone())), &storage.allowed()),
            format!("kernel: {} is not a regular file", sub.display())
        );
    }

    #[test]
    fn each_disks_path_is_checked_as_a_file() {
        let storage = Storage::new("disk-paths");
        let good = storage.file("good");
        let disks = |second: PathBuf| {
            with(|s| {
                s.disks = [good.clone(), second]
                    .into_iter()
                    .map(|path| DiskSpec {
                        path,
                        ..Default::default()
                    })
                    .collect()
            })
        };
        assert_eq!(disks(good.clone()).validate(&storage.allowed()), Ok(()));
        assert_eq!(
            refusal(&disks("rel".into()), &storage.allowed()),
            "disks[1].path: must be an absolute path"
        );
    }

    #[test]
    fn at_most_16_disks_and_8_nics() {
        let storage = Storage::new("counts");
        let disk = storage.file("disk");
        let disks = |n: usize| {
            with(|s| {
                s.disks = vec![
                    DiskSpec {
                        path: disk.clone(),
                        ..Default::default()
                    };
                    n
                ]
            })
        };
        assert_eq!(disks(16).validate(&storage.allowed()), Ok(()));
        assert_eq!(
            refusal(&disks(17), &storage.allowed()),
            "disks: at most 16 disks"
        );
        let nics = |n: usize| {
            with(|s| {
                s.nics = (0..n)
                    .map(|i| NicSpec {
                        tap: format!("tap{i}"),
                        ..Default::default()
                    })
                    .collect()
            })
        };
        assert_eq!(nics(8).validate(&[]), Ok(()));
        assert_eq!(refusal(&nics(9), &[]), "nics: at most 8 interfaces");
    }

    #[test]
    fn distinct_disk_ids_pass_and_a_repeated_one_is_named() {
        let storage = Storage::new("disk-ids");
        let disk = storage.file("disk");
        let ids = |ids: &[&str]| {
            with(|s| {
                s.disks = ids
                    .iter()
                    .map(|id| DiskSpec {
                        path: disk.clone(),
                        id: Some(id.to_string()),
                        ..Default::default()
                    })
                    .collect()
            })
        };
        assert_eq!(
            ids(&["a", "b", "data 1"]).validate(&storage.allowed()),
            Ok(())
        );
        assert_eq!(
            refusal(&ids(&["a", "b", "a"]), &storage.allowed()),
            "disks[2].id: used twice"
        );
        assert_eq!(
            refusal(&ids(&["a", ""]), &storage.allowed()),
            "disks[1].id: id '' must be 1 to 20 bytes long"
        );
    }

    #[test]
    fn a_tap_is_1_to_15_letters_digits_dashes_or_underscores() {
        let tap = |name: &str| {
            with(|s| {
                s.nics = vec![NicSpec {
                    tap: name.into(),
                    ..Default::default()
                }]
            })
        };
        for good in ["t", "tap-0", "tap_0", "TAP9", &"a".repeat(15)] {
            assert_eq!(tap(good).validate(&[]), Ok(()), "{good:?}");
        }
        let too_long = "a".repeat(16);
        for bad in ["", &too_long, "a.b", "a b", "a/b", "é", "a:b"] {
            assert_eq!(
                refusal(&tap(bad), &[]),
                "nics[0].tap: must be 1 to 15 letters, digits, '-' or '_'",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_tap_used_twice_is_refused() {
        let spec = with(|s| {
            s.nics = ["tap0", "tap1", "tap0"]
                .into_iter()
                .map(|tap| NicSpec {
                    tap: tap.into(),
                    ..Default::default()
                })
                .collect()
        });
        assert_eq!(refusal(&spec, &[]), "nics[2].tap: used twice");
    }

    #[test]
    fn a_nics_mac_is_unicast() {
        let mac = |mac: &str| {
            with(|s| {
                s.nics = vec![NicSpec {
                    tap: "t0".into(),
                    mac: Some(mac.into()),
                    ..Default::default()
                }]
            })
        };
        assert_eq!(mac("02:00:00:00:00:01").validate(&[]), Ok(()));
        assert_eq!(
            refusal(&mac("03:00:00:00:00:01"), &[]),
            "nics[0].mac: '03:00:00:00:00:01' is a multicast address"
        );
    }

    #[test]
    fn rate_limits_are_checked_per_device() {
        let storage = Storage::new("rate-limits");
        let disk = storage.file("disk");
        let spec = with(|s| {
            s.disks = vec![DiskSpec {
                path: disk,
                rate_limit: RateLimit {
                    bytes_per_sec: Some(1),
                    ..Default::default()
                },
                ..Default::default()
            }];
            s.nics = vec![
                NicSpec {
                    tap: "t0".into(),
                    ..Default::default()
                },
                NicSpec {
                    tap: "t1".into(),
                    rate_limit: RateLimit {
                        ops_per_sec: Some(0),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ];
        });
        assert_eq!(
            refusal(&spec, &storage.allowed()),
            "nics[1].rate_limit: ops_per_sec must be at least 1"
        );
    }

    #[test]
    fn the_balloon_asks_for_at_most_the_vms_memory() {
        let balloon = |target_mib: u64| {
            with(|s| {
                s.balloon = Some(BalloonConfig {
                    target_mib,
                    ..Default::default()
                })
            })
        };
        assert_eq!(balloon(128).validate(&[]), Ok(()));
        assert_eq!(
            refusal(&balloon(129), &[]),
            "balloon.target_mib: at most the VM's memory_mib (128)"
        );
    }

    #[test]
    fn a_vsock_cid_is_3_to_one_below_u32_max() {
        let cid = |cid: u32| {
            with(|s| {
                s.vsock = Some(VsockSpec { cid, socket: None });
            })
        };
        for good in [3, 4, u32::MAX - 1] {
            assert_eq!(cid(good).validate(&[]), Ok(()), "{good}");
        }
        for bad in [0, 1, 2, u32::MAX] {
            assert_eq!(
                refusal(&cid(bad), &[]),
                "vsock.cid: must be 3 or more (0-2 are reserved)",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_daemon_places_the_vsock_socket_itself() {
        let spec = with(|s| {
            s.vsock = Some(VsockSpec {
                cid: 3,
                socket: Some("/tmp/v.sock".into()),
            })
        });
        assert_eq!(
            refusal(&spec, &[]),
            "vsock.socket: is the daemon's to place (vsock.sock in the VM's directory)"
        );
        assert_eq!(spec.validate_for_its_user(), Ok(()));
        // Everything else is still checked for a VM its user runs.
        let spec = with(|s| {
            s.vsock = Some(VsockSpec {
                cid: 2,
                socket: Some("/tmp/v.sock".into()),
            })
        });
        assert_eq!(spec.validate_for_its_user().unwrap_err().field, "vsock.cid");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<VmSpec>(r#"{"name":"a","cpu":2}"#).is_err());
    }
}
