//! The endpoints `cargo xtask api-fuzz` does not fuzz (migrate, console,
//! events), and token revocation, held to the OpenAPI document by hand:
//! each answer's status must be one the document lists for its operation,
//! and its body must match the schema the document gives that status.

use crate::support::{count_above, send, Daemon};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// The checked-in document (a host lib test keeps it equal to the served one).
fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../host/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Follows a local `$ref` (`#/components/schemas/Name`).
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local $ref");
            resolve(
                document,
                document
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("no {reference}")),
            )
        }
        None => schema,
    }
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        other => panic!("unknown type {other}"),
    }
}

/// The JSON Schema keywords these responses' schemas use; any other keyword
/// fails the test rather than being skipped.
fn validate(document: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(document, schema);
    let object = schema.as_object().expect("a schema object");
    for (keyword, rule) in object {
        match keyword.as_str() {
            "description" | "format" | "example" | "examples" | "default" | "title" => {}
            "type" => {
                let names: Vec<&str> = match rule {
                    Value::String(name) => vec![name],
                    Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
                    _ => panic!("bad type {rule}"),
                };
                if !names.iter().any(|name| type_matches(name, value)) {
                    return Err(format!("{at}: {value} is not {rule}"));
                }
            }
            "required" => {
                for field in rule.as_array().unwrap() {
                    let field = field.as_str().unwrap();
                    if value.is_object() && value.get(field).is_none() {
                        return Err(format!("{at}: {field} is missing"));
                    }
                }
            }
            "properties" => {
                for (field, property) in rule.as_object().unwrap() {
                    if let Some(inner) = value.get(field).filter(|_| value.is_object()) {
                        validate(document, property, inner, &format!("{at}.{field}"))?;
                    }
                }
            }
            "additionalProperties" => {
                let known = object.get("properties").and_then(Value::as_object);
                for (field, inner) in value.as_object().into_iter().flatten() {
                    if known.is_some_and(|known| known.contains_key(field)) {
                        continue;
                    }
                    match rule {
                        Value::Bool(false) => return Err(format!("{at}: unexpected {field}")),
                        Value::Bool(true) => {}
                        _ => validate(document, rule, inner, &format!("{at}.{field}"))?,
                    }
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    validate(document, rule, item, &format!("{at}[{i}]"))?;
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(value) {
                    return Err(format!("{at}: {value} is not one of {rule}"));
                }
            }
            "minimum" => {
                if value.as_f64().is_some_and(|v| v < rule.as_f64().unwrap()) {
                    return Err(format!("{at}: {value} < {rule}"));
                }
            }
            "maximum" => {
                if value.as_f64().is_some_and(|v| v > rule.as_f64().unwrap()) {
                    return Err(format!("{at}: {value} > {rule}"));
                }
            }
            "oneOf" => {
                let matching = rule
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|branch| validate(document, branch, value, at).is_ok())
                    .count();
                if matching != 1 {
                    return Err(format!("{at}: {value} matches {matching} of oneOf {rule}"));
                }
            }
            "allOf" => {
                for branch in rule.as_array().unwrap() {
                    validate(document, branch, value, at)?;
                }
            }
            other => panic!("{at}: the schema keyword {other} is not checked here"),
        }
    }
    Ok(())
}

/// The document's promise for `method path_template` answering `status`:
/// the status must be listed, the content type must be the one listed (or
/// none when none is), and a JSON body must match the listed schema.
fn conforms(
    method: &str,
    template: &str,
    status: StatusCode,
    content_type: Option<&str>,
    body: &str,
) {
    let document = document();
    let operation = &document["paths"][template][method];
    assert!(
        operation.is_object(),
        "no {method} {template} in the document"
    );
    let response = operation["responses"]
        .get(status.as_str())
        .unwrap_or_else(|| {
            panic!(
                "{method} {template} answered {status}, which the document does not list: {:?}; body {body}",
                operation["responses"].as_object().unwrap().keys().collect::<Vec<_>>()
            )
        });
    let response = resolve(&document, response);
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            body.is_empty(),
            "{method} {template} {status}: the document lists no body, got {body}"
        );
        return;
    };
    let content_type = content_type.unwrap_or_else(|| {
        panic!("{method} {template} {status}: no Content-Type; the document lists {content:?}")
    });
    let media = content_type.split(';').next().unwrap().trim();
    let listed = content.get(media).unwrap_or_else(|| {
        panic!(
            "{method} {template} {status}: Content-Type {content_type} is not among {:?}",
            content.keys().collect::<Vec<_>>()
        )
    });
    if let Some(schema) = listed.get("schema") {
        let value: Value = serde_json::from_str(body).unwrap_or_else(|e| {
            panic!("{method} {template} {status}: the body is not JSON ({e}): {body}")
        });
        if let Err(e) = validate(&document, schema, &value, "body") {
            panic!("{method} {template} {status}: {e}\nbody: {body}");
        }
    }
}

