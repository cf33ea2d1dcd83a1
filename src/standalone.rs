//! `loupe standalone`: every data-plane role in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loupe_core::TenantId;
use loupe_core::storage::Storage;
use loupe_ingester::metrics::{IngestMetrics, WriterMetrics};
use loupe_ingester::writer::SamplingRules;
use loupe_ingester::{EmbeddedQueue, Ingest, QueueConfig};
use loupe_querier::{QueryEngine, QueryMetrics};
use prometheus_client::registry::Registry;

use crate::server::{Access, AuthMode, bind, parse_duration, say, serve, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the write-ahead log and, unless --storage says otherwise, blocks.
    #[arg(long, env = "LOUPE_DATA_DIR", default_value = "./loupe-data")]
    pub data_dir: PathBuf,
    /// Where Parquet blocks go: a directory or a `file://` URL (default: <data-dir>/blocks).
    #[arg(long, env = "LOUPE_STORAGE")]
    pub storage: Option<String>,
    /// OTLP/gRPC listen address.
    #[arg(long, env = "LOUPE_GRPC_ADDR", default_value = "127.0.0.1:4317")]
    pub grpc_addr: SocketAddr,
    /// OTLP/HTTP listen address.
    #[arg(long, env = "LOUPE_HTTP_ADDR", default_value = "127.0.0.1:4318")]
    pub http_addr: SocketAddr,
    /// Query API listen address (also serves /metrics and /health).
    #[arg(long, env = "LOUPE_QUERY_ADDR", default_value = "127.0.0.1:3000")]
    pub query_addr: SocketAddr,
    /// Data-plane config file (YAML): tenants, keys, limits, pricing, sampling.
    /// Reloaded when it changes.
    #[arg(long, env = "LOUPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Longest time accepted spans wait in memory before they are written as a block.
    #[arg(long, env = "LOUPE_FLUSH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// Memory of not-yet-flushed spans that triggers an early flush, in MiB.
    #[arg(long, env = "LOUPE_FLUSH_MIB", default_value_t = 256)]
    pub flush_mib: usize,
    /// Traces held in memory awaiting their tail-sampling decision (tenants with a
    /// sampling policy); beyond it the least recently updated trace is decided early.
    #[arg(long, env = "LOUPE_MAX_TRACES", default_value_t = 100_000)]
    pub max_traces: usize,
    /// Serve on a non-loopback address without keys while the config lists none
    /// (every request goes to the default project). Without it, standalone refuses to
    /// listen beyond loopback unless the config lists keys.
    #[arg(long)]
    pub no_auth: bool,
    /// After start, send realistic demo LLM traces through real OTLP export.
    #[arg(long)]
    pub demo: bool,
    /// Number of demo traces to send with --demo.
    #[arg(long, default_value_t = 200)]
    pub demo_traces: usize,
    /// Time between passes of the in-process compactor (merges small blocks,
    /// enforces retention, carries out deletion requests).
    #[arg(long, env = "LOUPE_COMPACT_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub compact_interval: Duration,
    /// Alert rules to evaluate (YAML, as for `loupe alerts check`, with `notify:`
    /// targets); rules without `project` watch the default project.
    #[arg(long, env = "LOUPE_ALERT_RULES")]
    pub alert_rules: Option<PathBuf>,
    /// Time between evaluations of the alert rules.
    #[arg(long, env = "LOUPE_ALERT_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub alert_interval: Duration,
    /// The URL people reach the query API at, for the links in notifications
    /// (default: the query address).
    #[arg(long, env = "LOUPE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// How long blocks the compactor replaced stay readable before deletion.
    #[arg(long, default_value = "30s", value_parser = parse_duration, hide = true)]
    pub compaction_grace: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let access = Access::load(
        args.config.as_deref(),
        &[args.grpc_addr, args.http_addr, args.query_addr],
        if args.no_auth {
            AuthMode::NoAuth
        } else {
            AuthMode::Default
        },
        &TenantId::default_tenant(),
    )?;
    let config = &access.config;

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let storage_location = args
        .storage
        .clone()
        .unwrap_or_else(|| args.data_dir.join("blocks").display().to_string());
    let storage = Storage::open(&storage_location)?;

    let mut registry = Registry::default();
    let ingest_metrics = Arc::new(IngestMetrics::new(&mut registry));
    let query_metrics = QueryMetrics::new(&mut registry);

    let mut queue_config = QueueConfig::new(args.data_dir.join("wal"));
    queue_config.writer.flush_interval = args.flush_interval;
    queue_config.writer.flush_bytes = args.flush_mib << 20;
    queue_config.writer.max_traces = args.max_traces;
    queue_config.max_head_bytes = (args.flush_mib << 20).saturating_mul(4);
    let queue = EmbeddedQueue::open(
        queue_config,
        storage.clone(),
        Arc::new(SamplingRules::from_config(config)),
        ingest_metrics.clone(),
        Arc::new(WriterMetrics::new(&mut registry)),
    )
    .await
    .context("cannot open the embedded queue")?;

    let ingest = Arc::new(Ingest::new(
        Arc::new(queue.clone()),
        config,
        access.control.clone(),
        ingest_metrics,
        crate::server::redaction_key(Some(&args.data_dir))?,
    )?);
    let deletions = loupe_core::deletion::Deletions::default();
    deletions
        .refresh(&storage)
        .await
        .context("cannot read deletion records")?;
    let engine = Arc::new(
        QueryEngine::new(Arc::new(queue.clone()), &storage)
            .with_deletions(deletions, storage.clone()),
    );
    // One process, so replaced blocks need only outlive the queries already running.
    let compactor = Arc::new(
        loupe_ingester::compactor::Compactor::new(
            storage.clone(),
            loupe_ingester::compactor::CompactorConfig {
                grace: args.compaction_grace,
                min_age: Duration::from_secs(120),
                ..Default::default()
            },
            config,
            Arc::new(loupe_ingester::compactor::CompactorMetrics::new(
                &mut registry,
            )),
        )
        .with_observer({
            let queue = queue.clone();
            move |change| queue.apply(change)
        }),
    );

    access.watch(&mut registry, {
        let (ingest, queue, compactor) = (ingest.clone(), queue.clone(), compactor.clone());
        move |c| {
            ingest.reload(c)?;
            queue.set_rules(Arc::new(SamplingRules::from_config(c)));
            compactor.set_config(c);
            Ok(())
        }
    });
    // Alert rules are read (and refused when wrong) before anything listens.
    let alert_rules = match &args.alert_rules {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the alert rules {}", path.display()))?;
            let rules = loupe_querier::alert_runner::load_rules(&text, &TenantId::default_tenant())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(rules)
        }
        None => None,
    };

    let (grpc_listener, grpc_local) = bind(args.grpc_addr, "OTLP/gRPC").await?;
    let (http_listener, http_local) = bind(args.http_addr, "OTLP/HTTP").await?;
    let (query_listener, query_local) = bind(args.query_addr, "the query API").await?;

    let (alert_states, alert_runner) = match alert_rules {
        Some(rules) => {
            let count = rules.len();
            let base = args
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{query_local}"));
            let runner = loupe_querier::alert_runner::AlertRunner::new(
                rules,
                loupe_querier::notify::Notifier::new(args.alert_interval),
                &base,
            );
            tracing::info!(rules = count, interval = ?args.alert_interval, "evaluating alert rules");
            (Some(runner.states()), Some(runner))
        }
        None => (None, None),
    };
    let query_router = loupe_querier::api::router_with(
        engine.clone(),
        access.control.clone(),
        query_metrics,
        loupe_querier::api::Extras {
            alerts: alert_states,
            scores: Some(Arc::new(crate::server::IngestScores(ingest.clone()))),
        },
    )
    .merge(crate::server::ops_router(registry));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let compaction = tokio::spawn(compactor.run(args.compact_interval, stop_rx.clone()));
    if let Some(runner) = alert_runner {
        let engine = engine.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(runner.run(
            move |tenant: &TenantId| loupe_querier::alerts::EngineData {
                engine: engine.clone(),
                tenant: tenant.clone(),
            },
            args.alert_interval,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }
    let servers = [
        serve(
            grpc_listener,
            loupe_ingester::grpc::router(ingest.clone()),
            &stop_rx,
        ),
        serve(
            http_listener,
            loupe_ingester::http::router(ingest.clone()),
            &stop_rx,
        ),
        serve(query_listener, query_router, &stop_rx),
    ];

    // Tests and scripts read these lines to find the ports.
    say(&format!(
        "loupe standalone is running\n  otlp-grpc  {grpc_local}\n  otlp-http  http://{http_local}/v1/traces\n  \
         query-api  http://{query_local}/api/v1/traces\n  ui         http://{query_local}/\n  data       {}\n  storage    {}\n{}",
        args.data_dir.display(),
        storage.url(),
        access.line()
    ));

    if args.demo {
        let demo = crate::demo_cmd::Args {
            endpoint: format!("http://{grpc_local}"),
            protocol: crate::client::Protocol::Grpc,
            traces: args.demo_traces,
            hours: 2.0,
            seed: rand::random(),
            key: None,
        };
        let query = query_local;
        tokio::spawn(async move {
            match crate::demo_cmd::send(&demo).await {
                Ok((traces, spans)) => say(&format!(
                    "demo: sent {traces} traces ({spans} spans); try `cargo run --release -- traces search --url http://{query} --since 3h`"
                )),
                Err(e) => eprintln!("demo: sending traces failed: {e:#}"),
            }
        });
    }

    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests and flushing blocks");
    let _ = stop_tx.send(true);
    crate::server::drain(servers).await;
    let _ = compaction.await;
    queue.shutdown().await.context("final flush failed; spans remain in the write-ahead log and are replayed on the next start")?;
    Ok(())
}
