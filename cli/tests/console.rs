//! The serial console through the `bulkhead` binary: input from a pipe and
//! from a terminal (raw mode, restored at exit), and Ctrl-A x.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn guest(name: &str) -> std::path::PathBuf {
    let path = testkit::process_dir().join(format!("{name}.elf"));
    std::fs::write(&path, guests::test_guest(name).unwrap().unwrap()).unwrap();
    path
}

#[test]
fn piped_stdin_reaches_the_guest() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(guest("echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello guest\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("hello guest\r\necho: line ended"),
        "{stdout}"
    );
}

/// A pseudo-terminal pair: (controller, the terminal a child gets as stdin).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut terminal) = (0, 0);
    // SAFETY: openpty writes two descriptors it opened into our variables.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal; t is a valid termios to write.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same_mode(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag) == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag)
}

/// Starts `guest` with a terminal as stdin, waits for `ready` on stdout,
/// checks the terminal is in raw mode, types `keys`, checks the mode is
/// restored after exit, and returns the exit status and stdout.
fn run_on_terminal(name: &str, ready: &str, keys: &[u8]) -> (std::process::ExitStatus, String) {
    let (controller, terminal) = open_pty();
    let before = termios(&terminal);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(guest(name))
        .stdin(Stdio::from(terminal.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains(ready) {
        assert!(Instant::now() < deadline, "guest never said {ready:?}");
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "bulkhead closed stdout early");
        seen.extend_from_slice(&buf[..n]);
    }
    // The guest may speak before the VMM has switched the terminal (it
    // does so once the VM runs): seen failing on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    while same_mode(&before, &termios(&terminal)) {
        assert!(Instant::now() < deadline, "terminal not in raw mode");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::File::from(controller.try_clone().unwrap())
        .write_all(keys)
        .unwrap();
    let status = child.wait().unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    assert!(
        same_mode(&before, &termios(&terminal)),
        "terminal mode not restored at exit"
    );
    (status, String::from_utf8_lossy(&seen).into_owned())
}

#[test]
fn terminal_input_is_raw_and_the_mode_is_restored() {
    // In raw mode Enter arrives as '\r' (no ICRNL translation) and reaches the guest.
    let (status, stdout) = run_on_terminal("echo", "echo: ready", b"typed\r");
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("typed\r\necho: line ended"), "{stdout}");
}

#[test]
fn ctrl_a_x_quits() {
    let (status, stdout) = run_on_terminal("spin", "spinning", b"\x01x");
    assert!(status.success(), "{stdout}");
}
