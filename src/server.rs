//! What every serving role shares: listeners, the config file, `/metrics` and
//! `/health`, the lines printed at start, and the shutdown signal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use axum::Router;
use axum::http::header;
use axum::routing::get;
use loupe_core::config::DataPlaneConfig;
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

/// Refuses to serve data without keys beyond loopback unless `--no-auth` was given,
/// and says so loudly when it was.
pub fn check_open_access(addrs: &[SocketAddr], no_auth: bool) -> anyhow::Result<()> {
    let exposed: Vec<String> = addrs
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(ToString::to_string)
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    if !no_auth {
        bail!(
            "bound to a non-loopback address ({}) and would serve traces without a key; \
             pass --no-auth to accept that (every request then reads and writes the default project)",
            exposed.join(", ")
        );
    }
    tracing::warn!(addresses = ?exposed, "AUTHENTICATION IS OFF: anyone who can reach these addresses can read and write traces (--no-auth)");
    Ok(())
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
