//! `loupe loadgen`: OTLP load against a Loupe endpoint, reporting spans/s, MB/s and
//! export latency percentiles, with a progress line every second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use loupe::synthetic;
use loupe_querier::engine::hex;
use prost::Message;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::client::{Exporter, Protocol};

#[derive(clap::Args)]
pub struct Args {
    /// OTLP endpoint (gRPC `http://127.0.0.1:4317`, HTTP `http://127.0.0.1:4318`).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    /// The project's ingest key; not needed while the server lists no keys.
    #[arg(long, env = "LOUPE_INGEST_KEY", hide_env_values = true)]
    key: Option<String>,
    /// The project's query key, for --query-url.
    #[arg(long, env = "LOUPE_QUERY_KEY", hide_env_values = true)]
    query_key: Option<String>,
    /// Concurrent exporters.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Spans per export request.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Spans per trace.
    #[arg(long, default_value_t = 10)]
    spans_per_trace: usize,
    /// Approximate bytes of attributes per span (prompt text and metadata).
    #[arg(long, default_value_t = 1024)]
    attr_bytes: usize,
    /// How long to run (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many spans (whichever comes first with --duration).
    #[arg(long)]
    total_spans: Option<u64>,
    /// After ingesting, measure trace-by-id latency against this query API
    /// (e.g. `http://127.0.0.1:3000`) on traces the run sent.
    #[arg(long)]
    query_url: Option<String>,
    /// Number of trace-by-id requests for the query measurement.
    #[arg(long, default_value_t = 1000)]
    query_samples: usize,
    /// Send nothing; measure trace-by-id on traces found by searches spread over
    /// --ids-since (needs --query-url), then every --query-path.
    #[arg(long, requires = "query_url")]
    skip_ingest: bool,
    /// With --skip-ingest: how far back the traces for trace-by-id are picked
    /// (20 searches over equal slices of it), e.g. `1h`, `7d`.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    ids_since: Duration,
    /// With --skip-ingest: a query API path to time as well, e.g.
    /// `/api/v1/traces?since=7d&model=gpt-4o&status=error` (repeatable).
    #[arg(long, requires = "skip_ingest")]
    query_path: Vec<String>,
    /// Requests per --query-path.
    #[arg(long, default_value_t = 50)]
    path_samples: usize,
    /// While sending, measure freshness: every 500 ms take the latest acknowledged
    /// trace and poll the query API (--query-url) until it is served; reports the
    /// time from acknowledgment to queryable.
    #[arg(long, requires = "query_url")]
    freshness: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    loupe_querier::api::parse_duration(s, None)
}

#[derive(Default)]
struct Totals {
    spans: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// A sample of acknowledged trace ids (hex), for the query measurement.
    sent: std::sync::Mutex<Vec<String>>,
    /// The latest acknowledged trace and when it was acknowledged.
    latest: std::sync::Mutex<Option<(String, Instant)>>,
}

/// The query key given on the command line, sent with every query.
static QUERY_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An HTTP client for the query API, carrying the query key if one was given.
fn query_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = QUERY_KEY.get()
        && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
    {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap_or_default()
}

