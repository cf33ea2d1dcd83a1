//! The mutating admission webhook: answers AdmissionReviews for pod creation with the
//! JSON patch that injects the `loupe agent` ([`crate::inject`]). It never blocks a
//! pod: whatever goes wrong (an API lookup failing or slow, no project), the pod is
//! admitted unchanged with a warning the client sees, and an Event on the namespace.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, ResourceExt};

use crate::controller::Context;
use crate::crd::{TracePlatform, TraceProject};
use crate::inject::{Choice, choose, inject, patch};

/// How long the lookups of one review may take in all (the API server's own timeout
/// is a few seconds; answering unchanged beats timing out).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers one AdmissionReview.
pub async fn review(ctx: &Context, review: AdmissionReview<Pod>) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "an AdmissionReview without a request");
            return AdmissionResponse::invalid(e.to_string()).into_review();
        }
    };
    let response = AdmissionResponse::from(&request);
    let (Operation::Create, Some(pod)) = (&request.operation, request.object.as_ref()) else {
        return response.into_review();
    };
    let ns = request
        .namespace
        .clone()
        .or_else(|| pod.namespace())
        .unwrap_or_default();
    let mut pod = pod.clone();
    pod.metadata.namespace = Some(ns.clone());
    let outcome = tokio::time::timeout(LOOKUP_TIMEOUT, decide(ctx, &ns, &pod)).await;
    let warning = match outcome {
        Ok(Ok(Some(injected))) => {
            let name = injected
                .metadata
                .name
                .clone()
                .or_else(|| injected.metadata.generate_name.clone())
                .unwrap_or_default();
            match response.clone().with_patch(patch(&pod, &injected)) {
                Ok(r) => {
                    tracing::info!(namespace = %ns, pod = %name, "injected the Loupe agent");
                    return r.into_review();
                }
                Err(e) => format!("the Loupe agent was not injected: {e}"),
            }
        }
        Ok(Ok(None)) => return response.into_review(),
        Ok(Err(warning)) => warning,
        Err(_) => format!(
            "the Loupe agent was not injected: the lookups took over {} s",
            LOOKUP_TIMEOUT.as_secs()
        ),
    };
    tracing::warn!(namespace = %ns, %warning, "pod admitted without the Loupe agent");
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(ns.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    ctx.event(&namespace, true, "AgentNotInjected", warning.clone())
        .await;
    let mut response = response;
    response.warnings = Some(vec![warning]);
    response.into_review()
}

/// The injected pod, `None` when nothing changes, or the warning to admit it with.
async fn decide(ctx: &Context, ns: &str, pod: &Pod) -> Result<Option<Pod>, String> {
    let client = &ctx.client;
    let failed = |what: &str, e: kube::Error| {
        format!("the Loupe agent was not injected: reading {what}: {e}")
    };
    let labels = Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .map_err(|e| failed("the namespace", e))?
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    // Only what the pod or namespace asks for needs the projects.
    if matches!(choose(pod, &labels, &[]), Choice::NotRequested) {
        return Ok(None);
    }
    let projects = Api::<TraceProject>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| failed("the TraceProjects", e))?
        .items;
    let project = match choose(pod, &labels, &projects) {
        Choice::NotRequested | Choice::AlreadyInjected => return Ok(None),
        Choice::Skip(warning) => return Err(warning),
        Choice::Inject(p) => p,
    };
    let (platform_ns, platform_name) = project.platform();
    let platform = Api::<TracePlatform>::namespaced(client.clone(), &platform_ns)
        .get_opt(platform_name)
        .await
        .map_err(|e| failed("the TracePlatform", e))?
        .ok_or_else(|| {
            format!(
                "TracePlatform {platform_ns}/{platform_name} of TraceProject {ns}/{} does not exist; the Loupe agent was not injected",
                project.name_any()
            )
        })?;
    Ok(Some(inject(pod, project, &platform)))
}

