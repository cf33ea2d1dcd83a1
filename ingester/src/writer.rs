//! The write pipeline shared by the Kafka writer role and the standalone queue: spans
//! of one log partition (a Kafka partition, or the standalone write-ahead log) are
//! grouped into traces, held until each trace is decided by its tenant's tail-sampling
//! policy, and the kept spans are buffered per tenant until they are written as a
//! Parquet block.
//!
//! [`PartitionWriter`] is a synchronous state machine without I/O: its owner feeds it
//! records ([`PartitionWriter::push`]), advances time ([`PartitionWriter::tick`]),
//! writes the blocks it asks for ([`PartitionWriter::due_blocks`], then
//! [`PartitionWriter::written`]) and moves its log's commit point to
//! [`PartitionWriter::safe_offset`]: the oldest record whose spans are not yet in a
//! durable block. Everything before it may be forgotten by the log; everything from
//! it on is replayed after a crash, so nothing acknowledged is lost (a replay can
//! write a span twice; readers remove duplicates by `(trace_id, span_id)`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use loupe_core::TenantId;
use loupe_core::config::DataPlaneConfig;
use loupe_core::sampling::{Decision, SamplingPolicy};
use loupe_core::score::ScoreRecord;
use loupe_core::span::{SpanRecord, group_by_trace, spans_to_batch};

use crate::metrics::WriterMetrics;

/// Spans of a tenant kept in one Arrow chunk before the chunk is sealed.
const CHUNK_SPANS: usize = 2048;

/// Settings of a partition writer.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Longest time kept spans of a tenant wait before they are written as a block.
    pub flush_interval: Duration,
    /// Kept bytes of one tenant that trigger a block before the interval is up.
    pub flush_bytes: usize,
    /// Undecided traces held in memory; beyond it the least recently updated trace
    /// is decided early (counted in `loupe_sampling_early_decisions_total`).
    pub max_traces: usize,
    /// Decisions remembered so that spans arriving after their trace was decided
    /// follow the same decision.
    pub remembered_decisions: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            flush_interval: Duration::from_secs(5),
            flush_bytes: 128 << 20,
            max_traces: 100_000,
            remembered_decisions: 50_000,
        }
    }
}

/// The tail-sampling policy of every tenant, taken from the data-plane config.
/// Tenants without a policy keep every trace, decided as soon as its spans arrive.
#[derive(Clone, Debug, Default)]
pub struct SamplingRules {
    policies: HashMap<TenantId, Arc<SamplingPolicy>>,
}

impl SamplingRules {
    pub fn from_config(config: &DataPlaneConfig) -> SamplingRules {
        SamplingRules {
            policies: config
                .tenants
                .iter()
                .filter_map(|t| Some((t.id.clone(), Arc::new(t.sampling.clone()?))))
                .collect(),
        }
    }

