//! Test fixtures: kube's mock API service (`tower_test::mock::pair`) answered by a
//! small in-memory API server that records every request, so reconcile tests check
//! the exact calls a reconcile makes (method, path, field manager, bodies) and the
//! objects they leave behind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use crate::controller::Context;
use crate::kafka::{KafkaTarget, TopicAdmin, TopicOutcome};

/// One request the reconcile made.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Call {
    /// `PATCH /api/v1/namespaces/ns/secrets/x`, for comparing sequences.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Objects by path (`/api/v1/namespaces/ns/secrets/name`), and the calls made.
#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub calls: Vec<Call>,
}

/// The in-memory API server.
#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<State>>);

/// Where an object of `api_version`/`plural` lives.
pub fn path_of(api_version: &str, plural: &str, ns: &str, name: &str) -> String {
    let root = if api_version.contains('/') {
        "apis"
    } else {
        "api"
    };
    format!("/{root}/{api_version}/namespaces/{ns}/{plural}/{name}")
}

fn plural_of(kind: &str) -> String {
    match kind {
        "SamplingPolicy" => "samplingpolicies".into(),
        other => format!("{}s", other.to_lowercase()),
    }
}

impl FakeApi {
    /// Stores `obj` (any Kubernetes object with apiVersion, kind and metadata).
    pub fn put(&self, obj: &impl serde::Serialize) {
        let mut v = serde_json::to_value(obj).unwrap();
        let api_version = v["apiVersion"].as_str().unwrap().to_owned();
        let kind = v["kind"].as_str().unwrap().to_owned();
        let meta = &mut v["metadata"];
        if meta["uid"].is_null() {
            meta["uid"] = json!(format!("uid-{}", meta["name"].as_str().unwrap()));
        }
        if meta["resourceVersion"].is_null() {
            meta["resourceVersion"] = json!("1");
        }
        let path = match meta["namespace"].as_str() {
            Some(ns) => path_of(
                &api_version,
                &plural_of(&kind),
                ns,
                meta["name"].as_str().unwrap(),
            ),
            // Cluster-scoped (namespaces, webhook configurations).
            None => format!(
                "/{}/{api_version}/{}/{}",
                if api_version.contains('/') {
                    "apis"
                } else {
                    "api"
                },
                plural_of(&kind),
                meta["name"].as_str().unwrap()
            ),
        };
        self.0.lock().unwrap().objects.insert(path, v);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.0.lock().unwrap().calls.clear();
    }

    /// A client whose requests this fake answers, until the returned task is dropped.
    pub fn client(&self) -> (Client, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = me.answer(request).await;
                send.send_response(response);
            }
        });
        (Client::new(service, "default"), task)
    }

    async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let path = parts.uri.path().to_owned();
        let call = Call {
            method: parts.method.clone(),
            path: path.clone(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: body.clone(),
        };
        let mut state = self.0.lock().unwrap();
        state.calls.push(call);
        let (status, out) = route(&mut state.objects, &parts.method, &path, body);
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&out).unwrap()))
            .unwrap()
    }
}

fn not_found(path: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{path} not found"), "reason": "NotFound", "code": 404,
        }),
    )
}

/// JSON merge patch (RFC 7386).
pub fn merge(doc: &mut Value, patch: &Value) {
    match (doc, patch) {
        (Value::Object(d), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    d.remove(k);
                } else {
                    merge(d.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (d, p) => *d = p.clone(),
    }
}

fn route(
    objects: &mut BTreeMap<String, Value>,
    method: &Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let (object_path, subresource) = match path.strip_suffix("/status") {
        Some(p) => (p.to_owned(), Some("status")),
        None => (path.to_owned(), None),
    };
    let segments: Vec<&str> = object_path.trim_start_matches('/').split('/').collect();
    let rest = if segments[0] == "api" {
        &segments[2..]
    } else {
        &segments[3.min(segments.len())..]
    };
    let is_collection = rest.len() == 1 || (rest.len() == 3 && rest[0] == "namespaces");
    match (method.clone(), is_collection) {
        (Method::GET, true) => {
            let plural = rest[rest.len() - 1];
            let ns = (rest.len() == 3).then(|| rest[1]);
            let prefix = &segments[..segments.len() - rest.len()].join("/");
            let items: Vec<Value> = objects
                .iter()
                .filter(|(p, _)| {
                    let s: Vec<&str> = p.trim_start_matches('/').split('/').collect();
                    let r = &s[s.len() - 4..];
                    p.trim_start_matches('/').starts_with(prefix.as_str())
                        && r[2] == plural
                        && ns.is_none_or(|n| r[1] == n)
                })
                .map(|(_, v)| v.clone())
                .collect();
            (
                StatusCode::OK,
                json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": "1" }, "items": items }),
            )
        }
        (Method::POST, true) => {
            // Created objects are stored (Events only echoed back).
            let mut created = body;
            created["metadata"]["resourceVersion"] = json!("1");
            if !object_path.ends_with("/events")
                && let Some(name) = created["metadata"]["name"].as_str()
            {
                let at = format!("{object_path}/{name}");
                if objects.contains_key(&at) {
                    return (
                        StatusCode::CONFLICT,
                        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "already exists", "reason": "AlreadyExists", "code": 409 }),
                    );
                }
                objects.insert(at, created.clone());
            }
            (StatusCode::CREATED, created)
        }
        (Method::GET, false) => match objects.get(&object_path) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => not_found(path),
        },
        (Method::DELETE, false) => match objects.remove(&object_path) {
            Some(o) => (StatusCode::OK, o),
            None => not_found(path),
        },
        (Method::PATCH, false) => {
            let existing = objects.get(&object_path).cloned();
            let updated = match (subresource, existing) {
                (Some(_), None) => return not_found(path),
                (Some(_), Some(mut o)) => {
                    merge(&mut o, &json!({ "status": body["status"] }));
                    o
                }
                (None, Some(mut o)) => {
                    if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                        && Some(rv) != o["metadata"]["resourceVersion"].as_str()
                    {
                        return (
                            StatusCode::CONFLICT,
                            json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409 }),
                        );
                    }
                    let mut patch = body;
                    if let Some(m) = patch["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                    merge(&mut o, &patch);
                    o
                }
                // Server-side apply creates what does not exist.
                (None, None) => {
                    let mut o = body;
                    o["metadata"]["uid"] = json!("uid-new");
                    o
                }
            };
            let mut updated = updated;
            let rv = updated["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            updated["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
            objects.insert(object_path, updated.clone());
            (StatusCode::OK, updated)
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "unsupported", "reason": "MethodNotAllowed", "code": 405 }),
        ),
    }
}

