//! The migration stream: frames of `[tag: u8][length: u32 LE][payload]`.
//!
//! ```text
//! source                                destination
//! HELLO {format, version, machine}  ->
//!                                   <-  ACCEPT {taps}  |  REFUSE "why"
//! TAPS {taps} + descriptors         ->  (only when ACCEPT asked: same host)
//! PAGES [gpa: u64 LE][bytes] ...    ->  (pre-copy rounds, then the last pages)
//! STATE {saved VM, memory CRC}      ->
//!                                   <-  RESUMED {clock}  |  FAILED "why"
//! ```
//! Either side may send ABORT "why" instead of its next frame.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};

pub const FORMAT: &str = "bulkhead-migration";
/// The version this Bulkhead speaks. A destination takes any source from
/// [`MIN_ACCEPTED_VERSION`] to [`VERSION`] (the state follows the snapshot's
/// rules: added fields have defaults); it is bumped when a frame changes meaning.
/// 2: the full ACPI platform (PM1 block in the state), virtio IRQs without 9.
/// 3: the state of snapshot format 3 (devices keyed by id); a version 2
/// source's state is read by the snapshot's rule for version 2.
/// 4: the state of snapshot format 4 (vCPUs keyed by id).
/// 5: a destination on the same host may ask for the source's TAP
/// descriptors (ACCEPT `taps`); they come in a TAPS frame (state as in 4).
/// 6: ... and its guest RAM, when it is a memfd (HELLO `memory_to_hand_over`,
/// ACCEPT `memory`, a MEMORY frame); no PAGES frame follows (state as in 4).
/// 7: the state of snapshot format 5 (the board's devices keyed by id).
/// 8: the state of snapshot format 6, and HELLO's machine in its shape (the
/// VM spec); an older source's machine is read by that format's rule.
///
/// [`state_version`] says which snapshot state version each carries.
pub const VERSION: u32 = 8;
/// The oldest source a destination accepts.
pub const MIN_ACCEPTED_VERSION: u32 = 2;
/// No frame is larger (a PAGES frame carries at most 1 MiB of memory).
pub const MAX_FRAME: u32 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Resumed = 6,
    Failed = 7,
    Abort = 8,
    Taps = 9,
    Memory = 10,
}

impl Tag {
    fn from_byte(byte: u8) -> Option<Tag> {
        Some(match byte {
            1 => Tag::Hello,
            2 => Tag::Accept,
            3 => Tag::Refuse,
            4 => Tag::Pages,
            5 => Tag::State,
            6 => Tag::Resumed,
            7 => Tag::Failed,
            8 => Tag::Abort,
            9 => Tag::Taps,
            10 => Tag::Memory,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("a {0:?} frame of {1} bytes is larger than any valid one")]
    TooLarge(Tag, u32),
    #[error("expected {expected}, got a {got:?} frame")]
    Unexpected { expected: &'static str, got: Tag },
    #[error("bad {0:?} frame: {1}")]
    Malformed(Tag, String),
    #[error("the peer refused: {0}")]
    Refused(String),
}

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub fn write_frame(out: &mut dyn Write, tag: Tag, parts: &[&[u8]]) -> Result<(), ProtocolError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(ProtocolError::TooLarge(tag, u32::MAX))?;
    let mut header = [0u8; 5];
    header[0] = tag as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    out.write_all(&header)?;
    for part in parts {
        out.write_all(part)?;
    }
    Ok(())
}

pub fn write_json(
    out: &mut dyn Write,
    tag: Tag,
    value: &impl Serialize,
) -> Result<(), ProtocolError> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| ProtocolError::Malformed(tag, e.to_string()))?;
    write_frame(out, tag, &[&bytes])
}

/// Reads one frame into `payload` (reused between frames).
pub fn read_frame(input: &mut dyn Read, payload: &mut Vec<u8>) -> Result<Tag, ProtocolError> {
    let mut header = [0u8; 5];
    if let Err(e) = input.read_exact(&mut header) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        });
    }
    let tag = Tag::from_byte(header[0]).ok_or(ProtocolError::UnknownTag(header[0]))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(tag, len));
    }
    payload.resize(len as usize, 0);
    input.read_exact(payload).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(tag)
}

pub fn decode<T: DeserializeOwned>(tag: Tag, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed(tag, e.to_string()))
}

