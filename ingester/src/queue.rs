//! The embedded queue of `loupe standalone`: a write-ahead log on local disk in place
//! of Kafka, feeding the same [`PartitionWriter`] as the Kafka write role (tail
//! sampling, kept spans buffered per tenant, Parquet blocks), with the log's sequence
//! numbers as offsets.
//!
//! Guarantees:
//! - [`EmbeddedQueue::append`] returns only after the spans are fsynced to the log
//!   (group commit: one `fdatasync` for every append waiting at that moment);
//! - kept spans are visible to queries as soon as they are decided (at once for
//!   tenants without a sampling policy), and stay visible while their block is
//!   written (they leave memory once the block's metadata is durable);
//! - the log is checkpointed at the writer's safe offset (the oldest record not yet
//!   in a block) and replayed from there on start, so a crash (even SIGKILL) loses
//!   nothing acknowledged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loupe_core::TenantId;
use loupe_core::score::ScoreRecord;
use loupe_core::span::{SpanBatch, SpanRecord};
use loupe_core::storage::{BlockMeta, SpanSource, Storage, TenantSnapshot};
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::block;
use crate::metrics::{IngestMetrics, WriterMetrics};
use crate::sink::{SinkError, SpanSink};
use crate::wal::{Wal, WalError};
use crate::writer::{PartitionWriter, SamplingRules, WriterConfig};

/// Source name of blocks written from the embedded queue.
pub const WAL_SOURCE: &str = "wal";

/// Name of the file, in the log directory, holding the sequence number replay starts at.
const CHECKPOINT_FILE: &str = "checkpoint";

/// Settings of the embedded queue.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Directory of the write-ahead log.
    pub wal_dir: PathBuf,
    /// Log segment size before rotation.
    pub segment_bytes: u64,
    /// Flush thresholds and the tail-sampling memory cap.
    pub writer: WriterConfig,
    /// Buffered size above which appends are refused (storage is not keeping up).
    pub max_head_bytes: usize,
    /// Longest an append waits for the log before the client is told to retry.
    pub append_timeout: Duration,
}

