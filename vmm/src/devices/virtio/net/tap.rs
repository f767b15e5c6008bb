//! A host TAP device carrying virtio-net frames (with their virtio-net header).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// The virtio-net header in front of every frame (virtio 1.x: 12 bytes,
/// num_buffers included).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("NIC on TAP {name}: {message}")]
    Mac { name: String, message: String },
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach TAP {name} (it may exist with other flags, or this needs CAP_NET_ADMIN): {source}")]
    Attach { name: String, source: io::Error },
    #[error("TAP {name} does not take virtio-net headers: {source}")]
    VnetHeader { name: String, source: io::Error },
    #[error("cannot create the rate-limit timer for TAP {name}: {source}")]
    Timer { name: String, source: io::Error },
    #[error("cannot bring TAP {name} up: {source}")]
    LinkUp { name: String, source: io::Error },
    #[error("the descriptor passed for TAP {name} is not that TAP: {why}")]
    NotThatTap { name: String, why: String },
}

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; zero is a valid value for every field.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

impl Tap {
    /// Attaches to TAP `name`, creating it if it does not exist, with
    /// virtio-net headers on every frame, and brings its link up.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(TapError::Name(name.to_string()));
        }
        // SAFETY: opening a path with constant flags; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // A multi-queue TAP lets two processes attach at once: a live
        // migration's destination opens it while the paused source still
        // holds it. A TAP someone created single-queue refuses that flag
        // (EINVAL); it is then attached as it is.
        let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let mut attached = Err(io::Error::from_raw_os_error(libc::EINVAL));
        for flags in [base | libc::IFF_MULTI_QUEUE, base] {
            let mut request = ifreq_for(name);
            request.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one ifreq we own.
            attached =
                if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                };
            if !matches!(&attached, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                break;
            }
        }
        if let Err(source) = attached {
            return Err(TapError::Attach {
                name: name.to_string(),
                source,
            });
        }
        let tap = Tap::with_header(file, name)?;
        tap.link_up()?;
        Ok(tap)
    }

    /// A TAP attached by someone else (the daemon), passed as a descriptor:
    /// checked to be attached to the TAP named `name` and to carry virtio-net
    /// headers. Needs no privilege.
    pub fn from_descriptor(file: File, name: &str) -> Result<Tap, TapError> {
        let not_that = |why: String| TapError::NotThatTap {
            name: name.to_string(),
            why,
        };
        let mut request = ifreq_for("");
        // SAFETY: TUNGETIFF writes one ifreq we own; any other kind of file refuses it.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut request) } < 0 {
            return Err(not_that(format!(
                "not an attached TAP ({})",
                io::Error::last_os_error()
            )));
        }
        let attached: Vec<u8> = request
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        if attached != name.as_bytes() {
            return Err(not_that(format!(
                "it is attached to '{}'",
                String::from_utf8_lossy(&attached)
            )));
        }
        // SAFETY: `ifru_flags` is the member TUNGETIFF fills.
        let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_VNET_HDR == 0 {
            return Err(not_that(
                "it is not a TAP with virtio-net headers (IFF_TAP | IFF_VNET_HDR)".into(),
            ));
        }
        Tap::with_header(file, name)
    }

    fn with_header(file: File, name: &str) -> Result<Tap, TapError> {
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) } < 0 {
            return Err(TapError::VnetHeader {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The attached descriptor, to hand to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads the guest takes on received frames
    /// (TUN_F_* bits); false when the kernel refuses them.
    pub fn set_offloads(&self, flags: libc::c_uint) -> bool {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            ) >= 0
        }
    }

    fn link_up(&self) -> Result<(), TapError> {
        let error = |source| TapError::LinkUp {
            name: self.name.clone(),
            source,
        };
        // SAFETY: a plain datagram socket for interface ioctls; checked.
        let socket =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if socket < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: `socket` was just created and is owned here.
        let socket = unsafe { File::from_raw_fd(socket) };
        let mut request = ifreq_for(&self.name);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq we own;
        // `ifru_flags` is the member those requests use.
        unsafe {
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
                return Err(error(io::Error::last_os_error()));
            }
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
                return Err(error(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Reads one frame (header included) into `buffer`; Ok(None) when none is waiting.
    pub fn read_frame(&self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: reads at most buffer.len() bytes into our buffer.
            let n = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(error),
            }
        }
    }

    /// Sends one frame, header included, gathered from `iovecs`.
    pub fn write_frame(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        loop {
            // SAFETY: the iovecs point into guest memory that stays mapped
            // (checked when the chain was parsed).
            let n = unsafe {
                libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as i32)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_before_touching_the_kernel() {
        assert!(matches!(Tap::open(""), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::Name(_))
        ));
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
    }
}
