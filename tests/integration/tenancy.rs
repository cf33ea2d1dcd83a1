//! Tenants and keys, through the real binary: every request names its project by its
//! key, ingest keys cannot read and query keys cannot write, one project never sees
//! another's traces, keys never show in logs or errors, and the config reloads
//! without a restart (an invalid change keeps the last good config).

use std::time::Duration;

use loupe_core::keys::{KeyHash, Scope, generate};
use serde_json::Value;

use crate::harness::*;

/// The keys of one project.
struct Keys {
    ingest: String,
    query: String,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            ingest: generate(Scope::Ingest),
            query: generate(Scope::Query),
        }
    }

    fn yaml(&self, id: &str, environment: &str) -> String {
        format!(
            "  - id: {id}\n    environment: {environment}\n    keys:\n      - {{ name: app, scope: ingest, hash: \"{}\" }}\n      - {{ name: ui, scope: query, hash: \"{}\" }}\n",
            KeyHash::of(&self.ingest),
            KeyHash::of(&self.query)
        )
    }
}

/// Posts an export request over OTLP/HTTP with `key`.
async fn post(
    loupe: &Loupe,
    key: Option<&str>,
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> reqwest::Response {
    use prost::Message;
    let mut post = reqwest::Client::new()
        .post(format!("{}/v1/traces", loupe.http))
        .header("content-type", "application/x-protobuf")
        .body(req.encode_to_vec());
    if let Some(key) = key {
        post = post.bearer_auth(key);
    }
    post.send().await.unwrap()
}

/// Exports one trace over OTLP/HTTP with `key`; returns the status.
async fn export(loupe: &Loupe, key: Option<&str>, service: &str) -> (u16, String, String) {
    let (trace, req) = simple_trace(service, "u");
    let r = post(loupe, key, &req).await;
    let status = r.status().as_u16();
    (status, hex(&trace), r.text().await.unwrap_or_default())
}

/// GETs a query path with `key`.
async fn query(loupe: &Loupe, key: Option<&str>, path: &str) -> (u16, Value) {
    let mut get = reqwest::Client::new().get(format!("{}{path}", loupe.query));
    if let Some(key) = key {
        get = get.header("x-loupe-key", key);
    }
    let r = get.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn await_status(loupe: &Loupe, key: &str, path: &str, want: u16) -> Value {
    let body = std::sync::Mutex::new(Value::Null);
    let last = &body;
    eventually(Duration::from_secs(20), || async move {
        let (status, got) = query(loupe, Some(key), path).await;
        let ok = status == want;
        let why = format!("{path}: {status} {got}, wanted {want}");
        *last.lock().unwrap() = got;
        ok.then_some(()).ok_or(why)
    })
    .await;
    body.into_inner().unwrap()
}

#[tokio::test]
async fn keys_isolate_projects_and_environments() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, prod, other) = (Keys::new(), Keys::new(), Keys::new());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "tenants:\n{}{}{}",
            dev.yaml("team-a/chat-dev", "dev"),
            prod.yaml("team-a/chat-prod", "prod"),
            other.yaml("team-b/bot", "prod")
        ),
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--flush-interval",
            "300ms",
        ],
    );

    // Without a key, or with an unknown one, nothing is accepted or served.
    let (status, _, body) = export(&loupe, None, "svc").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("loupe keys new"), "{body}");
    let (status, _, _) = export(&loupe, Some(&generate(Scope::Ingest)), "svc").await;
    assert_eq!(status, 401);
    let (status, _) = query(&loupe, None, "/api/v1/traces?start=0").await;
    assert_eq!(status, 401);
    // gRPC says UNAUTHENTICATED.
    let (_, req) = simple_trace("svc", "u");
    let err = loupe.grpc_client().await.export(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A query key cannot write; an ingest key cannot read.
    let (status, _, body) = export(&loupe, Some(&dev.query), "svc").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("query key"), "{body}");
    let (status, body) = query(&loupe, Some(&dev.ingest), "/api/v1/traces?start=0").await;
    assert_eq!(status, 403, "{body}");

    // Each project writes with its ingest key and reads with its query key.
    let (status, dev_trace, _) = export(&loupe, Some(&dev.ingest), "chat").await;
    assert_eq!(status, 200);
    let (status, prod_trace, _) = export(&loupe, Some(&prod.ingest), "chat").await;
    assert_eq!(status, 200);
    let (status, other_trace, _) = export(&loupe, Some(&other.ingest), "chat").await;
    assert_eq!(status, 200);
    let body = await_status(
        &loupe,
        &dev.query,
        &format!("/api/v1/traces/{dev_trace}"),
        200,
    )
    .await;
    assert_eq!(body["trace_id"], dev_trace.as_str());
    await_status(
        &loupe,
        &prod.query,
        &format!("/api/v1/traces/{prod_trace}"),
        200,
    )
    .await;
    await_status(
        &loupe,
        &other.query,
        &format!("/api/v1/traces/{other_trace}"),
        200,
    )
    .await;

    // dev cannot read prod, prod cannot read dev, team-b reads neither; searches see
    // only their own project.
    for (key, foreign) in [
        (&dev.query, &prod_trace),
        (&prod.query, &dev_trace),
        (&other.query, &dev_trace),
        (&other.query, &prod_trace),
        (&dev.query, &other_trace),
    ] {
        let (status, body) = query(&loupe, Some(key), &format!("/api/v1/traces/{foreign}")).await;
        assert_eq!(status, 404, "{body}");
    }
    for (key, own) in [
        (&dev.query, &dev_trace),
        (&prod.query, &prod_trace),
        (&other.query, &other_trace),
    ] {
        let (status, body) = query(&loupe, Some(key), "/api/v1/traces?start=0&service=chat").await;
        assert_eq!(status, 200);
        let ids: Vec<&str> = body["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["trace_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![own.as_str()], "{body}");
    }
    // Scores: written with an ingest key only, and only into its own project (a
    // score naming another project's trace stays in the writer's project).
    let score = |key: &str, trace: &str| {
        let request = reqwest::Client::new()
            .post(format!("{}/api/v1/scores", loupe.http))
            .bearer_auth(key)
            .json(&serde_json::json!({"trace_id": trace, "name": "quality", "value": 1}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(score(&dev.query, &dev_trace).await, 403);
    assert_eq!(score(&dev.ingest, &dev_trace).await, 200);
    assert_eq!(score(&other.ingest, &prod_trace).await, 200);
    let body = await_status(
        &loupe,
        &dev.query,
        &format!("/api/v1/traces/{dev_trace}"),
        200,
    )
    .await;
    assert_eq!(body["scores"].as_array().unwrap().len(), 1, "{body}");
    let body = await_status(
        &loupe,
        &prod.query,
        &format!("/api/v1/traces/{prod_trace}"),
        200,
    )
    .await;
    assert!(body["scores"].as_array().unwrap().is_empty(), "{body}");
    let (_, listed) = query(&loupe, Some(&prod.query), "/api/v1/scores?since=1h").await;
    assert!(listed["scores"].as_array().unwrap().is_empty(), "{listed}");
    let (_, listed) = query(&loupe, Some(&other.query), "/api/v1/scores?since=1h").await;
    assert_eq!(listed["scores"].as_array().unwrap().len(), 1, "{listed}");

    // The environment is the project's.
    let body = await_status(
        &loupe,
        &prod.query,
        &format!("/api/v1/traces/{prod_trace}"),
        200,
    )
    .await;
    assert!(body.to_string().contains("\"prod\""), "{body}");

    // Blocks sit under each tenant's own prefix.
    await_blocks(
        &dir.path().join("data").join("blocks"),
        &["team-a/chat-dev", "team-a/chat-prod", "team-b/bot"],
    )
    .await;

    // No key appears in the log.
    let log = loupe.log();
    for k in [&dev, &prod, &other] {
        assert!(
            !log.contains(&k.ingest) && !log.contains(&k.query),
            "a key leaked into the log"
        );
    }
}

async fn await_blocks(blocks: &std::path::Path, tenants: &[&str]) {
    eventually(Duration::from_secs(20), || async move {
        let files = walk(blocks);
        let all = tenants.iter().all(|t| {
            files.iter().any(|p| {
                p.to_string_lossy()
                    .contains(&format!("tenants/{t}/blocks/"))
                    && p.to_string_lossy().ends_with(".meta.json")
            })
        });
        all.then_some(())
            .ok_or_else(|| format!("blocks per tenant: {files:?}"))
    })
    .await;
}

#[tokio::test]
async fn config_changes_take_effect_without_a_restart_and_bad_ones_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Keys::new(), Keys::new());
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("tenants:\n{}", a.yaml("ns/a", "dev"))).unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(export(&loupe, Some(&b.ingest), "svc").await.0, 401);

    // A new project's keys work once the file changes.
    std::fs::write(
        &config,
        format!(
            "tenants:\n{}{}",
            a.yaml("ns/a", "dev"),
            b.yaml("ns/b", "dev")
        ),
    )
    .unwrap();
    let (l, b_key) = (&loupe, b.ingest.as_str());
    eventually(Duration::from_secs(20), || async move {
        let status = export(l, Some(b_key), "svc").await.0;
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("the new key was never accepted ({status})"))
    })
    .await;

    // An invalid file is rejected with the field named, and the last good config
    // stays in force.
    std::fs::write(
        &config,
        format!(
            "tenants:\n{}{}  - id: ns/c\n    retention: 5m\n",
            a.yaml("ns/a", "dev"),
            b.yaml("ns/b", "dev")
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(20), || async move {
        let log = l.log();
        log.contains("config change rejected")
            .then_some(())
            .ok_or_else(|| format!("no rejection logged:\n{log}"))
    })
    .await;
    assert!(
        loupe.log().contains("tenants[2].retention"),
        "{}",
        loupe.log()
    );
    assert_eq!(export(&loupe, Some(&b.ingest), "svc").await.0, 200);
    assert_eq!(export(&loupe, Some(&a.ingest), "svc").await.0, 200);
    let metrics = loupe.metrics().await;
    assert!(
        metrics.contains("loupe_config_last_reload_successful 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("loupe_config_reload_failures_total 1"),
        "{metrics}"
    );

    // Removing a project's keys revokes them.
    std::fs::write(&config, format!("tenants:\n{}", a.yaml("ns/a", "dev"))).unwrap();
    eventually(Duration::from_secs(20), || async move {
        let status = export(l, Some(b_key), "svc").await.0;
        (status == 401)
            .then_some(())
            .ok_or_else(|| format!("the removed key still works ({status})"))
    })
    .await;
    assert_eq!(export(&loupe, Some(&a.ingest), "svc").await.0, 200);

    // A new sampling policy applies to traces that arrive after the change.
    let before = metric(&loupe.metrics().await, "loupe_config_reloads_total");
    std::fs::write(
        &config,
        format!(
            "tenants:\n{}    sampling: {{ decision_wait: 1s, keep_errors: true, percentage: 0 }}\n",
            a.yaml("ns/a", "dev")
        ),
    )
    .unwrap();
    eventually(Duration::from_secs(20), || async move {
        let now = metric(&l.metrics().await, "loupe_config_reloads_total");
        (now > before)
            .then_some(())
            .ok_or_else(|| "the sampling change was not taken".to_string())
    })
    .await;
    assert_eq!(export(&loupe, Some(&a.ingest), "sampled").await.0, 200);
    eventually(Duration::from_secs(20), || async move {
        let m = l.metrics().await;
        let dropped = m.lines().any(|line| {
            line.starts_with("loupe_sampling_traces_total{")
                && line.contains("tenant=\"ns/a\"")
                && line.contains("decision=\"drop\"")
                && !line.ends_with(" 0")
        });
        dropped
            .then_some(())
            .ok_or_else(|| format!("no trace dropped:\n{m}"))
    })
    .await;
}

#[tokio::test]
async fn keys_new_prints_a_key_and_the_config_line_that_admits_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args([
            "keys", "new", "--tenant", "ns/app", "--scope", "query", "--name", "grafana",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key:  "))
        .unwrap()
        .to_owned();
    assert!(key.starts_with("loupe_qk_"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("hash: \"sha256:"))
        .unwrap();
    // The printed line, pasted under the tenant, admits the key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("tenants:\n  - id: ns/app\n    keys:\n{line}\n"),
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let (status, body) = query(&loupe, Some(&key), "/api/v1/traces?start=0").await;
    assert_eq!(status, 200, "{body}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(["keys", "new", "--tenant", "../etc", "--scope", "query"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid tenant id"));
}

#[tokio::test]
async fn a_project_over_its_rate_limit_is_told_to_retry_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (limited, free) = (Keys::new(), Keys::new());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "tenants:\n{}    rate_limits: {{ spans_per_second: 10 }}\n{}",
            limited.yaml("ns/limited", "prod"),
            free.yaml("ns/free", "prod")
        ),
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    // Two spans a trace: a burst of 10 spans admits five exports at once; twenty
    // more spans would need two more seconds.
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..15 {
        let (_, req) = simple_trace("svc", "u");
        let r = post(&loupe, Some(&limited.ingest), &req).await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 && refusal.is_none() {
            let retry = r.headers()["retry-after"].to_str().unwrap().to_owned();
            refusal = Some((retry, r.text().await.unwrap()));
        }
    }
    assert_eq!(statuses[..5], [200; 5], "{statuses:?}");
    assert!(statuses[5..].contains(&429), "{statuses:?}");
    let (retry, body) = refusal.unwrap();
    assert!(retry.parse::<u64>().unwrap() >= 1, "{retry}");
    assert!(body.contains("spans per second rate limit"), "{body}");

    // gRPC says RESOURCE_EXHAUSTED with a pushback hint. The bucket refills 10 spans
    // a second, so on a loaded machine the first export may fit again: a burst of
    // 40 spans cannot.
    let mut client = loupe.grpc_client().await;
    let mut refused = None;
    for _ in 0..20 {
        let (_, req) = simple_trace("svc", "u");
        let mut request = tonic::Request::new(req);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", limited.ingest).parse().unwrap(),
        );
        if let Err(e) = client.export(request).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("a burst over the limit is refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());

    // Another project is not limited.
    for _ in 0..8 {
        let (status, _, body) = export(&loupe, Some(&free.ingest), "svc").await;
        assert_eq!(status, 200, "{body}");
    }
    // Refusals are counted.
    let m = loupe.metrics().await;
    assert!(
        metric(
            &m,
            "loupe_ingest_requests_rejected_total{protocol=\"http\",reason=\"rate_limited\"}"
        ) >= 1.0,
        "{m}"
    );
    // Usage series are off unless the config turns them on.
    assert!(!m.contains("loupe_llm_calls_total{"), "{m}");
}

/// Sends one trace of `simple_trace` whose LLM call names `model`; returns its id.
async fn export_model(loupe: &Loupe, key: &str, model: &str) -> String {
    let (trace, mut req) = simple_trace("svc", "u");
    let llm = &mut req.resource_spans[0].scope_spans[0].spans[1];
    for a in &mut llm.attributes {
        if a.key == "llm.model_name" {
            *a = kv("llm.model_name", model);
        }
    }
    let r = post(loupe, Some(key), &req).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    hex(&trace)
}

#[tokio::test]
async fn usage_metrics_count_llm_calls_per_project_with_a_bound_on_models() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Keys::new(), Keys::new());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "usage_metrics: {{ enabled: true, max_models_per_tenant: 2 }}\ntenants:\n{}{}",
            a.yaml("ns/a", "prod"),
            b.yaml("ns/b", "dev")
        ),
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(export_model(&loupe, &a.ingest, "gpt-4o-mini").await);
    }
    // The bound is two models per project: the third and fourth share "other".
    for model in ["gpt-4o", "claude-3-5-haiku", "o1"] {
        export_model(&loupe, &a.ingest, model).await;
    }
    export_model(&loupe, &b.ingest, "o1").await;

    let m = loupe.metrics().await;
    let series = |name: &str, tenant: &str, model: &str| {
        metric(
            &m,
            &format!("loupe_llm_{name}{{tenant=\"{tenant}\",model=\"{model}\"}}"),
        )
    };
    assert_eq!(series("calls_total", "ns/a", "gpt-4o-mini"), 3.0, "{m}");
    assert_eq!(series("calls_total", "ns/a", "gpt-4o"), 1.0, "{m}");
    assert_eq!(series("calls_total", "ns/a", "other"), 2.0, "{m}");
    assert_eq!(series("calls_total", "ns/b", "o1"), 1.0, "{m}");
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("loupe_llm_calls_total{"))
            .count(),
        4,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "loupe_llm_tokens_total{tenant=\"ns/a\",model=\"gpt-4o-mini\",direction=\"input\"}"
        ),
        3600.0,
        "{m}"
    );
    assert_eq!(
        series("call_duration_seconds_count", "ns/a", "gpt-4o-mini"),
        3.0
    );
    // The cost series is the cost the query API shows for the same calls.
    let trace = await_status(&loupe, &a.query, &format!("/api/v1/traces/{}", ids[0]), 200).await;
    let cost = trace["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0, "{trace}");
    let counted = series("cost_usd_total", "ns/a", "gpt-4o-mini");
    assert!(
        (counted - 3.0 * cost).abs() < 1e-9,
        "{counted} vs 3 × {cost}"
    );
    // Keys never become labels.
    assert!(!m.contains(&a.ingest) && !m.contains(&b.ingest));
}