    /// The policy of a tenant that samples; `None` keeps everything at once.
    pub fn policy(&self, tenant: &TenantId) -> Option<&Arc<SamplingPolicy>> {
        self.policies.get(tenant).filter(|p| !p.keeps_everything())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TraceKey {
    tenant: TenantId,
    trace_id: Vec<u8>,
}

struct PendingTrace {
    spans: Vec<SpanRecord>,
    bytes: usize,
    min_offset: u64,
    max_offset: u64,
    deadline: Instant,
    /// Bumped on every update so that stale heap entries are recognised.
    generation: u64,
    policy: Arc<SamplingPolicy>,
}

struct Chunk {
    min_offset: u64,
    max_offset: u64,
    batch: RecordBatch,
    bytes: usize,
}

#[derive(Default)]
struct KeptBuffer {
    sealed: Vec<Chunk>,
    open: Vec<SpanRecord>,
    open_bytes: usize,
    open_min: u64,
    open_max: u64,
    /// Spans decided (kept or dropped) since the last block of this tenant.
    seen_spans: u64,
    /// When the oldest unflushed decision was made.
    since: Option<Instant>,
    /// Blocks written from this buffer.
    blocks_written: u64,
    /// Scores not yet in a block (never sampled), with the offset of each.
    scores: Vec<(u64, ScoreRecord)>,
}

impl KeptBuffer {
    fn bytes(&self) -> usize {
        self.sealed.iter().map(|c| c.bytes).sum::<usize>()
            + self.open_bytes
            + self
                .scores
                .iter()
                .map(|(_, s)| s.approx_bytes())
                .sum::<usize>()
    }

    fn min_offset(&self) -> Option<u64> {
        let sealed = self.sealed.iter().map(|c| c.min_offset).min();
        let open = (!self.open.is_empty()).then_some(self.open_min);
        let scores = self.scores.iter().map(|(o, _)| *o).min();
        sealed.into_iter().chain(open).chain(scores).min()
    }

    fn add(&mut self, spans: Vec<SpanRecord>, min_offset: u64, max_offset: u64, now: Instant) {
        if self.open.is_empty() {
            self.open_min = min_offset;
            self.open_max = max_offset;
        } else {
            self.open_min = self.open_min.min(min_offset);
            self.open_max = self.open_max.max(max_offset);
        }
        self.open_bytes += spans.iter().map(SpanRecord::approx_bytes).sum::<usize>();
        self.open.extend(spans);
        self.since.get_or_insert(now);
    }

    fn seal(&mut self) -> Result<(), WriterError> {
        if self.open.is_empty() {
            return Ok(());
        }
        let batch = spans_to_batch(&self.open).map_err(|e| WriterError::Encode(e.to_string()))?;
        let bytes = batch.get_array_memory_size();
        self.sealed.push(Chunk {
            min_offset: self.open_min,
            max_offset: self.open_max,
            batch,
            bytes,
        });
        self.open.clear();
        self.open_bytes = 0;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("converting spans to Arrow: {0}")]
    Encode(String),
}

/// A block the owner must write: the tenant's kept spans from `first..=last` offsets.
#[derive(Clone, Debug)]
pub struct BlockJob {
    pub tenant: TenantId,
    pub first: u64,
    pub last: u64,
    pub batches: Vec<RecordBatch>,
    pub spans: u64,
    /// Spans decided for this tenant since its previous block, kept or not: the
    /// block's `seen_spans`, from which sampled-out volume is extrapolated.
    pub seen_spans: u64,
    /// Blocks of this tenant this writer wrote before: two blocks that share an
    /// offset range, content and seen count still get different ids.
    pub seq: u64,
    /// Scores written with the block (into its `.scores.parquet`).
    pub scores: Vec<ScoreRecord>,
    chunks: usize,
}

impl BlockJob {
    /// A job outside a partition writer (tests, tools).
    pub fn new(
        tenant: TenantId,
        first: u64,
        last: u64,
        batches: Vec<RecordBatch>,
        seen_spans: u64,
        seq: u64,
    ) -> BlockJob {
        let spans = batches.iter().map(|b| b.num_rows() as u64).sum();
        BlockJob {
            tenant,
            first,
            last,
            chunks: batches.len(),
            batches,
            spans,
            seen_spans,
            seq,
            scores: Vec::new(),
        }
    }
}

/// Traces of one log partition on their way to blocks.
pub struct PartitionWriter {
    config: WriterConfig,
    rules: Arc<SamplingRules>,
    metrics: Arc<WriterMetrics>,
    pending: HashMap<TraceKey, PendingTrace>,
    pending_bytes: usize,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Heap entry id → trace key (heap entries cannot hold the key cheaply).
    heap_keys: HashMap<u64, TraceKey>,
    next_entry: u64,
    decided: HashMap<TraceKey, bool>,
    decided_order: VecDeque<TraceKey>,
    kept: BTreeMap<TenantId, KeptBuffer>,
    /// One past the highest offset pushed.
    next_offset: Option<u64>,
}

impl PartitionWriter {
    pub fn new(
        config: WriterConfig,
        rules: Arc<SamplingRules>,
        metrics: Arc<WriterMetrics>,
    ) -> PartitionWriter {
        PartitionWriter {
            config,
            rules,
            metrics,
            pending: HashMap::new(),
            pending_bytes: 0,
            deadlines: BinaryHeap::new(),
            heap_keys: HashMap::new(),
            next_entry: 0,
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
            kept: BTreeMap::new(),
            next_offset: None,
        }
    }

    /// Replaces the sampling rules (config reload); traces already held keep the
    /// policy they started with.
    pub fn set_rules(&mut self, rules: Arc<SamplingRules>) {
        self.rules = rules;
    }

    /// Memory held by undecided traces and by kept spans not yet in a block.
    pub fn buffered_bytes(&self) -> usize {
        self.pending_bytes + self.kept.values().map(KeptBuffer::bytes).sum::<usize>()
    }

    /// Undecided traces held.
    pub fn pending_traces(&self) -> usize {
        self.pending.len()
    }

    /// One past the highest offset pushed.
    pub fn next_offset(&self) -> Option<u64> {
        self.next_offset
    }

    /// Passes over a record that holds no spans (an undecodable one, logged by the
    /// caller), so the commit point can move past it.
    pub fn skip(&mut self, offset: u64) {
        self.next_offset = Some(self.next_offset.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Takes the spans of the log record at `offset`.
    pub fn push(&mut self, offset: u64, tenant: &TenantId, spans: Vec<SpanRecord>, now: Instant) {
        self.skip(offset);
        if spans.is_empty() {
            return;
        }
        let Some(policy) = self.rules.policy(tenant).cloned() else {
            self.metrics
                .record(tenant, true, "no_policy", spans.len(), 0);
            self.keep(tenant, spans, offset, offset, now);
            return;
        };
        // A Kafka record holds one trace; a log record may hold several.
        for (trace_id, spans) in group_by_trace(spans) {
            let key = TraceKey {
                tenant: tenant.clone(),
                trace_id,
            };
            if let Some(&keep) = self.decided.get(&key) {
                self.metrics.late_spans.inc_by(spans.len() as u64);
                self.metrics.record(tenant, keep, "late", spans.len(), 0);
                if keep {
                    self.keep(tenant, spans, offset, offset, now);
                } else {
                    self.count_seen(tenant, spans.len() as u64, now);
                }
                continue;
            }
            let bytes: usize = spans.iter().map(SpanRecord::approx_bytes).sum();
            self.pending_bytes += bytes;
            let deadline = now + policy.decision_wait;
            let entry = self.next_entry;
            self.next_entry += 1;
            if !self.pending.contains_key(&key) {
                self.metrics.pending_traces.inc();
            }
            let trace = self
                .pending
                .entry(key.clone())
                .or_insert_with(|| PendingTrace {
                    spans: Vec::new(),
                    bytes: 0,
                    min_offset: offset,
                    max_offset: offset,
                    deadline,
                    generation: 0,
                    policy: policy.clone(),
                });
            trace.spans.extend(spans);
            trace.bytes += bytes;
            trace.min_offset = trace.min_offset.min(offset);
            trace.max_offset = trace.max_offset.max(offset);
            // Keeping is final (more spans only add reasons to keep), so a trace a
            // rule keeps now is written without waiting; only dropping waits for the
            // trace to be complete.
            let decision = trace.policy.decide(&key.trace_id, &trace.spans);
            if decision.keep {
                self.settle(key, decision, now);
                continue;
            }
            trace.deadline = deadline;
            trace.generation = entry;
            self.deadlines.push(Reverse((deadline, entry)));
            self.heap_keys.insert(entry, key);
        }
    }

    /// Decides every trace whose decision wait is over, and the least recently
    /// updated traces beyond the memory cap.
    pub fn tick(&mut self, now: Instant) {
        while let Some(Reverse((deadline, entry))) = self.deadlines.peek().copied() {
            let over_cap = self.pending.len() > self.config.max_traces;
            if deadline > now && !over_cap {
                break;
            }
            self.deadlines.pop();
            let Some(key) = self.heap_keys.remove(&entry) else {
                continue;
            };
            let current = self
                .pending
                .get(&key)
                .is_some_and(|t| t.generation == entry);
            if !current {
                continue;
            }
            if deadline > now {
                self.metrics.early_decisions.inc();
            }
            self.decide(key, now);
        }
    }

    fn decide(&mut self, key: TraceKey, now: Instant) {
        let Some(trace) = self.pending.get(&key) else {
            return;
        };
        let decision = trace.policy.decide(&key.trace_id, &trace.spans);
        self.settle(key, decision, now);
    }

    /// Applies a decision to a held trace: its spans are kept or counted as seen.
    fn settle(&mut self, key: TraceKey, decision: Decision, now: Instant) {
        let Some(trace) = self.pending.remove(&key) else {
            return;
        };
        self.pending_bytes -= trace.bytes;
        self.metrics.pending_traces.dec();
        let n = trace.spans.len();
        self.metrics
            .record(&key.tenant, decision.keep, decision.reason.as_str(), n, 1);
        if decision.keep {
            self.keep(
                &key.tenant,
                trace.spans,
                trace.min_offset,
                trace.max_offset,
                now,
            );
        } else {
            self.count_seen(&key.tenant, n as u64, now);
        }
        self.remember(key, decision.keep);
    }

    fn remember(&mut self, key: TraceKey, keep: bool) {
        if self.config.remembered_decisions == 0 {
            return;
        }
        if self.decided.insert(key.clone(), keep).is_none() {
            self.decided_order.push_back(key);
        }
        while self.decided_order.len() > self.config.remembered_decisions {
            if let Some(old) = self.decided_order.pop_front() {
                self.decided.remove(&old);
            }
        }
    }

    fn keep(
        &mut self,
        tenant: &TenantId,
        spans: Vec<SpanRecord>,
        min: u64,
        max: u64,
        now: Instant,
    ) {
        let buf = self.kept.entry(tenant.clone()).or_default();
        buf.seen_spans += spans.len() as u64;
        buf.add(spans, min, max, now);
        if buf.open.len() >= CHUNK_SPANS
            && let Err(e) = buf.seal()
        {
            tracing::error!(error = %e, "sealing kept spans failed; they stay buffered");
        }
    }

    fn count_seen(&mut self, tenant: &TenantId, spans: u64, now: Instant) {
        let buf = self.kept.entry(tenant.clone()).or_default();
        buf.seen_spans += spans;
        buf.since.get_or_insert(now);
    }

    /// The kept, not yet written spans of a tenant, as Arrow batches (what a
    /// standalone query sees besides blocks).
    pub fn kept_batches(&mut self, tenant: &TenantId) -> Vec<RecordBatch> {
        let Some(buf) = self.kept.get_mut(tenant) else {
            return Vec::new();
        };
        if let Err(e) = buf.seal() {
            tracing::error!(error = %e, "sealing kept spans failed");
        }
        buf.sealed.iter().map(|c| c.batch.clone()).collect()
    }

    /// Takes the scores of the log record at `offset`. Scores are not sampled: they
    /// are buffered at once and go into the tenant's next block.
    pub fn push_scores(
        &mut self,
        offset: u64,
        tenant: &TenantId,
        scores: Vec<ScoreRecord>,
        now: Instant,
    ) {
        self.skip(offset);
        if scores.is_empty() {
            return;
        }
        let buf = self.kept.entry(tenant.clone()).or_default();
        buf.scores.extend(scores.into_iter().map(|s| (offset, s)));
        buf.since.get_or_insert(now);
    }

    /// The buffered scores of a tenant, as one Arrow batch (empty when none).
    pub fn kept_scores(&self, tenant: &TenantId) -> Vec<RecordBatch> {
        let Some(buf) = self.kept.get(tenant).filter(|b| !b.scores.is_empty()) else {
            return Vec::new();
        };
        let scores: Vec<ScoreRecord> = buf.scores.iter().map(|(_, s)| s.clone()).collect();
        match loupe_core::score::scores_to_batch(&scores) {
            Ok(b) => vec![b],
            Err(e) => {
                tracing::error!(error = %e, "converting buffered scores failed");
                Vec::new()
            }
        }
    }

    /// Spans decided for a tenant (kept or dropped) since its last block: what the
    /// kept spans of [`PartitionWriter::kept_batches`] stand for.
    pub fn seen_spans(&self, tenant: &TenantId) -> u64 {
        self.kept.get(tenant).map_or(0, |b| b.seen_spans)
    }

    /// Blocks to write now: tenants whose kept spans reached the size threshold or
    /// waited the flush interval, or every tenant with anything when `force` is set.
    /// The spans stay buffered (and visible) until [`PartitionWriter::written`].
    pub fn due_blocks(&mut self, now: Instant, force: bool) -> Result<Vec<BlockJob>, WriterError> {
        let mut jobs = Vec::new();
        for (tenant, buf) in &mut self.kept {
            let Some(since) = buf.since else { continue };
            let due = force
                || buf.bytes() >= self.config.flush_bytes
                || now.duration_since(since) >= self.config.flush_interval;
            if !due {
                continue;
            }
            buf.seal()?;
            let (first, last) = buf
                .sealed
                .iter()
                .map(|c| (c.min_offset, c.max_offset))
                .chain(buf.scores.iter().map(|(o, _)| (*o, *o)))
                .fold((u64::MAX, 0), |(f, l), (min, max)| (f.min(min), l.max(max)));
            let (first, last) = if first == u64::MAX {
                // Only dropped traces: an empty block records what was seen.
                let next = self.next_offset.unwrap_or(0);
                (next.saturating_sub(1), next.saturating_sub(1))
            } else {
                (first, last)
            };
            jobs.push(BlockJob {
                tenant: tenant.clone(),
                first,
                last,
                batches: buf.sealed.iter().map(|c| c.batch.clone()).collect(),
                spans: buf.sealed.iter().map(|c| c.batch.num_rows() as u64).sum(),
                seen_spans: buf.seen_spans,
                seq: buf.blocks_written,
                scores: buf.scores.iter().map(|(_, s)| s.clone()).collect(),
                chunks: buf.sealed.len(),
            });
        }
        Ok(jobs)
    }

    /// Marks a block as durable: its spans leave the buffer.
    pub fn written(&mut self, job: &BlockJob) {
        let Some(buf) = self.kept.get_mut(&job.tenant) else {
            return;
        };
        buf.sealed.drain(..job.chunks.min(buf.sealed.len()));
        buf.scores.drain(..job.scores.len().min(buf.scores.len()));
        buf.seen_spans = buf.seen_spans.saturating_sub(job.seen_spans);
        buf.blocks_written += 1;
        // The buffer stays (its block count names later blocks); it is due again at
        // once if spans were kept or counted while the block was written.
        if buf.sealed.is_empty()
            && buf.open.is_empty()
            && buf.scores.is_empty()
            && buf.seen_spans == 0
        {
            buf.since = None;
        }
    }

    /// The oldest offset whose spans are not yet durable in a block: the log may be
    /// committed (or truncated) up to, not including, this offset. `None` before the
    /// first record.
    pub fn safe_offset(&self) -> Option<u64> {
        let pending = self.pending.values().map(|t| t.min_offset).min();
        let kept = self.kept.values().filter_map(KeptBuffer::min_offset).min();
        match pending.into_iter().chain(kept).min() {
            Some(o) => Some(o),
            None => self.next_offset,
        }
    }

    /// Whether anything is buffered.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
            && self
                .kept
                .values()
                .all(|b| b.sealed.is_empty() && b.open.is_empty() && b.scores.is_empty())
    }
}

impl Drop for PartitionWriter {
    fn drop(&mut self) {
        self.metrics
            .pending_traces
            .dec_by(self.pending.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::StatusCode;
    use loupe_core::config::TenantConfig;

    fn span(trace: u8, id: u8, parent: Option<u8>, error: bool) -> SpanRecord {
        SpanRecord {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("s{id}"),
            start_ns: 1_000,
            end_ns: 2_000,
            status: if error {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            ..Default::default()
        }
    }

    fn tenant(s: &str) -> TenantId {
        s.parse().unwrap()
    }

    /// A tenant that keeps only errors, decided 10 s after a trace's last span.
    fn rules() -> Arc<SamplingRules> {
        let mut cfg = DataPlaneConfig::default();
        let policy = SamplingPolicy {
            percentage: 0.0,
            ..SamplingPolicy::default()
        };
        cfg.tenants.push(TenantConfig {
            id: tenant("ns/sampled"),
            environment: Default::default(),
            pricing: Vec::new(),
            sampling: Some(policy),
            keys: Vec::new(),
            retention: None,
            rate_limits: None,
            redaction: Default::default(),
        });
        Arc::new(SamplingRules::from_config(&cfg))
    }

    fn writer(max_traces: usize) -> PartitionWriter {
        let config = WriterConfig {
            flush_interval: Duration::from_secs(5),
            flush_bytes: usize::MAX,
            max_traces,
            remembered_decisions: 100,
        };
        PartitionWriter::new(config, rules(), Arc::new(WriterMetrics::unregistered()))
    }

    fn rows(w: &mut PartitionWriter, t: &TenantId) -> usize {
        w.kept_batches(t).iter().map(|b| b.num_rows()).sum()
    }

    #[test]
    fn tenants_without_a_policy_keep_spans_at_once() {
        let mut w = writer(10);
        let t = tenant("ns/open");
        let now = Instant::now();
        w.push(
            7,
            &t,
            vec![span(1, 1, None, false), span(1, 2, Some(1), false)],
            now,
        );
        assert_eq!(rows(&mut w, &t), 2);
        assert_eq!(w.safe_offset(), Some(7), "offset 7 is not durable yet");
        let jobs = w.due_blocks(now, true).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].first, jobs[0].last, jobs[0].spans), (7, 7, 2));
        w.written(&jobs[0]);
        assert_eq!(w.safe_offset(), Some(8));
        assert!(w.is_empty());
    }

    #[test]
    fn dropping_waits_for_the_decision_but_keeping_is_at_once() {
        let mut w = writer(10);
        let t = tenant("ns/sampled");
        let t0 = Instant::now();
        w.push(0, &t, vec![span(1, 1, None, false)], t0);
        w.push(1, &t, vec![span(2, 1, None, false)], t0);
        w.tick(t0 + Duration::from_secs(4));
        assert_eq!(w.pending_traces(), 2, "nothing is decided before the wait");
        assert_eq!(rows(&mut w, &t), 0);
        assert_eq!(w.safe_offset(), Some(0));

        // An error span makes trace 1 a keeper: kept with its earlier span at once.
        w.push(
            2,
            &t,
            vec![span(1, 2, Some(1), true)],
            t0 + Duration::from_secs(5),
        );
        assert_eq!(w.pending_traces(), 1, "only trace 2 still waits");
        assert_eq!(rows(&mut w, &t), 2, "both spans of the error trace");
        assert_eq!(w.safe_offset(), Some(0), "kept but not yet written");

        w.tick(t0 + Duration::from_secs(9));
        assert_eq!(w.pending_traces(), 1);
        w.tick(t0 + Duration::from_secs(10));
        assert_eq!(w.pending_traces(), 0, "trace 2 is decided (dropped)");
        assert_eq!(rows(&mut w, &t), 2);

        let jobs = w.due_blocks(t0 + Duration::from_secs(10), true).unwrap();
        assert_eq!((jobs[0].spans, jobs[0].seen_spans), (2, 3));
        w.written(&jobs[0]);
        assert_eq!(w.safe_offset(), Some(3));

        // A late span of the kept trace follows the decision at once.
        w.push(
            3,
            &t,
            vec![span(1, 3, Some(1), false)],
            t0 + Duration::from_secs(16),
        );
        assert_eq!(rows(&mut w, &t), 1);
        // A late span of the dropped trace is dropped, even with an error.
        w.push(
            4,
            &t,
            vec![span(2, 2, Some(1), true)],
            t0 + Duration::from_secs(16),
        );
        assert_eq!(rows(&mut w, &t), 1);
        assert_eq!(w.pending_traces(), 0);
        assert_eq!(w.metrics.late_spans.get(), 2);
    }

    #[test]
    fn drops_counted_while_a_block_is_written_go_into_the_next_block() {
        let mut w = writer(10);
        let t = tenant("ns/sampled");
        let t0 = Instant::now();
        let wait = Duration::from_secs(10);
        w.push(0, &t, vec![span(1, 1, None, false)], t0);
        w.push(
            1,
            &t,
            vec![span(2, 1, None, false), span(2, 2, Some(1), false)],
            t0 + Duration::from_secs(1),
        );
        w.tick(t0 + wait);
        let first = w.due_blocks(t0 + wait, true).unwrap();
        assert_eq!((first[0].spans, first[0].seen_spans), (0, 1));
        // Trace 2 is dropped while the first block is being written.
        w.tick(t0 + wait + Duration::from_secs(1));
        w.written(&first[0]);
        let next = w
            .due_blocks(t0 + wait + Duration::from_secs(6), false)
            .unwrap();
        assert_eq!(
            next.len(),
            1,
            "the count is due by the interval, not left behind"
        );
        assert_eq!((next[0].seen_spans, next[0].seq), (2, 1));
        w.written(&next[0]);
        assert!(
            w.due_blocks(t0 + Duration::from_secs(60), true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(w.safe_offset(), Some(2));
    }

    #[test]
    fn the_memory_cap_decides_the_least_recently_updated_trace_early() {
        let mut w = writer(2);
        let t = tenant("ns/sampled");
        let t0 = Instant::now();
        for (i, trace) in [1u8, 2, 3].into_iter().enumerate() {
            w.push(
                i as u64,
                &t,
                vec![span(trace, 1, None, false)],
                t0 + Duration::from_secs(i as u64),
            );
        }
        w.tick(t0 + Duration::from_secs(2));
        assert_eq!(w.pending_traces(), 2);
        assert_eq!(w.metrics.early_decisions.get(), 1);
        assert_eq!(w.safe_offset(), Some(1), "trace 1 (offset 0) went first");
        // Its error span arrives too late: the trace was dropped.
        w.push(
            3,
            &t,
            vec![span(1, 2, Some(1), true)],
            t0 + Duration::from_secs(3),
        );
        assert_eq!(w.metrics.late_spans.get(), 1);
        assert_eq!(rows(&mut w, &t), 0);
    }

    #[test]
    fn scores_skip_sampling_and_hold_the_commit_point_until_written() {
        let mut w = writer(10);
        // A tenant that drops everything still keeps its scores.
        let t = tenant("ns/sampled");
        let t0 = Instant::now();
        let score = |id: &str| ScoreRecord {
            score_id: id.into(),
            trace_id: vec![7; 16],
            name: "faithfulness".into(),
            value: Some(0.5),
            ..Default::default()
        };
        w.push_scores(3, &t, vec![score("a"), score("b")], t0);
        assert_eq!(w.safe_offset(), Some(3), "scores not in a block yet");
        assert_eq!(
            w.kept_scores(&t)[0].num_rows(),
            2,
            "visible before the block"
        );
        let jobs = w.due_blocks(t0, true).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(
            (jobs[0].first, jobs[0].last, jobs[0].scores.len()),
            (3, 3, 2)
        );
        // A score arriving while the block is written waits for the next one.
        w.push_scores(4, &t, vec![score("c")], t0);
        w.written(&jobs[0]);
        assert_eq!(w.safe_offset(), Some(4));
        let jobs = w.due_blocks(t0, true).unwrap();
        assert_eq!(jobs[0].scores[0].score_id, "c");
        w.written(&jobs[0]);
        assert_eq!(w.safe_offset(), Some(5));
        assert!(w.is_empty());
    }

    #[test]
    fn blocks_are_due_by_interval_and_safe_offset_tracks_the_oldest_unwritten_span() {
        let mut w = writer(10);
        let t = tenant("ns/open");
        let u = tenant("ns/other");
        let t0 = Instant::now();
        w.push(10, &t, vec![span(1, 1, None, false)], t0);
        w.push(
            11,
            &u,
            vec![span(2, 1, None, false)],
            t0 + Duration::from_secs(3),
        );
        assert!(
            w.due_blocks(t0 + Duration::from_secs(4), false)
                .unwrap()
                .is_empty()
        );
        let jobs = w.due_blocks(t0 + Duration::from_secs(5), false).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].tenant, t);
        w.written(&jobs[0]);
        assert_eq!(
            w.safe_offset(),
            Some(11),
            "tenant u's offset 11 is not written"
        );
        // Spans kept while a block is being written stay for the next block.
        w.push(
            12,
            &t,
            vec![span(3, 1, None, false)],
            t0 + Duration::from_secs(6),
        );
        let jobs = w.due_blocks(t0 + Duration::from_secs(20), false).unwrap();
        assert_eq!(jobs.len(), 2);
        w.push(
            13,
            &t,
            vec![span(4, 1, None, false)],
            t0 + Duration::from_secs(21),
        );
        for j in &jobs {
            w.written(j);
        }
        assert_eq!(
            rows(&mut w, &t),
            1,
            "the span kept during the write remains"
        );
        assert_eq!(w.safe_offset(), Some(13));
    }
}
