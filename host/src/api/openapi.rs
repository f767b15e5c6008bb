//! The OpenAPI document, generated from the handlers and types. A copy is
//! checked in (`host/openapi.json`); a test fails when the two differ.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
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
        super::ErrorBody, super::ErrorDetail,
    )),
    modifiers(&BearerAuth),
    tags((name = "vms", description = "VM lifecycle"),
         (name = "access", description = "Tokens and the audit log"),
         (name = "monitoring", description = "Metrics, events, health")),
)]
pub struct ApiDoc;

/// The document as served and as checked in.
pub fn json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "monitoring",
    responses((status = 200, description = "This document")))]
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