impl QueueConfig {
    pub fn new(wal_dir: PathBuf) -> QueueConfig {
        QueueConfig {
            wal_dir,
            segment_bytes: 128 << 20,
            writer: WriterConfig {
                flush_bytes: 256 << 20,
                ..WriterConfig::default()
            },
            max_head_bytes: 1 << 30,
            append_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Storage(#[from] loupe_core::storage::StorageError),
    #[error("write-ahead log record {seq} cannot be decoded: {reason}")]
    BadRecord { seq: u64, reason: String },
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Writer(#[from] crate::writer::WriterError),
    #[error("write-ahead log: {0}")]
    Log(String),
    #[error("write-ahead log checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

struct State {
    writer: PartitionWriter,
    blocks: HashMap<TenantId, Vec<BlockMeta>>,
    checkpoint: u64,
}

struct AppendCmd {
    tenant: TenantId,
    payload: Vec<u8>,
    spans: Vec<SpanRecord>,
    scores: Vec<ScoreRecord>,
    ack: oneshot::Sender<Result<(), String>>,
}

enum Cmd {
    Append(AppendCmd),
    /// Closes the active log segment; answers the last sequence number written.
    Rotate(oneshot::Sender<Result<u64, String>>),
    Truncate(u64),
    /// Syncs and stops the writer thread; answered once it has stopped.
    Stop(oneshot::Sender<()>),
}

struct Shared {
    state: Mutex<State>,
    flush_wanted: Notify,
    /// Serializes flushes (the periodic one, explicit ones, shutdown).
    flushing: tokio::sync::Mutex<()>,
    config: QueueConfig,
    metrics: Arc<IngestMetrics>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("queue lock")
    }
}

fn read_checkpoint(dir: &Path) -> Result<u64, QueueError> {
    let path = dir.join(CHECKPOINT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|e| QueueError::Checkpoint {
            path,
            reason: format!("{e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(QueueError::Checkpoint {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Replaces the checkpoint atomically and durably (write, fsync, rename, fsync dir).
fn write_checkpoint(dir: &Path, seq: u64) -> Result<(), QueueError> {
    let path = dir.join(CHECKPOINT_FILE);
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let fail = |e: std::io::Error| QueueError::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        writeln!(f, "{seq}").map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, &path).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

/// The standalone queue; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedQueue {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    storage: Storage,
}

impl EmbeddedQueue {
    /// Opens the log, loads the block index from storage, replays records from the
    /// checkpoint on, and starts the log writer thread and the flusher task.
    pub async fn open(
        config: QueueConfig,
        storage: Storage,
        rules: Arc<SamplingRules>,
        metrics: Arc<IngestMetrics>,
        writer_metrics: Arc<WriterMetrics>,
    ) -> Result<EmbeddedQueue, QueueError> {
        let (metas, orphans) = storage.list_blocks().await?;
        for path in orphans {
            tracing::info!(%path, "removing a block left without metadata by an interrupted flush");
            storage.delete(&path).await?;
        }
        let mut max_seq = 0;
        let mut blocks: HashMap<TenantId, Vec<BlockMeta>> = HashMap::new();
        for meta in metas {
            if let Some(seq) = meta.last_seq_of(WAL_SOURCE) {
                max_seq = max_seq.max(seq);
            }
            blocks.entry(meta.tenant.clone()).or_default().push(meta);
        }

        std::fs::create_dir_all(&config.wal_dir).map_err(|e| QueueError::Checkpoint {
            path: config.wal_dir.clone(),
            reason: e.to_string(),
        })?;
        let checkpoint = read_checkpoint(&config.wal_dir)?;
        let cfg = config.clone();
        let (wal, records) = tokio::task::spawn_blocking(move || {
            Wal::open(
                &cfg.wal_dir,
                cfg.segment_bytes,
                (max_seq + 1).max(checkpoint),
            )
        })
        .await
        .expect("wal open does not panic")?;

        let mut writer = PartitionWriter::new(config.writer.clone(), rules, writer_metrics);
        if checkpoint > 0 {
            writer.skip(checkpoint - 1);
        }
        let mut replayed = 0usize;
        let now = Instant::now();
        for rec in records {
            if rec.seq < checkpoint {
                continue;
            }
            let bad = |reason: String| QueueError::BadRecord {
                seq: rec.seq,
                reason,
            };
            let batch =
                SpanBatch::decode(rec.payload.as_slice()).map_err(|e| bad(e.to_string()))?;
            let tenant = batch.tenant_id().map_err(|e| bad(e.to_string()))?;
            replayed += batch.spans.len();
            writer.push(rec.seq, &tenant, batch.spans, now);
            writer.push_scores(rec.seq, &tenant, batch.scores, now);
        }
        if replayed > 0 {
            tracing::info!(spans = replayed, "replayed spans from the write-ahead log");
        }
        metrics.head_bytes.set(writer.buffered_bytes() as i64);

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                writer,
                blocks,
                checkpoint,
            }),
            flush_wanted: Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            config,
            metrics,
        });
        let (tx, rx) = mpsc::channel(4096);
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("loupe-wal".into())
            .spawn(move || wal_writer(wal, rx, writer_shared))
            .expect("spawning the wal thread");
        let queue = EmbeddedQueue {
            tx,
            shared,
            storage,
        };
        let flusher = queue.clone();
        tokio::spawn(async move { flusher.flush_loop().await });
        Ok(queue)
    }

    /// Writes every kept span into blocks now. Traces still waiting for their
    /// sampling decision stay in memory (and in the log).
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.flush_due(true).await
    }

    async fn flush_loop(self) {
        let tick = self
            .shared
            .config
            .writer
            .flush_interval
            .min(Duration::from_millis(250));
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.shared.flush_wanted.notified() => {}
            }
            if self.tx.is_closed() {
                return;
            }
            let force = {
                let state = self.shared.state();
                state.writer.buffered_bytes() >= self.shared.config.writer.flush_bytes
            };
            match self.flush_due(force).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    self.shared.metrics.flush_errors.inc();
                    tracing::error!(error = %e, retry_in = ?backoff, "flushing blocks failed; spans stay in the write-ahead log");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Decides traces whose wait is over, writes the blocks that are due (all kept
    /// spans with `force`), then checkpoints the log and deletes what it no longer needs.
    async fn flush_due(&self, force: bool) -> Result<(), QueueError> {
        let _one_at_a_time = self.shared.flushing.lock().await;
        let jobs = {
            let mut state = self.shared.state();
            let now = Instant::now();
            state.writer.tick(now);
            state.writer.due_blocks(now, force)?
        };
        if !jobs.is_empty() {
            // A closed segment can be deleted once everything in it is in blocks.
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Cmd::Rotate(tx)).await.is_ok()
                && let Ok(Err(e)) = rx.await
            {
                return Err(QueueError::Log(e));
            }
        }
        let mut first_error = None;
        for job in jobs {
            let started = Instant::now();
            let written = block::write(&self.storage, WAL_SOURCE, &job).await;
            match written {
                Ok(meta) => {
                    let m = &self.shared.metrics;
                    m.blocks_written.inc();
                    m.block_spans_written.inc_by(meta.spans);
                    m.block_bytes_written.inc_by(meta.size_bytes);
                    m.flush_seconds.observe(started.elapsed().as_secs_f64());
                    tracing::debug!(tenant = %job.tenant, block = %meta.block_id, spans = meta.spans, bytes = meta.size_bytes, "block written");
                    let mut state = self.shared.state();
                    let index = state.blocks.entry(job.tenant.clone()).or_default();
                    index.retain(|b| b.block_id != meta.block_id);
                    index.push(meta);
                    state.writer.written(&job);
                    m.head_bytes.set(state.writer.buffered_bytes() as i64);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let advanced = {
            let state = self.shared.state();
            state
                .writer
                .safe_offset()
                .filter(|&safe| safe > state.checkpoint)
        };
        if let Some(safe) = advanced {
            let dir = self.shared.config.wal_dir.clone();
            tokio::task::spawn_blocking(move || write_checkpoint(&dir, safe))
                .await
                .expect("checkpoint task does not panic")?;
            self.shared.state().checkpoint = safe;
            let _ = self.tx.send(Cmd::Truncate(safe - 1)).await;
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Replaces the tail-sampling rules (config reload); traces already held keep the
    /// policy they started with.
    pub fn set_rules(&self, rules: Arc<SamplingRules>) {
        self.shared.state().writer.set_rules(rules);
    }

    /// Flushes everything and stops the log writer; later appends are refused.
    pub async fn shutdown(self) -> Result<(), QueueError> {
        let result = self.flush().await;
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        result
    }

    /// The storage the queue writes blocks to.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
}

impl SpanSink for EmbeddedQueue {
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        spans: Vec<SpanRecord>,
        scores: Vec<ScoreRecord>,
    ) -> futures::future::BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if spans.is_empty() && scores.is_empty() {
                return Ok(());
            }
            let cfg = &self.shared.config;
            let buffered = self.shared.state().writer.buffered_bytes();
            if buffered > cfg.max_head_bytes {
                self.shared.flush_wanted.notify_one();
                return Err(SinkError::Unavailable(
                    "block storage is not keeping up; retry later".into(),
                ));
            }
            let payload = SpanBatch {
                tenant: tenant.to_string(),
                spans,
                scores,
            };
            let bytes = payload.encode_to_vec();
            let (ack, done) = oneshot::channel();
            let cmd = Cmd::Append(AppendCmd {
                tenant: tenant.clone(),
                payload: bytes,
                spans: payload.spans,
                scores: payload.scores,
                ack,
            });
            let wait = async {
                self.tx
                    .send(cmd)
                    .await
                    .map_err(|_| SinkError::Unavailable("the queue is shutting down".into()))?;
                match done.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(SinkError::Unavailable(format!(
                        "write-ahead log failed: {e}"
                    ))),
                    Err(_) => Err(SinkError::Unavailable("the queue is shutting down".into())),
                }
            };
            let result = tokio::time::timeout(cfg.append_timeout, wait)
                .await
                .unwrap_or_else(|_| {
                    Err(SinkError::Unavailable(
                        "timed out waiting for the write-ahead log".into(),
                    ))
                });
            if result.is_ok()
                && self.shared.state().writer.buffered_bytes() >= cfg.writer.flush_bytes
            {
                self.shared.flush_wanted.notify_one();
            }
            result
        })
    }
}

impl EmbeddedQueue {
    /// Takes a block the compactor wrote or deleted into the queue's block index.
    pub fn apply(&self, change: &crate::compactor::IndexChange) {
        use crate::compactor::IndexChange;
        let mut state = self.shared.state();
        match change {
            IndexChange::Added(meta) => {
                let blocks = state.blocks.entry(meta.tenant.clone()).or_default();
                blocks.retain(|b| b.block_id != meta.block_id);
                blocks.push(meta.clone());
            }
            IndexChange::Removed(meta) => {
                if let Some(blocks) = state.blocks.get_mut(&meta.tenant) {
                    blocks.retain(|b| b.block_id != meta.block_id);
                }
            }
        }
    }
}

impl SpanSource for EmbeddedQueue {
    fn snapshot(&self, tenant: &TenantId) -> TenantSnapshot {
        let mut state = self.shared.state();
        let blocks = state.blocks.get(tenant).cloned().unwrap_or_default();
        TenantSnapshot {
            blocks: loupe_core::storage::visible(blocks),
            head: state.writer.kept_batches(tenant),
            head_seen_spans: state.writer.seen_spans(tenant),
            head_scores: state.writer.kept_scores(tenant),
            deleted: Default::default(),
        }
    }
}

/// The log writer thread: takes every command waiting, appends all appends, fsyncs
/// once, hands the spans to the partition writer, then acknowledges them.
fn wal_writer(mut wal: Wal, mut rx: mpsc::Receiver<Cmd>, shared: Arc<Shared>) {
    let mut pending: Vec<AppendCmd> = Vec::new();
    let mut others: Vec<Cmd> = Vec::new();
    let mut stopped = None;
    while let Some(first) = rx.blocking_recv() {
        let mut batch_bytes = 0usize;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Append(a) => {
                    batch_bytes += a.payload.len();
                    pending.push(a);
                }
                other => others.push(other),
            }
            if batch_bytes < (64 << 20) && pending.len() < 4096 {
                next = rx.try_recv().ok();
            }
        }

        if !pending.is_empty() {
            let started = Instant::now();
            let mut seqs = Vec::with_capacity(pending.len());
            let mut result: Result<(), String> = Ok(());
            for a in &pending {
                match wal.append(&a.payload) {
                    Ok(seq) => seqs.push(seq),
                    Err(e) => {
                        result = Err(e.to_string());
                        break;
                    }
                }
            }
            if result.is_ok() {
                result = wal.sync().map_err(|e| e.to_string());
            }
            let m = &shared.metrics;
            m.wal_sync_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    m.wal_bytes_written.inc_by(batch_bytes as u64);
                    let now = Instant::now();
                    let mut state = shared.state();
                    let mut acks = Vec::with_capacity(pending.len());
                    for (a, seq) in pending.drain(..).zip(seqs) {
                        state.writer.push(seq, &a.tenant, a.spans, now);
                        state.writer.push_scores(seq, &a.tenant, a.scores, now);
                        acks.push(a.ack);
                    }
                    m.head_bytes.set(state.writer.buffered_bytes() as i64);
                    drop(state);
                    for ack in acks {
                        let _ = ack.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log append failed; refusing the batch");
                    for a in pending.drain(..) {
                        let _ = a.ack.send(Err(e.clone()));
                    }
                }
            }
        }