/// One plain HTTP call over the daemon's socket: status, content type, body.
fn raw(
    daemon: &Daemon,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    daemon.block_on(async {
        use http_body_util::BodyExt;
        let stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bulkhead");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.unwrap_or("").to_string(),
            )))
            .unwrap();
        let response = send(stream, request).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return (status, content_type, String::new());
        }
        let bytes = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
            .await
            .expect("the whole body within 60 s")
            .unwrap()
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    })
}

/// Calls `method template` (as `path`) and checks the answer against the
/// document; returns it.
#[allow(clippy::too_many_arguments)]
fn checked(
    daemon: &Daemon,
    token: Option<&str>,
    method: Method,
    template: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
    expected: StatusCode,
) -> String {
    let (status, content_type, text) = raw(daemon, token, method.clone(), path, body, headers);
    assert_eq!(status, expected, "{method} {path}: {text}");
    conforms(
        &method.as_str().to_lowercase(),
        template,
        status,
        content_type.as_deref(),
        &text,
    );
    text
}

const MIGRATE: &str = "/v1/vms/{id}/migrate";
const CONSOLE: &str = "/v1/vms/{id}/console";
const UPGRADE: [(&str, &str); 2] = [("connection", "upgrade"), ("upgrade", "bulkhead-console")];

#[test]
fn migrate_answers_only_what_its_document_lists() {
    let daemon = Daemon::start();
    let viewer = daemon.token("default", "viewer");
    let source = daemon.running_vm("conf-source");
    let path = format!("/v1/vms/{source}/migrate");
    let call = |token: Option<&str>, path: &str, body: &str, expected: StatusCode| {
        checked(
            &daemon,
            token,
            Method::POST,
            MIGRATE,
            path,
            Some(body),
            &[],
            expected,
        )
    };
    // Refusals: the body's shape, the address, the caller, the VM.
    for body in [
        "{",
        "{}",
        r#"{"uri": "tcp:127.0.0.1:1", "surprise": 1}"#,
        r#"{"uri": "unix:/tmp/x"}"#,
        r#"{"uri": "tcp:localhost:4000"}"#,
        r#"{"uri": "tcp:127.0.0.1:0"}"#,
        // Off loopback without migration TLS.
        r#"{"uri": "tcp:192.0.2.1:4000"}"#,
    ] {
        call(None, &path, body, StatusCode::BAD_REQUEST);
    }
    // Over the body limit.
    let big = json!({"uri": "tcp:127.0.0.1:1", "pad": "x".repeat(70_000)}).to_string();
    call(None, &path, &big, StatusCode::PAYLOAD_TOO_LARGE);
    call(
        Some("bh_nope.nope"),
        &path,
        r#"{"uri": "tcp:127.0.0.1:1"}"#,
        StatusCode::UNAUTHORIZED,
    );
    call(
        Some(&viewer),
        &path,
        r#"{"uri": "tcp:127.0.0.1:1"}"#,
        StatusCode::FORBIDDEN,
    );
    call(
        None,
        "/v1/vms/0123456789abcdef/migrate",
        r#"{"uri": "tcp:127.0.0.1:1"}"#,
        StatusCode::NOT_FOUND,
    );
    // A defined VM that does not run cannot migrate.
    let idle = daemon.ok(Method::POST, "/v1/vms", Some(json!({"name": "conf-idle"})));
    let idle = idle["id"].as_str().unwrap();
    call(
        None,
        &format!("/v1/vms/{idle}/migrate"),
        r#"{"uri": "tcp:127.0.0.1:1"}"#,
        StatusCode::CONFLICT,
    );
    // Nothing listens there: the migration fails and the VM runs on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let failed = call(
        None,
        &path,
        &json!({"uri": format!("tcp:127.0.0.1:{port}"), "give_up_after_secs": 5}).to_string(),
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert!(failed.contains("keeps running here"), "{failed}");
    assert_eq!(daemon.vm(&source)["state"], "running");

    // And one that completes, into a VM waiting for it.
    let destination = daemon.define_vm("conf-destination", &daemon.counting_guest());
    let uri = format!("tcp:127.0.0.1:{}", crate::support::free_port());
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{destination}/start"),
        Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
    );
    let report = call(
        None,
        &path,
        &json!({"uri": uri, "verify_memory": true}).to_string(),
        StatusCode::OK,
    );
    let report: Value = serde_json::from_str(&report).unwrap();
    assert!(report["memory_crc"].is_u64(), "{report}");
    daemon.wait_state(&destination, "running");
    // Migrated away: the source no longer runs.
    daemon.wait_state(&source, "stopped");
    call(
        None,
        &path,
        &json!({"uri": uri}).to_string(),
        StatusCode::CONFLICT,
    );
}

