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
        let mut payload = Vec::new();
        let tag = read_frame(stream.as_mut(), &mut payload)?;
        if tag != Tag::Hello {
            refuse(stream.as_mut(), Tag::Refuse, "expected HELLO");
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
            refuse(stream.as_mut(), Tag::Refuse, &why);
            return Err(MigrationError::Incoming(format!(
                "refused the source: {why}"
            )));
        }
        let hello: Hello = match header.and_then(|header| protocol::decode_hello(&payload, &header))
        {
            Ok(hello) => hello,
            Err(e) => {
                refuse(stream.as_mut(), Tag::Refuse, &e.to_string());
                return Err(e.into());
            }
        };
        let fits = match &target {
            Target::Local(local) => {
                let machine = &local.machine;
                crate::backing::check_same_shape("the migration stream", &hello.machine, machine)
                    .map_err(|e| e.to_string())
            }
            Target::AsDescribed => Ok(()),
        };
        if let Err(why) =
            fits.and_then(|()| crate::vm::check_machine(&hello.machine).map_err(|e| e.to_string()))
        {
            refuse(stream.as_mut(), Tag::Refuse, &why);
            return Err(MigrationError::Incoming(format!(
                "refused the source: {why}"
            )));
        }
        // On the same host (a plain Unix socket), a VM built as described
        // takes over the source's TAPs: a TAP the user made single-queue
        // cannot be opened a second time while the source holds it. (A VMM
        // the daemon started has its devices open already.) Guest RAM in a
        // memfd is taken over, whoever built the machine.
        let socket = connection.unix.as_ref();
        let take_taps = socket.is_some()
            && matches!(target, Target::AsDescribed)
            && hello.version >= 5
            && !hello.machine.nics.is_empty();
        // The machine built here decides how its RAM is kept.
        let shared_memory = match &target {
            Target::AsDescribed => hello.machine.shared_memory,
            Target::Local(local) => local.machine.shared_memory,
        };
        let ranges = boot::ram_regions(hello.machine.memory_bytes());
        let ram = match socket {
            Some(socket) if hello.memory_to_hand_over && shared_memory => Ram::HandedOver(socket),
            _ => match crate::memory::allocate(&ranges, shared_memory) {
                Ok(memory) => Ram::Fresh(memory),
                Err(e) => {
                    let why = e.to_string();
                    refuse(stream.as_mut(), Tag::Refuse, &why);
                    return Err(MigrationError::Incoming(format!(
                        "refused the source: {why}"
                    )));
                }
            },
        };
        let take_memory = matches!(ram, Ram::HandedOver(_));
        write_json(
            stream.as_mut(),
            Tag::Accept,
            &protocol::Accept {
                taps: take_taps,
                memory: take_memory,
            },
        )?;
        stream.flush().map_err(protocol::ProtocolError::from)?;
        let mut handed_taps = None;
        if let (true, Some(socket)) = (take_taps, socket) {
            match super::hand_over::receive_taps(socket, stream.as_mut(), hello.machine.nics.len())
            {
                Ok((_, taps)) => handed_taps = Some(taps),
                Err(e) => {
                    refuse(stream.as_mut(), Tag::Failed, &e.to_string());
                    return Err(e.into());
                }
            }
        }
        let memory = match ram {
            Ram::Fresh(memory) => memory,
            Ram::HandedOver(socket) => {
                let taken = super::hand_over::receive_memory(
                    socket,
                    stream.as_mut(),
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
                        refuse(stream.as_mut(), Tag::Failed, &e.to_string());
                        return Err(e);
                    }
                }
            }
        };

        let last: Final = loop {
            match read_frame(stream.as_mut(), &mut payload)? {
                Tag::Pages if take_memory => {
                    // The pages are the source's own: a copy would write
                    // into the memory the guest still runs on there.
                    let why = "PAGES frame after the memory was handed over";
                    refuse(stream.as_mut(), Tag::Failed, why);
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
                        refuse(stream.as_mut(), Tag::Failed, why);
                        return Err(MigrationError::Incoming(why.into()));
                    }
                }
                Tag::State => match protocol::decode_final(&payload, hello.version) {
                    Ok(last) => break last,
                    Err(e) => {
                        refuse(stream.as_mut(), Tag::Failed, &e.to_string());
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
                    refuse(stream.as_mut(), Tag::Failed, "unexpected frame");
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
            refuse(stream.as_mut(), Tag::Failed, why);
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
                    refuse(stream.as_mut(), Tag::Failed, &error.to_string());
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
