//! Prometheus metrics of the ingest path.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the redaction counter: one series per project and rule that matched.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RedactionLabels {
    pub tenant: String,
    pub rule: String,
}

/// Label set of per-protocol counters; bounded: protocol × outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RejectLabels {
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// Counters and histograms of receiving, queueing and flushing.
pub struct IngestMetrics {
    pub requests: Family<ProtocolLabels, Counter>,
    pub spans_accepted: Family<ProtocolLabels, Counter>,
    pub spans_rejected: Family<RejectLabels, Counter>,
    pub requests_rejected: Family<RejectLabels, Counter>,
    pub request_bytes: Family<ProtocolLabels, Counter>,
    pub values_truncated: Counter,
    /// Replacements made by redaction, per project and rule (never the values).
    pub redactions: Family<RedactionLabels, Counter>,
    pub spans_unpriced: Counter,
    pub export_seconds: Family<ProtocolLabels, Histogram>,
    pub wal_sync_seconds: Histogram,
    pub wal_bytes_written: Counter,
    pub head_bytes: Gauge,
    pub blocks_written: Counter,
    pub block_spans_written: Counter,
    pub block_bytes_written: Counter,
    pub flush_seconds: Histogram,
    pub flush_errors: Counter,
    pub scores_accepted: Counter,
    /// Per-project LLM usage (exported while the config's `usage_metrics` is on).
    pub usage: crate::usage::UsageMetrics,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl IngestMetrics {
    /// Creates the metrics and registers them under `loupe_`.
    pub fn new(registry: &mut Registry) -> IngestMetrics {
        let m = IngestMetrics {
            requests: Family::default(),
            spans_accepted: Family::default(),
            spans_rejected: Family::default(),
            requests_rejected: Family::default(),
            request_bytes: Family::default(),
            values_truncated: Counter::default(),
            redactions: Family::default(),
            spans_unpriced: Counter::default(),
            export_seconds: Family::new_with_constructor(latency_histogram),
            wal_sync_seconds: latency_histogram(),
            wal_bytes_written: Counter::default(),
            head_bytes: Gauge::default(),
            blocks_written: Counter::default(),
            block_spans_written: Counter::default(),
            block_bytes_written: Counter::default(),
            flush_seconds: latency_histogram(),
            flush_errors: Counter::default(),
            scores_accepted: Counter::default(),
            usage: crate::usage::UsageMetrics::new(registry),
        };
        let r = registry.sub_registry_with_prefix("loupe");
        r.register(
            "ingest_scores_accepted",
            "Scores acknowledged as durable",
            m.scores_accepted.clone(),
        );
        r.register(
            "ingest_requests",
            "OTLP export requests received",
            m.requests.clone(),
        );
        r.register(
            "ingest_spans_accepted",
            "Spans acknowledged as durable",
            m.spans_accepted.clone(),
        );
        r.register(
            "ingest_spans_rejected",
            "Spans refused, by reason",
            m.spans_rejected.clone(),
        );
        r.register(
            "ingest_requests_rejected",
            "Export requests refused whole, by reason",
            m.requests_rejected.clone(),
        );
        r.register(
            "ingest_request_bytes",
            "Bytes of export requests received (decompressed)",
            m.request_bytes.clone(),
        );
        r.register(
            "redactions",
            "Values redacted before storage, by project and rule (a dropped attribute counts once)",
            m.redactions.clone(),
        );
        r.register(
            "ingest_values_truncated",
            "Attribute, input or output values cut to the configured bound",
            m.values_truncated.clone(),
        );
        r.register(
            "ingest_spans_unpriced",
            "LLM spans with tokens and a model that no pricing entry matched",
            m.spans_unpriced.clone(),
        );
        r.register(
            "ingest_export_seconds",
            "Time to acknowledge an export request",
            m.export_seconds.clone(),
        );
        r.register(
            "wal_sync_seconds",
            "Time of one group commit of the write-ahead log",
            m.wal_sync_seconds.clone(),
        );
        r.register(
            "wal_bytes_written",
            "Bytes appended to the write-ahead log",
            m.wal_bytes_written.clone(),
        );
        r.register(
            "head_bytes",
            "Memory held by spans not yet in a block",
            m.head_bytes.clone(),
        );
        r.register(
            "blocks_written",
            "Parquet blocks written",
            m.blocks_written.clone(),
        );
        r.register(
            "block_spans_written",
            "Spans written into Parquet blocks",
            m.block_spans_written.clone(),
        );
        r.register(
            "block_bytes_written",
            "Bytes of Parquet blocks written",
            m.block_bytes_written.clone(),
        );
        r.register(
            "block_flush_seconds",
            "Time to encode and store one block",
            m.flush_seconds.clone(),
        );
        r.register(
            "block_flush_errors",
            "Failed block flushes (retried)",
            m.flush_errors.clone(),
        );
        m
    }

    /// Metrics registered nowhere, for tests.
    pub fn unregistered() -> IngestMetrics {
        IngestMetrics::new(&mut Registry::default())
    }
}

/// Labels of sampling decisions; bounded: configured tenants × keep/drop × reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DecisionLabels {
    pub tenant: String,
    pub decision: &'static str,
    pub reason: &'static str,
}