#[test]
fn the_console_answers_only_what_its_document_lists() {
    let daemon = Daemon::start();
    let viewer = daemon.token("default", "viewer");
    let id = daemon.running_vm("conf-console");
    let path = format!("/v1/vms/{id}/console");
    let call = |token: Option<&str>, path: &str, headers: &[(&str, &str)], expected| {
        checked(
            &daemon,
            token,
            Method::GET,
            CONSOLE,
            path,
            None,
            headers,
            expected,
        )
    };
    // No upgrade asked for, or another protocol.
    call(None, &path, &[], StatusCode::BAD_REQUEST);
    call(
        None,
        &path,
        &[("connection", "upgrade"), ("upgrade", "websocket")],
        StatusCode::BAD_REQUEST,
    );
    // A query that does not parse.
    call(
        None,
        &format!("{path}?write=maybe"),
        &UPGRADE,
        StatusCode::BAD_REQUEST,
    );
    call(
        Some("bh_nope.nope"),
        &path,
        &UPGRADE,
        StatusCode::UNAUTHORIZED,
    );
    // A viewer reads but may not write.
    call(
        Some(&viewer),
        &format!("{path}?write=true"),
        &UPGRADE,
        StatusCode::FORBIDDEN,
    );
    call(
        None,
        "/v1/vms/0123456789abcdef/console",
        &UPGRADE,
        StatusCode::NOT_FOUND,
    );
    // Upgraded, through the client the CLI uses, and the guest is there.
    let client = daemon.client(Some(&viewer));
    let mut console = daemon.block_on(client.console(&id, false)).unwrap();
    count_above(&daemon, &mut console, -1);
    call(
        Some(&viewer),
        &path,
        &UPGRADE,
        StatusCode::SWITCHING_PROTOCOLS,
    );
    // One writer at a time.
    let writer = daemon
        .block_on(daemon.client(None).console(&id, true))
        .unwrap();
    call(
        None,
        &format!("{path}?write=true"),
        &UPGRADE,
        StatusCode::CONFLICT,
    );
    drop(writer);
    // A VM that does not run has no console.
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    call(None, &path, &UPGRADE, StatusCode::CONFLICT);
}

