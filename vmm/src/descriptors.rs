//! Receiving open files from another process (`SCM_RIGHTS`): the daemon's
//! launch plan, a same-host migration source's TAPs.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Receives one message into `buffer` with at most `max` descriptors, which
/// are owned (and closed when dropped) whatever the caller decides next.
/// Returns the message's length and its descriptors.
pub fn receive<S: ScmSocket>(
    socket: &S,
    buffer: &mut [u8],
    max: usize,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    // One slot more than wanted: the kernel drops what does not fit
    // without a word, so a full extra slot is how an excess shows.
    let mut raw = vec![-1 as RawFd; max + 1];
    let mut iovec = [libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    }];
    // SAFETY: the iovec points at `buffer`, which lives until the call
    // returns and may hold any bytes.
    let (length, count) = unsafe { socket.recv_with_fds(&mut iovec, &mut raw) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let descriptors = raw[..count]
        .iter()
        // SAFETY: recv_with_fds returned `count` new descriptors, ours alone.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect::<Vec<OwnedFd>>();
    if descriptors.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {max} descriptors sent"),
        ));
    }
    Ok((length, descriptors))
}
