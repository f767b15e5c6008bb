//! `bulkhead ctl PATH ...`: act on a running VM through its control socket.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use vmm::control::Request;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's control socket (`bulkhead run --control PATH`).
    path: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Print the VM's state as JSON: memory, balloon, device counters.
    Status,
    /// Set the balloon target: the guest gives back this much memory.
    Balloon {
        /// Target balloon size in MiB (0 gives all memory back to the guest).
        mib: u64,
    },
    /// Stop every vCPU and device at a consistent point.
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Press Ctrl-Alt-Del on the guest's keyboard (ask it to shut down).
    CtrlAltDel,
    /// Press the ACPI power button; the answer says whether the guest
    /// listens to it (`armed`: its ACPI OS enabled the event).
    PowerButton,
    /// Ask the guest to shut down: the ACPI power button when the guest
    /// armed it, else Ctrl-Alt-Del; the answer's `method` says which.
    Shutdown,
    /// Write a snapshot of the VM to DIR (which must not exist); a running
    /// VM is paused while it is written, then goes on.
    Snapshot { dir: PathBuf },
    /// Live-migrate the VM to a `bulkhead run --incoming URI` process
    /// (URI: tcp:IP:PORT or unix:PATH). This VM ends when the destination
    /// runs it; if anything fails it runs on here and the error says why.
    Migrate {
        uri: String,
        /// Longest pause allowed at switch-over, in ms.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        downtime_ms: u64,
        /// Cap on the migration stream, in MiB/s.
        #[arg(long, value_name = "MIB")]
        bandwidth_mib: Option<u64>,
        /// Give up after this many seconds without converging.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        give_up_after: u64,
        /// Compare a checksum of all guest memory on both sides at switch-over.
        #[arg(long)]
        verify_memory: bool,
        /// Use TLS, trusting the CA certificate(s) in this PEM file.
        #[arg(long, value_name = "PEM", requires = "tls_server_name")]
        tls_ca: Option<PathBuf>,
        /// The name (or IP address) the destination's certificate must carry.
        #[arg(long, value_name = "NAME", requires = "tls_ca")]
        tls_server_name: Option<String>,
        /// With --tls-ca: present this PEM certificate (chain) to a
        /// destination that authenticates its sources (mutual TLS).
        #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_key"])]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_cert"])]
        tls_key: Option<PathBuf>,
    },
}

pub fn ctl(args: CtlArgs) -> anyhow::Result<i32> {
    let request = match args.action {
        Action::Status => Request::Status,
        Action::Balloon { mib } => Request::Balloon { target_mib: mib },
        Action::Pause => Request::Pause,
        Action::Resume => Request::Resume,
        Action::CtrlAltDel => Request::CtrlAltDel,
        Action::PowerButton => Request::PowerButton,
        Action::Shutdown => Request::Shutdown,
        // The VM resolves paths from its own working directory, not ours.
        Action::Snapshot { dir } => Request::Snapshot {
            path: std::path::absolute(&dir)
                .with_context(|| format!("bad snapshot path {}", dir.display()))?,
        },
        Action::Migrate {
            uri,
            downtime_ms,
            bandwidth_mib,
            give_up_after,
            verify_memory,
            tls_ca,
            tls_server_name,
            tls_cert,
            tls_key,
        } => Request::Migrate(vmm::migration::MigrateOptions {
            uri,
            downtime_ms: Some(downtime_ms),
            bandwidth_mib,
            give_up_after_s: Some(give_up_after),
            verify_memory,
            // Read here, with the caller's rights: the VM gets their text.
            tls: match (tls_ca, tls_server_name) {
                (Some(ca), Some(server_name)) => Some(vmm::migration::TlsClient {
                    ca_pem: vmm::migration::read_pem(&ca)?,
                    server_name,
                    identity: match (tls_cert, tls_key) {
                        (Some(cert), Some(key)) => {
                            Some(vmm::migration::TlsIdentity::read(&cert, &key)?)
                        }
                        _ => None,
                    },
                }),
                _ => None,
            },
        }),
    };
    use vmm::control::{CallError, Response};
    let answer = match vmm::control::call(&args.path, &request) {
        Ok(answer) => answer,
        Err(CallError::Refused(reason)) => bail!("{reason}"),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot talk to control socket {}", args.path.display()))
        }
    };
    match answer {
        Response::Status { status, .. } => println!("{}", serde_json::to_string_pretty(&status)?),
        Response::Done { .. } => {}
        // Snapshot, migration, shutdown and power-button answers say more than ok.
        other => println!("{}", serde_json::to_string_pretty(&other)?),
    }
    Ok(0)
}
