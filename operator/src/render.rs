//! What a TracePlatform runs: pure functions from its spec (and its tenant config) to
//! the Kubernetes objects the operator applies. Tested against golden YAML files
//! (`operator/tests/golden/`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::{RoleSpec, TracePlatform};

/// Ports of the data plane.
pub const OTLP_GRPC_PORT: i32 = 4317;
pub const OTLP_HTTP_PORT: i32 = 4318;
pub const METRICS_PORT: i32 = 9090;
pub const QUERY_PORT: i32 = 3000;

/// Where the tenant config is mounted in every pod.
const CONFIG_DIR: &str = "/etc/loupe";
const CONFIG_FILE: &str = "config.yaml";
const KAFKA_CA_DIR: &str = "/etc/loupe/kafka-ca";

/// The roles the operator deploys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Receive,
    Write,
    Querier,
    Compactor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Receive, Role::Write, Role::Querier, Role::Compactor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Receive => "receive",
            Role::Write => "write",
            Role::Querier => "querier",
            Role::Compactor => "compactor",
        }
    }

    fn default_replicas(self) -> i32 {
        match self {
            Role::Write | Role::Compactor => 1,
            Role::Receive | Role::Querier => 2,
        }
    }

    fn default_requests(self) -> Value {
        match self {
            Role::Receive => json!({ "cpu": "500m", "memory": "256Mi" }),
            Role::Write => json!({ "cpu": "500m", "memory": "1Gi" }),
            Role::Querier => json!({ "cpu": "500m", "memory": "512Mi" }),
            // A merge holds a few times its target block size (64 MiB) in memory.
            Role::Compactor => json!({ "cpu": "250m", "memory": "1Gi" }),
        }
    }

    /// The port serving `/health` and `/metrics`.
    fn ops_port(self) -> i32 {
        match self {
            Role::Querier => QUERY_PORT,
            Role::Receive | Role::Write | Role::Compactor => METRICS_PORT,
        }
    }

    fn spec(self, platform: &TracePlatform) -> &RoleSpec {
        match self {
            Role::Receive => &platform.spec.receive,
            Role::Write => &platform.spec.write,
            Role::Querier => &platform.spec.querier,
            Role::Compactor => &platform.spec.compactor,
        }
    }
}

/// The name of a role's Deployment, Service, HPA and PDB.
pub fn role_name(platform: &str, role: Role) -> String {
    format!("{platform}-{}", role.as_str())
}

/// The Secret holding the master key of `hash` redaction actions
/// (`LOUPE_REDACTION_KEY` of the receivers); created once, never rotated (rotating
/// it would change every hashed value's token).
pub fn redaction_key_secret_name(platform: &str) -> String {
    format!("{platform}-redaction-key")
}

/// The key of [`redaction_key_secret_name`]'s Secret holding the key.
pub const REDACTION_KEY: &str = "key";

/// A new redaction key Secret for a platform, owned by it.
pub fn redaction_key_secret(platform: &TracePlatform) -> Secret {
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let name = platform.name_any();
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(redaction_key_secret_name(&name)),
            namespace: platform.namespace(),
            labels: Some(crate::crd::common_labels(&name, "redaction")),
            owner_references: Some(vec![owner_reference(platform)]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            REDACTION_KEY.to_owned(),
            k8s_openapi::ByteString(key.into_bytes()),
        )])),
        ..Default::default()
    }
}

/// The name of the ConfigMap holding the tenant config.
pub fn config_map_name(platform: &str) -> String {
    format!("{platform}-config")
}

/// The consumer group of a platform's writers.
pub fn writer_group(platform: &TracePlatform) -> String {
    format!(
        "loupe.{}.{}",
        platform.namespace().unwrap_or_default(),
        platform.name_any()
    )
}