/// Decodes a STATE frame from a source speaking `version`: its saved VM by
/// the snapshot format's rules for that version.
pub fn decode_final(payload: &[u8], version: u32) -> Result<Final, ProtocolError> {
    let malformed = |e: String| ProtocolError::Malformed(Tag::State, e);
    #[derive(serde::Deserialize)]
    struct Raw {
        saved: serde_json::Value,
        memory_crc: Option<u32>,
    }
    let raw: Raw = serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    let saved = crate::snapshot::SavedVm::from_value(raw.saved, state_version(version))
        .map_err(malformed)?;
    Ok(Final {
        saved,
        memory_crc: raw.memory_crc,
    })
}

/// The snapshot state version a STATE frame of protocol `version` holds:
/// up to 4 the same number, 5 and 6 changed only frames around it.
pub fn state_version(version: u32) -> u32 {
    match version {
        0..=4 => version,
        5 | 6 => 4,
        7 => 5,
        _ => 6,
    }
}

/// What every version's HELLO starts with: read first, so a source of
/// another version is refused for its version, whatever its machine says.
#[derive(Debug, serde::Deserialize)]
pub struct HelloHeader {
    pub format: String,
    pub version: u32,
}

impl HelloHeader {
    /// Why this destination does not take the source (None: it does).
    pub fn refusal(&self) -> Option<String> {
        let accepted = MIN_ACCEPTED_VERSION..=VERSION;
        (self.format != FORMAT || !accepted.contains(&self.version)).then(|| {
            format!(
                "{} version {} offered, this Bulkhead takes {FORMAT} versions \
                 {MIN_ACCEPTED_VERSION} to {VERSION}",
                self.format, self.version
            )
        })
    }
}

/// Decodes the HELLO of a source whose version was accepted: one of an
/// older protocol describes its machine in the older snapshot format's
/// shape, brought to this one by that format's rule.
pub fn decode_hello(payload: &[u8], header: &HelloHeader) -> Result<Hello, ProtocolError> {
    let malformed = |e: String| ProtocolError::Malformed(Tag::Hello, e);
    let mut value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    if state_version(header.version) < 6 {
        let machine = value
            .get_mut("machine")
            .ok_or_else(|| malformed("no machine".into()))?;
        crate::snapshot::machine_as_spec(machine)
            .map_err(|e| malformed(format!("machine: {e}")))?;
    }
    serde_json::from_value(value).map_err(|e| malformed(e.to_string()))
}

/// A text payload (REFUSE, FAILED, ABORT), shown to users: kept printable.
pub fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(4096)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A destination's ACCEPT: it takes the machine, and on the same host (a
/// Unix socket) may ask for the source's TAPs instead of opening them.
#[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Accept {
    #[serde(default)]
    pub taps: bool,
    /// The destination takes the source's guest RAM over (a MEMORY frame
    /// follows the TAPS one, if any) instead of a copy of its pages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory: bool,
}

/// A MEMORY frame's payload: the size of the guest RAM whose memfd is
/// attached to it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HandedMemory {
    pub bytes: u64,
}

/// A TAPS frame's payload: the TAP names, in machine order, of the
/// descriptors attached to it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Taps {
    pub taps: Vec<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub format: String,
    pub version: u32,
    pub machine: crate::config::VmSpec,
    /// The source's RAM is a memfd it can hand over on this host. (A
    /// `shared_memory` machine restored from a snapshot runs on a private
    /// mapping of the snapshot's file, which is copied instead.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_to_hand_over: bool,
}

/// Sent after the last pages.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Final {
    pub saved: crate::snapshot::SavedVm,
    /// CRC-32 of all guest RAM at switch-over, when the source was asked to
    /// verify: the destination refuses to resume unless its copy matches.
    pub memory_crc: Option<u32>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Resumed {
    /// CLOCK_MONOTONIC when the destination's vCPUs were started, and the
    /// host's boot id: on one host the source can measure the true downtime.
    pub started_ns: u64,
    pub boot_id: String,
    pub memory_crc: Option<u32>,
}

