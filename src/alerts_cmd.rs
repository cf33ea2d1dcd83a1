//! `loupe alerts check` (evaluate alert rules once against a query API) and
//! `loupe gate` (pass or fail a deployment on scores, latency, errors and cost).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, bail};
use loupe_querier::alerts::{
    AlertData, AlertState, AlertStatus, HttpData, RulesFile, advance, evaluate, format_value,
};

/// Where the numbers come from.
#[derive(clap::Args, Clone)]
pub struct Source {
    /// Query API base URL.
    #[arg(long, env = "LOUPE_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// The project's query key; not needed while the server lists no keys.
    #[arg(long, env = "LOUPE_QUERY_KEY", hide_env_values = true)]
    key: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum Alerts {
    /// Evaluate alert rules once against a query API and print their state, to try
    /// rules before applying them.
    Check {
        /// The rules file (YAML: `rules:` with name, kind, window, threshold, …).
        #[arg(long)]
        rules: std::path::PathBuf,
        #[command(flatten)]
        source: Source,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_alerts(cmd: Alerts) -> anyhow::Result<()> {
    let Alerts::Check {
        rules,
        source,
        json,
    } = cmd;
    let text =
        std::fs::read_to_string(&rules).with_context(|| format!("reading {}", rules.display()))?;
    let parsed =
        RulesFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", rules.display()))?;
    let data = HttpData::new(&source.url, source.key.clone());
    let now = loupe_querier::api::now_ns();
    let mut rows = Vec::new();
    let mut failed = 0;
    for (named, rule) in &parsed {
        let result = evaluate(rule, &data, now).await;
        // One evaluation from scratch: a breach shows Pending when the rule has a
        // `for`, Firing otherwise.
        let (status, _) = advance(
            &AlertStatus::default(),
            rule,
            result.as_ref().map_err(String::as_str),
            now,
        );
        if result.is_err() {
            failed += 1;
        }
        rows.push((named, rule, result, status));
    }
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(named, rule, result, status)| {
                serde_json::json!({
                    "name": named.name,
                    "kind": rule.kind.as_str(),
                    "state": if status.last_error.is_some() { "Error" } else { status.state.as_str() },
                    "value": result.as_ref().ok().and_then(|e| e.value),
                    "threshold": rule.threshold,
                    "summary": result.as_ref().map(|e| e.summary.clone()).unwrap_or_default(),
                    "error": result.as_ref().err(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut table = vec![[
            "RULE".to_owned(),
            "KIND".to_owned(),
            "STATE".to_owned(),
            "VALUE".to_owned(),
            "THRESHOLD".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for (named, rule, result, status) in &rows {
            let (state, value, detail) = match result {
                Ok(e) => (
                    status.state.as_str().to_owned(),
                    e.value
                        .map(|v| format_value(rule.kind, v))
                        .unwrap_or_else(|| "-".into()),
                    match (status.state, rule.for_duration.is_zero()) {
                        (AlertState::Pending, false) => format!(
                            "{}; fires if it holds for {}",
                            e.summary,
                            named.spec.for_duration.as_deref().unwrap_or_default()
                        ),
                        _ => e.summary.clone(),
                    },
                ),
                Err(err) => ("Error".to_owned(), "-".to_owned(), err.clone()),
            };
            table.push([
                named.name.clone(),
                rule.kind.as_str().to_owned(),
                state,
                value,
                format_value(rule.kind, rule.threshold),
                detail,
            ]);
        }
        print!("{}", render_table(&table));
    }
    if failed > 0 {
        bail!("{failed} of {} rules could not be evaluated", rows.len());
    }
    Ok(())
}

fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == N {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `loupe gate`: checks recent traffic against bounds and exits 1 when one fails.
#[derive(clap::Args)]
pub struct GateArgs {
    #[command(flatten)]
    source: Source,
    /// The traffic checked: traces of the last DURATION.
    #[arg(long, default_value = "1h")]
    since: String,
    /// Only traffic matching these metrics filters (`service=chatbot`,
    /// `prompt_version=v7`, `environment=prod`, …); repeatable. Scores count when
    /// their trace has a span matching every filter.
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    filters: Vec<String>,
    /// A score whose average must be at least --min (or not drop by more than
    /// --max-drop from --against to --compare).
    #[arg(long)]
    score: Option<String>,
    /// The least average of --score.
    #[arg(long, requires = "score")]
    min: Option<f64>,
    /// The traffic under test, e.g. `prompt_version=v7` (a filter, added to any
    /// --filter); compared with --against on the average of --score.
    #[arg(long, value_name = "KEY=VALUE", requires_all = ["against", "score"])]
    compare: Option<String>,
    /// The reference traffic, e.g. `prompt_version=v6`.
    #[arg(long, value_name = "KEY=VALUE", requires = "compare")]
    against: Option<String>,
    /// The most the --score average of --compare may fall below --against's, e.g. `5%`.
    #[arg(long, requires = "compare")]
    max_drop: Option<String>,
    /// The least scores (with --score) or requests checked; fewer fails the gate.
    #[arg(long, default_value_t = 1)]
    min_count: u64,
    /// Bounds on trace latency percentiles, e.g. `--max-p99 10s`.
    #[arg(long, value_name = "DURATION")]
    max_p50: Option<String>,
    #[arg(long, value_name = "DURATION")]
    max_p95: Option<String>,
    #[arg(long, value_name = "DURATION")]
    max_p99: Option<String>,
    /// The most traces with an error, e.g. `1%` or `0.01`.
    #[arg(long)]
    max_error_rate: Option<String>,
    /// The most cost over the range in USD (extrapolated over sampled-out traffic).
    #[arg(long)]
    max_cost: Option<f64>,
    /// The most average cost per request in USD.
    #[arg(long)]
    max_cost_per_request: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `KEY=VALUE` filters, checked against the metrics API's filter names.
fn filter_map(flag: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in items {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("{flag} {f:?} is not KEY=VALUE"))?;
        let k = k.trim();
        if !loupe_querier::stats::filter_names().any(|f| f == k) {
            bail!(
                "{flag}: unknown filter {k:?}; one of {}",
                loupe_querier::stats::filter_names()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// `1%` or `0.01`.
fn fraction(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| anyhow::anyhow!("{s:?} is not a fraction like 1% or 0.01"))?;
    if !(0.0..=1.0).contains(&v) {
        bail!("{s:?} is not between 0 and 100 %");
    }
    Ok(v)
}

fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    loupe_querier::api::parse_duration(s, None).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

#[derive(serde::Serialize)]
struct Check {
    check: String,
    value: Option<f64>,
    bound: String,
    passed: bool,
    detail: String,
}

pub async fn run_gate(args: GateArgs) -> anyhow::Result<()> {
    let since = duration("--since", &args.since)?;
    let filters = filter_map("--filter", &args.filters)?;
    let mut params: HashMap<String, String> = filters.clone().into_iter().collect();
    let compare = match (&args.compare, &args.against) {
        (Some(a), Some(b)) => {
            if args.score.is_none() {
                bail!("--compare compares the average of --score; give --score too");
            }
            let mut with = filters.clone();
            with.extend(filter_map("--compare", std::slice::from_ref(a))?);
            let mut base = filters.clone();
            base.extend(filter_map("--against", std::slice::from_ref(b))?);
            Some((a.clone(), with, b.clone(), base))
        }
        _ => None,
    };
    let max_drop = args.max_drop.as_deref().map(fraction).transpose()?;
    let latency_bounds: Vec<(&str, Duration)> = [
        ("p50", &args.max_p50),
        ("p95", &args.max_p95),
        ("p99", &args.max_p99),
    ]
    .into_iter()
    .filter_map(|(p, b)| b.as_ref().map(|b| (p, b)))
    .map(|(p, b)| Ok((p, duration(&format!("--max-{p}"), b)?)))
    .collect::<anyhow::Result<_>>()?;
    let max_error_rate = args.max_error_rate.as_deref().map(fraction).transpose()?;
    let metrics_wanted = !latency_bounds.is_empty()
        || max_error_rate.is_some()
        || args.max_cost.is_some()
        || args.max_cost_per_request.is_some();
    if args.min.is_none() && compare.is_none() && !metrics_wanted {
        bail!(
            "nothing to check: give --score with --min or with --compare/--against, --max-p50/p95/p99, --max-error-rate, --max-cost or --max-cost-per-request"
        );
    }

    let data = HttpData::new(&args.source.url, args.source.key.clone());
    let end = loupe_querier::alerts::whole_seconds_after(loupe_querier::api::now_ns());
    let start = end - since.as_nanos() as i64;
    let mut checks = Vec::new();
    let score_avg = async |name: &str, filters: &BTreeMap<String, String>| {
        let m = data
            .score_metrics((start, end), end - start, name, filters)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        anyhow::Ok(
            m.series
                .iter()
                .find(|s| s.name == name)
                .map_or((None, 0), |s| (s.avg, s.count)),
        )
    };
    if let (Some(name), Some((label, with, base_label, base))) = (&args.score, &compare) {
        let ((avg, count), (base_avg, base_count)) =
            (score_avg(name, with).await?, score_avg(name, base).await?);
        let max = max_drop.unwrap_or(0.0);
        let drop = match (avg, base_avg) {
            (Some(a), Some(b)) if b != 0.0 => Some((b - a) / b.abs()),
            _ => None,
        };
        let enough = count >= args.min_count && base_count >= args.min_count;
        checks.push(Check {
            check: format!("score {name}: {label} vs {base_label} (drop)"),
            value: drop,
            bound: format!("<= {max}"),
            passed: enough && drop.is_some_and(|d| d <= max),
            detail: format!(
                "{} over {count} scores vs {} over {base_count}{}",
                avg.map_or("-".into(), |a| format!("{a:.3}")),
                base_avg.map_or("-".into(), |a| format!("{a:.3}")),
                if enough {
                    String::new()
                } else {
                    format!("; at least {} each needed", args.min_count)
                }
            ),
        });
    }
    if let (Some(name), Some(min)) = (&args.score, args.min) {
        let (avg, count) = score_avg(name, &filters).await?;
        let enough = count >= args.min_count;
        checks.push(Check {
            check: format!("score {name} average"),
            value: avg,
            bound: format!(">= {min}"),
            passed: enough && avg.is_some_and(|a| a >= min),
            detail: if enough {
                format!("{count} scores")
            } else {
                format!("only {count} scores, at least {} needed", args.min_count)
            },
        });
    }
    if metrics_wanted {
        params.insert("level".into(), "trace".into());
        params.insert("step".into(), format!("{}s", since.as_secs().max(1)));
        let m = data
            .metrics((start, end), &params)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let series = m.series.first();
        let point = series.and_then(|s| s.points.first());
        let requests = series.map_or(0, |s| s.requests);
        let estimated = series.map_or(0.0, |s| s.estimated.requests);
        let enough = requests >= args.min_count;
        let volume = if enough {
            format!("{requests} requests")
        } else {
            format!(
                "only {requests} requests, at least {} needed",
                args.min_count
            )
        };
        for (p, bound) in latency_bounds {
            let v = point.and_then(|pt| match p {
                "p50" => pt.latency_ms.p50,
                "p95" => pt.latency_ms.p95,
                _ => pt.latency_ms.p99,
            });
            let b = bound.as_secs_f64() * 1000.0;
            checks.push(Check {
                check: format!("{p} latency (ms)"),
                value: v,
                bound: format!("<= {b:.0}"),
                passed: enough && v.is_some_and(|v| v <= b),
                detail: volume.clone(),
            });
        }
        if let Some(max) = max_error_rate {
            let errors = series.map_or(0, |s| s.errors);
            let rate = (requests > 0).then(|| errors as f64 / requests as f64);
            checks.push(Check {
                check: "error rate".into(),
                value: rate,
                bound: format!("<= {max}"),
                passed: enough && rate.is_some_and(|r| r <= max),
                detail: format!("{errors} errors, {volume}"),
            });
        }
        let cost = series.map_or(0.0, |s| s.estimated.cost_usd);
        if let Some(max) = args.max_cost {
            checks.push(Check {
                check: "cost (USD)".into(),
                value: Some(cost),
                bound: format!("<= {max}"),
                passed: cost <= max,
                detail: volume.clone(),
            });
        }
        if let Some(max) = args.max_cost_per_request {
            let per = (estimated > 0.0).then(|| cost / estimated);
            checks.push(Check {
                check: "cost per request (USD)".into(),
                value: per,
                bound: format!("<= {max}"),
                passed: enough && per.is_some_and(|p| p <= max),
                detail: volume.clone(),
            });
        }
    }
    let passed = checks.iter().all(|c| c.passed);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "passed": passed, "since": args.since, "filters": args.filters, "checks": checks })
            )?
        );
    } else {
        let mut table = vec![[
            "CHECK".to_owned(),
            "VALUE".to_owned(),
            "BOUND".to_owned(),
            "RESULT".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for c in &checks {
            table.push([
                c.check.clone(),
                c.value
                    .map(|v| {
                        // Milliseconds are whole; ratios and dollars keep 4 decimals.
                        if c.check.contains("(ms)") {
                            format!("{v:.0}")
                        } else {
                            format!("{v:.4}")
                                .trim_end_matches('0')
                                .trim_end_matches('.')
                                .to_owned()
                        }
                    })
                    .unwrap_or_else(|| "-".into()),
                c.bound.clone(),
                if c.passed { "pass" } else { "FAIL" }.to_owned(),
                c.detail.clone(),
            ]);
        }
        print!("{}", render_table(&table));
        println!(
            "gate {} ({} of {} checks passed, last {})",
            if passed { "passed" } else { "FAILED" },
            checks.iter().filter(|c| c.passed).count(),
            checks.len(),
            args.since
        );
    }
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}