/// The in-cluster addresses of a platform.
pub fn endpoints(platform: &TracePlatform) -> crate::crd::Endpoints {
    let ns = platform.namespace().unwrap_or_default();
    let host = |role| format!("{}.{ns}.svc", role_name(&platform.name_any(), role));
    crate::crd::Endpoints {
        otlp_grpc: format!("{}:{OTLP_GRPC_PORT}", host(Role::Receive)),
        otlp_http: format!("http://{}:{OTLP_HTTP_PORT}", host(Role::Receive)),
        query: format!("http://{}:{QUERY_PORT}", host(Role::Querier)),
    }
}

/// Everything a platform runs, as typed objects.
#[derive(Clone, Debug, Default)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    /// One per role with autoscaling.
    pub autoscalers: Vec<HorizontalPodAutoscaler>,
    /// One per role that can run more than one pod.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
}

impl Children {
    /// Every object, for golden files and counting.
    pub fn to_values(&self) -> Vec<Value> {
        let mut out = vec![to_value(&self.service_account), to_value(&self.config_map)];
        out.extend(self.deployments.iter().map(to_value));
        out.extend(self.services.iter().map(to_value));
        out.extend(self.autoscalers.iter().map(to_value));
        out.extend(self.disruption_budgets.iter().map(to_value));
        out
    }
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("Kubernetes objects serialize")
}

/// A value built here that does not fit its Kubernetes type: a bug in this module.
#[derive(Debug, thiserror::Error)]
#[error("rendering {what}: {source}")]
pub struct RenderError {
    what: String,
    source: serde_json::Error,
}

fn typed<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, RenderError> {
    serde_json::from_value(v).map_err(|source| RenderError {
        what: what.to_owned(),
        source,
    })
}

/// The owner reference that makes the platform own (and garbage-collect) a child.
pub fn owner_reference(platform: &TracePlatform) -> OwnerReference {
    OwnerReference {
        api_version: TracePlatform::api_version(&()).into_owned(),
        kind: TracePlatform::kind(&()).into_owned(),
        name: platform.name_any(),
        uid: platform.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The SHA-256 of the tenant config, recorded on the ConfigMap.
pub fn config_hash(config_yaml: &str) -> String {
    let digest = Sha256::digest(config_yaml.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Annotation holding [`config_hash`] on the ConfigMap.
pub const CONFIG_HASH_ANNOTATION: &str = "loupe.dev/config-sha256";

/// The objects of `platform`, whose tenant config file is `config_yaml`.
///
/// Every role hot-reloads the config file (it is polled every 2 s), so a new config
/// does not roll the pods: the kubelet updates the mounted file in place.
pub fn children(platform: &TracePlatform, config_yaml: &str) -> Result<Children, RenderError> {
    let name = platform.name_any();
    let ns = platform.namespace().unwrap_or_default();
    let owner = to_value(&owner_reference(platform));
    let meta = |obj_name: &str, component: &str| {
        json!({
            "name": obj_name,
            "namespace": ns,
            "labels": crate::crd::common_labels(&name, component),
            "ownerReferences": [owner],
        })
    };
    let mut out = Children {
        service_account: typed(
            "ServiceAccount",
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&name, "data-plane") }),
        )?,
        ..Children::default()
    };
    let mut cm_meta = meta(&config_map_name(&name), "config");
    cm_meta["annotations"] = json!({ CONFIG_HASH_ANNOTATION: config_hash(config_yaml) });
    out.config_map = typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": cm_meta,
            "data": { CONFIG_FILE: config_yaml },
        }),
    )?;
    for role in Role::ALL {
        let role_spec = role.spec(platform);
        let obj_name = role_name(&name, role);
        let selector = selector_labels(&name, role);
        let mut deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(&obj_name, role.as_str()),
            "spec": {
                "selector": { "matchLabels": selector },
                "template": pod_template(platform, role),
            },
        });
        // With an autoscaler, the HPA owns the replica count: leaving the field out
        // keeps every apply from resetting it.
        if role_spec.autoscaling.is_none() {
            deployment["spec"]["replicas"] =
                json!(role_spec.replicas.unwrap_or(role.default_replicas()));
        }
        if role == Role::Compactor {
            // Never two compactors at once, not even during a rollout.
            deployment["spec"]["strategy"] = json!({ "type": "Recreate" });
        }
        out.deployments.push(typed("Deployment", deployment)?);
        out.services.push(typed(
            "Service",
            service(role, &selector, meta(&obj_name, role.as_str())),
        )?);
        if let Some(a) = &role_spec.autoscaling {
            out.autoscalers.push(typed(
                "HorizontalPodAutoscaler",
                json!({
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": meta(&obj_name, role.as_str()),
                    "spec": {
                        "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": obj_name },
                        "minReplicas": a.min_replicas,
                        "maxReplicas": a.max_replicas,
                        "metrics": [{
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": { "type": "Utilization", "averageUtilization": a.target_cpu_utilization },
                            },
                        }],
                    },
                }),
            )?);
        }
        let most = role_spec
            .autoscaling
            .as_ref()
            .map(|a| a.max_replicas)
            .unwrap_or(role_spec.replicas.unwrap_or(role.default_replicas()));
        if most > 1 {
            out.disruption_budgets.push(typed(
                "PodDisruptionBudget",
                json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": meta(&obj_name, role.as_str()),
                    "spec": {
                        "maxUnavailable": 1,
                        "selector": { "matchLabels": selector },
                    },
                }),
            )?);
        }
    }
    Ok(out)
}

