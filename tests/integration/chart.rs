//! The Helm chart (`charts/loupe`), with the real `helm` binary: it lints, renders
//! objects that parse as Kubernetes objects, grants the operator exactly the
//! permissions it uses, ships the checked-in CRDs, refuses values its schema does not
//! admit, and its dashboard only charts metrics Loupe exports.
//!
//! `scripts/test.sh` fetches helm and sets `LOUPE_TEST_HELM`; without it these tests
//! say they were skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use loupe_operator::crd::TracePlatform;
use loupe_operator::rbac::{CLUSTER_RULES, NAMESPACE_RULES, Rule};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    root().join("charts/loupe").display().to_string()
}

fn helm() -> Option<PathBuf> {
    match std::env::var_os("LOUPE_TEST_HELM") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.exists(), "LOUPE_TEST_HELM={} does not exist", p.display());
            Some(p)
        }
        None => {
            eprintln!(
                "skipped: helm not found (scripts/test.sh fetches it and sets LOUPE_TEST_HELM)"
            );
            None
        }
    }
}

/// Runs helm; returns (success, stdout, stderr).
fn run(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EVERYTHING_ON: &str = "serviceMonitor.enabled=true,grafanaDashboard.enabled=true,webhook.enabled=true,platform.enabled=true";

/// The rendered documents, as JSON values.
fn render(helm: &Path, set: &str) -> Vec<Value> {
    let (ok, out, err) = run(
        helm,
        &[
            "template",
            "loupe",
            &chart(),
            "--namespace",
            "loupe-system",
            "--include-crds",
            "--set",
            set,
        ],
    );
    assert!(ok, "helm template failed: {err}");
    out.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}:\n{d}")))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn the_chart_lints_with_every_switch() {
    let Some(helm) = helm() else { return };
    for set in ["image.pullPolicy=IfNotPresent", EVERYTHING_ON] {
        let (ok, out, err) = run(&helm, &["lint", &chart(), "--strict", "--set", set]);
        assert!(ok, "helm lint --set {set}: {out}{err}");
    }
}

#[test]
fn rendered_objects_are_kubernetes_objects() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, EVERYTHING_ON);
    let mut kinds = BTreeSet::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_else(|| panic!("no kind: {d}"));
        assert!(d["apiVersion"].is_string(), "{d}");
        assert!(d["metadata"]["name"].is_string(), "{d}");
        kinds.insert(kind.to_owned());
        let typed = match kind {
            "Deployment" => serde_json::from_value::<Deployment>(d.clone()).err(),
            "Service" => serde_json::from_value::<Service>(d.clone()).err(),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(d.clone()).err(),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(d.clone()).err(),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(d.clone()).err(),
            "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(d.clone()).err(),
            "Role" => serde_json::from_value::<Role>(d.clone()).err(),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(d.clone()).err(),
            "MutatingWebhookConfiguration" => {
                serde_json::from_value::<MutatingWebhookConfiguration>(d.clone()).err()
            }
            "TracePlatform" => serde_json::from_value::<TracePlatform>(d.clone()).err(),
            "CustomResourceDefinition" | "ServiceMonitor" => None,
            other => panic!("unexpected kind {other}"),
        };
        assert!(typed.is_none(), "{kind}: {typed:?}\n{d}");
    }
    for want in [
        "CustomResourceDefinition",
        "Deployment",
        "ClusterRole",
        "MutatingWebhookConfiguration",
        "ServiceMonitor",
        "TracePlatform",
    ] {
        assert!(kinds.contains(want), "{want} missing from {kinds:?}");
    }
    // The webhook never blocks pod creation.
    let webhook = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Ignore");
    // One ServiceMonitor for the operator and one per role.
    let monitors = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .count();
    assert_eq!(monitors, 4);
    // Off by default, but the injection webhook: on, served by the operator with
    // its own certificate.
    let defaults = render(&helm, "image.pullPolicy=IfNotPresent");
    assert!(
        defaults
            .iter()
            .any(|d| d["kind"] == "MutatingWebhookConfiguration")
    );
    let operator = defaults.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args = operator["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--webhook-addr=0.0.0.0:9443")
            && args.contains("--webhook-secret=loupe-operator-webhook-tls"),
        "{args}"
    );
    for off in ["ServiceMonitor", "TracePlatform"] {
        assert!(
            !defaults.iter().any(|d| d["kind"] == off),
            "{off} is on by default"
        );
    }
}

