//! The guest images `cargo xtask images` builds.

use std::path::{Path, PathBuf};

/// Where the images are: `BULKHEAD_IMAGES`, else the workspace's
/// `target/images`.
pub fn images_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

/// A guest image. A test that needs one fails without it, naming the
/// command that builds it: a missing image never turns into a test that
/// passes without running.
pub fn image(name: &str) -> PathBuf {
    let path = images_dir().join(name);
    assert!(
        path.is_file(),
        "guest image {} is missing: run `cargo xtask images` (or set BULKHEAD_IMAGES)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "no-such-image is missing: run `cargo xtask images`")]
    fn a_missing_image_fails_the_test_naming_the_command_that_builds_it() {
        image("no-such-image");
    }
}
