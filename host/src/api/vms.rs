//! `/v1/vms`: define, list, describe, start, stop, pause, resume, snapshot
//! and delete VMs. A caller only ever sees its own project's VMs; another
//! project's VM answers 404 exactly as a missing one does.

use super::{blocking, parse_json, require, ApiError, ApiQuery, ApiState, AuditProject, ErrorBody};
use crate::auth::{Principal, Role};
use crate::manager::ManagerError;
use crate::migration_tls::check_peer;
use crate::model::VmRecord;
use crate::spec::{valid_name, VmSpec};
use crate::vmm_process::Origin;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// The project VMs are created in when the caller names none.
pub const DEFAULT_PROJECT: &str = "default";

/// A VM as the API shows it: its record, and for `describe` what its VMM
/// reports now.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmView {
    #[serde(flatten)]
    pub record: VmRecord,
    /// The VMM's own report (memory, devices) while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub live: Option<vmm::control::Status>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectQuery {
    /// The project to act in; only for callers not bound to one (tokens are
    /// bound to their project).
    pub project: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Kill a VM that still has a VMM process.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Kill the VMM at once instead of asking the guest to shut down.
    #[serde(default)]
    pub force: bool,
    /// Seconds the guest gets to shut down after it is asked to (the ACPI
    /// power button when the guest listens to it, else Ctrl-Alt-Del) before
    /// the VMM stops it (default 10, at most 600).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 600)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Name of the snapshot, unique per VM.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// What `POST /v1/vms/{id}/migrate` answers: the VMM's report
/// (`vmm::migration::MigrationReport`), described for the document.
#[derive(ToSchema)]
#[allow(dead_code)] // Only described: the answer is the VMM's own report.
pub struct MigrationReport {
    /// The whole migration, ms.
    total_ms: f64,
    /// The guest's pause at switch-over, ms.
    downtime_ms: f64,
    /// Whether `downtime_ms` is measured on one clock (same host) rather than
    /// an upper bound.
    downtime_measured_on_one_clock: bool,
    rounds: u32,
    pages_sent: u64,
    bytes_sent: u64,
    last_round_pages: u64,
    /// The highest share of time vCPUs were held back so the copy converges.
    max_throttle_percent: u32,
    /// With `verify_memory`: the checksum both sides agreed on.
    memory_crc: Option<u32>,
    /// The destination took the guest's RAM over (same host): no page copied.
    memory_handed_over: bool,
}

/// What `POST /v1/vms/{id}/snapshot` answers: the VMM's report
/// (`vmm::snapshot::SnapshotInfo`), described for the document.
#[derive(ToSchema)]
#[allow(dead_code)] // Only described: the answer is the VMM's own report.
pub struct SnapshotReport {
    /// The snapshot's directory as the VMM sees it.
    path: String,
    memory_bytes: u64,
    /// Pages written (the rest were zero and left as holes).
    memory_pages_written: u64,
    state_bytes: u64,
}

/// Checks an id's shape before it reaches the store.
fn check_id(id: &str) -> Result<(), ApiError> {
    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("VM {id}")))
    }
}

/// The record of VM `id` if the caller may see it.
pub(super) fn visible_record(
    state: &ApiState,
    principal: &Principal,
    id: &str,
) -> Result<VmRecord, ApiError> {
    check_id(id)?;
    let record = state.manager.get(id)?;
    if !principal.may_see(&record.project) {
        return Err(ApiError::not_found(format!("VM {id}")));
    }
    Ok(record)
}

fn with_project(response: impl IntoResponse, project: &str) -> Response {
    let mut response = response.into_response();
    response
        .extensions_mut()
        .insert(AuditProject(project.to_string()));
    response
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, description = "The caller's VMs", body = [VmView]),
              (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<VmView>>, ApiError> {
    blocking(move || {
        let records = state.manager.list()?;
        Ok(Json(
            records
                .into_iter()
                .filter(|record| principal.may_see(&record.project))
                .map(|record| VmView { record, live: None })
                .collect(),
        ))
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", params(ProjectQuery),
    request_body = VmSpec,
    responses((status = 201, description = "Defined (not started)", body = VmView),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    ApiQuery(query): ApiQuery<ProjectQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&principal, Role::Operator)?;
    let project = super::acting_project(&principal, query.project)?;
    let spec: VmSpec = parse_json(&body)?;
    let audit_project = project.clone();
    let record = blocking(move || Ok(state.manager.create(&project, spec)?)).await?;
    Ok(with_project(
        (StatusCode::CREATED, Json(VmView { record, live: None })),
        &audit_project,
    ))
}

#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn describe(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    blocking(move || {
        let record = visible_record(&state, &principal, &id)?;
        let live = state.manager.live_status(&id);
        Ok(Json(VmView { record, live }))
    })
    .await
}

