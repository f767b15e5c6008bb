//! What the integration tests of every crate share, in one place instead of
//! `#[path]` copies: temporary folders removed on drop, the guest images,
//! processes that die with their test (and commands that fail when they
//! hang), `/proc` readings, and network namespaces of a test's own.

mod images;
mod netns;
mod process;
mod temp;

pub use images::{image, images_dir};
pub use netns::Namespace;
pub use process::{
    collect, dies_with_test, run, run_with_limit, status_field, threads_of, HOST_COMMAND_LIMIT,
};
pub use temp::{process_dir, TempDir};
