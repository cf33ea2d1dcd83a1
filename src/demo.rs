//! Demo data: realistic traces of LLM applications, as OTLP export requests.
//!
//! Used by `loupe standalone --demo` and `loupe demo`. The generator is fully
//! deterministic for a given [`DemoOptions`] (seed, `now`, spread and count), so
//! tests and screenshots are reproducible.
//!
//! What it generates:
//! - three services: `docs-search` (RAG, OpenInference / LlamaIndex style),
//!   `support-bot` (RAG, tool agents and plain chat; OpenInference / LangChain style,
//!   with about a third of its agent and chat traces in OpenLLMetry), and
//!   `research-agent` (tool agents and parallel sub-agents, OpenTelemetry `gen_ai.*`);
//! - scenarios `rag` (~40%), `agent` (~35%), `multi_agent` (~15%) and `chat` (~10%);
//! - seven users with sessions of 1–5 traces each;
//! - prompts with 2–3 versions rolled out over the time window (v1 oldest, v3 newest),
//!   each version changing the model and/or the prompt size, hence cost and latency;
//! - about 5% of traces with an error (LLM 429 / 529, tool timeout, SQL error), about 5%
//!   with a slow LLM call (15–40 s) and about 5% with a long-context call (100k+ input
//!   tokens on claude-opus-4-1 or o1).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// What a demo run generates.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of traces.
    pub traces: usize,
    /// Seed of the random generator: the same options give the same output.
    pub seed: u64,
    /// traces are spread over [now - spread, now]
    pub spread: Duration,
    /// The end of the time window (no span ends after it).
    pub now: SystemTime,
}

/// One generated trace: its id (16 bytes) and a short label of the scenario ("rag",
/// "agent", "multi_agent", "chat"), plus flags the tests can check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoTrace {
    pub trace_id: [u8; 16],
    pub scenario: &'static str,
    /// Some span of the trace has status ERROR.
    pub error: bool,
    pub span_count: usize,
    /// Some LLM span of the trace lasts 15 s or more.
    #[allow(dead_code)]
    pub slow: bool,
    /// Some LLM span of the trace has 100k or more input tokens.
    #[allow(dead_code)]
    pub expensive: bool,
    /// `service.name` of the trace's resource.
    #[allow(dead_code)]
    pub service: &'static str,
}

/// Generates the traces, grouped into export requests of at most `batch_spans` spans
/// each (a trace's spans are split across requests only if it is larger than the batch),
/// and a list describing each trace.
pub fn generate(
    opts: &DemoOptions,
    batch_spans: usize,
) -> (Vec<ExportTraceServiceRequest>, Vec<DemoTrace>) {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let now_ns = u64::try_from(
        opts.now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    )
    .unwrap_or(u64::MAX);
    let spread_ns = u64::try_from(opts.spread.as_nanos()).unwrap_or(u64::MAX);
    let window_start = now_ns.saturating_sub(spread_ns);

    let mut built: Vec<BuiltTrace> = Vec::with_capacity(opts.traces);
    while built.len() < opts.traces {
        let service = weighted(&mut rng, SERVICES);
        let user = *weighted(&mut rng, USERS);
        let len = rng.random_range(1..=5usize).min(opts.traces - built.len());
        let session = format!("sess-{}", hex(&rng.random::<[u8; 6]>()));
        // Sessions start in the first 90% of the window so that most of them fit.
        let frac: f64 = rng.random_range(0.0..0.9);
        let mut t = window_start + (spread_ns as f64 * frac) as u64;
        let mut history: Vec<(&'static str, &'static str)> = Vec::new();
        for _ in 0..len {
            let scenario = *weighted(&mut rng, service.scenarios);
            let prompt = service.prompt(scenario);
            // Prompt versions roll out over the window: v1 first, the last one most recently.
            let pos = (frac / 0.9 + rng.random_range(-0.08..0.08)).clamp(0.0, 0.999);
            let pv = &prompt.versions[(pos * prompt.versions.len() as f64) as usize];
            let conv = match (service.name, scenario) {
                ("research-agent", _) => Conv::GenAi,
                ("support-bot", Scenario::Agent | Scenario::Chat) if rng.random_bool(0.35) => {
                    Conv::OpenLlmetry
                }
                _ => Conv::OpenInference,
            };
            let plan = Plan {
                error: rng.random_bool(0.05),
                slow: rng.random_bool(0.05),
                expensive: rng.random_bool(0.05),
            };
            let mut ctx = Ctx {
                rng: &mut rng,
                conv,
                service,
                user,
                session: session.clone(),
                prompt,
                pv,
                plan,
                spans: Vec::new(),
                history: std::mem::take(&mut history),
            };
            match scenario {
                Scenario::Rag => ctx.rag(),
                Scenario::Agent => ctx.agent(),
                Scenario::MultiAgent => ctx.multi_agent(),
                Scenario::Chat => ctx.chat(),
            }
            let Ctx {
                spans, history: h, ..
            } = ctx;
            history = h;
            let duration = spans.iter().map(|s| s.end).max().unwrap_or(0);
            let start = t.max(window_start).min(now_ns.saturating_sub(duration));
            let trace_id = nonzero_id::<16>(&mut rng);
            let error = spans.iter().any(|s| {
                s.status
                    .as_ref()
                    .is_some_and(|st| st.code == StatusCode::Error as i32)
            });
            let slow = spans
                .iter()
                .any(|s| s.llm && s.end - s.start >= 15_000 * MS);
            let expensive = spans.iter().any(|s| s.llm && s.input_tokens >= 100_000);
            built.push(BuiltTrace {
                info: DemoTrace {
                    trace_id,
                    scenario: scenario.label(),
                    error,
                    span_count: spans.len(),
                    slow,
                    expensive,
                    service: service.name,
                },
                base: start,
                spans,
            });
            t = start + duration + rng.random_range(20_000..240_000) * MS;
        }
    }

    let batch = batch_spans.max(1);
    let mut requests = Vec::new();
    let mut pending: Vec<(&'static Service, Scope, Span)> = Vec::new();
    for trace in &built {
        let spans = trace.otlp_spans();
        if spans.len() > batch {
            if !pending.is_empty() {
                requests.push(build_request(std::mem::take(&mut pending)));
            }
            let mut spans = spans;
            while !spans.is_empty() {
                let rest = spans.split_off(batch.min(spans.len()));
                requests.push(build_request(spans));
                spans = rest;
            }
            continue;
        }
        if pending.len() + spans.len() > batch {
            requests.push(build_request(std::mem::take(&mut pending)));
        }
        pending.extend(spans);
    }
    if !pending.is_empty() {
        requests.push(build_request(pending));
    }
    let infos = built.into_iter().map(|t| t.info).collect();
    (requests, infos)
}

// ---------------------------------------------------------------------------------------
// Output assembly

const MS: u64 = 1_000_000;

type Scope = (&'static str, &'static str);

struct BuiltTrace {
    info: DemoTrace,
    base: u64,
    spans: Vec<Draft>,
}

impl BuiltTrace {
    /// The trace's spans as OTLP, in end-time order (the order an SDK exports them).
    fn otlp_spans(&self) -> Vec<(&'static Service, Scope, Span)> {
        let service = SERVICES
            .iter()
            .map(|(s, _)| s)
            .find(|s| s.name == self.info.service)
            .expect("known service");
        let mut order: Vec<usize> = (0..self.spans.len()).collect();
        order.sort_by_key(|&i| (self.spans[i].end, std::cmp::Reverse(i)));
        order
            .into_iter()
            .map(|i| {
                let d = &self.spans[i];
                let span = Span {
                    trace_id: self.info.trace_id.to_vec(),
                    span_id: d.id.to_vec(),
                    parent_span_id: d
                        .parent
                        .map(|p| self.spans[p].id.to_vec())
                        .unwrap_or_default(),
                    flags: 0x100 | 0x01,
                    name: d.name.clone(),
                    kind: d.kind as i32,
                    start_time_unix_nano: self.base + d.start,
                    end_time_unix_nano: self.base + d.end,
                    attributes: d.attrs.clone(),
                    events: d
                        .events
                        .iter()
                        .map(|e| Event {
                            time_unix_nano: self.base + e.time_unix_nano,
                            ..e.clone()
                        })
                        .collect(),
                    status: d.status.clone(),
                    ..Default::default()
                };
                (service, d.scope, span)
            })
            .collect()
    }
}

fn build_request(spans: Vec<(&'static Service, Scope, Span)>) -> ExportTraceServiceRequest {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    let mut services: Vec<&'static str> = Vec::new();
    for (service, scope, span) in spans {
        let ri = match services.iter().position(|s| *s == service.name) {
            Some(i) => i,
            None => {
                services.push(service.name);
                resource_spans.push(ResourceSpans {
                    resource: Some(service.resource()),
                    scope_spans: Vec::new(),
                    schema_url: "https://opentelemetry.io/schemas/1.37.0".into(),
                });
                resource_spans.len() - 1
            }
        };
        let rs = &mut resource_spans[ri];
        let si = match rs
            .scope_spans
            .iter()
            .position(|ss| ss.scope.as_ref().is_some_and(|s| s.name == scope.0))
        {
            Some(i) => i,
            None => {
                rs.scope_spans.push(ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope.0.into(),
                        version: scope.1.into(),
                        ..Default::default()
                    }),
                    spans: Vec::new(),
                    schema_url: String::new(),
                });
                rs.scope_spans.len() - 1
            }
        };
        rs.scope_spans[si].spans.push(span);
    }
    ExportTraceServiceRequest { resource_spans }
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn str_array(items: &[&str]) -> Value {
    Value::ArrayValue(ArrayValue {
        values: items
            .iter()
            .map(|s| AnyValue {
                value: Some(Value::StringValue((*s).to_string())),
            })
            .collect(),
    })
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn nonzero_id<const N: usize>(rng: &mut StdRng) -> [u8; N] {
    loop {
        let id: [u8; N] = rng.random();
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

fn weighted<'a, T>(rng: &mut StdRng, items: &'a [(T, u32)]) -> &'a T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (item, w) in items {
        if pick < *w {
            return item;
        }
        pick -= w;
    }
    &items[items.len() - 1].0
}

fn round_down_128(n: u64) -> u64 {
    n / 128 * 128
}

// ---------------------------------------------------------------------------------------
// Catalogue: services, users, models, prompts, tools, content

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Rag,
    Agent,
    MultiAgent,
    Chat,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Rag => "rag",
            Scenario::Agent => "agent",
            Scenario::MultiAgent => "multi_agent",
            Scenario::Chat => "chat",
        }
    }
}

/// Attribute convention a trace is written in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Conv {
    OpenInference,
    GenAi,
    OpenLlmetry,
}

struct Service {
    name: &'static str,
    version: &'static str,
    /// Scope of OpenInference spans (the instrumented framework).
    oi_scope: Scope,
    /// Scenario weights within this service. With the service weights below they give
    /// rag 40%, agent 35%, multi_agent 15%, chat 10% overall.
    scenarios: &'static [(Scenario, u32)],
    rag_prompt: &'static Prompt,
    agent_prompt: &'static Prompt,
    chat_prompt: &'static Prompt,
    agent_tasks: &'static [Task],
}

impl Service {
    fn prompt(&self, scenario: Scenario) -> &'static Prompt {
        match scenario {
            Scenario::Rag => self.rag_prompt,
            Scenario::Agent | Scenario::MultiAgent => self.agent_prompt,
            Scenario::Chat => self.chat_prompt,
        }
    }

    fn resource(&self) -> Resource {
        Resource {
            attributes: vec![
                kv("service.name", Value::StringValue(self.name.into())),
                kv("service.version", Value::StringValue(self.version.into())),
                kv("service.namespace", Value::StringValue("acme".into())),
                kv(
                    "deployment.environment.name",
                    Value::StringValue("dev".into()),
                ),
                kv(
                    "telemetry.sdk.name",
                    Value::StringValue("opentelemetry".into()),
                ),
                kv(
                    "telemetry.sdk.language",
                    Value::StringValue("python".into()),
                ),
                kv("telemetry.sdk.version", Value::StringValue("1.38.0".into())),
            ],
            ..Default::default()
        }
    }
}

