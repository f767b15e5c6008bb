//! The process folder is removed when the test process exits, after a
//! passing test and after a failing one: seen from a second run of this
//! test binary.

use std::process::Command;

/// Run by `removed_at_exit` only: makes the folder, prints it, and passes
/// or fails as told.
#[test]
#[ignore = "run by removed_at_exit as a child process"]
fn child_makes_the_process_folder() {
    let dir = testkit::process_dir();
    std::fs::write(dir.join("file"), b"x").unwrap();
    println!("process-dir={}", dir.display());
    assert!(
        std::env::var_os("TESTKIT_CHILD_FAILS").is_none(),
        "failing as told"
    );
}

fn child(fails: bool) -> (bool, std::path::PathBuf) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "--ignored",
        "--exact",
        "child_makes_the_process_folder",
        "--nocapture",
    ]);
    if fails {
        command.env("TESTKIT_CHILD_FAILS", "1");
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .find_map(|line| line.strip_prefix("process-dir="))
        .unwrap_or_else(|| panic!("no folder printed: {stdout}"));
    (output.status.success(), dir.into())
}

#[test]
fn removed_at_exit() {
    for fails in [false, true] {
        let (passed, dir) = child(fails);
        assert_eq!(passed, !fails);
        assert!(dir.starts_with(std::env::temp_dir()));
        assert!(
            !dir.exists(),
            "{} is left (failing child: {fails})",
            dir.display()
        );
    }
}
