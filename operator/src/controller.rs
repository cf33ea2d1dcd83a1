//! The reconcilers: thin loops around the pure parts (`render`, `tenants`), applying
//! with server-side apply under one field manager and reporting through status
//! conditions and Events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use loupe_core::config::DataPlaneConfig;
use loupe_core::keys::{KeyHash, Scope};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::crd::{
    AlertKind, AlertRule, AlertRuleStatus, DeletionPolicy, NotificationTarget, SamplingPolicy,
    SamplingPolicyStatus, TargetStatus, TracePlatform, TracePlatformStatus, TraceProject,
    TraceProjectStatus,
};
use crate::kafka::{KafkaTarget, TopicAdmin, TopicOutcome};
use crate::render::{self, Role};
use crate::status::{Cond, merge};
use crate::tenants::{self, INGEST_KEY, ProjectKeys, QUERY_KEY, keys_secret_name};

/// Annotation on a TraceProject asking for new keys: set it to any new value.
pub const ROTATE_ANNOTATION: &str = "loupe.dev/rotate-keys";
/// Annotation on the key Secret: the rotation request its keys answer.
const ROTATED_FOR_ANNOTATION: &str = "loupe.dev/rotated-for";
/// Annotation on the key Secret naming the platform (`namespace/name`) that serves it,
/// so a new key re-renders that platform's config.
pub const PLATFORM_ANNOTATION: &str = "loupe.dev/platform";
/// Finalizer on projects whose data is deleted with them.
pub const DATA_FINALIZER: &str = "loupe.dev/delete-data";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub topics: Arc<dyn TopicAdmin>,
    pub reporter: Reporter,
    pub metrics: crate::metrics::Metrics,
    pub alerts: AlertSettings,
}

/// How AlertRules are evaluated.
pub struct AlertSettings {
    /// Query API to use instead of each platform's querier Service.
    pub query_url: Option<String>,
    /// Time between evaluations of a rule.
    pub interval: Duration,
    pub notifier: loupe_querier::notify::Notifier,
}

