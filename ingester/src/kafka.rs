//! Kafka, for the distributed data path: the receive role produces every accepted
//! span to a topic (default `loupe.spans`), keyed by tenant and trace id so that a
//! trace's spans share a partition; the write role consumes the topic in a consumer
//! group, runs each partition through a [`PartitionWriter`] (tail sampling, blocks)
//! and commits offsets only up to the oldest record not yet in a durable block.
//!
//! Only what every Kafka-protocol broker offers is used: an idempotent producer with
//! `acks=all`, consumer groups with manual commits, and an explicit CreateTopics when
//! the topic is missing (no transactions, no auto-creation, no CreatePartitions).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use loupe_core::TenantId;
use loupe_core::score::ScoreRecord;
use loupe_core::span::{SpanBatch, SpanRecord, group_by_trace};
use loupe_core::storage::Storage;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::block;
use crate::metrics::{IngestMetrics, PartitionLabels, WriterMetrics};
use crate::sink::{SinkError, SpanSink};
use crate::writer::{BlockJob, PartitionWriter, SamplingRules, WriterConfig};

/// Default topic of normalized spans.
pub const DEFAULT_TOPIC: &str = "loupe.spans";

/// How to reach Kafka; shared by every role that talks to it.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, …). Values may be
    /// secrets: they are never logged.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            topic: DEFAULT_TOPIC.into(),
            properties: Vec::new(),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // librdkafka logs through `log`; keep its noise at warnings.
        c.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("invalid Kafka client setting: {0}")]
    Client(KafkaError),
    #[error(
        "Kafka topic {topic:?} does not exist and could not be created ({reason}); create it with {partitions} partitions, or let the operator do it"
    )]
    CreateTopic {
        topic: String,
        partitions: i32,
        reason: String,
    },
    #[error("cannot reach Kafka at {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
}

/// Makes sure the topic exists, creating it when missing; returns its partition count.
pub async fn ensure_topic(
    config: &KafkaConfig,
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<i32, KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = config
        .client_config()
        .create()
        .map_err(KafkaSetupError::Client)?;
    let admin = Arc::new(admin);
    let existing = {
        let admin = admin.clone();
        let topic = config.topic.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map_or(0, |t| t.partitions().len() as i32)
                })
        })
        .await
        .expect("metadata task does not panic")
    };
    match existing {
        Ok(n) if n > 0 => return Ok(n),
        Ok(_) => {}
        Err(e) => {
            return Err(KafkaSetupError::Unreachable {
                brokers: config.brokers.clone(),
                reason: e.to_string(),
            });
        }
    }
    let new = NewTopic::new(
        &config.topic,
        partitions,
        TopicReplication::Fixed(replication),
    );
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let failed = |reason: String| KafkaSetupError::CreateTopic {
        topic: config.topic.clone(),
        partitions,
        reason,
    };
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| failed(e.to_string()))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(failed(code.to_string())),
        }
    }
    tracing::info!(topic = %config.topic, partitions, replication, "created the Kafka topic");
    Ok(partitions)
}

/// The record key of a trace: tenant, a NUL, and the 16-byte trace id. The default
/// partitioner hashes it, so a trace's spans always share a partition.
pub fn record_key(tenant: &TenantId, trace_id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.as_str().len() + 1 + trace_id.len());
    key.extend_from_slice(tenant.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(trace_id);
    key
}

/// Settings of the receive role's producer.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    /// Longest an export waits for Kafka's acknowledgment (`message.timeout.ms`);
    /// after it the client gets UNAVAILABLE / 503 and retries.
    pub delivery_timeout: Duration,
    /// Memory of records waiting for Kafka (`queue.buffering.max.kbytes`); beyond it
    /// exports are refused at once.
    pub max_buffer_bytes: usize,
    /// `zstd`, `lz4`, `snappy`, `gzip` or `none`.
    pub compression: String,
    pub linger: Duration,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            delivery_timeout: Duration::from_secs(10),
            max_buffer_bytes: 256 << 20,
            compression: "zstd".into(),
            linger: Duration::from_millis(5),
        }
    }
}

/// The receive role's sink: an idempotent producer with `acks=all`. An export is
/// acknowledged only when Kafka acknowledged every record of it.
pub struct KafkaSink {
    config: KafkaConfig,
    settings: ProducerSettings,
    producer: RwLock<Arc<FutureProducer>>,
}

