//! The distributed roles: `loupe ingester --role receive|write|all`, `loupe querier`
//! and `loupe compactor`. They share nothing in memory: receive produces to Kafka,
//! write consumes Kafka and writes blocks to storage, the querier lists and reads
//! that storage, and the compactor merges, expires and rewrites its blocks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use loupe_core::TenantId;
use loupe_core::storage::Storage;
use loupe_ingester::Ingest;
use loupe_ingester::kafka::{
    self, KafkaConfig, KafkaSink, ProducerSettings, WriteRoleSettings, WriterServices,
};
use loupe_ingester::metrics::{IngestMetrics, WriterMetrics};
use loupe_ingester::writer::{SamplingRules, WriterConfig};
use loupe_querier::index::StorageIndex;
use loupe_querier::{QueryEngine, QueryMetrics};
use prometheus_client::registry::Registry;

use crate::server::{
    Access, AuthMode, bind, ops_router, parse_duration, say, serve, shutdown_signal,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// OTLP in, Kafka out (stateless; run any number).
    Receive,
    /// Kafka in, Parquet blocks out (a consumer group; up to one per partition).
    Write,
    /// Both in one process.
    All,
}

#[derive(clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    #[arg(long = "kafka-brokers", env = "LOUPE_KAFKA_BROKERS")]
    brokers: String,
    /// Topic of normalized spans.
    #[arg(long = "kafka-topic", env = "LOUPE_KAFKA_TOPIC", default_value = kafka::DEFAULT_TOPIC)]
    topic: String,
    /// Extra librdkafka setting, `key=value` (repeatable): `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, … Values are never logged.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Partitions of the topic when Loupe has to create it (it never changes an
    /// existing topic). Writers scale up to this many.
    #[arg(
        long = "kafka-partitions",
        env = "LOUPE_KAFKA_PARTITIONS",
        default_value_t = 8
    )]
    partitions: i32,
    /// Replication factor when Loupe has to create the topic (use 3 in production).
    #[arg(
        long = "kafka-replication",
        env = "LOUPE_KAFKA_REPLICATION",
        default_value_t = 1
    )]
    replication: i32,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl KafkaArgs {
    fn config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            properties: self.properties.clone(),
        }
    }
}

#[derive(clap::Args)]
pub struct IngesterArgs {
    /// Which part of the ingest path this process runs.
    #[arg(long, value_enum, env = "LOUPE_ROLE", default_value = "all")]
    role: Role,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    access: AccessArgs,
    /// OTLP/gRPC listen address (receive).
    #[arg(long, env = "LOUPE_GRPC_ADDR", default_value = "127.0.0.1:4317")]
    grpc_addr: SocketAddr,
    /// OTLP/HTTP listen address (receive).
    #[arg(long, env = "LOUPE_HTTP_ADDR", default_value = "127.0.0.1:4318")]
    http_addr: SocketAddr,
    /// `/metrics` and `/health` listen address.
    #[arg(long, env = "LOUPE_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    metrics_addr: SocketAddr,
    /// Longest an export waits for Kafka's acknowledgment before the client is told
    /// to retry (receive).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    delivery_timeout: Duration,
    /// Memory for records waiting for Kafka, in MiB; beyond it exports are refused
    /// at once (receive).
    #[arg(long, default_value_t = 256)]
    producer_buffer_mib: usize,
    /// Compression of Kafka records: zstd, lz4, snappy, gzip or none (receive).
    #[arg(long, default_value = "zstd")]
    compression: String,
    /// Where blocks are written: a directory or `file://` URL (write).
    #[arg(long, env = "LOUPE_STORAGE")]
    storage: Option<String>,
    /// Consumer group of the writers (write).
    #[arg(
        long = "kafka-group",
        env = "LOUPE_KAFKA_GROUP",
        default_value = "loupe-writers"
    )]
    group_id: String,
    /// Longest time kept spans wait before they are written as a block (write).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    flush_interval: Duration,
    /// Kept spans of a tenant, in MiB, that trigger a block before the interval (write).
    #[arg(long, default_value_t = 64)]
    flush_mib: usize,
    /// Traces held awaiting their sampling decision per partition (write).
    #[arg(long, default_value_t = 100_000)]
    max_traces: usize,
    /// Buffered spans, in MiB, above which consumption pauses (write).
    #[arg(long, default_value_t = 1024)]
    max_buffer_mib: usize,
    /// How soon a dead writer's partitions move to the others (write).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    session_timeout: Duration,
}

