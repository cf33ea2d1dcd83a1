//! `loupe traces get|search|delete|deletions`: read traces from a query API and print
//! them, and delete traces on request.

use anyhow::{Context, bail};
use loupe_querier::deletions::{DeletionList, DeletionView};
use loupe_querier::model::{SearchResponse, SpanNode, TraceView};

#[derive(clap::Args)]
pub struct Args {
    /// Query API base URL.
    #[arg(
        long,
        global = true,
        env = "LOUPE_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    url: String,
    /// The project's query key (`loupe keys new --scope query`); not needed while the
    /// server lists no keys.
    #[arg(long, global = true, env = "LOUPE_QUERY_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TracesCommand,
}

#[derive(clap::Subcommand)]
enum TracesCommand {
    /// Print one trace as a call tree with durations, tokens and cost per span.
    Get {
        /// The trace id (32 hex characters).
        trace_id: String,
    },
    /// Find traces; filters combine with AND.
    Search(Box<SearchArgs>),
    /// Delete a trace, or every trace of a user: hidden from every query at once,
    /// removed from storage by the next compaction. The request is recorded.
    Delete {
        /// The trace id (32 hex characters).
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        trace_id: Option<String>,
        /// Delete every trace with a span of this user id instead.
        #[arg(long)]
        user: Option<String>,
    },
    /// List the project's deletion requests and whether storage is clean of them yet.
    Deletions,
}

#[derive(clap::Args, Default)]
struct SearchArgs {
    /// Only traces that started in the last DURATION (e.g. 15m, 3h, 7d). Default 24h.
    #[arg(long)]
    since: Option<String>,
    /// Start of the range (RFC 3339 or Unix seconds).
    #[arg(long, conflicts_with = "since")]
    start: Option<String>,
    /// End of the range (RFC 3339 or Unix seconds). Default now.
    #[arg(long)]
    end: Option<String>,
    #[arg(long)]
    service: Option<String>,
    /// Span name (any span of the trace).
    #[arg(long)]
    name: Option<String>,
    /// LLM, CHAIN, RETRIEVER, EMBEDDING, TOOL, RERANKER, AGENT, GUARDRAIL, EVALUATOR.
    #[arg(long)]
    llm_kind: Option<String>,
    /// Request or response model.
    #[arg(long)]
    model: Option<String>,
    /// error or ok.
    #[arg(long)]
    status: Option<String>,
    /// e.g. 2s, 500ms.
    #[arg(long)]
    min_duration: Option<String>,
    #[arg(long)]
    max_duration: Option<String>,
    /// Minimum trace cost in USD.
    #[arg(long)]
    min_cost: Option<String>,
    #[arg(long)]
    user_id: Option<String>,
    #[arg(long)]
    session_id: Option<String>,
    #[arg(long)]
    prompt_name: Option<String>,
    #[arg(long)]
    prompt_version: Option<String>,
    /// Number of traces (1-1000).
    #[arg(long)]
    limit: Option<usize>,
}

impl SearchArgs {
    fn params(&self) -> Vec<(&'static str, String)> {
        let limit = self.limit.map(|l| l.to_string());
        [
            ("since", &self.since),
            ("start", &self.start),
            ("end", &self.end),
            ("service", &self.service),
            ("name", &self.name),
            ("llm_kind", &self.llm_kind),
            ("model", &self.model),
            ("status", &self.status),
            ("min_duration", &self.min_duration),
            ("max_duration", &self.max_duration),
            ("min_cost", &self.min_cost),
            ("user_id", &self.user_id),
            ("session_id", &self.session_id),
            ("prompt_name", &self.prompt_name),
            ("prompt_version", &self.prompt_version),
            ("limit", &limit),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

async fn get_json(
    url: &str,
    key: Option<&str>,
    query: &[(&str, String)],
) -> anyhow::Result<String> {
    call(reqwest::Method::GET, url, key, query).await
}

async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    query: &[(&str, String)],
) -> anyhow::Result<String> {
    let mut request = reqwest::Client::new().request(method, url).query(query);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.with_context(|| {
        format!("cannot reach the query API at {url} (is Loupe running? set --url)")
    })?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(body);
        bail!("{status}: {msg}");
    }
    Ok(body)
}

/// Prints the API's JSON with `--json`, else the response rendered for a terminal.
fn show<T: serde::de::DeserializeOwned>(
    json: bool,
    body: &str,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{body}");
    } else {
        let value: T = serde_json::from_str(body).context("unexpected response")?;
        print!("{}", render(&value));
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let key = args.key.as_deref();
    match &args.command {
        TracesCommand::Get { trace_id } => {
            let body = get_json(&format!("{base}/api/v1/traces/{trace_id}"), key, &[]).await?;
            show(args.json, &body, render_trace)
        }
        TracesCommand::Search(search) => {
            let body = get_json(&format!("{base}/api/v1/traces"), key, &search.params()).await?;
            show(args.json, &body, render_search)
        }
        TracesCommand::Delete { trace_id, user } => {
            let (url, query) = match (trace_id, user) {
                (Some(id), _) => (format!("{base}/api/v1/traces/{id}"), vec![]),
                (None, Some(user)) => (
                    format!("{base}/api/v1/traces"),
                    vec![("user_id", user.clone())],
                ),
                (None, None) => bail!("name a trace id or --user"),
            };
            let body = call(reqwest::Method::DELETE, &url, key, &query).await?;
            show(args.json, &body, |d: &DeletionView| {
                format!(
                    "deletion {} recorded: {} trace(s) hidden from every query now; \
                     the compactor removes them from storage (see `loupe traces deletions`)\n",
                    d.id, d.traces
                )
            })
        }
        TracesCommand::Deletions => {
            let body = get_json(&format!("{base}/api/v1/deletions"), key, &[]).await?;
            show(args.json, &body, render_deletions)
        }
    }
}

fn render_deletions(list: &DeletionList) -> String {
    if list.deletions.is_empty() {
        return "no deletion requests\n".into();
    }
    let mut out = format!(
        "{:<16}  {:<20}  {:<10}  {:>7}  {:<16}  {}\n",
        "ID", "REQUESTED", "STATUS", "TRACES", "BY", "USER"
    );
    for d in &list.deletions {
        out.push_str(&format!(
            "{:<16}  {:<20}  {:<10}  {:>7}  {:<16}  {}\n",
            d.id,
            d.requested_at.get(..19).unwrap_or(&d.requested_at),
            d.status,
            d.traces,
            d.requested_by,
            d.user_id.as_deref().unwrap_or("-"),
        ));
    }
    out
}

fn fmt_duration(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.0} µs", ms * 1000.0)
    }
}