        for cmd in others.drain(..) {
            match cmd {
                Cmd::Rotate(ack) => {
                    let _ = ack.send(wal.rotate().map_err(|e| e.to_string()));
                }
                Cmd::Truncate(seq) => {
                    if let Err(e) = wal.truncate_through(seq) {
                        tracing::error!(error = %e, "deleting flushed write-ahead log segments failed");
                    }
                }
                Cmd::Stop(ack) => stopped = Some(ack),
                Cmd::Append(_) => unreachable!("appends are collected separately"),
            }
        }
        if stopped.is_some() {
            break;
        }
    }
    if let Err(e) = wal.sync() {
        tracing::error!(error = %e, "final write-ahead log sync failed");
    }
    // Closing the channel before answering makes every later append fail fast.
    drop(rx);
    if let Some(ack) = stopped {
        let _ = ack.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(trace: u8, n: usize) -> Vec<SpanRecord> {
        (0..n)
            .map(|i| SpanRecord {
                trace_id: vec![trace; 16],
                span_id: vec![i as u8 + 1; 8],
                name: format!("span-{i}"),
                service_name: "svc".into(),
                start_ns: 1_000 + i as u64,
                end_ns: 2_000 + i as u64,
                ..Default::default()
            })
            .collect()
    }

    async fn open(dir: &std::path::Path) -> EmbeddedQueue {
        open_with(dir, |_| {}).await
    }

    /// Opens a queue that flushes only when asked, after `tweak` edits its config.
    async fn open_with(
        dir: &std::path::Path,
        tweak: impl FnOnce(&mut QueueConfig),
    ) -> EmbeddedQueue {
        let mut cfg = QueueConfig::new(dir.join("wal"));
        cfg.writer.flush_interval = Duration::from_secs(3600);
        tweak(&mut cfg);
        let storage = Storage::open(dir.join("blocks").to_str().unwrap()).unwrap();
        EmbeddedQueue::open(
            cfg,
            storage,
            Arc::new(SamplingRules::default()),
            Arc::new(IngestMetrics::unregistered()),
            Arc::new(WriterMetrics::unregistered()),
        )
        .await
        .unwrap()
    }

    fn rows(s: &TenantSnapshot) -> (usize, u64) {
        (
            s.head.iter().map(|b| b.num_rows()).sum(),
            s.blocks.iter().map(|b| b.spans).sum(),
        )
    }

    #[tokio::test]
    async fn appended_spans_are_visible_then_flushed_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path()).await;
        let (a, b): (TenantId, TenantId) = ("ns/a".parse().unwrap(), "ns/b".parse().unwrap());
        q.append(&a, spans(1, 3), Vec::new()).await.unwrap();
        q.append(&b, spans(2, 2), Vec::new()).await.unwrap();
        q.append(&a, spans(3, 1), Vec::new()).await.unwrap();
        assert_eq!(rows(&q.snapshot(&a)), (4, 0));
        assert_eq!(rows(&q.snapshot(&b)), (2, 0));

        q.flush().await.unwrap();
        let sa = q.snapshot(&a);
        assert_eq!(rows(&sa), (0, 4));
        assert_eq!(sa.blocks.len(), 1);
        assert_eq!(sa.blocks[0].traces, 2);
        assert!(sa.blocks[0].path.starts_with("tenants/ns/a/blocks/wal-"));
        assert_eq!(rows(&q.snapshot(&b)), (0, 2));
        assert_eq!(rows(&q.snapshot(&"ns/c".parse().unwrap())), (0, 0));
        q.shutdown().await.unwrap();

        // Reopening finds the blocks and replays nothing.
        let q = open(dir.path()).await;
        assert_eq!(rows(&q.snapshot(&a)), (0, 4));
        assert_eq!(rows(&q.snapshot(&b)), (0, 2));
        q.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unflushed_spans_are_replayed_and_later_sequence_numbers_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let t: TenantId = "ns/a".parse().unwrap();
        let q = open(dir.path()).await;
        q.append(&t, spans(1, 2), Vec::new()).await.unwrap();
        q.flush().await.unwrap();
        q.append(&t, spans(2, 5), Vec::new()).await.unwrap();
        // Stop the writer without flushing: the 5 spans live only in the log.
        let (tx, rx) = oneshot::channel();
        q.tx.send(Cmd::Stop(tx)).await.unwrap();
        rx.await.unwrap();
        assert!(
            q.append(&t, spans(9, 1), Vec::new()).await.is_err(),
            "a stopped queue refuses appends"
        );

        let q = open(dir.path()).await;
        assert_eq!(rows(&q.snapshot(&t)), (5, 2));
        q.append(&t, spans(3, 1), Vec::new()).await.unwrap();
        q.flush().await.unwrap();
        let s = q.snapshot(&t);
        assert_eq!(rows(&s), (0, 8));
        let mut ranges: Vec<(u64, u64)> =
            s.blocks.iter().map(|b| (b.first_seq, b.last_seq)).collect();
        ranges.sort();
        assert_eq!(ranges.len(), 2);
        assert!(
            ranges[0].1 < ranges[1].0,
            "block ranges overlap: {ranges:?}"
        );
        q.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_head_refuses_appends_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let q = open_with(dir.path(), |cfg| {
            cfg.max_head_bytes = 1;
            cfg.writer.flush_bytes = usize::MAX;
        })
        .await;
        let t: TenantId = "ns/a".parse().unwrap();
        q.append(&t, spans(1, 1), Vec::new()).await.unwrap();
        let err = q.append(&t, spans(2, 1), Vec::new()).await.unwrap_err();
        assert!(matches!(err, SinkError::Unavailable(_)), "{err}");
        q.shutdown().await.unwrap();
    }
}
