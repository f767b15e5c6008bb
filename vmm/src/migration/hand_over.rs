//! Same-host migration hands the source's TAP devices to the destination:
//! a TAPS frame over the Unix socket, its descriptors attached
//! (`SCM_RIGHTS`). A TAP the user made single-queue cannot be attached a
//! second time while the source holds it; handed over, the destination
//! holds the same device, and it outlives the source.
//!
//! Guest RAM in a memfd (`shared_memory`) goes the same way, in a MEMORY
//! frame: the destination maps the very pages the source ran on, and no
//! page is copied. A live update of the VMM binary stops the guest only
//! while the device and vCPU state crosses over.
//!
//! The receiving side trusts nothing in the frames: the count must match
//! its machine, and each descriptor must be a TAP with the name its
//! machine gives that NIC (checked when the device is built), or a memfd
//! sealed at the size of its machine's RAM.

use super::protocol::{self, HandedMemory, ProtocolError, Stream, Tag, Taps};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// No machine has more NICs (the daemon allows 8).
pub const MAX_TAPS: usize = 16;
/// A TAPS or MEMORY payload is a short list of names, or a size.
const MAX_PAYLOAD: usize = 4096;

fn malformed(tag: Tag, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(tag, why.into())
}

/// Sends one frame with `descriptors` attached, in one message.
fn send_with_descriptors(
    socket: &UnixStream,
    tag: Tag,
    payload: &[u8],
    descriptors: &[RawFd],
) -> Result<(), ProtocolError> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    protocol::write_frame(&mut frame, tag, &[payload])?;
    let sent = socket
        .send_with_fds(&[&frame[..]], descriptors)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first byte; the rest is plain stream.
    if sent < frame.len() {
        std::io::Write::write_all(&mut &*socket, &frame[sent..])?;
    }
    Ok(())
}

/// Receives the frame `tag` that must come next, with at most
/// `max_descriptors` attached: its payload and the descriptors, open.
fn receive_with_descriptors(
    socket: &UnixStream,
    stream: &mut dyn Stream,
    tag: Tag,
    max_descriptors: usize,
) -> Result<(Vec<u8>, Vec<File>), ProtocolError> {
    let mut header = [0u8; 5];
    // Whatever happens next, the descriptors close when these drop.
    let (length, received) = crate::descriptors::receive(socket, &mut header, max_descriptors)?;
    if length == 0 {
        return Err(ProtocolError::Closed);
    }
    stream.read_exact(&mut header[length..])?;
    if header[0] != tag as u8 {
        return Err(malformed(
            tag,
            format!(
                "expected {}, got frame tag {}",
                format!("{tag:?}").to_uppercase(),
                header[0]
            ),
        ));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(tag, len as u32));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok((payload, received.into_iter().map(File::from).collect()))
}

/// Sends a TAPS frame naming `names` with `taps` attached.
pub fn send_taps(
    socket: &UnixStream,
    names: &[String],
    taps: &[File],
) -> Result<(), ProtocolError> {
    if names.len() != taps.len() || taps.len() > MAX_TAPS {
        return Err(malformed(
            Tag::Taps,
            format!("{} names for {} TAP descriptors", names.len(), taps.len()),
        ));
    }
    let payload = serde_json::to_vec(&Taps {
        taps: names.to_vec(),
    })
    .map_err(|e| malformed(Tag::Taps, e.to_string()))?;
    let fds: Vec<RawFd> = taps.iter().map(AsRawFd::as_raw_fd).collect();
    send_with_descriptors(socket, Tag::Taps, &payload, &fds)
}

/// Receives the TAPS frame that must come next, with exactly `expected`
/// descriptors, as open files in the order of the names it gives.
pub fn receive_taps(
    socket: &UnixStream,
    stream: &mut dyn Stream,
    expected: usize,
) -> Result<(Vec<String>, Vec<File>), ProtocolError> {
    let (payload, received) = receive_with_descriptors(socket, stream, Tag::Taps, MAX_TAPS)?;
    let taps: Taps = protocol::decode(Tag::Taps, &payload)?;
    if taps.taps.len() != expected || received.len() != expected {
        return Err(malformed(
            Tag::Taps,
            format!(
                "{} names and {} descriptors for a machine of {expected} NICs",
                taps.taps.len(),
                received.len()
            ),
        ));
    }
    Ok((taps.taps, received))
}

/// Sends a MEMORY frame: the memfd of guest RAM, `bytes` long.
pub fn send_memory(socket: &UnixStream, memory: &File, bytes: u64) -> Result<(), ProtocolError> {
    let payload = serde_json::to_vec(&HandedMemory { bytes })
        .map_err(|e| malformed(Tag::Memory, e.to_string()))?;
    send_with_descriptors(socket, Tag::Memory, &payload, &[memory.as_raw_fd()])
}

