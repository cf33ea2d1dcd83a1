//! What every serving role shares: listeners, the config file, `/metrics` and
//! `/health`, the lines printed at start, and the shutdown signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::http::header;
use axum::routing::get;
use loupe_core::TenantId;
use loupe_core::config::DataPlaneConfig;
use loupe_core::keys::AccessControl;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    loupe_querier::api::parse_duration(s, None)
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr} (is another Loupe running? choose another address with the flag)"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Who may use a role when the config has no keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Loopback: open to the default tenant. Any other address: keys, and the role
    /// refuses to start while the config lists none.
    Default,
    /// Open to the default tenant wherever it listens while the config lists no key
    /// (`--no-auth`).
    NoAuth,
    /// Keys only, wherever it listens; with none, every request is refused until a
    /// reload brings some (`--require-keys`, how the operator runs the roles).
    RequireKeys,
}

/// Which tenant is served without a key while the config lists none: the given one
/// on loopback or with `--no-auth`, nobody with `--require-keys` or when exposed
/// without `--no-auth` — then the config must list keys, or the role refuses to
/// start (it starts with `--require-keys`, refusing every request).
fn open_access(
    addrs: &[SocketAddr],
    mode: AuthMode,
    tenant: &TenantId,
    config: &DataPlaneConfig,
) -> anyhow::Result<Option<TenantId>> {
    let has_keys = config.tenants.iter().any(|t| !t.keys.is_empty());
    if mode == AuthMode::RequireKeys {
        if !has_keys {
            tracing::warn!(
                "the config lists no key yet: every request is refused until one is added"
            );
        }
        return Ok(None);
    }
    let exposed: Vec<String> = addrs
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(ToString::to_string)
        .collect();
    if exposed.is_empty() {
        return Ok(Some(tenant.clone()));
    }
    if mode == AuthMode::NoAuth {
        if !has_keys {
            tracing::warn!(addresses = ?exposed, "AUTHENTICATION IS OFF: anyone who can reach these addresses can read and write traces (--no-auth)");
        }
        return Ok(Some(tenant.clone()));
    }
    if !has_keys {
        bail!(
            "bound to a non-loopback address ({}) and the config lists no key, so traces would be served to anyone; \
             add keys to the config (`loupe keys new`), or pass --no-auth to accept that (every request then reads and writes {tenant})",
            exposed.join(", ")
        );
    }
    Ok(None)
}

/// How often the config file is checked for changes.
pub const CONFIG_RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Metrics of config reloads.
#[derive(Clone)]
struct ConfigMetrics {
    reloads: Counter,
    failures: Counter,
    last_ok: Gauge,
}

impl ConfigMetrics {
    fn new(registry: &mut Registry) -> ConfigMetrics {
        let m = ConfigMetrics {
            reloads: Counter::default(),
            failures: Counter::default(),
            last_ok: Gauge::default(),
        };
        m.last_ok.set(1);
        let r = registry.sub_registry_with_prefix("loupe");
        r.register(
            "config_reloads",
            "Config file changes taken into effect",
            m.reloads.clone(),
        );
        r.register(
            "config_reload_failures",
            "Config file changes rejected (the previous config stays in force)",
            m.failures.clone(),
        );
        r.register(
            "config_last_reload_successful",
            "1 when the config file in force is the one on disk, 0 when the last change was rejected",
            m.last_ok.clone(),
        );
        m
    }
}

/// Watches the config file and hands every valid change to `apply`; an invalid one
/// is logged with the field it names and the last good config stays in force.
/// Mounted ConfigMaps change by a symlink swap, so the file is read afresh each time.
fn watch_config(
    path: Option<PathBuf>,
    initial: &DataPlaneConfig,
    metrics: ConfigMetrics,
    apply: impl Fn(&DataPlaneConfig) -> anyhow::Result<()> + Send + 'static,
) {
    let Some(path) = path else { return };
    let mut in_force = initial.clone();
    let mut last_text = std::fs::read_to_string(&path).ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONFIG_RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    if last_text.take().is_some() {
                        tracing::error!(path = %path.display(), error = %e, "cannot read the config file; the previous config stays in force");
                        metrics.failures.inc();
                        metrics.last_ok.set(0);
                    }
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            last_text = Some(text.clone());
            let result = DataPlaneConfig::from_yaml(&text)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    if c == in_force {
                        return Ok(None);
                    }
                    apply(&c).map(|()| Some(c))
                });
            match result {
                Ok(Some(c)) => {
                    let keys: usize = c.tenants.iter().map(|t| t.keys.len()).sum();
                    tracing::info!(path = %path.display(), tenants = c.tenants.len(), keys, "config reloaded");
                    in_force = c;
                    metrics.reloads.inc();
                    metrics.last_ok.set(1);
                }
                Ok(None) => {
                    metrics.last_ok.set(1);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "config change rejected; the previous config stays in force");
                    metrics.failures.inc();
                    metrics.last_ok.set(0);
                }
            }
        }
    });
}

/// Watches a config file for a role without keys (the compactor): every valid change
/// goes to `apply`; registers the reload metrics.
pub fn watch_config_file(
    path: Option<PathBuf>,
    initial: &DataPlaneConfig,
    registry: &mut Registry,
    apply: impl Fn(&DataPlaneConfig) -> anyhow::Result<()> + Send + 'static,
) {
    watch_config(path, initial, ConfigMetrics::new(registry), apply);
}