/// Runs a lifecycle action on a visible VM as an operator.
async fn act(
    state: Arc<ApiState>,
    principal: Principal,
    id: String,
    action: impl FnOnce(&ApiState, &str) -> Result<serde_json::Value, ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    require(&principal, Role::Operator)?;
    let (project, result) = blocking(move || {
        let record = visible_record(&state, &principal, &id)?;
        Ok((record.project, action(&state, &id)))
    })
    .await?;
    Ok(match result {
        Ok(value) => with_project(Json(value), &project),
        Err(e) => with_project(e, &project),
    })
}

/// A call to a VM's VMM that failed because the VMM had just ended or was
/// ending (the guest powered off between the state check and the call: its
/// control socket is gone first, then its process) conflicts with the VM's
/// state, as the same call a moment later does (409), rather than being a
/// failure of the VMM (422).
fn ended_meanwhile(state: &ApiState, id: &str, error: ManagerError) -> ApiError {
    if matches!(error, ManagerError::Failed(_)) {
        let alive = state.manager.paths(id).control.exists()
            && state
                .manager
                .get(id)
                .ok()
                .and_then(|record| record.pid)
                .is_some_and(|pid| crate::vmm_process::is_vm_process(pid, id));
        if !alive {
            return ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("VM {id} stopped meanwhile: its VMM ended"),
            );
        }
    }
    error.into()
}

fn record_json(record: VmRecord) -> serde_json::Value {
    serde_json::to_value(VmView { record, live: None }).unwrap_or_default()
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Resume from this snapshot of the VM instead of booting.
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub restore: Option<String>,
    /// Wait at `tcp:IP:PORT` for a live migration of this VM from another
    /// VMM (`POST /v1/vms/{id}/migrate` on the source). The answer comes once
    /// it listens, with the VM `starting`; it turns `running` when the guest
    /// arrives.
    #[serde(default)]
    pub incoming: Option<String>,
    /// With `incoming`: the source host's IP address. A connection from any
    /// other address is dropped before it is read.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "192.0.2.10")]
    pub incoming_from: Option<std::net::IpAddr>,
    /// With `incoming`: seconds to wait for the migration before the VM is
    /// stopped (default 600, at most 86400).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86_400)]
    pub incoming_timeout_secs: Option<u64>,
}

