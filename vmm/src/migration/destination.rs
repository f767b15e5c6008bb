//! The receiving side: `bulkhead run --incoming URI`.

use super::protocol::{
    self, read_frame, write_frame, write_json, Final, Hello, Resumed, Stream, Tag,
};
use super::transport::{Listener, TlsServer};
use super::MigrationError;
use crate::arch::x86_64::boot;
use crate::backing::DeviceBackings;
use crate::config::VmSpec;
use crate::devices::legacy::post::monotonic_ns;
use crate::devices::legacy::serial::SerialOutput;
use crate::memory::GuestRam;
use crate::vm::{RestoreOptions, RunningVm, Vm};
use kvm_ioctls::Kvm;
use std::os::unix::net::UnixStream;
use vm_memory::{Bytes, GuestAddress};

/// A destination bound to its address, waiting for a source.
pub struct Incoming {
    listener: Listener,
    tls: Option<TlsServer>,
    expected: super::transport::Expected,
}

/// Binds `uri` now, so the caller can say where it waits before it blocks.
pub fn accept(uri: &str, tls: Option<TlsServer>) -> Result<Incoming, MigrationError> {
    Ok(accept_on(Listener::bind(uri)?, tls))
}

/// Waits on a listener someone else bound (the daemon, for the VMMs it starts).
pub fn accept_on(listener: Listener, tls: Option<TlsServer>) -> Incoming {
    Incoming {
        listener,
        tls,
        expected: Default::default(),
    }
}

/// What the arriving VM is built on.
enum Target {
    /// The machine the source describes, its host files opened here with
    /// this process's rights (`bulkhead run --incoming`: a user's own VMs).
    AsDescribed,
    /// This host's record of the machine and its open backings (a VMM the
    /// daemon started): the source sends guest state only, and a machine of
    /// another shape is refused.
    Local(Box<LocalMachine>),
}

struct LocalMachine {
    machine: VmSpec,
    kvm: Kvm,
    devices: DeviceBackings,
}

/// Where an arriving VM's RAM comes from.
enum Ram<'a> {
    /// Made here; the source copies its pages in.
    Fresh(GuestRam),
    /// The source's own memfd, passed on this socket (same host).
    HandedOver(&'a UnixStream),
}

/// A migrated VM, built and ready, whose source still waits for the word.
pub struct Arrived {
    pub vm: Vm,
    stream: Box<dyn Stream>,
    memory_crc: Option<u32>,
}

fn refuse(stream: &mut dyn Stream, tag: Tag, why: &str) {
    // The source is told why when it can be; it may already be gone.
    let _ = write_frame(stream, tag, &[why.as_bytes()]);
    let _ = stream.flush();
}

impl Incoming {
    pub fn uri(&self) -> String {
        self.listener.uri()
    }

    /// Takes a migration from `source` only, and none after `timeout`.
    pub fn expecting(mut self, source: std::net::IpAddr, timeout: std::time::Duration) -> Self {
        self.expected = super::transport::Expected {
            source: Some(source),
            deadline: Some(std::time::Instant::now() + timeout),
        };
        self
    }