/// The host's boot id, read once (a sandboxed VMM cannot read /proc later).
pub fn boot_id() -> String {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source of protocol 5 or 6 (the same host's previous release) sends
    /// a version 4 state: read by the version 4 rules, its board devices
    /// arrive keyed by id. The current fixture's state is taken as protocol 7.
    #[test]
    fn states_from_protocol_5_6_and_7_sources_are_read_by_their_rules() {
        for version in [5, 6] {
            let payload =
                serde_json::to_vec(&serde_json::json!({"saved": fixture_state(4)})).unwrap();
            let last = decode_final(&payload, version).unwrap();
            assert!(last.saved.devices.contains_key("pm1"), "protocol {version}");
            assert!(last.saved.devices.contains_key("balloon"));
            // The same state is no version 5 one: its board would be lost.
            let as_7 = decode_final(&payload, 7).unwrap();
            assert!(!as_7.saved.devices.contains_key("pm1"));
        }
        let payload = serde_json::to_vec(&serde_json::json!({"saved": fixture_state(5)})).unwrap();
        let last = decode_final(&payload, 7).unwrap();
        assert!(last.saved.devices.contains_key("cmos"));
        assert!(decode_final(&payload, 6).is_err());
    }

    /// This protocol carries the state this Bulkhead writes, and each older
    /// version the state of its time.
    #[test]
    fn each_version_carries_the_state_of_its_time() {
        assert_eq!(state_version(VERSION), crate::snapshot::VERSION);
        assert_eq!(
            (2..=VERSION).map(state_version).collect::<Vec<_>>(),
            [2, 3, 4, 4, 4, 5, 6]
        );
    }

    /// Another version's HELLO is refused for its version, whatever
    /// shape its machine has; so is another format.
    #[test]
    fn a_source_of_another_version_is_refused_for_its_version() {
        let header = |format: &str, version: u32| {
            let payload = serde_json::to_vec(&serde_json::json!({
                "format": format, "version": version, "machine": {"from": "the future"},
            }))
            .unwrap();
            decode::<HelloHeader>(Tag::Hello, &payload).unwrap()
        };
        let why = header(FORMAT, VERSION + 1).refusal().unwrap();
        assert!(
            why.contains(&format!("version {} offered", VERSION + 1)),
            "{why}"
        );
        assert!(header(FORMAT, MIN_ACCEPTED_VERSION - 1).refusal().is_some());
        assert!(header("qemu", VERSION).refusal().is_some());
        assert!(header(FORMAT, VERSION).refusal().is_none());
        assert!(header(FORMAT, MIN_ACCEPTED_VERSION).refusal().is_none());
    }

    /// A version 7 source describes its machine as snapshot format 5 did:
    /// read by that format's rule. From version 8 on, only the VM spec.
    #[test]
    fn an_older_sources_hello_is_read_by_its_formats_rule() {
        let hello = |version: u32| {
            serde_json::to_vec(&serde_json::json!({
                "format": FORMAT, "version": version,
                "machine": fixture_state(5)["machine"].clone(),
            }))
            .unwrap()
        };
        let header = |version: u32| HelloHeader {
            format: FORMAT.into(),
            version,
        };
        let read = decode_hello(&hello(7), &header(7)).unwrap();
        assert_eq!((read.machine.cpus, read.machine.memory_mib), (2, 4));
        assert!(read.machine.rng);
        assert!(matches!(
            decode_hello(&hello(VERSION), &header(VERSION)),
            Err(ProtocolError::Malformed(Tag::Hello, _))
        ));
        let current = serde_json::to_vec(&Hello {
            format: FORMAT.into(),
            version: VERSION,
            machine: read.machine.clone(),
            memory_to_hand_over: false,
        })
        .unwrap();
        assert_eq!(
            decode_hello(&current, &header(VERSION)).unwrap().machine,
            read.machine
        );
    }

    /// The state of the checked-in snapshot fixture of `version`, as JSON.
    fn fixture_state(version: u32) -> serde_json::Value {
        let path = format!(
            "{}/../cli/tests/fixtures/snapshot-v{version}/state.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_version_2_sources_state_is_read_by_the_version_2_rules() {
        let saved = fixture_state(2);
        assert!(saved["devices"].is_array());
        let payload =
            serde_json::to_vec(&serde_json::json!({"saved": saved, "memory_crc": 7})).unwrap();
        let last = decode_final(&payload, 2).unwrap();
        assert_eq!(last.memory_crc, Some(7));
        // No virtio device; the board's, moved into the map by the rules.
        assert_eq!(
            last.saved.devices.keys().collect::<Vec<_>>(),
            ["cmos", "i8042", "pci", "pm1", "serial"]
        );
        // From a version 3 source, a device list is malformed.
        assert!(matches!(
            decode_final(&payload, 3),
            Err(ProtocolError::Malformed(Tag::State, _))
        ));
    }

    #[test]
    fn a_version_3_sources_vcpu_list_is_keyed_and_a_version_4_one_is_malformed() {
        let saved = fixture_state(3);
        assert!(saved["vcpus"].is_array());
        let payload =
            serde_json::to_vec(&serde_json::json!({"saved": saved, "memory_crc": null})).unwrap();
        let last = decode_final(&payload, 3).unwrap();
        assert_eq!(last.saved.vcpus.keys().copied().collect::<Vec<_>>(), [0]);
        assert!(matches!(
            decode_final(&payload, 4),
            Err(ProtocolError::Malformed(Tag::State, _))
        ));
    }

    const TAGS: [Tag; 10] = [
        Tag::Hello,
        Tag::Accept,
        Tag::Refuse,
        Tag::Pages,
        Tag::State,
        Tag::Resumed,
        Tag::Failed,
        Tag::Abort,
        Tag::Taps,
        Tag::Memory,
    ];

    #[test]
    fn every_tag_round_trips_with_its_wire_byte() {
        for (byte, tag) in (1u8..).zip(TAGS) {
            let mut wire = Vec::new();
            write_frame(&mut wire, tag, &[b"ab", b"", b"c"]).unwrap();
            assert_eq!(wire, [byte, 3, 0, 0, 0, b'a', b'b', b'c'], "{tag:?}");
            let mut payload = vec![9; 10];
            assert_eq!(read_frame(&mut &wire[..], &mut payload).unwrap(), tag);
            assert_eq!(payload, b"abc");
        }
        for byte in [0, 11, 0xff] {
            assert!(matches!(
                read_frame(&mut &[byte, 0, 0, 0, 0][..], &mut Vec::new()),
                Err(ProtocolError::UnknownTag(b)) if b == byte
            ));
        }
    }

    #[test]
    fn a_json_frame_holds_the_value() {
        let mut wire = Vec::new();
        write_json(
            &mut wire,
            Tag::Taps,
            &Taps {
                taps: vec!["tap0".into()],
            },
        )
        .unwrap();
        let mut payload = Vec::new();
        assert_eq!(read_frame(&mut &wire[..], &mut payload).unwrap(), Tag::Taps);
        assert_eq!(
            decode::<Taps>(Tag::Taps, &payload).unwrap(),
            Taps {
                taps: vec!["tap0".into()]
            }
        );
        assert!(matches!(
            decode::<Taps>(Tag::Taps, br#"{"taps": [], "more": 1}"#),
            Err(ProtocolError::Malformed(Tag::Taps, _))
        ));
    }

    /// A frame of exactly `MAX_FRAME` bytes is valid, one byte more is not,
    /// on either side.
    #[test]
    fn a_frame_of_max_frame_bytes_passes_and_one_more_is_refused() {
        assert_eq!(MAX_FRAME, 64 * 1024 * 1024);
        let mib = vec![0u8; 1 << 20];
        let parts = vec![&mib[..]; 64];
        write_frame(&mut std::io::sink(), Tag::Pages, &parts).unwrap();
        let mut too_many = parts.clone();
        too_many.push(b"x");
        let mut wire = Vec::new();
        assert!(matches!(
            write_frame(&mut wire, Tag::Pages, &too_many),
            Err(ProtocolError::TooLarge(Tag::Pages, u32::MAX))
        ));
        assert!(wire.is_empty(), "nothing of a refused frame is sent");

        let header = |len: u32| {
            let mut header = vec![Tag::Pages as u8];
            header.extend_from_slice(&len.to_le_bytes());
            header
        };
        // The largest frame is read (here cut short: the peer closed).
        assert!(matches!(
            read_frame(&mut &header(MAX_FRAME)[..], &mut Vec::new()),
            Err(ProtocolError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut &header(MAX_FRAME + 1)[..], &mut Vec::new()),
            Err(ProtocolError::TooLarge(Tag::Pages, len)) if len == MAX_FRAME + 1
        ));
    }

    /// A reader that fails as a broken connection does.
    struct Reset<'a>(&'a [u8]);

    impl Read for Reset<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::ErrorKind::ConnectionReset.into());
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// The end of the stream is `Closed`, in the header or the payload;
    /// any other error is the connection's, kept as it is.
    #[test]
    fn a_closed_stream_and_a_broken_one_are_told_apart() {
        let mut payload = Vec::new();
        for cut in [&[][..], &[4, 0], &[4, 3, 0, 0, 0, 1]] {
            assert!(
                matches!(
                    read_frame(&mut &cut[..], &mut payload),
                    Err(ProtocolError::Closed)
                ),
                "{cut:?}"
            );
            assert!(
                matches!(
                    read_frame(&mut Reset(cut), &mut payload),
                    Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset
                ),
                "{cut:?}"
            );
        }
    }

    #[test]
    fn a_refusal_names_the_offered_and_the_accepted_versions() {
        let header = |format: &str, version: u32| HelloHeader {
            format: format.into(),
            version,
        };
        assert_eq!(
            header("qemu", 3).refusal().as_deref(),
            Some(format!(
                "qemu version 3 offered, this Bulkhead takes {FORMAT} versions \
                 {MIN_ACCEPTED_VERSION} to {VERSION}"
            ))
            .as_deref()
        );
        assert!(header("qemu", MIN_ACCEPTED_VERSION).refusal().is_some());
        for version in MIN_ACCEPTED_VERSION..=VERSION {
            assert_eq!(header(FORMAT, version).refusal(), None, "{version}");
        }
        for version in [0, 1, VERSION + 1, u32::MAX] {
            assert!(header(FORMAT, version).refusal().is_some(), "{version}");
        }
    }

    /// A current HELLO's machine is taken as it is: not read by the older
    /// formats' rule, which would drop an empty command line.
    #[test]
    fn a_current_hellos_machine_is_taken_as_sent() {
        let machine = crate::config::VmSpec {
            cmdline: Some(String::new()),
            ..crate::config::VmSpec::named("web")
        };
        let payload = serde_json::to_vec(&Hello {
            format: FORMAT.into(),
            version: VERSION,
            machine: machine.clone(),
            memory_to_hand_over: true,
        })
        .unwrap();
        let header = HelloHeader {
            format: FORMAT.into(),
            version: VERSION,
        };
        let hello = decode_hello(&payload, &header).unwrap();
        assert_eq!(hello.machine, machine);
        assert!(hello.memory_to_hand_over);
        assert!(matches!(
            decode_hello(b"{", &header),
            Err(ProtocolError::Malformed(Tag::Hello, _))
        ));
        // An older one without a machine is malformed, saying so.
        let older = HelloHeader {
            format: FORMAT.into(),
            version: 7,
        };
        assert!(matches!(
            decode_hello(br#"{"format": "bulkhead-migration", "version": 7}"#, &older),
            Err(ProtocolError::Malformed(Tag::Hello, why)) if why == "no machine"
        ));
    }

    #[test]
    fn a_text_payload_is_cut_at_4096_bytes_and_kept_printable() {
        let long = [b'a'; 5000];
        assert_eq!(text(&long), "a".repeat(4096));
        assert_eq!(text(b"line\nnext\0"), "line next ");
        assert_eq!(text(b"\xffok"), "\u{fffd}ok");
    }

    #[test]
    fn the_boot_id_is_the_hosts() {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(boot_id(), id.trim());
        assert_eq!(boot_id().len(), 36);
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Tag::Pages, &[&7u64.to_le_bytes(), b"data"]).unwrap();
        write_json(&mut wire, Tag::Accept, &serde_json::json!({})).unwrap();
        let mut input = &wire[..];
        let mut payload = Vec::new();
        assert_eq!(read_frame(&mut input, &mut payload).unwrap(), Tag::Pages);
        assert_eq!(&payload[8..], b"data");
        assert_eq!(read_frame(&mut input, &mut payload).unwrap(), Tag::Accept);
        assert!(matches!(
            read_frame(&mut input, &mut payload),
            Err(ProtocolError::Closed)
        ));

        let mut input: &[u8] = &[99, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut input, &mut payload),
            Err(ProtocolError::UnknownTag(99))
        ));
        let mut input: &[u8] = &[4, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut input, &mut payload),
            Err(ProtocolError::TooLarge(..))
        ));
        // A frame cut short is a closed connection, not garbage.
        let mut input: &[u8] = &[4, 10, 0, 0, 0, 1, 2];
        assert!(matches!(
            read_frame(&mut input, &mut payload),
            Err(ProtocolError::Closed)
        ));
        assert_eq!(text(b"bad\x1b[31m version"), "bad [31m version");
    }
}
