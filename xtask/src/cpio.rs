//! A writer for the "newc" cpio format the Linux initramfs uses.
//!
//! Writing the archive here instead of running `cpio` lets the image build
//! put `/dev/console` in it without root (no mknod) and makes it reproducible
//! (fixed owners and times).

use std::io::Write;

/// One archive entry.
pub enum Entry<'a> {
    Directory {
        path: &'a str,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDevice {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes the entries and the trailer.
pub fn write_archive(out: &mut impl Write, entries: &[Entry]) -> std::io::Result<()> {
    for (index, entry) in entries.iter().enumerate() {
        let inode = index as u32 + 1;
        let (path, mode, data, rdev): (&str, u32, &[u8], (u32, u32)) = match entry {
            Entry::Directory { path } => (path, S_IFDIR | 0o755, &[], (0, 0)),
            Entry::File { path, mode, data } => (path, S_IFREG | mode, data, (0, 0)),
            Entry::CharDevice {
                path,
                mode,
                major,
                minor,
            } => (path, S_IFCHR | mode, &[], (*major, *minor)),
        };
        write_entry(out, inode, path, mode, data, rdev)?;
    }
    write_entry(out, 0, "TRAILER!!!", 0, &[], (0, 0))
}

/// Writes every file, directory and symlink under `root` (paths relative to
/// it, sorted, so parents come first), then `extra` entries, then the
/// trailer. Modes come from the files; owners and times are fixed.
pub fn write_tree(
    out: &mut impl Write,
    root: &std::path::Path,
    extra: &[Entry],
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = Vec::new();
    collect_paths(root, root, &mut paths)?;
    paths.sort();
    let mut inode = 1;
    for relative in &paths {
        let full = root.join(relative);
        let meta = std::fs::symlink_metadata(&full)?;
        let name = relative.to_string_lossy();
        let permissions = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            let target = target.to_string_lossy();
            write_entry(
                out,
                inode,
                &name,
                S_IFLNK | 0o777,
                target.as_bytes(),
                (0, 0),
            )?;
        } else if meta.is_dir() {
            write_entry(out, inode, &name, S_IFDIR | permissions, &[], (0, 0))?;
        } else {
            let data = std::fs::read(&full)?;
            write_entry(out, inode, &name, S_IFREG | permissions, &data, (0, 0))?;
        }
        inode += 1;
    }
    for (index, entry) in extra.iter().enumerate() {
        let inode = inode + index as u32;
        match entry {
            Entry::Directory { path } => {
                write_entry(out, inode, path, S_IFDIR | 0o755, &[], (0, 0))?
            }
            Entry::File { path, mode, data } => {
                write_entry(out, inode, path, S_IFREG | mode, data, (0, 0))?
            }
            Entry::CharDevice {
                path,
                mode,
                major,
                minor,
            } => write_entry(out, inode, path, S_IFCHR | mode, &[], (*major, *minor))?,
        }
    }
    write_entry(out, 0, "TRAILER!!!", 0, &[], (0, 0))
}

fn collect_paths(
    root: &std::path::Path,
    dir: &std::path::Path,
    into: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let relative = path.strip_prefix(root).expect("below root").to_path_buf();
        let is_dir = std::fs::symlink_metadata(&path)?.is_dir();
        into.push(relative);
        if is_dir {
            collect_paths(root, &path, into)?;
        }
    }
    Ok(())
}

fn write_entry(
    out: &mut impl Write,
    inode: u32,
    path: &str,
    mode: u32,
    data: &[u8],
    (rdev_major, rdev_minor): (u32, u32),
) -> std::io::Result<()> {
    let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
    let name_size = path.len() + 1;
    let fields = [
        inode,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, for reproducible archives
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev_major,
        rdev_minor,
        name_size as u32,
        0, // checksum (unused by "070701")
    ];
    let mut header = String::from("070701");
    for field in fields {
        header.push_str(&format!("{field:08X}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(path.as_bytes())?;
    out.write_all(&[0])?;
    // The name is padded so that header + name is a multiple of 4; so is the data.
    out.write_all(&[0; 3][..padding(110 + name_size)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..padding(data.len())])
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_alignment() {
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry::Directory { path: "dev" },
                Entry::CharDevice {
                    path: "dev/console",
                    mode: 0o600,
                    major: 5,
                    minor: 1,
                },
                Entry::File {
                    path: "init",
                    mode: 0o755,
                    data: b"12345",
                },
            ],
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        // dev/console: mode 020600 and rdev 5:1
        let console = text.find("dev/console").unwrap();
        let header = &text[console - 110..console];
        assert_eq!(&header[14..22], "00002180");
        assert_eq!(&header[78..86], "00000005");
        assert_eq!(&header[86..94], "00000001");
        assert!(text.contains("init\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn a_tree_keeps_modes_links_and_parents_first() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/tool"), b"#!").unwrap();
        std::os::unix::fs::symlink("tool", dir.join("bin/sh")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let mut out = Vec::new();
        write_tree(&mut out, &dir, &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&out);
        let position = |name: &str| text.find(name).unwrap();
        assert!(position("bin\0") < position("bin/sh\0"));
        let tool = position("bin/tool\0");
        assert_eq!(&text[tool - 110 + 14..tool - 110 + 22], "000081ED");
        let sh = position("bin/sh\0");
        assert_eq!(&text[sh - 110 + 14..sh - 110 + 22], "0000A1FF");
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }
}
