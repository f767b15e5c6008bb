//! `bulkhead-guest-tool`: runs inside test guests (busybox user space), for
//! what busybox cannot do.
//!
//! - `count FILE [PERIOD_MS]`: counts on from the last number in FILE,
//!   appending each number to FILE (fdatasync'd) and printing `count N` on
//!   the console, so a snapshot, restore or migration shows any gap or repeat
//!   both on the console and on disk.
//! - `vsock-connect PORT MESSAGE`: connects to the host (CID 2) on PORT,
//!   sends MESSAGE and a newline, prints the line it gets back.
//! - `vsock-serve PORT`: accepts one connection on PORT, reads a line, answers
//!   `guest got: LINE`.
//! - `touch-memory MIB SECONDS`: writes every page of MIB MiB over and over for
//!   SECONDS (a guest that dirties memory, for migration).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const HOST_CID: u32 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["count", file] => count(file, 100),
        ["count", file, period] => parse(period).and_then(|p| count(file, p)),
        ["vsock-connect", port, message] => parse(port).and_then(|p| vsock_connect(p, message)),
        ["vsock-serve", port] => parse(port).and_then(vsock_serve),
        ["touch-memory", mib, seconds] => {
            parse(mib).and_then(|m| parse(seconds).and_then(|s| touch_memory(m, s)))
        }
        _ => Err(
            "usage: bulkhead-guest-tool count FILE [PERIOD_MS] | vsock-connect PORT MESSAGE \
                  | vsock-serve PORT | touch-memory MIB SECONDS"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bulkhead-guest-tool: {error}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn parse<T: std::str::FromStr>(text: &str) -> Result<T> {
    text.parse().map_err(|_| format!("not a number: {text}"))
}

fn count(path: &str, period_ms: u64) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("read {path}: {e}"))?;
    let mut n: u64 = text
        .lines()
        .last()
        .map(|line| parse(line.trim()))
        .transpose()?
        .unwrap_or(0);
    let stdout = std::io::stdout();
    loop {
        n += 1;
        file.write_all(format!("{n}\n").as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("write {path}: {e}"))?;
        writeln!(stdout.lock(), "count {n}").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(period_ms));
    }
}

fn vsock_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is valid.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = cid;
    address.svm_port = port;
    address
}

const VSOCK_ADDRESS_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as _;

fn vsock_connect(port: u32, message: &str) -> Result<()> {
    let socket = vsock_socket()?;
    let address = vsock_address(HOST_CID, port);
    // SAFETY: `address` is a valid sockaddr_vm of the given length.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            VSOCK_ADDRESS_LEN,
        )
    };
    if rc != 0 {
        return Err(format!(
            "vsock connect to port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut stream = std::fs::File::from(socket);
    stream
        .write_all(format!("{message}\n").as_bytes())
        .map_err(|e| format!("vsock write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("vsock read: {e}"))?;
    println!("vsock reply: {}", reply.trim_end());
    Ok(())
}

fn vsock_serve(port: u32) -> Result<()> {
    let socket = vsock_socket()?;
    let address = vsock_address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `address` is a valid sockaddr_vm of the given length.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_vm).cast(),
            VSOCK_ADDRESS_LEN,
        )
    };
    // SAFETY: listen(2) on a socket we own.
    if rc != 0 || unsafe { libc::listen(socket.as_raw_fd(), 1) } != 0 {
        return Err(format!(
            "vsock listen on port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    println!("vsock listening on {port}");
    // SAFETY: accept(2) on a listening socket we own; no peer address wanted.
    let fd = unsafe {
        libc::accept(
            socket.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        return Err(format!("vsock accept: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by accept(2) and is owned by nobody else.
    let mut stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut line = String::new();
    BufReader::new(&mut stream)
        .read_line(&mut line)
        .map_err(|e| format!("vsock read: {e}"))?;
    let line = line.trim_end();
    stream
        .write_all(format!("guest got: {line}\n").as_bytes())
        .map_err(|e| format!("vsock write: {e}"))?;
    println!("vsock served: {line}");
    Ok(())
}

fn touch_memory(mib: usize, seconds: u64) -> Result<()> {
    const PAGE: usize = 4096;
    let mut memory = vec![0u8; mib << 20];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        rounds += 1;
        for page in memory.chunks_mut(PAGE) {
            page[0] = page[0].wrapping_add(1);
        }
    }
    // Keeps the writes from being optimised away.
    let sum: u64 = memory.iter().step_by(PAGE).map(|&b| u64::from(b)).sum();
    println!("touched {mib} MiB {rounds} times ({sum})");
    Ok(())
}
