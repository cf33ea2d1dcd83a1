//! The compactor: merges a tenant's small blocks into larger ones, removes duplicate
//! spans, enforces each project's retention, and carries out deletion requests.
//!
//! Every step is safe to interrupt (a crash, a kill, a lost lease) and to repeat:
//!
//! 1. A merged block is written under an id derived from the blocks it merges, data
//!    first and its metadata last. Until the metadata exists nothing changed for a
//!    reader; a retry writes the same paths.
//! 2. The metadata lists the blocks it replaces. From the moment it exists, every
//!    reader hides those blocks ([`loupe_core::storage::visible`]): a query sees
//!    either the old blocks or the new one, never both and never neither.
//! 3. Replaced blocks are deleted only after a grace period (metadata first), so a
//!    query that listed them before the switch still finds their files.
//! 4. A block is merged again only once every block it replaces is gone, so deleting
//!    a merged block never makes the blocks it replaced visible again.
//!
//! Files without metadata (a flush or merge interrupted half way) are removed once
//! they are older than the grace period.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hasher as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::Int64Type;
use bytes::Bytes;
use loupe_core::TenantId;
use loupe_core::config::DataPlaneConfig;
use loupe_core::deletion::{self, DeletionRecord};
use loupe_core::span::span_schema;
use loupe_core::storage::{self, BLOCK_FORMAT_VERSION, BlockMeta, Compaction, Storage};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::block::{self, BlockError};