/// A topic admin that answers from a script and records what it was asked.
#[derive(Clone, Default)]
pub struct FakeTopics {
    pub answer: Arc<Mutex<Option<Result<TopicOutcome, String>>>>,
    pub asked: Arc<Mutex<Vec<(String, String, i32)>>>,
}

impl TopicAdmin for FakeTopics {
    fn ensure(
        &self,
        target: KafkaTarget,
        topic: String,
        partitions: i32,
        _replication: Option<i32>,
    ) -> BoxFuture<'static, Result<TopicOutcome, String>> {
        self.asked
            .lock()
            .unwrap()
            .push((target.brokers, topic, partitions));
        let answer = self
            .answer
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(Ok(TopicOutcome::Unchanged { partitions }));
        Box::pin(async move { answer })
    }
}

/// A context over `api` and `topics`.
pub fn context(api: &FakeApi, topics: &FakeTopics) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    context_with_query(api, topics, None)
}

/// [`context`] evaluating AlertRules against `query_url`.
pub fn context_with_query(
    api: &FakeApi,
    topics: &FakeTopics,
    query_url: Option<String>,
) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    let (client, task) = api.client();
    let ctx = Context {
        client,
        topics: Arc::new(topics.clone()),
        reporter: kube::runtime::events::Reporter {
            controller: "loupe-operator".into(),
            instance: Some("test".into()),
        },
        metrics: crate::metrics::Metrics::default(),
        alerts: crate::controller::AlertSettings {
            query_url,
            interval: std::time::Duration::from_secs(60),
            notifier: loupe_querier::notify::Notifier::new(std::time::Duration::from_secs(60)),
        },
    };
    (Arc::new(ctx), task)
}

/// Runs a reconcile with a timeout, so a call the fake never answers fails the test.
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the reconcile finished")
}

/// The (API group, resource, verb) of a request, as RBAC sees it.
pub fn rbac_of(call: &Call) -> (String, String, &'static str) {
    let (path, sub) = match call.path.strip_suffix("/status") {
        Some(p) => (p, "/status"),
        None => (call.path.as_str(), ""),
    };
    let s: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = if s[0] == "api" {
        (String::new(), &s[2..])
    } else {
        (s[1].to_owned(), &s[3..])
    };
    let (resource, named) = match rest {
        [r] => (*r, false),
        ["namespaces", _, r] => (*r, false),
        ["namespaces", _, r, _] => (*r, true),
        // A cluster-scoped object.
        [r, _] if *r != "namespaces" => (*r, true),
        // A namespace itself.
        ["namespaces", _] => ("namespaces", true),
        other => panic!("unexpected path {other:?}"),
    };
    let verb = match (call.method.clone(), named) {
        (Method::GET, true) => "get",
        (Method::GET, false) => "list",
        (Method::POST, _) => "create",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, _) => "delete",
        (m, _) => panic!("unexpected method {m}"),
    };
    (group, format!("{resource}{sub}"), verb)
}

/// Every request in `calls` is allowed by the operator's ClusterRole.
pub fn assert_rbac_allows(calls: &[Call]) {
    for c in calls {
        let (group, resource, verb) = rbac_of(c);
        assert!(
            crate::rbac::allows(&group, &resource, verb),
            "{} needs {verb} on {group}/{resource}, which crate::rbac does not grant",
            c.line()
        );
    }
}
