//! `bulkhead-vmm`: one VM, as `bulkhead run` describes it and as the host
//! daemon starts it (`bulkhead-vmm run --launch-fd 3`). Only the VMM's code
//! is linked in, which keeps a VM's resident overhead small.

use bulkhead_cli::run;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulkhead-vmm", version, about = "Bulkhead's VMM: runs one VM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and attach its serial console to this terminal.
    Run(Box<run::RunArgs>),
    /// Print the fingerprint of the sources this program was built from.
    #[command(hide = true)]
    BuildId,
}

fn main() {
    bulkhead_cli::init_logging();
    match Cli::parse().command {
        Command::Run(args) => bulkhead_cli::exit_with(run::run(*args)),
        Command::BuildId => println!("{}", bulkhead_cli::BUILD),
    }
}
