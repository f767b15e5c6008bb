//! The command line's parts, shared by its two programs: `bulkhead` (every
//! command) and `bulkhead-vmm` (`run` only: one VM, as the daemon starts it).
//! The VMM program links none of the daemon's code, so it maps less of
//! itself: a VM's resident overhead is mostly the VMM's code pages.

pub mod console;
pub mod ctl;
pub mod device_options;
pub mod machine_flags;
pub mod run;
pub mod serve;
pub mod vm;

use clap::ValueEnum;

/// Output format of reports meant for people or for machines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// Logs go to stderr, filtered by `BULKHEAD_LOG`; one JSON object per event
/// with `BULKHEAD_LOG_FORMAT=json`, for log collectors.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("BULKHEAD_LOG").ok().as_deref());
    let registry = tracing_subscriber::registry().with(filter);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if std::env::var("BULKHEAD_LOG_FORMAT").is_ok_and(|format| format == "json") {
        registry.with(logs.json()).init();
    } else {
        registry
            .with(logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init();
    }
}

/// `BULKHEAD_LOG`'s filter: `level`, `target=level`, comma-separated
/// (`info`, `vmm=debug,warn`); warnings and errors when unset or unreadable.
/// Targets and levels only, which needs no regular expressions: a VMM keeps
/// that code out of its binary and its resident memory.
fn log_filter(text: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let warn = || Targets::new().with_default(LevelFilter::WARN);
    match text.map(str::parse::<Targets>) {
        Some(Ok(targets)) => targets,
        Some(Err(error)) => {
            eprintln!("bulkhead: BULKHEAD_LOG: {error}; logging warnings");
            warn()
        }
        None => warn(),
    }
}

/// Ends the process with a command's status, its error on one line.
pub fn exit_with(status: anyhow::Result<i32>) -> ! {
    match status {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("bulkhead: error: {}", one_line(&error));
            std::process::exit(1);
        }
    }
}

/// A fingerprint of the sources this program was built from (cli/build.rs).
pub const BUILD: &str = env!("BULKHEAD_BUILD");

/// The VMM program installed beside `bulkhead`, when there is one built from
/// the same sources (`bulkhead-vmm build-id`); one left over from another
/// build is passed over, with a warning.
pub fn vmm_program() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.with_file_name("bulkhead-vmm");
    if sibling == exe || !sibling.is_file() {
        return None;
    }
    let output = std::process::Command::new(&sibling)
        .arg("build-id")
        .output()
        .ok()?;
    let theirs = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && theirs.trim() == BUILD {
        Some(sibling)
    } else {
        tracing::warn!(
            "{} is from another build ({}; this one is {BUILD}): not using it",
            sibling.display(),
            theirs.trim()
        );
        None
    }
}

/// The error and its causes on one line, skipping causes whose text an outer
/// message already includes (library errors often quote their source).
pub fn one_line(error: &anyhow::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_log_filter_takes_levels_and_targets() {
        let filter = log_filter(Some("vmm=debug,info"));
        assert!(filter.would_enable("vmm::vcpu", &Level::DEBUG));
        assert!(!filter.would_enable("host", &Level::DEBUG));
        assert!(filter.would_enable("host", &Level::INFO));
        for unset_or_bad in [None, Some("vmm=loud")] {
            let filter = log_filter(unset_or_bad);
            assert!(filter.would_enable("vmm", &Level::WARN), "{unset_or_bad:?}");
            assert!(
                !filter.would_enable("vmm", &Level::INFO),
                "{unset_or_bad:?}"
            );
        }
    }
}