/// Labels of per-partition gauges of the Kafka writer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: i32,
}

/// Metrics of the write pipeline: tail-sampling decisions and, in the Kafka writer
/// role, consumer lag and commits.
pub struct WriterMetrics {
    pub traces: Family<DecisionLabels, Counter>,
    pub spans: Family<DecisionLabels, Counter>,
    pub early_decisions: Counter,
    pub late_spans: Counter,
    pub pending_traces: Gauge,
    pub lag_records: Family<PartitionLabels, Gauge>,
    pub committed_offset: Family<PartitionLabels, Gauge>,
    pub records_consumed: Counter,
    pub records_rejected: Counter,
    pub records_lost: Counter,
    pub rebalances: Counter,
}

impl WriterMetrics {
    pub fn new(registry: &mut Registry) -> WriterMetrics {
        let m = WriterMetrics {
            traces: Family::default(),
            spans: Family::default(),
            early_decisions: Counter::default(),
            late_spans: Counter::default(),
            pending_traces: Gauge::default(),
            lag_records: Family::default(),
            committed_offset: Family::default(),
            records_consumed: Counter::default(),
            records_rejected: Counter::default(),
            records_lost: Counter::default(),
            rebalances: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("loupe");
        r.register(
            "sampling_traces",
            "Traces decided by tail sampling, by tenant, decision and the rule that decided",
            m.traces.clone(),
        );
        r.register(
            "sampling_spans",
            "Spans decided by tail sampling (seen = kept + dropped), by tenant, decision and reason",
            m.spans.clone(),
        );
        r.register(
            "sampling_early_decisions",
            "Traces decided before their wait was over because the in-memory cap was reached",
            m.early_decisions.clone(),
        );
        r.register(
            "sampling_late_spans",
            "Spans that arrived after their trace was decided and followed that decision",
            m.late_spans.clone(),
        );
        r.register(
            "sampling_pending_traces",
            "Traces held in memory awaiting their sampling decision",
            m.pending_traces.clone(),
        );
        r.register(
            "writer_lag_records",
            "Kafka records of a partition not yet consumed by this writer",
            m.lag_records.clone(),
        );
        r.register(
            "writer_committed_offset",
            "Offset committed per partition (everything before it is in durable blocks)",
            m.committed_offset.clone(),
        );
        r.register(
            "writer_records_lost",
            "Kafka records the broker deleted (retention) before this writer read them: their spans are lost; raise the topic's retention above the writers' worst lag",
            m.records_lost.clone(),
        );
        r.register(
            "writer_records_consumed",
            "Kafka records consumed",
            m.records_consumed.clone(),
        );
        r.register(
            "writer_records_rejected",
            "Kafka records that could not be decoded (skipped, logged)",
            m.records_rejected.clone(),
        );
        r.register(
            "writer_rebalances",
            "Partition assignments and revocations seen",
            m.rebalances.clone(),
        );
        m
    }

    pub fn unregistered() -> WriterMetrics {
        WriterMetrics::new(&mut Registry::default())
    }

    /// Counts one decision over `spans` spans and `traces` traces (0 when the spans
    /// join a trace decided earlier).
    pub fn record(
        &self,
        tenant: &loupe_core::TenantId,
        keep: bool,
        reason: &'static str,
        spans: usize,
        traces: u64,
    ) {
        let labels = DecisionLabels {
            tenant: tenant.to_string(),
            decision: if keep { "keep" } else { "drop" },
            reason,
        };
        self.spans.get_or_create(&labels).inc_by(spans as u64);
        if traces > 0 {
            self.traces.get_or_create(&labels).inc_by(traces);
        }
    }
}