/// (group, resource, verb) triples of RBAC rules.
fn grants_of(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn grants_of_code(rules: &[Rule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for res in r.resources {
            for v in r.verbs {
                out.insert((r.group.to_owned(), (*res).to_owned(), (*v).to_owned()));
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, EVERYTHING_ON);
    let cluster: ClusterRole = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let role: Role =
        serde_json::from_value(docs.iter().find(|d| d["kind"] == "Role").unwrap().clone()).unwrap();
    assert_eq!(
        grants_of(cluster.rules.as_deref().unwrap_or_default()),
        grants_of_code(CLUSTER_RULES),
        "the ClusterRole differs from operator/src/rbac.rs (which the reconcile tests check every request against)"
    );
    assert_eq!(
        grants_of(role.rules.as_deref().unwrap_or_default()),
        grants_of_code(NAMESPACE_RULES)
    );
    assert!(
        !grants_of(cluster.rules.as_deref().unwrap_or_default())
            .iter()
            .any(|(_, res, v)| res == "*" || v == "*"),
        "no wildcards"
    );
}

#[test]
fn the_chart_ships_the_checked_in_crds() {
    for entry in std::fs::read_dir(root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let shipped = root().join("charts/loupe/crds").join(name);
        assert_eq!(
            std::fs::read_to_string(&shipped).unwrap_or_default(),
            std::fs::read_to_string(&path).unwrap(),
            "charts/loupe/crds/{} differs from crds/ (copy crds/*.yaml into the chart)",
            name.to_string_lossy()
        );
    }
}

#[test]
fn values_outside_the_schema_are_refused() {
    let Some(helm) = helm() else { return };
    for (set, field) in [
        ("operator.replicas=0", "/operator/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("operator.unknown=1", "unknown"),
    ] {
        let (ok, _, err) = run(&helm, &["template", "loupe", &chart(), "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(err.contains(field), "--set {set}: {err}");
    }
}

/// Every metric a dashboard panel uses is registered by a role: families are read off
/// the sources (`sub_registry_with_prefix("p")` then `register("name", …)` gives
/// `p_name`).
#[test]
fn the_dashboard_charts_only_metrics_loupe_exports() {
    let text = std::fs::read_to_string(root().join("charts/loupe/files/dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let prefix_re = regex::Regex::new(r#"sub_registry_with_prefix\("([a-z_]+)"\)"#).unwrap();
    let name_re = regex::Regex::new(r#"register(?:_with_unit)?\(\s*"([a-z_]+)""#).unwrap();
    let mut families = BTreeSet::new();
    for dir in ["ingester/src", "querier/src", "src"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            let Some(prefix) = prefix_re.captures(&source).map(|c| c[1].to_owned()) else {
                continue;
            };
            for c in name_re.captures_iter(&source) {
                families.insert(format!("{prefix}_{}", &c[1]));
            }
        }
    }
    assert!(
        families.contains("loupe_ingest_spans_accepted"),
        "{families:?}"
    );
    let re = regex::Regex::new(r"loupe_[a-z_]+").unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for m in re.find_iter(expr) {
                let name = m.as_str();
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    families.contains(family),
                    "panel {:?} uses {name}, which no role registers; registered: {families:?}",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");
}

/// `deploy/operator.yaml` is the chart rendered with its defaults, for installing
/// without helm (`kubectl apply -f crds/ -f deploy/operator.yaml`).
/// `UPDATE_MANIFESTS=1` rewrites it.
#[test]
fn the_checked_in_operator_manifests_are_the_rendered_chart() {
    let Some(helm) = helm() else { return };
    let (ok, out, err) = run(
        &helm,
        &["template", "loupe", &chart(), "--namespace", "loupe-system"],
    );
    assert!(ok, "{err}");
    let want = format!(
        "# Generated: helm template loupe charts/loupe --namespace loupe-system\n\
         # Apply after the CRDs: kubectl apply -f crds/ && kubectl create namespace loupe-system && kubectl apply -f deploy/operator.yaml\n{out}"
    );
    let path = root().join("deploy/operator.yaml");
    if std::env::var_os("UPDATE_MANIFESTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "deploy/operator.yaml differs from the rendered chart; run `UPDATE_MANIFESTS=1 scripts/test.sh -p loupe --test integration chart` and commit it"
    );
}