// Service weights: docs-search 35%, support-bot 40%, research-agent 25%.
static SERVICES: &[(Service, u32)] = &[
    (
        Service {
            name: "docs-search",
            version: "0.9.3",
            oi_scope: ("openinference.instrumentation.llama_index", "4.3.1"),
            scenarios: &[(Scenario::Rag, 1)],
            rag_prompt: &DOCS_QA,
            agent_prompt: &SUPPORT_AGENT,
            chat_prompt: &SUPPORT_CHAT,
            agent_tasks: SUPPORT_TASKS,
        },
        35,
    ),
    (
        Service {
            name: "support-bot",
            version: "2.14.1",
            oi_scope: ("openinference.instrumentation.langchain", "0.1.51"),
            scenarios: &[
                (Scenario::Rag, 5),
                (Scenario::Agent, 25),
                (Scenario::Chat, 10),
            ],
            rag_prompt: &SUPPORT_KB,
            agent_prompt: &SUPPORT_AGENT,
            chat_prompt: &SUPPORT_CHAT,
            agent_tasks: SUPPORT_TASKS,
        },
        40,
    ),
    (
        Service {
            name: "research-agent",
            version: "1.3.0",
            oi_scope: ("openinference.instrumentation.openai", "0.1.30"),
            scenarios: &[(Scenario::Agent, 10), (Scenario::MultiAgent, 15)],
            rag_prompt: &DOCS_QA,
            agent_prompt: &RESEARCH_PLANNER,
            chat_prompt: &SUPPORT_CHAT,
            agent_tasks: RESEARCH_TASKS,
        },
        25,
    ),
];

static USERS: &[(&str, u32)] = &[
    ("u-1042", 22),
    ("u-1187", 18),
    ("u-2203", 15),
    ("u-2291", 14),
    ("u-3075", 12),
    ("u-3310", 10),
    ("u-4128", 9),
];

struct Model {
    /// Requested model id (alias).
    name: &'static str,
    /// Model id the provider reports back.
    response: &'static str,
    provider: &'static str,
    ttft_ms: (u64, u64),
    ms_per_token: f64,
    reasoning: bool,
}

static GPT_4O: Model = Model {
    name: "gpt-4o",
    response: "gpt-4o-2024-08-06",
    provider: "openai",
    ttft_ms: (300, 700),
    ms_per_token: 10.0,
    reasoning: false,
};
static GPT_4O_MINI: Model = Model {
    name: "gpt-4o-mini",
    response: "gpt-4o-mini-2024-07-18",
    provider: "openai",
    ttft_ms: (200, 450),
    ms_per_token: 6.0,
    reasoning: false,
};
static CLAUDE_SONNET: Model = Model {
    name: "claude-sonnet-4-5",
    response: "claude-sonnet-4-5-20250929",
    provider: "anthropic",
    ttft_ms: (400, 900),
    ms_per_token: 12.0,
    reasoning: false,
};
static O4_MINI: Model = Model {
    name: "o4-mini",
    response: "o4-mini-2025-04-16",
    provider: "openai",
    ttft_ms: (300, 600),
    ms_per_token: 5.0,
    reasoning: true,
};
static CLAUDE_OPUS: Model = Model {
    name: "claude-opus-4-1",
    response: "claude-opus-4-1-20250805",
    provider: "anthropic",
    ttft_ms: (1500, 3000),
    ms_per_token: 25.0,
    reasoning: false,
};
static O1: Model = Model {
    name: "o1",
    response: "o1-2024-12-17",
    provider: "openai",
    ttft_ms: (2000, 4000),
    ms_per_token: 20.0,
    reasoning: true,
};

struct PromptVersion {
    version: &'static str,
    model: &'static Model,
    /// Documents kept after reranking (RAG prompts).
    top_k: usize,
    in_mult: f64,
    out_mult: f64,
    /// The provider's prompt cache is used (cached input tokens on most calls).
    cache: bool,
    system: &'static str,
}

struct Prompt {
    name: &'static str,
    versions: &'static [PromptVersion],
}

static DOCS_QA: Prompt = Prompt {
    name: "docs-qa",
    versions: &[
        PromptVersion {
            version: "v1",
            model: &GPT_4O_MINI,
            top_k: 3,
            in_mult: 1.0,
            out_mult: 1.0,
            cache: false,
            system: "You are the Acme Cloud documentation assistant. Answer the question using only the context below. If the answer is not in the context, say you don't know.",
        },
        PromptVersion {
            version: "v2",
            model: &GPT_4O,
            top_k: 5,
            in_mult: 1.6,
            out_mult: 1.5,
            cache: false,
            system: "You are the Acme Cloud documentation assistant. Answer the question using only the numbered context passages below. Cite every claim with the passage number in square brackets, e.g. [2]. Prefer step-by-step instructions when the user asks how to do something, include the exact setting or CLI flag names, and mention plan limits when they apply. If the passages do not contain the answer, say so and suggest the closest relevant page.",
        },
        PromptVersion {
            version: "v3",
            model: &CLAUDE_SONNET,
            top_k: 4,
            in_mult: 1.4,
            out_mult: 1.1,
            cache: true,
            system: "You are the Acme Cloud documentation assistant. Answer from the numbered passages only and cite them like [1]. Keep answers under 120 words unless the user asks for detail. If the passages do not answer the question, say so.",
        },
    ],
};

static SUPPORT_KB: Prompt = Prompt {
    name: "support-kb-answer",
    versions: &[
        PromptVersion {
            version: "v1",
            model: &GPT_4O_MINI,
            top_k: 3,
            in_mult: 1.0,
            out_mult: 1.0,
            cache: false,
            system: "You are Acme's friendly support assistant. Use the knowledge base excerpts to answer the customer. Be concise and polite.",
        },
        PromptVersion {
            version: "v2",
            model: &CLAUDE_SONNET,
            top_k: 4,
            in_mult: 1.3,
            out_mult: 1.2,
            cache: true,
            system: "You are Acme's support assistant. Answer using the knowledge base excerpts, cite them like [1], and end with one follow-up question if the customer's issue may not be fully solved. Never promise refunds or credits; offer to open a ticket instead.",
        },
    ],
};

static SUPPORT_CHAT: Prompt = Prompt {
    name: "support-chat",
    versions: &[
        PromptVersion {
            version: "v1",
            model: &GPT_4O_MINI,
            top_k: 0,
            in_mult: 1.0,
            out_mult: 1.0,
            cache: false,
            system: "You are Acme's support assistant. Answer billing and account questions briefly.",
        },
        PromptVersion {
            version: "v2",
            model: &GPT_4O,
            top_k: 0,
            in_mult: 1.3,
            out_mult: 1.6,
            cache: false,
            system: "You are Acme's support assistant. Answer billing and account questions in a warm, detailed tone. Explain the reasoning behind policies, list the exact steps in the dashboard, and offer relevant upgrades when they would help the customer.",
        },
        PromptVersion {
            version: "v3",
            model: &GPT_4O_MINI,
            top_k: 0,
            in_mult: 2.4,
            out_mult: 0.8,
            cache: true,
            system: "You are Acme's support assistant. Answer billing and account questions in at most three sentences. Examples:\nQ: How do I change my plan? A: Go to Settings > Billing > Change plan; changes apply immediately and are prorated.\nQ: Where are my invoices? A: Settings > Billing > Invoices; each one can be downloaded as PDF.\nQ: Can I pay by bank transfer? A: Yes, on annual Team and Enterprise plans; contact billing@acme.example.",
        },
    ],
};

static SUPPORT_AGENT: Prompt = Prompt {
    name: "support-agent",
    versions: &[
        PromptVersion {
            version: "v1",
            model: &GPT_4O,
            top_k: 0,
            in_mult: 1.0,
            out_mult: 1.0,
            cache: false,
            system: "You are Acme's order support agent. Use the tools to look up orders, shipments and the knowledge base. Only issue refunds for duplicate charges or lost parcels. Reply to the customer in plain language once you have the facts.",
        },
        PromptVersion {
            version: "v2",
            model: &O4_MINI,
            top_k: 0,
            in_mult: 1.2,
            out_mult: 1.0,
            cache: true,
            system: "You are Acme's order support agent. Think step by step about which tool answers the customer's question. Always verify the order before acting on it, only issue refunds for duplicate charges or lost parcels, and open a ticket for anything you cannot resolve. Reply in plain language with the facts you found.",
        },
    ],
};

static RESEARCH_PLANNER: Prompt = Prompt {
    name: "research-planner",
    versions: &[
        PromptVersion {
            version: "v1",
            model: &GPT_4O,
            top_k: 0,
            in_mult: 1.0,
            out_mult: 1.0,
            cache: false,
            system: "You are a research assistant. Break the task into steps, use the tools to gather evidence, and write a short, sourced answer.",
        },
        PromptVersion {
            version: "v2",
            model: &O4_MINI,
            top_k: 0,
            in_mult: 1.1,
            out_mult: 1.3,
            cache: false,
            system: "You are a careful research assistant. Plan before acting, gather evidence with the tools, cross-check numbers, and write a sourced answer with a confidence level for each claim.",
        },
        PromptVersion {
            version: "v3",
            model: &CLAUDE_SONNET,
            top_k: 0,
            in_mult: 1.5,
            out_mult: 1.2,
            cache: true,
            system: "You are a research assistant working for an analyst team. Plan the work, delegate or use tools to gather evidence, cross-check every number against a second source, and write a structured brief: summary, findings with sources, open questions. Be explicit about uncertainty.",
        },
    ],
};

struct Tool {
    name: &'static str,
    description: &'static str,
    schema: &'static str,
    ms: (u64, u64),
}

static TOOLS: &[Tool] = &[
    Tool {
        name: "web_search",
        description: "Search the web and return the top results with snippets.",
        schema: r#"{"type":"object","properties":{"query":{"type":"string"}},"required":["query"]}"#,
        ms: (300, 1500),
    },
    Tool {
        name: "fetch_url",
        description: "Fetch a web page and return its main text.",
        schema: r#"{"type":"object","properties":{"url":{"type":"string"}},"required":["url"]}"#,
        ms: (200, 2000),
    },
    Tool {
        name: "get_weather",
        description: "Current weather and 3-day forecast for a city.",
        schema: r#"{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city"]}"#,
        ms: (80, 400),
    },
    Tool {
        name: "sql_query",
        description: "Run a read-only SQL query against the analytics warehouse.",
        schema: r#"{"type":"object","properties":{"query":{"type":"string"}},"required":["query"]}"#,
        ms: (20, 800),
    },
    Tool {
        name: "calculator",
        description: "Evaluate an arithmetic expression.",
        schema: r#"{"type":"object","properties":{"expression":{"type":"string"}},"required":["expression"]}"#,
        ms: (1, 5),
    },
    Tool {
        name: "lookup_order",
        description: "Look up an order by id: items, payment and fulfilment status.",
        schema: r#"{"type":"object","properties":{"order_id":{"type":"string"}},"required":["order_id"]}"#,
        ms: (40, 250),
    },
    Tool {
        name: "track_shipment",
        description: "Carrier tracking events for a shipment.",
        schema: r#"{"type":"object","properties":{"tracking_number":{"type":"string"}},"required":["tracking_number"]}"#,
        ms: (150, 900),
    },
    Tool {
        name: "issue_refund",
        description: "Refund a payment, fully or partially.",
        schema: r#"{"type":"object","properties":{"payment_id":{"type":"string"},"amount":{"type":"number"},"reason":{"type":"string"}},"required":["payment_id","amount","reason"]}"#,
        ms: (200, 700),
    },
    Tool {
        name: "search_kb",
        description: "Search the support knowledge base.",
        schema: r#"{"type":"object","properties":{"query":{"type":"string"}},"required":["query"]}"#,
        ms: (60, 300),
    },
    Tool {
        name: "create_ticket",
        description: "Open a ticket for the human support team.",
        schema: r#"{"type":"object","properties":{"subject":{"type":"string"},"priority":{"type":"string"}},"required":["subject"]}"#,
        ms: (100, 400),
    },
];

fn tool(name: &str) -> &'static Tool {
    TOOLS
        .iter()
        .find(|t| t.name == name)
        .expect("tool in catalogue")
}

struct Step {
    tool: &'static str,
    args: &'static str,
    result: &'static str,
}

struct Task {
    question: &'static str,
    steps: &'static [Step],
    answer: &'static str,
}

