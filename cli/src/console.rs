//! The host side of the guest's serial console: raw terminal mode and the
//! stdin pump.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::devices::legacy::serial::SerialPort;
use vmm::devices::lock;
use vmm::exit::{ExitSignal, VmExit};

/// Ctrl-A, then `x`, leaves the console and stops the VM (as in QEMU).
const ESCAPE: u8 = 0x01;
const ESCAPE_QUIT: u8 = b'x';

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; None for pipes and files.
    pub fn stdin() -> Option<RawTerminal> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios for tcgetattr to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: applies a termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from this terminal in `stdin()`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Copies stdin into the UART until stdin ends. From a terminal, Ctrl-A x
/// stops the VM; Ctrl-A Ctrl-A sends one Ctrl-A.
pub fn spawn_stdin_pump(serial: Arc<Mutex<SerialPort>>, exit: Arc<ExitSignal>, terminal: bool) {
    let pump = move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0u8; 256];
        let mut escaped = false;
        loop {
            let n = match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut bytes = Vec::with_capacity(n);
            for &byte in &buffer[..n] {
                if terminal && escaped {
                    escaped = false;
                    if byte == ESCAPE_QUIT {
                        exit.request(VmExit::Stopped);
                        return;
                    }
                    bytes.push(byte);
                } else if terminal && byte == ESCAPE {
                    escaped = true;
                } else {
                    bytes.push(byte);
                }
            }
            let mut rest = &bytes[..];
            // The UART FIFO is small: wait for the guest to drain it.
            while !rest.is_empty() {
                if exit.is_requested() {
                    return;
                }
                let taken = lock(&serial).enqueue_input(rest);
                rest = &rest[taken..];
                if !rest.is_empty() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    };
    // The pump blocks in read(2); it is never joined and ends with the process.
    if let Err(e) = std::thread::Builder::new().name("stdin".into()).spawn(pump) {
        tracing::warn!("no console input: cannot start the stdin thread: {e}");
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts),
/// so they can be taken by `spawn_signal_waiter` instead of killing the
/// process with the terminal in raw mode.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is valid; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Turns the first stop signal into a clean stop of the VM.
pub fn spawn_signal_waiter(set: libc::sigset_t, exit: Arc<ExitSignal>) {
    let waiter = move || {
        let mut signal = 0;
        // SAFETY: `set` holds signals blocked in every thread; sigwait only writes `signal`.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            tracing::info!(signal, "stopping the VM");
            exit.request(VmExit::Stopped);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("signals".into())
        .spawn(waiter)
    {
        tracing::warn!("stop signals will not be handled: {e}");
    }
}
