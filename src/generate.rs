//! `loupe generate`: writes millions of realistic spans straight into a project's
//! storage, as the writers would have (normalized, priced, sorted Parquet blocks with
//! their metadata), for benchmarks and capacity tests.
//!
//! The traces are the demo generator's (RAG, agents, multi-agent, chat; several
//! models, prompt versions, users and sessions, ~5 % errors), spread evenly over the
//! time window. Each block covers one slice of the window, so a time-bounded query
//! opens only the blocks of its range, as with blocks written live.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::StreamExt;
use loupe_core::TenantId;
use loupe_core::normalize::{NormalizeOptions, normalize_request};
use loupe_core::pricing::PriceBook;
use loupe_core::span::spans_to_batch;
use loupe_core::storage::{BlockMeta, Storage};
use loupe_ingester::writer::BlockJob;

use crate::demo::{DemoOptions, generate};

/// Traces generated at once (their OTLP requests are held in memory until normalized).
const CHUNK_TRACES: usize = 2_000;
/// The most spans one run writes.
const MAX_SPANS: u64 = 1_000_000_000;

#[derive(clap::Args)]
pub struct Args {
    /// Where blocks go: a directory (as `loupe standalone --data-dir D` uses
    /// `D/blocks`, or `loupe querier --storage`), `file://` or `s3://` URL.
    #[arg(long, env = "LOUPE_STORAGE")]
    storage: String,
    /// The project the spans belong to (`<namespace>/<project>`).
    #[arg(long, default_value = "default/default")]
    tenant: TenantId,
    /// How many spans to write, e.g. `250000`, `500k`, `10M`.
    #[arg(long, value_parser = parse_count)]
    spans: u64,
    /// Spread traces over this window ending now (or at --end), e.g. `24h`, `7d`.
    #[arg(long, default_value = "7d", value_parser = parse_window)]
    window: Duration,
    /// End of the window as Unix seconds (default: now).
    #[arg(long)]
    end: Option<u64>,
    /// Spans per block (a writer flushing 128 MiB of spans writes blocks of this order).
    #[arg(long, default_value = "100k", value_parser = parse_count)]
    block_spans: u64,
    /// Random seed: the same seed, counts, window and --end give the same spans.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The project's environment, for spans that name none.
    #[arg(long, default_value = "prod")]
    environment: String,
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = loupe_querier::api::parse_duration(s, None)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than a second"));
    }
    Ok(d)
}

/// A count with an optional `k` (thousand) or `M` (million) suffix.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000.0),
        Some((i, 'm' | 'M')) => (&t[..i], 1_000_000.0),
        _ => (t.as_str(), 1.0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a count like 250000, 500k or 10M"))?;
    let v = (n * mult).round();
    if !(1.0..=MAX_SPANS as f64).contains(&v) {
        return Err(format!("{s:?} must be between 1 and {MAX_SPANS}"));
    }
    Ok(v as u64)
}

/// What one block was generated from: its slice of the window and its seed.
#[derive(Clone, Copy)]
struct Slice {
    index: u64,
    /// Slice end, Unix nanoseconds.
    end_ns: u64,
    len: Duration,
    spans: u64,
}

struct Generated {
    meta: BlockMeta,
    traces: u64,
}

