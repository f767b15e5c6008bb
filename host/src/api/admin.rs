//! `/v1/tokens` and `/v1/audit`: the administrator's endpoints. A project's
//! admin manages its own project's tokens; the host's administrator (root
//! on the Unix socket) any project's.

use super::{blocking, parse_json, require, ApiError, ApiQuery, ApiState, AuditProject, ErrorBody};
use crate::audit::AuditEntry;
use crate::auth::{self, Principal, Role, TokenRecord};
use crate::spec::valid_name;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for (shown in the audit log).
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    pub role: Role,
    /// Defaults to the caller's project.
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub project: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewToken {
    /// The secret: shown once, stored only as a hash.
    pub token: String,
    pub record: TokenRecord,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Newest entries to return (default 100, at most 10000).
    pub limit: Option<usize>,
}

#[utoipa::path(post, path = "/v1/tokens", tag = "access", request_body = CreateToken,
    responses((status = 201, body = NewToken), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&principal, Role::Admin)?;
    let request: CreateToken = parse_json(&body)?;
    if !valid_name(&request.name) {
        return Err(ApiError::invalid(
            "name",
            "must be 1 to 63 lower-case letters, digits or '-'",
        ));
    }
    let project = super::acting_project(&principal, request.project)?;
    let (record, token) = auth::new_token(&request.name, &project, request.role);
    let stored = record.clone();
    blocking(move || {
        state.manager.store().put_token(&stored).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })
    })
    .await?;
    let mut response = (StatusCode::CREATED, Json(NewToken { token, record })).into_response();
    response.extensions_mut().insert(AuditProject(project));
    Ok(response)
}

#[utoipa::path(get, path = "/v1/tokens", tag = "access",
    responses((status = 200, body = [TokenRecord]), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<TokenRecord>>, ApiError> {
    require(&principal, Role::Admin)?;
    blocking(move || {
        let tokens = state.manager.store().tokens().map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        Ok(Json(
            tokens
                .into_iter()
                .filter(|token| principal.may_see(&token.project))
                .map(|token| TokenRecord {
                    secret_sha256: String::new(),
                    ..token
                })
                .collect(),
        ))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "access",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"),
              (status = 403, description = "Not an admin token", body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_token(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&principal, Role::Admin)?;
    let project = blocking(move || {
        let internal = |e: crate::store::StoreError| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        };
        let token = state.manager.store().token(&id).map_err(internal)?;
        match token {
            Some(token) if principal.may_see(&token.project) => {
                state.manager.store().delete_token(&id).map_err(internal)?;
                Ok(token.project)
            }
            _ => Err(ApiError::not_found(format!("token {id}"))),
        }
    })
    .await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.extensions_mut().insert(AuditProject(project));
    Ok(response)
}

#[utoipa::path(get, path = "/v1/audit", tag = "access", params(AuditQuery),
    responses((status = 200, body = [AuditEntry]), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_log(
    State(state): State<Arc<ApiState>>,
    Extension(principal): Extension<Principal>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    require(&principal, Role::Admin)?;
    let limit = query.limit.unwrap_or(100).min(10_000);
    blocking(move || {
        state
            .audit
            .read(principal.project.as_deref(), limit)
            .map(Json)
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })
    })
    .await
}