impl KafkaSink {
    pub fn new(
        config: KafkaConfig,
        settings: ProducerSettings,
    ) -> Result<KafkaSink, KafkaSetupError> {
        let producer = Self::create(&config, &settings)?;
        Ok(KafkaSink {
            config,
            settings,
            producer: RwLock::new(Arc::new(producer)),
        })
    }

    fn create(
        config: &KafkaConfig,
        settings: &ProducerSettings,
    ) -> Result<FutureProducer, KafkaSetupError> {
        let mut c = config.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &settings.compression)
            .set("linger.ms", settings.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                settings.delivery_timeout.as_millis().max(1).to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (settings.max_buffer_bytes / 1024).max(1).to_string(),
            )
            .set("queue.buffering.max.messages", "1000000");
        c.create().map_err(KafkaSetupError::Client)
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.read().expect("producer lock").clone()
    }

    /// An idempotent producer that hit a fatal error cannot produce again; it is
    /// replaced so that the role recovers by itself.
    fn replace_if_fatal(&self, failed: &Arc<FutureProducer>) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut slot = self.producer.write().expect("producer lock");
        if !Arc::ptr_eq(&slot, failed) {
            return;
        }
        tracing::warn!(%code, %reason, "the Kafka producer hit a fatal error; creating a new one");
        match Self::create(&self.config, &self.settings) {
            Ok(p) => *slot = Arc::new(p),
            Err(e) => tracing::error!(error = %e, "recreating the Kafka producer failed"),
        }
    }

    /// Waits until every record produced so far is acknowledged or failed.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
    }
}

impl SpanSink for KafkaSink {
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        spans: Vec<SpanRecord>,
        scores: Vec<ScoreRecord>,
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if spans.is_empty() && scores.is_empty() {
                return Ok(());
            }
            // One record per trace: the key routes it, and a writer decides it whole.
            // Scores go to their trace's partition too.
            let mut records: Vec<(Vec<u8>, Vec<SpanRecord>, Vec<ScoreRecord>)> =
                group_by_trace(spans)
                    .into_iter()
                    .map(|(t, spans)| (t, spans, Vec::new()))
                    .collect();
            let mut index: std::collections::HashMap<Vec<u8>, usize> = records
                .iter()
                .enumerate()
                .map(|(i, r)| (r.0.clone(), i))
                .collect();
            for score in scores {
                match index.get(&score.trace_id) {
                    Some(&i) => records[i].2.push(score),
                    None => {
                        index.insert(score.trace_id.clone(), records.len());
                        records.push((score.trace_id.clone(), Vec::new(), vec![score]));
                    }
                }
            }
            let producer = self.producer();
            let mut deliveries = Vec::with_capacity(records.len());
            for (trace_id, spans, scores) in records {
                let key = record_key(tenant, &trace_id);
                let payload = SpanBatch {
                    tenant: tenant.to_string(),
                    spans,
                    scores,
                }
                .encode_to_vec();
                let record = FutureRecord::to(&self.config.topic)
                    .key(&key)
                    .payload(&payload);
                match producer.send_result(record) {
                    Ok(d) => deliveries.push(d),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        return Err(SinkError::Unavailable(
                            "the Kafka producer queue is full (Kafka is slow or unreachable); retry later".into(),
                        ));
                    }
                    Err((e, _)) => {
                        self.replace_if_fatal(&producer);
                        return Err(SinkError::Unavailable(format!(
                            "producing to Kafka failed: {e}"
                        )));
                    }
                }
            }
            // librdkafka fails every record by message.timeout.ms; the extra second
            // only guards against a lost callback.
            let wait = self.settings.delivery_timeout + Duration::from_secs(1);
            let results = tokio::time::timeout(wait, futures::future::join_all(deliveries))
                .await
                .map_err(|_| {
                    SinkError::Unavailable("timed out waiting for Kafka to acknowledge".into())
                })?;
            for r in results {
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        self.replace_if_fatal(&producer);
                        return Err(SinkError::Unavailable(format!(
                            "Kafka did not acknowledge the spans: {e}"
                        )));
                    }
                    Err(_) => {
                        return Err(SinkError::Unavailable(
                            "the Kafka producer was replaced; retry".into(),
                        ));
                    }
                }
            }
            Ok(())
        })
    }
}