/// How long a purge Job waits before deleting: the receivers stop accepting the
/// project once the kubelet has updated their mounted tenant config (about a minute
/// after the ConfigMap changes), and the writers flush what they still hold within a
/// flush interval (3 s by default) after that.
pub const PURGE_SETTLE: &str = "2m";

/// Annotation naming the project (`<namespace>/<project>`) a purge Job deletes.
pub const PURGE_TENANT_ANNOTATION: &str = "loupe.dev/purge-tenant";

/// The name of the Job deleting `tenant`'s data: the platform's name and a digest of
/// the tenant, within the 63 characters a Job's pods label it with.
pub fn purge_job_name(platform: &str, tenant: &str) -> String {
    let digest = config_hash(tenant);
    let prefix: String = platform.chars().take(63 - "-purge-".len() - 10).collect();
    format!("{prefix}-purge-{}", &digest[..10])
}

/// The Job that deletes everything stored for `tenant` (`<namespace>/<project>`):
/// `loupe purge` with the compactor's storage settings, in the platform's namespace
/// and owned by it. The operator removes the project's finalizer once it succeeded.
pub fn purge_job(platform: &TracePlatform, tenant: &str) -> Result<Job, RenderError> {
    let name = platform.name_any();
    let mut template = pod_template(platform, Role::Compactor);
    let container = &mut template["spec"]["containers"][0];
    container["name"] = json!("purge");
    container["args"] = json!([
        "purge",
        format!("--storage={}", platform.spec.storage.url),
        format!("--tenant={tenant}"),
        format!("--settle={PURGE_SETTLE}"),
        "--yes",
    ]);
    container["resources"] = json!({ "requests": { "cpu": "100m", "memory": "128Mi" } });
    if let Some(c) = container.as_object_mut() {
        for field in ["ports", "readinessProbe", "livenessProbe"] {
            c.remove(field);
        }
    }
    template["metadata"] = json!({ "labels": crate::crd::common_labels(&name, "purge") });
    template["spec"]["restartPolicy"] = json!("OnFailure");
    typed(
        "Job",
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": purge_job_name(&name, tenant),
                "namespace": platform.namespace(),
                "labels": crate::crd::common_labels(&name, "purge"),
                "annotations": { PURGE_TENANT_ANNOTATION: tenant },
                "ownerReferences": [to_value(&owner_reference(platform))],
            },
            "spec": {
                "backoffLimit": 6,
                // Kept a day for `kubectl logs`, unless the operator removes it first.
                "ttlSecondsAfterFinished": 86_400,
                "template": template,
            },
        }),
    )
}

fn selector_labels(platform: &str, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "loupe".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), platform.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            role.as_str().to_owned(),
        ),
    ])
}

