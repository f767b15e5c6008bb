//! The API's handlers, without KVM or a listener: requests go straight into
//! the router as a connection would hand them over (with its peer), and the
//! manager behind it runs the stand-in VMM (`support/fake_vmm.rs`). What
//! each answer's status, code, field and body are; who may do what; what
//! the audit log keeps.

mod support;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use host::api::{ApiState, Peer};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use testkit::TempDir;
use tower::ServiceExt;

struct Api {
    _dir: TempDir,
    state: Arc<ApiState>,
}

/// Who calls: the host's administrator on the Unix socket, a local user
/// who is not, a token over TCP, or nobody over TCP.
#[derive(Clone)]
enum Caller {
    Root,
    LocalUser,
    Token(String),
    Anonymous,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Answer {
    /// The error's code and field, checking the error body's shape.
    fn error(&self) -> (&str, Option<&str>) {
        let error = &self.body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        (error["code"].as_str().unwrap(), error["field"].as_str())
    }
}

impl Api {
    fn new() -> Api {
        let dir = TempDir::new("api");
        let (manager, _) = support::open(&dir);
        let state = Arc::new(ApiState {
            manager,
            audit: host::audit::AuditLog::open(&dir.join("audit.log")).unwrap(),
            events: host::events::EventBus::default(),
            console_writers: Default::default(),
            daemon_uid: 0,
            migration_tls: None,
        });
        Api { _dir: dir, state }
    }

