//! `loupe operator`: leader election and the four controllers.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::controller::{self, Context, PLATFORM_ANNOTATION};
use crate::crd::{AlertRule, SamplingPolicy, TracePlatform, TraceProject};
use crate::kafka::RdKafkaTopics;
use crate::metrics::Metrics;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Take a Lease before reconciling, so that only one replica acts.
    pub leader_election: bool,
    /// Namespace of the Lease (the operator's own).
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    /// Query API for AlertRule evaluation instead of each platform's querier Service.
    pub query_url: Option<String>,
    /// Time between evaluations of each AlertRule.
    pub alert_interval: std::time::Duration,
    /// Serve the sidecar-injection webhook (every replica does, leader or not).
    pub webhook: Option<WebhookSettings>,
}

/// Where the injection webhook listens and where its certificate comes from.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub addr: std::net::SocketAddr,
    pub certificate: crate::webhook_tls::CertSource,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API")]
    Client(#[from] kube::Error),
    #[error("leader election: {0}")]
    Lease(String),
    #[error("lost the leader lease; exiting so that a replica that holds it acts alone")]
    LostLease,
}

const MANAGED: &str = "app.kubernetes.io/managed-by=loupe-operator";

/// Runs the operator until a shutdown signal (or the loss of the leader lease);
/// `metrics` are registered by the caller, which serves them.
pub async fn run(settings: Settings, metrics: Metrics) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        topics: Arc::new(RdKafkaTopics::default()),
        reporter: Reporter {
            controller: "loupe-operator".into(),
            instance: Some(settings.identity.clone()),
        },
        metrics,
        alerts: crate::controller::AlertSettings {
            query_url: settings.query_url.clone(),
            interval: settings.alert_interval,
            notifier: loupe_querier::notify::Notifier::new(settings.alert_interval),
        },
    });
    if let Some(webhook) = settings.webhook {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let handle = axum_server::Handle::new();
            if let Err(e) =
                crate::webhook_tls::serve(ctx, webhook.addr, webhook.certificate, handle).await
            {
                // Pods are admitted without the agent (failurePolicy Ignore); the
                // controllers go on.
                tracing::error!(
                    error = format!("{e:#}"),
                    "the injection webhook is not served"
                );
            }
        });
    }

    let mut lease = None;
    if settings.leader_election {
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
                .with_namespace(&settings.lease_namespace)
                .with_identity(&settings.identity)
                .with_duration(15)
                .with_grace(5)
                .build()
                .await
                .map_err(|e| RunError::Lease(e.to_string()))?;
        let (mut leading, task) = manager.watch().await;
        tracing::info!(lease = %settings.lease_name, namespace = %settings.lease_namespace, "waiting for the leader lease");
        while !*leading.borrow_and_update() {
            leading
                .changed()
                .await
                .map_err(|_| RunError::Lease("the lease manager stopped".into()))?;
        }
        tracing::info!(identity = %settings.identity, "leading: reconciling");
        lease = Some((leading, task));
    }

    let controllers = run_controllers(client, ctx);
    match lease {
        Some((mut leading, _task)) => {
            tokio::select! {
                () = controllers => Ok(()),
                _ = async {
                    loop {
                        if leading.changed().await.is_err() || !*leading.borrow() {
                            return;
                        }
                    }
                } => Err(RunError::LostLease),
            }
        }
        None => {
            controllers.await;
            Ok(())
        }
    }
}

