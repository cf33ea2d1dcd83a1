//! End to end against a real cluster, when `LOUPE_E2E_KUBECONFIG` names a kubeconfig:
//! installs the CRDs, runs `loupe operator` against the cluster, applies a
//! TracePlatform and a dev and a prod TraceProject in two namespaces, and checks the
//! children, the key Secrets, the tenant config and the statuses. Skipped (with a
//! message) otherwise. Everything it creates lives in namespaces named
//! `loupe-e2e-<random>-…`, deleted at the end.
//!
//! The sidecar-injection webhook is tested too when the API server can call the
//! operator running here: `LOUPE_E2E_WEBHOOK_URL` is the URL it calls
//! (`https://<this machine, as the cluster reaches it>:9443/mutate-pods`, e.g.
//! `https://172.18.0.1:9443/mutate-pods` for kind on Linux) and the operator listens
//! on `LOUPE_E2E_WEBHOOK_ADDR` (default `0.0.0.0:<the URL's port>`). The test registers
//! a MutatingWebhookConfiguration with that URL, limited to its own namespaces,
//! creates an annotated pod in a project namespace and reads back the injected spec.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use loupe_core::config::DataPlaneConfig;
use loupe_core::keys::KeyHash;
use loupe_operator::crd::{TracePlatform, TraceProject};
use serde_json::json;

use crate::harness::*;