pub async fn run_ingester(args: IngesterArgs) -> anyhow::Result<()> {
    let receive = matches!(args.role, Role::Receive | Role::All);
    let write = matches!(args.role, Role::Write | Role::All);
    let mut exposed = vec![args.metrics_addr];
    if receive {
        exposed.extend([args.grpc_addr, args.http_addr]);
    }
    let access = args.access.load(&exposed)?;
    let config = &access.config;
    let kafka = args.kafka.config();
    let partitions = kafka::ensure_topic(
        &kafka,
        args.kafka.partitions,
        args.kafka.replication,
        Duration::from_secs(10),
    )
    .await?;

    let mut registry = Registry::default();
    let ingest_metrics = Arc::new(IngestMetrics::new(&mut registry));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let mut lines =
        vec![format!(
        "loupe ingester ({:?}) is running\n  kafka      {} topic {} ({partitions} partitions)",
        args.role, kafka.brokers, kafka.topic
    )
    .to_lowercase()];

    let mut sink = None;
    let mut reload_ingest = None;
    let mut reload_rules = None;
    if receive {
        let settings = ProducerSettings {
            delivery_timeout: args.delivery_timeout,
            max_buffer_bytes: args.producer_buffer_mib << 20,
            compression: args.compression.clone(),
            ..ProducerSettings::default()
        };
        let producer = Arc::new(KafkaSink::new(kafka.clone(), settings)?);
        sink = Some(producer.clone());
        let ingest = Arc::new(Ingest::new(
            producer,
            config,
            access.control.clone(),
            ingest_metrics.clone(),
            crate::server::redaction_key(None)?,
        )?);
        reload_ingest = Some(ingest.clone());
        lines.push(access.line());
        let (grpc, grpc_local) = bind(args.grpc_addr, "OTLP/gRPC").await?;
        let (http, http_local) = bind(args.http_addr, "OTLP/HTTP").await?;
        servers.push(serve(
            grpc,
            loupe_ingester::grpc::router(ingest.clone()),
            &stop_rx,
        ));
        servers.push(serve(http, loupe_ingester::http::router(ingest), &stop_rx));
        lines.push(format!(
            "  otlp-grpc  {grpc_local}\n  otlp-http  http://{http_local}/v1/traces"
        ));
    }

    let stop_writer = Arc::new(AtomicBool::new(false));
    // The writer thread reports how it ended through this channel (dropped unsent
    // if it panicked).
    let mut writer_ended = None;
    if write {
        let Some(location) = &args.storage else {
            bail!("the write role needs --storage (a directory or file:// URL for blocks)");
        };
        let storage = Storage::open(location)?;
        let settings = WriteRoleSettings {
            group_id: args.group_id.clone(),
            writer: WriterConfig {
                flush_interval: args.flush_interval,
                flush_bytes: args.flush_mib << 20,
                max_traces: args.max_traces,
                ..WriterConfig::default()
            },
            max_buffer_bytes: args.max_buffer_mib << 20,
            session_timeout: args.session_timeout,
        };
        let rules = Arc::new(RwLock::new(Arc::new(SamplingRules::from_config(config))));
        reload_rules = Some(rules.clone());
        let writer_metrics = Arc::new(WriterMetrics::new(&mut registry));
        let runtime = tokio::runtime::Handle::current();
        let stop = stop_writer.clone();
        let kafka = kafka.clone();
        let ingest_metrics = ingest_metrics.clone();
        lines.push(format!("  storage    {}", storage.url()));
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("loupe-writer".into())
            .spawn(move || {
                let services = WriterServices {
                    storage,
                    rules,
                    metrics: writer_metrics,
                    ingest_metrics,
                    runtime,
                };
                let _ = ended_tx.send(kafka::run_writer(&kafka, &settings, services, stop));
            })
            .context("cannot start the writer thread")?;
        writer_ended = Some(ended_rx);
    }

    access.watch(&mut registry, move |c| {
        if let Some(ingest) = &reload_ingest {
            ingest.reload(c)?;
        }
        if let Some(rules) = &reload_rules {
            *rules.write().expect("rules lock") = Arc::new(SamplingRules::from_config(c));
        }
        Ok(())
    });
    let (ops, ops_local) = bind(args.metrics_addr, "metrics").await?;
    servers.push(serve(ops, ops_router(registry), &stop_rx));
    lines.push(format!("  metrics    http://{ops_local}/metrics"));
    say(&lines.join("\n"));

    let ended_early = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            None
        }
        ended = async {
            match writer_ended.as_mut() {
                Some(rx) => rx.await,
                None => std::future::pending().await,
            }
        } => {
            tracing::error!("the writer stopped on its own");
            Some(ended)
        }
    };
    let _ = stop_tx.send(true);
    crate::server::drain(servers).await;
    if let Some(sink) = sink {
        sink.flush(args.delivery_timeout);
    }
    stop_writer.store(true, Ordering::Relaxed);
    let ended = match (ended_early, writer_ended) {
        (Some(ended), _) => Some(ended),
        (None, Some(rx)) => Some(rx.await),
        (None, None) => None,
    };
    match ended {
        Some(Ok(result)) => result?,
        Some(Err(_)) => bail!("the writer thread panicked"),
        None => {}
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct QuerierArgs {
    /// Where the writers put blocks: a directory or `file://` URL.
    #[arg(long, env = "LOUPE_STORAGE")]
    storage: String,
    /// Query API listen address (also serves /metrics and /health).
    #[arg(long, env = "LOUPE_QUERY_ADDR", default_value = "127.0.0.1:3000")]
    query_addr: SocketAddr,
    /// How often storage is listed for new blocks and deletion requests.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    refresh: Duration,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    kafka: ScoreKafkaArgs,
}

/// Kafka of the platform, for the querier: scores written on the query API (people
/// annotating traces in the web UI, with a query key) go there as the receivers send
/// them. Without it, `POST /api/v1/scores` on the querier answers 405.
#[derive(clap::Args)]
pub struct ScoreKafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port…]`, for scores written on the
    /// query API.
    #[arg(long = "kafka-brokers", env = "LOUPE_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Topic of normalized spans (and scores).
    #[arg(long = "kafka-topic", env = "LOUPE_KAFKA_TOPIC", default_value = kafka::DEFAULT_TOPIC)]
    topic: String,
    /// Extra librdkafka setting, `key=value` (repeatable). Values are never logged.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

impl ScoreKafkaArgs {
    fn config(&self) -> Option<KafkaConfig> {
        Some(KafkaConfig {
            brokers: self.brokers.clone()?,
            topic: self.topic.clone(),
            properties: self.properties.clone(),
        })
    }
}

/// The config file and keyless access, as the distributed roles take them.
#[derive(clap::Args)]
pub struct AccessArgs {
    /// Data-plane config file (YAML): tenants, keys, limits, pricing, sampling.
    /// Reloaded when it changes.
    #[arg(long, env = "LOUPE_CONFIG")]
    config: Option<PathBuf>,
    /// Tenant served while the config lists no key.
    #[arg(long, env = "LOUPE_TENANT", default_value = "default/default")]
    tenant: TenantId,
    /// Serve without keys on a non-loopback address while the config lists none.
    #[arg(long, conflicts_with = "require_keys")]
    no_auth: bool,
    /// Admit only keys from the config, on any address, even while it lists none
    /// (every request is refused until keys arrive by a reload). The operator runs
    /// the roles this way.
    #[arg(long, env = "LOUPE_REQUIRE_KEYS")]
    require_keys: bool,
}

impl AccessArgs {
    fn load(&self, addrs: &[SocketAddr]) -> anyhow::Result<Access> {
        let mode = if self.require_keys {
            AuthMode::RequireKeys
        } else if self.no_auth {
            AuthMode::NoAuth
        } else {
            AuthMode::Default
        };
        Access::load(self.config.as_deref(), addrs, mode, &self.tenant)
    }
}

pub async fn run_querier(args: QuerierArgs) -> anyhow::Result<()> {
    let access = args.access.load(&[args.query_addr])?;
    let storage = Storage::open(&args.storage)?;
    let index = StorageIndex::new(storage.clone());
    let blocks = index
        .refresh()
        .await
        .with_context(|| format!("cannot list blocks in {}", storage.url()))?;
    tokio::spawn(index.clone().refresh_loop(args.refresh));
    let mut registry = Registry::default();
    let metrics = QueryMetrics::new(&mut registry);
    // Scores from the UI: produced to Kafka like the receivers' (no spans go this way).
    let scores = match args.kafka.config() {
        Some(kafka) => {
            let producer = Arc::new(KafkaSink::new(kafka, ProducerSettings::default())?);
            let ingest = Arc::new(Ingest::new(
                producer,
                &access.config,
                access.control.clone(),
                Arc::new(IngestMetrics::new(&mut registry)),
                None,
            )?);
            Some(ingest)
        }
        None => None,
    };
    let reload = scores.clone();
    access.watch(&mut registry, move |c| {
        if let Some(ingest) = &reload {
            ingest.reload(c)?;
        }
        Ok(())
    });
    let deletions = loupe_core::deletion::Deletions::default();
    deletions
        .refresh(&storage)
        .await
        .with_context(|| format!("cannot read deletion records in {}", storage.url()))?;
    tokio::spawn(
        deletions
            .clone()
            .refresh_loop(storage.clone(), args.refresh),
    );
    let engine = Arc::new(
        QueryEngine::new(Arc::new(index), &storage).with_deletions(deletions, storage.clone()),
    );
    let kafka_line = args
        .kafka
        .config()
        .map(|k| format!("\n  scores     to kafka {} topic {}", k.brokers, k.topic))
        .unwrap_or_default();
    let router = loupe_querier::api::router_with(
        engine,
        access.control.clone(),
        metrics,
        loupe_querier::api::Extras {
            alerts: None,
            scores: scores.map(|i| {
                Arc::new(crate::server::IngestScores(i)) as Arc<dyn loupe_querier::api::ScoreWriter>
            }),
        },
    )
    .merge(ops_router(registry));
    let (listener, local) = bind(args.query_addr, "the query API").await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = serve(listener, router, &stop_rx);
    say(&format!(
        "loupe querier is running\n  query-api  http://{local}/api/v1/traces\n  storage    {} ({blocks} blocks){kafka_line}\n{}",
        storage.url(),
        access.line()
    ));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

#[derive(clap::Args)]
pub struct DevKafkaArgs {
    /// Topic to create.
    #[arg(long, default_value = kafka::DEFAULT_TOPIC)]
    topic: String,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
}

/// Runs librdkafka's in-memory mock cluster (one broker) until Ctrl-C: a Kafka to try
/// the distributed roles on one machine. Data lives in memory only.
pub async fn run_dev_kafka(args: DevKafkaArgs) -> anyhow::Result<()> {
    let cluster = rdkafka::mocking::MockCluster::new(1).context("cannot start the mock cluster")?;
    cluster
        .create_topic(&args.topic, args.partitions, 1)
        .context("cannot create the topic")?;
    say(&format!(
        "mock Kafka (librdkafka's mock cluster, in memory) is running\n  brokers    {}\n  topic      {} ({} partitions)\n  retention  the last 5 MB of each partition: a writer lagging further loses records (loupe_writer_records_lost_total)",
        cluster.bootstrap_servers(),
        args.topic,
        args.partitions
    ));
    shutdown_signal().await;
    drop(cluster);
    Ok(())
}

#[derive(clap::Args)]
pub struct CompactorArgs {
    /// Where the writers put blocks: a directory or `file://` URL.
    #[arg(long, env = "LOUPE_STORAGE")]
    storage: String,
    /// Data-plane config file (YAML); the compactor takes each project's `retention`
    /// from it. Reloaded when it changes.
    #[arg(long, env = "LOUPE_CONFIG")]
    config: Option<PathBuf>,
    /// `/metrics` and `/health` listen address.
    #[arg(long, env = "LOUPE_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    metrics_addr: SocketAddr,
    /// Time between compaction passes.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    interval: Duration,
    /// Size merged blocks grow to, in MiB of Parquet (memory use is a few times this).
    #[arg(long, default_value_t = 64)]
    target_mib: u64,
    /// Blocks whose spans start in the same window are merged together.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    window: Duration,
    /// How long replaced blocks stay readable before they are deleted: more than the
    /// queriers' --refresh plus their longest query.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    grace: Duration,
    /// Blocks younger than this are not merged yet.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    min_age: Duration,
    /// Run one pass, print what it did and exit.
    #[arg(long)]
    once: bool,
}