/// Settings of the write role.
#[derive(Clone, Debug)]
pub struct WriteRoleSettings {
    pub group_id: String,
    pub writer: WriterConfig,
    /// Kept and undecided spans above which consumption pauses until blocks catch up.
    pub max_buffer_bytes: usize,
    /// Consumer-group session timeout: how soon a dead writer's partitions move.
    pub session_timeout: Duration,
}

impl Default for WriteRoleSettings {
    fn default() -> Self {
        WriteRoleSettings {
            group_id: "loupe-writers".into(),
            writer: WriterConfig::default(),
            max_buffer_bytes: 1 << 30,
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// What the consumer thread and its rebalance callbacks share.
struct Shared {
    topic: String,
    partitions: Mutex<BTreeMap<i32, PartitionState>>,
    storage: Storage,
    rules: Arc<RwLock<Arc<SamplingRules>>>,
    writer_config: WriterConfig,
    metrics: Arc<WriterMetrics>,
    ingest_metrics: Arc<IngestMetrics>,
    runtime: tokio::runtime::Handle,
}

struct PartitionState {
    writer: PartitionWriter,
    committed: Option<u64>,
    /// Whether the first record read was compared with the group's commit.
    start_checked: bool,
}

struct WriterContext {
    shared: Arc<Shared>,
}

impl ClientContext for WriterContext {}

impl ConsumerContext for WriterContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            self.shared.metrics.rebalances.inc();
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?revoked, "partitions revoked: writing what was decided and handing over the rest");
            let mut parts = self.shared.partitions.lock().expect("partitions lock");
            for p in revoked {
                let Some(mut state) = parts.remove(&p) else {
                    continue;
                };
                // Undecided traces are not written: their records lie after the
                // commit point, so the next owner reads and decides them.
                match self.shared.flush(p, &mut state, Instant::now(), true) {
                    Ok(()) => self
                        .shared
                        .commit(consumer, p, &mut state, CommitMode::Sync),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "could not write blocks before handing over; the next owner replays from the last commit")
                    }
                }
                self.shared
                    .metrics
                    .lag_records
                    .remove(&PartitionLabels { partition: p });
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.shared.metrics.rebalances.inc();
                let mut parts = self.shared.partitions.lock().expect("partitions lock");
                let mut assigned = Vec::new();
                for e in list.elements() {
                    assigned.push(e.partition());
                    parts
                        .entry(e.partition())
                        .or_insert_with(|| PartitionState {
                            writer: PartitionWriter::new(
                                self.shared.writer_config.clone(),
                                self.shared.rules.read().expect("rules lock").clone(),
                                self.shared.metrics.clone(),
                            ),
                            committed: None,
                            start_checked: false,
                        });
                }
                tracing::info!(partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance error"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error(transparent)]
    Writer(#[from] crate::writer::WriterError),
    #[error(transparent)]
    Block(#[from] block::BlockError),
}

impl Shared {
    /// Writes the partition's due blocks (all of them with `force`).
    fn flush(
        &self,
        partition: i32,
        state: &mut PartitionState,
        now: Instant,
        force: bool,
    ) -> Result<(), FlushError> {
        let jobs = state.writer.due_blocks(now, force)?;
        for job in jobs {
            self.write_block(partition, &job)?;
            state.writer.written(&job);
        }
        Ok(())
    }

    fn write_block(&self, partition: i32, job: &BlockJob) -> Result<(), FlushError> {
        let started = Instant::now();
        let source = format!("p{partition}");
        let meta = self
            .runtime
            .block_on(block::write(&self.storage, &source, job))?;
        let m = &self.ingest_metrics;
        m.blocks_written.inc();
        m.block_spans_written.inc_by(meta.spans);
        m.block_bytes_written.inc_by(meta.size_bytes);
        m.flush_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(tenant = %job.tenant, block = %meta.block_id, spans = meta.spans, "block written");
        Ok(())
    }

    /// Commits the partition up to its oldest record not yet in a durable block.
    fn commit(
        &self,
        consumer: &BaseConsumer<WriterContext>,
        partition: i32,
        state: &mut PartitionState,
        mode: CommitMode,
    ) {
        let Some(safe) = state.writer.safe_offset() else {
            return;
        };
        if state.committed.is_some_and(|c| c >= safe) {
            return;
        }
        let mut list = TopicPartitionList::new();
        if list
            .add_partition_offset(&self.topic, partition, Offset::Offset(safe as i64))
            .is_err()
        {
            return;
        }
        match consumer.commit(&list, mode) {
            Ok(()) => {
                state.committed = Some(safe);
                self.metrics
                    .committed_offset
                    .get_or_create(&PartitionLabels { partition })
                    .set(safe as i64);
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "committing offsets failed; retrying later")
            }
        }
    }
}

/// Detects records the broker deleted before this writer read them: the topic's
/// retention was shorter than the writers' lag, and their spans are lost. Offsets of
/// a topic written by idempotent producers without transactions have no gaps, so a
/// record past the expected offset means the ones between are gone; it is counted in
/// `loupe_writer_records_lost_total` and logged, never passed over in silence.
fn check_continuity(
    consumer: &BaseConsumer<WriterContext>,
    shared: &Shared,
    partition: i32,
    offset: u64,
    state: &mut PartitionState,
) {
    let expected = match state.writer.next_offset() {
        Some(next) => Some(next),
        None if !state.start_checked => {
            state.start_checked = true;
            let mut list = TopicPartitionList::new();
            list.add_partition(&shared.topic, partition);
            consumer
                .committed_offsets(list, Duration::from_secs(5))
                .ok()
                .and_then(|l| {
                    l.find_partition(&shared.topic, partition)
                        .and_then(|e| e.offset().to_raw())
                })
                .filter(|&o| o >= 0)
                .map(|o| o as u64)
        }
        None => None,
    };
    if let Some(expected) = expected
        && offset > expected
    {
        let lost = offset - expected;
        shared.metrics.records_lost.inc_by(lost);
        tracing::error!(
            partition,
            first_lost = expected,
            next_read = offset,
            lost,
            "Kafka deleted records before this writer read them (the topic's retention is shorter than the writers' lag); their spans are lost"
        );
    }
}

/// Whether this member's share of a stable group's partitions is smaller than any
/// balanced assignment (range, round-robin, sticky) gives a member: then the
/// coordinator's assignment was made for a membership that no longer exists.
fn assignment_is_stale(partitions: usize, members: usize, mine: usize) -> bool {
    members > 0 && mine < partitions / members
}

/// Guards against a group coordinator that evicts a dead member but keeps the
/// assignment made for it (tansu 0.6.0 does, when a heartbeat notices the expiry):
/// the dead member's partitions would then stay unowned. Every session timeout the
/// writer describes its group; when its own share stays below what a balanced
/// assignment gives each live member on two checks in a row, it leaves and rejoins
/// the group, which makes the coordinator assign again. Brokers that cannot describe
/// groups (librdkafka's mock cluster) turn the check off.
struct AssignmentWatch {
    every: Duration,
    last: Instant,
    suspect: Option<(usize, usize)>,
    off: bool,
}

impl AssignmentWatch {
    fn new(every: Duration) -> AssignmentWatch {
        AssignmentWatch {
            every,
            last: Instant::now(),
            suspect: None,
            off: false,
        }
    }

    /// True when the writer should leave and rejoin the group.
    fn check(&mut self, consumer: &BaseConsumer<WriterContext>, topic: &str, group: &str) -> bool {
        if self.off || self.last.elapsed() < self.every {
            return false;
        }
        self.last = Instant::now();
        let timeout = Duration::from_secs(1);
        let groups = match consumer.fetch_group_list(Some(group), timeout) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "the broker cannot describe consumer groups; the stale-assignment check is off");
                self.off = true;
                return false;
            }
        };
        let Some(info) = groups.groups().iter().find(|g| g.name() == group) else {
            return false;
        };
        let partitions = consumer
            .fetch_metadata(Some(topic), timeout)
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len())
            });
        let mine = consumer.assignment().map(|a| a.count());
        let (Some(partitions), Ok(mine)) = (partitions, mine) else {
            return false;
        };
        let members = info.members().len();
        if info.state() != "Stable" || !assignment_is_stale(partitions, members, mine) {
            self.suspect = None;
            return false;
        }
        if self.suspect != Some((members, mine)) {
            self.suspect = Some((members, mine));
            return false;
        }
        self.suspect = None;
        tracing::warn!(
            members,
            partitions,
            owned = mine,
            "the group coordinator kept an assignment made for members that are gone; leaving and rejoining the group so that every partition has an owner"
        );
        true
    }
}

