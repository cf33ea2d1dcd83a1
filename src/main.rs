//! `loupe`: one binary, one subcommand per role (the Tempo/Loki model).

mod agent;
mod alerts_cmd;
mod client;
mod demo;
mod generate;
mod loadgen;
mod purge;
mod roles;
mod server;
mod standalone;
mod traces_cmd;

use clap::{Parser, Subcommand};

// The write path allocates and frees many small buffers per span (protobuf decode,
// Arrow builders, Parquet pages); glibc's allocator spent a third of the writer's
// time in malloc/free under load (docs/benchmarks.md). DataFusion's CLI makes the
// same choice.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loupe",
    version,
    about = "Loupe: a Kubernetes-native trace platform for LLM applications",
    long_about = "Loupe records every step of every LLM request (retrieval, embedding, LLM calls, \
tools, agent iterations) as OpenTelemetry traces with model, tokens, cost and prompts, \
and lets you find and compare them.\n\nStart with `loupe standalone --demo`."
)]
struct Cli {
    /// Log format: `text` for terminals, `json` for clusters.
    #[arg(long, global = true, env = "LOUPE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole data plane in one process: OTLP receivers, an embedded durable
    /// queue, Parquet storage in a local directory, and the query API.
    Standalone(Box<standalone::Args>),
    /// Run the ingest path of the distributed data plane: `--role receive` (OTLP to
    /// Kafka), `--role write` (Kafka to Parquet blocks, with tail sampling) or both.
    Ingester(Box<roles::IngesterArgs>),
    /// Serve the query API over the blocks the writers put in storage.
    Querier(roles::QuerierArgs),
    /// Merge small blocks, remove duplicate spans, enforce each project's retention
    /// and carry out deletion requests, in the storage the writers fill.
    Compactor(Box<roles::CompactorArgs>),
    /// Run an in-memory Kafka (librdkafka's mock cluster) for trying the distributed
    /// roles on one machine; not for production.
    DevKafka(roles::DevKafkaArgs),
    /// Send realistic demo LLM traces to a running Loupe over OTLP.
    Demo(demo_cmd::Args),
    /// Read traces from a running Loupe.
    Traces(Box<traces_cmd::Args>),
    /// Generate OTLP load against a Loupe endpoint and report spans/s, MB/s and latency.
    Loadgen(loadgen::Args),
    /// Write N realistic spans straight into a project's storage (for benchmarks).
    Generate(generate::Args),
    /// Delete everything stored for one project (a dry run without --yes).
    Purge(purge::Args),
    /// The sidecar next to an application: OTLP on loopback, Kubernetes resource
    /// attributes, head sampling, batching and retries to the ingester.
    Agent(Box<agent::Args>),
    /// Alert rules: `loupe alerts check --rules FILE` evaluates them once.
    #[command(subcommand)]
    Alerts(alerts_cmd::Alerts),
    /// Pass or fail a deployment on recent scores, latency, errors and cost (exit 1
    /// when a check fails), e.g. `loupe gate --score faithfulness --min 0.8 --since 1h`.
    Gate(Box<alerts_cmd::GateArgs>),
    /// Create API keys.
    #[command(subcommand)]
    Keys(keys_cmd::Keys),
    /// Run the Kubernetes operator: reconciles TracePlatform, TraceProject,
    /// SamplingPolicy and AlertRule resources.
    Operator(operator_cmd::Args),
    /// Print the CustomResourceDefinitions (`loupe crds | kubectl apply -f -`).
    Crds,
}

mod operator_cmd {
    use std::net::SocketAddr;

