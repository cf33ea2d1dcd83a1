//! The embedded queue of `loupe standalone`: a write-ahead log on local disk in place
//! of Kafka, an in-memory head that queries see at once, and a flusher that turns the
//! head into Parquet blocks and then deletes the log segments they cover.
//!
//! Guarantees:
//! - [`EmbeddedQueue::append`] returns only after the spans are fsynced to the log
//!   (group commit: one `fdatasync` for every append waiting at that moment);
//! - acknowledged spans are visible to queries immediately (head), and stay visible
//!   while their block is written (the head keeps them until the block's metadata is
//!   durable and indexed);
//! - on start, log records not yet in a block are replayed into the head, so a crash
//!   (even SIGKILL) loses nothing acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::array::RecordBatch;
use loupe_core::TenantId;
use loupe_core::span::{SpanBatch, SpanRecord, spans_to_batch};
use loupe_core::storage::{BlockMeta, SpanSource, Storage, TenantSnapshot};
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::block;
use crate::metrics::IngestMetrics;
use crate::sink::{SinkError, SpanSink};
use crate::wal::{Wal, WalError};

/// Source name of blocks written from the embedded queue.
pub const WAL_SOURCE: &str = "wal";

/// Settings of the embedded queue.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Directory of the write-ahead log.
    pub wal_dir: PathBuf,
    /// Log segment size before rotation.
    pub segment_bytes: u64,
    /// Longest time spans stay in the head before they are written as a block.
    pub flush_interval: Duration,
    /// Head size that triggers a flush before the interval is up.
    pub flush_bytes: usize,
    /// Head size above which appends are refused (storage is not keeping up).
    pub max_head_bytes: usize,
    /// Longest an append waits for the log before the client is told to retry.
    pub append_timeout: Duration,
}

impl QueueConfig {
    pub fn new(wal_dir: PathBuf) -> QueueConfig {
        QueueConfig {
            wal_dir,
            segment_bytes: 128 << 20,
            flush_interval: Duration::from_secs(5),
            flush_bytes: 256 << 20,
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
    #[error("write-ahead log: {0}")]
    Writer(String),
}

struct HeadChunk {
    seq: u64,
    batch: RecordBatch,
    bytes: usize,
}

#[derive(Default)]
struct State {
    head: BTreeMap<TenantId, Vec<HeadChunk>>,
    head_bytes: usize,
    blocks: HashMap<TenantId, Vec<BlockMeta>>,
}

impl State {
    fn push(&mut self, tenant: TenantId, chunk: HeadChunk) {
        self.head_bytes += chunk.bytes;
        self.head.entry(tenant).or_default().push(chunk);
    }
}

struct AppendCmd {
    tenant: TenantId,
    payload: Vec<u8>,
    batch: RecordBatch,
    bytes: usize,
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
    state: RwLock<State>,
    flush_wanted: Notify,
    config: QueueConfig,
    metrics: Arc<IngestMetrics>,
}

/// The standalone queue; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedQueue {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    storage: Storage,
}

impl EmbeddedQueue {
    /// Opens the log, loads the block index from storage, replays unflushed records
    /// into the head, and starts the log writer thread and the flusher task.
    pub async fn open(
        config: QueueConfig,
        storage: Storage,
        metrics: Arc<IngestMetrics>,
    ) -> Result<EmbeddedQueue, QueueError> {
        let (metas, orphans) = storage.list_blocks().await?;
        for path in orphans {
            tracing::info!(%path, "removing a block left without metadata by an interrupted flush");
            storage.delete(&path).await?;
        }
        let mut flushed: HashMap<TenantId, u64> = HashMap::new();
        let mut max_seq = 0;
        let mut state = State::default();
        for meta in metas {
            if meta.source == WAL_SOURCE {
                let w = flushed.entry(meta.tenant.clone()).or_default();
                *w = (*w).max(meta.last_seq);
                max_seq = max_seq.max(meta.last_seq);
            }
            state
                .blocks
                .entry(meta.tenant.clone())
                .or_default()
                .push(meta);
        }

        let cfg = config.clone();
        let (wal, records) = tokio::task::spawn_blocking(move || {
            Wal::open(&cfg.wal_dir, cfg.segment_bytes, max_seq + 1)
        })
        .await
        .expect("wal open does not panic")?;

        let mut replayed = 0usize;
        for rec in records {
            let batch =
                SpanBatch::decode(rec.payload.as_slice()).map_err(|e| QueueError::BadRecord {
                    seq: rec.seq,
                    reason: e.to_string(),
                })?;
            let tenant = batch.tenant_id().map_err(|e| QueueError::BadRecord {
                seq: rec.seq,
                reason: e.to_string(),
            })?;
            if flushed.get(&tenant).is_some_and(|&w| rec.seq <= w) {
                continue;
            }
            let arrow = spans_to_batch(&batch.spans).map_err(|e| QueueError::BadRecord {
                seq: rec.seq,
                reason: e.to_string(),
            })?;
            replayed += batch.spans.len();
            let bytes = arrow.get_array_memory_size();
            state.push(
                tenant,
                HeadChunk {
                    seq: rec.seq,
                    batch: arrow,
                    bytes,
                },
            );
        }
        if replayed > 0 {
            tracing::info!(spans = replayed, "replayed spans from the write-ahead log");
        }
        metrics.head_bytes.set(state.head_bytes as i64);

        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            flush_wanted: Notify::new(),
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

    /// Writes every span accepted so far into blocks now.
    pub async fn flush(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Rotate(tx)).await.is_err() {
            return Ok(());
        }
        let upto = match rx.await {
            Ok(Ok(seq)) => seq,
            Ok(Err(e)) => return Err(QueueError::Writer(e)),
            Err(_) => return Ok(()),
        };
        self.flush_through(upto).await
    }