/// What the write role writes to and reports through.
pub struct WriterServices {
    pub storage: Storage,
    /// The tail-sampling rules; replace the inner value to reload them (partition
    /// writers pick the new rules up within a maintenance round).
    pub rules: Arc<RwLock<Arc<SamplingRules>>>,
    pub metrics: Arc<WriterMetrics>,
    pub ingest_metrics: Arc<IngestMetrics>,
    /// Runtime on which block writes (object store I/O) run.
    pub runtime: tokio::runtime::Handle,
}

/// Runs the write role until `stop` is set: consumes the topic in the consumer
/// group, decides and writes traces, commits. Blocking: run it on its own thread.
pub fn run_writer(
    config: &KafkaConfig,
    settings: &WriteRoleSettings,
    services: WriterServices,
    stop: Arc<AtomicBool>,
) -> Result<(), KafkaSetupError> {
    let WriterServices {
        storage,
        rules,
        metrics,
        ingest_metrics,
        runtime,
    } = services;
    let shared = Arc::new(Shared {
        topic: config.topic.clone(),
        partitions: Mutex::new(BTreeMap::new()),
        storage,
        rules,
        writer_config: settings.writer.clone(),
        metrics: metrics.clone(),
        ingest_metrics,
        runtime,
    });
    let mut c = config.client_config();
    c.set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 4)
                .max(100)
                .to_string(),
        );
    let consumer: BaseConsumer<WriterContext> = c
        .create_with_context(WriterContext {
            shared: shared.clone(),
        })
        .map_err(KafkaSetupError::Client)?;
    consumer
        .subscribe(&[config.topic.as_str()])
        .map_err(KafkaSetupError::Client)?;
    tracing::info!(topic = %config.topic, group = %settings.group_id, "writer joined the consumer group");

    let mut last_maintenance = Instant::now();
    let mut clock = ConsumeClock::new();
    let mut last_lag = Instant::now();
    let mut watch = AssignmentWatch::new(settings.session_timeout);
    let mut rules_in_force = shared.rules.read().expect("rules lock").clone();
    let mut paused = false;
    let mut backoff_until: Option<Instant> = None;
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                metrics.records_consumed.inc();
                let partition = msg.partition();
                let offset = msg.offset().max(0) as u64;
                let decoded = msg
                    .payload()
                    .ok_or_else(|| "empty record".to_string())
                    .and_then(|p| SpanBatch::decode(p).map_err(|e| e.to_string()))
                    .and_then(|b| {
                        let t = b.tenant_id().map_err(|e| e.to_string())?;
                        Ok((t, b.spans, b.scores))
                    });
                let mut parts = shared.partitions.lock().expect("partitions lock");
                let Some(state) = parts.get_mut(&partition) else {
                    continue;
                };
                check_continuity(&consumer, &shared, partition, offset, state);
                match decoded {
                    Ok((tenant, spans, scores)) => {
                        let now = clock.now();
                        state.writer.push(offset, &tenant, spans, now);
                        state.writer.push_scores(offset, &tenant, scores, now);
                    }
                    Err(reason) => {
                        metrics.records_rejected.inc();
                        tracing::error!(partition, offset, %reason, "skipping a Kafka record that is not a Loupe span batch");
                        state.writer.skip(offset);
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
            None => {}
        }
        if last_maintenance.elapsed() < Duration::from_millis(200) {
            continue;
        }
        last_maintenance = Instant::now();
        let now = clock.now();
        let mut parts = shared.partitions.lock().expect("partitions lock");
        let retry_now = backoff_until.is_none_or(|t| now >= t);
        let mut failed = false;
        let rules = shared.rules.read().expect("rules lock").clone();
        let rules_changed = !Arc::ptr_eq(&rules, &rules_in_force);
        rules_in_force = rules;
        for (&p, state) in parts.iter_mut() {
            if rules_changed {
                state.writer.set_rules(rules_in_force.clone());
            }
            state.writer.tick(now);
            if retry_now && let Err(e) = shared.flush(p, state, now, false) {
                failed = true;
                shared.ingest_metrics.flush_errors.inc();
                tracing::error!(partition = p, error = %e, retry_in = ?backoff, "writing a block failed; the spans stay buffered and uncommitted");
            }
            shared.commit(&consumer, p, state, CommitMode::Async);
        }
        if failed {
            backoff_until = Some(now + backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        } else if retry_now {
            backoff_until = None;
            backoff = Duration::from_millis(500);
        }
        let buffered: usize = parts.values().map(|s| s.writer.buffered_bytes()).sum();
        let assigned: Vec<(i32, Option<u64>)> = parts
            .iter()
            .map(|(&p, s)| (p, s.writer.next_offset()))
            .collect();
        drop(parts);
        if let Ok(assignment) = consumer.assignment() {
            if buffered > settings.max_buffer_bytes && !paused {
                tracing::warn!(
                    buffered,
                    "writer memory is full; pausing consumption until blocks are written"
                );
                paused = consumer.pause(&assignment).is_ok();
            } else if buffered <= settings.max_buffer_bytes / 2 && paused {
                paused = consumer.resume(&assignment).is_err();
            }
        }
        if watch.check(&consumer, &config.topic, &settings.group_id) {
            consumer.unsubscribe();
            consumer
                .subscribe(&[config.topic.as_str()])
                .map_err(KafkaSetupError::Client)?;
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            for (p, next) in assigned {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&config.topic, p, Duration::from_secs(1))
                {
                    let lag = high - next.map_or(0, |n| n as i64);
                    metrics
                        .lag_records
                        .get_or_create(&PartitionLabels { partition: p })
                        .set(lag.max(0));
                }
            }
        }
        clock.stalled(last_maintenance.elapsed());
    }

    tracing::info!("writer stopping: writing decided spans and committing");
    let mut parts = shared.partitions.lock().expect("partitions lock");
    for (&p, state) in parts.iter_mut() {
        let now = clock.now();
        state.writer.tick(now);
        match shared.flush(p, state, now, true) {
            Ok(()) => shared.commit(&consumer, p, state, CommitMode::Sync),
            Err(e) => {
                tracing::error!(partition = p, error = %e, "final block write failed; the records are replayed by the next owner")
            }
        }
    }
    parts.clear();
    drop(parts);
    consumer.unsubscribe();
    Ok(())
}

