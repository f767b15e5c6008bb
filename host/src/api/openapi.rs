//! The OpenAPI document, generated from the handlers and types. A copy is
//! checked in (`host/openapi.json`); a test fails when the two differ.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::header::Header;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What every operation can answer besides its own responses, so that the
/// document lists each status the API gives: 401 (no or a bad token) on
/// every authenticated operation, 503 when the daemon sheds load (any
/// operation), 400 for a query string that does not parse, 413 for a body
/// over the limit.
struct CommonResponses;

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    )
}

fn operations(openapi: &mut utoipa::openapi::OpenApi) -> impl Iterator<Item = &mut Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ]
        .into_iter()
        .flatten()
    })
}

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for operation in operations(openapi) {
            let responses = &mut operation.responses.responses;
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                let mut challenge = Header::new(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String),
                );
                challenge.description = Some("`Bearer`".into());
                responses.entry("401".into()).or_insert_with(|| {
                    error_response("No token, a malformed one, or an unknown or revoked one")
                        .header("WWW-Authenticate", challenge)
                        .build()
                        .into()
                });
            }
            if operation
                .parameters
                .iter()
                .flatten()
                .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Query)
            {
                responses.entry("400".into()).or_insert_with(|| {
                    error_response("The query string does not fit")
                        .build()
                        .into()
                });
            }
            if operation.request_body.is_some() {
                responses
                    .entry("413".into())
                    .or_insert_with(|| error_response("The body is over 64 KiB").build().into());
            }
            responses.entry("503".into()).or_insert_with(|| {
                error_response("Overloaded: too many requests in progress; retry shortly")
                    .build()
                    .into()
            });
        }
    }
}

/// OpenAPI links: which later calls take an id from an answer. Clients may
/// follow them; schemathesis' stateful phase does (define a VM, then start,
/// pause, snapshot, stop, delete that VM; create a token, then revoke it).
struct Links;

/// Operations on one VM, by the id of a VM in an answer.
const VM_OPERATIONS: &[&str] = &[
    "describe", "delete", "start", "stop", "pause", "resume", "snapshot", "migrate", "attach",
];

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let sources: [(&str, &str, &[&str], &str); 7] = [
            ("create", "201", VM_OPERATIONS, "$response.body#/id"),
            ("describe", "200", VM_OPERATIONS, "$response.body#/id"),
            ("start", "200", VM_OPERATIONS, "$response.body#/id"),
            ("stop", "200", VM_OPERATIONS, "$response.body#/id"),
            ("pause", "200", VM_OPERATIONS, "$response.body#/id"),
            ("resume", "200", VM_OPERATIONS, "$response.body#/id"),
            (
                "create_token",
                "201",
                &["delete_token"],
                "$response.body#/record/id",
            ),
        ];
        for operation in operations(openapi) {
            let Some(id) = operation.operation_id.clone() else {
                continue;
            };
            for (source, status, targets, value) in sources {
                if id != source {
                    continue;
                }
                let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) else {
                    continue;
                };
                let response: &mut Response = response;
                for target in targets {
                    response.links.insert(
                        target.to_string(),
                        RefOr::T(
                            LinkBuilder::new()
                                .operation_id(*target)
                                .parameter("id", value)
                                .build(),
                        ),
                    );
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bulkhead host API", version = "1",
         description = "One host's VMs: define, run, watch and control them. \
                        Tokens are sent as `Authorization: Bearer <token>`; root on the \
                        daemon's Unix socket needs none."),
    paths(
        super::vms::list, super::vms::create, super::vms::describe, super::vms::delete,
        super::vms::start, super::vms::stop, super::vms::pause, super::vms::resume,
        super::vms::snapshot, super::vms::migrate, super::console::attach,
        super::admin::create_token, super::admin::list_tokens, super::admin::delete_token,
        super::admin::audit_log,
        super::observe::events, super::observe::metrics, super::observe::health,
        document,
    ),
    components(schemas(
        crate::spec::VmSpec, crate::spec::DiskSpec, crate::spec::NicSpec, crate::spec::VsockSpec,
        crate::model::VmRecord, crate::model::VmState, crate::events::Event,
        crate::auth::Role, crate::auth::TokenRecord, crate::audit::AuditEntry,
        super::ErrorBody, super::ErrorDetail, super::vms::MigrationReport,
        super::vms::SnapshotReport, super::observe::Health,
    )),
    modifiers(&BearerAuth, &CommonResponses, &Links),
    tags((name = "vms", description = "VM lifecycle"),
         (name = "access", description = "Tokens and the audit log"),
         (name = "monitoring", description = "Metrics, events, health")),
)]
pub struct ApiDoc;

/// The document as served and as checked in.
pub fn json() -> String {
    let text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    // utoipa 5.5 writes a Link object's fields in snake case; OpenAPI names
    // them `operationId` and `requestBody`. No other object has these keys
    // (operations' own are camel case), and a key is a line's first token.
    let mut text = text
        .lines()
        .map(|line| {
            let key = line.trim_start();
            let indent = &line[..line.len() - key.len()];
            if let Some(rest) = key.strip_prefix("\"operation_id\": ") {
                format!("{indent}\"operationId\": {rest}")
            } else if let Some(rest) = key.strip_prefix("\"request_body\": ") {
                format!("{indent}\"requestBody\": {rest}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "monitoring",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}

#[cfg(test)]
mod tests {
    /// The checked-in copy is what clients and the property tests read.
    /// Regenerate it with `BULKHEAD_UPDATE_OPENAPI=1 cargo test -p host openapi`.
    #[test]
    fn openapi_document_matches_the_checked_in_copy() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let generated = super::json();
        if std::env::var_os("BULKHEAD_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "host/openapi.json is out of date: run BULKHEAD_UPDATE_OPENAPI=1 cargo test -p host openapi"
        );
    }
}
