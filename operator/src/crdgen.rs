//! The CustomResourceDefinitions, as `loupe crds` prints them and `crds/*.yaml` holds
//! them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::crd::{AlertRule, SamplingPolicy, TracePlatform, TraceProject};

/// Every CRD with the file it is checked in as (under `crds/`).
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("traceplatforms.yaml", TracePlatform::crd()),
        ("traceprojects.yaml", TraceProject::crd()),
        ("samplingpolicies.yaml", SamplingPolicy::crd()),
        ("alertrules.yaml", AlertRule::crd()),
    ]
}

/// One CRD as YAML.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    // The types are plain data; serializing them cannot fail.
    serde_saphyr::to_string(crd).expect("a CRD serializes")
}

/// Every CRD as one multi-document YAML stream (what `loupe crds` prints).
pub fn all_yaml() -> String {
    all()
        .iter()
        .map(|(_, crd)| format!("---\n{}", to_yaml(crd)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::fixtures::merge;

    fn crds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
    }

    /// `crds/*.yaml` are what the types generate. `UPDATE_CRDS=1 cargo test -p
    /// loupe-operator crdgen` rewrites them.
    #[test]
    fn checked_in_crds_match_the_types() {
        let update = std::env::var_os("UPDATE_CRDS").is_some();
        let mut stale = Vec::new();
        for (file, crd) in all() {
            let path = crds_dir().join(file);
            let want = to_yaml(&crd);
            if update {
                std::fs::create_dir_all(crds_dir()).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "crds/{stale:?} differ from the Rust types; run `UPDATE_CRDS=1 cargo test -p loupe-operator crdgen` and commit the result"
        );
    }

    #[test]
    fn every_crd_has_status_printer_columns_and_a_structural_schema() {
        for (file, crd) in all() {
            assert_eq!(crd.spec.group, "loupe.dev", "{file}");
            assert_eq!(crd.spec.scope, "Namespaced", "{file}");
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, "v1alpha1");
            assert!(v.subresources.as_ref().unwrap().status.is_some(), "{file}");
            let columns: Vec<_> = v
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.as_str())
                .collect();
            assert!(columns.contains(&"Age"), "{file}: {columns:?}");
            // Parses back as what the API server reads.
            let round: CustomResourceDefinition = serde_saphyr::from_str(&to_yaml(&crd)).unwrap();
            assert_eq!(round.spec.names.kind, crd.spec.names.kind);
        }
    }

    fn schema_of(kind: &str) -> serde_json::Value {
        let (_, crd) = all()
            .into_iter()
            .find(|(_, c)| c.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("every version has a schema");
        serde_json::to_value(schema).unwrap()
    }

    /// Schema errors of `doc` (one resource) against its CRD.
    fn schema_errors(doc: &serde_json::Value) -> Vec<String> {
        let kind = doc["kind"].as_str().expect("a kind");
        let validator = jsonschema::validator_for(&schema_of(kind)).unwrap();
        validator
            .iter_errors(doc)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect()
    }

    fn examples() -> Vec<(String, serde_json::Value)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
                out.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    doc,
                ));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn every_example_is_valid_against_its_crd_and_parses_as_its_type() {
        let examples = examples();
        let kinds: std::collections::BTreeSet<_> = examples
            .iter()
            .map(|(_, d)| d["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            [
                "AlertRule",
                "SamplingPolicy",
                "TracePlatform",
                "TraceProject"
            ],
            "an example of every kind"
        );
        for (file, doc) in &examples {
            let errors = schema_errors(doc);
            assert!(errors.is_empty(), "docs/examples/{file}: {errors:?}");
            let parsed = match doc["kind"].as_str().unwrap() {
                "TracePlatform" => serde_json::from_value::<TracePlatform>(doc.clone()).err(),
                "TraceProject" => serde_json::from_value::<TraceProject>(doc.clone()).err(),
                "SamplingPolicy" => serde_json::from_value::<SamplingPolicy>(doc.clone()).err(),
                "AlertRule" => serde_json::from_value::<AlertRule>(doc.clone()).err(),
                other => panic!("{file}: unknown kind {other}"),
            };
            assert!(parsed.is_none(), "docs/examples/{file}: {parsed:?}");
        }
    }

    #[test]
    fn the_schema_rejects_what_users_get_wrong() {
        let platform = examples()
            .into_iter()
            .find(|(f, _)| f == "platform-minimal.yaml")
            .unwrap()
            .1;
        let cases: [(&str, serde_json::Value, &str); 5] = [
            (
                "partitions 0",
                serde_json::json!({"spec": {"kafka": {"partitions": 0}}}),
                "/spec/kafka/partitions",
            ),
            (
                "bad protocol",
                serde_json::json!({"spec": {"kafka": {"security": {"protocol": "TLS"}}}}),
                "/spec/kafka/security/protocol",
            ),
            (
                "bad storage url",
                serde_json::json!({"spec": {"storage": {"url": "ftp://x"}}}),
                "/spec/storage/url",
            ),
            (
                "negative replicas",
                serde_json::json!({"spec": {"write": {"replicas": -1}}}),
                "/spec/write/replicas",
            ),
            (
                "cpu target over 100",
                serde_json::json!({"spec": {"querier": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetCpuUtilization": 150}}}}),
                "/spec/querier/autoscaling/targetCpuUtilization",
            ),
        ];
        for (what, patch, path) in cases {
            let mut doc = platform.clone();
            merge(&mut doc, &patch);
            let errors = schema_errors(&doc);
            assert!(
                errors.iter().any(|e| e.starts_with(path)),
                "{what}: expected an error at {path}, got {errors:?}"
            );
        }
        let project = examples()
            .into_iter()
            .find(|(f, _)| f == "project-dev.yaml")
            .unwrap()
            .1;
        for (what, patch, path) in [
            (
                "unknown environment",
                serde_json::json!({"spec": {"environment": "production"}}),
                "/spec/environment",
            ),
            (
                "retention in words",
                serde_json::json!({"spec": {"retention": "30 days"}}),
                "/spec/retention",
            ),
            (
                "sampling ratio above 1",
                serde_json::json!({"spec": {"injection": {"headSamplingRatio": 1.5}}}),
                "/spec/injection/headSamplingRatio",
            ),
        ] {
            let mut doc = project.clone();
            merge(&mut doc, &patch);
            let errors = schema_errors(&doc);
            assert!(
                errors.iter().any(|e| e.starts_with(path)),
                "{what}: expected an error at {path}, got {errors:?}"
            );
        }
    }

    #[test]
    fn cel_rules_are_in_the_schema() {
        let text = serde_json::to_string(&schema_of("TracePlatform")).unwrap();
        assert!(
            text.contains("self.write.replicas <= self.kafka.partitions"),
            "{text}"
        );
        assert!(text.contains("self.maxReplicas >= self.minReplicas"));
        let alert = serde_json::to_string(&schema_of("AlertRule")).unwrap();
        assert!(alert.contains("ScoreDrop needs scoreName"));
        let policy = serde_json::to_string(&schema_of("SamplingPolicy")).unwrap();
        assert!(policy.contains("has(self.projects) != has(self.selector)"));
    }
}
