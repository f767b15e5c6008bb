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
}

pub fn ctl(args: CtlArgs) -> anyhow::Result<i32> {
    let request = match args.action {
        Action::Status => Request::Status,
        Action::Balloon { mib } => Request::Balloon { target_mib: mib },
    };
    let answer = vmm::control::request(&args.path, &request)
        .with_context(|| format!("cannot talk to control socket {}", args.path.display()))?;
    if answer["ok"] != true {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the VM refused the request")
        );
    }
    if let Some(status) = answer.get("status") {
        println!("{}", serde_json::to_string_pretty(status)?);
    }
    Ok(0)
}