/// The clock the writer's decision waits and flush intervals run on: wall time less
/// the time the loop spent not consuming (writing blocks, committing, reading
/// watermarks). A trace waits for spans that may still come; while the loop writes a
/// block, they wait unread in Kafka. On the wall clock, a slow block write (a loaded
/// disk, a slow object store) would use up the waits of every held trace, and traces
/// would be decided without children already in the log.
struct ConsumeClock {
    origin: Instant,
    stalled: Duration,
}

impl ConsumeClock {
    fn new() -> ConsumeClock {
        ConsumeClock {
            origin: Instant::now(),
            stalled: Duration::ZERO,
        }
    }

    fn now(&self) -> Instant {
        self.origin + self.origin.elapsed().saturating_sub(self.stalled)
    }

    /// Time spent away from consuming; it does not count.
    fn stalled(&mut self, d: Duration) {
        self.stalled += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_away_from_consuming_does_not_count() {
        let mut clock = ConsumeClock::new();
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.now() > clock.origin, "consuming time counts");
        // The whole life of the clock was spent writing: no wait has started running.
        clock.stalled(Duration::from_secs(3600));
        assert_eq!(clock.now(), clock.origin);
    }

    #[test]
    fn a_share_below_every_balanced_assignment_is_stale() {
        // Two writers of four partitions; one died and the survivor kept its half.
        assert!(assignment_is_stale(4, 1, 2));
        assert!(assignment_is_stale(4, 1, 0));
        assert!(
            assignment_is_stale(8, 3, 1),
            "3 members of 8 get 2 or 3 each"
        );
        // Balanced shares, including uneven ones, are fine.
        assert!(!assignment_is_stale(4, 2, 2));
        assert!(!assignment_is_stale(5, 2, 2));
        assert!(!assignment_is_stale(8, 3, 2));
        assert!(!assignment_is_stale(4, 1, 4));
        // More members than partitions: a member may own nothing.
        assert!(!assignment_is_stale(4, 6, 0));
        assert!(!assignment_is_stale(4, 0, 0));
    }
}
