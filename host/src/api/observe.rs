//! Monitoring: Prometheus metrics, the event stream, a health check.

use super::{blocking, ApiError, ApiState};
use crate::auth::Principal;
use crate::vmm_process;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

/// What `GET /v1/health` answers.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Only described: the handler writes the JSON itself.
pub struct Health {
    ok: bool,
    /// The daemon's version.
    version: String,
}

#[utoipa::path(get, path = "/v1/health", tag = "monitoring",
    responses((status = 200, description = "The daemon answers", body = Health)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true, "version": env!("CARGO_PKG_VERSION") }))
}

#[utoipa::path(get, path = "/v1/events", tag = "monitoring",
    responses((status = 200, description = "Server-Sent Events: `state` events carry an Event",
               content_type = "text/event-stream")),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream =
        BroadcastStream::new(state.events.subscribe()).filter_map(move |item| match item {
            Ok(event) if principal.may_see(&event.project) => SseEvent::default()
                .event("state")
                .json_data(&event)
                .ok()
                .map(Ok),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Ok(SseEvent::default()
                .event("lagged")
                .data(missed.to_string()))),
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// CPU time of a process or thread from its stat file, in seconds.
fn cpu_seconds(stat_path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    parse_stat(&stat, ticks)
}

/// The command name and CPU time (user and system, in seconds) of a
/// `/proc/PID/stat` line. The name is in parentheses and is the VMM's to
/// choose (a thread's name): spaces and parentheses in it are its own.
fn parse_stat(stat: &str, ticks_per_second: f64) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / ticks_per_second))
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[utoipa::path(get, path = "/metrics", tag = "monitoring",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")),
    security(("bearer" = [])))]