#[test]
fn events_and_token_revocation_answer_only_what_their_document_lists() {
    let daemon = Daemon::start();
    let admin = daemon.token("conf", "admin");
    let operator = daemon.token("conf", "operator");
    // Unauthenticated: 401 with the error body.
    checked(
        &daemon,
        Some("bh_nope.nope"),
        Method::GET,
        "/v1/events",
        "/v1/events",
        None,
        &[],
        StatusCode::UNAUTHORIZED,
    );
    // The stream: its type is the documented one and each `state` event's
    // data is an Event.
    let events = daemon.block_on(async {
        let stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let request = hyper::Request::get("/v1/events")
            .header("host", "x")
            .header("authorization", format!("Bearer {admin}"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        send(stream, request).await
    });
    let status = events.status();
    let content_type = events.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    conforms("get", "/v1/events", status, Some(&content_type), "");
    assert_eq!(status, StatusCode::OK);
    let created = daemon.call(
        Some(&admin),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "conf-events"})),
    );
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_string();
    daemon.ok(Method::DELETE, &format!("/v1/vms/{id}"), None);
    let text = crate::support::read_events_until(&daemon, events.into_body(), "\"deleted\"");
    let document = document();
    let event_schema = json!({"$ref": "#/components/schemas/Event"});
    let mut seen = 0;
    for block in text.split("\n\n").filter(|b| b.contains("event: state")) {
        let data = block
            .lines()
            .find_map(|line| line.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("a state event without data: {block}"));
        let event: Value = serde_json::from_str(data).unwrap();
        validate(&document, &event_schema, &event, "event").unwrap();
        assert_eq!(event["vm"], id.as_str(), "{event}");
        seen += 1;
    }
    assert!(seen >= 1, "no state event: {text}");

    // Token revocation.
    let revoke = |token: Option<&str>, id: &str, expected| {
        checked(
            &daemon,
            token,
            Method::DELETE,
            "/v1/tokens/{id}",
            &format!("/v1/tokens/{id}"),
            None,
            &[],
            expected,
        )
    };
    let victim = daemon.call(
        Some(&admin),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "victim", "role": "viewer"})),
    );
    assert_eq!(victim.status, StatusCode::CREATED, "{}", victim.text);
    let (victim_id, victim_secret) = (
        victim.body["record"]["id"].as_str().unwrap().to_string(),
        victim.body["token"].as_str().unwrap().to_string(),
    );
    let other = daemon.token("elsewhere", "viewer");
    let tokens = daemon.ok(Method::GET, "/v1/tokens", None);
    let other_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["project"] == "elsewhere")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    revoke(Some("bh_nope.nope"), &victim_id, StatusCode::UNAUTHORIZED);
    revoke(Some(&operator), &victim_id, StatusCode::FORBIDDEN);
    // Another project's token is not there for this project's admin.
    revoke(Some(&admin), &other_id, StatusCode::NOT_FOUND);
    revoke(Some(&admin), "no-such-token", StatusCode::NOT_FOUND);
    revoke(Some(&admin), &victim_id, StatusCode::NO_CONTENT);
    revoke(Some(&admin), &victim_id, StatusCode::NOT_FOUND);
    // The revoked token opens nothing any more.
    checked(
        &daemon,
        Some(&victim_secret),
        Method::GET,
        "/v1/events",
        "/v1/events",
        None,
        &[],
        StatusCode::UNAUTHORIZED,
    );
    // The other project's token still works.
    let still = daemon.call(Some(&other), Method::GET, "/v1/vms", None);
    assert_eq!(still.status, StatusCode::OK);
}

/// The checker itself refuses what it must: an undocumented status, a body
/// off its schema, a wrong content type.
#[test]
fn the_conformance_check_refuses_answers_off_the_document() {
    let error = r#"{"error":{"code":"x","message":"y"}}"#;
    let json = Some("application/json");
    conforms("post", MIGRATE, StatusCode::CONFLICT, json, error);
    for (status, content_type, body) in [
        (StatusCode::IM_A_TEAPOT, json, error),
        (StatusCode::CONFLICT, json, r#"{"error":{"code":"x"}}"#),
        (
            StatusCode::CONFLICT,
            json,
            r#"{"error":{"code":1,"message":"y"}}"#,
        ),
        (StatusCode::CONFLICT, Some("text/plain"), error),
        (StatusCode::OK, json, r#"{"total_ms": 1.5}"#),
    ] {
        let refused = std::panic::catch_unwind(|| {
            conforms("post", MIGRATE, status, content_type, body);
        });
        assert!(refused.is_err(), "{status} {content_type:?} {body} passed");
    }
}