/// Fault injection for crash tests: `LOUPE_FAULT_COMPACT_PAUSE_MS` pauses after every
/// object the compactor writes or deletes, so a test can kill it at any step.
static FAULT_PAUSE: std::sync::LazyLock<Option<Duration>> = std::sync::LazyLock::new(|| {
    std::env::var("LOUPE_FAULT_COMPACT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
});

async fn fault_pause() {
    if let Some(pause) = *FAULT_PAUSE {
        tokio::time::sleep(pause).await;
    }
}

/// Source name of merged blocks.
pub const COMPACTED_SOURCE: &str = "compacted";

/// How the compactor works.
#[derive(Clone, Debug)]
pub struct CompactorConfig {
    /// Merged blocks grow up to about this many bytes of Parquet. Blocks of at least
    /// half of it are left as they are.
    pub target_bytes: u64,
    /// Blocks are merged with blocks whose spans start in the same window.
    pub window: Duration,
    /// How long replaced blocks and files without metadata stay before deletion:
    /// longer than a querier's listing interval plus its longest query.
    pub grace: Duration,
    /// Blocks younger than this are not merged yet (they are still arriving).
    pub min_age: Duration,
}

impl Default for CompactorConfig {
    fn default() -> Self {
        CompactorConfig {
            target_bytes: 64 << 20,
            window: Duration::from_secs(3600),
            grace: Duration::from_secs(300),
            min_age: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("reading block {path}: {reason}")]
    Read { path: String, reason: String },
}

/// A change of a tenant's blocks, for a process that keeps its own block index
/// (standalone).
#[derive(Clone, Debug)]
pub enum IndexChange {
    Added(BlockMeta),
    Removed(BlockMeta),
}

type Observer = Arc<dyn Fn(&IndexChange) + Send + Sync>;

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CycleReport {
    /// Blocks merged into new ones.
    pub blocks_merged: u64,
    /// Blocks written (merged or rewritten for a deletion).
    pub blocks_written: u64,
    /// Duplicate spans left out of merged blocks.
    pub duplicate_spans: u64,
    /// Replaced blocks deleted after their grace period.
    pub replaced_deleted: u64,
    /// Blocks deleted because they are past their project's retention.
    pub expired_deleted: u64,
    /// Files without metadata deleted.
    pub orphans_deleted: u64,
    /// Blocks rewritten without deleted traces.
    pub rewritten_for_deletion: u64,
    /// Deletion requests carried out in full.
    pub deletions_completed: u64,
    /// Spans of deleted traces left out of written blocks.
    pub deleted_spans: u64,
}

impl CycleReport {
    /// Whether the pass changed anything in storage.
    pub fn changed(&self) -> bool {
        *self != CycleReport::default()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The compactor's metrics (`loupe_compactor_*`).
pub struct CompactorMetrics {
    pub cycles: Counter,
    pub cycle_failures: Counter,
    pub blocks_merged: Counter,
    pub blocks_written: Counter,
    pub blocks_deleted: Family<ReasonLabels, Counter>,
    pub duplicate_spans: Counter,
    pub deleted_spans: Counter,
    pub deletions_completed: Counter,
    pub last_success_seconds: Gauge,
}

impl CompactorMetrics {
    pub fn new(registry: &mut Registry) -> CompactorMetrics {
        let m = CompactorMetrics {
            cycles: Counter::default(),
            cycle_failures: Counter::default(),
            blocks_merged: Counter::default(),
            blocks_written: Counter::default(),
            blocks_deleted: Family::default(),
            duplicate_spans: Counter::default(),
            deleted_spans: Counter::default(),
            deletions_completed: Counter::default(),
            last_success_seconds: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("loupe_compactor");
        r.register("cycles", "Compaction passes run", m.cycles.clone());
        r.register(
            "cycle_failures",
            "Compaction passes that stopped on an error (retried next pass)",
            m.cycle_failures.clone(),
        );
        r.register(
            "blocks_merged",
            "Blocks merged into larger ones",
            m.blocks_merged.clone(),
        );
        r.register(
            "blocks_written",
            "Blocks written by the compactor (merged, or rewritten for a deletion)",
            m.blocks_written.clone(),
        );
        r.register(
            "blocks_deleted",
            "Blocks and files deleted, by reason (replaced, retention, orphan)",
            m.blocks_deleted.clone(),
        );
        r.register(
            "duplicate_spans",
            "Duplicate spans (same trace and span id) left out of merged blocks",
            m.duplicate_spans.clone(),
        );
        r.register(
            "deleted_spans",
            "Spans of traces deleted on request left out of written blocks",
            m.deleted_spans.clone(),
        );
        r.register(
            "deletions_completed",
            "Deletion requests carried out in full",
            m.deletions_completed.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "When the last compaction pass finished without error",
            m.last_success_seconds.clone(),
        );
        m
    }

    fn add(&self, r: &CycleReport) {
        self.blocks_merged.inc_by(r.blocks_merged);
        self.blocks_written.inc_by(r.blocks_written);
        self.duplicate_spans.inc_by(r.duplicate_spans);
        self.deleted_spans.inc_by(r.deleted_spans);
        self.deletions_completed.inc_by(r.deletions_completed);
        for (reason, n) in [
            ("replaced", r.replaced_deleted),
            ("retention", r.expired_deleted),
            ("orphan", r.orphans_deleted),
        ] {
            self.blocks_deleted
                .get_or_create(&ReasonLabels { reason })
                .inc_by(n);
        }
    }
}

/// Merges, expires and rewrites blocks of every tenant in one storage.
pub struct Compactor {
    storage: Storage,
    config: CompactorConfig,
    retention: RwLock<HashMap<TenantId, Duration>>,
    metrics: Arc<CompactorMetrics>,
    observer: Option<Observer>,
}

impl Compactor {
    pub fn new(
        storage: Storage,
        config: CompactorConfig,
        data_plane: &DataPlaneConfig,
        metrics: Arc<CompactorMetrics>,
    ) -> Compactor {
        let c = Compactor {
            storage,
            config,
            retention: RwLock::default(),
            metrics,
            observer: None,
        };
        c.set_config(data_plane);
        c
    }

    /// Tells `observer` about every block the compactor adds or removes.
    pub fn with_observer(
        mut self,
        observer: impl Fn(&IndexChange) + Send + Sync + 'static,
    ) -> Compactor {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Takes the projects' retention from a (new) data-plane config.
    pub fn set_config(&self, config: &DataPlaneConfig) {
        let retention = config
            .tenants
            .iter()
            .filter_map(|t| Some((t.id.clone(), t.retention?)))
            .collect();
        *self.retention.write().expect("retention lock") = retention;
    }

    fn notify(&self, change: IndexChange) {
        if let Some(observer) = &self.observer {
            observer(&change);
        }
    }

    /// Runs passes every `interval` until `stop` turns true; a failed pass is logged
    /// and the next one retries.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match self.run_once().await {
                Ok(report) if report.changed() => {
                    tracing::info!(?report, "compaction pass done");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "compaction pass failed; retrying next pass"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One pass over every tenant.
    pub async fn run_once(&self) -> Result<CycleReport, CompactError> {
        self.metrics.cycles.inc();
        let mut report = CycleReport::default();
        let result = self.pass(&mut report).await;
        self.metrics.add(&report);
        match result {
            Ok(()) => {
                self.metrics
                    .last_success_seconds
                    .set(now_ns() / 1_000_000_000);
                Ok(report)
            }
            Err(e) => {
                self.metrics.cycle_failures.inc();
                Err(e)
            }
        }
    }

    async fn pass(&self, report: &mut CycleReport) -> Result<(), CompactError> {
        let now = now_ns();
        let grace = self.config.grace.as_nanos() as i64;
        let (metas, orphans) = self.storage.list_blocks_with_orphan_times().await?;
        for (path, modified) in orphans {
            if now.saturating_sub(modified) >= grace {
                tracing::info!(%path, "removing a file left without metadata by an interrupted write");
                self.storage.delete(&path).await?;
                report.orphans_deleted += 1;
                fault_pause().await;
            }
        }
        let mut deletions: HashMap<TenantId, Vec<DeletionRecord>> = HashMap::new();
        for r in deletion::list(&self.storage).await? {
            deletions.entry(r.tenant.clone()).or_default().push(r);
        }
        let mut tenants: BTreeMap<TenantId, Vec<BlockMeta>> = BTreeMap::new();
        for m in metas {
            tenants.entry(m.tenant.clone()).or_default().push(m);
        }
        for (tenant, blocks) in tenants {
            let records = deletions.remove(&tenant).unwrap_or_default();
            self.tenant_pass(&tenant, blocks, records, now, report)
                .await?;
        }
        Ok(())
    }

    async fn tenant_pass(
        &self,
        tenant: &TenantId,
        blocks: Vec<BlockMeta>,
        mut records: Vec<DeletionRecord>,
        now: i64,
        report: &mut CycleReport,
    ) -> Result<(), CompactError> {
        let grace = self.config.grace.as_nanos() as i64;
        // 1. Replaced blocks whose grace period is over.
        let mut replaced_at: HashMap<&str, i64> = HashMap::new();
        for b in &blocks {
            for id in b.replaces() {
                let at = replaced_at.entry(id.as_str()).or_insert(i64::MAX);
                *at = (*at).min(b.created_ns);
            }
        }
        let mut gone: HashSet<String> = HashSet::new();
        for b in &blocks {
            if let Some(&at) = replaced_at.get(b.block_id.as_str())
                && now.saturating_sub(at) >= grace
            {
                self.remove(b).await?;
                gone.insert(b.block_id.clone());
                report.replaced_deleted += 1;
            }
        }
        drop(replaced_at);
        let mut blocks: Vec<BlockMeta> = blocks
            .into_iter()
            .filter(|b| !gone.contains(&b.block_id))
            .collect();

        // 2. Retention: whole blocks whose every span started before the cutoff.
        // Replaced blocks go before the blocks replacing them, so an interruption
        // never uncovers a replaced block.
        let retention = self
            .retention
            .read()
            .expect("retention lock")
            .get(tenant)
            .copied();
        if let Some(retention) = retention {
            let cutoff = now.saturating_sub(retention.as_nanos() as i64);
            let replaced: HashSet<String> = blocks
                .iter()
                .flat_map(|b| b.replaces().iter().cloned())
                .collect();
            let (mut expired, kept): (Vec<BlockMeta>, Vec<BlockMeta>) = blocks
                .into_iter()
                .partition(|b| b.max_start_ns < cutoff && b.max_end_ns < cutoff);
            expired.sort_by_key(|b| !replaced.contains(&b.block_id));
            for b in &expired {
                self.remove(b).await?;
                report.expired_deleted += 1;
            }
            blocks = kept;
        }

        // Blocks that may take part in a merge or a rewrite: visible, and every
        // block they replace already deleted.
        let present: HashSet<&str> = blocks.iter().map(|b| b.block_id.as_str()).collect();
        let settled = |b: &BlockMeta| b.replaces().iter().all(|id| !present.contains(id.as_str()));
        let visible = storage::visible(blocks.clone());
        let visible_ids: HashSet<&str> = visible.iter().map(|b| b.block_id.as_str()).collect();
        let deleted: HashSet<[u8; 16]> = records.iter().flat_map(|r| r.trace_id_bytes()).collect();

        // 3. Deletion requests: rewrite visible blocks holding deleted traces; a
        // request is complete once no block (visible or replaced) holds any.
        let mut rewritten: HashSet<String> = HashSet::new();
        // Trace ids of the blocks looked into, read once per pass for all requests.
        let mut trace_ids: HashMap<String, HashSet<[u8; 16]>> = HashMap::new();
        for record in records.iter_mut().filter(|r| r.completed_ns.is_none()) {
            let ids: HashSet<[u8; 16]> = record.trace_id_bytes().collect();
            let (lo, hi) = match (record.min_start_ns, record.max_start_ns) {
                (Some(lo), Some(hi)) => (lo, hi),
                _ => (i64::MIN, i64::MAX),
            };
            // Spans of a trace arriving late may start a little outside the range
            // known at request time.
            let slack = 3_600_000_000_000;
            let (mut holding, mut rewrote) = (0u64, false);
            for b in blocks.iter().filter(|b| {
                b.spans > 0
                    && b.max_start_ns >= lo.saturating_sub(slack)
                    && b.min_start_ns <= hi.saturating_add(slack)
            }) {
                if !trace_ids.contains_key(&b.block_id) {
                    let read = self.block_trace_ids(b).await?;
                    trace_ids.insert(b.block_id.clone(), read);
                }
                if !trace_ids[&b.block_id].is_disjoint(&ids) {
                    if visible_ids.contains(b.block_id.as_str())
                        && settled(b)
                        && !rewritten.contains(&b.block_id)
                    {
                        self.merge(tenant, std::slice::from_ref(b), &deleted, now, report)
                            .await?;
                        rewritten.insert(b.block_id.clone());
                        record.blocks_rewritten += 1;
                        report.rewritten_for_deletion += 1;
                        rewrote = true;
                    }
                    // Rewritten now or not, the old file still holds the traces
                    // until it is deleted after the grace period.
                    holding += 1;
                }
            }
            if holding == 0 {
                record.completed_ns = Some(now);
                deletion::save(&self.storage, record).await?;
                report.deletions_completed += 1;
                tracing::info!(id = %record.id, %tenant, traces = record.trace_ids.len(), "deletion request carried out");
            } else if rewrote {
                deletion::save(&self.storage, record).await?;
            }
        }

        // 4. Merges: per window and sampling weight, small blocks packed up to the
        // target size.
        let min_age = self.config.min_age.as_nanos() as i64;
        let window = (self.config.window.as_nanos() as i64).max(1);
        let mut groups: BTreeMap<(i64, Option<u64>), Vec<&BlockMeta>> = BTreeMap::new();
        for b in &visible {
            if rewritten.contains(&b.block_id)
                || !settled(b)
                || now.saturating_sub(b.created_ns) < min_age
                || b.size_bytes >= self.config.target_bytes / 2
            {
                continue;
            }
            let weight =
                (b.spans > 0).then(|| storage::rounded_weight(b.sampling_weight()).to_bits());
            groups
                .entry((b.min_start_ns.div_euclid(window), weight))
                .or_default()
                .push(b);
        }
        for (_, mut group) in groups {
            group.sort_by(|a, b| (a.min_start_ns, &a.block_id).cmp(&(b.min_start_ns, &b.block_id)));
            let mut bin: Vec<BlockMeta> = Vec::new();
            let mut bin_bytes = 0u64;
            for b in group {
                if !bin.is_empty() && bin_bytes + b.size_bytes > self.config.target_bytes {
                    if bin.len() >= 2 {
                        self.merge(tenant, &bin, &deleted, now, report).await?;
                    }
                    bin.clear();
                    bin_bytes = 0;
                }
                bin_bytes += b.size_bytes;
                bin.push(b.clone());
            }
            if bin.len() >= 2 {
                self.merge(tenant, &bin, &deleted, now, report).await?;
            }
        }
        Ok(())
    }

    async fn remove(&self, b: &BlockMeta) -> Result<(), CompactError> {
        self.storage.delete_block(b).await?;
        self.notify(IndexChange::Removed(b.clone()));
        fault_pause().await;
        Ok(())
    }

    /// The trace ids a block holds (reads only that column).
    async fn block_trace_ids(&self, b: &BlockMeta) -> Result<HashSet<[u8; 16]>, CompactError> {
        let bytes = self.storage.get(&b.path).await?;
        let path = b.path.clone();
        tokio::task::spawn_blocking(move || {
            let batches = read_parquet(bytes, &path, Some(0))?;
            Ok(batches
                .iter()
                .flat_map(|batch| {
                    let col = batch.column(0).as_fixed_size_binary().clone();
                    (0..col.len()).filter_map(move |i| <[u8; 16]>::try_from(col.value(i)).ok())
                })
                .collect())
        })
        .await
        .map_err(|e| CompactError::Read {
            path: b.path.clone(),
            reason: e.to_string(),
        })?
    }

    /// Writes one block holding the spans and scores of `inputs` (each span once,
    /// without the `deleted` traces) that replaces them.
    async fn merge(
        &self,
        tenant: &TenantId,
        inputs: &[BlockMeta],
        deleted: &HashSet<[u8; 16]>,
        now: i64,
        report: &mut CycleReport,
    ) -> Result<(), CompactError> {
        let mut span_files = Vec::new();
        let mut score_files = Vec::new();
        for b in inputs {
            if b.spans > 0 {
                span_files.push((b.path.clone(), self.storage.get(&b.path).await?));
            }
            if b.scores > 0 {
                let path = b.scores_path();
                score_files.push((path.clone(), self.storage.get(&path).await?));
            }
        }
        let deleted = deleted.clone();
        let merged =
            tokio::task::spawn_blocking(move || merge_files(span_files, score_files, &deleted))
                .await
                .map_err(|e| CompactError::Read {
                    path: "merge".into(),
                    reason: e.to_string(),
                })??;

        let mut ids: Vec<&str> = inputs.iter().map(|b| b.block_id.as_str()).collect();
        ids.sort_unstable();
        let mut digest = std::hash::DefaultHasher::new();
        for id in &ids {
            digest.write(id.as_bytes());
        }
        let level = 1 + inputs
            .iter()
            .map(|b| b.compaction.as_ref().map_or(0, |c| c.level))
            .max()
            .unwrap_or(0);
        let min_start = inputs.iter().map(|b| b.min_start_ns).min().unwrap_or(0);
        let block_id = format!(
            "{COMPACTED_SOURCE}-l{level}-{:020}-{:016x}",
            min_start.max(0),
            digest.finish()
        );
        let path = storage::parquet_path(tenant, &block_id);
        let block = merged.block;
        let size_bytes = block.parquet.len() as u64;
        self.storage.put_durable(&path, block.parquet).await?;
        fault_pause().await;
        let scores = merged.scores_rows;
        if let Some(bytes) = merged.scores {
            self.storage
                .put_durable(&storage::scores_path(tenant, &block_id), bytes)
                .await?;
            fault_pause().await;
        }
        // The merged block stands for as many decided spans as its inputs did: with
        // one weight per merge group, seen = weight × kept keeps every query's
        // extrapolation as it was.
        let kept_in: u64 = inputs.iter().map(|b| b.spans).sum();
        let seen_in: u64 = inputs.iter().map(|b| b.seen_spans.max(b.spans)).sum();
        let seen_spans = if block.spans == 0 {
            seen_in
        } else if kept_in > 0 {
            let weight = storage::rounded_weight(storage::sampling_weight(seen_in, kept_in));
            ((block.spans as f64) * weight).round() as u64
        } else {
            block.spans
        };
        let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
        for b in inputs {
            let mut note = |source: &str, seq: u64| {
                let e = last_seq.entry(source.to_owned()).or_insert(seq);
                *e = (*e).max(seq);
            };
            if b.source != COMPACTED_SOURCE {
                note(&b.source, b.last_seq);
            }
            if let Some(c) = &b.compaction {
                for (s, &q) in &c.last_seq {
                    note(s, q);
                }
            }
        }
        let meta = BlockMeta {
            format_version: BLOCK_FORMAT_VERSION,
            block_id,
            tenant: tenant.clone(),
            path,
            size_bytes,
            spans: block.spans,
            traces: block.traces,
            min_start_ns: if block.spans == 0 {
                min_start
            } else {
                block.min_start_ns
            },
            max_start_ns: if block.spans == 0 {
                inputs.iter().map(|b| b.max_start_ns).max().unwrap_or(0)
            } else {
                block.max_start_ns
            },
            max_end_ns: if block.spans == 0 {
                inputs.iter().map(|b| b.max_end_ns).max().unwrap_or(0)
            } else {
                block.max_end_ns
            },
            source: COMPACTED_SOURCE.to_owned(),
            first_seq: 0,
            last_seq: 0,
            seen_spans,
            created_ns: now,
            scores,
            compaction: Some(Compaction {
                replaces: ids.iter().map(|s| (*s).to_owned()).collect(),
                level,
                last_seq,
            }),
        };
        self.storage.put_meta(&meta).await?;
        self.notify(IndexChange::Added(meta));
        fault_pause().await;
        if inputs.len() > 1 {
            report.blocks_merged += inputs.len() as u64;
        }
        report.blocks_written += 1;
        report.duplicate_spans += merged.duplicates;
        report.deleted_spans += merged.deleted;
        Ok(())
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Decodes a Parquet file (only column `only`, when given).
fn read_parquet(
    bytes: Bytes,
    path: &str,
    only: Option<usize>,
) -> Result<Vec<RecordBatch>, CompactError> {
    let err = |e: &dyn std::fmt::Display| CompactError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| err(&e))?;
    if let Some(c) = only {
        let mask = ProjectionMask::roots(builder.parquet_schema(), [c]);
        builder = builder.with_projection(mask);
    }
    builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))
}

struct Merged {
    block: block::EncodedBlock,
    scores: Option<Bytes>,
    scores_rows: u64,
    duplicates: u64,
    deleted: u64,
}

/// Decodes span and score files, keeps each span (trace id, span id) and each score
/// id once (the latest version of a score), leaves out deleted traces, and encodes
/// the result as one sorted block.
fn merge_files(
    span_files: Vec<(String, Bytes)>,
    score_files: Vec<(String, Bytes)>,
    deleted: &HashSet<[u8; 16]>,
) -> Result<Merged, CompactError> {
    let schema = span_schema();
    let mut seen: HashSet<([u8; 16], [u8; 8])> = HashSet::new();
    let (mut duplicates, mut deleted_spans) = (0u64, 0u64);
    let mut batches = Vec::new();
    for (path, bytes) in span_files {
        for batch in read_parquet(bytes, &path, None)? {
            let batch = batch
                .with_schema(schema.clone())
                .map_err(|e| CompactError::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let traces = batch.column(0).as_fixed_size_binary();
            let spans = batch.column(1).as_fixed_size_binary();
            let keep: BooleanArray = (0..batch.num_rows())
                .map(|i| {
                    let trace = <[u8; 16]>::try_from(traces.value(i)).unwrap_or_default();
                    let span = <[u8; 8]>::try_from(spans.value(i)).unwrap_or_default();
                    if deleted.contains(&trace) {
                        deleted_spans += 1;
                        Some(false)
                    } else if !seen.insert((trace, span)) {
                        duplicates += 1;
                        Some(false)
                    } else {
                        Some(true)
                    }
                })
                .collect();
            let kept = arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| {
                CompactError::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            if kept.num_rows() > 0 {
                batches.push(kept);
            }
        }
    }
    let block = block::encode(&batches)?;

    let mut score_batches = Vec::new();
    for (path, bytes) in score_files {
        score_batches.extend(read_parquet(bytes, &path, None)?);
    }
    let (scores, scores_rows) = if score_batches.is_empty() {
        (None, 0)
    } else {
        let (bytes, rows) = merge_scores(&score_batches, deleted)?;
        ((rows > 0).then_some(bytes), rows)
    };
    Ok(Merged {
        block,
        scores,
        scores_rows,
        duplicates,
        deleted: deleted_spans,
    })
}

/// The latest version of each score id, without deleted traces, as a score file.
fn merge_scores(
    batches: &[RecordBatch],
    deleted: &HashSet<[u8; 16]>,
) -> Result<(Bytes, u64), CompactError> {
    let schema = loupe_core::score::score_schema();
    let err = |e: &dyn std::fmt::Display| CompactError::Read {
        path: "scores".into(),
        reason: e.to_string(),
    };
    let batches: Vec<RecordBatch> = batches
        .iter()
        .map(|b| b.clone().with_schema(schema.clone()))
        .collect::<Result<_, _>>()
        .map_err(|e| err(&e))?;
    let all = arrow::compute::concat_batches(&schema, &batches).map_err(|e| err(&e))?;
    let traces = all.column(0).as_fixed_size_binary();
    let ids = all.column(2).as_string::<i32>();
    let created = all.column(9).as_primitive::<Int64Type>();
    let mut latest: HashMap<&str, (i64, usize)> = HashMap::new();
    for i in 0..all.num_rows() {
        if <[u8; 16]>::try_from(traces.value(i)).is_ok_and(|t| deleted.contains(&t)) {
            continue;
        }
        let e = latest.entry(ids.value(i)).or_insert((created.value(i), i));
        if created.value(i) > e.0 {
            *e = (created.value(i), i);
        }
    }
    let mut rows: Vec<usize> = latest.into_values().map(|(_, i)| i).collect();
    rows.sort_by(|&a, &b| {
        (traces.value(a), created.value(a)).cmp(&(traces.value(b), created.value(b)))
    });
    let indices = arrow::array::UInt32Array::from_iter_values(rows.iter().map(|&i| i as u32));
    let sorted = arrow::compute::take_record_batch(&all, &indices).map_err(|e| err(&e))?;
    let n = sorted.num_rows() as u64;
    Ok((block::encode_score_batch(&sorted)?, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::BlockJob;
    use loupe_core::SpanRecord;
    use loupe_core::score::ScoreRecord;
    use loupe_core::span::spans_to_batch;

    const HOUR: i64 = 3_600_000_000_000;

    fn tenant() -> TenantId {
        "team-a/chat".parse().unwrap()
    }

    /// Two spans of trace `t` starting at `start_ns`.
    fn trace(t: u8, start_ns: i64) -> Vec<SpanRecord> {
        (0..2u8)
            .map(|s| SpanRecord {
                trace_id: vec![t; 16],
                span_id: vec![t, s, 0, 0, 0, 0, 0, 1],
                start_ns: (start_ns + i64::from(s)) as u64,
                end_ns: (start_ns + 1_000) as u64,
                name: format!("t{t}-s{s}"),
                ..Default::default()
            })
            .collect()
    }

    async fn put(
        storage: &Storage,
        seq: u64,
        traces: &[(u8, i64)],
        seen: u64,
        scores: Vec<ScoreRecord>,
    ) -> BlockMeta {
        let spans: Vec<SpanRecord> = traces.iter().flat_map(|&(t, s)| trace(t, s)).collect();
        let batches = if spans.is_empty() {
            Vec::new()
        } else {
            vec![spans_to_batch(&spans).unwrap()]
        };
        let mut job = BlockJob::new(tenant(), seq, seq, batches, seen, seq);
        job.scores = scores;
        block::write(storage, "wal", &job).await.unwrap()
    }

    fn score(id: &str, t: u8, value: f64, created_ns: i64) -> ScoreRecord {
        ScoreRecord {
            score_id: id.into(),
            trace_id: vec![t; 16],
            name: "quality".into(),
            value: Some(value),
            created_ns,
            ..Default::default()
        }
    }

    fn compactor(storage: &Storage, grace: Duration, config: &DataPlaneConfig) -> Compactor {
        let mut registry = Registry::default();
        Compactor::new(
            storage.clone(),
            CompactorConfig {
                target_bytes: 64 << 20,
                window: Duration::from_secs(3600),
                grace,
                min_age: Duration::ZERO,
            },
            config,
            Arc::new(CompactorMetrics::new(&mut registry)),
        )
    }

    async fn visible(storage: &Storage) -> Vec<BlockMeta> {
        let (metas, _) = storage.list_blocks().await.unwrap();
        storage::visible(metas)
    }

    /// Every (trace, span, name) of the visible blocks, with repeats.
    async fn visible_spans(storage: &Storage) -> Vec<(Vec<u8>, Vec<u8>, String)> {
        let mut out = Vec::new();
        for b in visible(storage).await.iter().filter(|b| b.spans > 0) {
            let bytes = storage.get(&b.path).await.unwrap();
            for batch in read_parquet(bytes, &b.path, None).unwrap() {
                let t = batch.column(0).as_fixed_size_binary();
                let s = batch.column(1).as_fixed_size_binary();
                let n = batch.column(3).as_string::<i32>();
                for i in 0..batch.num_rows() {
                    out.push((
                        t.value(i).to_vec(),
                        s.value(i).to_vec(),
                        n.value(i).to_owned(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn merged_blocks_hold_every_span_once_and_replace_their_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let now = now_ns();
        put(
            &storage,
            1,
            &[(1, now - 2 * HOUR), (2, now - 2 * HOUR)],
            4,
            vec![],
        )
        .await;
        put(
            &storage,
            2,
            &[(3, now - 2 * HOUR)],
            2,
            vec![score("s1", 3, 0.5, 1)],
        )
        .await;
        // A replayed record: trace 1 stored twice, and a newer version of score s1.
        put(
            &storage,
            3,
            &[(1, now - 2 * HOUR)],
            2,
            vec![score("s1", 3, 0.9, 2)],
        )
        .await;
        let mut expected: Vec<_> = visible_spans(&storage).await;
        expected.dedup();
        assert_eq!(expected.len(), 6);

        let c = compactor(
            &storage,
            Duration::from_secs(3600),
            &DataPlaneConfig::default(),
        );
        let report = c.run_once().await.unwrap();
        assert_eq!(report.blocks_merged, 3);
        assert_eq!(report.blocks_written, 1);
        assert_eq!(report.duplicate_spans, 2);
        assert_eq!(
            report.replaced_deleted, 0,
            "inputs stay through the grace period"
        );

        let now_visible = visible(&storage).await;
        assert_eq!(now_visible.len(), 1, "{now_visible:?}");
        let merged = &now_visible[0];
        assert_eq!(merged.replaces().len(), 3);
        assert_eq!((merged.spans, merged.traces, merged.seen_spans), (6, 3, 6));
        assert_eq!(merged.last_seq_of("wal"), Some(3));
        assert_eq!(visible_spans(&storage).await, expected);
        // Both versions of s1 were one score; the latest is kept.
        assert_eq!(merged.scores, 1);
        let scores =
            read_parquet(storage.get(&merged.scores_path()).await.unwrap(), "s", None).unwrap();
        let value = scores[0]
            .column(5)
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(value.value(0), 0.9);

        // A second pass changes nothing while the inputs still exist.
        assert!(!c.run_once().await.unwrap().changed());
        assert_eq!(storage.list_blocks().await.unwrap().0.len(), 4);

        // After the grace period the inputs are deleted and the merged block stays.
        let c = compactor(&storage, Duration::ZERO, &DataPlaneConfig::default());
        let report = c.run_once().await.unwrap();
        assert_eq!(report.replaced_deleted, 3);
        let (all, orphans) = storage.list_blocks().await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(orphans.is_empty(), "{orphans:?}");
        assert_eq!(visible_spans(&storage).await, expected);
    }

    #[tokio::test]
    async fn blocks_of_different_windows_or_sampling_weights_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let hour_start = (now_ns() / HOUR - 5) * HOUR;
        // Unsampled blocks of one hour, one of the next hour, and two of the first
        // hour whose spans stand for four times as many (sampled 1 in 4).
        put(&storage, 1, &[(1, hour_start + 10)], 2, vec![]).await;
        put(&storage, 2, &[(2, hour_start + 20)], 2, vec![]).await;
        put(&storage, 3, &[(3, hour_start + HOUR + 10)], 2, vec![]).await;
        put(&storage, 4, &[(4, hour_start + 30)], 8, vec![]).await;
        put(&storage, 5, &[(5, hour_start + 40)], 8, vec![]).await;
        let c = compactor(
            &storage,
            Duration::from_secs(3600),
            &DataPlaneConfig::default(),
        );
        let report = c.run_once().await.unwrap();
        assert_eq!(report.blocks_written, 2, "{report:?}");
        let mut blocks: Vec<(u64, u64)> = visible(&storage)
            .await
            .iter()
            .map(|b| (b.spans, b.seen_spans))
            .collect();
        blocks.sort();
        // The lone block of the next hour is left; each weight keeps its own block,
        // so the volume every query extrapolates stays the same.
        assert_eq!(blocks, vec![(2, 2), (4, 4), (4, 16)]);
    }

    #[tokio::test]
    async fn retention_deletes_whole_blocks_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let now = now_ns();
        put(&storage, 1, &[(1, now - 50 * HOUR)], 2, vec![]).await;
        // A block straddling the cutoff is kept whole.
        put(
            &storage,
            2,
            &[(2, now - 50 * HOUR), (3, now - 10 * HOUR)],
            4,
            vec![],
        )
        .await;
        put(&storage, 3, &[(4, now - HOUR)], 2, vec![]).await;
        let config = DataPlaneConfig::from_yaml(
            "tenants:\n  - id: team-a/chat\n    retention: 24h\n  - id: team-b/chat\n    retention: 1h\n",
        )
        .unwrap();
        let mut c = compactor(&storage, Duration::from_secs(3600), &config);
        c.config.min_age = Duration::from_secs(3600);
        let removed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = c.with_observer({
            let removed = removed.clone();
            move |change| {
                if let IndexChange::Removed(m) = change {
                    removed.lock().unwrap().push(m.first_seq);
                }
            }
        });
        let report = c.run_once().await.unwrap();
        assert_eq!(report.expired_deleted, 1);
        assert_eq!(*removed.lock().unwrap(), vec![1]);
        let names: Vec<String> = visible_spans(&storage)
            .await
            .into_iter()
            .map(|s| s.2)
            .collect();
        assert_eq!(
            names,
            ["t2-s0", "t2-s1", "t3-s0", "t3-s1", "t4-s0", "t4-s1"]
        );
    }

    #[tokio::test]
    async fn deletion_requests_are_carried_out_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let now = now_ns();
        let at = now - 3 * HOUR;
        put(
            &storage,
            1,
            &[(1, at), (2, at)],
            4,
            vec![score("a", 1, 1.0, 1)],
        )
        .await;
        put(&storage, 2, &[(3, at + HOUR * 2)], 2, vec![]).await;
        let record = DeletionRecord {
            id: "d1".into(),
            tenant: tenant(),
            requested_ns: now,
            requested_by: "ops".into(),
            user_id: None,
            trace_ids: vec!["01".repeat(16)],
            min_start_ns: Some(at),
            max_start_ns: Some(at + 1),
            completed_ns: None,
            blocks_rewritten: 0,
        };
        deletion::save(&storage, &record).await.unwrap();

        let mut c = compactor(&storage, Duration::ZERO, &DataPlaneConfig::default());
        // Nothing young enough to merge: only the deletion rewrites a block.
        c.config.min_age = Duration::from_secs(3600);
        let report = c.run_once().await.unwrap();
        assert_eq!(report.rewritten_for_deletion, 1);
        assert_eq!(report.deleted_spans, 2);
        assert_eq!(
            report.deletions_completed, 0,
            "the old block still holds the trace"
        );
        let names: Vec<String> = visible_spans(&storage)
            .await
            .into_iter()
            .map(|s| s.2)
            .collect();
        assert_eq!(names, ["t2-s0", "t2-s1", "t3-s0", "t3-s1"]);

        let report = c.run_once().await.unwrap();
        assert_eq!(
            (report.replaced_deleted, report.deletions_completed),
            (1, 1)
        );
        let stored = deletion::list(&storage).await.unwrap();
        assert!(stored[0].completed_ns.is_some());
        assert_eq!(stored[0].blocks_rewritten, 1);
        // No file in storage holds the deleted trace's spans or scores any more.
        let (all, _) = storage.list_blocks().await.unwrap();
        for b in &all {
            let bytes = storage.get(&b.path).await.unwrap();
            for batch in read_parquet(bytes, &b.path, Some(0)).unwrap() {
                let t = batch.column(0).as_fixed_size_binary();
                assert!((0..t.len()).all(|i| t.value(i) != [1u8; 16]));
            }
            assert_eq!(b.scores, 0, "the deleted trace's score is gone");
        }
        // A completed request is not looked at again.
        assert!(!c.run_once().await.unwrap().changed());
    }

    #[tokio::test]
    async fn files_without_metadata_are_removed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let orphan = storage::parquet_path(&tenant(), "wal-crashed");
        storage
            .put_durable(&orphan, Bytes::from_static(b"half a block"))
            .await
            .unwrap();
        let c = compactor(
            &storage,
            Duration::from_secs(3600),
            &DataPlaneConfig::default(),
        );
        assert_eq!(
            c.run_once().await.unwrap().orphans_deleted,
            0,
            "a writer may still be writing it"
        );
        let c = compactor(&storage, Duration::ZERO, &DataPlaneConfig::default());
        assert_eq!(c.run_once().await.unwrap().orphans_deleted, 1);
        assert!(storage.list_blocks().await.unwrap().1.is_empty());
    }
}