static SUPPORT_TASKS: &[Task] = &[
    Task {
        question: "Where is my order A-10293? It was supposed to arrive on Tuesday.",
        steps: &[
            Step {
                tool: "lookup_order",
                args: r#"{"order_id":"A-10293"}"#,
                result: r#"{"order_id":"A-10293","status":"shipped","items":[{"sku":"KB-204","name":"Mechanical keyboard","qty":1}],"tracking_number":"JD014600006281234567","carrier":"DHL","promised_by":"Tuesday"}"#,
            },
            Step {
                tool: "track_shipment",
                args: r#"{"tracking_number":"JD014600006281234567"}"#,
                result: r#"{"events":[{"at":"Mon 08:12","where":"Leipzig hub","what":"departed"},{"at":"Tue 19:40","where":"Oslo terminal","what":"delayed: weather"}],"eta":"Thursday"}"#,
            },
            Step {
                tool: "get_weather",
                args: r#"{"city":"Oslo","days":2}"#,
                result: r#"{"city":"Oslo","now":{"temp_c":-6,"conditions":"heavy snow"},"forecast":[{"day":"Wed","conditions":"snow"},{"day":"Thu","conditions":"clear"}]}"#,
            },
        ],
        answer: "Your order A-10293 (mechanical keyboard) left our Leipzig hub on Monday and reached the Oslo terminal on Tuesday evening, where DHL held it because of heavy snow. The new estimated delivery is Thursday. You can follow it with tracking number JD014600006281234567. Sorry for the delay!",
    },
    Task {
        question: "I was charged twice for order B-55812, can you refund one of the charges?",
        steps: &[
            Step {
                tool: "lookup_order",
                args: r#"{"order_id":"B-55812"}"#,
                result: r#"{"order_id":"B-55812","total":89.90,"currency":"EUR","payments":[{"id":"pay_7Hq2","amount":89.90,"status":"captured"},{"id":"pay_7Hq3","amount":89.90,"status":"captured"}]}"#,
            },
            Step {
                tool: "issue_refund",
                args: r#"{"payment_id":"pay_7Hq3","amount":89.90,"reason":"duplicate charge"}"#,
                result: r#"{"refund_id":"re_91Kd","status":"pending","expected_in_days":5}"#,
            },
        ],
        answer: "You're right, order B-55812 was captured twice (2 x 89.90 EUR). I've refunded the duplicate payment; refund re_91Kd is on its way and should appear on your statement within 5 business days.",
    },
    Task {
        question: "How much would we save by moving our 14 seats from monthly to annual billing?",
        steps: &[
            Step {
                tool: "search_kb",
                args: r#"{"query":"annual billing discount team plan"}"#,
                result: r#"[{"title":"Plans and pricing","snippet":"Team plan: 39 USD per seat per month, billed monthly. Annual billing saves 20%."}]"#,
            },
            Step {
                tool: "calculator",
                args: r#"{"expression":"14 * 39 * 12 * 0.20"}"#,
                result: "1310.4",
            },
        ],
        answer: "On the Team plan you pay 39 USD per seat per month. Annual billing is 20% cheaper, so for 14 seats you would save about 1,310 USD per year (14 x 39 x 12 x 20%). You can switch under Settings > Billing > Change billing period.",
    },
    Task {
        question: "My package to Bergen hasn't moved in four days and nobody answers the phone. I want a ticket opened.",
        steps: &[
            Step {
                tool: "lookup_order",
                args: r#"{"order_id":"C-20417"}"#,
                result: r#"{"order_id":"C-20417","status":"shipped","tracking_number":"00340434161094042557","carrier":"PostNord"}"#,
            },
            Step {
                tool: "track_shipment",
                args: r#"{"tracking_number":"00340434161094042557"}"#,
                result: r#"{"events":[{"at":"4 days ago","where":"Bergen depot","what":"arrived"}],"eta":null}"#,
            },
            Step {
                tool: "create_ticket",
                args: r#"{"subject":"C-20417 stuck at PostNord Bergen depot for 4 days","priority":"high"}"#,
                result: r#"{"ticket_id":"T-88213","queue":"logistics","sla_hours":24}"#,
            },
        ],
        answer: "I'm sorry about this. Your parcel (order C-20417) has been sitting at PostNord's Bergen depot for four days without an update. I've opened high-priority ticket T-88213 with our logistics team; they will contact PostNord and get back to you within 24 hours.",
    },
];

static RESEARCH_TASKS: &[Task] = &[
    Task {
        question: "Compare the monthly active users of our top 3 customers this quarter with last quarter.",
        steps: &[
            Step {
                tool: "sql_query",
                args: r#"{"query":"SELECT account, quarter, avg(mau) AS mau FROM usage_monthly WHERE quarter IN ('2025Q2','2025Q3') GROUP BY 1, 2 ORDER BY mau DESC LIMIT 6"}"#,
                result: r#"[["Globex","2025Q3",48210],["Globex","2025Q2",41890],["Initech","2025Q3",30550],["Initech","2025Q2",31920],["Umbrella","2025Q3",22140],["Umbrella","2025Q2",17400]]"#,
            },
            Step {
                tool: "calculator",
                args: r#"{"expression":"(48210/41890 - 1) * 100"}"#,
                result: "15.087",
            },
        ],
        answer: "Quarter over quarter: Globex grew 15.1% (41,890 to 48,210 MAU), Umbrella grew 27.2% (17,400 to 22,140) and Initech shrank 4.3% (31,920 to 30,550). Initech's dip is worth a look by its account manager.",
    },
    Task {
        question: "Summarize recent research on evaluating retrieval-augmented generation.",
        steps: &[
            Step {
                tool: "web_search",
                args: r#"{"query":"RAG evaluation benchmark faithfulness context relevance 2025"}"#,
                result: r#"[{"title":"RAGAS: Automated Evaluation of Retrieval Augmented Generation","url":"https://arxiv.org/abs/2309.15217"},{"title":"ARES: An Automated Evaluation Framework for RAG Systems","url":"https://arxiv.org/abs/2311.09476"}]"#,
            },
            Step {
                tool: "fetch_url",
                args: r#"{"url":"https://arxiv.org/abs/2309.15217"}"#,
                result: "RAGAS proposes reference-free metrics for RAG pipelines: faithfulness (are claims supported by the retrieved context), answer relevance, and context relevance, computed with an LLM judge.",
            },
        ],
        answer: "Most recent work evaluates RAG along three axes: faithfulness of the answer to the retrieved context, relevance of the answer, and relevance of the retrieved context. RAGAS computes these reference-free with an LLM judge; ARES trains lightweight judges and calibrates them with a small human-labelled set.",
    },
    Task {
        question: "What's the weather risk for our outdoor event in Lisbon next Saturday?",
        steps: &[
            Step {
                tool: "get_weather",
                args: r#"{"city":"Lisbon","days":3}"#,
                result: r#"{"city":"Lisbon","forecast":[{"day":"Sat","conditions":"showers","rain_mm":6,"wind_kmh":28}]}"#,
            },
            Step {
                tool: "web_search",
                args: r#"{"query":"Lisbon indoor event venues 200 people Alfama"}"#,
                result: r#"[{"title":"Armazém 16 - event space","url":"https://example.org/armazem16"},{"title":"Palácio Chiado","url":"https://example.org/chiado"}]"#,
            },
        ],
        answer: "Saturday in Lisbon looks wet: showers with about 6 mm of rain and gusts near 28 km/h. I'd book a fallback: Armazém 16 and Palácio Chiado both host around 200 guests.",
    },
    Task {
        question: "Estimate the monthly cost of 2M gpt-4o-mini calls with 1,500 input and 300 output tokens each.",
        steps: &[
            Step {
                tool: "web_search",
                args: r#"{"query":"gpt-4o-mini price per million tokens"}"#,
                result: r#"[{"title":"OpenAI API pricing","snippet":"gpt-4o-mini: $0.15 / 1M input tokens, $0.60 / 1M output tokens"}]"#,
            },
            Step {
                tool: "calculator",
                args: r#"{"expression":"2000000 * (1500 * 0.15 + 300 * 0.60) / 1000000"}"#,
                result: "810",
            },
        ],
        answer: "About 810 USD per month: 3B input tokens at $0.15/M (450 USD) plus 600M output tokens at $0.60/M (360 USD), before any prompt-cache discount.",
    },
];

struct SubAgent {
    name: &'static str,
    description: &'static str,
    steps: &'static [Step],
    summary: &'static str,
}

static SUB_AGENTS: &[SubAgent] = &[
    SubAgent {
        name: "web-researcher",
        description: "Finds and reads public sources.",
        steps: &[
            Step {
                tool: "web_search",
                args: r#"{"query":"open source LLM observability tools comparison 2025"}"#,
                result: r#"[{"title":"Langfuse vs Phoenix vs Helicone","url":"https://example.org/llm-obs-2025"},{"title":"OpenTelemetry GenAI semantic conventions","url":"https://opentelemetry.io/docs/specs/semconv/gen-ai/"}]"#,
            },
            Step {
                tool: "fetch_url",
                args: r#"{"url":"https://example.org/llm-obs-2025"}"#,
                result: "The comparison covers tracing, evaluations, prompt management and cost tracking. Most tools now accept OTLP; differences are in self-hosting, sampling and query speed at scale.",
            },
        ],
        summary: "Public sources agree the market converged on OTLP ingestion; differentiation is self-hosting, tail sampling and query speed.",
    },
    SubAgent {
        name: "data-analyst",
        description: "Queries the warehouse and computes figures.",
        steps: &[
            Step {
                tool: "sql_query",
                args: r#"{"query":"SELECT date_trunc('month', ts) AS m, sum(cost_usd) FROM llm_calls GROUP BY 1 ORDER BY 1 DESC LIMIT 3"}"#,
                result: r#"[["2025-09",18420.55],["2025-08",15210.10],["2025-07",12980.72]]"#,
            },
            Step {
                tool: "calculator",
                args: r#"{"expression":"(18420.55 / 12980.72) ^ (1/2) - 1"}"#,
                result: "0.1912",
            },
        ],
        summary: "Our own LLM spend grew from 12,981 to 18,421 USD in two months, about 19% per month.",
    },
    SubAgent {
        name: "paper-analyst",
        description: "Reads papers and extracts methods and results.",
        steps: &[
            Step {
                tool: "web_search",
                args: r#"{"query":"arxiv tail sampling distributed tracing cost"}"#,
                result: r#"[{"title":"Sifter: Scalable Sampling for Distributed Traces","url":"https://arxiv.org/abs/1909.12345"}]"#,
            },
            Step {
                tool: "fetch_url",
                args: r#"{"url":"https://arxiv.org/abs/1909.12345"}"#,
                result: "Sifter biases sampling towards uncommon traces, keeping anomalies while dropping most of the repetitive ones.",
            },
        ],
        summary: "Literature supports biased tail sampling: keep rare and anomalous traces, drop repetitive ones.",
    },
    SubAgent {
        name: "fact-checker",
        description: "Cross-checks claims against a second source.",
        steps: &[Step {
            tool: "web_search",
            args: r#"{"query":"OpenTelemetry gen_ai semantic conventions status"}"#,
            result: r#"[{"title":"Semantic conventions for generative AI systems","snippet":"Status: Development"}]"#,
        }],
        summary: "Confirmed: the OpenTelemetry GenAI conventions are still in Development status, so attribute names may change.",
    },
];

static MULTI_TASKS: &[(&str, &str)] = &[
    (
        "Write a one-page market brief on LLM observability tools and what it would cost us to run one.",
        "Brief: the LLM observability market has converged on OTLP ingestion, so switching costs are low. Tools differ in self-hosting, tail sampling and query speed. Our LLM spend grows about 19% a month, which makes cost attribution per prompt version the most valuable feature for us. Caveat: the GenAI semantic conventions are still in development.",
    ),
    (
        "Should we add tail sampling to our tracing pipeline? Give evidence and a recommendation.",
        "Recommendation: yes. Research and practice both favour biased tail sampling that keeps errors, slow and expensive traces and samples the rest. With spend growing ~19% a month, keeping every expensive trace while sampling 10% of the rest cuts storage roughly 8x without losing the traces we investigate.",
    ),
];

struct Doc {
    id: &'static str,
    title: &'static str,
    url: &'static str,
    content: &'static str,
}