    /// Waits for one source and receives its VM: memory, then state. The
    /// devices are those the source describes.
    pub fn receive(
        self,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Arrived, MigrationError> {
        self.receive_into(Target::AsDescribed, options, serial_output)
    }

    /// Waits for one source and receives its guest onto `machine` (this
    /// host's record) and its open `devices`.
    pub fn receive_onto(
        self,
        machine: VmSpec,
        kvm: Kvm,
        devices: DeviceBackings,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Arrived, MigrationError> {
        let target = Target::Local(Box::new(LocalMachine {
            machine,
            kvm,
            devices,
        }));
        self.receive_into(target, options, serial_output)
    }

    fn receive_into(
        self,
        target: Target,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Arrived, MigrationError> {
        let connection = self
            .listener
            .accept_connection(self.tls.as_ref(), &self.expected)?;
        let mut stream = connection.stream;
        let local = match &target {
            Target::Local(local) => Some(&local.machine),
            Target::AsDescribed => None,
        };
        let Received {
            memory,
            last,
            memory_crc,
            handed_taps,
        } = receive_guest(stream.as_mut(), connection.unix.as_ref(), local)?;
        let built = match target {
            Target::Local(local) => {
                let LocalMachine {
                    machine,
                    kvm,
                    devices,
                } = *local;
                let machine = crate::backing::rebuilt_machine(&last.saved.machine, &machine);
                Vm::from_saved(
                    &last.saved,
                    &machine,
                    kvm,
                    devices,
                    memory,
                    options,
                    serial_output,
                )
            }
            Target::AsDescribed => Vm::from_saved_as_described(
                &last.saved,
                memory,
                options,
                serial_output,
                handed_taps,
            ),
        };
        match built {
            Ok(vm) => Ok(Arrived {
                vm,
                stream,
                memory_crc,
            }),
            Err(e) => {
                refuse(stream.as_mut(), Tag::Failed, &e.to_string());
                Err(e.into())
            }
        }
    }
}

/// What came over the stream before the VM is built: guest RAM with the
/// source's pages in it, and its state.
pub(super) struct Received {
    pub memory: GuestRam,
    pub last: Final,
    pub memory_crc: Option<u32>,
    /// The source's TAPs, when it handed them over.
    pub handed_taps: Option<Vec<std::fs::File>>,
}

/// Drives the receiving side of the stream up to the state: HELLO (a
/// source of another version, or whose machine does not fit `local`, this
/// host's record of it, is refused), ACCEPT, what is handed over on
/// `socket` (same host), the pages, STATE, and the memory checksum. Any
/// failure is told to the source (REFUSE or FAILED) when it can be.
pub(super) fn receive_guest(
    stream: &mut dyn Stream,
    socket: Option<&UnixStream>,
    local: Option<&VmSpec>,
) -> Result<Received, MigrationError> {
    let mut payload = Vec::new();
    let tag = read_frame(&mut *stream, &mut payload)?;
    if tag != Tag::Hello {
        refuse(&mut *stream, Tag::Refuse, "expected HELLO");
        return Err(protocol::ProtocolError::Unexpected {
            expected: "HELLO",
            got: tag,
        }
        .into());
    }
    let header = protocol::decode::<protocol::HelloHeader>(Tag::Hello, &payload);
    if let Some(why) = header
        .as_ref()
        .ok()
        .and_then(protocol::HelloHeader::refusal)
    {
        refuse(&mut *stream, Tag::Refuse, &why);
        return Err(MigrationError::Incoming(format!(
            "refused the source: {why}"
        )));
    }
    let hello: Hello = match header.and_then(|header| protocol::decode_hello(&payload, &header)) {
        Ok(hello) => hello,
        Err(e) => {
            refuse(&mut *stream, Tag::Refuse, &e.to_string());
            return Err(e.into());
        }
    };
    let fits = match local {
        Some(machine) => {
            crate::backing::check_same_shape("the migration stream", &hello.machine, machine)
                .map_err(|e| e.to_string())
        }
        None => Ok(()),
    };
    if let Err(why) =
        fits.and_then(|()| crate::vm::check_machine(&hello.machine).map_err(|e| e.to_string()))
    {
        refuse(&mut *stream, Tag::Refuse, &why);
        return Err(MigrationError::Incoming(format!(
            "refused the source: {why}"
        )));
    }
    // On the same host (a plain Unix socket), a VM built as described
    // takes over the source's TAPs: a TAP the user made single-queue
    // cannot be opened a second time while the source holds it. (A VMM
    // the daemon started has its devices open already.) Guest RAM in a
    // memfd is taken over, whoever built the machine.
    let take_taps =
        socket.is_some() && local.is_none() && hello.version >= 5 && !hello.machine.nics.is_empty();
    // The machine built here decides how its RAM is kept.
    let shared_memory = match local {
        None => hello.machine.shared_memory,
        Some(machine) => machine.shared_memory,
    };
    let ranges = boot::ram_regions(hello.machine.memory_bytes());
    let ram = match socket {
        Some(socket) if hello.memory_to_hand_over && shared_memory => Ram::HandedOver(socket),
        _ => match crate::memory::allocate(&ranges, shared_memory) {
            Ok(memory) => Ram::Fresh(memory),
            Err(e) => {
                let why = e.to_string();
                refuse(&mut *stream, Tag::Refuse, &why);
                return Err(MigrationError::Incoming(format!(
                    "refused the source: {why}"
                )));
            }
        },
    };
    let take_memory = matches!(ram, Ram::HandedOver(_));
    write_json(
        &mut *stream,
        Tag::Accept,
        &protocol::Accept {
            taps: take_taps,
            memory: take_memory,
        },
    )?;
    stream.flush().map_err(protocol::ProtocolError::from)?;
    let mut handed_taps = None;
    if let (true, Some(socket)) = (take_taps, socket) {
        match super::hand_over::receive_taps(socket, &mut *stream, hello.machine.nics.len()) {
            Ok((_, taps)) => handed_taps = Some(taps),
            Err(e) => {
                refuse(&mut *stream, Tag::Failed, &e.to_string());
                return Err(e.into());
            }
        }
    }
    let memory = match ram {
        Ram::Fresh(memory) => memory,
        Ram::HandedOver(socket) => {
            let taken = super::hand_over::receive_memory(
                socket,
                &mut *stream,
                hello.machine.memory_bytes(),
            )
            .map_err(MigrationError::from)
            .and_then(|file| {
                crate::memory::take_over(file, &ranges)
                    .map_err(|e| MigrationError::Incoming(e.to_string()))
            });
            match taken {
                Ok(memory) => memory,
                Err(e) => {
                    refuse(&mut *stream, Tag::Failed, &e.to_string());
                    return Err(e);
                }
            }
        }
    };

    let last: Final = loop {
        match read_frame(&mut *stream, &mut payload)? {
            Tag::Pages if take_memory => {
                // The pages are the source's own: a copy would write
                // into the memory the guest still runs on there.
                let why = "PAGES frame after the memory was handed over";
                refuse(&mut *stream, Tag::Failed, why);
                return Err(MigrationError::Incoming(why.into()));
            }
            Tag::Pages => {
                let written = match payload.split_first_chunk::<8>() {
                    Some((address, data)) => memory
                        .write_slice(data, GuestAddress(u64::from_le_bytes(*address)))
                        .is_ok(),
                    None => false,
                };
                if !written {
                    let why = "PAGES frame outside guest memory";
                    refuse(&mut *stream, Tag::Failed, why);
                    return Err(MigrationError::Incoming(why.into()));
                }
            }
            Tag::State => match protocol::decode_final(&payload, hello.version) {
                Ok(last) => break last,
                Err(e) => {
                    refuse(&mut *stream, Tag::Failed, &e.to_string());
                    return Err(e.into());
                }
            },
            Tag::Abort => {
                return Err(MigrationError::Incoming(format!(
                    "the source gave up: {}",
                    protocol::text(&payload)
                )))
            }
            other => {
                refuse(&mut *stream, Tag::Failed, "unexpected frame");
                return Err(protocol::ProtocolError::Unexpected {
                    expected: "PAGES or STATE",
                    got: other,
                }
                .into());
            }
        }
    };
    if last.saved.machine != hello.machine {
        let why = "the state describes another machine than HELLO did";
        refuse(&mut *stream, Tag::Failed, why);
        return Err(MigrationError::Incoming(why.into()));
    }
    let memory_crc = match last.memory_crc {
        Some(expected) => {
            let ours = super::memory_crc(&memory)?;
            if ours != expected {
                let error = MigrationError::MemoryMismatch {
                    source_crc: expected,
                    destination: ours,
                };
                refuse(&mut *stream, Tag::Failed, &error.to_string());
                return Err(error);
            }
            Some(ours)
        }
        None => None,
    };
    // Pages the copy wrote are not dirty for this VM.
    for region in vm_memory::GuestMemoryBackend::iter(&memory) {
        vm_memory::mmap::MmapRegion::bitmap(region).reset();
    }
    Ok(Received {
        memory,
        last,
        memory_crc,
        handed_taps,
    })
}

impl Arrived {
    /// Starts the VM and tells the source, which then ends. The guest runs
    /// here only once the source has been told: if it cannot be, the
    /// source resumes the guest itself, and this copy, which never ran,
    /// is stopped (so the guest never runs twice, and memory handed over
    /// is not touched).
    pub fn start(mut self) -> Result<RunningVm, MigrationError> {
        let running = match self.vm.start_paused() {
            Ok(running) => running,
            Err(e) => {
                refuse(self.stream.as_mut(), Tag::Failed, &e.to_string());
                return Err(e.into());
            }
        };
        let started_ns = monotonic_ns();
        let resumed = Resumed {
            started_ns,
            boot_id: protocol::boot_id(),
            memory_crc: self.memory_crc,
        };
        let told = write_json(self.stream.as_mut(), Tag::Resumed, &resumed)
            .and_then(|()| self.stream.flush().map_err(protocol::ProtocolError::from));
        if let Err(e) = told {
            running.stop();
            let _ = running.wait();
            return Err(MigrationError::Incoming(format!(
                "the source went away at switch-over ({e}); stopped here so the guest does not run twice"
            )));
        }
        running
            .control()
            .resume()
            .map_err(|e| MigrationError::Incoming(format!("resuming the arrived guest: {e}")))?;
        Ok(running)
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{ProtocolError, FORMAT, VERSION};
    use super::super::source::Source;
    use super::super::testing::{contents, pattern, FakeVm, PAGE};
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;

    /// A source of its own: sends `frames` (raw bytes), closes its side,
    /// and collects the destination's answers until it closes.
    fn scripted_source(
        frames: Vec<u8>,
    ) -> (UnixStream, std::thread::JoinHandle<Vec<(Tag, String)>>) {
        let (mut source, destination) = UnixStream::pair().unwrap();
        let script = std::thread::spawn(move || {
            // The destination may stop reading (and close) before the end.
            let _ = source.write_all(&frames);
            let _ = source.shutdown(Shutdown::Write);
            let mut answers = Vec::new();
            let mut payload = Vec::new();
            while let Ok(tag) = read_frame(&mut source, &mut payload) {
                answers.push((tag, protocol::text(&payload)));
            }
            let _ = source.read_to_end(&mut Vec::new());
            answers
        });
        (destination, script)
    }

    fn frame(tag: Tag, payload: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        write_frame(&mut wire, tag, &[payload]).unwrap();
        wire
    }

    fn hello_of(machine: &VmSpec, version: u32) -> Vec<u8> {
        frame(
            Tag::Hello,
            &serde_json::to_vec(&serde_json::json!({
                "format": FORMAT, "version": version, "machine": machine,
            }))
            .unwrap(),
        )
    }

    fn pages(address: u64, data: &[u8]) -> Vec<u8> {
        frame(Tag::Pages, &[&address.to_le_bytes()[..], data].concat())
    }

    fn state(vm: &FakeVm, memory_crc: Option<u32>) -> Vec<u8> {
        vm.parked.store(true, std::sync::atomic::Ordering::SeqCst);
        let saved = vm.capture().unwrap();
        let mut wire = Vec::new();
        write_json(&mut wire, Tag::State, &Final { saved, memory_crc }).unwrap();
        wire
    }

    fn vm() -> FakeVm {
        FakeVm::new(4, 0, Box::new(|_, _, _| ()))
    }

    /// Runs the destination over `frames`: its result and what it answered.
    fn receive(
        frames: Vec<Vec<u8>>,
        local: Option<&VmSpec>,
    ) -> (Result<Received, MigrationError>, Vec<(Tag, String)>) {
        let (mut stream, source) = scripted_source(frames.concat());
        let result = receive_guest(&mut stream, None, local);
        drop(stream);
        (result, source.join().unwrap())
    }

    fn tags(answers: &[(Tag, String)]) -> Vec<Tag> {
        answers.iter().map(|(tag, _)| *tag).collect()
    }

    #[test]
    fn pages_land_where_the_source_said_and_are_not_dirty_for_the_new_vm() {
        let source = vm();
        let data = [pattern(3, 1), pattern(4, 1)].concat();
        let crc = {
            use vm_memory::Bytes;
            source
                .memory
                .write_slice(&data, GuestAddress(3 * PAGE))
                .unwrap();
            super::super::memory_crc(&source.memory).unwrap()
        };
        let (received, answers) = receive(
            vec![
                hello_of(&source.machine, VERSION),
                pages(3 * PAGE, &data),
                state(&source, Some(crc)),
            ],
            None,
        );
        let received = received.unwrap();
        assert_eq!(tags(&answers), [Tag::Accept]);
        assert_eq!(answers[0].1, "{\"taps\":false}");
        assert_eq!(contents(&received.memory), contents(&source.memory));
        assert_eq!(received.memory_crc, Some(crc));
        assert_eq!(received.last.saved.machine, source.machine);
        assert!(received.handed_taps.is_none());
        for region in vm_memory::GuestMemoryBackend::iter(&received.memory) {
            let dirty = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
            assert!(dirty.iter().all(|&word| word == 0));
        }
    }

    #[test]
    fn a_source_of_another_version_is_refused_naming_both_versions() {
        for version in [VERSION + 1, 1] {
            let (result, answers) = receive(vec![hello_of(&vm().machine, version)], None);
            let error = result.err().unwrap().to_string();
            let why = format!("{FORMAT} version {version} offered, this Bulkhead takes {FORMAT} versions 2 to {VERSION}");
            assert_eq!(
                error,
                format!("incoming migration: refused the source: {why}")
            );
            assert_eq!(answers, [(Tag::Refuse, why)]);
        }
    }

    #[test]
    fn a_stream_that_does_not_start_with_hello_is_refused() {
        let (result, answers) = receive(vec![frame(Tag::State, b"{}")], None);
        assert!(matches!(
            result,
            Err(MigrationError::Protocol(ProtocolError::Unexpected {
                expected: "HELLO",
                got: Tag::State
            }))
        ));
        assert_eq!(answers, [(Tag::Refuse, "expected HELLO".to_string())]);

        // Garbage: nothing it could be answered in.
        let (result, answers) = receive(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()], None);
        assert!(matches!(
            result,
            Err(MigrationError::Protocol(ProtocolError::UnknownTag(b'G')))
        ));
        assert!(answers.is_empty());
    }

    #[test]
    fn a_hello_that_is_not_json_or_has_no_machine_is_refused() {
        for hello in [
            frame(Tag::Hello, b"\x00\x01garbage"),
            frame(
                Tag::Hello,
                br#"{"format":"bulkhead-migration","version":8}"#,
            ),
        ] {
            let (result, answers) = receive(vec![hello], None);
            assert!(
                matches!(
                    result,
                    Err(MigrationError::Protocol(ProtocolError::Malformed(
                        Tag::Hello,
                        _
                    )))
                ),
                "{:?}",
                result.err()
            );
            assert_eq!(tags(&answers), [Tag::Refuse]);
        }
    }

    /// A VMM the daemon started takes only a machine of its record's shape.
    #[test]
    fn a_machine_of_another_shape_than_the_local_record_is_refused() {
        let source = vm();
        let mut ours = source.machine.clone();
        ours.memory_mib = 8;
        let (result, answers) = receive(vec![hello_of(&source.machine, VERSION)], Some(&ours));
        let error = result.err().unwrap().to_string();
        assert!(error.contains("4 MiB of memory there, 8 here"), "{error}");
        assert_eq!(tags(&answers), [Tag::Refuse]);
        assert!(answers[0].1.contains("4 MiB of memory there, 8 here"));

        // The same shape is taken.
        let (result, answers) = receive(
            vec![hello_of(&source.machine, VERSION), state(&source, None)],
            Some(&source.machine),
        );
        assert!(result.is_ok());
        assert_eq!(tags(&answers), [Tag::Accept]);
    }

    #[test]
    fn pages_outside_guest_memory_fail_the_migration() {
        let source = vm();
        for bad in [
            pages(4 << 20, &[1; 4096]),
            pages((4 << 20) - 8, &[1; 16]),
            frame(Tag::Pages, &[0; 7]),
        ] {
            let (result, answers) = receive(vec![hello_of(&source.machine, VERSION), bad], None);
            let error = result.err().unwrap().to_string();
            assert_eq!(
                error,
                "incoming migration: PAGES frame outside guest memory"
            );
            assert_eq!(
                answers,
                [
                    (Tag::Accept, "{\"taps\":false}".to_string()),
                    (Tag::Failed, "PAGES frame outside guest memory".to_string())
                ]
            );
        }
    }

    #[test]
    fn a_source_that_closes_mid_copy_leaves_nothing_to_resume() {
        let source = vm();
        let cut = pages(0, &[1; 8192]);
        let (result, answers) = receive(
            vec![
                hello_of(&source.machine, VERSION),
                pages(0, &[1; 4096]),
                cut[..100].to_vec(),
            ],
            None,
        );
        assert!(matches!(
            result,
            Err(MigrationError::Protocol(ProtocolError::Closed))
        ));
        assert_eq!(tags(&answers), [Tag::Accept]);
    }

    #[test]
    fn a_source_that_aborts_is_not_resumed() {
        let source = vm();
        let (result, answers) = receive(
            vec![
                hello_of(&source.machine, VERSION),
                frame(Tag::Abort, b"cancelled\nby user"),
            ],
            None,
        );
        assert_eq!(
            result.err().unwrap().to_string(),
            "incoming migration: the source gave up: cancelled by user"
        );
        assert_eq!(tags(&answers), [Tag::Accept]);
    }

    #[test]
    fn a_frame_out_of_place_during_the_copy_fails_the_migration() {
        let source = vm();
        let (result, answers) = receive(
            vec![hello_of(&source.machine, VERSION), frame(Tag::Hello, b"{}")],
            None,
        );
        assert!(matches!(
            result,
            Err(MigrationError::Protocol(ProtocolError::Unexpected {
                expected: "PAGES or STATE",
                got: Tag::Hello
            }))
        ));
        assert_eq!(tags(&answers), [Tag::Accept, Tag::Failed]);
    }

    #[test]
    fn a_state_that_is_malformed_or_of_another_machine_fails_the_migration() {
        let source = vm();
        let mut other = vm();
        other.machine.cpus += 1;
        let other_state = {
            let mut state: serde_json::Value =
                serde_json::from_slice(&state(&source, None)[5..]).unwrap();
            state["saved"]["machine"] = serde_json::to_value(&other.machine).unwrap();
            frame(Tag::State, &serde_json::to_vec(&state).unwrap())
        };
        let (result, answers) =
            receive(vec![hello_of(&source.machine, VERSION), other_state], None);
        let why = "the state describes another machine than HELLO did";
        assert_eq!(
            result.err().unwrap().to_string(),
            format!("incoming migration: {why}")
        );
        assert_eq!(answers[1], (Tag::Failed, why.to_string()));

        let (result, answers) = receive(
            vec![
                hello_of(&source.machine, VERSION),
                frame(Tag::State, b"{\"saved\": 1}"),
            ],
            None,
        );
        assert!(matches!(
            result,
            Err(MigrationError::Protocol(ProtocolError::Malformed(
                Tag::State,
                _
            )))
        ));
        assert_eq!(tags(&answers), [Tag::Accept, Tag::Failed]);
    }

    /// With `verify_memory`, a copy that differs from the source's RAM is
    /// never resumed.
    #[test]
    fn a_copy_whose_checksum_differs_from_the_sources_is_refused() {
        let source = vm();
        let crc = super::super::memory_crc(&source.memory).unwrap();
        let (result, answers) = receive(
            vec![
                hello_of(&source.machine, VERSION),
                pages(PAGE, &[7; 4096]),
                state(&source, Some(crc)),
            ],
            None,
        );
        let Err(MigrationError::MemoryMismatch {
            source_crc,
            destination,
        }) = result
        else {
            panic!("not refused: {:?}", result.err());
        };
        assert_eq!(source_crc, crc);
        assert_ne!(destination, crc);
        assert_eq!(tags(&answers), [Tag::Accept, Tag::Failed]);
        assert!(answers[1]
            .1
            .starts_with("guest memory differs after the copy"));
    }
}
