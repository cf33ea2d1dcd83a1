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
    AlertKind, AlertRule, AlertRuleStatus, DeletionPolicy, SamplingPolicy, SamplingPolicyStatus,
    TracePlatform, TracePlatformStatus, TraceProject, TraceProjectStatus, parse_duration,
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
}

impl Context {
    fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// Publishes an Event on `obj`; a failure to publish is logged, never fatal.
    async fn event<K: Resource<DynamicType = ()>>(
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

/// The key hashes of a project's key Secret, if it holds both keys.
pub fn secret_keys(secret: &Secret) -> Option<ProjectKeys> {
    let get = |k: &str| {
        secret
            .data
            .as_ref()?
            .get(k)
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::to_owned)
    };
    Some(ProjectKeys {
        ingest: KeyHash::of(&get(INGEST_KEY)?),
        query: KeyHash::of(&get(QUERY_KEY)?),
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
    let platform_ns = project
        .spec
        .platform_ref
        .namespace
        .clone()
        .unwrap_or_else(|| ns.clone());
    let platform_name = &project.spec.platform_ref.name;
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

    let platform_ns = project
        .spec
        .platform_ref
        .namespace
        .clone()
        .unwrap_or_else(|| ns.clone());
    let platform_name = &project.spec.platform_ref.name;
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
pub fn validate_alert(rule: &AlertRule) -> Result<(), String> {
    let s = &rule.spec;
    let window = parse_duration("window", &s.window)?;
    if let Some(b) = &s.baseline {
        let baseline = parse_duration("baseline", b)?;
        if baseline <= window {
            return Err(format!(
                "baseline {b} must be longer than window {}",
                s.window
            ));
        }
    } else if matches!(s.kind, AlertKind::CostSpike | AlertKind::ScoreDrop) {
        // The default baseline (7d) must still exceed the window.
        if window >= Duration::from_secs(7 * 86_400) {
            return Err(format!(
                "window {} must be shorter than the default baseline of 7d",
                s.window
            ));
        }
    }
    if let Some(f) = &s.for_duration {
        parse_duration("for", f)?;
    }
    Ok(())
}

pub async fn reconcile_alert(rule: Arc<AlertRule>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled("AlertRule");
    let client = &ctx.client;
    let ns = rule.namespace().unwrap_or_default();
    let name = rule.name_any();
    let project = Api::<TraceProject>::namespaced(client.clone(), &ns)
        .get_opt(&rule.spec.project_ref)
        .await?;
    let ready = match (validate_alert(&rule), project) {
        (Err(e), _) => Cond::new("Ready", false, "InvalidRule", e),
        (Ok(()), None) => Cond::new(
            "Ready",
            false,
            "ProjectNotFound",
            format!("TraceProject {ns}/{} does not exist", rule.spec.project_ref),
        ),
        (Ok(()), Some(_)) => Cond::new(
            "Ready",
            true,
            "Valid",
            "the rule is valid and its project exists",
        ),
    };
    let evaluating = Cond::new(
        "Evaluating",
        false,
        "EvaluationNotAvailable",
        "this Loupe version validates and stores alert rules; evaluation and notifications arrive in a later version",
    );
    let old = rule.status.clone().unwrap_or_default();
    if !ready.ok {
        ctx.warn_once(&*rule, &old.conditions, &ready).await;
    }
    let status = AlertRuleStatus {
        conditions: merge(
            &old.conditions,
            &[ready, evaluating],
            rule.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: rule.metadata.generation,
        state: Some("NotEvaluated".into()),
    };
    let api: Api<AlertRule> = Api::namespaced(client.clone(), &ns);
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(Duration::from_secs(600)))
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
