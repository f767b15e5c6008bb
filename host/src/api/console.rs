//! `GET /v1/vms/{id}/console`: the serial console over an HTTP upgrade.
//! After `101 Switching Protocols` the connection carries raw console bytes
//! both ways. Any number of readers; one writer (`?write=true`) at a time.

use super::{require, ApiError, ApiQuery, ApiState, ErrorBody};
use crate::auth::{Principal, Role};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use utoipa::IntoParams;

/// The protocol name of the upgrade.
pub const CONSOLE_PROTOCOL: &str = "bulkhead-console";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Type into the console (needs operator; one writer per VM).
    #[serde(default)]
    pub write: bool,
}

/// Releases a VM's writer slot when the console session ends.
struct WriterSlot {
    state: Arc<ApiState>,
    vm: String,
}

impl Drop for WriterSlot {
    fn drop(&mut self) {
        self.state
            .console_writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.vm);
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/console", tag = "vms",
    params(("id" = String, Path, description = "VM id"), ConsoleQuery),
    responses((status = 101, description = "Upgraded: raw console bytes follow"),
              (status = 400, description = "No Upgrade header", body = ErrorBody),
              (status = 403, description = "The token's role is too low", body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, description = "Not running, or a writer is attached", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn attach(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ConsoleQuery>,
    mut request: Request,
) -> Result<Response, ApiError> {
    require(
        &principal,
        if query.write {
            Role::Operator
        } else {
            Role::Viewer
        },
    )?;
    let upgrading = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .filter(|_| upgrading)
    else {
        return Err(ApiError::invalid(
            "Upgrade",
            format!("the console needs 'Connection: upgrade' and 'Upgrade: {CONSOLE_PROTOCOL}'"),
        ));
    };
    let record = {
        let state = state.clone();
        let id = id.clone();
        super::blocking(move || super::vms::visible_record(&state, &principal, &id)).await?
    };
    if !record.state.has_process() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "VM {id} is {}; its console exists while it runs",
                record.state.name()
            ),
        ));
    }
    let writer = if query.write {
        let mut writers = state
            .console_writers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !writers.insert(id.clone()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("VM {id}'s console already has a writer"),
            ));
        }
        Some(WriterSlot {
            state: state.clone(),
            vm: id.clone(),
        })
    } else {
        None
    };
    let socket = state.manager.paths(&id).console;
    let vmm = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("VM {id}'s console does not answer: {e}"),
            )
        })?;
    tokio::spawn(async move {
        let _writer = writer;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let client = TokioIo::new(upgraded);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut vmm_read, mut vmm_write) = vmm.into_split();
        let output = tokio::io::copy(&mut vmm_read, &mut client_write);
        let input = async {
            if _writer.is_some() {
                let _ = tokio::io::copy(&mut client_read, &mut vmm_write).await;
            } else {
                // Readers' input is dropped; reading still notices a close.
                let mut sink = [0u8; 1024];
                while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        };
        tokio::select! {
            _ = output => {}
            _ = input => {}
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, CONSOLE_PROTOCOL),
        ],
    )
        .into_response())
}
