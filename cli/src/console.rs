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

/// What one read of stdin becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum Keys {
    /// Bytes for the guest (possibly none: a lone Ctrl-A waits for the next byte).
    Forward(Vec<u8>),
    /// Ctrl-A x: stop the VM. Nothing of this read reaches the guest, not
    /// even the bytes before the escape.
    Quit,
}

/// The console's escape rules, apart from any I/O. From a terminal, Ctrl-A
/// starts an escape anywhere in the input (not only at a line start) and the
/// byte after it decides: `x` quits, anything else (Ctrl-A too) is sent as
/// itself and the Ctrl-A is dropped. An escape may be split across reads. A
/// pipe's bytes are all sent as they are.
pub struct EscapeFilter {
    terminal: bool,
    escaped: bool,
}

impl EscapeFilter {
    pub fn new(terminal: bool) -> Self {
        EscapeFilter {
            terminal,
            escaped: false,
        }
    }

    /// Filters one read of stdin.
    pub fn feed(&mut self, input: &[u8]) -> Keys {
        let mut bytes = Vec::with_capacity(input.len());
        for &byte in input {
            if self.terminal && self.escaped {
                self.escaped = false;
                if byte == ESCAPE_QUIT {
                    return Keys::Quit;
                }
                bytes.push(byte);
            } else if self.terminal && byte == ESCAPE {
                self.escaped = true;
            } else {
                bytes.push(byte);
            }
        }
        Keys::Forward(bytes)
    }
}

/// Copies stdin into the UART until stdin ends. From a terminal, Ctrl-A x
/// stops the VM; Ctrl-A Ctrl-A sends one Ctrl-A (see [`EscapeFilter`]).
pub fn spawn_stdin_pump(serial: Arc<Mutex<SerialPort>>, exit: Arc<ExitSignal>, terminal: bool) {
    let pump = move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0u8; 256];
        let mut filter = EscapeFilter::new(terminal);
        loop {
            let n = match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let bytes = match filter.feed(&buffer[..n]) {
                Keys::Forward(bytes) => bytes,
                Keys::Quit => {
                    exit.request(VmExit::Stopped);
                    return;
                }
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(bytes: &[u8]) -> Keys {
        Keys::Forward(bytes.to_vec())
    }

    #[test]
    fn plain_bytes_pass_through() {
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"ls -l\r"), forward(b"ls -l\r"));
        assert_eq!(filter.feed(b""), forward(b""));
        // `x` alone is an ordinary key.
        assert_eq!(filter.feed(b"x"), forward(b"x"));
    }

    #[test]
    fn ctrl_a_x_quits_anywhere_in_a_line() {
        assert_eq!(EscapeFilter::new(true).feed(b"\x01x"), Keys::Quit);
        // Not only at a line start.
        assert_eq!(EscapeFilter::new(true).feed(b"abc\x01xdef"), Keys::Quit);
        assert_eq!(EscapeFilter::new(true).feed(b"\r\x01x"), Keys::Quit);
        // Only a lower-case x.
        assert_eq!(EscapeFilter::new(true).feed(b"\x01X"), forward(b"X"));
    }

    #[test]
    fn an_escape_split_across_reads_still_quits() {
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"ab\x01"), forward(b"ab"));
        assert_eq!(filter.feed(b"x"), Keys::Quit);
        // Held over an empty read too.
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"\x01"), forward(b""));
        assert_eq!(filter.feed(b""), forward(b""));
        assert_eq!(filter.feed(b"x"), Keys::Quit);
    }

    #[test]
    fn a_doubled_ctrl_a_sends_one() {
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"\x01\x01"), forward(b"\x01"));
        // The sent Ctrl-A starts no escape: the x after it is a key.
        assert_eq!(filter.feed(b"x"), forward(b"x"));
        // Split across reads.
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"\x01"), forward(b""));
        assert_eq!(filter.feed(b"\x01x"), forward(b"\x01x"));
        // Three in a row: one sent, the third starts an escape.
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"\x01\x01\x01"), forward(b"\x01"));
        assert_eq!(filter.feed(b"x"), Keys::Quit);
    }

    #[test]
    fn ctrl_a_before_another_key_drops_the_ctrl_a_and_sends_the_key() {
        let mut filter = EscapeFilter::new(true);
        assert_eq!(filter.feed(b"a\x01bc"), forward(b"abc"));
        assert_eq!(filter.feed(b"\x01\r"), forward(b"\r"));
        // The escape ended with that key: a later x is a key.
        assert_eq!(filter.feed(b"x"), forward(b"x"));
    }

    #[test]
    fn nothing_of_the_quitting_read_is_sent() {
        // Neither what came before the escape in the same read nor after it.
        assert_eq!(
            EscapeFilter::new(true).feed(b"echo\x01xrm -rf /\r"),
            Keys::Quit
        );
    }

    #[test]
    fn a_pipe_sends_every_byte_as_it_is() {
        let mut filter = EscapeFilter::new(false);
        assert_eq!(filter.feed(b"\x01x"), forward(b"\x01x"));
        assert_eq!(filter.feed(b"\x01"), forward(b"\x01"));
        assert_eq!(filter.feed(b"x\x01\x01"), forward(b"x\x01\x01"));
    }
}