    #[derive(clap::Args)]
    pub struct Args {
        /// `/metrics`, `/healthz` and `/readyz` listen address.
        #[arg(long, env = "LOUPE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Reconcile without taking the leader Lease (only when one replica runs).
        #[arg(long)]
        no_leader_election: bool,
        /// Namespace of the leader Lease: the operator's own.
        #[arg(long, env = "POD_NAMESPACE", default_value = "loupe-system")]
        lease_namespace: String,
        /// Name of the leader Lease.
        #[arg(long, default_value = "loupe-operator")]
        lease_name: String,
        /// This replica's identity in the Lease.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Query API that AlertRules are evaluated against, instead of each
        /// platform's querier Service (for an operator running outside the cluster).
        #[arg(long, env = "LOUPE_OPERATOR_QUERY_URL")]
        query_url: Option<String>,
        /// Time between evaluations of each AlertRule.
        #[arg(long, default_value = "1m", value_parser = crate::server::parse_duration)]
        alert_interval: std::time::Duration,
        /// Serve the sidecar-injection webhook (HTTPS) on this address.
        #[arg(long, env = "LOUPE_WEBHOOK_ADDR")]
        webhook_addr: Option<SocketAddr>,
        /// Directory with `tls.crt` and `tls.key` for the webhook (cert-manager's
        /// Secret, mounted); without it the operator issues and renews them itself.
        #[arg(long, env = "LOUPE_WEBHOOK_CERT_DIR")]
        webhook_cert_dir: Option<std::path::PathBuf>,
        /// The Service the API server calls the webhook through (certificate names).
        #[arg(long, default_value = "loupe")]
        webhook_service: String,
        /// The Secret, in the operator's namespace, holding the self-managed CA and
        /// certificate.
        #[arg(long, default_value = "loupe-webhook-tls")]
        webhook_secret: String,
        /// The MutatingWebhookConfiguration whose caBundle the operator keeps.
        #[arg(long, default_value = "loupe")]
        webhook_configuration: String,
        /// The URL the API server calls the webhook at when that is not the Service
        /// (an operator running outside the cluster, whose configuration names this
        /// URL in `clientConfig.url`): the self-managed certificate is valid for its
        /// host too.
        #[arg(long, env = "LOUPE_WEBHOOK_URL")]
        webhook_url: Option<url::Url>,
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let webhook_hosts = match &args.webhook_url {
            Some(url) => match url.host() {
                Some(url::Host::Domain(d)) => vec![d.to_owned()],
                Some(url::Host::Ipv4(ip)) => vec![ip.to_string()],
                Some(url::Host::Ipv6(ip)) => vec![ip.to_string()],
                None => anyhow::bail!("--webhook-url {url} has no host"),
            },
            None => Vec::new(),
        };
        let identity = args
            .identity
            .unwrap_or_else(|| format!("loupe-operator-{}", std::process::id()));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = loupe_operator::metrics::Metrics::new(&mut registry);
        let (listener, addr) = crate::server::bind(args.metrics_addr, "operator metrics").await?;
        let health = || async { "ok\n" };
        let router = crate::server::ops_router(registry)
            .route("/healthz", axum::routing::get(health))
            .route("/readyz", axum::routing::get(health));
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let _ops = crate::server::serve(listener, router, &stop_rx);
        tracing::info!(%addr, "operator metrics and health");
        loupe_operator::run::run(
            loupe_operator::run::Settings {
                leader_election: !args.no_leader_election,
                lease_namespace: args.lease_namespace.clone(),
                lease_name: args.lease_name,
                identity,
                query_url: args.query_url,
                alert_interval: args.alert_interval,
                webhook: args
                    .webhook_addr
                    .map(|addr| loupe_operator::run::WebhookSettings {
                        addr,
                        certificate: match args.webhook_cert_dir {
                            Some(dir) => loupe_operator::webhook_tls::CertSource::Files(dir),
                            None => loupe_operator::webhook_tls::CertSource::SelfManaged(
                                loupe_operator::webhook_tls::SelfManaged {
                                    namespace: args.lease_namespace.clone(),
                                    service: args.webhook_service,
                                    hosts: webhook_hosts,
                                    secret: args.webhook_secret,
                                    configuration: args.webhook_configuration,
                                },
                            ),
                        },
                    }),
            },
            metrics,
        )
        .await?;
        Ok(())
    }
}

mod keys_cmd {
    use loupe_core::TenantId;
    use loupe_core::keys::{KeyHash, Scope, generate};

    #[derive(clap::Subcommand)]
    pub enum Keys {
        /// Generate a key; prints it once, with the line that adds its hash to the
        /// project's `keys:` in the config.
        New(NewArgs),
    }

    #[derive(Clone, Copy, clap::ValueEnum)]
    pub enum ScopeArg {
        /// Send spans and scores.
        Ingest,
        /// Read traces, metrics and scores.
        Query,
    }

