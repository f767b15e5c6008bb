//! The REST API under `/v1`: routing, authentication, authorisation, the
//! error format, the audit of every mutating call, and overload shedding.

pub mod admin;
pub mod console;
pub mod observe;
pub mod openapi;
pub mod vms;

use crate::audit::{AuditEntry, AuditLog};
use crate::auth::{self, Principal, Role};
use crate::events::EventBus;
use crate::manager::{Manager, ManagerError};
use axum::body::Bytes;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use utoipa::ToSchema;

/// Requests served at once by default; more get 503 at once rather than
/// queueing.
pub const DEFAULT_MAX_REQUESTS: usize = 256;
/// Largest request body.
const MAX_BODY_BYTES: usize = 64 << 10;

pub struct ApiState {
    pub manager: Arc<Manager>,
    pub audit: AuditLog,
    pub events: EventBus,
    /// VMs whose console has a writer attached.
    pub console_writers: Mutex<HashSet<String>>,
    /// uid the daemon runs as: local callers with it (or root) are the host's
    /// administrator without a token.
    pub daemon_uid: u32,
    /// Mutual TLS for migrations between daemons; without it, loopback only.
    pub migration_tls: Option<Arc<crate::migration_tls::MigrationTls>>,
}

/// Who is on the other end of a connection, set by the listener.
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    /// A Unix socket peer and its uid (SO_PEERCRED).
    Local { uid: u32 },
    /// TCP (with TLS): tokens only.
    Remote,
}

/// The error every endpoint answers with.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: invalid_request, unauthorized, forbidden, not_found,
    /// conflict, overloaded, failed, internal.
    pub code: String,
    pub message: String,
    /// The request field at fault, for invalid_request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// Carried on an error response so the audit records why.
#[derive(Clone)]
struct AuditError(String);
/// Carried on a response so the audit records the project acted in.
#[derive(Clone)]
pub struct AuditProject(pub String);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no {what}"))
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self.field {
            Some(field) if !self.message.starts_with(field.as_str()) => {
                format!("{field}: {}", self.message)
            }
            _ => self.message.clone(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: message.clone(),
                field: self.field,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(AuditError(message));
        response
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::Invalid(spec) => ApiError::invalid(spec.field, spec.message),
            ManagerError::NotFound(id) => ApiError::not_found(format!("VM {id}")),
            ManagerError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            ManagerError::Failed(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "failed", message)
            }
            ManagerError::Store(e) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// Parses a JSON body, naming the field at fault when it does not fit.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    // serde builds a struct from an array of its fields in order too; every
    // body the API takes is an object (or null where it is optional), and
    // an array must not pass as one (schemathesis sent `[]` to start).
    if value.is_array() {
        return Err(ApiError::invalid(
            "body",
            "must be a JSON object, not an array",
        ));
    }
    whole_numbers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::invalid(field, e.inner().to_string())
    })
}

/// Writes `431.0` as `431`: JSON (and the document's JSON Schema) has one
/// kind of number, and 431.0 is the integer an `integer` field asks for.
/// Other numbers stay as they are (a float field takes either).
fn whole_numbers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64()) {
                if float.fract() == 0.0 && float.abs() < 9.0e15 {
                    *value = Value::from(float as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// A query string parsed into `T`; one that does not fit answers 400 with
/// the error body every endpoint answers with (axum's own `Query` answers in
/// plain text, which the document does not promise).
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_error(&rejection.body_text())),
        }
    }
}

/// The error for axum's "Failed to deserialize query string: FIELD: REASON"
/// (or without a field): the field when one is named, else the query.
fn query_error(text: &str) -> ApiError {
    let detail = text.split_once(": ").map_or(text, |(_, d)| d);
    let field = detail
        .split_once(": ")
        .map(|(field, _)| field)
        .filter(|field| {
            field
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .unwrap_or("query");
    ApiError::invalid(field, detail.to_string())
}

/// Runs blocking work (store, VMM sockets) off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

pub fn require(principal: &Principal, role: Role) -> Result<(), ApiError> {
    if principal.role >= role {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this needs the {} role; the token has {}",
            role_name(role),
            role_name(principal.role)
        )))
    }
}

