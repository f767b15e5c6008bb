//! Host sockets do not survive a snapshot: a vsock connection open when the
//! snapshot is taken ends for the host program with the old VMM, and the
//! restored device tells the guest's driver its transport was reset
//! (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), so the guest program waiting on
//! that connection gets an error instead of waiting forever.

use crate::support::{self, Kernel, TempDir, Vm};
use crate::EXIT_LIMIT;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a host program to guest port `port` through the VMM's socket;
/// returns the stream once the guest accepted.
fn connect(socket: &Path, port: u32) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(support::COMMAND_LIMIT))
        .unwrap();
    (&stream)
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    stream
}

#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn a_vsock_connection_open_at_a_snapshot_is_reset_in_the_restored_guest() {
    let dir = TempDir::new("hwkvm-vsock-reset");
    let socket = dir.join("vsock.sock");
    let original_dir = dir.join("original");
    let restored_dir = dir.join("restored");
    std::fs::create_dir_all(&original_dir).unwrap();
    std::fs::create_dir_all(&restored_dir).unwrap();
    let extra = vec![
        "--vsock".to_string(),
        format!("cid=3,socket={}", socket.display()),
    ];
    let mut original = Vm::boot(Kernel::Project, &extra, &original_dir);
    // The guest accepts a connection and waits for a line that never comes.
    original.start_detached("bulkhead-guest-tool vsock-serve 6000");
    original.wait_for("vsock listening on 6000", support::COMMAND_LIMIT);
    let mut host = connect(&socket, 6000);

    let snapshot = dir.join("snapshot");
    original.ctl(&["snapshot", snapshot.to_str().unwrap()]);
    drop(original);
    // The host program's connection went with the old VMM.
    let mut rest = Vec::new();
    let end = host.read_to_end(&mut rest);
    assert!(
        matches!(end, Ok(0)),
        "the host connection outlived its VMM: {end:?} {rest:?}"
    );

    let mut restored = Vm::start(
        &["--restore".to_string(), snapshot.display().to_string()],
        &restored_dir,
    );
    // Told of the reset, the guest's driver fails the waiting read (Linux:
    // ECONNRESET); without the event the program would wait forever.
    restored.wait_for("bulkhead-guest-tool: vsock ", support::COMMAND_LIMIT);
    let console = restored.console();
    let error = console
        .lines()
        .find(|line| line.contains("bulkhead-guest-tool: vsock "))
        .unwrap();
    assert!(
        !console.contains("vsock served:"),
        "the program read a line nobody sent\n{}",
        restored.describe()
    );
    eprintln!("hwkvm| after restore: {error}");

    // The restored VMM's socket serves new connections.
    restored.start_detached("bulkhead-guest-tool vsock-serve 6001");
    restored.wait_for("vsock listening on 6001", support::COMMAND_LIMIT);
    let stream = connect(&socket, 6001);
    (&stream).write_all(b"after-restore\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "guest got: after-restore");

    restored.type_text("reboot -f\n");
    let (status, _) = restored.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", restored.describe());
}
