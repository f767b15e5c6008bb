//! Same-host migration hands the source's TAP devices to the destination:
//! a TAPS frame over the Unix socket, its descriptors attached
//! (`SCM_RIGHTS`). A TAP the user made single-queue cannot be attached a
//! second time while the source holds it; handed over, the destination
//! holds the same device, and it outlives the source.
//!
//! The receiving side trusts nothing in the frame: the count must match
//! its machine, and each descriptor must be a TAP with the name its
//! machine gives that NIC (checked when the device is built).

use super::protocol::{self, ProtocolError, Stream, Tag, Taps};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// No machine has more NICs (the daemon allows 8).
pub const MAX_TAPS: usize = 16;
/// A TAPS payload is a short list of names.
const MAX_PAYLOAD: usize = 4096;

fn malformed(why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(Tag::Taps, why.into())
}

/// Sends a TAPS frame naming `names` with `taps` attached, in one message.
pub fn send_taps(
    socket: &UnixStream,
    names: &[String],
    taps: &[File],
) -> Result<(), ProtocolError> {
    if names.len() != taps.len() || taps.len() > MAX_TAPS {
        return Err(malformed(format!(
            "{} names for {} TAP descriptors",
            names.len(),
            taps.len()
        )));
    }
    let payload = serde_json::to_vec(&Taps {
        taps: names.to_vec(),
    })
    .map_err(|e| malformed(e.to_string()))?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    protocol::write_frame(&mut frame, Tag::Taps, &[&payload])?;
    let fds: Vec<RawFd> = taps.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = socket
        .send_with_fds(&[&frame[..]], &fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first byte; the rest is plain stream.
    if sent < frame.len() {
        std::io::Write::write_all(&mut &*socket, &frame[sent..])?;
    }
    Ok(())
}

/// Receives the TAPS frame that must come next, with exactly `expected`
/// descriptors, as open files in the order of the names it gives.
pub fn receive_taps(
    socket: &UnixStream,
    stream: &mut dyn Stream,
    expected: usize,
) -> Result<(Vec<String>, Vec<File>), ProtocolError> {
    let mut header = [0u8; 5];
    // Whatever happens next, the descriptors close when these drop.
    let (length, received) = crate::descriptors::receive(socket, &mut header, MAX_TAPS)?;
    if length == 0 {
        return Err(ProtocolError::Closed);
    }
    stream.read_exact(&mut header[length..])?;
    if header[0] != Tag::Taps as u8 {
        return Err(ProtocolError::Malformed(
            Tag::Taps,
            format!("expected TAPS, got frame tag {}", header[0]),
        ));
    }
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(Tag::Taps, len as u32));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    let taps: Taps = protocol::decode(Tag::Taps, &payload)?;
    if taps.taps.len() != expected || received.len() != expected {
        return Err(malformed(format!(
            "{} names and {} descriptors for a machine of {expected} NICs",
            taps.taps.len(),
            received.len()
        )));
    }
    Ok((taps.taps, received.into_iter().map(File::from).collect()))
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
}
