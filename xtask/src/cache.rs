//! A content-addressed cache of built images.
//!
//! An entry is a folder named after the image and the hash of everything that
//! went into it (sources, package versions, the recipe's own version). It is
//! built in a temporary folder and renamed into place, so an interrupted build
//! never leaves an entry that looks complete.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// `$BULKHEAD_CACHE`, else `$XDG_CACHE_HOME/bulkhead`, else `~/.cache/bulkhead`.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("BULKHEAD_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("bulkhead");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/bulkhead")
}

/// A hex SHA-256 over several inputs, each length-prefixed so that
/// ("ab","c") and ("a","bc") differ.
pub fn key(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex(&hasher.finalize())
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the entry for `name` with `key`, building it with `build` (which
/// fills the folder it is given) when it is not cached yet.
pub fn entry(name: &str, key: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let images = root().join("images");
    let short = &key[..16];
    let done = images.join(format!("{name}-{short}"));
    if done.is_dir() {
        eprintln!("xtask: {name}: cached ({})", done.display());
        return Ok(done);
    }
    let partial = images.join(format!(".{name}-{short}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("remove stale {}", partial.display()))?;
    }
    fs::create_dir_all(&partial).with_context(|| format!("create {}", partial.display()))?;
    eprintln!("xtask: {name}: building");
    build(&partial).with_context(|| format!("building image {name}"))?;
    fs::rename(&partial, &done).with_context(|| format!("publish {}", done.display()))?;
    Ok(done)
}

/// Removes the entries named `name` other than the one with `key` (for
/// large entries whose inputs change with every build).
pub fn remove_others(name: &str, key: &str) -> Result<()> {
    let images = root().join("images");
    let keep = format!("{name}-{}", &key[..16]);
    let Ok(entries) = fs::read_dir(&images) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let is_same_image = file_name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_same_image && file_name != keep {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_separates_parts() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"x"]), key(&[b"x"]));
        assert_eq!(key(&[b"x"]).len(), 64);
    }
}
