//! Reconcile loops against kube's mock API service (see `fixtures`): the exact
//! requests each reconcile makes and the state it leaves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::ObjectMeta;
use loupe_core::config::DataPlaneConfig;
use loupe_core::keys::KeyHash;
use serde_json::{Value, json};

use crate::controller::*;
use crate::crd::*;
use crate::fixtures::*;
use crate::kafka::TopicOutcome;

fn platform() -> TracePlatform {
    let mut p: TracePlatform =
        serde_saphyr::from_str(include_str!("../../docs/examples/platform-minimal.yaml")).unwrap();
    p.metadata.uid = Some("uid-loupe".into());
    p.metadata.generation = Some(3);
    p
}

fn project(ns: &str, env: &str) -> TraceProject {
    let mut p = TraceProject::new(
        "chat",
        serde_json::from_value(json!({
            "platformRef": { "name": "loupe", "namespace": "observability" },
            "environment": env,
        }))
        .unwrap(),
    );
    p.metadata.namespace = Some(ns.into());
    p.metadata.uid = Some(format!("uid-{ns}-chat"));
    p.metadata.generation = Some(1);
    p
}

fn key_secret(ns: &str, ingest: &str, query: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("chat-loupe-keys".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("ingest-key".into(), ByteString(ingest.as_bytes().to_vec())),
            ("query-key".into(), ByteString(query.as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

const PLATFORM_PATH: &str =
    "/apis/loupe.dev/v1alpha1/namespaces/observability/traceplatforms/loupe";
const CONFIG_PATH: &str = "/api/v1/namespaces/observability/configmaps/loupe-config";

fn status_patch(calls: &[Call], path: &str) -> Value {
    calls
        .iter()
        .rev()
        .find(|c| c.path == format!("{path}/status"))
        .unwrap_or_else(|| panic!("no status patch of {path}: {calls:#?}"))
        .body["status"]
        .clone()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.path.ends_with("/events"))
        .map(|c| {
            (
                c.body["type"].as_str().unwrap_or_default().to_owned(),
                c.body["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_platform_applies_its_children_renders_its_projects_and_reports_status() {
    let api = FakeApi::default();
    api.put(&platform());
    api.put(&project("team-a-dev", "dev"));
    api.put(&project("team-a-prod", "prod"));
    api.put(&key_secret("team-a-dev", "dev-ingest", "dev-query"));
    api.put(&key_secret("team-a-prod", "prod-ingest", "prod-query"));
    let topics = FakeTopics::default();
    *topics.answer.lock().unwrap() = Some(Ok(TopicOutcome::Created { partitions: 12 }));
    let (ctx, _server) = context(&api, &topics);

    let action = within(reconcile_platform(std::sync::Arc::new(platform()), ctx))
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300))
    );

    let calls = api.calls();
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    let ns = "/api/v1/namespaces/observability";
    let apps = "/apis/apps/v1/namespaces/observability";
    let pdb = "/apis/policy/v1/namespaces/observability/poddisruptionbudgets";
    let hpa = "/apis/autoscaling/v2/namespaces/observability/horizontalpodautoscalers";
    assert_eq!(
        lines,
        [
            "GET /apis/loupe.dev/v1alpha1/traceprojects".to_owned(),
            "GET /apis/loupe.dev/v1alpha1/samplingpolicies".into(),
            "GET /api/v1/namespaces/team-a-dev/secrets/chat-loupe-keys".into(),
            "GET /api/v1/namespaces/team-a-prod/secrets/chat-loupe-keys".into(),
            format!("GET {ns}/secrets/loupe-redaction-key"),
            format!("PATCH {ns}/secrets/loupe-redaction-key"),
            format!("PATCH {ns}/serviceaccounts/loupe"),
            format!("PATCH {ns}/configmaps/loupe-config"),
            format!("PATCH {apps}/deployments/loupe-receive"),
            format!("PATCH {apps}/deployments/loupe-write"),
            format!("PATCH {apps}/deployments/loupe-querier"),
            format!("PATCH {apps}/deployments/loupe-compactor"),
            format!("PATCH {ns}/services/loupe-receive"),
            format!("PATCH {ns}/services/loupe-write"),
            format!("PATCH {ns}/services/loupe-querier"),
            format!("PATCH {ns}/services/loupe-compactor"),
            format!("PATCH {pdb}/loupe-receive"),
            format!("PATCH {pdb}/loupe-querier"),
            format!("DELETE {hpa}/loupe-receive"),
            format!("DELETE {hpa}/loupe-write"),
            format!("DELETE {pdb}/loupe-write"),
            format!("DELETE {hpa}/loupe-querier"),
            format!("DELETE {hpa}/loupe-compactor"),
            format!("DELETE {pdb}/loupe-compactor"),
            "POST /apis/events.k8s.io/v1/namespaces/observability/events".into(),
            format!("PATCH {PLATFORM_PATH}/status"),
        ]
    );
    // Every write is a forced server-side apply under the operator's field manager.
    for c in calls
        .iter()
        .filter(|c| c.method == http::Method::PATCH && !c.path.ends_with("/status"))
    {
        assert_eq!(
            c.content_type,
            "application/apply-patch+yaml",
            "{}",
            c.line()
        );
        assert!(
            c.query.contains("fieldManager=loupe-operator"),
            "{}",
            c.query
        );
        assert!(c.query.contains("force=true"), "{}", c.query);
        assert_eq!(c.body["metadata"]["ownerReferences"][0]["uid"], "uid-loupe");
    }
    // The tenant config serves both projects with the hashes of their keys.
    let cm: ConfigMap = serde_json::from_value(api.get(CONFIG_PATH).unwrap()).unwrap();
    let config = DataPlaneConfig::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
    let ids: Vec<_> = config.tenants.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(ids, ["team-a-dev/chat", "team-a-prod/chat"]);
    assert_eq!(config.tenants[1].keys[0].hash, KeyHash::of("prod-ingest"));
    assert_eq!(config.tenants[1].keys[1].hash, KeyHash::of("prod-query"));
    assert_eq!(config.tenants[0].environment, loupe_core::Environment::Dev);
    // The topic was asked for with the spec's partitions.
    assert_eq!(
        topics.asked.lock().unwrap().clone(),
        [(
            "kafka.kafka.svc:9092".to_owned(),
            "loupe.spans".to_owned(),
            12
        )]
    );
    let status = status_patch(&calls, PLATFORM_PATH);
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "KafkaTopic")["reason"], "Created");
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["projects"], 2);
    assert_eq!(
        status["endpoints"]["otlpGrpc"],
        "loupe-receive.observability.svc:4317"
    );
    assert_eq!(
        events(&calls),
        [("Normal".to_owned(), "Created".to_owned())]
    );
    assert_rbac_allows(&calls);

    // The receivers' redaction key is made once: a later reconcile keeps it.
    let key_path = format!("{ns}/secrets/loupe-redaction-key");
    let first = api.get(&key_path).unwrap();
    assert_eq!(
        first["data"]["key"].as_str().unwrap().len(),
        88,
        "64 hex digits, base64"
    );
    let (ctx, _server) = context(&api, &topics);
    within(reconcile_platform(std::sync::Arc::new(platform()), ctx))
        .await
        .unwrap();
    assert_eq!(api.get(&key_path).unwrap()["data"], first["data"]);
    let receive: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(
        api.get(&format!("{apps}/deployments/loupe-receive"))
            .unwrap(),
    )
    .unwrap();
    let env =
        serde_json::to_string(&receive.spec.unwrap().template.spec.unwrap().containers[0].env)
            .unwrap();
    assert!(
        env.contains("LOUPE_REDACTION_KEY") && env.contains("loupe-redaction-key"),
        "{env}"
    );
}

#[tokio::test]
async fn kafka_trouble_is_a_condition_and_an_event_not_a_crash() {
    let api = FakeApi::default();
    api.put(&platform());
    let topics = FakeTopics::default();
    *topics.answer.lock().unwrap() = Some(Err("cannot reach Kafka: timed out".into()));
    let (ctx, _server) = context(&api, &topics);
    let action = within(reconcile_platform(
        std::sync::Arc::new(platform()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(30))
    );
    let calls = api.calls();
    let status = status_patch(&calls, PLATFORM_PATH);
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "KafkaUnreachable");
    assert!(
        condition(&status, "KafkaTopic")["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(
        events(&calls),
        [("Warning".to_owned(), "KafkaUnreachable".to_owned())]
    );

    // Fewer partitions than the topic has: kept, and said so.
    api.clear_calls();
    *topics.answer.lock().unwrap() = Some(Ok(TopicOutcome::CannotShrink { have: 16, want: 12 }));
    within(reconcile_platform(std::sync::Arc::new(platform()), ctx))
        .await
        .unwrap();
    let status = status_patch(&api.calls(), PLATFORM_PATH);
    let topic = condition(&status, "KafkaTopic");
    assert_eq!(topic["reason"], "CannotRemovePartitions");
    assert!(topic["message"].as_str().unwrap().contains("keeps 16"));
    assert_eq!(status["topicPartitions"], 16);
}

#[tokio::test]
async fn a_project_gets_keys_once_waits_for_its_platform_then_is_ready() {
    let api = FakeApi::default();
    api.put(&platform());
    let proj = project("team-a-dev", "dev");
    api.put(&proj);
    let topics = FakeTopics::default();
    let (ctx, _server) = context(&api, &topics);
    let project_path = "/apis/loupe.dev/v1alpha1/namespaces/team-a-dev/traceprojects/chat";
    let secret_path = "/api/v1/namespaces/team-a-dev/secrets/chat-loupe-keys";

    within(reconcile_project(
        std::sync::Arc::new(proj.clone()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    let calls = api.calls();
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    assert_eq!(
        lines,
        [
            "GET /apis/loupe.dev/v1alpha1/namespaces/observability/traceplatforms/loupe".to_owned(),
            format!("GET {secret_path}"),
            format!("PATCH {secret_path}"),
            "GET /apis/loupe.dev/v1alpha1/namespaces/team-a-dev/samplingpolicies".into(),
            format!("GET {CONFIG_PATH}"),
            format!("PATCH {project_path}/status"),
        ]
    );
    let secret: Secret = serde_json::from_value(api.get(secret_path).unwrap()).unwrap();
    let data = secret.data.clone().unwrap();
    let ingest = String::from_utf8(data["ingest-key"].0.clone()).unwrap();
    assert!(ingest.starts_with("loupe_ik_"), "{ingest}");
    assert_eq!(data["tenant"].0, b"team-a-dev/chat");
    assert_eq!(secret.owner_references()[0].uid, "uid-team-a-dev-chat");
    let status = status_patch(&calls, project_path);
    assert_eq!(condition(&status, "Ready")["reason"], "WaitingForPlatform");
    assert_eq!(status["keysSecret"], "chat-loupe-keys");
    assert_eq!(status["tenant"], "team-a-dev/chat");
    // Keys never reach the status or an event.
    let all_bodies = serde_json::to_string(
        &calls
            .iter()
            .filter(|c| !c.path.contains("/secrets/"))
            .map(|c| &c.body)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(!all_bodies.contains(&ingest));

    // The platform renders its config; the project is then Ready, with the same keys.
    within(reconcile_platform(
        std::sync::Arc::new(platform()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    api.clear_calls();
    within(reconcile_project(
        std::sync::Arc::new(proj.clone()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    let calls = api.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == http::Method::PATCH && c.path == secret_path),
        "keys are kept across reconciles"
    );
    let status = status_patch(&calls, project_path);
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Ready")["reason"], "Serving");
    assert_eq!(
        status["endpoints"]["query"],
        "http://loupe-querier.observability.svc:3000"
    );

    // An annotation asks for new keys: they are replaced once, with an event.
    let mut rotate = proj.clone();
    rotate
        .annotations_mut()
        .insert(ROTATE_ANNOTATION.into(), "2026-11-22".into());
    api.clear_calls();
    within(reconcile_project(
        std::sync::Arc::new(rotate.clone()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    let secret: Secret = serde_json::from_value(api.get(secret_path).unwrap()).unwrap();
    let rotated = String::from_utf8(secret.data.unwrap()["ingest-key"].0.clone()).unwrap();
    assert_ne!(rotated, ingest);
    assert_eq!(
        events(&api.calls()),
        [("Normal".to_owned(), "KeysRotated".to_owned())]
    );
    api.clear_calls();
    within(reconcile_project(std::sync::Arc::new(rotate), ctx))
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(api.get(secret_path).unwrap()).unwrap();
    let again = String::from_utf8(secret.data.unwrap()["ingest-key"].0.clone()).unwrap();
    assert_eq!(again, rotated, "one rotation per annotation value");
    assert_rbac_allows(&api.calls());
}

#[tokio::test]
async fn a_project_without_its_platform_says_so() {
    let api = FakeApi::default();
    let proj = project("team-a-dev", "dev");
    api.put(&proj);
    let (ctx, _server) = context(&api, &FakeTopics::default());
    within(reconcile_project(std::sync::Arc::new(proj), ctx))
        .await
        .unwrap();
    let calls = api.calls();
    let status = status_patch(
        &calls,
        "/apis/loupe.dev/v1alpha1/namespaces/team-a-dev/traceprojects/chat",
    );
    let ready = condition(&status, "Ready");
    assert_eq!(ready["reason"], "PlatformNotFound");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("observability/loupe")
    );
    assert_eq!(
        events(&calls),
        [("Warning".to_owned(), "PlatformNotFound".to_owned())]
    );
}

#[tokio::test]
async fn delete_policy_adds_a_finalizer_and_retain_removes_it() {
    let api = FakeApi::default();
    api.put(&platform());
    let mut proj = project("team-a-prod", "prod");
    proj.spec.deletion_policy = DeletionPolicy::Delete;
    api.put(&proj);
    let (ctx, _server) = context(&api, &FakeTopics::default());
    let path = "/apis/loupe.dev/v1alpha1/namespaces/team-a-prod/traceprojects/chat";
    let stored: TraceProject = serde_json::from_value(api.get(path).unwrap()).unwrap();
    within(reconcile_project(std::sync::Arc::new(stored), ctx.clone()))
        .await
        .unwrap();
    let patch = api
        .calls()
        .into_iter()
        .find(|c| c.path == path && c.method == http::Method::PATCH)
        .unwrap();
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        patch.body,
        json!({ "metadata": { "finalizers": [DATA_FINALIZER], "resourceVersion": "1" } })
    );
    let stored: TraceProject = serde_json::from_value(api.get(path).unwrap()).unwrap();
    assert_eq!(stored.finalizers(), [DATA_FINALIZER]);

    let mut retain = stored.clone();
    retain.spec.deletion_policy = DeletionPolicy::Retain;
    api.clear_calls();
    within(reconcile_project(std::sync::Arc::new(retain), ctx))
        .await
        .unwrap();
    let stored: TraceProject = serde_json::from_value(api.get(path).unwrap()).unwrap();
    assert!(stored.finalizers().is_empty(), "{:?}", stored.finalizers());
    assert_rbac_allows(&api.calls());
}

/// A project with `deletionPolicy: Delete` being deleted, as the API server holds it.
fn deleting_project() -> TraceProject {
    let mut proj = project("team-a-prod", "prod");
    proj.spec.deletion_policy = DeletionPolicy::Delete;
    proj.metadata.finalizers = Some(vec![DATA_FINALIZER.to_owned()]);
    proj.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(5_000).unwrap(),
    ));
    proj
}

const DELETING_PATH: &str = "/apis/loupe.dev/v1alpha1/namespaces/team-a-prod/traceprojects/chat";

#[tokio::test]
async fn deleting_a_delete_policy_project_runs_a_purge_job_then_releases_it() {
    let api = FakeApi::default();
    api.put(&platform());
    api.put(&deleting_project());
    let (ctx, _server) = context(&api, &FakeTopics::default());
    let stored =
        || -> TraceProject { serde_json::from_value(api.get(DELETING_PATH).unwrap()).unwrap() };

    // First pass: the Job is created, the project stays.
    let action = within(reconcile_project(
        std::sync::Arc::new(stored()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(15))
    );
    let job_name = crate::render::purge_job_name("loupe", "team-a-prod/chat");
    let job_path = format!("/apis/batch/v1/namespaces/observability/jobs/{job_name}");
    let job = api.get(&job_path).expect("the purge Job was created");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][2],
        "--tenant=team-a-prod/chat"
    );
    assert_eq!(
        events(&api.calls()),
        [("Normal".to_owned(), "DataDeletionStarted".to_owned())]
    );
    assert_eq!(stored().finalizers(), [DATA_FINALIZER]);
    assert_rbac_allows(&api.calls());

    // While it runs: nothing changes, and no second Job.
    api.clear_calls();
    within(reconcile_project(
        std::sync::Arc::new(stored()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert!(
        api.calls().iter().all(|c| c.method == http::Method::GET),
        "{:#?}",
        api.calls()
    );
    assert_eq!(stored().finalizers(), [DATA_FINALIZER]);

    // The Job succeeded: the finalizer goes, and the Job with it.
    let mut done = job.clone();
    done["status"] =
        json!({ "succeeded": 1, "conditions": [{ "type": "Complete", "status": "True" }] });
    api.put(&done);
    api.clear_calls();
    let action = within(reconcile_project(
        std::sync::Arc::new(stored()),
        ctx.clone(),
    ))
    .await
    .unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(stored().finalizers().is_empty());
    assert!(api.get(&job_path).is_none(), "the finished Job is deleted");
    let delete = api
        .calls()
        .into_iter()
        .find(|c| c.method == http::Method::DELETE)
        .unwrap();
    assert_eq!(
        delete.body["propagationPolicy"], "Background",
        "its pods go too"
    );
    assert_eq!(
        events(&api.calls()),
        [("Normal".to_owned(), "DataDeleted".to_owned())]
    );
    assert_rbac_allows(&api.calls());
}

#[tokio::test]
async fn a_failed_purge_job_keeps_the_project_and_says_why() {
    let api = FakeApi::default();
    let platform = platform();
    api.put(&platform);
    api.put(&deleting_project());
    let mut job = crate::render::purge_job(&platform, "team-a-prod/chat").unwrap();
    job.status = Some(serde_json::from_value(json!({
        "failed": 7,
        "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit" }],
    })).unwrap());
    api.put(&job);
    let (ctx, _server) = context(&api, &FakeTopics::default());
    let stored: TraceProject = serde_json::from_value(api.get(DELETING_PATH).unwrap()).unwrap();
    within(reconcile_project(std::sync::Arc::new(stored), ctx))
        .await
        .unwrap();
    let calls = api.calls();
    assert_eq!(
        events(&calls),
        [("Warning".to_owned(), "DataDeletionFailed".to_owned())]
    );
    let note = calls
        .iter()
        .find(|c| c.path.ends_with("/events"))
        .unwrap()
        .body["note"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        note.contains("backoff limit") && note.contains("delete the Job to try again"),
        "{note}"
    );
    let stored: TraceProject = serde_json::from_value(api.get(DELETING_PATH).unwrap()).unwrap();
    assert_eq!(stored.finalizers(), [DATA_FINALIZER]);
}

#[tokio::test]
async fn without_its_platform_a_deleting_project_waits_and_names_the_prefixes() {
    let api = FakeApi::default();
    api.put(&deleting_project());
    let (ctx, _server) = context(&api, &FakeTopics::default());
    let stored: TraceProject = serde_json::from_value(api.get(DELETING_PATH).unwrap()).unwrap();
    within(reconcile_project(std::sync::Arc::new(stored), ctx))
        .await
        .unwrap();
    let calls = api.calls();
    assert_eq!(
        events(&calls),
        [("Warning".to_owned(), "DataDeletionBlocked".to_owned())]
    );
    let note = calls
        .iter()
        .find(|c| c.path.ends_with("/events"))
        .unwrap()
        .body["note"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(note.contains("tenants/team-a-prod/chat/"), "{note}");
    assert!(calls.iter().all(|c| !c.path.contains("/jobs")));
}

#[tokio::test]
async fn two_policies_on_one_project_are_a_conflict_and_the_oldest_applies() {
    let api = FakeApi::default();
    let mut proj = project("team-a-prod", "prod");
    proj.metadata.labels = Some(BTreeMap::from([("tier".into(), "gold".into())]));
    api.put(&proj);
    let mut gold: SamplingPolicy =
        serde_saphyr::from_str(include_str!("../../docs/examples/sampling-policy.yaml")).unwrap();
    gold.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap(),
    ));
    let mut late = SamplingPolicy::new(
        "late",
        serde_json::from_value(json!({ "projects": ["chat"], "rules": { "percentage": 1 } }))
            .unwrap(),
    );
    late.metadata.namespace = Some("team-a-prod".into());
    late.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap(),
    ));
    api.put(&gold);
    api.put(&late);
    let (ctx, _server) = context(&api, &FakeTopics::default());
    within(reconcile_policy(std::sync::Arc::new(late), ctx.clone()))
        .await
        .unwrap();
    let status = status_patch(
        &api.calls(),
        "/apis/loupe.dev/v1alpha1/namespaces/team-a-prod/samplingpolicies/late",
    );
    assert_eq!(status["projects"], json!(["chat"]));
    let conflict = condition(&status, "Conflict");
    assert_eq!(conflict["status"], "True");
    assert!(
        conflict["message"]
            .as_str()
            .unwrap()
            .contains("gold (the oldest) applies"),
        "{conflict}"
    );
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(
        events(&api.calls()),
        [("Warning".to_owned(), "SelectedByAnotherPolicy".to_owned())]
    );
    assert_rbac_allows(&api.calls());
}

/// A query API answering metrics (`step=3600s`: the last hour, $30; otherwise the
/// 7-day baseline, $1680 = $10 an hour) and recording the keys it was sent, and a
/// webhook receiver recording what it was sent.
async fn querier_and_hooks() -> (String, Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<Value>>>) {
    type Recorded = (Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<Value>>>);
    use axum::extract::{Query, State};
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let hooks: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/v1/metrics",
            axum::routing::get(
                |State((keys, _)): State<Recorded>,
                 headers: axum::http::HeaderMap,
                 Query(q): Query<BTreeMap<String, String>>| async move {
                    keys.lock().unwrap().push(
                        headers
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default(),
                    );
                    let cost = if q["step"] == "3600s" { 30.0 } else { 1680.0 };
                    let est = json!({ "requests": 100.0, "input_tokens": 0.0, "output_tokens": 0.0, "cost_usd": cost });
                    axum::Json(json!({
                        "level": "trace", "start": "", "end": "", "start_ns": 0, "end_ns": 0,
                        "step_seconds": 3600.0, "group_by": [], "rows": "traces", "groups_omitted": 0,
                        "sampling": { "kept_spans": 0, "seen_spans": 0, "extrapolated": false, "note": "" },
                        "series": [{ "group": {}, "requests": 100, "errors": 0, "input_tokens": 0,
                            "output_tokens": 0, "cost_usd": cost, "estimated": est, "points": [] }],
                    }))
                },
            ),
        )
        .route(
            "/hooks/slack",
            axum::routing::post(
                |State((_, hooks)): State<Recorded>,
                 axum::Json(body): axum::Json<Value>| async move {
                    hooks.lock().unwrap().push(body);
                    "ok"
                },
            ),
        )
        .with_state((keys.clone(), hooks.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), keys, hooks)
}

#[tokio::test]
async fn an_alert_rule_is_evaluated_with_the_projects_query_key_and_notifies() {
    let (base, keys, hooks) = querier_and_hooks().await;
    let api = FakeApi::default();
    let (ctx, _server) = context_with_query(&api, &FakeTopics::default(), Some(base.clone()));
    let mut rule: AlertRule =
        serde_saphyr::from_str(include_str!("../../docs/examples/alert-cost-spike.yaml")).unwrap();
    rule.spec.for_duration = None;
    api.put(&rule);
    let path = "/apis/loupe.dev/v1alpha1/namespaces/team-a-prod/alertrules/chat-cost-spike";
    let stored = || -> AlertRule { serde_json::from_value(api.get(path).unwrap()).unwrap() };
    within(reconcile_alert(std::sync::Arc::new(stored()), ctx.clone()))
        .await
        .unwrap();
    let status = status_patch(&api.calls(), path);
    assert_eq!(condition(&status, "Ready")["reason"], "ProjectNotFound");
    assert_eq!(status["state"], "NotEvaluated");

    // The project exists but has no keys yet: not evaluated, and it says why.
    api.put(&project("team-a-prod", "prod"));
    api.clear_calls();
    within(reconcile_alert(std::sync::Arc::new(stored()), ctx.clone()))
        .await
        .unwrap();
    let status = status_patch(&api.calls(), path);
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Evaluating")["reason"], "KeysNotReady");
    assert_eq!(status["state"], "Inactive");

    // Keys and the Slack URL's Secret: $30 this hour against $10 on average fires.
    api.put(&key_secret("team-a-prod", "ingest-key", "query-key-1"));
    api.put(&Secret {
        metadata: ObjectMeta {
            name: Some("alert-webhooks".into()),
            namespace: Some("team-a-prod".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "slack-url".into(),
            ByteString(format!("{base}/hooks/slack").into_bytes()),
        )])),
        ..Default::default()
    });
    api.clear_calls();
    let action = within(reconcile_alert(std::sync::Arc::new(stored()), ctx.clone()))
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(60))
    );
    let status = status_patch(&api.calls(), path);
    assert_eq!(
        condition(&status, "Evaluating")["status"],
        "True",
        "{status}"
    );
    assert_eq!(status["state"], "Firing", "{status}");
    assert_eq!(status["valueText"], "3.00×");
    assert_eq!(status["threshold"], 2.0);
    assert!(
        status["summary"]
            .as_str()
            .unwrap()
            .starts_with("cost $30.00 in 1h is 3.00×")
    );
    assert!(
        status["tracesUrl"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{base}/api/v1/traces?start="))
    );
    assert_eq!(
        status["targets"][0]["target"],
        format!("slack {base}"),
        "the URL's path (a secret) is left out"
    );
    assert!(status["targets"][0]["lastSent"].is_string(), "{status}");
    assert_eq!(
        events(&api.calls()),
        [("Warning".to_owned(), "AlertFiring".to_owned())]
    );
    assert!(
        keys.lock()
            .unwrap()
            .iter()
            .all(|k| k == "Bearer query-key-1")
    );
    let sent = hooks.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0]["text"]
            .as_str()
            .unwrap()
            .contains("[FIRING] chat-cost-spike* (team-a-prod/chat, cost_spike)")
    );
    assert_rbac_allows(&api.calls());

    // The next evaluation keeps it firing and tells Slack nothing new.
    api.clear_calls();
    within(reconcile_alert(std::sync::Arc::new(stored()), ctx.clone()))
        .await
        .unwrap();
    let again = status_patch(&api.calls(), path);
    assert_eq!(again["state"], "Firing");
    assert_eq!(again["since"], status["since"]);
    assert!(events(&api.calls()).is_empty());
    assert_eq!(hooks.lock().unwrap().len(), 1);

    // Rules the evaluator would refuse are refused with the field.
    let mut bad = rule;
    bad.spec.baseline = Some("30m".into());
    assert!(
        validate_alert(&bad)
            .unwrap_err()
            .starts_with("baseline: 30m is shorter than the window (1h)")
    );
}

#[test]
fn project_secret_keys_hash_what_the_secret_holds() {
    let keys = secret_keys(&key_secret("ns", "a", "b")).unwrap();
    assert_eq!(keys.ingest, KeyHash::of("a"));
    assert_eq!(keys.query, KeyHash::of("b"));
    let mut half = key_secret("ns", "a", "b");
    half.data.as_mut().unwrap().remove("query-key");
    assert!(secret_keys(&half).is_none());
    let _ = half.name_any();
}