/// The config file a role serves by and who may use the role.
pub struct Access {
    pub config: DataPlaneConfig,
    pub control: Arc<AccessControl>,
    open: Option<TenantId>,
    path: Option<PathBuf>,
}

impl Access {
    /// Reads the config and decides who is served without a key (see
    /// [`open_access`]) for a role listening on `addrs`.
    pub fn load(
        path: Option<&Path>,
        addrs: &[SocketAddr],
        mode: AuthMode,
        tenant: &TenantId,
    ) -> anyhow::Result<Access> {
        let config = load_config(path)?;
        let open = open_access(addrs, mode, tenant, &config)?;
        let control = Arc::new(AccessControl::new(&config, open.clone()));
        Ok(Access {
            config,
            control,
            open,
            path: path.map(Path::to_path_buf),
        })
    }

    /// Reloads the keys on every valid change of the config file, after `apply`
    /// took the rest of it; registers the reload metrics.
    pub fn watch(
        &self,
        registry: &mut Registry,
        apply: impl Fn(&DataPlaneConfig) -> anyhow::Result<()> + Send + 'static,
    ) {
        let control = self.control.clone();
        watch_config(
            self.path.clone(),
            &self.config,
            ConfigMetrics::new(registry),
            move |c| {
                apply(c)?;
                control.reload(c);
                Ok(())
            },
        );
    }

    /// One line saying who may use the role: keys, or the open tenant.
    pub fn line(&self) -> String {
        match &self.open {
            Some(t) if self.control.is_open() => {
                format!(
                    "  access     open: every request is {t} (add keys to the config to require them)"
                )
            }
            _ => format!(
                "  access     keys required ({} configured)",
                self.control.keys()
            ),
        }
    }
}

/// Reads and validates the data-plane config file; the default config without one.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<DataPlaneConfig> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            DataPlaneConfig::from_yaml(&text)
                .with_context(|| format!("invalid config {}", path.display()))
        }
        None => Ok(DataPlaneConfig::default()),
    }
}

/// `/metrics` (OpenMetrics text of the registry) and `/health`.
pub fn ops_router(registry: Registry) -> Router {
    let registry = Arc::new(Mutex::new(registry));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let r = registry.lock().expect("metrics lock");
                    prometheus_client::encoding::text::encode(&mut out, &r)
                        .expect("writing to a String cannot fail");
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        out,
                    )
                }
            }),
        )
}

/// Serves `router` on `listener` until `stop` turns true.
pub fn serve(
    listener: TcpListener,
    router: Router,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let mut stop = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    })
}

/// How long requests in flight get to finish after a stop signal.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for servers told to stop; connections still open after [`DRAIN_TIMEOUT`]
/// (a client idling on a keep-alive connection) are closed, so that a stop always
/// reaches the final flush.
pub async fn drain(
    servers: impl IntoIterator<Item = tokio::task::JoinHandle<std::io::Result<()>>>,
) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    for mut s in servers {
        if tokio::time::timeout_at(deadline, &mut s).await.is_err() {
            tracing::warn!(
                timeout = ?DRAIN_TIMEOUT,
                "connections still open after the drain timeout; closing them"
            );
            s.abort();
        }
    }
}

/// Prints a line for the person (or script) that started the server. A closed stdout
/// (`loupe standalone | head`) must not bring the server down, so errors are ignored.
pub fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The master key of `hash` redaction actions: `LOUPE_REDACTION_KEY` (at least 32
/// characters), else, with a data directory (standalone), a random key kept in
/// `<data-dir>/redaction.key` (created on first start, readable by the owner only).
/// `None` when neither: a config that asks for `hash` is then refused.
pub fn redaction_key(data_dir: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    if let Ok(key) = std::env::var("LOUPE_REDACTION_KEY") {
        let key = key.trim();
        if key.len() < 32 {
            bail!(
                "LOUPE_REDACTION_KEY must be at least 32 characters (e.g. `openssl rand -hex 32`)"
            );
        }
        return Ok(Some(key.as_bytes().to_vec()));
    }
    let Some(dir) = data_dir else {
        return Ok(None);
    };
    let path = dir.join("redaction.key");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(Some(text.trim().as_bytes().to_vec())),
        Ok(_) => bail!("{} holds fewer than 32 characters", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
    }
    Ok(Some(key.into_bytes()))
}

/// Scores written on the query API (annotations from the web UI) take the same
/// durable path as those sent to the OTLP/HTTP port.
pub struct IngestScores(pub std::sync::Arc<loupe_ingester::Ingest>);

impl loupe_querier::api::ScoreWriter for IngestScores {
    fn write<'a>(
        &'a self,
        tenant: &'a loupe_core::TenantId,
        body: &'a [u8],
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>, (axum::http::StatusCode, String)>> {
        use axum::http::StatusCode;
        use loupe_ingester::ingest::IngestError;
        Box::pin(async move {
            self.0.submit_scores(tenant, body).await.map_err(|e| {
                let status = match &e {
                    IngestError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                    IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                    IngestError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                    IngestError::PermissionDenied(_) => StatusCode::FORBIDDEN,
                    IngestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, e.to_string())
            })
        })
    }
}