impl Context {
    fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// Publishes an Event on `obj`; a failure to publish is logged, never fatal.
    pub(crate) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder().publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }

    /// Publishes a Warning Event for the problem `cond` reports, unless the previous
    /// status already reported it (same type, reason and message).
    async fn warn_once<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        cond: &Cond,
    ) {
        let known = old
            .iter()
            .any(|c| c.type_ == cond.type_ && c.reason == cond.reason && c.message == cond.message);
        if !known {
            self.event(obj, true, &cond.reason, cond.message.clone())
                .await;
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies `obj` in `ns`.
async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await?;
    Ok(())
}

/// Deletes `name` if it exists.
async fn delete_if_present<K>(client: &Client, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Patches the status subresource (a merge patch of `status` only).
async fn patch_status<K>(api: &Api<K>, name: &str, status: impl Serialize) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// A Secret's value for `key`, when it is there and is text.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The key hashes of a project's key Secret, if it holds both keys.
pub fn secret_keys(secret: &Secret) -> Option<ProjectKeys> {
    Some(ProjectKeys {
        ingest: KeyHash::of(&secret_text(secret, INGEST_KEY)?),
        query: KeyHash::of(&secret_text(secret, QUERY_KEY)?),
    })
}

// ---------------------------------------------------------------------------------
// TracePlatform
// ---------------------------------------------------------------------------------

/// Reads the Kafka credentials a platform names, for the operator's admin client.
async fn kafka_target(client: &Client, platform: &TracePlatform) -> Result<KafkaTarget, String> {
    let kafka = &platform.spec.kafka;
    let mut properties = Vec::new();
    if let Some(sec) = &kafka.security {
        let ns = platform.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let read = |name: String, key: String| {
            let secrets = secrets.clone();
            async move {
                let s = secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| format!("reading Secret {name}: {e}"))?
                    .ok_or_else(|| format!("Secret {name} does not exist"))?;
                s.data
                    .and_then(|d| d.get(&key).cloned())
                    .and_then(|v| String::from_utf8(v.0).ok())
                    .ok_or_else(|| format!("Secret {name} has no key {key}"))
            }
        };
        properties.push(("security.protocol".into(), sec.protocol.as_str().into()));
        if let Some(sasl) = &sec.sasl {
            properties.push(("sasl.mechanism".into(), sasl.mechanism.as_str().into()));
            let user = read(sasl.secret_name.clone(), sasl.username_key.clone()).await?;
            let pass = read(sasl.secret_name.clone(), sasl.password_key.clone()).await?;
            properties.push(("sasl.username".into(), user));
            properties.push(("sasl.password".into(), pass));
        }
        if let Some(tls) = &sec.tls {
            let pem = read(tls.ca_secret_name.clone(), tls.ca_key.clone()).await?;
            properties.push(("ssl.ca.pem".into(), pem));
        }
    }
    Ok(KafkaTarget {
        brokers: kafka.bootstrap_servers.clone(),
        properties,
    })
}

pub async fn reconcile_platform(
    platform: Arc<TracePlatform>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled("TracePlatform");
    let client = &ctx.client;
    let ns = platform.namespace().unwrap_or_default();
    let name = platform.name_any();
    let projects = Api::<TraceProject>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let policies = Api::<SamplingPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut keys = BTreeMap::new();
    for project in projects.iter().filter(|p| tenants::serves(&platform, p)) {
        let pns = project.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &pns);
        if let Some(secret) = secrets
            .get_opt(&keys_secret_name(&project.name_any()))
            .await?
            && let Some(k) = secret_keys(&secret)
        {
            keys.insert(format!("{pns}/{}", project.name_any()), k);
        }
    }
    let plan = tenants::plan(&platform, &projects, &policies, &keys);
    let config = tenants::config_yaml(&plan.config);
    let children = render::children(&platform, &config)?;

    // The receivers' redaction key is made once and kept: a new one would change
    // the token of every hashed value.
    let platform_secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    if platform_secrets
        .get_opt(&render::redaction_key_secret_name(&name))
        .await?
        .is_none()
    {
        apply(client, &ns, &render::redaction_key_secret(&platform)).await?;
    }
    apply(client, &ns, &children.service_account).await?;
    apply(client, &ns, &children.config_map).await?;
    for d in &children.deployments {
        apply(client, &ns, d).await?;
    }
    for s in &children.services {
        apply(client, &ns, s).await?;
    }
    for h in &children.autoscalers {
        apply(client, &ns, h).await?;
    }
    for p in &children.disruption_budgets {
        apply(client, &ns, p).await?;
    }
    // An autoscaler or budget the spec no longer asks for is removed.
    for role in Role::ALL {
        let child = render::role_name(&name, role);
        let named = |m: &kube::api::ObjectMeta| m.name.as_deref() == Some(child.as_str());
        if !children.autoscalers.iter().any(|h| named(&h.metadata)) {
            delete_if_present::<HorizontalPodAutoscaler>(client, &ns, &child).await?;
        }
        if !children
            .disruption_budgets
            .iter()
            .any(|p| named(&p.metadata))
        {
            delete_if_present::<PodDisruptionBudget>(client, &ns, &child).await?;
        }
    }

    let kafka = &platform.spec.kafka;
    let topic = match kafka_target(client, &platform).await {
        Ok(target) => {
            ctx.topics
                .ensure(
                    target,
                    kafka.topic.clone(),
                    kafka.partitions,
                    kafka.replication_factor,
                )
                .await
        }
        Err(e) => Err(e),
    };
    let (topic_cond, topic_partitions) = match &topic {
        Ok(TopicOutcome::Created { partitions }) => (
            Cond::new(
                "KafkaTopic",
                true,
                "Created",
                format!("created topic {} with {partitions} partitions", kafka.topic),
            ),
            Some(*partitions),
        ),
        Ok(TopicOutcome::Grown { from, to }) => (
            Cond::new(
                "KafkaTopic",
                true,
                "PartitionsAdded",
                format!("topic {} grew from {from} to {to} partitions", kafka.topic),
            ),
            Some(*to),
        ),
        Ok(TopicOutcome::Unchanged { partitions }) => (
            Cond::new(
                "KafkaTopic",
                true,
                "Exists",
                format!("topic {} has {partitions} partitions", kafka.topic),
            ),
            Some(*partitions),
        ),
        Ok(TopicOutcome::CannotShrink { have, want }) => (
            Cond::new(
                "KafkaTopic",
                false,
                "CannotRemovePartitions",
                format!(
                    "topic {} has {have} partitions and the spec asks for {want}; Kafka cannot remove partitions, so it keeps {have} (set kafka.partitions to {have} or more)",
                    kafka.topic
                ),
            ),
            Some(*have),
        ),
        Err(e) => (
            Cond::new(
                "KafkaTopic",
                false,
                "KafkaUnreachable",
                format!("{e}; retrying"),
            ),
            None,
        ),
    };
    if let Ok(TopicOutcome::Created { .. } | TopicOutcome::Grown { .. }) = &topic {
        ctx.event(
            &*platform,
            false,
            &topic_cond.reason,
            topic_cond.message.clone(),
        )
        .await;
    }
    if !topic_cond.ok {
        ctx.event(
            &*platform,
            true,
            &topic_cond.reason,
            topic_cond.message.clone(),
        )
        .await;
    }
    let ready = if topic.is_ok() {
        Cond::new(
            "Ready",
            true,
            "Deployed",
            format!(
                "receive, write and querier are applied; the tenant config serves {} project(s)",
                plan.served.len()
            ),
        )
    } else {
        Cond::new(
            "Ready",
            false,
            "KafkaUnreachable",
            "the roles are applied but the Kafka topic could not be checked; see the KafkaTopic condition",
        )
    };
    let old = platform.status.clone().unwrap_or_default();
    let status = TracePlatformStatus {
        conditions: merge(
            &old.conditions,
            &[ready, topic_cond],
            platform.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: platform.metadata.generation,
        endpoints: Some(render::endpoints(&platform)),
        projects: Some(plan.served.len() as i32),
        topic_partitions: topic_partitions.or(old.topic_partitions),
    };
    let api: Api<TracePlatform> = Api::namespaced(client.clone(), &ns);
    patch_status(&api, &name, status).await?;
    Ok(if topic.is_ok() {
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(Duration::from_secs(30))
    })
}

// ---------------------------------------------------------------------------------
// TraceProject
// ---------------------------------------------------------------------------------

/// The key Secret of a project, keeping the keys of `existing` unless a rotation is
/// asked for. Returns the Secret and whether it holds new keys.
pub fn key_secret(
    project: &TraceProject,
    existing: Option<&Secret>,
    endpoints: Option<&crate::crd::Endpoints>,
) -> (Secret, bool) {
    let wanted_rotation = project.annotations().get(ROTATE_ANNOTATION).cloned();
    let answered = existing.and_then(|s| s.annotations().get(ROTATED_FOR_ANNOTATION).cloned());
    let old = |k: &str| {
        existing
            .and_then(|s| s.data.as_ref()?.get(k).cloned())
            .filter(|v| !v.0.is_empty())
    };
    let rotate = wanted_rotation.is_some() && wanted_rotation != answered;
    let (ingest, query, fresh) = match (old(INGEST_KEY), old(QUERY_KEY)) {
        (Some(i), Some(q)) if !rotate => (i, q, false),
        _ => (
            ByteString(loupe_core::keys::generate(Scope::Ingest).into_bytes()),
            ByteString(loupe_core::keys::generate(Scope::Query).into_bytes()),
            true,
        ),
    };
    let ns = project.namespace().unwrap_or_default();
    let mut data = BTreeMap::from([
        (INGEST_KEY.to_owned(), ingest),
        (QUERY_KEY.to_owned(), query),
        (
            "tenant".to_owned(),
            ByteString(format!("{ns}/{}", project.name_any()).into_bytes()),
        ),
    ]);
    if let Some(e) = endpoints {
        for (k, v) in [
            ("otlp-grpc-endpoint", &e.otlp_grpc),
            ("otlp-http-endpoint", &e.otlp_http),
            ("query-url", &e.query),
        ] {
            data.insert(k.to_owned(), ByteString(v.clone().into_bytes()));
        }
    }
    let platform_ref = &project.spec.platform_ref;
    let mut annotations = BTreeMap::from([(
        PLATFORM_ANNOTATION.to_owned(),
        format!(
            "{}/{}",
            platform_ref.namespace.as_deref().unwrap_or(&ns),
            platform_ref.name
        ),
    )]);
    let answers = if rotate { wanted_rotation } else { answered };
    if let Some(r) = answers {
        annotations.insert(ROTATED_FOR_ANNOTATION.to_owned(), r);
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(keys_secret_name(&project.name_any())),
            namespace: Some(ns),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "loupe-operator".to_owned(),
                ),
                ("loupe.dev/project".to_owned(), project.name_any()),
            ])),
            annotations: Some(annotations),
            owner_references: project.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    (secret, fresh)
}