/// How long a destination waits for its source unless told.
const DEFAULT_INCOMING_TIMEOUT_SECS: u64 = 600;
const MAX_INCOMING_TIMEOUT_SECS: u64 = 86_400;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:IP:PORT` where the destination waits.
    pub uri: String,
    /// Longest pause at switch-over, ms (default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Cap on the stream, MiB/s.
    #[serde(default)]
    pub bandwidth_mib: Option<u64>,
    /// Give up after this many seconds without converging (default 120).
    #[serde(default)]
    pub give_up_after_secs: Option<u64>,
    /// Compare a checksum of all guest memory on both sides.
    #[serde(default)]
    pub verify_memory: bool,
}

/// Checks `tcp:IP:PORT`; a sandboxed VMM reaches no Unix socket outside its own directory.
/// The address of a `tcp:IP:PORT` URI.
fn check_tcp_uri(field: &str, uri: &str) -> Result<std::net::SocketAddr, ApiError> {
    // An IP address: the daemon and its VMMs never look names up for a tenant.
    uri.strip_prefix("tcp:")
        .and_then(|rest| rest.parse::<std::net::SocketAddr>().ok())
        .filter(|address| address.port() != 0)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{uri:?} is not tcp:IP:PORT (an IP address, not a name, and a port)"),
            )
        })
}

#[utoipa::path(post, path = "/v1/vms/{id}/start", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    request_body(content = Option<StartRequest>, description = "Optional: boot when empty"),
    responses((status = 200, description = "Running (starting, for an incoming migration)", body = VmView),
              (status = 400, body = ErrorBody), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "The VMM failed to start", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // No body, or `null` (the document's body is `StartRequest` or null).
    let request: StartRequest = if body.is_empty() {
        StartRequest::default()
    } else {
        parse_json::<Option<StartRequest>>(&body)?.unwrap_or_default()
    };
    if request.incoming.is_none()
        && (request.incoming_from.is_some() || request.incoming_timeout_secs.is_some())
    {
        return Err(ApiError::invalid(
            "incoming_from",
            "incoming_from and incoming_timeout_secs go with incoming",
        ));
    }
    let origin = match (request.restore, request.incoming) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "restore",
                "give restore or incoming, not both",
            ))
        }
        (Some(name), None) => {
            if !valid_name(&name) {
                return Err(ApiError::invalid("restore", "not a snapshot name"));
            }
            Origin::Restore(name)
        }
        (None, Some(uri)) => {
            check_tcp_uri("incoming", &uri)?;
            let source = request.incoming_from.ok_or_else(|| {
                ApiError::invalid(
                    "incoming_from",
                    "the source host's IP address is required: a destination takes only the source it expects",
                )
            })?;
            check_peer(state.migration_tls.as_deref(), source)
                .map_err(|reason| ApiError::invalid("incoming_from", reason))?;
            let timeout_secs = request
                .incoming_timeout_secs
                .unwrap_or(DEFAULT_INCOMING_TIMEOUT_SECS);
            if !(1..=MAX_INCOMING_TIMEOUT_SECS).contains(&timeout_secs) {
                return Err(ApiError::invalid(
                    "incoming_timeout_secs",
                    format!("between 1 and {MAX_INCOMING_TIMEOUT_SECS}"),
                ));
            }
            Origin::Incoming {
                uri,
                from: vmm::launch::ExpectedSource {
                    source,
                    timeout_secs,
                    tls: state.migration_tls.as_ref().map(|tls| tls.from_source()),
                },
            }
        }
        (None, None) => Origin::Boot,
    };
    act(state, principal, id, move |state, id| {
        Ok(record_json(state.manager.start(id, origin)?))
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms/{id}/migrate", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    request_body = MigrateRequest,
    responses((status = 200, description = "Migrated: the VM runs at the destination; here it is stopped",
               body = MigrationReport),
              (status = 400, body = ErrorBody), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "Failed; the VM runs on here", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn migrate(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: MigrateRequest = parse_json(&body)?;
    let destination = check_tcp_uri("uri", &request.uri)?.ip();
    check_peer(state.migration_tls.as_deref(), destination)
        .map_err(|reason| ApiError::invalid("uri", reason))?;
    let options = vmm::migration::MigrateOptions {
        uri: request.uri,
        downtime_ms: request.downtime_ms,
        bandwidth_mib: request.bandwidth_mib,
        give_up_after_s: request.give_up_after_secs,
        verify_memory: request.verify_memory,
        tls: state
            .migration_tls
            .as_ref()
            .map(|tls| tls.to_destination(destination)),
    };
    act(state, principal, id, move |state, id| {
        Ok(state.manager.migrate(id, options)?)
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms/{id}/stop", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    request_body(content = Option<StopRequest>, description = "Optional; an empty body stops cleanly with a 10 s limit"),
    responses((status = 200, description = "Stopped", body = VmView),
              (status = 400, body = ErrorBody), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "The VMM did not answer or end", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stop(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // No body, or `null` (the document's body is `StopRequest` or null).
    let request: StopRequest = if body.is_empty() {
        StopRequest::default()
    } else {
        parse_json::<Option<StopRequest>>(&body)?.unwrap_or_default()
    };
    let timeout = request.timeout_secs.unwrap_or(10);
    if timeout > 600 {
        return Err(ApiError::invalid("timeout_secs", "at most 600"));
    }
    act(state, principal, id, move |state, id| {
        Ok(record_json(state.manager.stop(
            id,
            request.force,
            Duration::from_secs(timeout),
        )?))
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms/{id}/pause", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmView), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "The VMM did not answer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(state, principal, id, |state, id| {
        let record = state
            .manager
            .pause(id)
            .map_err(|e| ended_meanwhile(state, id, e))?;
        Ok(record_json(record))
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms/{id}/resume", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmView), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "The VMM did not answer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(state, principal, id, |state, id| {
        let record = state
            .manager
            .resume(id)
            .map_err(|e| ended_meanwhile(state, id, e))?;
        Ok(record_json(record))
    })
    .await
}

#[utoipa::path(post, path = "/v1/vms/{id}/snapshot", tag = "vms",
    params(("id" = String, Path, description = "VM id")),
    request_body = SnapshotRequest,
    responses((status = 200, description = "Written into the VM's snapshots directory",
               body = SnapshotReport),
              (status = 400, body = ErrorBody), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody),
              (status = 422, description = "The VMM failed to write it", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn snapshot(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SnapshotRequest = parse_json(&body)?;
    if !valid_name(&request.name) {
        return Err(ApiError::invalid(
            "name",
            "must be 1 to 63 lower-case letters, digits or '-'",
        ));
    }
    act(state, principal, id, move |state, id| {
        state
            .manager
            .snapshot(id, &request.name)
            .map_err(|e| ended_meanwhile(state, id, e))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM id"), DeleteQuery),
    responses((status = 204, description = "Deleted"), (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "Still running (use force)", body = ErrorBody),
              (status = 422, description = "The VMM did not end", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<Response, ApiError> {
    let response = act(state, principal, id, move |state, id| {
        state.manager.delete(id, query.force)?;
        Ok(serde_json::Value::Null)
    })
    .await?;
    if response.status() == StatusCode::OK {
        let project = response.extensions().get::<AuditProject>().cloned();
        let mut empty = StatusCode::NO_CONTENT.into_response();
        if let Some(project) = project {
            empty.extensions_mut().insert(project);
        }
        return Ok(empty);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_sixteen_hex_digits() {
        assert!(check_id("0123456789abcdef").is_ok());
        for bad in [
            "",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789abcdeg",
            "../../../etc/abc",
            "../../../../etc/x",
        ] {
            let error = check_id(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::NOT_FOUND, "{bad}");
        }
    }
}