pub async fn metrics(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    let text = blocking(move || {
        let records = state.manager.list()?;
        let mut out = String::new();
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        let visible: Vec<_> = records
            .iter()
            .filter(|r| principal.may_see(&r.project))
            .collect();
        for record in &visible {
            *by_state.entry(record.state.name()).or_default() += 1;
        }
        let _ = writeln!(out, "# HELP bulkhead_vms VMs by state.\n# TYPE bulkhead_vms gauge");
        for (state_name, count) in &by_state {
            let _ = writeln!(out, "bulkhead_vms{{state=\"{state_name}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP bulkhead_daemon_resident_bytes The daemon's resident memory.\n\
             # TYPE bulkhead_daemon_resident_bytes gauge\nbulkhead_daemon_resident_bytes {}",
            own_rss_bytes()
        );
        let mut families: BTreeMap<&str, (&str, &str, Vec<String>)> = BTreeMap::new();
        let mut sample = |family: &'static str, kind: &'static str, help: &'static str, line: String| {
            families.entry(family).or_insert((kind, help, Vec::new())).2.push(line);
        };
        for record in &visible {
            let vm = format!(
                "vm=\"{}\",name=\"{}\",project=\"{}\"",
                record.id,
                label(&record.spec.name),
                label(&record.project)
            );
            sample(
                "bulkhead_vm_info",
                "gauge",
                "One per VM, with its state.",
                format!("bulkhead_vm_info{{{vm},state=\"{}\"}} 1", record.state.name()),
            );
            let Some(pid) = record.pid.filter(|&pid| vmm_process::is_vm_process(pid, &record.id))
            else {
                continue;
            };
            if let Some((_, seconds)) = cpu_seconds(&format!("/proc/{pid}/stat")) {
                sample(
                    "bulkhead_vm_process_cpu_seconds_total",
                    "counter",
                    "CPU time of the VMM process, all threads.",
                    format!("bulkhead_vm_process_cpu_seconds_total{{{vm}}} {seconds}"),
                );
            }
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for task in tasks.flatten() {
                    let path = format!("{}/stat", task.path().display());
                    if let Some((name, seconds)) = cpu_seconds(&path) {
                        if let Some(vcpu) = name.strip_prefix("vcpu") {
                            sample(
                                "bulkhead_vm_vcpu_seconds_total",
                                "counter",
                                "CPU time of each vCPU thread.",
                                format!(
                                    "bulkhead_vm_vcpu_seconds_total{{{vm},vcpu=\"{}\"}} {seconds}",
                                    label(vcpu)
                                ),
                            );
                        }
                    }
                }
            }
            let Some(live) = state.manager.live_status(&record.id) else {
                continue;
            };
            let memory = &live.memory;
            for (kib, family, help) in [
                (memory.process_rss_kib, "bulkhead_vm_resident_bytes", "Resident memory of the VMM process."),
                (memory.guest_resident_kib, "bulkhead_vm_guest_resident_bytes", "Guest RAM resident on the host."),
                (memory.vmm_overhead_kib, "bulkhead_vm_overhead_bytes", "The VMM's own resident memory."),
            ] {
                sample(family, "gauge", help, format!("{family}{{{vm}}} {}", kib * 1024));
            }
            for (vcpu, report) in live.vcpus.iter().enumerate() {
                for (reason, count) in report.exits.by_reason() {
                    sample(
                        "bulkhead_vm_exits_total",
                        "counter",
                        "vCPU exits by reason.",
                        format!(
                            "bulkhead_vm_exits_total{{{vm},vcpu=\"{vcpu}\",reason=\"{}\"}} {count}",
                            label(reason),
                        ),
                    );
                }
                for (mnemonic, count) in &report.emulated {
                    sample(
                        "bulkhead_vm_emulated_instructions_total",
                        "counter",
                        "Instructions the VMM emulated for KVM, by mnemonic.",
                        format!(
                            "bulkhead_vm_emulated_instructions_total{{{vm},vcpu=\"{vcpu}\",instruction=\"{}\"}} {count}",
                            label(mnemonic),
                        ),
                    );
                }
            }
            for device in &live.devices {
                for (counter, value) in &device.counters {
                    sample(
                        "bulkhead_vm_device_total",
                        "counter",
                        "Device counters (bytes and operations) by device and counter.",
                        format!(
                            "bulkhead_vm_device_total{{{vm},device=\"{}\",counter=\"{}\"}} {value}",
                            label(&device.name),
                            label(counter),
                        ),
                    );
                }
            }
        }
        for (family, (kind, help, lines)) in families {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        Ok(out)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line of `name` with utime and stime (fields 14 and 15).
    fn stat(name: &str, utime: u64, stime: u64) -> String {
        format!("4242 ({name}) S 1 4242 4242 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 3 0")
    }

    #[test]
    fn cpu_time_is_user_plus_system_over_the_clock_ticks() {
        assert_eq!(
            parse_stat(&stat("vcpu0", 150, 50), 100.0),
            Some(("vcpu0".to_string(), 2.0))
        );
        assert_eq!(parse_stat(&stat("bulkhead", 3, 0), 1.0).unwrap().1, 3.0);
    }

    #[test]
    fn a_name_keeps_its_spaces_and_parentheses() {
        let (name, seconds) = parse_stat(&stat("vcpu 1) (x", 10, 30), 10.0).unwrap();
        assert_eq!(name, "vcpu 1) (x");
        assert_eq!(seconds, 4.0);
    }

    #[test]
    fn a_short_or_broken_line_is_none_not_a_panic() {
        for broken in [
            "",
            "4242 (x",
            "4242 (x)",
            "4242 (x) S 1 2",
            ")(",
            "4242 (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 a b",
        ] {
            assert_eq!(parse_stat(broken, 100.0), None, "{broken:?}");
        }
    }

    #[test]
    fn labels_escape_what_ends_or_breaks_a_value() {
        assert_eq!(label("net\"0\\\n"), "net\\\"0\\\\\\n");
        assert_eq!(label("plain-name_1"), "plain-name_1");
    }
}