/// Receives the MEMORY frame that must come next: one descriptor, said to
/// hold `expected` bytes. (What the descriptor is gets checked when it is
/// mapped: [`crate::memory::take_over`].)
pub fn receive_memory(
    socket: &UnixStream,
    stream: &mut dyn Stream,
    expected: u64,
) -> Result<File, ProtocolError> {
    let (payload, mut received) = receive_with_descriptors(socket, stream, Tag::Memory, 1)?;
    let memory: HandedMemory = protocol::decode(Tag::Memory, &payload)?;
    if memory.bytes != expected {
        return Err(malformed(
            Tag::Memory,
            format!(
                "{} bytes of memory for a machine of {expected}",
                memory.bytes
            ),
        ));
    }
    match received.pop() {
        Some(file) => Ok(file),
        None => Err(malformed(Tag::Memory, "no memory descriptor attached")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn files(n: usize) -> Vec<File> {
        (0..n).map(|_| File::open("/dev/null").unwrap()).collect()
    }

    #[test]
    fn descriptors_arrive_with_their_names_and_the_stream_goes_on() {
        let (source, destination) = UnixStream::pair().unwrap();
        let names = vec!["tap0".to_string(), "tap1".to_string()];
        send_taps(&source, &names, &files(2)).unwrap();
        (&source).write_all(b"next").unwrap();
        let mut stream = destination.try_clone().unwrap();
        let (got, taps) = receive_taps(&destination, &mut stream, 2).unwrap();
        assert_eq!(got, names);
        assert_eq!(taps.len(), 2);
        let target = std::fs::read_link(format!("/proc/self/fd/{}", taps[0].as_raw_fd())).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"));
        let mut next = [0u8; 4];
        stream.read_exact(&mut next).unwrap();
        assert_eq!(&next, b"next");
    }

    #[test]
    fn a_source_sends_one_name_per_descriptor_and_no_more_than_a_machine_has() {
        let (source, _destination) = UnixStream::pair().unwrap();
        let names = |n: usize| (0..n).map(|i| format!("tap{i}")).collect::<Vec<_>>();
        assert!(send_taps(&source, &names(2), &files(1)).is_err());
        assert!(send_taps(&source, &names(1), &files(2)).is_err());
        assert!(send_taps(&source, &names(MAX_TAPS + 1), &files(MAX_TAPS + 1)).is_err());
        assert!(send_taps(&source, &names(MAX_TAPS), &files(MAX_TAPS)).is_ok());
    }

    #[test]
    fn a_payload_of_the_largest_size_is_read() {
        let (source, destination) = UnixStream::pair().unwrap();
        let mut payload = br#"{"taps":[]}"#.to_vec();
        payload.resize(MAX_PAYLOAD, b' ');
        protocol::write_frame(&mut &source, Tag::Taps, &[&payload]).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let (names, taps) = receive_taps(&destination, &mut stream, 0).unwrap();
        assert!(names.is_empty() && taps.is_empty());
    }

    #[test]
    fn a_count_other_than_the_machines_is_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        send_taps(&source, &["tap0".to_string()], &files(1)).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_taps(&destination, &mut stream, 2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("for a machine of 2 NICs"), "{error}");
    }

    #[test]
    fn names_without_descriptors_are_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        let payload = serde_json::to_vec(&Taps {
            taps: vec!["tap0".into()],
        })
        .unwrap();
        protocol::write_frame(&mut &source, Tag::Taps, &[&payload]).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_taps(&destination, &mut stream, 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("1 names and 0 descriptors"), "{error}");
    }

    #[test]
    fn another_frame_instead_is_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        protocol::write_frame(&mut &source, Tag::Pages, &[&[0u8; 8]]).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_taps(&destination, &mut stream, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected TAPS"), "{error}");
    }

    #[test]
    fn an_oversized_payload_is_refused_before_it_is_read() {
        let (source, destination) = UnixStream::pair().unwrap();
        let mut header = vec![Tag::Taps as u8];
        header.extend_from_slice(&(1u32 << 20).to_le_bytes());
        (&source).write_all(&header).unwrap();
        let mut stream = destination.try_clone().unwrap();
        assert!(matches!(
            receive_taps(&destination, &mut stream, 1),
            Err(ProtocolError::TooLarge(Tag::Taps, _))
        ));
    }
    fn sealed_memfd(bytes: u64) -> File {
        let memory =
            crate::memory::allocate(&[(vm_memory::GuestAddress(0), bytes as usize)], true).unwrap();
        crate::memory::shared_file(&memory)
            .unwrap()
            .try_clone()
            .unwrap()
    }

    #[test]
    fn the_memory_descriptor_arrives_and_the_stream_goes_on() {
        let (source, destination) = UnixStream::pair().unwrap();
        let file = sealed_memfd(1 << 20);
        send_memory(&source, &file, 1 << 20).unwrap();
        (&source).write_all(b"next").unwrap();
        let mut stream = destination.try_clone().unwrap();
        let got = receive_memory(&destination, &mut stream, 1 << 20).unwrap();
        let target = std::fs::read_link(format!("/proc/self/fd/{}", got.as_raw_fd())).unwrap();
        assert!(
            target
                .to_string_lossy()
                .starts_with("/memfd:bulkhead-guest-ram"),
            "{target:?}"
        );
        let mut next = [0u8; 4];
        stream.read_exact(&mut next).unwrap();
        assert_eq!(&next, b"next");
    }

    #[test]
    fn memory_of_another_size_than_the_machines_is_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        send_memory(&source, &sealed_memfd(1 << 20), 1 << 20).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_memory(&destination, &mut stream, 2 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("1048576 bytes of memory for a machine of 2097152"),
            "{error}"
        );
    }

    #[test]
    fn a_memory_frame_without_its_descriptor_is_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        let payload = serde_json::to_vec(&HandedMemory { bytes: 4096 }).unwrap();
        protocol::write_frame(&mut &source, Tag::Memory, &[&payload]).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_memory(&destination, &mut stream, 4096)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no memory descriptor attached"), "{error}");
    }

    #[test]
    fn a_memory_frame_with_more_than_one_descriptor_is_refused() {
        let (source, destination) = UnixStream::pair().unwrap();
        let payload = serde_json::to_vec(&HandedMemory { bytes: 4096 }).unwrap();
        let two = files(2);
        let fds: Vec<RawFd> = two.iter().map(AsRawFd::as_raw_fd).collect();
        send_with_descriptors(&source, Tag::Memory, &payload, &fds).unwrap();
        let mut stream = destination.try_clone().unwrap();
        let error = receive_memory(&destination, &mut stream, 4096)
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than 1 descriptors sent"), "{error}");
    }
}