/// Runs every controller until a shutdown signal.
async fn run_controllers(client: Client, ctx: Arc<Context>) {
    let managed = || watcher::Config::default().labels(MANAGED);
    // TracePlatform: its children, and every input of its tenant config.
    let platforms = Controller::new(
        Api::<TracePlatform>::all(client.clone()),
        watcher::Config::default(),
    );
    let platform_store = platforms.store();
    let platforms = platforms
        .owns(Api::<Deployment>::all(client.clone()), managed())
        .owns(Api::<Service>::all(client.clone()), managed())
        .owns(Api::<ConfigMap>::all(client.clone()), managed())
        .owns(Api::<ServiceAccount>::all(client.clone()), managed())
        .owns(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            managed(),
        )
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), managed())
        .watches(
            Api::<TraceProject>::all(client.clone()),
            watcher::Config::default(),
            |p| {
                let r = &p.spec.platform_ref;
                let ns = r.namespace.clone().or_else(|| p.namespace())?;
                Some(ObjectRef::<TracePlatform>::new(&r.name).within(&ns))
            },
        )
        .watches(
            Api::<SamplingPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |_| {
                platform_store
                    .state()
                    .iter()
                    .map(|p| ObjectRef::from_obj(&**p))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().labels(&format!("{MANAGED},loupe.dev/project")),
            |s| {
                let (ns, name) = s.annotations().get(PLATFORM_ANNOTATION)?.split_once('/')?;
                Some(ObjectRef::<TracePlatform>::new(name).within(ns))
            },
        )
        .shutdown_on_signal()
        .run(
            controller::reconcile_platform,
            controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| log_result("TracePlatform", res));

    // TraceProject: its key Secret; its platform and the platform's config.
    let projects = Controller::new(
        Api::<TraceProject>::all(client.clone()),
        watcher::Config::default(),
    );
    let project_store = projects.store();
    let by_platform = move |ns: String, platform: String| {
        project_store
            .state()
            .iter()
            .filter(|p| {
                let r = &p.spec.platform_ref;
                r.name == platform
                    && r.namespace.clone().or_else(|| p.namespace()) == Some(ns.clone())
            })
            .map(|p| ObjectRef::from_obj(&**p))
            .collect::<Vec<_>>()
    };
    let by_platform2 = by_platform.clone();
    let projects = projects
        .owns(Api::<Secret>::all(client.clone()), managed())
        .watches(
            Api::<TracePlatform>::all(client.clone()),
            watcher::Config::default(),
            move |p| by_platform(p.namespace().unwrap_or_default(), p.name_any()),
        )
        .watches(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("{MANAGED},app.kubernetes.io/component=config")),
            move |cm| match cm.labels().get("app.kubernetes.io/instance") {
                Some(platform) => {
                    by_platform2(cm.namespace().unwrap_or_default(), platform.clone())
                }
                None => Vec::new(),
            },
        )
        .shutdown_on_signal()
        .run(
            controller::reconcile_project,
            controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| log_result("TraceProject", res));

    // SamplingPolicy: the projects of its namespace.
    let policies = Controller::new(
        Api::<SamplingPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let policy_store = policies.store();
    let policies = policies
        .watches(
            Api::<TraceProject>::all(client.clone()),
            watcher::Config::default(),
            move |p| {
                policy_store
                    .state()
                    .iter()
                    .filter(|x| x.namespace() == p.namespace())
                    .map(|x| ObjectRef::from_obj(&**x))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(
            controller::reconcile_policy,
            controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| log_result("SamplingPolicy", res));

    // AlertRule: its project.
    let alerts = Controller::new(
        Api::<AlertRule>::all(client.clone()),
        watcher::Config::default(),
    );
    let alert_store = alerts.store();
    let alerts = alerts
        .watches(
            Api::<TraceProject>::all(client.clone()),
            watcher::Config::default(),
            move |p| {
                alert_store
                    .state()
                    .iter()
                    .filter(|a| {
                        a.namespace() == p.namespace() && a.spec.project_ref == p.name_any()
                    })
                    .map(|a| ObjectRef::from_obj(&**a))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(controller::reconcile_alert, controller::error_policy, ctx)
        .for_each(|res| log_result("AlertRule", res));

    tokio::join!(platforms, projects, policies, alerts);
    tracing::info!("operator stopped");
}

async fn log_result<K, E>(kind: &'static str, res: Result<(ObjectRef<K>, Action), E>)
where
    K: kube::Resource,
    E: std::fmt::Display,
{
    match res {
        Ok((obj, _)) => tracing::debug!(kind, object = %obj.name, "reconciled"),
        Err(e) => tracing::debug!(kind, error = %e, "reconcile error"),
    }
}