async fn client() -> Option<(Client, String)> {
    let Ok(path) = std::env::var("LOUPE_E2E_KUBECONFIG") else {
        eprintln!(
            "skipped: set LOUPE_E2E_KUBECONFIG to a kubeconfig to run the end-to-end tests against a cluster"
        );
        return None;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("a readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    Some((Client::try_from(config).expect("a client"), path))
}

fn apply() -> PatchParams {
    PatchParams::apply("loupe-e2e").force()
}

#[tokio::test]
async fn the_operator_deploys_a_platform_and_serves_a_dev_and_a_prod_project() {
    let Some((client, kubeconfig)) = client().await else {
        return;
    };
    // The CRDs, as checked in.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in loupe_operator::crdgen::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &apply(), &Patch::Apply(&crd))
            .await
            .unwrap();
    }
    for (_, crd) in loupe_operator::crdgen::all() {
        let name = crd.metadata.name.clone().unwrap();
        let crds = crds.clone();
        eventually(Duration::from_secs(60), || {
            let (crds, name) = (crds.clone(), name.clone());
            async move {
                let c = crds.get(&name).await.map_err(|e| e.to_string())?;
                let established = c
                    .status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten())
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established
                    .then_some(())
                    .ok_or_else(|| format!("{name} not established"))
            }
        })
        .await;
    }

    let run = format!("loupe-e2e-{:08x}", rand::random::<u32>());
    let (platform_ns, dev_ns, prod_ns) = (
        format!("{run}-platform"),
        format!("{run}-dev"),
        format!("{run}-prod"),
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [&platform_ns, &dev_ns, &prod_ns] {
        let obj = json!({ "apiVersion": "v1", "kind": "Namespace",
                          "metadata": { "name": ns, "labels": { "loupe.dev/e2e-run": run } } });
        namespaces
            .patch(ns, &apply(), &Patch::Apply(&obj))
            .await
            .unwrap();
    }

    // The injection webhook, registered by URL for this run's namespaces only, before
    // the operator starts (it publishes its CA into the configuration).
    let webhook_url = std::env::var("LOUPE_E2E_WEBHOOK_URL").ok();
    let webhook_configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let webhook_config = format!("{run}-inject");
    if let Some(url) = &webhook_url {
        let config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": webhook_config },
            "webhooks": [{
                "name": loupe_operator::webhook_tls::WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Ignore", "timeoutSeconds": 5,
                "clientConfig": { "url": url },
                "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                            "resources": ["pods"], "scope": "Namespaced" }],
                "namespaceSelector": { "matchLabels": { "loupe.dev/e2e-run": run } },
            }],
        });
        webhook_configs
            .patch(&webhook_config, &apply(), &Patch::Apply(&config))
            .await
            .unwrap();
    } else {
        eprintln!(
            "the injection webhook is not tested: set LOUPE_E2E_WEBHOOK_URL to the URL at which the API server reaches this machine (https://<host>:<port>/mutate-pods)"
        );
    }

    // The operator, as a process using the kubeconfig.
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = [
        "operator",
        "--no-leader-election",
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    if let Some(url) = &webhook_url {
        let port = url::Url::parse(url)
            .expect("LOUPE_E2E_WEBHOOK_URL is a URL")
            .port_or_known_default()
            .unwrap_or(443);
        let addr =
            std::env::var("LOUPE_E2E_WEBHOOK_ADDR").unwrap_or_else(|_| format!("0.0.0.0:{port}"));
        args.extend([
            format!("--webhook-addr={addr}"),
            format!("--webhook-url={url}"),
            format!("--lease-namespace={platform_ns}"),
            format!("--webhook-secret={run}-webhook-tls"),
            format!("--webhook-configuration={webhook_config}"),
        ]);
    }
    let operator = Loupe::spawn(
        &args,
        dir.path(),
        &[("KUBECONFIG", kubeconfig.as_str())],
        &[],
    );

    let platform = json!({
        "apiVersion": "loupe.dev/v1alpha1", "kind": "TracePlatform",
        "metadata": { "name": "loupe", "namespace": platform_ns },
        "spec": {
            // No Kafka here: the roles are created anyway and the status says why the
            // topic could not be checked.
            "kafka": { "bootstrapServers": "kafka.invalid:9092", "partitions": 3 },
            "storage": { "url": "file:///var/lib/loupe", "volumeClaim": "loupe-blocks" },
        },
    });
    let platforms: Api<TracePlatform> = Api::namespaced(client.clone(), &platform_ns);
    // The schema's CEL rules are enforced by the API server: more writers than
    // partitions is refused with the rule's message.
    let mut too_many = platform.clone();
    too_many["metadata"]["name"] = json!("too-many-writers");
    too_many["spec"]["write"] = json!({ "replicas": 5 });
    let err = platforms
        .patch("too-many-writers", &apply(), &Patch::Apply(&too_many))
        .await
        .expect_err("5 writers over 3 partitions must be refused");
    assert!(
        err.to_string().contains("cannot exceed kafka.partitions"),
        "{err}"
    );
    platforms
        .patch("loupe", &apply(), &Patch::Apply(&platform))
        .await
        .unwrap();
    for (ns, env) in [(&dev_ns, "dev"), (&prod_ns, "prod")] {
        let project = json!({
            "apiVersion": "loupe.dev/v1alpha1", "kind": "TraceProject",
            "metadata": { "name": "chat", "namespace": ns },
            "spec": { "platformRef": { "name": "loupe", "namespace": platform_ns }, "environment": env },
        });
        let projects: Api<TraceProject> = Api::namespaced(client.clone(), ns);
        projects
            .patch("chat", &apply(), &Patch::Apply(&project))
            .await
            .unwrap();
    }

    // Children of the platform.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &platform_ns);
    for role in ["receive", "write", "querier"] {
        let name = format!("loupe-{role}");
        let d = deployments.clone();
        eventually(Duration::from_secs(120), || {
            let (d, name) = (d.clone(), name.clone());
            async move {
                d.get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|_| ())
                    .ok_or_else(|| format!("no Deployment {name}"))
            }
        })
        .await;
    }
    // Keys in each project's namespace, and their hashes in the tenant config.
    let mut hashes = BTreeMap::new();
    for ns in [&dev_ns, &prod_ns] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret = {
            let s = secrets.clone();
            let found = std::sync::Mutex::new(None);
            let f = &found;
            eventually(Duration::from_secs(120), || {
                let s = s.clone();
                async move {
                    let got = s
                        .get_opt("chat-loupe-keys")
                        .await
                        .map_err(|e| e.to_string())?;
                    let got = got.ok_or("no key Secret yet")?;
                    *f.lock().unwrap() = Some(got);
                    Ok(())
                }
            })
            .await;
            found.into_inner().unwrap().unwrap()
        };
        let data = secret.data.unwrap();
        let key = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
        assert!(key("ingest-key").starts_with("loupe_ik_"));
        assert!(key("query-key").starts_with("loupe_qk_"));
        hashes.insert(
            format!("{ns}/chat"),
            (
                KeyHash::of(&key("ingest-key")),
                KeyHash::of(&key("query-key")),
            ),
        );
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &platform_ns);
    let want = &hashes;
    eventually(Duration::from_secs(120), || {
        let cms = config_maps.clone();
        async move {
            let cm = cms
                .get_opt("loupe-config")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no config")?;
            let text = cm
                .data
                .unwrap_or_default()
                .get("config.yaml")
                .cloned()
                .unwrap_or_default();
            let config = DataPlaneConfig::from_yaml(&text).map_err(|e| e.to_string())?;
            for (tenant, (ingest, query)) in want {
                let t = config
                    .tenants
                    .iter()
                    .find(|t| t.id.as_str() == tenant)
                    .ok_or(format!("{tenant} not in the config"))?;
                let has = |h: &KeyHash| t.keys.iter().any(|k| &k.hash == h);
                if !(has(ingest) && has(query)) {
                    return Err(format!("{tenant}: keys not in the config yet"));
                }
            }
            Ok(())
        }
    })
    .await;
    // Statuses: projects Ready; the platform says where to send spans.
    for ns in [&dev_ns, &prod_ns] {
        let projects: Api<TraceProject> = Api::namespaced(client.clone(), ns);
        eventually(Duration::from_secs(120), || {
            let p = projects.clone();
            async move {
                let got = p.get("chat").await.map_err(|e| e.to_string())?;
                let status = got.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready
                    .then_some(())
                    .ok_or_else(|| format!("not Ready: {:?}", status.conditions))
            }
        })
        .await;
    }
    let status = platforms.get("loupe").await.unwrap().status.unwrap();
    assert_eq!(
        status.endpoints.unwrap().otlp_grpc,
        format!("loupe-receive.{platform_ns}.svc:4317")
    );
    assert_eq!(status.projects, Some(2));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "KafkaTopic" && c.reason == "KafkaUnreachable"),
        "{:?}",
        status.conditions
    );

    // AlertRules: the API server enforces the schema's CEL rules; a valid rule is
    // evaluated and its status says how (here the platform's querier cannot be
    // reached from the operator running outside the cluster, or runs no pods).
    let alerts: Api<loupe_operator::crd::AlertRule> = Api::namespaced(client.clone(), &prod_ns);
    let mut rule = json!({
        "apiVersion": "loupe.dev/v1alpha1", "kind": "AlertRule",
        "metadata": { "name": "chat-p99", "namespace": prod_ns },
        "spec": {
            "projectRef": "chat", "kind": "LatencyPercentile", "percentile": 90,
            "window": "15m", "threshold": 10000,
            "notify": [{ "webhook": { "url": "http://hooks.invalid/loupe" } }],
        },
    });
    let err = alerts
        .patch("chat-p99", &apply(), &Patch::Apply(&rule))
        .await
        .expect_err("percentile 90 must be refused");
    assert!(
        err.to_string().contains("percentile is 50, 95 or 99"),
        "{err}"
    );
    rule["spec"]["percentile"] = json!(99);
    alerts
        .patch("chat-p99", &apply(), &Patch::Apply(&rule))
        .await
        .unwrap();
    eventually(Duration::from_secs(120), || {
        let a = alerts.clone();
        async move {
            let got = a.get("chat-p99").await.map_err(|e| e.to_string())?;
            let status = got.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let evaluating = status.conditions.iter().find(|c| c.type_ == "Evaluating");
            match (ready, evaluating, status.last_evaluation) {
                (true, Some(c), Some(_)) if !c.reason.is_empty() => Ok(()),
                _ => Err(format!("not evaluated yet: {:?}", status.conditions)),
            }
        }
    })
    .await;

    // deletionPolicy: Delete — deleting the project starts the purge Job for its
    // tenant, and the finalizer holds the project until the Job has succeeded.
    let projects: Api<TraceProject> = Api::namespaced(client.clone(), &dev_ns);
    let purged = json!({
        "apiVersion": "loupe.dev/v1alpha1", "kind": "TraceProject",
        "metadata": { "name": "purged", "namespace": dev_ns },
        "spec": {
            "platformRef": { "name": "loupe", "namespace": platform_ns },
            "environment": "dev",
            "deletionPolicy": "Delete",
        },
    });
    projects
        .patch("purged", &apply(), &Patch::Apply(&purged))
        .await
        .unwrap();
    eventually(Duration::from_secs(120), || {
        let p = projects.clone();
        async move {
            let got = p.get("purged").await.map_err(|e| e.to_string())?;
            got.metadata
                .finalizers
                .unwrap_or_default()
                .contains(&"loupe.dev/delete-data".to_owned())
                .then_some(())
                .ok_or_else(|| "no finalizer yet".to_owned())
        }
    })
    .await;
    projects
        .delete("purged", &DeleteParams::default())
        .await
        .unwrap();
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &platform_ns);
    let job_name = loupe_operator::render::purge_job_name("loupe", &format!("{dev_ns}/purged"));
    let tenant_arg = format!("--tenant={dev_ns}/purged");
    eventually(Duration::from_secs(120), || {
        let (jobs, job_name, tenant_arg) = (jobs.clone(), job_name.clone(), tenant_arg.clone());
        async move {
            let job = jobs
                .get_opt(&job_name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no Job {job_name} yet"))?;
            let args = job.spec.unwrap().template.spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap_or_default();
            args.contains(&tenant_arg)
                .then_some(())
                .ok_or_else(|| format!("unexpected args {args:?}"))
        }
    })
    .await;
    let held = projects.get("purged").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "the project waits for its data to be deleted"
    );
    // The data plane's image may not run in this cluster: release the project by hand.
    projects
        .patch(
            "purged",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
        )
        .await
        .unwrap();

    // Sidecar injection: the API server calls the webhook for an annotated pod in a
    // project namespace, and the pod it stores carries the agent.
    if webhook_url.is_some() {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &prod_ns);
        let found = std::sync::Mutex::new(None);
        let f = &found;
        let ns = &prod_ns;
        eventually(Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "generateName": "injected-", "namespace": ns,
                                  "labels": { "app.kubernetes.io/name": "chat-api" },
                                  "annotations": { "loupe.dev/inject": "true" } },
                    "spec": { "containers": [{ "name": "app", "image": "registry.invalid/chat:1",
                                               "env": [{ "name": "OTEL_SERVICE_NAME", "value": "mine" }] }] },
                }))
                .unwrap();
                let created = pods
                    .create(&Default::default(), &pod)
                    .await
                    .map_err(|e| e.to_string())?;
                let name = created.metadata.name.clone().unwrap();
                // Read back what the API server stored.
                let stored = pods.get(&name).await.map_err(|e| e.to_string())?;
                let injected = stored
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(loupe_operator::inject::INJECTED_ANNOTATION));
                if !injected {
                    // The webhook may not be called yet (its CA being published).
                    let _ = pods.delete(&name, &DeleteParams::default()).await;
                    return Err(format!("pod {name} was admitted without injection"));
                }
                *f.lock().unwrap() = Some(stored);
                Ok(())
            }
        })
        .await;
        let pod = found.into_inner().unwrap().unwrap();
        let spec = pod.spec.unwrap();
        let inits = spec.init_containers.unwrap_or_default();
        assert_eq!(inits.len(), 1, "{inits:?}");
        let agent = &inits[0];
        assert_eq!(agent.name, loupe_operator::inject::AGENT_CONTAINER);
        assert_eq!(
            agent.restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar"
        );
        let agent_env = agent.env.clone().unwrap_or_default();
        let key = agent_env
            .iter()
            .find(|e| e.name == "LOUPE_INGEST_KEY")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("the ingest key comes from the project's Secret");
        assert_eq!(key.name, "chat-loupe-keys");
        assert_eq!(spec.containers.len(), 1);
        let env: BTreeMap<String, String> = spec.containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://127.0.0.1:4318");
        assert_eq!(
            env["OTEL_SERVICE_NAME"], "mine",
            "the app's own value is kept"
        );
        assert!(
            env["OTEL_RESOURCE_ATTRIBUTES"].contains("deployment.environment=prod"),
            "{env:?}"
        );
        let _ = webhook_configs
            .delete(&webhook_config, &DeleteParams::default())
            .await;
    }

    drop(operator);
    for ns in [&platform_ns, &dev_ns, &prod_ns] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
}