/// Polls for one trace until the query API serves it; returns the time since `acked`.
async fn await_queryable(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    acked: Instant,
) -> Option<Duration> {
    let base = url.trim_end_matches('/');
    while acked.elapsed() < Duration::from_secs(300) {
        if let Ok(r) = client
            .get(format!("{base}/api/v1/traces/{id}"))
            .send()
            .await
            && r.status().is_success()
        {
            return Some(acked.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Every 500 ms, probes how long the latest acknowledged trace takes to be served.
fn spawn_freshness_probes(
    url: String,
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Histogram<u64>, u64)> {
    tokio::spawn(async move {
        let client = query_client();
        let mut probes = Vec::new();
        let mut last_id = String::new();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let latest = totals.latest.lock().expect("lock").clone();
            let Some((id, acked)) = latest else { continue };
            if id == last_id {
                continue;
            }
            last_id = id.clone();
            let (client, url) = (client.clone(), url.clone());
            probes.push(tokio::spawn(async move {
                await_queryable(&client, &url, &id, acked).await
            }));
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let mut lost = 0;
        for p in probes {
            match p.await.ok().flatten() {
                Some(d) => {
                    let _ = h.record(d.as_micros() as u64);
                }
                None => lost += 1,
            }
        }
        (h, lost)
    })
}

const MAX_SAMPLED_IDS: usize = 100_000;

/// Measures trace-by-id latency on `ids`; returns the report.
async fn measure_queries(
    url: &str,
    ids: &[String],
    samples: usize,
    spans_per_trace: Option<usize>,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(!ids.is_empty(), "no trace ids to query");
    let client = query_client();
    let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
    let mut errors = 0u64;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let base = url.trim_end_matches('/');
    for i in 0..samples {
        let id = &ids[rng.random_range(0..ids.len())];
        let t0 = Instant::now();
        let r = client
            .get(format!("{base}/api/v1/traces/{id}"))
            .send()
            .await;
        let ok = match r {
            Ok(r) if r.status().is_success() => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                spans_per_trace.is_none_or(|n| v["span_count"] == n)
            }
            _ => false,
        };
        let _ = h.record(t0.elapsed().as_micros() as u64);
        if !ok {
            errors += 1;
        }
        if (i + 1) % 250 == 0 {
            eprintln!(
                "[query] {}/{samples} trace-by-id requests, p99 so far {:.1} ms",
                i + 1,
                h.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    Ok(serde_json::json!({
        "requests": samples,
        "errors": errors,
        "latency_ms": percentiles(&h, 1000.0)
    }))
}

/// p50/p95/p99/max of a histogram of microseconds, divided into the report's unit
/// (1000 for milliseconds, 1e6 for seconds).
fn percentiles(h: &Histogram<u64>, micros_per_unit: f64) -> serde_json::Value {
    let q = |p| h.value_at_quantile(p) as f64 / micros_per_unit;
    serde_json::json!({
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": h.max() as f64 / micros_per_unit,
    })
}

/// Trace ids found by `GET /api/v1/traces` with `params`.
async fn search_ids(url: &str, params: &[(&str, String)]) -> anyhow::Result<Vec<String>> {
    let body: serde_json::Value = query_client()
        .get(format!("{}/api/v1/traces", url.trim_end_matches('/')))
        .query(params)
        .send()
        .await
        .context("cannot reach the query API")?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["traces"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["trace_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Up to 1,000 trace ids spread over the last `since`: 50 from each of 20 slices, so
/// that lookups hit old blocks as well as new ones.
async fn spread_ids(url: &str, since: Duration) -> anyhow::Result<Vec<String>> {
    const SLICES: u32 = 20;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let slice = since.as_secs_f64() / f64::from(SLICES);
    let mut ids = Vec::new();
    for i in 0..SLICES {
        let end = now - slice * f64::from(i);
        let params = [
            ("start", format!("{:.0}", end - slice)),
            ("end", format!("{end:.0}")),
            ("limit", "50".to_owned()),
        ];
        ids.extend(search_ids(url, &params).await?);
    }
    Ok(ids)
}

/// Times `samples` sequential GETs of `path`; every answer must be 2xx.
async fn measure_path(url: &str, path: &str, samples: usize) -> anyhow::Result<serde_json::Value> {
    let client = query_client();
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let mut bytes = 0;
    for _ in 0..samples.max(1) {
        let t0 = Instant::now();
        let r = client
            .get(format!("{}{path}", url.trim_end_matches('/')))
            .send()
            .await
            .context("cannot reach the query API")?;
        let status = r.status();
        let body = r.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let _ = h.record(t0.elapsed().as_micros() as u64);
        bytes = body.len();
    }
    Ok(serde_json::json!({
        "path": path,
        "requests": samples.max(1),
        "response_bytes": bytes,
        "latency_ms": percentiles(&h, 1000.0)
    }))
}

fn print_query_report(q: &serde_json::Value) {
    println!(
        "trace by id: {} requests, {} errors, p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
        q["requests"],
        q["errors"],
        q["latency_ms"]["p50"],
        q["latency_ms"]["p95"],
        q["latency_ms"]["p99"],
        q["latency_ms"]["max"]
    );
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(key) = &args.query_key {
        let _ = QUERY_KEY.set(key.clone());
    }
    if args.skip_ingest {
        let url = args
            .query_url
            .as_deref()
            .expect("clap requires --query-url");
        let ids = spread_ids(url, args.ids_since).await?;
        let q = measure_queries(url, &ids, args.query_samples, None).await?;
        if !args.json {
            print_query_report(&q);
        }
        let mut paths = Vec::new();
        for path in &args.query_path {
            let p = measure_path(url, path, args.path_samples).await?;
            if !args.json {
                println!(
                    "{path}: {} requests, {} bytes, p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
                    p["requests"],
                    p["response_bytes"],
                    p["latency_ms"]["p50"],
                    p["latency_ms"]["p95"],
                    p["latency_ms"]["p99"],
                    p["latency_ms"]["max"]
                );
            }
            paths.push(p);
        }
        if args.json {
            println!("{}", serde_json::json!({ "query": q, "paths": paths }));
        }
        return Ok(());
    }
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(
        args.spans_per_trace > 0,
        "--spans-per-trace must be at least 1"
    );
    let template = Arc::new(synthetic::template(
        args.batch,
        args.spans_per_trace,
        args.attr_bytes,
    ));
    let totals = Arc::new(Totals::default());
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();

    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let mut exporter = Exporter::connect(&args.endpoint, args.protocol, args.key.clone())
            .await
            .context("loadgen cannot connect")?;
        let (template, totals, histogram, stop, last_error) = (
            template.clone(),
            totals.clone(),
            histogram.clone(),
            stop.clone(),
            last_error.clone(),
        );
        let (spt, limit, deadline) = (args.spans_per_trace, args.total_spans, args.duration);
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut local = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
            while !stop.load(Ordering::Relaxed) && started.elapsed() < deadline {
                if limit.is_some_and(|l| totals.spans.load(Ordering::Relaxed) >= l) {
                    break;
                }
                let mut req = (*template).clone();
                synthetic::refresh(&mut req, spt, &mut rng);
                let first_trace = hex(&req.resource_spans[0].scope_spans[0].spans[0].trace_id);
                let n = req.resource_spans[0].scope_spans[0].spans.len() as u64;
                let bytes = req.encoded_len() as u64;
                let t0 = Instant::now();
                match exporter.export(req).await {
                    Ok(_) => {
                        let _ = local.record(t0.elapsed().as_micros() as u64);
                        totals.spans.fetch_add(n, Ordering::Relaxed);
                        totals.bytes.fetch_add(bytes, Ordering::Relaxed);
                        *totals.latest.lock().expect("lock") =
                            Some((first_trace.clone(), Instant::now()));
                        let mut sent = totals.sent.lock().expect("lock");
                        if sent.len() < MAX_SAMPLED_IDS {
                            sent.push(first_trace);
                        }
                    }
                    Err(e) => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().expect("lock") = Some(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let _ = histogram.lock().await.add(&local);
        }));
    }

    let freshness_stop = Arc::new(AtomicBool::new(false));
    let freshness = match (&args.query_url, args.freshness) {
        (Some(url), true) => Some(spawn_freshness_probes(
            url.clone(),
            totals.clone(),
            freshness_stop.clone(),
        )),
        _ => None,
    };

    let progress = {
        let (totals, stop) = (totals.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = (0u64, 0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let spans = totals.spans.load(Ordering::Relaxed);
                let bytes = totals.bytes.load(Ordering::Relaxed);
                let dt = last.2.elapsed().as_secs_f64();
                eprintln!(
                    "[{:>4.0}s] {:>9.0} spans/s {:>7.1} MB/s  total {spans} spans  errors {}",
                    started.elapsed().as_secs_f64(),
                    (spans - last.0) as f64 / dt,
                    (bytes - last.1) as f64 / dt / 1e6,
                    totals.errors.load(Ordering::Relaxed)
                );
                last = (spans, bytes, Instant::now());
            }
        })
    };

    for w in workers {
        w.await?;
    }
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    freshness_stop.store(true, Ordering::Relaxed);
    let freshness = match freshness {
        Some(task) => {
            eprintln!("waiting for the last freshness probes to be served…");
            let (h, lost) = task.await?;
            Some(serde_json::json!({
                "probes": h.len(),
                "never_served": lost,
                "seconds": percentiles(&h, 1e6)
            }))
        }
        None => None,
    };
    let h = histogram.lock().await;
    let spans = totals.spans.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    let mut report = serde_json::json!({
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "concurrency": args.concurrency,
        "batch": args.batch,
        "attr_bytes": args.attr_bytes,
        "seconds": elapsed,
        "spans": spans,
        "requests": h.len(),
        "errors": errors,
        "spans_per_sec": spans as f64 / elapsed,
        "mb_per_sec": bytes as f64 / elapsed / 1e6,
        "bytes_per_span": bytes.checked_div(spans).unwrap_or(0),
        "latency_ms": percentiles(&h, 1000.0)
    });
    let query = match &args.query_url {
        Some(url) if spans > 0 => {
            let ids = std::mem::take(&mut *totals.sent.lock().expect("lock"));
            // Only whole traces are checked: a request ends on a trace boundary when
            // batch is a multiple of spans_per_trace.
            let check = args
                .batch
                .is_multiple_of(args.spans_per_trace)
                .then_some(args.spans_per_trace);
            Some(measure_queries(url, &ids, args.query_samples, check).await?)
        }
        _ => None,
    };
    if let Some(q) = &query {
        report["query"] = q.clone();
    }
    if let Some(f) = &freshness {
        report["freshness"] = f.clone();
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{spans} spans in {elapsed:.1} s: {:.0} spans/s, {:.1} MB/s ({} B/span), {} requests, {errors} errors",
            report["spans_per_sec"].as_f64().unwrap_or(0.0),
            report["mb_per_sec"].as_f64().unwrap_or(0.0),
            report["bytes_per_span"],
            h.len()
        );
        println!(
            "export latency: p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
            report["latency_ms"]["p50"],
            report["latency_ms"]["p95"],
            report["latency_ms"]["p99"],
            report["latency_ms"]["max"]
        );
        if let Some(q) = &query {
            print_query_report(q);
        }
        if let Some(f) = &freshness {
            println!(
                "freshness (acknowledged → queryable): {} probes, p50 {:.2} s, p95 {:.2} s, p99 {:.2} s, max {:.2} s, never served {}",
                f["probes"],
                f["seconds"]["p50"].as_f64().unwrap_or(0.0),
                f["seconds"]["p95"].as_f64().unwrap_or(0.0),
                f["seconds"]["p99"].as_f64().unwrap_or(0.0),
                f["seconds"]["max"].as_f64().unwrap_or(0.0),
                f["never_served"]
            );
        }
    }
    if let Some(e) = last_error.lock().expect("lock").take() {
        eprintln!("last error: {e}");
    }
    if spans == 0 {
        anyhow::bail!("no export succeeded");
    }
    Ok(())
}