fn fmt_int(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn fmt_cost(usd: f64) -> String {
    if usd == 0.0 {
        "$0".into()
    } else if usd < 0.01 {
        format!("${usd:.6}")
    } else {
        format!("${usd:.4}")
    }
}

/// Draws the trace as a call stack: one line per span with its tree prefix.
pub fn render_trace(t: &TraceView) -> String {
    let s = &t.summary;
    let mut out = format!(
        "trace {}  {}  ({})  {}\n{} · {} spans · {} tokens · {}{}\n\n",
        t.trace_id,
        s.root_name,
        s.root_service,
        s.start_time,
        fmt_duration(s.duration_ms),
        s.span_count,
        fmt_int(s.total_tokens),
        fmt_cost(s.cost_usd),
        if s.error { " · ERROR" } else { "" }
    );
    let mut rows: Vec<[String; 6]> = Vec::new();
    fn walk(node: &SpanNode, prefix: &str, last: bool, top: bool, rows: &mut Vec<[String; 6]>) {
        let branch = if top {
            String::new()
        } else if last {
            format!("{prefix}└─ ")
        } else {
            format!("{prefix}├─ ")
        };
        let model = node
            .response_model
            .clone()
            .or_else(|| node.request_model.clone())
            .unwrap_or_default();
        let tokens = node
            .total_tokens
            .map(|t| format!("{} tok", fmt_int(t)))
            .unwrap_or_default();
        let cost = node.cost_total_usd.map(fmt_cost).unwrap_or_default();
        let mut name = format!("{branch}{}", node.name);
        if node.status == "ERROR" {
            name.push_str(" ✗");
            if let Some(m) = &node.status_message {
                name.push_str(&format!(" {}", m.chars().take(60).collect::<String>()));
            }
        }
        rows.push([
            name,
            node.llm_kind.clone(),
            fmt_duration(node.duration_ms),
            model,
            tokens,
            cost,
        ]);
        let child_prefix = if top {
            String::new()
        } else if last {
            format!("{prefix}   ")
        } else {
            format!("{prefix}│  ")
        };
        for (i, c) in node.children.iter().enumerate() {
            walk(c, &child_prefix, i + 1 == node.children.len(), false, rows);
        }
    }
    for r in &t.roots {
        walk(r, "", true, true, &mut rows);
    }
    out.push_str(&table(&rows, &[false, false, true, false, true, true]));
    out
}

fn table(rows: &[[String; 6]], right: &[bool; 6]) -> String {
    let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..6).map(width).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for i in 0..6 {
            let cell = &r[i];
            let pad = widths[i] - cell.chars().count();
            if right[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_search(r: &SearchResponse) -> String {
    if r.traces.is_empty() {
        return "no traces match\n".into();
    }
    let mut rows = vec![[
        "TRACE ID".to_string(),
        "START".to_string(),
        "DURATION".to_string(),
        "SPANS".to_string(),
        "TOKENS".to_string(),
        "COST".to_string(),
    ]];
    let mut names = vec!["ROOT".to_string()];
    for t in &r.traces {
        let s = &t.totals;
        rows.push([
            t.trace_id.clone(),
            s.start_time
                .chars()
                .take(19)
                .collect::<String>()
                .replace('T', " "),
            fmt_duration(s.duration_ms),
            s.span_count.to_string(),
            fmt_int(s.total_tokens),
            fmt_cost(s.cost_usd),
        ]);
        names.push(format!(
            "{} ({}){}",
            s.root_name,
            s.root_service,
            if s.error { "  ERROR" } else { "" }
        ));
    }
    let body = table(&rows, &[false, false, true, true, true, true]);
    let mut out = String::new();
    for (line, name) in body.lines().zip(names) {
        out.push_str(&format!("{line}  {name}\n"));
    }
    out.push_str(&format!("{} traces\n", r.traces.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_int(1234567), "1,234,567");
        assert_eq!(fmt_int(12), "12");
        assert_eq!(fmt_duration(1840.0), "1.84 s");
        assert_eq!(fmt_duration(112.4), "112 ms");
        assert_eq!(fmt_cost(0.0042), "$0.004200");
        assert_eq!(fmt_cost(1.5), "$1.5000");
    }
}