    #[derive(clap::Args)]
    pub struct NewArgs {
        /// The project the key belongs to (`<namespace>/<project>`).
        #[arg(long)]
        tenant: TenantId,
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// Who holds the key; shown in logs instead of the key.
        #[arg(long, default_value = "default")]
        name: String,
    }

    pub fn run(keys: Keys) -> anyhow::Result<()> {
        let Keys::New(args) = keys;
        anyhow::ensure!(
            !args.name.is_empty() && args.name.len() <= 63,
            "--name must be 1 to 63 characters"
        );
        let scope = match args.scope {
            ScopeArg::Ingest => Scope::Ingest,
            ScopeArg::Query => Scope::Query,
        };
        let key = generate(scope);
        let hash = KeyHash::of(&key);
        println!("key:  {key}");
        println!("hash: {hash}");
        println!();
        println!("The key is shown only now: keep it in a secret. Add this under the keys of");
        println!(
            "tenant {} in the config (the running roles pick it up):",
            args.tenant
        );
        println!();
        println!(
            "      - {{ name: {:?}, scope: {}, hash: \"{hash}\" }}",
            args.name,
            scope.as_str()
        );
        Ok(())
    }
}

mod demo_cmd {
    use std::time::{Duration, SystemTime};

    use crate::client::{Exporter, Protocol};
    use crate::demo::{DemoOptions, generate};

    #[derive(clap::Args)]
    pub struct Args {
        /// OTLP endpoint: gRPC `http://host:4317`, or HTTP `http://host:4318`.
        #[arg(long, default_value = "http://127.0.0.1:4317")]
        pub endpoint: String,
        #[arg(long, value_enum, default_value = "grpc")]
        pub protocol: Protocol,
        /// Number of traces to send.
        #[arg(long, default_value_t = 200)]
        pub traces: usize,
        /// Spread trace start times over this many past hours.
        #[arg(long, default_value_t = 2.0)]
        pub hours: f64,
        /// Random seed; the same seed sends the same traces.
        #[arg(long, default_value_t = 42)]
        pub seed: u64,
        /// The project's ingest key; not needed while the server lists no keys.
        #[arg(long, env = "LOUPE_INGEST_KEY", hide_env_values = true)]
        pub key: Option<String>,
    }

    /// Sends demo traces; returns how many traces and spans were accepted.
    pub async fn send(args: &Args) -> anyhow::Result<(usize, usize)> {
        let opts = DemoOptions {
            traces: args.traces,
            seed: args.seed,
            spread: Duration::from_secs_f64(args.hours.max(0.0) * 3600.0),
            now: SystemTime::now(),
        };
        let (requests, traces) = generate(&opts, 512);
        let mut exporter =
            Exporter::connect(&args.endpoint, args.protocol, args.key.clone()).await?;
        let mut spans = 0;
        for req in requests {
            let n: usize = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            exporter.export(req).await?;
            spans += n;
        }
        Ok((traces.len(), spans))
    }

    pub async fn run(args: Args) -> anyhow::Result<()> {
        let (traces, spans) = send(&args).await?;
        println!(
            "sent {traces} demo traces ({spans} spans) to {}",
            args.endpoint
        );
        Ok(())
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LOUPE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,datafusion=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    // One TLS crypto provider (ring, as kube's) for every HTTPS client of the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Standalone(args) => standalone::run(*args).await,
            Command::Ingester(args) => roles::run_ingester(*args).await,
            Command::Querier(args) => roles::run_querier(args).await,
            Command::Compactor(args) => roles::run_compactor(*args).await,
            Command::DevKafka(args) => roles::run_dev_kafka(args).await,
            Command::Demo(args) => demo_cmd::run(args).await,
            Command::Traces(args) => traces_cmd::run(*args).await,
            Command::Loadgen(args) => loadgen::run(args).await,
            Command::Generate(args) => generate::run(args).await,
            Command::Purge(args) => purge::run(args).await,
            Command::Agent(args) => agent::run(*args).await,
            Command::Alerts(cmd) => alerts_cmd::run_alerts(cmd).await,
            Command::Gate(args) => alerts_cmd::run_gate(*args).await,
            Command::Keys(keys) => keys_cmd::run(keys),
            Command::Operator(args) => operator_cmd::run(args).await,
            Command::Crds => {
                print!("{}", loupe_operator::crdgen::all_yaml());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
