//! `bulkhead`: the hypervisor's command line.

mod console;
mod ctl;
mod device_options;
mod run;
mod serve;
mod vm;

use clap::{Parser, Subcommand, ValueEnum};

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

/// Output format of reports meant for people or for machines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // One JSON object per event, for log collectors.
    if std::env::var("BULKHEAD_LOG_FORMAT").is_ok_and(|format| format == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Serve(args) => serve::serve(args),
        Command::Vm(args) => vm::vm(args),
        Command::Token(args) => vm::token(args),
    };
    match status {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("bulkhead: error: {}", one_line(&error));
            std::process::exit(1);
        }
    }
}

/// The error and its causes on one line, skipping causes whose text an outer
/// message already includes (library errors often quote their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
