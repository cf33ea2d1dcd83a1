//! The permissions the operator needs, and no more. The Helm chart's ClusterRole and
//! Role are checked against these (`tests/integration/chart.rs`), and the reconcile
//! tests check that every request a reconcile makes is allowed by them.

/// One rule: API group, resources, verbs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// Cluster-wide: the operator watches its resources in every namespace and creates
/// children (platform roles, project key Secrets) where they live.
pub const CLUSTER_RULES: &[Rule] = &[
    // Reconcilers read them; controllers list and watch them.
    Rule {
        group: "loupe.dev",
        resources: &[
            "traceplatforms",
            "traceprojects",
            "samplingpolicies",
            "alertrules",
        ],
        verbs: &["get", "list", "watch"],
    },
    // Adding and removing the data-deletion finalizer.
    Rule {
        group: "loupe.dev",
        resources: &["traceprojects"],
        verbs: &["patch"],
    },
    Rule {
        group: "loupe.dev",
        resources: &[
            "traceplatforms/status",
            "traceprojects/status",
            "samplingpolicies/status",
            "alertrules/status",
        ],
        verbs: &["patch"],
    },
    // Key Secrets (created and kept by server-side apply) and the Kafka credentials a
    // platform names.
    Rule {
        group: "",
        resources: &["secrets", "configmaps"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        group: "",
        resources: &["services", "serviceaccounts"],
        verbs: &["list", "watch", "patch"],
    },
    Rule {
        group: "apps",
        resources: &["deployments"],
        verbs: &["list", "watch", "patch"],
    },
    // Removed when the spec stops asking for them.
    Rule {
        group: "autoscaling",
        resources: &["horizontalpodautoscalers"],
        verbs: &["list", "watch", "patch", "delete"],
    },
    Rule {
        group: "policy",
        resources: &["poddisruptionbudgets"],
        verbs: &["list", "watch", "patch", "delete"],
    },
    // The injection webhook reads the pod's namespace labels (opt-in).
    Rule {
        group: "",
        resources: &["namespaces"],
        verbs: &["get"],
    },
    // The injection webhook's caBundle, kept current by the operator (self-managed TLS).
    Rule {
        group: "admissionregistration.k8s.io",
        resources: &["mutatingwebhookconfigurations"],
        verbs: &["patch"],
    },
    // The Job that deletes a deleted project's stored data (deletionPolicy: Delete).
    Rule {
        group: "batch",
        resources: &["jobs"],
        verbs: &["get", "create", "delete"],
    },
    Rule {
        group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// In the operator's own namespace: the leader Lease.
pub const NAMESPACE_RULES: &[Rule] = &[Rule {
    group: "coordination.k8s.io",
    resources: &["leases"],
    verbs: &["get", "create", "patch"],
}];

/// Whether the cluster rules allow `verb` on `group`/`resource`.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    CLUSTER_RULES
        .iter()
        .any(|r| r.group == group && r.resources.contains(&resource) && r.verbs.contains(&verb))
}
