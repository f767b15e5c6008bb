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
/// who is not, a token over TCP, or nobody over TCP; or any Authorization
/// header, from TCP or from the administrator's Unix socket.
#[derive(Clone)]
enum Caller {
    Root,
    LocalUser,
    Token(String),
    Anonymous,
    Header(String),
    RootWithHeader(String),
}

/// The uid of `Caller::LocalUser`.
const LOCAL_USER_UID: u32 = 4242;

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
        Api::with_daemon_uid(0)
    }

    /// The API of a daemon running as `daemon_uid`.
    fn with_daemon_uid(daemon_uid: u32) -> Api {
        let dir = TempDir::new("api");
        let (manager, events) = support::open(&dir);
        let state = Arc::new(ApiState {
            manager,
            audit: host::audit::AuditLog::open(&dir.join("audit.log")).unwrap(),
            events,
            console_writers: Default::default(),
            daemon_uid,
            migration_tls: None,
        });
        Api { _dir: dir, state }
    }

    /// The API on a loopback listener, every connection the host
    /// administrator's (a token in a request stands for itself): for what
    /// needs a real connection, the console's upgrade.
    async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app =
            host::api::router(self.state.clone()).layer(axum::Extension(Peer::Local { uid: 0 }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    async fn call(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let body = body.map(|value| value.to_string().into_bytes());
        self.call_with_bytes(caller, method, path, body).await
    }

    /// A call whose body is any bytes, sent as JSON.
    async fn call_with_bytes(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        request = match caller {
            Caller::Root => request.extension(Peer::Local { uid: 0 }),
            Caller::LocalUser => request.extension(Peer::Local {
                uid: LOCAL_USER_UID,
            }),
            Caller::Token(token) => request
                .extension(Peer::Remote)
                .header(header::AUTHORIZATION, format!("Bearer {token}")),
            Caller::Anonymous => request.extension(Peer::Remote),
            Caller::Header(value) => request
                .extension(Peer::Remote)
                .header(header::AUTHORIZATION, value),
            Caller::RootWithHeader(value) => request
                .extension(Peer::Local { uid: 0 })
                .header(header::AUTHORIZATION, value),
        };
        let body = match body {
            Some(bytes) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(bytes)
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

    /// Waits (up to 5 s) until VM `id` is in `state`.
    async fn wait_for_state(&self, id: &str, state: &str) {
        let path = format!("/v1/vms/{id}");
        for _ in 0..100 {
            let described = self.call(&Caller::Root, Method::GET, &path, None).await;
            if described.body["state"] == state {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("VM {id} is not {state} after 5 s");
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
    // Naming its own project is fine.
    let made = api
        .post(
            &operator,
            "/v1/vms?project=a",
            serde_json::to_value(support::spec("named", "")).unwrap(),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
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

/// The token with the last digit of its secret changed.
fn wrong_secret(token: &str) -> String {
    let (kept, last) = token.split_at(token.len() - 1);
    format!("{kept}{}", if last == "0" { "1" } else { "0" })
}

#[tokio::test(flavor = "multi_thread")]
async fn how_a_caller_is_found_without_a_token_and_from_its_header() {
    let api = Api::with_daemon_uid(LOCAL_USER_UID);
    // The daemon's own uid on the Unix socket is its administrator.
    let listed = api
        .call(&Caller::LocalUser, Method::GET, "/v1/vms", None)
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    let id = api.define("a", "web", "").await;
    let Caller::Token(viewer) = api.token("look", "viewer", "a").await else {
        unreachable!()
    };
    // A header is read as it says, whatever the connection.
    for (value, says) in [
        (format!("Basic {viewer}"), "'Bearer <token>'"),
        ("Bearer nonsense".to_string(), "malformed token"),
        (
            format!("Bearer {}", wrong_secret(&viewer)),
            "unknown or revoked token",
        ),
    ] {
        let answer = api
            .call(&Caller::Header(value.clone()), Method::GET, "/v1/vms", None)
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{value}");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{value}: {message}");
    }
    // Blanks around the token are not part of it.
    let padded = Caller::Header(format!("Bearer  {viewer} "));
    let listed = api.call(&padded, Method::GET, "/v1/vms", None).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    // A token sent on the administrator's socket acts as the token, not
    // as the administrator.
    let as_viewer = Caller::RootWithHeader(format!("Bearer {viewer}"));
    let refused = api
        .call(
            &as_viewer,
            Method::POST,
            &format!("/v1/vms/{id}/start"),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let refused = api.call(&as_viewer, Method::GET, "/v1/tokens", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_and_queries_that_do_not_fit_answer_400_naming_what() {
    let api = Api::new();
    let root = Caller::Root;
    let id = api.define("p", "web", "").await;
    let expect = |answer: &Answer, status: StatusCode, field: &str| {
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(
            answer.error(),
            ("invalid_request", Some(field)),
            "{}",
            answer.body
        );
    };
    let answer = api
        .call_with_bytes(&root, Method::POST, "/v1/vms", Some(b"[]".to_vec()))
        .await;
    expect(&answer, StatusCode::BAD_REQUEST, "body");
    let answer = api
        .call_with_bytes(&root, Method::POST, "/v1/vms", Some(b"{".to_vec()))
        .await;
    expect(&answer, StatusCode::BAD_REQUEST, "body");
    // The message names its field once.
    let answer = api
        .post(&root, "/v1/vms", json!({"name": "x", "cpus": 0}))
        .await;
    let message = answer.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("cpus"), "{message}");
    assert!(!message.starts_with("cpus: cpus"), "{message}");
    let answer = api.post(&root, "/v1/vms", json!({"name": 7})).await;
    let message = answer.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("name: "), "{message}");
    // A body over 64 KiB: 413, in the API's own error body.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(70 << 10));
    let answer = api
        .call_with_bytes(&root, Method::POST, "/v1/vms", Some(huge.into_bytes()))
        .await;
    expect(&answer, StatusCode::PAYLOAD_TOO_LARGE, "body");
    assert!(answer.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    // Queries: the field that does not fit, or the query as a whole.
    for (method, path, field) in [
        (Method::GET, "/v1/audit?limit=x".to_string(), "limit"),
        (Method::GET, "/v1/audit?limit=-1".to_string(), "limit"),
        (Method::DELETE, format!("/v1/vms/{id}?force=maybe"), "force"),
        (
            Method::POST,
            "/v1/vms?project=a&project=b".to_string(),
            "query",
        ),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        let answer = api.call(&root, method, &path, body).await;
        expect(&answer, StatusCode::BAD_REQUEST, field);
    }
    // Whole numbers written as floats are whole numbers.
    let made = api
        .post(
            &root,
            "/v1/vms",
            json!({"name": "floats", "cpus": 2.0, "memory_mib": 64.0}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["spec"]["memory_mib"], 64);
    // Nothing of that was left behind.
    let listed = api.call(&root, Method::GET, "/v1/vms", None).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 2, "{}", listed.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_project_a_call_acts_in_and_whose_tokens_an_admin_sees() {
    let api = Api::new();
    let root = Caller::Root;
    let spec = serde_json::to_value(support::spec("web", "")).unwrap();
    let made = api.post(&root, "/v1/vms", spec.clone()).await;
    assert_eq!(made.body["project"], "default", "{}", made.body);
    let refused = api.post(&root, "/v1/vms?project=Not_A_Name", spec).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error().1, Some("project"));
    let made = api
        .post(
            &root,
            "/v1/tokens",
            json!({"name": "any", "role": "viewer"}),
        )
        .await;
    assert_eq!(made.body["record"]["project"], "default", "{}", made.body);
    let refused = api
        .post(
            &root,
            "/v1/tokens",
            json!({"name": "Bad", "role": "viewer", "project": "a"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error().1, Some("name"));
    let admin = api.token("boss", "admin", "a").await;
    let other = api.token("their-boss", "admin", "b").await;
    let viewer = api.token("look", "viewer", "a").await;
    let refused = api
        .post(
            &viewer,
            "/v1/vms",
            serde_json::to_value(support::spec("x", "")).unwrap(),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // A project's admin sees and revokes its own project's tokens only.
    let names = |answer: &Answer| -> Vec<String> {
        let mut names: Vec<String> = answer
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let own = api.call(&admin, Method::GET, "/v1/tokens", None).await;
    assert_eq!(names(&own), ["boss", "look"]);
    let all = api.call(&root, Method::GET, "/v1/tokens", None).await;
    assert_eq!(names(&all), ["any", "boss", "look", "their-boss"]);
    let theirs = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "their-boss")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = api
        .call(
            &admin,
            Method::DELETE,
            &format!("/v1/tokens/{theirs}"),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    let still = api.call(&other, Method::GET, "/v1/tokens", None).await;
    assert_eq!(still.status, StatusCode::OK);
    let revoked = api
        .call(&root, Method::DELETE, &format!("/v1/tokens/{theirs}"), None)
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let gone = api.call(&other, Method::GET, "/v1/tokens", None).await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
    // The audit log records each in the project it acted in.
    let log = api.call(&root, Method::GET, "/v1/audit", None).await;
    let revocations: Vec<(&Value, &Value)> = log
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "DELETE /v1/tokens/{id}")
        .map(|e| (&e["project"], &e["status"]))
        .collect();
    assert_eq!(
        revocations,
        [(&json!(""), &json!(404)), (&json!("b"), &json!(204))]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_answers_the_newest_hundred_unless_asked() {
    let api = Api::new();
    let id = api.define("a", "web", "").await;
    for _ in 0..110 {
        api.call(&Caller::Anonymous, Method::POST, "/v1/vms", None)
            .await;
    }
    let deleted = api
        .call(
            &Caller::Root,
            Method::DELETE,
            &format!("/v1/vms/{id}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let log = api
        .call(&Caller::Root, Method::GET, "/v1/audit", None)
        .await;
    let entries = log.body.as_array().unwrap();
    assert_eq!(entries.len(), 100);
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "DELETE /v1/vms/{id}");
    assert_eq!(last["target"], id.as_str());
    assert_eq!(last["project"], "a");
    assert_eq!(last["status"], 204);
    let all = api
        .call(&Caller::Root, Method::GET, "/v1/audit?limit=50000", None)
        .await;
    assert_eq!(all.body.as_array().unwrap().len(), 112);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_that_ends_while_asked_conflicts_and_one_that_refuses_fails() {
    let api = Api::new();
    let root = Caller::Root;
    for (behaviour, status, code, state) in [
        (
            "fake.end-on-pause",
            StatusCode::CONFLICT,
            "conflict",
            "stopped",
        ),
        (
            "fake.refuse-pause",
            StatusCode::UNPROCESSABLE_ENTITY,
            "failed",
            "running",
        ),
    ] {
        let id = api.define("p", "web", behaviour).await;
        let started = api
            .call(&root, Method::POST, &format!("/v1/vms/{id}/start"), None)
            .await;
        assert_eq!(started.status, StatusCode::OK, "{}", started.body);
        let answer = api
            .call(&root, Method::POST, &format!("/v1/vms/{id}/pause"), None)
            .await;
        assert_eq!(answer.status, status, "{behaviour}: {}", answer.body);
        assert_eq!(answer.error().0, code, "{behaviour}");
        api.wait_for_state(&id, state).await;
        api.call(
            &root,
            Method::DELETE,
            &format!("/v1/vms/{id}?force=true"),
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limits_of_stop_and_incoming_are_taken_and_a_migration_answers_its_report() {
    let api = Api::new();
    let root = Caller::Root;
    let id = api.define("p", "web", "fake.migrate-ok").await;
    let path = |action: &str| format!("/v1/vms/{id}/{action}");
    api.call(&root, Method::POST, &path("start"), None).await;
    let stopped = api
        .post(&root, &path("stop"), json!({"timeout_secs": 600}))
        .await;
    assert_eq!(stopped.status, StatusCode::OK, "{}", stopped.body);
    assert_eq!(stopped.body["state"], "stopped");
    for timeout in [1, 86_400] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let waiting = api
            .post(
                &root,
                &path("start"),
                json!({"incoming": format!("tcp:127.0.0.1:{port}"),
                       "incoming_from": "127.0.0.1", "incoming_timeout_secs": timeout}),
            )
            .await;
        assert_eq!(
            waiting.status,
            StatusCode::OK,
            "{timeout}: {}",
            waiting.body
        );
        assert_eq!(waiting.body["state"], "starting");
        // The source comes (and says nothing): the guest runs here.
        drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        api.wait_for_state(&id, "running").await;
        let stopped = api.post(&root, &path("stop"), json!({"force": true})).await;
        assert_eq!(stopped.body["state"], "stopped", "{}", stopped.body);
    }
    api.call(&root, Method::POST, &path("start"), None).await;
    let migrated = api
        .post(
            &root,
            &path("migrate"),
            json!({"uri": "tcp:127.0.0.1:9", "downtime_ms": 100}),
        )
        .await;
    assert_eq!(migrated.status, StatusCode::OK, "{}", migrated.body);
    assert_eq!(migrated.body["rounds"], 1, "{}", migrated.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_prometheus_text_with_every_family_once_and_labels_escaped() {
    let api = Api::new();
    let root = Caller::Root;
    let running: Vec<String> = [
        api.define("a", "one", "").await,
        api.define("a", "two", "").await,
    ]
    .into();
    let stopped = api.define("a", "three", "").await;
    for id in &running {
        api.call(&root, Method::POST, &format!("/v1/vms/{id}/start"), None)
            .await;
    }
    let answer = api.call(&root, Method::GET, "/metrics", None).await;
    assert!(answer.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = answer.body.as_str().unwrap().to_string();
    let mut families = std::collections::BTreeMap::<&str, usize>::new();
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            *families.entry(help.split(' ').next().unwrap()).or_default() += 1;
            continue;
        }
        if line.starts_with("# TYPE ") {
            continue;
        }
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(families.values().all(|&n| n == 1), "{families:?}");
    for family in [
        "bulkhead_vms",
        "bulkhead_daemon_resident_bytes",
        "bulkhead_vm_info",
        "bulkhead_vm_process_cpu_seconds_total",
        "bulkhead_vm_vcpu_seconds_total",
        "bulkhead_vm_resident_bytes",
        "bulkhead_vm_guest_resident_bytes",
        "bulkhead_vm_overhead_bytes",
        "bulkhead_vm_exits_total",
        "bulkhead_vm_emulated_instructions_total",
        "bulkhead_vm_device_total",
    ] {
        assert!(families.contains_key(family), "{family}: {text}");
    }
    let has = |line: &str| text.lines().any(|l| l == line);
    assert!(has("bulkhead_vms{state=\"running\"} 2"), "{text}");
    assert!(has("bulkhead_vms{state=\"stopped\"} 1"), "{text}");
    let rss: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("bulkhead_daemon_resident_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rss > 1 << 20, "{rss}");
    let vm = format!("vm=\"{}\",name=\"one\",project=\"a\"", running[0]);
    for line in [
        format!("bulkhead_vm_info{{{vm},state=\"running\"}} 1"),
        format!("bulkhead_vm_resident_bytes{{{vm}}} 307200"),
        format!("bulkhead_vm_guest_resident_bytes{{{vm}}} 204800"),
        format!("bulkhead_vm_overhead_bytes{{{vm}}} 102400"),
        format!("bulkhead_vm_exits_total{{{vm},vcpu=\"0\",reason=\"io_out\"}} 3"),
        format!("bulkhead_vm_exits_total{{{vm},vcpu=\"0\",reason=\"halt\"}} 0"),
        format!(
            "bulkhead_vm_emulated_instructions_total{{{vm},vcpu=\"0\",instruction=\"rdmsr\"}} 2"
        ),
        // The fake's device is named `net"0\` and a newline.
        format!(
            "bulkhead_vm_device_total{{{vm},device=\"net\\\"0\\\\\\n\",counter=\"rx_bytes\"}} 7"
        ),
    ] {
        assert!(has(&line), "{line} in {text}");
    }
    for family in [
        "bulkhead_vm_process_cpu_seconds_total",
        "bulkhead_vm_vcpu_seconds_total",
    ] {
        let samples = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .count();
        assert_eq!(samples, 2, "{family}: one per running VM: {text}");
    }
    assert!(text.contains(&format!("{vm},vcpu=\"0\"}}")), "{text}");
    assert!(
        has(&format!(
            "bulkhead_vm_info{{vm=\"{stopped}\",name=\"three\",project=\"a\",state=\"stopped\"}} 1"
        )),
        "{text}"
    );
    for id in &running {
        api.call(
            &root,
            Method::DELETE,
            &format!("/v1/vms/{id}?force=true"),
            None,
        )
        .await;
    }
}

/// The next Server-Sent Event of a stream: its name and data.
async fn next_event(body: &mut Body) -> (String, String) {
    let mut text = String::new();
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        if let Some((event, _)) = text.split_once("\n\n") {
            let field = |name: &str| {
                event
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            };
            if event.starts_with(':') {
                text.clear();
                continue;
            }
            return (field("event:"), field("data:"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_reach_those_who_may_see_them_and_a_slow_reader_is_told_what_it_missed() {
    let api = Api::new();
    let viewer = api.token("look", "viewer", "a").await;
    let Caller::Token(token) = viewer else {
        unreachable!()
    };
    let request = Request::builder()
        .uri("/v1/events")
        .extension(Peer::Remote)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = host::api::router(api.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let event = |vm: &str, project: &str| host::events::Event {
        time_ms: 1,
        vm: vm.into(),
        name: "web".into(),
        project: project.into(),
        state: "running".into(),
        detail: None,
    };
    api.state.events.publish(event("theirs", "b"));
    api.state.events.publish(event("ours", "a"));
    let (name, data) = next_event(&mut body).await;
    assert_eq!(name, "state");
    let seen: host::events::Event = serde_json::from_str(&data).unwrap();
    assert_eq!(seen, event("ours", "a"));
    // More than the bus keeps, unread: the reader learns how many it lost.
    for n in 0..1100 {
        api.state.events.publish(event(&format!("vm{n}"), "a"));
    }
    let (name, data) = next_event(&mut body).await;
    assert_eq!((name.as_str(), data.as_str()), ("lagged", "76"));
    let (_, data) = next_event(&mut body).await;
    let seen: host::events::Event = serde_json::from_str(&data).unwrap();
    assert_eq!(seen.vm, "vm76");
}

/// A console connection: the answer's status line and what follows it.
struct Console {
    status: String,
    stream: tokio::net::TcpStream,
    early: Vec<u8>,
}

impl Console {
    async fn open(address: std::net::SocketAddr, path: &str, caller: Option<&str>) -> Console {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let auth = caller
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        let upgrade = if path.contains("no-upgrade") {
            String::new()
        } else {
            "Connection: upgrade\r\nUpgrade: bulkhead-console\r\n".to_string()
        };
        let path = path.replace("no-upgrade", "");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}{upgrade}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the daemon closed before answering");
            read.extend_from_slice(&chunk[..n]);
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&read[..head_end]).to_string();
        Console {
            status: head.lines().next().unwrap().to_string(),
            stream,
            early: read[head_end..].to_vec(),
        }
    }

    /// Reads until `wanted` has come, or `within` has passed.
    async fn read_until(&mut self, wanted: &[u8], within: std::time::Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut seen = std::mem::take(&mut self.early);
        let deadline = tokio::time::Instant::now() + within;
        while !seen.windows(wanted.len()).any(|w| w == wanted) {
            let mut chunk = [0u8; 256];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_raw_bytes_with_many_readers_and_one_writer() {
    use tokio::io::AsyncWriteExt;
    let api = Api::new();
    let address = api.serve().await;
    let id = api.define("a", "web", "").await;
    let Caller::Token(viewer) = api.token("look", "viewer", "a").await else {
        unreachable!()
    };
    let Caller::Token(operator) = api.token("act", "operator", "a").await else {
        unreachable!()
    };
    let console = format!("/v1/vms/{id}/console");
    let writer = format!("{console}?write=true");
    let stopped = Console::open(address, &console, None).await;
    assert!(stopped.status.contains(" 409 "), "{}", stopped.status);
    api.call(
        &Caller::Root,
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        None,
    )
    .await;
    let plain = Console::open(address, &format!("{console}no-upgrade"), None).await;
    assert!(plain.status.contains(" 400 "), "{}", plain.status);
    let refused = Console::open(address, &writer, Some(&viewer)).await;
    assert!(refused.status.contains(" 403 "), "{}", refused.status);
    let second = std::time::Duration::from_secs(1);
    let ten_seconds = std::time::Duration::from_secs(10);
    // A reader sees the console; what it types goes nowhere.
    let mut reader = Console::open(address, &console, Some(&viewer)).await;
    assert!(reader.status.contains(" 101 "), "{}", reader.status);
    assert!(reader
        .read_until(b"fake console\n", ten_seconds)
        .await
        .ends_with(b"fake console\n"));
    reader.stream.write_all(b"from-reader").await.unwrap();
    let echoed = reader.read_until(b"from-reader", second).await;
    assert!(echoed.is_empty(), "{}", String::from_utf8_lossy(&echoed));
    // One writer: its keys reach the guest (the fake echoes them).
    let mut typist = Console::open(address, &writer, Some(&operator)).await;
    assert!(typist.status.contains(" 101 "), "{}", typist.status);
    typist.read_until(b"fake console\n", ten_seconds).await;
    let busy = Console::open(address, &writer, None).await;
    assert!(busy.status.contains(" 409 "), "{}", busy.status);
    typist.stream.write_all(b"from-writer").await.unwrap();
    let echoed = typist.read_until(b"from-writer", ten_seconds).await;
    assert!(echoed.ends_with(b"from-writer"), "{echoed:?}");
    // Its place is free once it leaves.
    drop(typist);
    let mut next = Console::open(address, &writer, None).await;
    for _ in 0..100 {
        if next.status.contains(" 101 ") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        next = Console::open(address, &writer, None).await;
    }
    assert!(next.status.contains(" 101 "), "{}", next.status);
    next.stream.write_all(b"again").await.unwrap();
    assert!(next
        .read_until(b"again", ten_seconds)
        .await
        .ends_with(b"again"));
    api.call(
        &Caller::Root,
        Method::DELETE,
        &format!("/v1/vms/{id}?force=true"),
        None,
    )
    .await;
}