static DOCS: &[Doc] = &[
    Doc {
        id: "kb-api-keys",
        title: "Rotating API keys",
        url: "https://docs.acme.example/security/api-keys",
        content: "Create the new key under Settings > API keys before revoking the old one. Both keys work in parallel for up to 24 hours, so you can deploy the new key without downtime. Revoked keys stop working within 60 seconds.",
    },
    Doc {
        id: "kb-rate-limits",
        title: "Rate limits",
        url: "https://docs.acme.example/api/rate-limits",
        content: "The Free plan allows 60 requests per minute and 10,000 per day. Team allows 600 per minute. Requests over the limit get HTTP 429 with a Retry-After header giving the seconds to wait.",
    },
    Doc {
        id: "kb-webhooks",
        title: "Webhook signatures",
        url: "https://docs.acme.example/webhooks/signatures",
        content: "Every webhook carries an Acme-Signature header, an HMAC-SHA256 of the raw body with your endpoint secret. A 401 from your endpoint usually means the body was parsed or re-serialized before the signature was checked.",
    },
    Doc {
        id: "kb-sso",
        title: "Single sign-on (SAML and OIDC)",
        url: "https://docs.acme.example/admin/sso",
        content: "Team and Enterprise plans support SAML 2.0 and OIDC. Okta, Entra ID and Google Workspace have guided setups. Enforce SSO under Admin > Security to disable password logins for your domain.",
    },
    Doc {
        id: "kb-export",
        title: "Exporting your data",
        url: "https://docs.acme.example/data/export",
        content: "Admins can export all workspace data as CSV or Parquet from Admin > Data > Export. Exports over 1 GB are split into parts and delivered by email as signed links valid for 7 days.",
    },
    Doc {
        id: "kb-regions",
        title: "Regions and data residency",
        url: "https://docs.acme.example/platform/regions",
        content: "Workspaces can be hosted in us-east, eu-central (Frankfurt) or eu-west (Dublin). EU regions keep all customer data, backups included, inside the EU. The region is chosen at creation and cannot be changed later.",
    },
    Doc {
        id: "kb-retries",
        title: "Retries and idempotency",
        url: "https://docs.acme.example/api/retries",
        content: "Retry 429 and 5xx responses with exponential backoff starting at 1 second, with jitter, up to 5 attempts. Send an Idempotency-Key header on POST requests so that retried requests are not applied twice.",
    },
    Doc {
        id: "kb-errors",
        title: "Error codes",
        url: "https://docs.acme.example/api/errors",
        content: "401 means the key is missing or revoked, 403 that the key lacks the scope, 429 that you hit a rate limit, 503 that the service is briefly unavailable. Every error body has a request_id to quote to support.",
    },
    Doc {
        id: "kb-sdk",
        title: "Installing the Python SDK",
        url: "https://docs.acme.example/sdk/python",
        content: "pip install acme-sdk. Behind a corporate proxy set HTTPS_PROXY before installing and when running; the SDK honours the standard proxy variables and a custom CA bundle through REQUESTS_CA_BUNDLE.",
    },
    Doc {
        id: "kb-billing",
        title: "Plans and billing",
        url: "https://docs.acme.example/billing/plans",
        content: "Team costs 39 USD per seat per month, or 20% less billed annually. Plan changes are prorated to the day. Invoices are under Settings > Billing > Invoices.",
    },
    Doc {
        id: "kb-audit",
        title: "Audit log",
        url: "https://docs.acme.example/security/audit-log",
        content: "The audit log records key creation and revocation, logins, role changes and exports, with actor, IP address and time. It is kept for 1 year on Enterprise and 90 days on Team.",
    },
    Doc {
        id: "kb-roles",
        title: "Roles and permissions",
        url: "https://docs.acme.example/admin/roles",
        content: "Workspaces have Owner, Admin, Member and Viewer roles. Only Owners manage billing; Admins manage members, SSO and keys; Members create resources; Viewers have read-only access.",
    },
];

struct Query {
    question: &'static str,
    relevant: &'static [&'static str],
    answer: &'static str,
}

static QUERIES: &[Query] = &[
    Query {
        question: "How do I rotate an API key without downtime?",
        relevant: &["kb-api-keys", "kb-audit"],
        answer: "Create the new key under Settings > API keys first, deploy it, then revoke the old one: both keys stay valid in parallel for up to 24 hours, so there is no downtime [1]. The rotation is recorded in the audit log [2].",
    },
    Query {
        question: "What are the rate limits on the free plan?",
        relevant: &["kb-rate-limits", "kb-billing"],
        answer: "The Free plan allows 60 requests per minute and 10,000 per day [1]. Above that you get HTTP 429 with a Retry-After header. Team raises the limit to 600 requests per minute [1][2].",
    },
    Query {
        question: "Why does my webhook endpoint return 401?",
        relevant: &["kb-webhooks", "kb-errors"],
        answer: "Most likely the signature check fails because your framework parsed the JSON body before verifying it. Compute the HMAC-SHA256 over the raw request body with your endpoint secret and compare it with the Acme-Signature header [1].",
    },
    Query {
        question: "Can we use Okta for SSO and turn off passwords?",
        relevant: &["kb-sso", "kb-roles"],
        answer: "Yes. Okta has a guided SAML/OIDC setup on Team and Enterprise plans, and once it works you can enforce SSO under Admin > Security, which disables password logins for your domain [1]. Only Admins and Owners can change this [2].",
    },
    Query {
        question: "How do I export all our data as CSV?",
        relevant: &["kb-export"],
        answer: "An admin can export everything from Admin > Data > Export as CSV (or Parquet). Exports larger than 1 GB are split into parts and emailed as signed links valid for 7 days [1].",
    },
    Query {
        question: "Which regions keep data inside the EU?",
        relevant: &["kb-regions"],
        answer: "eu-central (Frankfurt) and eu-west (Dublin) keep all customer data, including backups, inside the EU [1]. Note that the region is picked when the workspace is created and can't be changed later.",
    },
    Query {
        question: "How should my client retry on 503 errors?",
        relevant: &["kb-retries", "kb-errors"],
        answer: "Retry with exponential backoff starting at 1 second plus jitter, up to 5 attempts [1], and send an Idempotency-Key header on POSTs so retries are not applied twice [1]. A 503 means the service is briefly unavailable [2].",
    },
    Query {
        question: "pip install of the Python SDK fails behind our corporate proxy",
        relevant: &["kb-sdk"],
        answer: "Set HTTPS_PROXY before running pip install acme-sdk, and keep it set at runtime; if your proxy re-signs TLS, point REQUESTS_CA_BUNDLE to your corporate CA bundle [1].",
    },
];

static CHATS: &[(&str, &str)] = &[
    (
        "Can I change the email address on my account?",
        "Yes. Go to Settings > Profile > Email, enter the new address and confirm the link we send to it. Your login and invoices switch to the new address once it's confirmed.",
    ),
    (
        "Do you offer a discount for non-profits?",
        "We do: registered non-profits get 50% off the Team plan. Send your registration document to billing@acme.example and we'll apply the discount to your next invoice.",
    ),
    (
        "What's the difference between the Team and Enterprise plans?",
        "Team includes SSO, 600 API requests per minute and a 90-day audit log. Enterprise adds SAML-enforced provisioning, a 1-year audit log, a 99.95% SLA and a named account manager.",
    ),
    (
        "My invoice shows the wrong VAT number, can it be fixed?",
        "Sure. Update the VAT number under Settings > Billing > Tax details; we can reissue past invoices from the last 12 months with the corrected number on request.",
    ),
    (
        "How do I cancel my subscription?",
        "Owners can cancel under Settings > Billing > Cancel plan. You keep access until the end of the current billing period and can export your data at any time before then.",
    ),
    (
        "Is there a limit on the number of projects?",
        "No hard limit on Team and Enterprise. The Free plan includes up to 3 projects; archived projects don't count.",
    ),
];

static ATTACHMENTS: &[&str] = &[
    "Acme_MSA_2025_full.pdf (212 pages)",
    "support_transcripts_q3.jsonl (4,812 conversations)",
    "platform_runbook_v7.md (entire repository docs)",
    "2024_annual_report.pdf (188 pages)",
];

struct Failure {
    message: &'static str,
    etype: &'static str,
    stack: &'static str,
}

static LLM_FAIL_OPENAI: Failure = Failure {
    message: "rate limit exceeded (429)",
    etype: "openai.RateLimitError",
    stack: "Traceback (most recent call last):\n  File \"app/llm.py\", line 88, in complete\n    resp = client.chat.completions.create(**params)\n  File \"openai/_base_client.py\", line 1047, in request\n    raise self._make_status_error_from_response(err.response) from None\nopenai.RateLimitError: Error code: 429 - rate limit exceeded",
};
static LLM_FAIL_ANTHROPIC: Failure = Failure {
    message: "overloaded (529): Anthropic API is temporarily overloaded",
    etype: "anthropic.InternalServerError",
    stack: "Traceback (most recent call last):\n  File \"app/llm.py\", line 102, in complete\n    resp = client.messages.create(**params)\n  File \"anthropic/_base_client.py\", line 1063, in request\n    raise self._make_status_error_from_response(err.response) from None\nanthropic.InternalServerError: Error code: 529 - overloaded_error",
};
static TOOL_TIMEOUT: Failure = Failure {
    message: "tool timeout after 30s",
    etype: "TimeoutError",
    stack: "Traceback (most recent call last):\n  File \"app/tools.py\", line 41, in run_tool\n    return await asyncio.wait_for(fn(**args), timeout=30)\n  File \"asyncio/tasks.py\", line 520, in wait_for\n    raise exceptions.TimeoutError() from exc\nTimeoutError: tool timeout after 30s",
};
static TOOL_HTTP: Failure = Failure {
    message: "upstream returned HTTP 503 Service Unavailable",
    etype: "httpx.HTTPStatusError",
    stack: "Traceback (most recent call last):\n  File \"app/tools.py\", line 57, in call_api\n    resp.raise_for_status()\n  File \"httpx/_models.py\", line 829, in raise_for_status\n    raise HTTPStatusError(message, request=request, response=self)\nhttpx.HTTPStatusError: Server error '503 Service Unavailable'",
};

// ---------------------------------------------------------------------------------------
// Trace construction

struct Draft {
    id: [u8; 8],
    parent: Option<usize>,
    name: String,
    kind: SpanKind,
    /// Relative to the trace start, in ns.
    start: u64,
    end: u64,
    attrs: Vec<KeyValue>,
    /// Times relative to the trace start.
    events: Vec<Event>,
    status: Option<Status>,
    scope: Scope,
    llm: bool,
    input_tokens: u64,
}

#[derive(Clone, Copy)]
struct Plan {
    error: bool,
    slow: bool,
    expensive: bool,
}

#[derive(Clone)]
struct Call {
    id: String,
    name: &'static str,
    args: &'static str,
}

#[derive(Clone)]
struct Msg {
    role: &'static str,
    content: String,
    calls: Vec<Call>,
    call_id: Option<String>,
}

impl Msg {
    fn new(role: &'static str, content: impl Into<String>) -> Msg {
        Msg {
            role,
            content: content.into(),
            calls: Vec::new(),
            call_id: None,
        }
    }

    fn tool_calls(calls: Vec<Call>) -> Msg {
        Msg {
            role: "assistant",
            content: String::new(),
            calls,
            call_id: None,
        }
    }

    fn tool_result(call_id: &str, content: &str) -> Msg {
        Msg {
            role: "tool",
            content: content.to_string(),
            calls: Vec::new(),
            call_id: Some(call_id.to_string()),
        }
    }

    fn chars(&self) -> usize {
        self.content.len()
            + self
                .calls
                .iter()
                .map(|c| c.name.len() + c.args.len())
                .sum::<usize>()
    }
}

/// OpenAI chat-completions shape of messages (OpenInference `input.value`).
fn openai_json(msgs: &[Msg]) -> serde_json::Value {
    serde_json::Value::Array(
        msgs.iter()
            .map(|m| {
                let mut o = json!({"role": m.role, "content": m.content});
                if !m.calls.is_empty() {
                    o["tool_calls"] = m
                        .calls
                        .iter()
                        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.args}}))
                        .collect();
                }
                if let Some(id) = &m.call_id {
                    o["tool_call_id"] = json!(id);
                }
                o
            })
            .collect(),
    )
}

/// OpenTelemetry GenAI shape of messages (`gen_ai.input.messages` / `gen_ai.output.messages`).
fn genai_json(msgs: &[Msg], finish: Option<&str>) -> serde_json::Value {
    serde_json::Value::Array(
        msgs.iter()
            .map(|m| {
                let mut parts = Vec::new();
                if let Some(id) = &m.call_id {
                    parts.push(
                        json!({"type": "tool_call_response", "id": id, "response": m.content}),
                    );
                } else if !m.content.is_empty() {
                    parts.push(json!({"type": "text", "content": m.content}));
                }
                for c in &m.calls {
                    let args: serde_json::Value =
                        serde_json::from_str(c.args).unwrap_or_else(|_| json!(c.args));
                    parts.push(
                        json!({"type": "tool_call", "id": c.id, "name": c.name, "arguments": args}),
                    );
                }
                let mut o = json!({"role": m.role, "parts": parts});
                if let Some(f) = finish {
                    o["finish_reason"] = json!(f);
                }
                o
            })
            .collect(),
    )
}