    async fn call(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        request = match caller {
            Caller::Root => request.extension(Peer::Local { uid: 0 }),
            Caller::LocalUser => request.extension(Peer::Local { uid: 4242 }),
            Caller::Token(token) => request
                .extension(Peer::Remote)
                .header(header::AUTHORIZATION, format!("Bearer {token}")),
            Caller::Anonymous => request.extension(Peer::Remote),
        };
        let body = match body {
            Some(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        let response = host::api::router(self.state.clone())
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, caller: &Caller, path: &str, body: Value) -> Answer {
        self.call(caller, Method::POST, path, Some(body)).await
    }

    async fn token(&self, name: &str, role: &str, project: &str) -> Caller {
        let made = self
            .call(
                &Caller::Root,
                Method::POST,
                "/v1/tokens",
                Some(json!({"name": name, "role": role, "project": project})),
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
        assert_eq!(
            made.body["record"]["secret_sha256"].as_str().map(str::len),
            Some(64)
        );
        Caller::Token(made.body["token"].as_str().unwrap().to_string())
    }

    /// Defines a VM in `project` whose fake VMM behaves as `behaviour` says.
    async fn define(&self, project: &str, name: &str, behaviour: &str) -> String {
        let made = self
            .call(
                &Caller::Root,
                Method::POST,
                &format!("/v1/vms?project={project}"),
                Some(serde_json::to_value(support::spec(name, behaviour)).unwrap()),
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
        assert_eq!(made.body["state"], "stopped");
        assert_eq!(made.body["project"], project);
        made.body["id"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_has_its_status_code_and_field() {
    let api = Api::new();
    let root = Caller::Root;
    let id = api.define("p", "web", "").await;
    let start = format!("/v1/vms/{id}/start");
    let expect = |answer: Answer, status: StatusCode, code: &str, field: Option<&str>| {
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(answer.error(), (code, field), "{}", answer.body);
    };
    // A bad spec names its field.
    let bad = json!({"name": "x", "cpus": 0});
    let answer = api.call(&root, Method::POST, "/v1/vms", Some(bad)).await;
    expect(
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("cpus"),
    );
    let answer = api
        .post(&root, "/v1/vms", json!({"name": "x", "cpu": 1}))
        .await;
    expect(
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("cpu"),
    );
    // Start's body: one origin, its fields together, an address not a name.
    for (body, field) in [
        (
            json!({"restore": "a", "incoming": "tcp:127.0.0.1:1"}),
            "restore",
        ),
        (json!({"restore": "A/.."}), "restore"),
        (json!({"incoming_from": "127.0.0.1"}), "incoming_from"),
        (json!({"incoming_timeout_secs": 5}), "incoming_from"),
        (
            json!({"incoming": "tcp:localhost:1", "incoming_from": "127.0.0.1"}),
            "incoming",
        ),
        (
            json!({"incoming": "tcp:127.0.0.1:0", "incoming_from": "127.0.0.1"}),
            "incoming",
        ),
        (json!({"incoming": "tcp:127.0.0.1:1"}), "incoming_from"),
        // Without migration TLS, only loopback.
        (
            json!({"incoming": "tcp:127.0.0.1:1", "incoming_from": "192.0.2.1"}),
            "incoming_from",
        ),
        (
            json!({"incoming": "tcp:127.0.0.1:1", "incoming_from": "127.0.0.1",
                   "incoming_timeout_secs": 0}),
            "incoming_timeout_secs",
        ),
        (
            json!({"incoming": "tcp:127.0.0.1:1", "incoming_from": "127.0.0.1",
                   "incoming_timeout_secs": 86_401}),
            "incoming_timeout_secs",
        ),
    ] {
        let answer = api
            .call(&root, Method::POST, &start, Some(body.clone()))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            answer.body
        );
        assert_eq!(answer.error().1, Some(field), "{body}: {}", answer.body);
    }
    let answer = api
        .post(
            &root,
            &format!("/v1/vms/{id}/stop"),
            json!({"timeout_secs": 601}),
        )
        .await;
    expect(
        answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("timeout_secs"),
    );
    for (uri, field) in [("tcp:example.org:7", "uri"), ("tcp:192.0.2.1:7", "uri")] {
        let answer = api
            .post(&root, &format!("/v1/vms/{id}/migrate"), json!({"uri": uri}))
            .await;
        expect(
            answer,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some(field),
        );
    }
    // Nothing was started by any of that.
    let described = api
        .call(&root, Method::GET, &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(described.body["state"], "stopped");
    // An illegal transition conflicts.
    let answer = api
        .call(&root, Method::POST, &format!("/v1/vms/{id}/pause"), None)
        .await;
    expect(answer, StatusCode::CONFLICT, "conflict", None);
    // A VMM that fails: 422, with its reason.
    let broken = api.define("p", "broken", "fake.fail-at-start").await;
    let answer = api
        .call(
            &root,
            Method::POST,
            &format!("/v1/vms/{broken}/start"),
            None,
        )
        .await;
    assert!(answer.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("told to fail at start"));
    expect(answer, StatusCode::UNPROCESSABLE_ENTITY, "failed", None);
    // A failed migration: 422, saying only that it failed.
    let answer = api.call(&root, Method::POST, &start, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let answer = api
        .post(
            &root,
            &format!("/v1/vms/{id}/migrate"),
            json!({"uri": "tcp:127.0.0.1:9"}),
        )
        .await;
    assert!(
        !answer.body.to_string().contains("SECRET"),
        "{}",
        answer.body
    );
    expect(answer, StatusCode::UNPROCESSABLE_ENTITY, "failed", None);
    // Unknown VMs, malformed ids and unknown endpoints: 404.
    for path in ["/v1/vms/0123456789abcdef", "/v1/vms/..", "/v1/nothing"] {
        let answer = api.call(&root, Method::GET, path, None).await;
        expect(answer, StatusCode::NOT_FOUND, "not_found", None);
    }
    let answer = api
        .call(&root, Method::DELETE, &format!("/v1/vms/{id}"), None)
        .await;
    expect(answer, StatusCode::CONFLICT, "conflict", None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lifecycle_answers_with_the_record_and_the_vmms_live_view() {
    let api = Api::new();
    let root = Caller::Root;
    let id = api.define("p", "web", "").await;
    let path = |action: &str| format!("/v1/vms/{id}/{action}");
    let described = api
        .call(&root, Method::GET, &format!("/v1/vms/{id}"), None)
        .await;
    assert!(described.body.get("live").is_none(), "{}", described.body);
    for (action, state) in [
        ("start", "running"),
        ("pause", "paused"),
        ("resume", "running"),
    ] {
        let answer = api.call(&root, Method::POST, &path(action), None).await;
        assert_eq!(answer.status, StatusCode::OK, "{action}: {}", answer.body);
        assert_eq!(answer.body["state"], state, "{action}");
    }
    let described = api
        .call(&root, Method::GET, &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(described.body["live"]["state"], "running");
    assert_eq!(described.body["live"]["pid"], described.body["pid"]);
    let snapshot = api
        .post(&root, &path("snapshot"), json!({"name": "one"}))
        .await;
    assert_eq!(snapshot.status, StatusCode::OK, "{}", snapshot.body);
    assert_eq!(snapshot.body["path"], "/snapshots/one");
    let stopped = api
        .post(&root, &path("stop"), json!({"timeout_secs": 5}))
        .await;
    assert_eq!(stopped.body["state"], "stopped");
    assert_eq!(stopped.body["last_exit"], "guest powered off");
    let restored = api
        .post(&root, &path("start"), json!({"restore": "one"}))
        .await;
    assert_eq!(restored.body["state"], "running", "{}", restored.body);
    // `null` and an empty body are the defaults; force kills at once.
    let stopped = api.post(&root, &path("stop"), json!({"force": true})).await;
    assert_eq!(
        stopped.body["last_exit"],
        "stopped by the host (VMM killed)"
    );
    let started = api
        .call(&root, Method::POST, &path("start"), Some(Value::Null))
        .await;
    assert_eq!(started.body["state"], "running", "{}", started.body);
    let deleted = api
        .call(
            &root,
            Method::DELETE,
            &format!("/v1/vms/{id}?force=true"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.body, Value::Null);
    let gone = api
        .call(&root, Method::GET, &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let list = api.call(&root, Method::GET, "/v1/vms", None).await;
    assert_eq!(list.body, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_sees_only_its_project_and_acts_only_as_its_role_allows() {
    let api = Api::new();
    let ours = api.define("a", "ours", "").await;
    let theirs = api.define("b", "theirs", "").await;
    let viewer = api.token("look", "viewer", "a").await;
    let operator = api.token("act", "operator", "a").await;
    let admin = api.token("boss", "admin", "a").await;
    let ids = |answer: &Answer| -> Vec<String> {
        answer
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = api.call(&viewer, Method::GET, "/v1/vms", None).await;
    assert_eq!(ids(&listed), std::slice::from_ref(&ours));
    let all = api.call(&Caller::Root, Method::GET, "/v1/vms", None).await;
    assert_eq!(all.body.as_array().unwrap().len(), 2);
    // Another project's VM does not exist for the caller, whatever it tries.
    for (method, path) in [
        (Method::GET, format!("/v1/vms/{theirs}")),
        (Method::POST, format!("/v1/vms/{theirs}/start")),
        (Method::DELETE, format!("/v1/vms/{theirs}?force=true")),
    ] {
        let answer = api.call(&operator, method, &path, None).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
    }
    // Roles: a viewer reads, an operator acts, an admin manages tokens.
    let refused = api
        .call(
            &viewer,
            Method::POST,
            &format!("/v1/vms/{ours}/start"),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.error().0, "forbidden");
    let started = api
        .call(
            &operator,
            Method::POST,
            &format!("/v1/vms/{ours}/start"),
            None,
        )
        .await;
    assert_eq!(started.body["state"], "running", "{}", started.body);
    let refused = api.call(&operator, Method::GET, "/v1/tokens", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let refused = api.call(&operator, Method::GET, "/v1/audit", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let tokens = api.call(&admin, Method::GET, "/v1/tokens", None).await;
    assert_eq!(tokens.body.as_array().unwrap().len(), 3);
    assert!(tokens
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["secret_sha256"] == ""));
    // A token's project is its own: naming another is refused.
    let elsewhere = api
        .post(
            &operator,
            "/v1/vms?project=b",
            serde_json::to_value(support::spec("x", "")).unwrap(),
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    let elsewhere = api
        .post(
            &admin,
            "/v1/tokens",
            json!({"name": "n", "role": "admin", "project": "b"}),
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    let made = api
        .post(
            &operator,
            "/v1/vms",
            serde_json::to_value(support::spec("mine", "")).unwrap(),
        )
        .await;
    assert_eq!(made.body["project"], "a");
    // Without a token: only the host's administrator on the Unix socket.
    for caller in [
        Caller::Anonymous,
        Caller::LocalUser,
        Caller::Token("bh_nonsense".into()),
    ] {
        let answer = api.call(&caller, Method::GET, "/v1/vms", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    // A revoked token is refused from then on.
    let listed = api
        .call(&Caller::Root, Method::GET, "/v1/tokens", None)
        .await;
    let look = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "look")
        .unwrap();
    let revoked = api
        .call(
            &admin,
            Method::DELETE,
            &format!("/v1/tokens/{}", look["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let answer = api.call(&viewer, Method::GET, "/v1/vms", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let health = api
        .call(&Caller::Anonymous, Method::GET, "/v1/health", None)
        .await;
    assert_eq!(health.body["ok"], true);
    api.call(
        &Caller::Root,
        Method::DELETE,
        &format!("/v1/vms/{ours}?force=true"),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_keeps_every_mutating_call_with_who_and_how_it_ended() {
    let api = Api::new();
    let id = api.define("a", "web", "").await;
    let viewer = api.token("look", "viewer", "a").await;
    let admin = api.token("boss", "admin", "a").await;
    api.call(&viewer, Method::POST, &format!("/v1/vms/{id}/start"), None)
        .await;
    api.call(
        &Caller::Anonymous,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        None,
    )
    .await;
    api.call(&Caller::Root, Method::GET, "/v1/vms", None).await;
    let log = api
        .call(&Caller::Root, Method::GET, "/v1/audit", None)
        .await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.body);
    let entries = log.body.as_array().unwrap();
    let kind = |who: &Value| {
        who.as_str()
            .unwrap()
            .split([':', '('])
            .next()
            .unwrap()
            .to_string()
    };
    let summary: Vec<(String, String, u64)> = entries
        .iter()
        .map(|e| {
            let action = e["action"].as_str().unwrap().to_string();
            (kind(&e["who"]), action, e["status"].as_u64().unwrap())
        })
        .collect();
    let entry =
        |who: &str, action: &str, status: u64| (who.to_string(), action.to_string(), status);
    // Reads are not kept; refusals are.
    assert_eq!(
        summary,
        [
            entry("local", "POST /v1/vms", 201),
            entry("local", "POST /v1/tokens", 201),
            entry("local", "POST /v1/tokens", 201),
            entry("token", "POST /v1/vms/{id}/start", 403),
            entry("anonymous", "POST /v1/vms/{id}/stop", 401),
        ]
    );
    assert_eq!(entries[3]["target"], id.as_str());
    assert!(entries[3]["error"].as_str().unwrap().contains("operator"));
    let limited = api
        .call(&Caller::Root, Method::GET, "/v1/audit?limit=2", None)
        .await;
    assert_eq!(limited.body.as_array().unwrap().len(), 2);
    assert_eq!(limited.body[1]["action"], "POST /v1/vms/{id}/stop");
    // A project's admin reads its project's entries only.
    let own = api.call(&admin, Method::GET, "/v1/audit", None).await;
    let own = own.body.as_array().unwrap();
    assert!(own.iter().all(|e| e["project"] == "a"), "{own:?}");
    assert_eq!(own.len(), 3, "{own:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_each_visible_vm() {
    let api = Api::new();
    let ours = api.define("a", "ours", "").await;
    let theirs = api.define("b", "theirs", "").await;
    api.call(
        &Caller::Root,
        Method::POST,
        &format!("/v1/vms/{ours}/start"),
        None,
    )
    .await;
    let viewer = api.token("look", "viewer", "a").await;
    let metrics = api.call(&viewer, Method::GET, "/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().unwrap().to_string();
    assert!(text.contains(&ours), "{text}");
    assert!(!text.contains(&theirs), "{text}");
    api.call(
        &Caller::Root,
        Method::DELETE,
        &format!("/v1/vms/{ours}?force=true"),
        None,
    )
    .await;
}
