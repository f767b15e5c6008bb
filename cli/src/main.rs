//! `bulkhead`: the hypervisor's command line.

use bulkhead_cli::{ctl, run, serve, vm};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "Bulkhead: a hypervisor on Linux KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and attach its serial console to this terminal.
    ///
    /// With no --kernel, boots the small guest built into this binary.
    Run(Box<run::RunArgs>),
    /// Act on a running VM through its control socket.
    Ctl(ctl::CtlArgs),
    /// Run the host daemon: many sandboxed VMs behind a REST API.
    Serve(serve::ServeArgs),
    /// Manage VMs through the host daemon.
    Vm(vm::VmArgs),
    /// Manage the daemon's API tokens.
    Token(vm::TokenArgs),
}

fn main() {
    bulkhead_cli::init_logging();
    // A VM runs in the VMM program when it is installed beside this one: it
    // holds only the VMM's code (see cli/src/lib.rs).
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|command| command == "run") {
        if let Some(vmm) = bulkhead_cli::vmm_program() {
            use std::os::unix::process::CommandExt;
            let error = std::process::Command::new(&vmm)
                .arg("run")
                .args(args)
                .exec();
            eprintln!("bulkhead: cannot run {}: {error}", vmm.display());
            std::process::exit(1);
        }
    }
    let cli = Cli::parse();
    bulkhead_cli::exit_with(match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Serve(args) => serve::serve(args),
        Command::Vm(args) => vm::vm(args),
        Command::Token(args) => vm::token(args),
    })
}