fn service(role: Role, selector: &BTreeMap<String, String>, meta: Value) -> Value {
    let port = |name: &str, port: i32, app_protocol: Option<&str>| {
        let mut p = json!({ "name": name, "port": port, "targetPort": name, "protocol": "TCP" });
        if let Some(a) = app_protocol {
            p["appProtocol"] = json!(a);
        }
        p
    };
    let ports = match role {
        Role::Receive => vec![
            port("otlp-grpc", OTLP_GRPC_PORT, Some("grpc")),
            port("otlp-http", OTLP_HTTP_PORT, Some("http")),
            port("metrics", METRICS_PORT, Some("http")),
        ],
        Role::Write | Role::Compactor => vec![port("metrics", METRICS_PORT, Some("http"))],
        Role::Querier => vec![port("http", QUERY_PORT, Some("http"))],
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": { "selector": selector, "ports": ports },
    })
}

fn pod_template(platform: &TracePlatform, role: Role) -> Value {
    let spec = &platform.spec;
    let name = platform.name_any();
    let image = spec.image.clone().unwrap_or_else(crate::default_image);
    let kafka = &spec.kafka;
    let config_path = format!("{CONFIG_DIR}/{CONFIG_FILE}");
    let mut args: Vec<String> = match role {
        Role::Receive => vec![
            "ingester".into(),
            "--role=receive".into(),
            format!("--grpc-addr=0.0.0.0:{OTLP_GRPC_PORT}"),
            format!("--http-addr=0.0.0.0:{OTLP_HTTP_PORT}"),
            format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
        ],
        Role::Write => vec![
            "ingester".into(),
            "--role=write".into(),
            format!("--storage={}", spec.storage.url),
            format!("--kafka-group={}", writer_group(platform)),
            format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
        ],
        Role::Querier => vec![
            "querier".into(),
            format!("--storage={}", spec.storage.url),
            format!("--query-addr=0.0.0.0:{QUERY_PORT}"),
        ],
        Role::Compactor => vec![
            "compactor".into(),
            format!("--storage={}", spec.storage.url),
            format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
        ],
    };
    args.push(format!("--config={config_path}"));
    if role != Role::Compactor {
        // Keys come only from the config; until a project has some, nothing is served.
        args.push("--require-keys".into());
    }
    let mut env = vec![json!({ "name": "LOUPE_LOG_FORMAT", "value": "json" })];
    if role == Role::Receive {
        env.push(json!({
            "name": "LOUPE_REDACTION_KEY",
            "valueFrom": { "secretKeyRef": { "name": redaction_key_secret_name(&name), "key": REDACTION_KEY } },
        }));
    }
    let mut volumes = vec![
        json!({ "name": "config", "configMap": { "name": config_map_name(&name) } }),
        json!({ "name": "tmp", "emptyDir": {} }),
    ];
    let mut mounts = vec![
        json!({ "name": "config", "mountPath": CONFIG_DIR, "readOnly": true }),
        json!({ "name": "tmp", "mountPath": "/tmp" }),
    ];
    // The querier produces the scores people add in the web UI.
    if matches!(role, Role::Receive | Role::Write | Role::Querier) {
        args.push(format!("--kafka-brokers={}", kafka.bootstrap_servers));
        args.push(format!("--kafka-topic={}", kafka.topic));
        if role != Role::Querier {
            args.push(format!("--kafka-partitions={}", kafka.partitions));
            if let Some(rf) = kafka.replication_factor {
                args.push(format!("--kafka-replication={rf}"));
            }
        }
        if let Some(sec) = &kafka.security {
            args.push(format!(
                "--kafka-property=security.protocol={}",
                sec.protocol.as_str()
            ));
            if let Some(sasl) = &sec.sasl {
                args.push(format!(
                    "--kafka-property=sasl.mechanism={}",
                    sasl.mechanism.as_str()
                ));
                // Kubernetes expands $(VAR) in args from the container's env, so the
                // secret values never appear in the pod spec.
                args.push("--kafka-property=sasl.username=$(LOUPE_KAFKA_USERNAME)".into());
                args.push("--kafka-property=sasl.password=$(LOUPE_KAFKA_PASSWORD)".into());
                for (var, key) in [
                    ("LOUPE_KAFKA_USERNAME", &sasl.username_key),
                    ("LOUPE_KAFKA_PASSWORD", &sasl.password_key),
                ] {
                    env.push(json!({
                        "name": var,
                        "valueFrom": { "secretKeyRef": { "name": sasl.secret_name, "key": key } },
                    }));
                }
            }
            if let Some(tls) = &sec.tls {
                args.push(format!(
                    "--kafka-property=ssl.ca.location={KAFKA_CA_DIR}/{}",
                    tls.ca_key
                ));
                volumes.push(
                    json!({ "name": "kafka-ca", "secret": { "secretName": tls.ca_secret_name } }),
                );
                mounts.push(
                    json!({ "name": "kafka-ca", "mountPath": KAFKA_CA_DIR, "readOnly": true }),
                );
            }
        }
    }
    let mut env_from = Vec::new();
    if matches!(role, Role::Write | Role::Querier | Role::Compactor) {
        if let Some(secret) = &spec.storage.credentials_secret {
            env_from.push(json!({ "secretRef": { "name": secret } }));
        }
        if let (Some(claim), Some(path)) = (
            &spec.storage.volume_claim,
            spec.storage.url.strip_prefix("file://"),
        ) {
            volumes
                .push(json!({ "name": "blocks", "persistentVolumeClaim": { "claimName": claim } }));
            mounts.push(json!({ "name": "blocks", "mountPath": path }));
        }
    }
    let ports: Vec<Value> = match role {
        Role::Receive => vec![
            json!({ "name": "otlp-grpc", "containerPort": OTLP_GRPC_PORT }),
            json!({ "name": "otlp-http", "containerPort": OTLP_HTTP_PORT }),
            json!({ "name": "metrics", "containerPort": METRICS_PORT }),
        ],
        Role::Write | Role::Compactor => {
            vec![json!({ "name": "metrics", "containerPort": METRICS_PORT })]
        }
        Role::Querier => vec![json!({ "name": "http", "containerPort": QUERY_PORT })],
    };
    let resources = role
        .spec(platform)
        .resources
        .as_ref()
        .map(to_value)
        .unwrap_or_else(|| json!({ "requests": role.default_requests() }));
    let probe = |initial: i32| {
        json!({
            "httpGet": { "path": "/health", "port": role.ops_port() },
            "initialDelaySeconds": initial,
            "periodSeconds": 10,
            "timeoutSeconds": 2,
        })
    };
    let mut container = json!({
        "name": role.as_str(),
        "image": image,
        "args": args,
        "env": env,
        "ports": ports,
        "resources": resources,
        "readinessProbe": probe(2),
        "livenessProbe": probe(10),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
    });
    if !env_from.is_empty() {
        container["envFrom"] = json!(env_from);
    }
    if let Some(p) = spec.image_pull_policy {
        container["imagePullPolicy"] = json!(p.as_str());
    }
    json!({
        "metadata": {
            "labels": selector_labels(&name, role),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": role.ops_port().to_string(),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "serviceAccountName": name,
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "seccompProfile": { "type": "RuntimeDefault" },
            },
            // A writer hands its partitions over and writes what it decided on
            // SIGTERM; give it time to.
            "terminationGracePeriodSeconds": if role == Role::Write { 60 } else { 30 },
            "containers": [container],
            "volumes": volumes,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
    }

    /// Compares `objects` with a golden YAML file; `UPDATE_GOLDEN=1` rewrites it.
    pub(crate) fn assert_golden(file: &str, objects: &[Value]) {
        let text: String = objects
            .iter()
            .map(|o| format!("---\n{}", serde_saphyr::to_string(o).unwrap()))
            .collect();
        let path = golden_dir().join(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&path, &text).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            want == text,
            "{file} differs from what is rendered; run `UPDATE_GOLDEN=1 cargo test -p loupe-operator` and review the diff.\n--- rendered:\n{text}"
        );
    }

    fn example(file: &str) -> TracePlatform {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/examples")
            .join(file);
        let mut p: TracePlatform =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        p.metadata.uid = Some("2b1c5b1e-0000-4000-8000-000000000001".into());
        p
    }

    #[test]
    fn a_minimal_platform_renders_every_role_with_defaults() {
        let p = example("platform-minimal.yaml");
        let c = children(&p, "tenants: []\n").unwrap();
        assert_golden("platform-minimal.yaml", &c.to_values());
        assert_eq!(c.deployments.len(), 4);
        assert!(c.autoscalers.is_empty());
        // Receive and querier run 2 pods by default; the single writer and the
        // compactor get no PDB.
        assert_eq!(c.disruption_budgets.len(), 2);
        for d in &c.deployments {
            let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(owner.kind, "TracePlatform");
            assert_eq!(owner.controller, Some(true));
            let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let args = pod.containers[0].args.as_ref().unwrap();
            assert!(args.contains(&"--config=/etc/loupe/config.yaml".to_owned()));
            let serves = args[0] != "compactor";
            assert_eq!(
                args.contains(&"--require-keys".to_owned()),
                serves,
                "{args:?}"
            );
        }
        // One compactor, never two at once.
        let compactor = c.deployments[3].spec.as_ref().unwrap();
        assert_eq!(compactor.replicas, Some(1));
        assert_eq!(
            compactor.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
    }

    #[test]
    fn a_production_platform_renders_autoscaling_and_kafka_security() {
        let p = example("platform-production.yaml");
        let c = children(&p, "tenants: []\n").unwrap();
        assert_golden("platform-production.yaml", &c.to_values());
        assert_eq!(c.autoscalers.len(), 2, "receive and querier autoscale");
        let receive = &c.deployments[0];
        assert_eq!(
            receive.spec.as_ref().unwrap().replicas,
            None,
            "the HPA owns the replica count"
        );
        let pod = receive
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let text = serde_json::to_string(pod).unwrap();
        assert!(
            !text.contains("hunter2"),
            "secret values stay in the Secret"
        );
        assert!(
            text.contains("sasl.password=$(LOUPE_KAFKA_PASSWORD)"),
            "{text}"
        );
    }

    #[test]
    fn a_purge_job_runs_loupe_purge_with_the_compactors_storage_access() {
        let p = example("platform-production.yaml");
        let job = purge_job(&p, "team-a-prod/chat").unwrap();
        assert_golden("purge-job.yaml", &[to_value(&job)]);
        let name = job.metadata.name.as_deref().unwrap();
        assert_eq!(name, purge_job_name("loupe", "team-a-prod/chat"));
        assert_ne!(name, purge_job_name("loupe", "team-a-prod/chat2"));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap()[..3],
            [
                "purge".to_owned(),
                "--storage=s3://acme-traces/loupe".to_owned(),
                "--tenant=team-a-prod/chat".to_owned()
            ]
        );
        // The same credentials as the compactor, which also deletes blocks.
        let compactor = children(&p, "tenants: []\n").unwrap().deployments[3].clone();
        let compactor = &compactor.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.env_from, compactor.env_from);
        assert!(c.env_from.is_some());
        assert!(c.ports.is_none() && c.liveness_probe.is_none());

        // Names stay within the 63 characters of a pod label, however long the platform.
        let mut long = p.clone();
        long.metadata.name = Some("p".repeat(200));
        let job = purge_job(&long, "a/b").unwrap();
        assert!(job.metadata.name.unwrap().len() <= 63);
    }

    #[test]
    fn the_config_hash_follows_the_content() {
        let p = example("platform-minimal.yaml");
        let a = children(&p, "tenants: []\n").unwrap();
        let b = children(&p, "tenants: []\n").unwrap();
        let c = children(&p, "tenants:\n- id: a/b\n").unwrap();
        let hash = |c: &Children| {
            c.config_map.metadata.annotations.clone().unwrap()[CONFIG_HASH_ANNOTATION].clone()
        };
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(hash(&a), hash(&c));
        assert_eq!(hash(&a), config_hash("tenants: []\n"));
    }
}
