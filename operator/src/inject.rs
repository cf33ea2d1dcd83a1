//! Sidecar injection: which pods get the `loupe agent`, and what injecting it changes.
//! Pure functions over the pod, its namespace's labels and TraceProjects; the
//! webhook (`crate::webhook`) looks those up and answers the API server.
//!
//! A pod asks with the annotation `loupe.dev/inject: "true"`, or its namespace with the
//! label `loupe.dev/inject=enabled` (a pod opts out with `"false"`). The namespace
//! must hold a TraceProject; with several, `loupe.dev/project` picks one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::crd::{TracePlatform, TraceProject};
use crate::tenants::{INGEST_KEY, keys_secret_name};

pub const INJECT_ANNOTATION: &str = "loupe.dev/inject";
pub const NAMESPACE_LABEL: &str = "loupe.dev/inject";
pub const PROJECT_ANNOTATION: &str = "loupe.dev/project";
/// Set on injected pods, with the agent's version.
pub const INJECTED_ANNOTATION: &str = "loupe.dev/injected";
pub const AGENT_CONTAINER: &str = "loupe-agent";
/// The agent's version: the operator's (one image, one binary).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the agent listens inside the pod.
pub const AGENT_GRPC_PORT: u16 = 4317;
pub const AGENT_HTTP_PORT: u16 = 4318;
pub const AGENT_METRICS_PORT: u16 = 9464;
/// Where the image keeps the `loupe` binary (the startup probe runs it).
pub const AGENT_BINARY: &str = "/usr/local/bin/loupe";

/// What to do with a pod.
#[derive(Debug)]
pub enum Choice<'a> {
    /// Neither the pod nor its namespace asks for the agent.
    NotRequested,
    /// The pod already has the agent (re-admission): nothing changes.
    AlreadyInjected,
    Inject(&'a TraceProject),
    /// Asked for, but impossible: admitted unchanged, with this warning.
    Skip(String),
}

/// Decides for `pod` in a namespace with `namespace_labels` and `projects`.
pub fn choose<'a>(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    projects: &'a [TraceProject],
) -> Choice<'a> {
    let annotations = pod.annotations();
    let requested = match annotations.get(INJECT_ANNOTATION).map(|v| v.trim()) {
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            return Choice::Skip(format!(
                "annotation {INJECT_ANNOTATION}: {other:?} is neither \"true\" nor \"false\"; the Loupe agent was not injected"
            ));
        }
        None => namespace_labels
            .get(NAMESPACE_LABEL)
            .is_some_and(|v| v == "enabled"),
    };
    if !requested {
        return Choice::NotRequested;
    }
    if already_injected(pod) {
        return Choice::AlreadyInjected;
    }
    let ns = pod.namespace().unwrap_or_default();
    let live: Vec<&TraceProject> = projects
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    match (annotations.get(PROJECT_ANNOTATION), live.as_slice()) {
        (Some(name), _) => match live.iter().find(|p| p.name_any() == *name) {
            Some(p) => Choice::Inject(p),
            None => Choice::Skip(format!(
                "annotation {PROJECT_ANNOTATION}: no TraceProject {name:?} in namespace {ns}; the Loupe agent was not injected"
            )),
        },
        (None, []) => Choice::Skip(format!(
            "no TraceProject in namespace {ns}; the Loupe agent was not injected"
        )),
        (None, [one]) => Choice::Inject(one),
        (None, several) => Choice::Skip(format!(
            "namespace {ns} has {} TraceProjects ({}): pick one with the annotation {PROJECT_ANNOTATION}; the Loupe agent was not injected",
            several.len(),
            several
                .iter()
                .map(|p| p.name_any())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn already_injected(pod: &Pod) -> bool {
    pod.annotations().contains_key(INJECTED_ANNOTATION)
        || pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.name == AGENT_CONTAINER))
}

/// The workload that owns the pod: its `k8s.<kind>.name` attribute and name. A
/// ReplicaSet made by a Deployment (its name is the Deployment's plus the
/// `pod-template-hash`) counts as that Deployment.
pub fn owner(pod: &Pod) -> Option<(&'static str, String)> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))?;
    Some(match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.labels().get("pod-template-hash");
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => ("k8s.deployment.name", deployment.to_owned()),
                None => ("k8s.replicaset.name", owner.name.clone()),
            }
        }
        "StatefulSet" => ("k8s.statefulset.name", owner.name.clone()),
        "DaemonSet" => ("k8s.daemonset.name", owner.name.clone()),
        "Job" => ("k8s.job.name", owner.name.clone()),
        _ => return None,
    })
}