/// Whether the platform's rendered config serves `keys` for `tenant`.
fn config_serves(cm: &ConfigMap, tenant: &str, keys: ProjectKeys) -> bool {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get("config.yaml")) else {
        return false;
    };
    let Ok(config) = DataPlaneConfig::from_yaml(text) else {
        return false;
    };
    config.tenants.iter().any(|t| {
        t.id.as_str() == tenant
            && t.keys.iter().any(|k| k.hash == keys.ingest)
            && t.keys.iter().any(|k| k.hash == keys.query)
    })
}

/// Carries out `deletionPolicy: Delete` for a project being deleted: runs the
/// platform's purge Job for its tenant and, once the Job succeeded, removes the
/// finalizer so the project goes. Until then the project (and its name) stays, so a
/// project recreated under the same name cannot have its new data purged.
async fn delete_project_data(project: &TraceProject, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    let tenant = format!("{ns}/{name}");
    let (platform_ns, platform_name) = project.platform();
    let Some(platform) = Api::<TracePlatform>::namespaced(client.clone(), &platform_ns)
        .get_opt(platform_name)
        .await?
    else {
        let note = format!(
            "spec.deletionPolicy is Delete, but TracePlatform {platform_ns}/{platform_name} does not exist, so its storage is unknown. \
             Recreate it, or delete the prefixes tenants/{tenant}/ and deletions/{tenant}/ from its storage yourself \
             and remove the finalizer {DATA_FINALIZER}"
        );
        ctx.event(project, true, "DataDeletionBlocked", note).await;
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &platform_ns);
    let job_name = render::purge_job_name(platform_name, &tenant);
    let Some(job) = jobs.get_opt(&job_name).await? else {
        let job = render::purge_job(&platform, &tenant)?;
        jobs.create(&PostParams::default(), &job).await?;
        ctx.event(
            project,
            false,
            "DataDeletionStarted",
            format!(
                "Job {platform_ns}/{job_name} deletes this project's stored traces in {} after {}",
                platform.spec.storage.url,
                render::PURGE_SETTLE
            ),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(15)));
    };
    let status = job.status.clone().unwrap_or_default();
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    if let Some(failed) = condition("Failed") {
        let note = format!(
            "Job {platform_ns}/{job_name} could not delete this project's stored traces: {}. \
             See `kubectl logs -n {platform_ns} job/{job_name}`; delete the Job to try again",
            failed.message.as_deref().unwrap_or("no message")
        );
        ctx.event(project, true, "DataDeletionFailed", note).await;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    if condition("Complete").is_none() && status.succeeded.unwrap_or(0) == 0 {
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    // Done: release the project, then tidy the Job up (its pods with it).
    let finalizers: Vec<&String> = project
        .finalizers()
        .iter()
        .filter(|f| *f != DATA_FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": project.resource_version(),
        }
    });
    Api::<TraceProject>::namespaced(client.clone(), &ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    ctx.event(
        project,
        false,
        "DataDeleted",
        format!("Job {platform_ns}/{job_name} deleted this project's stored traces"),
    )
    .await;
    // Background propagation: a Job deleted through the API orphans its pods otherwise.
    match jobs.delete(&job_name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            tracing::warn!(error = %e, job = %job_name, "could not delete a finished purge Job; its TTL removes it")
        }
    }
    Ok(Action::await_change())
}