struct LlmSpec<'a> {
    model: &'static Model,
    input: &'a [Msg],
    output: Msg,
    finish: &'static str,
    /// Attach the trace's prompt (name and version) and use its multipliers.
    prompted: bool,
    slow: bool,
    expensive: bool,
    fail: bool,
    /// Input tokens not shown in the messages: tool definitions, the parts of document
    /// chunks the trace does not show, user profile context.
    extra_in: u64,
}

impl<'a> LlmSpec<'a> {
    fn new(model: &'static Model, input: &'a [Msg], output: Msg, finish: &'static str) -> Self {
        LlmSpec {
            model,
            input,
            output,
            finish,
            prompted: false,
            slow: false,
            expensive: false,
            fail: false,
            extra_in: 0,
        }
    }
}

struct Ctx<'r> {
    rng: &'r mut StdRng,
    conv: Conv,
    service: &'static Service,
    user: &'static str,
    session: String,
    prompt: &'static Prompt,
    pv: &'static PromptVersion,
    plan: Plan,
    spans: Vec<Draft>,
    /// Earlier (question, answer) turns of this session's chats.
    history: Vec<(&'static str, &'static str)>,
}

impl Ctx<'_> {
    // --- primitives -----------------------------------------------------------------

    fn gap(&mut self) -> u64 {
        self.rng.random_range(1..=4) * MS + self.rng.random_range(0..MS)
    }

    fn app_scope(&self) -> Scope {
        match self.conv {
            Conv::OpenInference => self.service.oi_scope,
            Conv::GenAi => ("research_agent", "1.3.0"),
            Conv::OpenLlmetry => ("traceloop.tracer", "0.47.3"),
        }
    }

    fn llm_scope(&self, model: &Model) -> Scope {
        match (self.conv, model.provider) {
            (Conv::OpenInference, _) => self.service.oi_scope,
            (Conv::GenAi, "anthropic") => ("opentelemetry.instrumentation.anthropic", "0.3b0"),
            (Conv::GenAi, _) => ("opentelemetry.instrumentation.openai_v2", "2.1b0"),
            (Conv::OpenLlmetry, "anthropic") => {
                ("opentelemetry.instrumentation.anthropic", "0.47.3")
            }
            (Conv::OpenLlmetry, _) => ("opentelemetry.instrumentation.openai.v1", "0.47.3"),
        }
    }

    fn open(
        &mut self,
        parent: Option<usize>,
        name: impl Into<String>,
        kind: SpanKind,
        start: u64,
        scope: Scope,
    ) -> usize {
        let id = nonzero_id::<8>(self.rng);
        let kind = if parent.is_none() {
            SpanKind::Server
        } else {
            kind
        };
        self.spans.push(Draft {
            id,
            parent,
            name: name.into(),
            kind,
            start,
            end: start,
            attrs: Vec::new(),
            events: Vec::new(),
            status: None,
            scope,
            llm: false,
            input_tokens: 0,
        });
        let idx = self.spans.len() - 1;
        if parent.is_none() || self.conv == Conv::OpenInference {
            self.s(idx, "user.id", self.user);
            let session = self.session.clone();
            self.s(idx, "session.id", &session);
        }
        if self.conv == Conv::OpenLlmetry {
            self.s(idx, "traceloop.association.properties.user_id", self.user);
            let session = self.session.clone();
            self.s(idx, "traceloop.association.properties.session_id", &session);
            let workflow = format!("{}.{}", self.service.name, self.prompt.name);
            self.s(idx, "traceloop.workflow.name", &workflow);
        }
        idx
    }

    fn close(&mut self, idx: usize, end: u64) {
        let span = &mut self.spans[idx];
        span.end = end.max(span.start);
        if span.status.is_none() && self.conv == Conv::OpenInference {
            span.status = Some(Status {
                code: StatusCode::Ok as i32,
                message: String::new(),
            });
        }
    }

    fn fail(&mut self, idx: usize, f: &Failure, at: u64) {
        let span = &mut self.spans[idx];
        span.status = Some(Status {
            code: StatusCode::Error as i32,
            message: f.message.to_string(),
        });
        span.events.push(Event {
            time_unix_nano: at,
            name: "exception".into(),
            attributes: vec![
                kv("exception.type", Value::StringValue(f.etype.into())),
                kv("exception.message", Value::StringValue(f.message.into())),
                kv("exception.stacktrace", Value::StringValue(f.stack.into())),
                kv("exception.escaped", Value::BoolValue(false)),
            ],
            dropped_attributes_count: 0,
        });
    }

    fn s(&mut self, idx: usize, key: &str, v: &str) {
        self.spans[idx]
            .attrs
            .push(kv(key, Value::StringValue(v.to_string())));
    }

    fn int(&mut self, idx: usize, key: &str, v: u64) {
        self.spans[idx].attrs.push(kv(
            key,
            Value::IntValue(i64::try_from(v).unwrap_or(i64::MAX)),
        ));
    }

    fn dbl(&mut self, idx: usize, key: &str, v: f64) {
        self.spans[idx].attrs.push(kv(key, Value::DoubleValue(v)));
    }

    fn flag(&mut self, idx: usize, key: &str, v: bool) {
        self.spans[idx].attrs.push(kv(key, Value::BoolValue(v)));
    }

    fn arr(&mut self, idx: usize, key: &str, v: &[&str]) {
        self.spans[idx].attrs.push(kv(key, str_array(v)));
    }

    fn call_id(&mut self) -> String {
        format!("call_{}", hex(&self.rng.random::<[u8; 9]>()))
    }

    fn root_metadata(&mut self, idx: usize) {
        let channel = *["web", "slack", "api", "mobile"]
            .choose(self.rng)
            .expect("non-empty");
        match self.conv {
            Conv::OpenInference => {
                let meta = json!({"channel": channel, "app_version": self.service.version});
                self.s(idx, "metadata", &meta.to_string());
                self.arr(idx, "tag.tags", &[channel, self.service.name]);
            }
            Conv::OpenLlmetry => {
                self.s(idx, "traceloop.association.properties.channel", channel);
            }
            Conv::GenAi => {
                self.s(idx, "app.channel", channel);
            }
        }
    }

    // --- span kinds -----------------------------------------------------------------

    /// An LLM call. Returns the span index and its end time.
    fn llm(&mut self, parent: Option<usize>, start: u64, spec: LlmSpec<'_>) -> (usize, u64) {
        let mut model = spec.model;
        let mut input: Vec<Msg> = spec.input.to_vec();
        let expensive = spec.expensive && !spec.fail;
        if expensive {
            model = if self.rng.random_bool(0.5) {
                &CLAUDE_OPUS
            } else {
                &O1
            };
            let attachment = *ATTACHMENTS.choose(self.rng).expect("non-empty");
            let note = format!(
                "[attached: {attachment}; full text sent to the model, omitted from the trace]"
            );
            input.insert(input.len().min(1), Msg::new("user", note));
        }
        let (in_mult, out_mult, cache) = if spec.prompted {
            (self.pv.in_mult, self.pv.out_mult, self.pv.cache)
        } else {
            (1.0, 1.0, false)
        };
        let chars: usize = input.iter().map(Msg::chars).sum();
        let mut in_tokens =
            (((chars / 4 + 8 * input.len()) as u64 + spec.extra_in) as f64 * in_mult) as u64;
        let mut out_tokens = ((spec.output.chars() / 4 + 6) as f64
            * out_mult
            * self.rng.random_range(0.9..1.3)) as u64;
        let mut reasoning = 0;
        if expensive {
            in_tokens = self.rng.random_range(100_000..190_000);
            out_tokens = self.rng.random_range(900..3_000);
        }
        if model.reasoning {
            reasoning = if expensive {
                self.rng.random_range(2_000..8_000)
            } else {
                self.rng.random_range(96..640)
            };
            out_tokens += reasoning;
        }
        let cache_read = if in_tokens >= 1024 && (cache || self.rng.random_bool(0.3)) && !expensive
        {
            let share = if cache {
                self.rng.random_range(0.55..0.85)
            } else {
                self.rng.random_range(0.2..0.6)
            };
            round_down_128((in_tokens as f64 * share) as u64)
        } else {
            0
        };
        let duration_ms = if spec.fail {
            self.rng.random_range(150..900)
        } else if spec.slow {
            self.rng.random_range(15_000..40_000)
        } else if expensive {
            self.rng.random_range(6_000..14_000)
        } else {
            let ttft = self.rng.random_range(model.ttft_ms.0..=model.ttft_ms.1) as f64;
            let gen_ms = out_tokens as f64 * model.ms_per_token * self.rng.random_range(0.8..1.2);
            let prefill = (in_tokens - cache_read) as f64 * 0.03;
            (ttft + gen_ms + prefill).clamp(500.0, 4_000.0) as u64
        };
        let end = start + duration_ms * MS + self.rng.random_range(0..MS);

        let name = match self.conv {
            Conv::OpenInference if model.provider == "anthropic" => "Messages".to_string(),
            Conv::OpenInference => "ChatCompletion".to_string(),
            Conv::GenAi => format!("chat {}", model.name),
            Conv::OpenLlmetry => format!("{}.chat", model.provider),
        };
        let scope = self.llm_scope(model);
        let idx = self.open(parent, name, SpanKind::Client, start, scope);
        self.spans[idx].llm = true;
        let ok = !spec.fail;
        if ok {
            self.spans[idx].input_tokens = in_tokens;
        }
        let output = std::slice::from_ref(&spec.output);
        let total = in_tokens + out_tokens;
        match self.conv {
            Conv::OpenInference => {
                self.s(idx, "openinference.span.kind", "LLM");
                self.s(idx, "llm.model_name", model.name);
                self.s(idx, "llm.provider", model.provider);
                self.s(idx, "llm.system", model.provider);
                let params = json!({"temperature": 0.2, "max_tokens": 1024});
                self.s(idx, "llm.invocation_parameters", &params.to_string());
                self.oi_messages(idx, "llm.input_messages", &input);
                let value = json!({"model": model.name, "messages": openai_json(&input)});
                self.s(idx, "input.value", &value.to_string());
                self.s(idx, "input.mime_type", "application/json");
                if ok {
                    self.oi_messages(idx, "llm.output_messages", output);
                    if spec.output.content.is_empty() {
                        let v = openai_json(output);
                        self.s(idx, "output.value", &v.to_string());
                        self.s(idx, "output.mime_type", "application/json");
                    } else {
                        let v = spec.output.content.clone();
                        self.s(idx, "output.value", &v);
                        self.s(idx, "output.mime_type", "text/plain");
                    }
                    self.int(idx, "llm.token_count.prompt", in_tokens);
                    self.int(idx, "llm.token_count.completion", out_tokens);
                    self.int(idx, "llm.token_count.total", total);
                    if cache_read > 0 {
                        self.int(idx, "llm.token_count.prompt_details.cache_read", cache_read);
                    }
                    if reasoning > 0 {
                        self.int(
                            idx,
                            "llm.token_count.completion_details.reasoning",
                            reasoning,
                        );
                    }
                }
                if spec.prompted {
                    self.s(idx, "langfuse.prompt.name", self.prompt.name);
                    self.s(idx, "llm.prompt_template.version", self.pv.version);
                }
            }
            Conv::GenAi => {
                self.s(idx, "gen_ai.operation.name", "chat");
                self.s(idx, "gen_ai.provider.name", model.provider);
                self.s(idx, "gen_ai.request.model", model.name);
                self.dbl(idx, "gen_ai.request.temperature", 0.2);
                self.int(idx, "gen_ai.request.max_tokens", 1024);
                let session = self.session.clone();
                self.s(idx, "gen_ai.conversation.id", &session);
                let (system, rest): (Vec<Msg>, Vec<Msg>) =
                    input.iter().cloned().partition(|m| m.role == "system");
                if let Some(sys) = system.first() {
                    let v = json!([{"type": "text", "content": sys.content}]);
                    self.s(idx, "gen_ai.system_instructions", &v.to_string());
                }
                self.s(
                    idx,
                    "gen_ai.input.messages",
                    &genai_json(&rest, None).to_string(),
                );
                if ok {
                    self.s(idx, "gen_ai.response.model", model.response);
                    let rid = if model.provider == "anthropic" {
                        format!("msg_{}", hex(&self.rng.random::<[u8; 12]>()))
                    } else {
                        format!("chatcmpl-{}", hex(&self.rng.random::<[u8; 12]>()))
                    };
                    self.s(idx, "gen_ai.response.id", &rid);
                    self.arr(idx, "gen_ai.response.finish_reasons", &[spec.finish]);
                    let v = genai_json(output, Some(spec.finish));
                    self.s(idx, "gen_ai.output.messages", &v.to_string());
                    self.int(idx, "gen_ai.usage.input_tokens", in_tokens);
                    self.int(idx, "gen_ai.usage.output_tokens", out_tokens);
                    if cache_read > 0 {
                        self.int(idx, "gen_ai.usage.cache_read.input_tokens", cache_read);
                    }
                }
                if spec.prompted {
                    self.s(idx, "langfuse.prompt.name", self.prompt.name);
                    self.s(idx, "langfuse.prompt.version", self.pv.version);
                }
            }
            Conv::OpenLlmetry => {
                self.s(idx, "llm.request.type", "chat");
                self.s(idx, "gen_ai.system", model.provider);
                self.s(idx, "gen_ai.request.model", model.name);
                self.dbl(idx, "gen_ai.request.temperature", 0.2);
                self.int(idx, "gen_ai.request.max_tokens", 1024);
                self.flag(idx, "llm.is_streaming", false);
                self.ol_messages(idx, "gen_ai.prompt", &input);
                if ok {
                    self.s(idx, "gen_ai.response.model", model.response);
                    self.ol_messages(idx, "gen_ai.completion", output);
                    self.s(idx, "gen_ai.completion.0.finish_reason", spec.finish);
                    self.int(idx, "llm.usage.prompt_tokens", in_tokens);
                    self.int(idx, "llm.usage.completion_tokens", out_tokens);
                    self.int(idx, "llm.usage.total_tokens", total);
                    if cache_read > 0 {
                        self.int(idx, "gen_ai.usage.cache_read_input_tokens", cache_read);
                    }
                }
                if spec.prompted {
                    self.s(idx, "langfuse.prompt.name", self.prompt.name);
                    self.s(idx, "langfuse.prompt.version", self.pv.version);
                }
            }
        }
        if spec.fail {
            let f = if model.provider == "anthropic" {
                &LLM_FAIL_ANTHROPIC
            } else {
                &LLM_FAIL_OPENAI
            };
            self.fail(idx, f, end);
        }
        self.close(idx, end);
        (idx, end)
    }

    fn oi_messages(&mut self, idx: usize, prefix: &str, msgs: &[Msg]) {
        for (i, m) in msgs.iter().enumerate() {
            let p = format!("{prefix}.{i}.message");
            self.s(idx, &format!("{p}.role"), m.role);
            if !m.content.is_empty() {
                self.s(idx, &format!("{p}.content"), &m.content);
            }
            if let Some(id) = &m.call_id {
                self.s(idx, &format!("{p}.tool_call_id"), id);
            }
            for (k, c) in m.calls.iter().enumerate() {
                let q = format!("{p}.tool_calls.{k}.tool_call");
                self.s(idx, &format!("{q}.id"), &c.id);
                self.s(idx, &format!("{q}.function.name"), c.name);
                self.s(idx, &format!("{q}.function.arguments"), c.args);
            }
        }
    }

    fn ol_messages(&mut self, idx: usize, prefix: &str, msgs: &[Msg]) {
        for (i, m) in msgs.iter().enumerate() {
            let p = format!("{prefix}.{i}");
            self.s(idx, &format!("{p}.role"), m.role);
            if !m.content.is_empty() {
                self.s(idx, &format!("{p}.content"), &m.content);
            }
            if let Some(id) = &m.call_id {
                self.s(idx, &format!("{p}.tool_call_id"), id);
            }
            for (k, c) in m.calls.iter().enumerate() {
                let q = format!("{p}.tool_calls.{k}");
                self.s(idx, &format!("{q}.id"), &c.id);
                self.s(idx, &format!("{q}.name"), c.name);
                self.s(idx, &format!("{q}.arguments"), c.args);
            }
        }
    }

    /// A tool execution. Returns the result the agent sees and the end time.
    fn tool_span(
        &mut self,
        parent: usize,
        start: u64,
        call: &Call,
        result: &'static str,
        fail: Option<&'static Failure>,
    ) -> (String, u64) {
        let t = tool(call.name);
        let duration = match fail {
            Some(f) if std::ptr::eq(f, &TOOL_TIMEOUT) => {
                30_000 * MS + self.rng.random_range(0..20 * MS)
            }
            _ => self.rng.random_range(t.ms.0..=t.ms.1) * MS + self.rng.random_range(0..MS),
        };
        let end = start + duration;
        let scope = self.app_scope();
        let name = match self.conv {
            Conv::OpenInference => t.name.to_string(),
            Conv::GenAi => format!("execute_tool {}", t.name),
            Conv::OpenLlmetry => format!("{}.tool", t.name),
        };
        let idx = self.open(Some(parent), name, SpanKind::Internal, start, scope);
        let output = match fail {
            Some(f) => format!("Error: {}", f.message),
            None => result.to_string(),
        };
        match self.conv {
            Conv::OpenInference => {
                self.s(idx, "openinference.span.kind", "TOOL");
                self.s(idx, "tool.name", t.name);
                self.s(idx, "tool.description", t.description);
                self.s(idx, "tool.parameters", t.schema);
                self.s(idx, "tool_call.id", &call.id);
                self.s(idx, "input.value", call.args);
                self.s(idx, "input.mime_type", "application/json");
                if fail.is_none() {
                    self.s(idx, "output.value", result);
                }
            }
            Conv::GenAi => {
                self.s(idx, "gen_ai.operation.name", "execute_tool");
                self.s(idx, "gen_ai.tool.name", t.name);
                self.s(idx, "gen_ai.tool.description", t.description);
                self.s(idx, "gen_ai.tool.type", "function");
                self.s(idx, "gen_ai.tool.call.id", &call.id);
                self.s(idx, "gen_ai.tool.call.arguments", call.args);
                if fail.is_none() {
                    self.s(idx, "gen_ai.tool.call.result", result);
                }
            }
            Conv::OpenLlmetry => {
                self.s(idx, "traceloop.span.kind", "tool");
                self.s(idx, "traceloop.entity.name", t.name);
                let args: serde_json::Value =
                    serde_json::from_str(call.args).unwrap_or_else(|_| json!(call.args));
                let input = json!({"args": [], "kwargs": args});
                self.s(idx, "traceloop.entity.input", &input.to_string());
                if fail.is_none() {
                    // Traceloop serializes the tool's return value: JSON stays JSON.
                    let out = serde_json::from_str::<serde_json::Value>(result)
                        .unwrap_or_else(|_| json!(result));
                    self.s(idx, "traceloop.entity.output", &out.to_string());
                }
            }
        }
        if let Some(f) = fail {
            self.fail(idx, f, end);
        }
        self.close(idx, end);
        (output, end)
    }

    /// An agent span (root or sub-agent); the caller closes it.
    fn agent_span(
        &mut self,
        parent: Option<usize>,
        name: &str,
        description: &str,
        start: u64,
        input: &str,
    ) -> usize {
        let scope = self.app_scope();
        let span_name = match self.conv {
            Conv::OpenInference => name.to_string(),
            Conv::GenAi => format!("invoke_agent {name}"),
            Conv::OpenLlmetry => format!("{name}.agent"),
        };
        let idx = self.open(parent, span_name, SpanKind::Internal, start, scope);
        match self.conv {
            Conv::OpenInference => {
                self.s(idx, "openinference.span.kind", "AGENT");
                self.s(idx, "agent.name", name);
                self.s(idx, "input.value", input);
                self.s(idx, "input.mime_type", "text/plain");
            }
            Conv::GenAi => {
                self.s(idx, "gen_ai.operation.name", "invoke_agent");
                self.s(idx, "gen_ai.agent.name", name);
                self.s(idx, "gen_ai.agent.description", description);
                let id = format!("agent_{}", hex(&self.rng.random::<[u8; 4]>()));
                self.s(idx, "gen_ai.agent.id", &id);
                let session = self.session.clone();
                self.s(idx, "gen_ai.conversation.id", &session);
                let v = genai_json(&[Msg::new("user", input)], None);
                self.s(idx, "gen_ai.input.messages", &v.to_string());
            }
            Conv::OpenLlmetry => {
                self.s(idx, "traceloop.span.kind", "agent");
                self.s(idx, "traceloop.entity.name", name);
                let v = json!({"args": [input], "kwargs": {}});
                self.s(idx, "traceloop.entity.input", &v.to_string());
            }
        }
        idx
    }

    fn agent_output(&mut self, idx: usize, output: &str) {
        match self.conv {
            Conv::OpenInference => {
                self.s(idx, "output.value", output);
                self.s(idx, "output.mime_type", "text/plain");
            }
            Conv::GenAi => {
                let v = genai_json(&[Msg::new("assistant", output)], Some("stop"));
                self.s(idx, "gen_ai.output.messages", &v.to_string());
            }
            Conv::OpenLlmetry => {
                self.s(idx, "traceloop.entity.output", &json!(output).to_string());
            }
        }
    }

    // --- scenarios ------------------------------------------------------------------

    /// CHAIN → EMBEDDING → RETRIEVER → RERANKER → LLM.
    fn rag(&mut self) {
        let q = QUERIES.choose(self.rng).expect("non-empty");
        let scope = self.app_scope();
        let root_name = if self.service.name == "docs-search" {
            "query"
        } else {
            "RetrievalQA"
        };
        let root = self.open(None, root_name, SpanKind::Server, 0, scope);
        self.s(root, "openinference.span.kind", "CHAIN");
        self.s(root, "input.value", q.question);
        self.s(root, "input.mime_type", "text/plain");
        self.root_metadata(root);

        // Embedding of the query.
        let mut t = self.gap();
        let emb = self.open(Some(root), "embed_query", SpanKind::Client, t, scope);
        let q_tokens = (q.question.len() / 4 + 1) as u64;
        self.s(emb, "openinference.span.kind", "EMBEDDING");
        self.s(emb, "embedding.model_name", "text-embedding-3-small");
        self.s(emb, "llm.provider", "openai");
        self.s(emb, "embedding.embeddings.0.embedding.text", q.question);
        // The vector itself is left out, as instrumentations are usually told to;
        // its size is kept.
        self.int(emb, "gen_ai.embeddings.dimension.count", 1536);
        self.s(emb, "input.value", q.question);
        self.int(emb, "llm.token_count.prompt", q_tokens);
        self.int(emb, "llm.token_count.total", q_tokens);
        t += self.rng.random_range(50..=150) * MS;
        self.close(emb, t);

        // Retrieval: the relevant documents first, then distractors, scores descending.
        t += self.gap();
        let n = self.rng.random_range(3..=8usize);
        let mut docs: Vec<&Doc> = q
            .relevant
            .iter()
            .filter_map(|id| DOCS.iter().find(|d| d.id == *id))
            .collect();
        let others: Vec<&Doc> = DOCS
            .iter()
            .filter(|d| !q.relevant.contains(&d.id))
            .collect();
        let extra = n.saturating_sub(docs.len());
        docs.extend(others.choose_multiple(self.rng, extra).copied());
        docs.truncate(n);
        let mut score: f64 = self.rng.random_range(0.82..0.93);
        let mut scored = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            scored.push((*d, (score * 1000.0).round() / 1000.0));
            let drop = if i + 1 < q.relevant.len() {
                self.rng.random_range(0.01..0.05)
            } else {
                self.rng.random_range(0.03..0.12)
            };
            score = (score - drop).max(0.05);
        }
        let ret = self.open(Some(root), "retrieve", SpanKind::Internal, t, scope);
        self.s(ret, "openinference.span.kind", "RETRIEVER");
        self.s(ret, "input.value", q.question);
        for (i, (d, sc)) in scored.iter().enumerate() {
            let p = format!("retrieval.documents.{i}.document");
            self.s(ret, &format!("{p}.id"), d.id);
            self.s(ret, &format!("{p}.content"), d.content);
            self.dbl(ret, &format!("{p}.score"), *sc);
            let meta = json!({"title": d.title, "source": d.url});
            self.s(ret, &format!("{p}.metadata"), &meta.to_string());
        }
        t += self.rng.random_range(20..=200) * MS;
        self.close(ret, t);

        // Reranking keeps the prompt version's top_k.
        t += self.gap();
        let top_k = self.pv.top_k.clamp(1, scored.len());
        let rr = self.open(Some(root), "rerank", SpanKind::Internal, t, scope);
        self.s(rr, "openinference.span.kind", "RERANKER");
        self.s(rr, "reranker.model_name", "rerank-v3.5");
        self.s(rr, "reranker.query", q.question);
        self.int(rr, "reranker.top_k", top_k as u64);
        for (i, (d, sc)) in scored.iter().enumerate() {
            let p = format!("reranker.input_documents.{i}.document");
            self.s(rr, &format!("{p}.id"), d.id);
            self.s(rr, &format!("{p}.content"), d.content);
            self.dbl(rr, &format!("{p}.score"), *sc);
        }
        let mut rscore: f64 = self.rng.random_range(0.9..0.99);
        let kept: Vec<&Doc> = scored.iter().take(top_k).map(|(d, _)| *d).collect();
        for (i, d) in kept.iter().enumerate() {
            let p = format!("reranker.output_documents.{i}.document");
            self.s(rr, &format!("{p}.id"), d.id);
            self.s(rr, &format!("{p}.content"), d.content);
            self.dbl(
                rr,
                &format!("{p}.score"),
                (rscore * 1000.0).round() / 1000.0,
            );
            rscore *= self.rng.random_range(0.3..0.8);
        }
        t += self.rng.random_range(40..=250) * MS;
        self.close(rr, t);

        // Answer.
        let mut context = String::new();
        for (i, d) in kept.iter().enumerate() {
            let _ = write!(context, "\n[{}] {}\n{}\n", i + 1, d.title, d.content);
        }
        let input = vec![
            Msg::new("system", format!("{}\n\nContext:{context}", self.pv.system)),
            Msg::new("user", q.question),
        ];
        let output = Msg::new("assistant", q.answer);
        let context_tokens = kept.len() as u64 * self.rng.random_range(250..450);
        let fail = self.plan.error;
        let retry = fail && self.rng.random_bool(0.5);
        t += self.gap();
        if retry {
            // The first attempt hits the provider's rate limit; the client backs off and retries.
            let mut spec = LlmSpec::new(self.pv.model, &input, output.clone(), "stop");
            spec.prompted = true;
            spec.fail = true;
            spec.extra_in = context_tokens;
            let (_, end) = self.llm(Some(root), t, spec);
            t = end + self.rng.random_range(500..2_000) * MS;
        }
        let mut spec = LlmSpec::new(self.pv.model, &input, output, "stop");
        spec.prompted = true;
        spec.fail = fail && !retry;
        spec.slow = self.plan.slow;
        spec.expensive = self.plan.expensive;
        spec.extra_in = context_tokens;
        let (_, end) = self.llm(Some(root), t, spec);
        if fail && !retry {
            let f = if self.pv.model.provider == "anthropic" {
                &LLM_FAIL_ANTHROPIC
            } else {
                &LLM_FAIL_OPENAI
            };
            self.fail(root, f, end);
        } else {
            self.s(root, "output.value", q.answer);
            self.s(root, "output.mime_type", "text/plain");
        }
        t = end + self.rng.random_range(2..=8) * MS;
        self.close(root, t);
    }

    /// AGENT root → iterations of (LLM with tool calls → TOOL spans) → final LLM answer.
    fn agent(&mut self) {
        let task = self
            .service
            .agent_tasks
            .choose(self.rng)
            .expect("non-empty");
        let n = *weighted(
            self.rng,
            &[(1usize, 25), (2, 30), (3, 20), (4, 12), (5, 8), (6, 5)],
        );
        let agent_name = if self.service.name == "research-agent" {
            "research-assistant"
        } else {
            "support_agent"
        };
        let root = self.agent_span(
            None,
            agent_name,
            "Answers questions using tools.",
            0,
            task.question,
        );
        self.root_metadata(root);
        // Where things go wrong or slow: an iteration index, `n` being the final answer.
        let err_at = self.plan.error.then(|| self.rng.random_range(0..=n));
        let tool_error = self.rng.random_bool(0.6);
        let slow_at = self.plan.slow.then(|| self.rng.random_range(0..=n));

        let mut msgs = vec![
            Msg::new("system", self.pv.system),
            Msg::new("user", task.question),
        ];
        // Tool definitions are sent with every call.
        let tool_tokens = self.rng.random_range(450..700);
        let mut t = self.rng.random_range(2..=10) * MS;
        for i in 0..n {
            let step = &task.steps[i % task.steps.len()];
            let mut steps = vec![step];
            if self.rng.random_bool(0.2) && task.steps.len() > 1 {
                steps.push(&task.steps[(i + 1) % task.steps.len()]);
            }
            let calls: Vec<Call> = steps
                .iter()
                .map(|s| Call {
                    id: self.call_id(),
                    name: s.tool,
                    args: s.args,
                })
                .collect();
            let out = Msg::tool_calls(calls.clone());
            let llm_fail = err_at == Some(i) && !tool_error;
            let mut spec = LlmSpec::new(self.pv.model, &msgs, out.clone(), "tool_calls");
            spec.prompted = true;
            spec.fail = llm_fail;
            spec.slow = slow_at == Some(i);
            spec.extra_in = tool_tokens;
            let (_, end) = self.llm(Some(root), t, spec);
            t = end + self.gap();
            if llm_fail {
                self.fail_root(root, end);
                self.close(root, t);
                return;
            }
            msgs.push(out);
            for (k, (call, step)) in calls.iter().zip(&steps).enumerate() {
                let fail = (err_at == Some(i) && tool_error && k == 0).then(|| {
                    if self.rng.random_bool(0.6) {
                        &TOOL_TIMEOUT
                    } else {
                        &TOOL_HTTP
                    }
                });
                let (result, end) = self.tool_span(root, t, call, step.result, fail);
                msgs.push(Msg::tool_result(&call.id, &result));
                t = end + self.gap();
            }
        }
        let out = Msg::new("assistant", task.answer);
        let llm_fail = err_at == Some(n);
        let mut spec = LlmSpec::new(self.pv.model, &msgs, out, "stop");
        spec.prompted = true;
        spec.fail = llm_fail;
        spec.slow = slow_at == Some(n);
        spec.expensive = self.plan.expensive;
        spec.extra_in = tool_tokens;
        let (_, end) = self.llm(Some(root), t, spec);
        if llm_fail {
            self.fail_root(root, end);
        } else {
            self.agent_output(root, task.answer);
        }
        t = end + self.rng.random_range(1..=5) * MS;
        self.close(root, t);
    }

    fn fail_root(&mut self, root: usize, at: u64) {
        let f = if self.pv.model.provider == "anthropic" {
            &LLM_FAIL_ANTHROPIC
        } else {
            &LLM_FAIL_OPENAI
        };
        self.fail(root, f, at);
    }

    /// AGENT root → planner LLM → 2–4 sub-agents in parallel → synthesis LLM.
    fn multi_agent(&mut self) {
        let (question, answer) = *MULTI_TASKS.choose(self.rng).expect("non-empty");
        let root = self.agent_span(
            None,
            "research-orchestrator",
            "Plans research and delegates to specialist agents.",
            0,
            question,
        );
        self.root_metadata(root);
        let k = self.rng.random_range(2..=4usize);
        let agents: Vec<&SubAgent> = SUB_AGENTS.choose_multiple(self.rng, k).collect();

        let mut t = self.rng.random_range(2..=10) * MS;
        let plan_text = json!({
            "plan": agents.iter().map(|a| json!({"agent": a.name, "goal": a.description})).collect::<Vec<_>>()
        })
        .to_string();
        let msgs = vec![
            Msg::new("system", self.pv.system),
            Msg::new("user", question),
        ];
        let mut spec = LlmSpec::new(
            self.pv.model,
            &msgs,
            Msg::new("assistant", plan_text),
            "stop",
        );
        spec.prompted = true;
        spec.extra_in = self.rng.random_range(300..500);
        let (_, end) = self.llm(Some(root), t, spec);
        let fan_out = end + self.gap();

        // Which sub-agent's tool fails, if any.
        let err_agent = self.plan.error.then(|| self.rng.random_range(0..k));
        let mut join = fan_out;
        let mut findings = Vec::new();
        for (ai, agent) in agents.iter().enumerate() {
            let start = fan_out + self.rng.random_range(0..12 * MS);
            let sub = self.agent_span(Some(root), agent.name, agent.description, start, question);
            let mut st = start + self.gap();
            let tool_tokens = self.rng.random_range(150..250);
            let mut sub_msgs = vec![
                Msg::new(
                    "system",
                    format!("You are the {} agent. {}", agent.name, agent.description),
                ),
                Msg::new("user", question),
            ];
            let iters = self.rng.random_range(1..=agent.steps.len().min(3));
            for (i, step) in agent.steps.iter().take(iters).enumerate() {
                let call = Call {
                    id: self.call_id(),
                    name: step.tool,
                    args: step.args,
                };
                let out = Msg::tool_calls(vec![call.clone()]);
                let mut spec = LlmSpec::new(&GPT_4O_MINI, &sub_msgs, out.clone(), "tool_calls");
                spec.extra_in = tool_tokens;
                let (_, end) = self.llm(Some(sub), st, spec);
                st = end + self.gap();
                sub_msgs.push(out);
                let fail = (err_agent == Some(ai) && i == 0).then_some(&TOOL_TIMEOUT);
                let (result, end) = self.tool_span(sub, st, &call, step.result, fail);
                sub_msgs.push(Msg::tool_result(&call.id, &result));
                st = end + self.gap();
            }
            let mut spec = LlmSpec::new(
                &GPT_4O_MINI,
                &sub_msgs,
                Msg::new("assistant", agent.summary),
                "stop",
            );
            spec.extra_in = tool_tokens;
            let (_, end) = self.llm(Some(sub), st, spec);
            self.agent_output(sub, agent.summary);
            let sub_end = end + self.gap();
            self.close(sub, sub_end);
            join = join.max(sub_end);
            findings.push(format!("{}: {}", agent.name, agent.summary));
        }

        t = join + self.gap();
        let synth_input = vec![
            Msg::new("system", self.pv.system),
            Msg::new("user", question),
            Msg::new(
                "user",
                format!(
                    "Findings from the specialist agents:\n{}",
                    findings.join("\n")
                ),
            ),
        ];
        let mut spec = LlmSpec::new(
            self.pv.model,
            &synth_input,
            Msg::new("assistant", answer),
            "stop",
        );
        spec.prompted = true;
        spec.slow = self.plan.slow;
        spec.expensive = self.plan.expensive;
        let (_, end) = self.llm(Some(root), t, spec);
        self.agent_output(root, answer);
        t = end + self.rng.random_range(1..=5) * MS;
        self.close(root, t);
    }

    /// A single LLM span as the root, with the session's earlier turns as history.
    fn chat(&mut self) {
        let (question, answer) = *CHATS.choose(self.rng).expect("non-empty");
        let mut input = vec![Msg::new("system", self.pv.system)];
        let skip = self.history.len().saturating_sub(2);
        for (q, a) in self.history.iter().skip(skip) {
            input.push(Msg::new("user", *q));
            input.push(Msg::new("assistant", *a));
        }
        input.push(Msg::new("user", question));
        let mut spec = LlmSpec::new(self.pv.model, &input, Msg::new("assistant", answer), "stop");
        spec.prompted = true;
        spec.fail = self.plan.error;
        spec.slow = self.plan.slow;
        spec.expensive = self.plan.expensive;
        // Account and plan details injected by the app.
        spec.extra_in = self.rng.random_range(120..300);
        let (root, _) = self.llm(None, 0, spec);
        self.root_metadata(root);
        if !self.plan.error {
            self.history.push((question, answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn opts(traces: usize, seed: u64) -> DemoOptions {
        DemoOptions {
            traces,
            seed,
            spread: Duration::from_secs(3600),
            now: UNIX_EPOCH + Duration::from_secs(1_760_000_000),
        }
    }

    fn all_spans(reqs: &[ExportTraceServiceRequest]) -> Vec<(&Resource, &Span)> {
        reqs.iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| {
                let res = rs.resource.as_ref().expect("resource");
                rs.scope_spans
                    .iter()
                    .flat_map(move |ss| ss.spans.iter().map(move |s| (res, s)))
            })
            .collect()
    }

    fn by_trace(reqs: &[ExportTraceServiceRequest]) -> HashMap<Vec<u8>, Vec<&Span>> {
        let mut m: HashMap<Vec<u8>, Vec<&Span>> = HashMap::new();
        for (_, s) in all_spans(reqs) {
            m.entry(s.trace_id.clone()).or_default().push(s);
        }
        m
    }

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn attr_str<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
        match attr(s, key) {
            Some(Value::StringValue(v)) => Some(v),
            _ => None,
        }
    }

    fn is_llm(s: &Span) -> bool {
        attr_str(s, "openinference.span.kind") == Some("LLM")
            || attr_str(s, "gen_ai.operation.name") == Some("chat")
            || attr_str(s, "llm.request.type") == Some("chat")
    }

    fn attr_int(s: &Span, key: &str) -> Option<i64> {
        match attr(s, key) {
            Some(Value::IntValue(v)) => Some(*v),
            _ => None,
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let a = generate(&opts(60, 7), 100);
        let b = generate(&opts(60, 7), 100);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        let c = generate(&opts(60, 8), 100);
        assert_ne!(a.1, c.1);
    }

    #[test]
    fn ids_are_well_formed_and_unique() {
        let (reqs, traces) = generate(&opts(200, 1), 500);
        assert_eq!(traces.len(), 200);
        let mut span_ids = HashSet::new();
        let mut trace_ids = HashSet::new();
        for (_, s) in all_spans(&reqs) {
            assert_eq!(s.trace_id.len(), 16);
            assert_eq!(s.span_id.len(), 8);
            assert!(s.trace_id.iter().any(|b| *b != 0));
            assert!(s.span_id.iter().any(|b| *b != 0));
            assert!(s.parent_span_id.is_empty() || s.parent_span_id.len() == 8);
            assert!(span_ids.insert(s.span_id.clone()), "duplicate span id");
            trace_ids.insert(s.trace_id.clone());
        }
        assert_eq!(trace_ids.len(), 200);
        for t in &traces {
            assert!(trace_ids.contains(t.trace_id.as_slice()));
        }
    }

    #[test]
    fn parents_exist_and_children_nest_in_time() {
        let o = opts(200, 3);
        let (reqs, traces) = generate(&o, 300);
        let grouped = by_trace(&reqs);
        let now = o.now.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let earliest = now - o.spread.as_nanos() as u64;
        for info in &traces {
            let spans = &grouped[&info.trace_id.to_vec()];
            assert_eq!(spans.len(), info.span_count);
            let ids: HashMap<&[u8], &Span> =
                spans.iter().map(|s| (s.span_id.as_slice(), *s)).collect();
            let roots: Vec<_> = spans
                .iter()
                .filter(|s| s.parent_span_id.is_empty())
                .collect();
            assert_eq!(roots.len(), 1, "one root per trace");
            assert_eq!(roots[0].kind, SpanKind::Server as i32);
            assert!(roots[0].start_time_unix_nano >= earliest);
            assert!(roots[0].end_time_unix_nano <= now);
            for s in spans {
                assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
                if s.parent_span_id.is_empty() {
                    continue;
                }
                let p = ids
                    .get(s.parent_span_id.as_slice())
                    .expect("parent in the same trace");
                assert!(
                    s.start_time_unix_nano >= p.start_time_unix_nano
                        && s.end_time_unix_nano <= p.end_time_unix_nano,
                    "{} outside its parent {}",
                    s.name,
                    p.name
                );
            }
        }
    }

    #[test]
    fn scenario_mix_and_flags() {
        let (reqs, traces) = generate(&opts(200, 42), 512);
        let count = |label: &str| traces.iter().filter(|t| t.scenario == label).count();
        let (rag, agent, multi, chat) = (
            count("rag"),
            count("agent"),
            count("multi_agent"),
            count("chat"),
        );
        assert_eq!(rag + agent + multi + chat, 200);
        assert!((50..=110).contains(&rag), "rag {rag}");
        assert!((40..=100).contains(&agent), "agent {agent}");
        assert!((12..=50).contains(&multi), "multi {multi}");
        assert!((6..=40).contains(&chat), "chat {chat}");
        let errors = traces.iter().filter(|t| t.error).count();
        let slow = traces.iter().filter(|t| t.slow).count();
        let expensive = traces.iter().filter(|t| t.expensive).count();
        assert!((1..=30).contains(&errors), "errors {errors}");
        assert!((1..=30).contains(&slow), "slow {slow}");
        assert!((1..=30).contains(&expensive), "expensive {expensive}");

        // The flags agree with the spans.
        let grouped = by_trace(&reqs);
        for t in &traces {
            let spans = &grouped[&t.trace_id.to_vec()];
            let has_error = spans.iter().any(|s| {
                s.status
                    .as_ref()
                    .is_some_and(|st| st.code == StatusCode::Error as i32)
            });
            assert_eq!(has_error, t.error);
            let has_slow = spans
                .iter()
                .any(|s| is_llm(s) && s.end_time_unix_nano - s.start_time_unix_nano >= 15_000 * MS);
            assert_eq!(has_slow, t.slow);
            let big = spans.iter().any(|s| {
                [
                    "llm.token_count.prompt",
                    "gen_ai.usage.input_tokens",
                    "llm.usage.prompt_tokens",
                ]
                .iter()
                .any(|k| attr_int(s, k).is_some_and(|v| v >= 100_000))
            });
            assert_eq!(big, t.expensive);
            if t.error {
                let errs: Vec<_> = spans
                    .iter()
                    .filter(|s| {
                        s.status
                            .as_ref()
                            .is_some_and(|st| st.code == StatusCode::Error as i32)
                    })
                    .collect();
                for s in errs {
                    assert!(!s.status.as_ref().unwrap().message.is_empty());
                    let ev = s
                        .events
                        .iter()
                        .find(|e| e.name == "exception")
                        .expect("event");
                    assert!(ev.attributes.iter().any(|kv| kv.key == "exception.type"));
                    assert!(ev.attributes.iter().any(|kv| kv.key == "exception.message"));
                }
            }
        }
    }

    #[test]
    fn conventions_services_users_sessions_and_prompts() {
        let (reqs, _) = generate(&opts(200, 5), 512);
        let spans = all_spans(&reqs);
        let mut services = HashSet::new();
        let mut users = HashSet::new();
        let mut sessions: HashMap<String, HashSet<Vec<u8>>> = HashMap::new();
        let mut prompt_versions: HashMap<String, HashSet<String>> = HashMap::new();
        let (mut oi, mut genai, mut ol) = (0, 0, 0);
        for (res, s) in &spans {
            let svc = res
                .attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| v.value.as_ref());
            if let Some(Value::StringValue(name)) = svc {
                services.insert(name.clone());
            }
            for key in ["service.version", "deployment.environment.name"] {
                assert!(res.attributes.iter().any(|kv| kv.key == key));
            }
            if let Some(u) = attr_str(s, "user.id") {
                users.insert(u.to_string());
            }
            if let Some(sid) = attr_str(s, "session.id") {
                sessions
                    .entry(sid.to_string())
                    .or_default()
                    .insert(s.trace_id.clone());
            }
            if let Some(name) = attr_str(s, "langfuse.prompt.name") {
                let v = attr_str(s, "llm.prompt_template.version")
                    .or_else(|| attr_str(s, "langfuse.prompt.version"))
                    .expect("prompt version");
                prompt_versions
                    .entry(name.to_string())
                    .or_default()
                    .insert(v.to_string());
            }
            if attr_str(s, "openinference.span.kind") == Some("LLM") {
                oi += 1;
                assert_ne!(s.kind, SpanKind::Internal as i32);
            }
            if attr_str(s, "gen_ai.operation.name") == Some("chat") {
                genai += 1;
                let msgs = attr_str(s, "gen_ai.input.messages").expect("input messages");
                assert!(
                    serde_json::from_str::<serde_json::Value>(msgs)
                        .unwrap()
                        .is_array()
                );
            }
            if attr_str(s, "llm.request.type") == Some("chat") {
                ol += 1;
                assert!(attr_str(s, "gen_ai.prompt.0.role").is_some());
            }
            if attr_str(s, "openinference.span.kind") == Some("RETRIEVER") {
                let mut last = f64::MAX;
                let mut n = 0;
                while let Some(Value::DoubleValue(score)) =
                    attr(s, &format!("retrieval.documents.{n}.document.score"))
                {
                    assert!(*score <= last);
                    last = *score;
                    n += 1;
                }
                assert!((3..=8).contains(&n), "{n} documents");
            }
            let size: usize = s
                .attributes
                .iter()
                .map(
                    |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(v)) => v.len(),
                        _ => 8,
                    },
                )
                .sum();
            assert!(
                size < 32 * 1024,
                "span {} has {size} bytes of attributes",
                s.name
            );
        }
        assert_eq!(services.len(), 3);
        assert!((6..=8).contains(&users.len()), "{} users", users.len());
        assert!(sessions.values().any(|t| t.len() > 1));
        assert!(sessions.values().all(|t| t.len() <= 5));
        assert!(prompt_versions.len() >= 4);
        assert!(prompt_versions.values().any(|v| v.len() >= 3));
        assert!(
            oi > 0 && genai > 0 && ol > 0,
            "oi {oi} genai {genai} ol {ol}"
        );
    }

    #[test]
    fn parallel_sub_agents_overlap() {
        let (reqs, traces) = generate(&opts(200, 11), 512);
        let grouped = by_trace(&reqs);
        let mut checked = 0;
        for t in traces.iter().filter(|t| t.scenario == "multi_agent") {
            let spans = &grouped[&t.trace_id.to_vec()];
            let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
            let subs: Vec<_> = spans
                .iter()
                .filter(|s| {
                    s.parent_span_id == root.span_id
                        && attr_str(s, "gen_ai.operation.name") == Some("invoke_agent")
                })
                .collect();
            assert!((2..=4).contains(&subs.len()));
            for a in &subs {
                assert!(spans.iter().any(|c| c.parent_span_id == a.span_id));
                for b in &subs {
                    assert!(
                        a.start_time_unix_nano < b.end_time_unix_nano
                            && b.start_time_unix_nano < a.end_time_unix_nano,
                        "sub-agents do not overlap"
                    );
                }
            }
            checked += 1;
        }
        assert!(checked > 0);
    }

    #[test]
    fn agent_llm_calls_return_tool_calls() {
        let (reqs, traces) = generate(&opts(100, 13), 512);
        let grouped = by_trace(&reqs);
        let mut seen_reasoning = false;
        for t in traces.iter().filter(|t| t.scenario == "agent" && !t.error) {
            let spans = &grouped[&t.trace_id.to_vec()];
            let tools = spans
                .iter()
                .filter(|s| {
                    attr_str(s, "openinference.span.kind") == Some("TOOL")
                        || attr_str(s, "gen_ai.operation.name") == Some("execute_tool")
                        || attr_str(s, "traceloop.span.kind") == Some("tool")
                })
                .count();
            assert!(tools >= 1);
            let with_calls = spans.iter().any(|s| {
                attr_str(
                    s,
                    "llm.output_messages.0.message.tool_calls.0.tool_call.function.name",
                )
                .is_some()
                    || attr_str(s, "gen_ai.completion.0.tool_calls.0.name").is_some()
                    || attr_str(s, "gen_ai.output.messages")
                        .is_some_and(|m| m.contains("tool_call"))
            });
            assert!(with_calls);
            seen_reasoning |= spans
                .iter()
                .any(|s| attr_int(s, "llm.token_count.completion_details.reasoning").is_some());
        }
        assert!(seen_reasoning);
    }

    #[test]
    fn batches_respect_the_limit() {
        for batch in [1, 7, 25, 100] {
            let (reqs, traces) = generate(&opts(80, 21), batch);
            let largest = traces.iter().map(|t| t.span_count).max().unwrap();
            let total: usize = traces.iter().map(|t| t.span_count).sum();
            let mut seen = 0;
            let mut where_is: HashMap<Vec<u8>, HashSet<usize>> = HashMap::new();
            for (i, r) in reqs.iter().enumerate() {
                let n: usize = r
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .map(|ss| ss.spans.len())
                    .sum();
                assert!(n > 0);
                assert!(n <= batch.max(1), "request of {n} spans, batch {batch}");
                seen += n;
                for (_, s) in all_spans(std::slice::from_ref(r)) {
                    where_is.entry(s.trace_id.clone()).or_default().insert(i);
                }
            }
            assert_eq!(seen, total);
            for t in &traces {
                if t.span_count <= batch {
                    assert_eq!(where_is[&t.trace_id.to_vec()].len(), 1, "trace split");
                }
            }
            assert!(largest > 1);
        }
    }

    #[test]
    fn zero_traces_and_zero_batch() {
        let (reqs, traces) = generate(&opts(0, 1), 100);
        assert!(reqs.is_empty() && traces.is_empty());
        let (reqs, traces) = generate(&opts(3, 1), 0);
        let total: usize = traces.iter().map(|t| t.span_count).sum();
        assert_eq!(reqs.len(), total);
    }
}