/// The project a call acts in: a token's own (naming another is refused),
/// or for the host's administrator the one asked for, else `default`.
pub fn acting_project(principal: &Principal, asked: Option<String>) -> Result<String, ApiError> {
    let project = match (&principal.project, asked) {
        (Some(own), Some(asked)) if *own != asked => {
            return Err(ApiError::forbidden(format!(
                "the token belongs to project {own}, not {asked}"
            )))
        }
        (Some(own), _) => own.clone(),
        (None, Some(asked)) => asked,
        (None, None) => vms::DEFAULT_PROJECT.to_string(),
    };
    if !crate::spec::valid_name(&project) {
        return Err(ApiError::invalid(
            "project",
            "must be 1 to 63 lower-case letters, digits or '-'",
        ));
    }
    Ok(project)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

/// Finds the caller: a bearer token, or a local administrator on the Unix
/// socket. Sets the principal as a request extension.
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<Peer>().copied();
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("").to_string());
    let principal = match (header, peer) {
        (Some(header), _) => {
            let Some(token) = header.strip_prefix("Bearer ") else {
                return unauthorized("the Authorization header must be 'Bearer <token>'");
            };
            let Some((id, secret)) = auth::parse_token(token.trim()) else {
                return unauthorized("malformed token");
            };
            let (id, secret) = (id.to_string(), secret.to_string());
            let manager = state.manager.clone();
            let record = tokio::task::spawn_blocking(move || manager.store().token(&id)).await;
            match record {
                Ok(Ok(Some(record))) if auth::secret_matches(&record, &secret) => Principal {
                    name: format!("token:{}({})", record.id, record.name),
                    project: Some(record.project),
                    role: record.role,
                },
                _ => return unauthorized("unknown or revoked token"),
            }
        }
        (None, Some(Peer::Local { uid })) if uid == 0 || uid == state.daemon_uid => {
            Principal::local(uid)
        }
        (None, _) => return unauthorized("a bearer token is required"),
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Records every mutating call (and every refused one) in the audit log.
async fn audit(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !mutating {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let action = format!("{} {route}", request.method());
    let target = request
        .uri()
        .path()
        .split('/')
        .nth(3)
        .unwrap_or("")
        .to_string();
    // The principal is set by `authenticate`, which runs inside this layer.
    let principal = std::sync::Arc::new(Mutex::new(None::<Principal>));
    let mut request = request;
    request
        .extensions_mut()
        .insert(PrincipalSlot(principal.clone()));
    let response = next.run(request).await;
    let who = principal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let entry = AuditEntry {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        who,
        project: response
            .extensions()
            .get::<AuditProject>()
            .map(|p| p.0.clone())
            .unwrap_or_default(),
        action,
        target,
        status: response.status().as_u16(),
        error: response
            .extensions()
            .get::<AuditError>()
            .map(|e| e.0.clone()),
    };
    let state = state.clone();
    let _ = tokio::task::spawn_blocking(move || state.audit.record(&entry)).await;
    response
}

/// Lets the audit layer learn who `authenticate` found.
#[derive(Clone)]
struct PrincipalSlot(Arc<Mutex<Option<Principal>>>);

async fn share_principal(request: Request, next: Next) -> Response {
    if let (Some(slot), Some(principal)) = (
        request.extensions().get::<PrincipalSlot>(),
        request.extensions().get::<Principal>(),
    ) {
        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(principal.clone());
    }
    next.run(request).await
}

/// A body over the limit is refused by axum in plain text; the API answers
/// in its error body, as the document lists.
async fn json_rejections(response: Response) -> Response {
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        return ApiError {
            field: Some("body".into()),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                format!("the body is over {MAX_BODY_BYTES} bytes"),
            )
        }
        .into_response();
    }
    response
}

async fn not_found_fallback() -> ApiError {
    ApiError::not_found("such endpoint")
}