/// The review as JSON, with the patch as base64 (Go's encoding of `[]byte`, which
/// the API server reads; kube writes it as an array of numbers).
pub fn wire(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine;
    let mut v = serde_json::to_value(review).expect("a review serializes");
    if let Some(patch) = v.get_mut("response").and_then(|r| r.get_mut("patch"))
        && let Ok(bytes) = serde_json::from_value::<Vec<u8>>(patch.clone())
    {
        *patch = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    v
}

/// `POST /mutate-pods`.
pub fn router(ctx: Arc<Context>) -> axum::Router {
    axum::Router::new()
        .route(
            "/mutate-pods",
            axum::routing::post(
                |axum::extract::State(ctx): axum::extract::State<Arc<Context>>,
                 axum::Json(body): axum::Json<AdmissionReview<Pod>>| async move {
                    axum::Json(wire(&review(&ctx, body).await))
                },
            ),
        )
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Container;
    use serde_json::{Value, json};

    use super::*;
    use crate::fixtures::*;
    use crate::inject::*;

    fn platform() -> TracePlatform {
        let mut p: TracePlatform =
            serde_saphyr::from_str(include_str!("../../docs/examples/platform-minimal.yaml"))
                .unwrap();
        p.metadata.uid = Some("uid-loupe".into());
        p
    }

    fn project(name: &str) -> TraceProject {
        let mut p = TraceProject::new(
            name,
            serde_json::from_value(json!({
                "platformRef": { "name": "loupe", "namespace": "observability" },
                "environment": "prod",
                "injection": { "headSamplingRatio": 0.5 },
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("shop".into());
        p
    }

    fn namespace(labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some("shop".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A pod as a Deployment's ReplicaSet creates it: no name yet, an owner, an init
    /// container, two application containers (one already setting a variable).
    fn deployment_pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "web-7d9f8c6b5-",
                "namespace": "shop",
                "labels": { "app": "web", "pod-template-hash": "7d9f8c6b5" },
                "annotations": annotations,
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
                    "uid": "uid-rs", "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "initContainers": [{ "name": "migrate", "image": "shop/migrate:1" }],
                "containers": [
                    { "name": "web", "image": "shop/web:1",
                      "env": [{ "name": "OTEL_SERVICE_NAME", "value": "storefront" }] },
                    { "name": "worker", "image": "shop/worker:1" },
                ],
            },
        })
    }

    /// An AdmissionReview as the API server sends it.
    fn admission(pod: &Value) -> AdmissionReview<Pod> {
        serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
                "requestResource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {
                    "username": "system:serviceaccount:kube-system:replicaset-controller",
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                },
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" },
            },
        }))
        .unwrap()
    }

    /// Reviews `pod`; returns the response JSON and the pod after its patch.
    async fn run(api: &FakeApi, pod: &Value) -> (Value, Pod) {
        let (ctx, _server) = context(api, &FakeTopics::default());
        let answer = wire(&review(&ctx, admission(pod)).await);
        let response = answer["response"].clone();
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true, "the webhook never blocks a pod");
        let mut patched = pod.clone();
        if !response["patch"].is_null() {
            assert_eq!(response["patchType"], "JSONPatch");
            // kube serializes the bytes as a JSON array (which the API server's Go
            // decoder takes for []byte as well as base64).
            let bytes: Vec<u8> = match &response["patch"] {
                Value::String(b64) => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap()
                }
                other => serde_json::from_value(other.clone()).unwrap(),
            };
            let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
            json_patch::patch(&mut patched, &ops).unwrap();
        }
        (response, serde_json::from_value(patched).unwrap())
    }

    /// Asserts that the response's first warning contains `text`.
    fn assert_warns(response: &Value, text: &str) {
        let warning = response["warnings"][0].as_str().unwrap_or_default();
        assert!(warning.contains(text), "{response}");
    }

    fn env_of(c: &Container) -> BTreeMap<String, String> {
        c.env
            .iter()
            .flatten()
            .map(|e| {
                let v = e.value.clone().unwrap_or_else(|| {
                    serde_json::to_string(e.value_from.as_ref().unwrap()).unwrap()
                });
                (e.name.clone(), v)
            })
            .collect()
    }

    fn world(labels: &[(&str, &str)], projects: &[&str]) -> FakeApi {
        let api = FakeApi::default();
        api.put(&namespace(labels));
        api.put(&platform());
        for p in projects {
            api.put(&project(p));
        }
        api
    }

    #[tokio::test]
    async fn an_annotated_pod_gets_the_agent_and_its_containers_the_otlp_environment() {
        let api = world(&[], &["chat"]);
        let pod = deployment_pod(json!({ "loupe.dev/inject": "true" }));
        let (response, injected) = run(&api, &pod).await;
        assert!(response["warnings"].is_null(), "{response}");
        let spec = injected.spec.as_ref().unwrap();

        // The agent first among the init containers, as a native sidecar; the
        // application's init container untouched after it.
        let init: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["loupe-agent", "migrate"]);
        let agent = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
        assert!(agent.startup_probe.is_some());
        let args = agent.args.clone().unwrap();
        assert!(
            args.contains(&"--upstream=http://loupe-receive.observability.svc:4317".to_owned()),
            "{args:?}"
        );
        assert!(args.contains(&"--sampling-ratio=0.5".to_owned()));
        let agent_env = env_of(agent);
        assert_eq!(
            agent_env["LOUPE_INGEST_KEY"],
            r#"{"secretKeyRef":{"key":"ingest-key","name":"chat-loupe-keys"}}"#
        );
        assert_eq!(
            agent_env["K8S_POD_NAME"],
            r#"{"fieldRef":{"fieldPath":"metadata.name"}}"#
        );
        assert_eq!(
            agent_env["K8S_NODE_NAME"],
            r#"{"fieldRef":{"fieldPath":"spec.nodeName"}}"#
        );
        let attrs = &agent_env["LOUPE_AGENT_RESOURCE_ATTRIBUTES"];
        assert!(
            attrs.contains("k8s.pod.name=$(K8S_POD_NAME)")
                && attrs.contains("k8s.deployment.name=web")
                && attrs.contains("loupe.project=shop/chat"),
            "{attrs}"
        );
        assert!(
            !spec.init_containers.as_ref().unwrap()[1]
                .env
                .iter()
                .flatten()
                .any(|e| e.name.starts_with("OTEL_"))
        );

        // Every application container: the endpoint, protocol, service name and
        // resource attributes, without overwriting what it sets.
        let web = env_of(&spec.containers[0]);
        assert_eq!(
            web["OTEL_SERVICE_NAME"], "storefront",
            "the container's own value is kept"
        );
        assert_eq!(web["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://127.0.0.1:4318");
        assert_eq!(web["OTEL_EXPORTER_OTLP_PROTOCOL"], "http/protobuf");
        assert_eq!(
            web["OTEL_RESOURCE_ATTRIBUTES"],
            "loupe.project=shop/chat,deployment.environment=prod,k8s.namespace.name=shop,k8s.deployment.name=web"
        );
        assert_eq!(web.keys().filter(|k| *k == "OTEL_SERVICE_NAME").count(), 1);
        let worker = env_of(&spec.containers[1]);
        assert_eq!(worker["OTEL_SERVICE_NAME"], "web", "the Deployment's name");
        assert_eq!(worker.len(), 4);
        assert_eq!(injected.annotations()[INJECTED_ANNOTATION], AGENT_VERSION);

        // Admitting the injected pod again changes nothing.
        let again = serde_json::to_value(&injected).unwrap();
        let (response, same) = run(&api, &again).await;
        assert!(response["patch"].is_null(), "{response}");
        assert_eq!(same, injected);
    }

    #[tokio::test]
    async fn the_namespace_label_opts_pods_in_and_the_annotation_out() {
        let api = world(&[("loupe.dev/inject", "enabled")], &["chat"]);
        let (_, injected) = run(&api, &deployment_pod(json!({}))).await;
        assert_eq!(
            injected.spec.unwrap().init_containers.unwrap()[0].name,
            "loupe-agent"
        );
        let pod = deployment_pod(json!({ "loupe.dev/inject": "false" }));
        let (response, unchanged) = run(&api, &pod).await;
        assert!(response["patch"].is_null() && response["warnings"].is_null());
        assert_eq!(unchanged.spec.unwrap().init_containers.unwrap().len(), 1);

        // Without the label or the annotation nothing happens.
        let plain = world(&[], &["chat"]);
        let (response, _) = run(&plain, &deployment_pod(json!({}))).await;
        assert!(response["patch"].is_null() && response["warnings"].is_null());
    }

    #[tokio::test]
    async fn without_one_clear_project_the_pod_is_admitted_unchanged_with_a_warning() {
        let pod = deployment_pod(json!({ "loupe.dev/inject": "true" }));
        let (response, _) = run(&world(&[], &[]), &pod).await;
        assert!(response["patch"].is_null());
        assert_eq!(
            response["warnings"][0],
            "no TraceProject in namespace shop; the Loupe agent was not injected"
        );

        let api = world(&[], &["chat", "search"]);
        let (response, _) = run(&api, &pod).await;
        assert!(response["patch"].is_null());
        let warning = response["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("2 TraceProjects (chat, search)")
                && warning.contains("loupe.dev/project"),
            "{warning}"
        );
        let calls = api.calls();
        assert!(
            calls
                .iter()
                .any(|c| c.path.ends_with("/events") && c.body["reason"] == "AgentNotInjected"),
            "an Event says so"
        );
        assert_rbac_allows(&calls);

        // The annotation picks one.
        let picked =
            deployment_pod(json!({ "loupe.dev/inject": "true", "loupe.dev/project": "search" }));
        let (response, injected) = run(&api, &picked).await;
        assert!(response["warnings"].is_null(), "{response}");
        let agent = &injected.spec.unwrap().init_containers.unwrap()[0];
        assert!(env_of(agent)["LOUPE_INGEST_KEY"].contains("search-loupe-keys"));
        let missing =
            deployment_pod(json!({ "loupe.dev/inject": "true", "loupe.dev/project": "nope" }));
        let (response, _) = run(&api, &missing).await;
        assert_warns(&response, "no TraceProject \"nope\"");
    }

    #[tokio::test]
    async fn a_missing_platform_or_a_bad_annotation_never_blocks_the_pod() {
        let api = FakeApi::default();
        api.put(&namespace(&[]));
        api.put(&project("chat"));
        let pod = deployment_pod(json!({ "loupe.dev/inject": "true" }));
        let (response, _) = run(&api, &pod).await;
        assert_warns(&response, "TracePlatform observability/loupe");
        let odd = deployment_pod(json!({ "loupe.dev/inject": "yes please" }));
        let (response, _) = run(&world(&[], &["chat"]), &odd).await;
        assert_warns(&response, "neither \"true\" nor \"false\"");
    }

    #[tokio::test]
    async fn the_service_name_falls_back_to_the_pod_name() {
        let api = world(&[], &["chat"]);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "debug-shell", "namespace": "shop",
                          "annotations": { "loupe.dev/inject": "true" } },
            "spec": { "containers": [{ "name": "sh", "image": "busybox" }] },
        });
        let (_, injected) = run(&api, &pod).await;
        let env = env_of(&injected.spec.unwrap().containers[0]);
        assert_eq!(env["OTEL_SERVICE_NAME"], "debug-shell");
        let labelled = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "x", "namespace": "shop",
                          "labels": { "app.kubernetes.io/name": "checkout" },
                          "annotations": { "loupe.dev/inject": "true" } },
            "spec": { "containers": [{ "name": "c", "image": "i" }] },
        });
        let (_, injected) = run(&api, &labelled).await;
        assert_eq!(
            env_of(&injected.spec.unwrap().containers[0])["OTEL_SERVICE_NAME"],
            "checkout"
        );
    }
}
