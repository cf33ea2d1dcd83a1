//! The operator's own metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Reconciles and failures per kind.
#[derive(Clone, Default)]
pub struct Metrics {
    reconciles: Family<KindLabel, Counter>,
    failures: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("loupe_operator");
        r.register(
            "reconciles",
            "Reconciles run, by resource kind",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Reconciles that failed and were retried, by resource kind",
            m.failures.clone(),
        );
        m
    }

    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn failure(&self, kind: &str) {
        self.failures
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}