/// Generates, normalizes and prices the spans of one slice, and writes its block.
async fn write_block(
    storage: &Storage,
    tenant: &TenantId,
    seed: u64,
    environment: &str,
    slice: Slice,
) -> anyhow::Result<Generated> {
    let tenant_c = tenant.clone();
    let environment = environment.to_owned();
    let (job, traces) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let prices = PriceBook::builtin();
        let opts = NormalizeOptions {
            default_environment: Some(environment),
            ..NormalizeOptions::default()
        };
        let mut spans = Vec::with_capacity(slice.spans as usize + 64);
        let mut traces = 0u64;
        let mut chunk = 0u64;
        while (spans.len() as u64) < slice.spans {
            // Traces vary in size; each chunk asks for about as many as still fit.
            let per_trace = if traces == 0 {
                8.0
            } else {
                spans.len() as f64 / traces as f64
            };
            let missing = (slice.spans - spans.len() as u64) as f64;
            let demo = DemoOptions {
                traces: ((missing / per_trace).ceil() as usize).clamp(1, CHUNK_TRACES),
                seed: seed ^ (slice.index << 24) ^ chunk,
                spread: slice.len,
                now: UNIX_EPOCH + Duration::from_nanos(slice.end_ns),
            };
            chunk += 1;
            let (requests, infos) = generate(&demo, 4096);
            traces += infos.len() as u64;
            for req in &requests {
                let normalized = normalize_request(req, &opts);
                if let Some(r) = normalized.rejected.first() {
                    bail!("generated span rejected: {}: {}", r.path, r.reason);
                }
                spans.extend(normalized.spans);
            }
        }
        for span in &mut spans {
            prices.apply(span);
        }
        let batch = spans_to_batch(&spans)?;
        drop(spans);
        Ok((
            BlockJob::new(tenant_c, slice.index, slice.index, vec![batch], 0, seed),
            traces,
        ))
    })
    .await
    .context("block generation panicked")??;
    let meta = loupe_ingester::block::write(storage, "generate", &job).await?;
    Ok(Generated { meta, traces })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let storage = Storage::open(&args.storage)
        .with_context(|| format!("cannot open storage {}", args.storage))?;
    let end_ns = match args.end {
        Some(secs) => secs
            .checked_mul(1_000_000_000)
            .context("--end is out of range")?,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_nanos() as u64,
    };
    let window_ns = args.window.as_nanos() as u64;
    if window_ns >= end_ns {
        bail!("--window reaches before 1970");
    }
    let blocks = args.spans.div_ceil(args.block_spans.max(1));
    let slice_ns = window_ns / blocks;
    if slice_ns < 1_000_000_000 {
        bail!(
            "{blocks} blocks over {:.0} s leave less than a second per block; raise --block-spans or --window",
            args.window.as_secs_f64()
        );
    }
    let slices: Vec<Slice> = (0..blocks)
        .map(|i| Slice {
            index: i,
            end_ns: end_ns - window_ns + (i + 1) * slice_ns,
            len: Duration::from_nanos(slice_ns),
            spans: if i + 1 == blocks {
                args.spans - args.block_spans * (blocks - 1)
            } else {
                args.block_spans
            },
        })
        .collect();
    eprintln!(
        "generating {} spans for {} into {} ({blocks} blocks over {:.1} h)",
        args.spans,
        args.tenant,
        storage.url(),
        args.window.as_secs_f64() / 3600.0,
    );
    let started = Instant::now();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let storage = Arc::new(storage);
    let mut results = futures::stream::iter(slices)
        .map(|slice| {
            let storage = storage.clone();
            let tenant = args.tenant.clone();
            let environment = args.environment.clone();
            async move { write_block(&storage, &tenant, args.seed, &environment, slice).await }
        })
        .buffer_unordered(workers);
    let (mut spans, mut traces, mut bytes, mut done) = (0u64, 0u64, 0u64, 0u64);
    while let Some(block) = results.next().await {
        let block = block?;
        done += 1;
        spans += block.meta.spans;
        traces += block.traces;
        bytes += block.meta.size_bytes;
        let secs = started.elapsed().as_secs_f64();
        let rate = spans as f64 / secs.max(1e-9);
        let eta = (args.spans.saturating_sub(spans)) as f64 / rate.max(1.0);
        eprintln!(
            "block {done}/{blocks}: {spans} spans, {:.1} MB, {:.0} spans/s, ETA {:.0} s",
            bytes as f64 / 1e6,
            rate,
            eta
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {spans} spans ({traces} traces) in {blocks} blocks, {:.1} MB, for {} into {} in {:.1} s ({:.0} spans/s)",
        bytes as f64 / 1e6,
        args.tenant,
        storage.url(),
        secs,
        spans as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_count;

    #[test]
    fn counts_take_k_and_m_suffixes_and_reject_nonsense() {
        assert_eq!(parse_count("250000"), Ok(250_000));
        assert_eq!(parse_count("500k"), Ok(500_000));
        assert_eq!(parse_count("10M"), Ok(10_000_000));
        assert_eq!(parse_count("1.5M"), Ok(1_500_000));
        assert_eq!(parse_count("1_000"), Ok(1_000));
        assert!(parse_count("0").is_err());
        assert!(parse_count("ten").is_err());
        assert!(parse_count("-5").is_err());
        assert!(parse_count("5G").is_err());
    }
}