pub async fn run_compactor(args: CompactorArgs) -> anyhow::Result<()> {
    use loupe_ingester::compactor::{Compactor, CompactorConfig, CompactorMetrics};
    let config = crate::server::load_config(args.config.as_deref())?;
    let storage = Storage::open(&args.storage)?;
    let mut registry = Registry::default();
    let metrics = Arc::new(CompactorMetrics::new(&mut registry));
    if args.target_mib == 0 {
        bail!("--target-mib must be at least 1");
    }
    let compactor = Arc::new(Compactor::new(
        storage.clone(),
        CompactorConfig {
            target_bytes: args.target_mib << 20,
            window: args.window,
            grace: args.grace,
            min_age: args.min_age,
        },
        &config,
        metrics,
    ));
    if args.once {
        let report = compactor
            .run_once()
            .await
            .with_context(|| format!("compacting {}", storage.url()))?;
        say(&format!(
            "compaction pass done: merged {} blocks, wrote {}, removed {} duplicate spans; \
             deleted {} replaced, {} expired and {} orphaned files; rewrote {} blocks for {} completed deletion requests",
            report.blocks_merged,
            report.blocks_written,
            report.duplicate_spans,
            report.replaced_deleted,
            report.expired_deleted,
            report.orphans_deleted,
            report.rewritten_for_deletion,
            report.deletions_completed,
        ));
        return Ok(());
    }
    {
        let compactor = compactor.clone();
        crate::server::watch_config_file(args.config.clone(), &config, &mut registry, move |c| {
            compactor.set_config(c);
            Ok(())
        });
    }
    let (ops, ops_local) = bind(args.metrics_addr, "metrics").await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = serve(ops, ops_router(registry), &stop_rx);
    let task = tokio::spawn(compactor.run(args.interval, stop_rx.clone()));
    say(&format!(
        "loupe compactor is running\n  storage    {}\n  every      {:?}\n  metrics    http://{ops_local}/metrics",
        storage.url(),
        args.interval
    ));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = task.await;
    let _ = server.await;
    Ok(())
}