/// The operator runs the roles with `--require-keys`: a role starts while its config
/// lists no key, refuses every request, and serves a project once a reload brings
/// its keys.
#[tokio::test]
async fn require_keys_starts_closed_and_admits_keys_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "tenants: []\n").unwrap();
    let storage = dir.path().join("blocks");
    std::fs::create_dir_all(&storage).unwrap();
    let args: Vec<String> = [
        "querier",
        "--storage",
        storage.to_str().unwrap(),
        "--query-addr",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
        "--require-keys",
    ]
    .map(String::from)
    .to_vec();
    let querier = Loupe::spawn(&args, dir.path(), &[], &["query-api"]);
    let path = "/api/v1/traces?start=0";
    assert_eq!(query(&querier, None, path).await.0, 401, "no open tenant");
    let a = Keys::new();
    assert_eq!(query(&querier, Some(&a.query), path).await.0, 401);

    std::fs::write(
        &config,
        format!("tenants:\n{}", a.yaml("team-a/chat", "prod")),
    )
    .unwrap();
    await_status(&querier, &a.query, path, 200).await;
    assert_eq!(
        query(&querier, None, path).await.0,
        401,
        "still no open tenant"
    );
    assert_eq!(
        query(&querier, Some(&a.ingest), path).await.0,
        403,
        "an ingest key cannot read"
    );
}

#[tokio::test]
async fn langfuse_sdks_authenticate_with_the_ingest_key_as_their_secret_key() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("tenants:\n{}", keys.yaml("team-a/chat", "prod")),
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    // What Langfuse's OTel exporter sends: Basic base64(public key:secret key) to
    // /api/public/otel/v1/traces.
    let send = |secret: &str| {
        let (trace, req) = simple_trace("lf-app", "u");
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("pk-lf-1234:{secret}"));
        let post = reqwest::Client::new()
            .post(format!("{}/api/public/otel/v1/traces", loupe.http))
            .header("content-type", "application/x-protobuf")
            .header("authorization", format!("Basic {basic}"))
            .body(prost::Message::encode_to_vec(&req))
            .send();
        async move { (hex(&trace), post.await.unwrap().status().as_u16()) }
    };
    let (trace, status) = send(&keys.ingest).await;
    assert_eq!(status, 200);
    await_status(&loupe, &keys.query, &format!("/api/v1/traces/{trace}"), 200).await;
    assert_eq!(send("sk-lf-not-a-loupe-key").await.1, 401);
    assert_eq!(send(&keys.query).await.1, 403, "a query key cannot write");
}