/// The service name applications report: the `app.kubernetes.io/name` label, else
/// the owning workload's name, else the pod's name (or its `generateName`).
pub fn service_name(pod: &Pod) -> String {
    if let Some(name) = pod.labels().get("app.kubernetes.io/name") {
        return name.clone();
    }
    if let Some((_, name)) = owner(pod) {
        return name;
    }
    pod.metadata
        .name
        .clone()
        .or_else(|| {
            pod.metadata
                .generate_name
                .as_ref()
                .map(|g| g.trim_end_matches('-').to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn env(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

/// The agent container for `project`, forwarding to `platform`'s receivers.
pub fn agent_container(pod: &Pod, project: &TraceProject, platform: &TracePlatform) -> Container {
    let injection = project.spec.injection.clone().unwrap_or_default();
    let image = injection
        .image
        .or_else(|| platform.spec.image.clone())
        .unwrap_or_else(crate::default_image);
    let upstream = format!("http://{}", crate::render::endpoints(platform).otlp_grpc);
    let ratio = injection.head_sampling_ratio.unwrap_or(1.0);
    let ns = pod.namespace().unwrap_or_default();
    let mut attributes = vec![
        "k8s.pod.name=$(K8S_POD_NAME)".to_owned(),
        "k8s.pod.uid=$(K8S_POD_UID)".to_owned(),
        "k8s.namespace.name=$(K8S_NAMESPACE_NAME)".to_owned(),
        "k8s.node.name=$(K8S_NODE_NAME)".to_owned(),
        format!("loupe.project={ns}/{}", project.name_any()),
        format!(
            "deployment.environment={}",
            loupe_core::Environment::from(project.spec.environment).as_str()
        ),
    ];
    if let Some((key, name)) = owner(pod) {
        attributes.push(format!("{key}={name}"));
    }
    let resources = injection
        .resources
        .map(|r| serde_json::to_value(r).expect("resources serialize"))
        .unwrap_or_else(|| {
            json!({
                "requests": { "cpu": "20m", "memory": "32Mi" },
                "limits": { "memory": "128Mi" },
            })
        });
    let container = json!({
        "name": AGENT_CONTAINER,
        "image": image,
        "args": [
            "agent",
            format!("--upstream={upstream}"),
            format!("--sampling-ratio={ratio}"),
            format!("--grpc-addr=127.0.0.1:{AGENT_GRPC_PORT}"),
            format!("--http-addr=127.0.0.1:{AGENT_HTTP_PORT}"),
            format!("--metrics-addr=127.0.0.1:{AGENT_METRICS_PORT}"),
            // A queue that fits well inside the default memory limit.
            "--max-queue-bytes=32MiB",
        ],
        // A native sidecar: starts before the application, stops after it.
        "restartPolicy": "Always",
        "env": [
            field_env("K8S_POD_NAME", "metadata.name"),
            field_env("K8S_POD_UID", "metadata.uid"),
            field_env("K8S_NAMESPACE_NAME", "metadata.namespace"),
            field_env("K8S_NODE_NAME", "spec.nodeName"),
            {
                "name": "LOUPE_INGEST_KEY",
                "valueFrom": { "secretKeyRef": { "name": keys_secret_name(&project.name_any()), "key": INGEST_KEY } },
            },
            env("LOUPE_AGENT_RESOURCE_ATTRIBUTES", &attributes.join(",")),
            env("LOUPE_LOG_FORMAT", "json"),
        ],
        "resources": resources,
        // The application starts once the agent answers.
        // The agent listens on loopback only, which the kubelet's HTTP probes cannot
        // reach (their `host` would be the node's): the probe runs in the container.
        "startupProbe": {
            "exec": { "command": [
                AGENT_BINARY, "agent", "--probe",
                format!("--metrics-addr=127.0.0.1:{AGENT_METRICS_PORT}"),
            ] },
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
    });
    serde_json::from_value(container).expect("the agent container is a valid Container")
}

/// `pod` with the agent for `project` and the OTLP environment in every application
/// container (variables a container sets already are kept).
pub fn inject(pod: &Pod, project: &TraceProject, platform: &TracePlatform) -> Pod {
    let mut out = pod.clone();
    let agent = agent_container(pod, project, platform);
    let ns = pod.namespace().unwrap_or_default();
    let mut resource = vec![
        format!("loupe.project={ns}/{}", project.name_any()),
        format!(
            "deployment.environment={}",
            loupe_core::Environment::from(project.spec.environment).as_str()
        ),
        format!("k8s.namespace.name={ns}"),
    ];
    if let Some((key, name)) = owner(pod) {
        resource.push(format!("{key}={name}"));
    }
    let app_env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{AGENT_HTTP_PORT}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_SERVICE_NAME", service_name(pod)),
        ("OTEL_RESOURCE_ATTRIBUTES", resource.join(",")),
    ];
    let spec = out.spec.get_or_insert_with(Default::default);
    for c in &mut spec.containers {
        let vars = c.env.get_or_insert_with(Vec::new);
        for (name, value) in &app_env {
            if !vars.iter().any(|v| v.name == *name) {
                vars.push(EnvVar {
                    name: (*name).to_owned(),
                    value: Some(value.clone()),
                    value_from: None,
                });
            }
        }
    }
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, agent);
    out.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(INJECTED_ANNOTATION.to_owned(), AGENT_VERSION.to_owned());
    out
}

/// The JSON patch from `before` to `after` (RFC 6902), as the API server applies it.
pub fn patch(before: &Pod, after: &Pod) -> json_patch::Patch {
    let a = serde_json::to_value(before).expect("a pod serializes");
    let b = serde_json::to_value(after).expect("a pod serializes");
    json_patch::diff(&a, &b)
}