pub async fn reconcile_project(
    project: Arc<TraceProject>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled("TraceProject");
    let client = &ctx.client;
    let ns = project.namespace().unwrap_or_default();
    let name = project.name_any();
    let api: Api<TraceProject> = Api::namespaced(client.clone(), &ns);
    let has_finalizer = project.finalizers().iter().any(|f| f == DATA_FINALIZER);

    if project.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            return delete_project_data(&project, &ctx).await;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = project.spec.deletion_policy == DeletionPolicy::Delete;
    if wants_finalizer != has_finalizer {
        let mut finalizers: Vec<String> = project
            .finalizers()
            .iter()
            .filter(|f| *f != DATA_FINALIZER)
            .cloned()
            .collect();
        if wants_finalizer {
            finalizers.push(DATA_FINALIZER.to_owned());
        }
        // Conditional on the resourceVersion: a concurrent change makes it fail
        // (409) and the reconcile runs again on the new object.
        let patch = json!({
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": project.resource_version(),
            }
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }

    let (platform_ns, platform_name) = project.platform();
    let platform = Api::<TracePlatform>::namespaced(client.clone(), &platform_ns)
        .get_opt(platform_name)
        .await?;
    let endpoints = platform.as_ref().map(render::endpoints);

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = keys_secret_name(&name);
    let existing = secrets.get_opt(&secret_name).await?;
    let (secret, fresh) = key_secret(&project, existing.as_ref(), endpoints.as_ref());
    if fresh || existing.as_ref().map(|s| &s.data) != Some(&secret.data) {
        apply(client, &ns, &secret).await?;
    }
    if fresh && existing.is_some() {
        ctx.event(
            &*project,
            false,
            "KeysRotated",
            format!("new ingest and query keys are in Secret {secret_name}; the old ones stop working when the platform reloads its config"),
        )
        .await;
    }
    let keys = secret_keys(&secret).expect("the Secret was just built with both keys");

    let policies = Api::<SamplingPolicy>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let applied_policy = tenants::policies_for(&project, &policies).first().copied();
    let tenant = format!("{ns}/{name}");
    let (ready, requeue) = match &platform {
        None => (
            Cond::new(
                "Ready",
                false,
                "PlatformNotFound",
                format!("TracePlatform {platform_ns}/{platform_name} does not exist"),
            ),
            Duration::from_secs(30),
        ),
        Some(p) => match tenants::tenant_entry(&project, applied_policy, keys) {
            Err(reason) => (
                Cond::new("Ready", false, "InvalidSpec", reason),
                Duration::from_secs(300),
            ),
            Ok(_) => {
                let cm = Api::<ConfigMap>::namespaced(client.clone(), &platform_ns)
                    .get_opt(&render::config_map_name(&p.name_any()))
                    .await?;
                if cm
                    .as_ref()
                    .is_some_and(|cm| config_serves(cm, &tenant, keys))
                {
                    (
                        Cond::new(
                            "Ready",
                            true,
                            "Serving",
                            format!(
                                "in the tenant config of {platform_ns}/{platform_name}; keys are in Secret {secret_name}"
                            ),
                        ),
                        Duration::from_secs(300),
                    )
                } else {
                    (
                        Cond::new(
                            "Ready",
                            false,
                            "WaitingForPlatform",
                            format!(
                                "waiting for {platform_ns}/{platform_name} to add the project to its tenant config"
                            ),
                        ),
                        Duration::from_secs(5),
                    )
                }
            }
        },
    };
    let old = project.status.clone().unwrap_or_default();
    if !ready.ok && ready.reason != "WaitingForPlatform" {
        ctx.warn_once(&*project, &old.conditions, &ready).await;
    }
    let status = TraceProjectStatus {
        conditions: merge(
            &old.conditions,
            &[ready],
            project.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: project.metadata.generation,
        tenant: Some(tenant),
        keys_secret: Some(secret_name),
        endpoints,
        sampling_policy: applied_policy.map(|p| p.name_any()),
    };
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(requeue))
}

// ---------------------------------------------------------------------------------
// SamplingPolicy
// ---------------------------------------------------------------------------------

pub async fn reconcile_policy(
    policy: Arc<SamplingPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled("SamplingPolicy");
    let client = &ctx.client;
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let projects = Api::<TraceProject>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let policies = Api::<SamplingPolicy>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let mut selected = Vec::new();
    let mut conflicts = Vec::new();
    for project in projects.iter().filter(|p| tenants::selects(&policy, p)) {
        selected.push(project.name_any());
        let all = tenants::policies_for(project, &policies);
        let others: Vec<String> = all
            .iter()
            .map(|p| p.name_any())
            .filter(|n| *n != name)
            .collect();
        if !others.is_empty() {
            let applied = all.first().map(|p| p.name_any()).unwrap_or_default();
            conflicts.push(format!(
                "project {} is also selected by {}; {applied} (the oldest) applies",
                project.name_any(),
                others.join(", ")
            ));
        }
    }
    let mut conds = Vec::new();
    match tenants::sampling_policy(&policy.spec.rules) {
        Ok(_) => conds.push(Cond::new(
            "Ready",
            true,
            "Applied",
            format!("applies to {} project(s)", selected.len()),
        )),
        Err(e) => conds.push(Cond::new("Ready", false, "InvalidRules", e)),
    }
    conds.push(if conflicts.is_empty() {
        Cond::new("Conflict", false, "NoConflict", "")
    } else {
        Cond::new(
            "Conflict",
            true,
            "SelectedByAnotherPolicy",
            conflicts.join("; "),
        )
    });
    let old = policy.status.clone().unwrap_or_default();
    // Ready=False and Conflict=True are the problems.
    for c in conds.iter().filter(|c| (c.type_ == "Ready") != c.ok) {
        ctx.warn_once(&*policy, &old.conditions, c).await;
    }
    let status = SamplingPolicyStatus {
        conditions: merge(
            &old.conditions,
            &conds,
            policy.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: policy.metadata.generation,
        projects: selected,
    };
    let api: Api<SamplingPolicy> = Api::namespaced(client.clone(), &ns);
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

// ---------------------------------------------------------------------------------
// AlertRule
// ---------------------------------------------------------------------------------

/// Checks what the schema cannot: durations parse and the baseline is longer than
/// the window.
/// The evaluator's rule for an AlertRule spec (its checks name the field).
pub fn alert_rule_spec(rule: &AlertRule) -> loupe_querier::alerts::RuleSpec {
    use loupe_querier::alerts::AlertKind as K;
    let s = &rule.spec;
    loupe_querier::alerts::RuleSpec {
        kind: match s.kind {
            AlertKind::CostSpike => K::CostSpike,
            AlertKind::ScoreDrop => K::ScoreDrop,
            AlertKind::LatencyPercentile => K::LatencyPercentile,
            AlertKind::ErrorRate => K::ErrorRate,
        },
        window: s.window.clone(),
        baseline: s.baseline.clone(),
        threshold: s.threshold,
        for_duration: s.for_duration.clone(),
        resolve_after: s.resolve_after.clone(),
        score_name: s.score_name.clone(),
        percentile: s.percentile,
        level: s.level,
        min_cost: s.min_cost,
        min_count: s.min_count,
        filters: s.filters.clone(),
    }
}

/// Checks a rule as the evaluator will read it.
pub fn validate_alert(rule: &AlertRule) -> Result<loupe_querier::alerts::Rule, String> {
    alert_rule_spec(rule).validate()
}

fn rfc3339_ns(ns: i64) -> String {
    Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn ns_of(text: Option<&str>) -> Option<i64> {
    text?
        .parse::<Timestamp>()
        .ok()
        .and_then(|t| i64::try_from(t.as_nanosecond()).ok())
}

/// The evaluator's state kept in an AlertRule's status.
fn alert_status_of(old: &AlertRuleStatus) -> loupe_querier::alerts::AlertStatus {
    use loupe_querier::alerts::AlertState as S;
    loupe_querier::alerts::AlertStatus {
        state: match old.state.as_deref() {
            Some("Pending") => S::Pending,
            Some("Firing") => S::Firing,
            Some("Resolved") => S::Resolved,
            _ => S::Inactive,
        },
        since_ns: ns_of(old.since.as_deref()).unwrap_or(0),
        clear_since_ns: ns_of(old.clear_since.as_deref()),
        value: old.value,
        last_evaluation_ns: ns_of(old.last_evaluation.as_deref()).unwrap_or(0),
        last_error: old.last_error.clone(),
    }
}

/// Resolves a target's URL (inline or from a Secret of the rule's namespace).
async fn target_sink(
    client: &Client,
    ns: &str,
    t: &NotificationTarget,
) -> Result<loupe_querier::notify::Sink, String> {
    use loupe_querier::notify::{Target, UrlTarget};
    let url = async |u: &Option<crate::crd::UrlTarget>| -> Result<Option<UrlTarget>, String> {
        let Some(u) = u else { return Ok(None) };
        if let Some(url) = &u.url {
            return Ok(Some(UrlTarget { url: url.clone() }));
        }
        let Some(from) = &u.url_from else {
            return Err("set either url or urlFrom".into());
        };
        let secret = Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt(&from.name)
            .await
            .map_err(|e| format!("reading Secret {ns}/{}: {e}", from.name))?
            .ok_or_else(|| format!("Secret {ns}/{} does not exist", from.name))?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&from.key))
            .ok_or_else(|| format!("Secret {ns}/{} has no key {}", from.name, from.key))?;
        let text = String::from_utf8(bytes.0.clone())
            .map_err(|_| format!("Secret {ns}/{} key {} is not text", from.name, from.key))?;
        Ok(Some(UrlTarget {
            url: text.trim().to_owned(),
        }))
    };
    Target {
        webhook: url(&t.webhook).await?,
        slack: url(&t.slack).await?,
        alertmanager: url(&t.alertmanager).await?,
    }
    .validate()
}

/// Where a rule's project can be queried, with which key; or why not (a reason and
/// a message for the `Evaluating` condition).
async fn alert_source(
    ctx: &Context,
    ns: &str,
    project: &TraceProject,
) -> Result<Result<loupe_querier::alerts::HttpData, (&'static str, String)>, Error> {
    let client = &ctx.client;
    let secret_name = keys_secret_name(&project.name_any());
    let key = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&secret_name)
        .await?
        .and_then(|s| secret_text(&s, QUERY_KEY));
    let Some(key) = key else {
        return Ok(Err((
            "KeysNotReady",
            format!("the project's key Secret {ns}/{secret_name} has no query key yet"),
        )));
    };
    let base = match &ctx.alerts.query_url {
        Some(url) => url.clone(),
        None => {
            let (platform_ns, name) = project.platform();
            match Api::<TracePlatform>::namespaced(client.clone(), &platform_ns)
                .get_opt(name)
                .await?
            {
                Some(p) => render::endpoints(&p).query,
                None => {
                    return Ok(Err((
                        "PlatformNotFound",
                        format!("TracePlatform {platform_ns}/{name} does not exist"),
                    )));
                }
            }
        }
    };
    Ok(Ok(loupe_querier::alerts::HttpData::new(&base, Some(key))))
}

pub async fn reconcile_alert(rule: Arc<AlertRule>, ctx: Arc<Context>) -> Result<Action, Error> {
    use loupe_querier::alerts::{AlertState, advance, evaluate, format_value};
    ctx.metrics.reconciled("AlertRule");
    let client = &ctx.client;
    let ns = rule.namespace().unwrap_or_default();
    let name = rule.name_any();
    let project = Api::<TraceProject>::namespaced(client.clone(), &ns)
        .get_opt(&rule.spec.project_ref)
        .await?;
    let old = rule.status.clone().unwrap_or_default();
    let api: Api<AlertRule> = Api::namespaced(client.clone(), &ns);
    let interval = ctx.alerts.interval;
    let (valid, project) = match (validate_alert(&rule), project) {
        (Ok(v), Some(p)) => (v, p),
        (invalid, _) => {
            let ready = match invalid {
                Err(e) => Cond::new("Ready", false, "InvalidRule", e),
                Ok(_) => Cond::new(
                    "Ready",
                    false,
                    "ProjectNotFound",
                    format!("TraceProject {ns}/{} does not exist", rule.spec.project_ref),
                ),
            };
            ctx.warn_once(&*rule, &old.conditions, &ready).await;
            let evaluating = Cond::new(
                "Evaluating",
                false,
                "NotReady",
                "the rule is not evaluated until it is Ready",
            );
            let status = AlertRuleStatus {
                conditions: merge(
                    &old.conditions,
                    &[ready, evaluating],
                    rule.metadata.generation,
                    Timestamp::now(),
                ),
                observed_generation: rule.metadata.generation,
                state: Some("NotEvaluated".into()),
                ..AlertRuleStatus::default()
            };
            patch_status(&api, &name, status).await?;
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    let ready = Cond::new(
        "Ready",
        true,
        "Valid",
        "the rule is valid and its project exists",
    );
    let now_ns = i64::try_from(Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
    let source = alert_source(&ctx, &ns, &project).await?;
    let result = match &source {
        Ok(data) => evaluate(&valid, data, now_ns).await,
        Err((_, message)) => Err(message.clone()),
    };
    let evaluating = match (&source, &result) {
        (Err((reason, message)), _) => Cond::new("Evaluating", false, reason, message.clone()),
        (Ok(_), Err(e)) => Cond::new("Evaluating", false, "QueryFailed", e.clone()),
        (Ok(_), Ok(_)) => Cond::new(
            "Evaluating",
            true,
            "Evaluated",
            format!(
                "evaluated every {}",
                humantime_serde::re::humantime::format_duration(interval)
            ),
        ),
    };
    if !evaluating.ok {
        ctx.warn_once(&*rule, &old.conditions, &evaluating).await;
    }
    let (next, changed) = advance(
        &alert_status_of(&old),
        &valid,
        result.as_ref().map_err(String::as_str),
        now_ns,
    );
    let tenant = format!("{ns}/{}", project.name_any());
    if let Some(state) = changed {
        let summary = result
            .as_ref()
            .map(|e| e.summary.clone())
            .unwrap_or_default();
        let (warning, reason) = match state {
            AlertState::Firing => (true, "AlertFiring"),
            AlertState::Pending => (false, "AlertPending"),
            AlertState::Resolved => (false, "AlertResolved"),
            AlertState::Inactive => (false, "AlertInactive"),
        };
        ctx.event(&*rule, warning, reason, summary).await;
    }
    // Notifications: every target on firing and resolving; Alertmanager at every
    // evaluation while firing (its alert expires otherwise).
    let mut targets: Vec<TargetStatus> = Vec::with_capacity(rule.spec.notify.len());
    let eval = result.as_ref().ok();
    let traces_url = match (&source, eval) {
        (Ok(_), Some(e)) => {
            let base = ctx.alerts.query_url.clone().unwrap_or_else(|| {
                // The platform's query URL, as the project's status shows it.
                project
                    .status
                    .as_ref()
                    .and_then(|s| s.endpoints.as_ref())
                    .map(|e| e.query.clone())
                    .unwrap_or_default()
            });
            Some(format!(
                "{}{}",
                base.trim_end_matches('/'),
                e.traces_path(&valid)
            ))
        }
        _ => old.traces_url.clone(),
    };
    let mut sends = Vec::new();
    for (i, target) in rule.spec.notify.iter().enumerate() {
        let previous = old.targets.get(i).cloned().unwrap_or_default();
        let sink = target_sink(client, &ns, target).await;
        let mut st = TargetStatus {
            target: match &sink {
                Ok(s) => s.redacted(),
                Err(_) => previous.target.clone(),
            },
            last_sent: previous.last_sent.clone(),
            last_error: previous.last_error.clone(),
        };
        match (sink, eval) {
            (Err(e), _) => st.last_error = Some(e),
            (Ok(sink), Some(e)) => {
                let due = match changed {
                    Some(AlertState::Firing) | Some(AlertState::Resolved) => true,
                    None => {
                        next.state == AlertState::Firing
                            && matches!(sink, loupe_querier::notify::Sink::Alertmanager(_))
                    }
                    Some(_) => false,
                };
                if due {
                    let note = loupe_querier::notify::Notification {
                        rule: name.clone(),
                        project: tenant.clone(),
                        kind: valid.kind,
                        state: next.state,
                        value: e.value,
                        threshold: e.threshold,
                        summary: e.summary.clone(),
                        since_ns: next.since_ns,
                        window_start_ns: e.start_ns,
                        window_end_ns: e.end_ns,
                        traces_url: traces_url.clone().unwrap_or_default(),
                    };
                    sends.push((i, sink, note));
                }
            }
            (Ok(_), None) => {}
        }
        targets.push(st);
    }
    // Sent together; a failing target delays the status, never the other targets.
    let outcomes = futures::future::join_all(
        sends
            .iter()
            .map(|(_, sink, note)| ctx.alerts.notifier.send(sink, note, now_ns)),
    )
    .await;
    for ((i, _, _), outcome) in sends.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {
                targets[*i].last_sent = Some(rfc3339_ns(now_ns));
                targets[*i].last_error = None;
            }
            Err(e) => targets[*i].last_error = Some(e),
        }
    }
    let status = AlertRuleStatus {
        conditions: merge(
            &old.conditions,
            &[ready, evaluating],
            rule.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: rule.metadata.generation,
        state: Some(next.state.as_str().into()),
        since: (next.since_ns > 0).then(|| rfc3339_ns(next.since_ns)),
        clear_since: next.clear_since_ns.map(rfc3339_ns),
        value: next.value,
        value_text: next.value.map(|v| format_value(valid.kind, v)),
        threshold: Some(valid.threshold),
        summary: eval.map(|e| e.summary.clone()).or(old.summary.clone()),
        traces_url,
        last_evaluation: Some(rfc3339_ns(now_ns)),
        last_error: next.last_error.clone(),
        targets,
    };
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(interval))
}

/// Requeue with backoff on errors; the error is logged and counted, never fatal.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&()).into_owned();
    tracing::warn!(kind, name = %obj.meta().name.clone().unwrap_or_default(), %error, "reconcile failed; retrying");
    ctx.metrics.failure(&kind);
    Action::requeue(Duration::from_secs(15))
}