    async fn flush_loop(self) {
        let interval = self.shared.config.flush_interval;
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.shared.flush_wanted.notified() => {}
            }
            if self.tx.is_closed() {
                return;
            }
            match self.flush().await {
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

    /// Writes head chunks with `seq <= upto` as one block per tenant, then drops them
    /// from the head and deletes the log segments no longer needed.
    async fn flush_through(&self, upto: u64) -> Result<(), QueueError> {
        let work: Vec<(TenantId, u64, u64, Vec<RecordBatch>)> = {
            let state = self.shared.state.read().expect("queue lock");
            state
                .head
                .iter()
                .filter_map(|(tenant, chunks)| {
                    let chunks: Vec<_> = chunks.iter().take_while(|c| c.seq <= upto).collect();
                    let first = chunks.first()?.seq;
                    let last = chunks.last()?.seq;
                    let batches = chunks.iter().map(|c| c.batch.clone()).collect();
                    Some((tenant.clone(), first, last, batches))
                })
                .collect()
        };
        let mut first_error = None;
        for (tenant, first, last, batches) in work {
            let started = std::time::Instant::now();
            match block::write(&self.storage, &tenant, WAL_SOURCE, first, last, batches).await {
                Ok(meta) => {
                    let m = &self.shared.metrics;
                    m.blocks_written.inc();
                    m.block_spans_written.inc_by(meta.spans);
                    m.block_bytes_written.inc_by(meta.size_bytes);
                    m.flush_seconds.observe(started.elapsed().as_secs_f64());
                    tracing::debug!(tenant = %tenant, block = %meta.block_id, spans = meta.spans, bytes = meta.size_bytes, "block written");
                    let mut state = self.shared.state.write().expect("queue lock");
                    state.blocks.entry(tenant.clone()).or_default().push(meta);
                    let mut freed = 0;
                    if let Some(chunks) = state.head.get_mut(&tenant) {
                        let n = chunks.iter().take_while(|c| c.seq <= last).count();
                        freed = chunks.drain(..n).map(|c| c.bytes).sum::<usize>();
                        if chunks.is_empty() {
                            state.head.remove(&tenant);
                        }
                    }
                    state.head_bytes -= freed;
                    m.head_bytes.set(state.head_bytes as i64);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Log segments are needed up to the oldest record still only in the head.
        let oldest_unflushed = {
            let state = self.shared.state.read().expect("queue lock");
            state
                .head
                .values()
                .filter_map(|c| c.first())
                .map(|c| c.seq)
                .min()
        };
        let through = match oldest_unflushed {
            Some(seq) => seq.saturating_sub(1).min(upto),
            None => upto,
        };
        let _ = self.tx.send(Cmd::Truncate(through)).await;
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
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
    ) -> futures::future::BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if spans.is_empty() {
                return Ok(());
            }
            let cfg = &self.shared.config;
            let head_bytes = self.shared.state.read().expect("queue lock").head_bytes;
            if head_bytes > cfg.max_head_bytes {
                self.shared.flush_wanted.notify_one();
                return Err(SinkError::Unavailable(
                    "block storage is not keeping up; retry later".into(),
                ));
            }
            let batch = spans_to_batch(&spans).map_err(|e| SinkError::Internal(e.to_string()))?;
            let payload = SpanBatch {
                tenant: tenant.to_string(),
                spans,
            }
            .encode_to_vec();
            let bytes = batch.get_array_memory_size();
            let (ack, done) = oneshot::channel();
            let cmd = Cmd::Append(AppendCmd {
                tenant: tenant.clone(),
                payload,
                batch,
                bytes,
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
            if result.is_ok() {
                let state = self.shared.state.read().expect("queue lock");
                if state.head_bytes >= cfg.flush_bytes {
                    self.shared.flush_wanted.notify_one();
                }
            }
            result
        })
    }
}

impl SpanSource for EmbeddedQueue {
    fn snapshot(&self, tenant: &TenantId) -> TenantSnapshot {
        let state = self.shared.state.read().expect("queue lock");
        TenantSnapshot {
            blocks: state.blocks.get(tenant).cloned().unwrap_or_default(),
            head: state
                .head
                .get(tenant)
                .map(|chunks| chunks.iter().map(|c| c.batch.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

/// The log writer thread: takes every command waiting, appends all appends, fsyncs
/// once, publishes them to the head, then acknowledges them.
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
            let started = std::time::Instant::now();
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
                    let mut state = shared.state.write().expect("queue lock");
                    let mut acks = Vec::with_capacity(pending.len());
                    for (a, seq) in pending.drain(..).zip(seqs) {
                        state.push(
                            a.tenant,
                            HeadChunk {
                                seq,
                                batch: a.batch,
                                bytes: a.bytes,
                            },
                        );
                        acks.push(a.ack);
                    }
                    m.head_bytes.set(state.head_bytes as i64);
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
        let mut cfg = QueueConfig::new(dir.join("wal"));
        cfg.flush_interval = Duration::from_secs(3600);
        let storage = Storage::open(dir.join("blocks").to_str().unwrap()).unwrap();
        EmbeddedQueue::open(cfg, storage, Arc::new(IngestMetrics::unregistered()))
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
        q.append(&a, spans(1, 3)).await.unwrap();
        q.append(&b, spans(2, 2)).await.unwrap();
        q.append(&a, spans(3, 1)).await.unwrap();
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
        q.append(&t, spans(1, 2)).await.unwrap();
        q.flush().await.unwrap();
        q.append(&t, spans(2, 5)).await.unwrap();
        // Stop the writer without flushing: the 5 spans live only in the log.
        let (tx, rx) = oneshot::channel();
        q.tx.send(Cmd::Stop(tx)).await.unwrap();
        rx.await.unwrap();
        assert!(
            q.append(&t, spans(9, 1)).await.is_err(),
            "a stopped queue refuses appends"
        );

        let q = open(dir.path()).await;
        assert_eq!(rows(&q.snapshot(&t)), (5, 2));
        q.append(&t, spans(3, 1)).await.unwrap();
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
        let mut cfg = QueueConfig::new(dir.path().join("wal"));
        cfg.flush_interval = Duration::from_secs(3600);
        cfg.max_head_bytes = 1;
        cfg.flush_bytes = usize::MAX;
        let storage = Storage::open(dir.path().join("blocks").to_str().unwrap()).unwrap();
        let q = EmbeddedQueue::open(cfg, storage, Arc::new(IngestMetrics::unregistered()))
            .await
            .unwrap();
        let t: TenantId = "ns/a".parse().unwrap();
        q.append(&t, spans(1, 1)).await.unwrap();
        let err = q.append(&t, spans(2, 1)).await.unwrap_err();
        assert!(matches!(err, SinkError::Unavailable(_)), "{err}");
        q.shutdown().await.unwrap();
    }
}