/// The whole API.
pub fn router(state: Arc<ApiState>) -> Router {
    let authenticated = Router::new()
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route("/v1/vms/{id}", get(vms::describe).delete(vms::delete))
        .route("/v1/vms/{id}/start", post(vms::start))
        .route("/v1/vms/{id}/stop", post(vms::stop))
        .route("/v1/vms/{id}/pause", post(vms::pause))
        .route("/v1/vms/{id}/resume", post(vms::resume))
        .route("/v1/vms/{id}/snapshot", post(vms::snapshot))
        .route("/v1/vms/{id}/migrate", post(vms::migrate))
        .route("/v1/vms/{id}/console", get(console::attach))
        .route("/v1/events", get(observe::events))
        .route(
            "/v1/tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(admin::delete_token),
        )
        .route("/v1/audit", get(admin::audit_log))
        .route("/metrics", get(observe::metrics))
        .layer(axum::middleware::from_fn(share_principal))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/health", get(observe::health))
        .merge(authenticated)
        .fallback(not_found_fallback)
        .layer(axum::middleware::map_response(json_rejections))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Optional {
        count: Option<u32>,
    }

    fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ApiError> {
        parse_json(&Bytes::from(text.to_string()))
    }

    #[test]
    fn an_array_is_refused_where_an_object_is_taken() {
        let error = parse::<Option<Optional>>("[]").unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.field.as_deref(), Some("body"));
        assert!(error.message.contains("not an array"), "{}", error.message);
        assert!(parse::<Optional>("[7]").is_err());
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Numbers {
        list: Vec<u64>,
        big: Option<u64>,
    }

    #[test]
    fn whole_floats_fit_integers_inside_arrays_too_but_not_past_the_exact_range() {
        assert_eq!(
            parse::<Numbers>(r#"{"list": [1.0, 2], "big": 8.0e15}"#).unwrap(),
            Numbers {
                list: vec![1, 2],
                big: Some(8_000_000_000_000_000)
            }
        );
        // From 9e15 on, a float may not be the integer it was written as.
        let error = parse::<Numbers>(r#"{"list": [], "big": 9.0e15}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("big"));
    }

    #[test]
    fn a_query_error_names_its_field_when_axum_names_one() {
        let error = query_error("Failed to deserialize query string: limit: invalid digit");
        assert_eq!(error.field.as_deref(), Some("limit"));
        assert_eq!(error.message, "limit: invalid digit");
        let error = query_error("Failed to deserialize query string: max_items: too big");
        assert_eq!(error.field.as_deref(), Some("max_items"));
        for text in [
            "Failed to deserialize query string: duplicate field `project`",
            "Failed to deserialize query string: expected `a`: got b",
            "Failed to deserialize query string: a-b: c",
        ] {
            assert_eq!(query_error(text).field.as_deref(), Some("query"), "{text}");
        }
        assert_eq!(query_error("no colon").message, "no colon");
    }

    #[test]
    fn an_error_message_names_its_field_once() {
        let message = |error: ApiError| -> String {
            let response = error.into_response();
            response.extensions().get::<AuditError>().unwrap().0.clone()
        };
        assert_eq!(
            message(ApiError::invalid("limit", "limit: invalid digit")),
            "limit: invalid digit"
        );
        assert_eq!(
            message(ApiError::invalid("cpus", "must be 1 to 64")),
            "cpus: must be 1 to 64"
        );
        assert_eq!(message(ApiError::not_found("VM x")), "no VM x");
    }

    #[test]
    fn null_and_objects_are_taken_and_whole_floats_fit_integers() {
        assert_eq!(parse::<Option<Optional>>("null").unwrap(), None);
        assert_eq!(parse::<Optional>("{}").unwrap(), Optional::default());
        assert_eq!(
            parse::<Optional>(r#"{"count": 431.0}"#).unwrap(),
            Optional { count: Some(431) }
        );
        let error = parse::<Optional>(r#"{"count": 1.5}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("count"));
        let error = parse::<Optional>(r#"{"other": 1}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("other"));
    }
}
