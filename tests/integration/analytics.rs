//! The analytics API through the real binary: LLM metrics by model, user and feature
//! (with sampled-out traffic extrapolated), scores, sessions and users, and trace
//! comparison.

use std::time::Duration;

use loupe_core::pricing::PriceBook;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::Value;

use crate::harness::*;

/// A request: a root span for `user` and `feature`, with one LLM call.
fn llm_trace(
    user: &str,
    feature: &str,
    model: &str,
    tokens: (i64, i64),
    llm_ms: u64,
    error: bool,
) -> ([u8; 16], Vec<Span>) {
    let t = id::<16>();
    let root = id::<8>();
    let mut r = span(t, root, None, "answer", 0, llm_ms + 100);
    r.attributes = vec![
        kv("openinference.span.kind", "CHAIN"),
        kv("user.id", user),
        kv("loupe.feature", feature),
    ];
    let mut llm = span(t, id::<8>(), Some(root), "llm.chat", 50, llm_ms);
    llm.attributes = vec![
        kv("gen_ai.provider.name", "openai"),
        kv("gen_ai.request.model", model),
        kv("gen_ai.usage.input_tokens", tokens.0),
        kv("gen_ai.usage.output_tokens", tokens.1),
    ];
    if error {
        llm.status = Some(opentelemetry_proto::tonic::trace::v1::Status {
            code: StatusCode::Error as i32,
            message: "rate limited".into(),
        });
    }
    (t, vec![r, llm])
}

fn price(model: &str, input: i64, output: i64) -> f64 {
    let today = chrono::Utc::now().date_naive();
    let book = PriceBook::builtin();
    let e = book
        .lookup(model, today)
        .expect("model is in the built-in table");
    (input as f64 * e.input + output as f64 * e.output) / 1e6
}

fn series<'a>(resp: &'a Value, group: &[(&str, &str)]) -> &'a Value {
    resp["series"]
        .as_array()
        .unwrap_or_else(|| panic!("no series in {resp}"))
        .iter()
        .find(|s| group.iter().all(|(k, v)| s["group"][*k] == *v))
        .unwrap_or_else(|| panic!("no series {group:?} in {resp}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[tokio::test]
async fn metrics_group_requests_tokens_cost_and_latency_by_model_user_and_feature() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    let mut spans = Vec::new();
    for i in 0..3 {
        spans.extend(llm_trace("alice", "checkout", "gpt-4o-mini", (1200, 300), 700, i == 0).1);
    }
    for _ in 0..2 {
        spans.extend(llm_trace("bob", "search", "gpt-4o", (500, 100), 300, false).1);
    }
    client.export(request("shop", spans)).await.unwrap();

    // By model: one request per LLM call, with its tokens, price and latency.
    let (status, by_model) = loupe
        .get("/api/v1/metrics?since=1h&step=1h&group_by=model")
        .await;
    assert_eq!(status, 200, "{by_model}");
    assert_eq!(by_model["level"], "span");
    let mini = series(&by_model, &[("model", "gpt-4o-mini")]);
    assert_eq!(mini["requests"], 3);
    assert_eq!(mini["errors"], 1);
    assert_eq!(mini["input_tokens"], 3600);
    assert_eq!(mini["output_tokens"], 900);
    assert!(close(
        mini["cost_usd"].as_f64().unwrap(),
        3.0 * price("gpt-4o-mini", 1200, 300)
    ));
    // One bucket: the range is the last hour and the step an hour.
    let points = mini["points"].as_array().unwrap();
    assert_eq!(points.len(), 1, "{mini}");
    assert_eq!(points[0]["requests"], 3);
    assert_eq!(points[0]["latency_ms"]["p50"], 700.0);
    assert!(close(points[0]["error_rate"].as_f64().unwrap(), 1.0 / 3.0));
    let big = series(&by_model, &[("model", "gpt-4o")]);
    assert_eq!(big["requests"], 2);
    assert_eq!(big["errors"], 0);
    assert!(close(
        big["cost_usd"].as_f64().unwrap(),
        2.0 * price("gpt-4o", 500, 100)
    ));
    assert_eq!(
        by_model["series"][0]["group"]["model"], "gpt-4o-mini",
        "most requests first"
    );
    assert_eq!(by_model["sampling"]["extrapolated"], false);

    // By user and feature: one request per trace; the user and feature are on the
    // root span, tokens and cost on its LLM child.
    let (status, by_user) = loupe
        .get("/api/v1/metrics?since=1h&group_by=user,feature")
        .await;
    assert_eq!(status, 200, "{by_user}");
    assert_eq!(by_user["level"], "trace");
    let alice = series(&by_user, &[("user", "alice"), ("feature", "checkout")]);
    assert_eq!(alice["requests"], 3);
    assert_eq!(alice["errors"], 1);
    assert_eq!(alice["input_tokens"], 3600);
    let bob = series(&by_user, &[("user", "bob"), ("feature", "search")]);
    assert_eq!(bob["requests"], 2);
    assert!(close(
        bob["cost_usd"].as_f64().unwrap(),
        2.0 * price("gpt-4o", 500, 100)
    ));

    // LLM calls by model for one user: the user comes from the call's trace.
    let (status, alice_models) = loupe
        .get("/api/v1/metrics?since=1h&group_by=model&user_id=alice")
        .await;
    assert_eq!(status, 200, "{alice_models}");
    let series_list = alice_models["series"].as_array().unwrap();
    assert_eq!(series_list.len(), 1, "{alice_models}");
    assert_eq!(series_list[0]["group"]["model"], "gpt-4o-mini");

    // Bad input is named.
    let (status, err) = loupe.get("/api/v1/metrics?group_by=colour").await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("colour"), "{err}");
    let (status, err) = loupe
        .get("/api/v1/metrics?group_by=model&level=trace")
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("level=span"),
        "{err}"
    );
}

#[tokio::test]
async fn metrics_extrapolate_traces_sampling_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "tenants:\n  - id: default/default\n    environment: dev\n    sampling:\n      decision_wait: 1s\n      keep_errors: true\n      percentage: 0\n",
    )
    .unwrap();
    let mut loupe = Loupe::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut client = loupe.grpc_client().await;
    let mut spans = Vec::new();
    for i in 0..10 {
        spans.extend(llm_trace("carol", "chat", "gpt-4o-mini", (100, 10), 200, i < 2).1);
    }
    client.export(request("shop", spans)).await.unwrap();

    // The 2 failed traces are kept, the 8 others dropped after the decision wait:
    // each stored trace stands for 5.
    let resp = eventually(Duration::from_secs(20), || async {
        let (status, resp) = loupe.get("/api/v1/metrics?since=1h&group_by=user").await;
        if status != 200 {
            return Err(format!("{status}: {resp}"));
        }
        let est = resp["series"][0]["estimated"]["requests"].as_f64();
        if est != Some(10.0) {
            return Err(format!("estimated requests not yet 10: {resp}"));
        }
        Ok(resp)
    })
    .await;
    let carol = series(&resp, &[("user", "carol")]);
    assert_eq!(carol["requests"], 2, "stored");
    assert_eq!(carol["errors"], 2);
    assert_eq!(carol["estimated"]["input_tokens"], 10.0 * 100.0);
    assert_eq!(resp["sampling"]["extrapolated"], true);
    assert_eq!(resp["sampling"]["kept_spans"], 4);
    assert_eq!(resp["sampling"]["seen_spans"], 20);
    assert!(
        resp["sampling"]["note"]
            .as_str()
            .unwrap()
            .contains("stored 4 of 20 spans"),
        "{resp}"
    );

    // Written into a block at shutdown, the counts travel with it.
    // (The client's connection closes once its task runs: terminate() blocks.)
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(loupe.terminate().success());
    assert!(!loupe.log().contains("drain timeout"), "{}", loupe.log());
    let loupe = Loupe::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let (_, again) = loupe.get("/api/v1/metrics?since=1h&group_by=user").await;
    let after = series(&again, &[("user", "carol")]);
    assert_eq!(after["requests"], 2, "{again}");
    assert_eq!(after["estimated"], carol["estimated"], "{again}");
    assert_eq!(again["sampling"]["kept_spans"], 4);
    assert_eq!(again["sampling"]["seen_spans"], 20);
}

#[tokio::test]
async fn compare_aligns_two_runs_and_reports_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    // Run a: one LLM call; run b: another model, more tokens, a failing extra tool call.
    let (a, spans_a) = llm_trace("dan", "chat", "gpt-4o-mini", (1000, 200), 400, false);
    let (b, mut spans_b) = llm_trace("dan", "chat", "gpt-4o", (1500, 200), 900, false);
    let root_b = spans_b[0].span_id.clone();
    let mut tool = span(b, id::<8>(), None, "search_docs", 960, 30);
    tool.parent_span_id = root_b;
    tool.attributes = vec![kv("openinference.span.kind", "TOOL")];
    tool.status = Some(opentelemetry_proto::tonic::trace::v1::Status {
        code: StatusCode::Error as i32,
        message: "timeout".into(),
    });
    spans_b.push(tool);
    let mut spans = spans_a;
    spans.extend(spans_b);
    client.export(request("shop", spans)).await.unwrap();

    let (status, cmp) = loupe
        .get(&format!("/api/v1/compare?a={}&b={}", hex(&a), hex(&b)))
        .await;
    assert_eq!(status, 200, "{cmp}");
    let aligned = cmp["aligned"].as_array().unwrap();
    let names: Vec<&str> = aligned
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["answer", "llm.chat"], "{cmp}");
    let llm = &aligned[1];
    assert_eq!(llm["same"], false);
    let diff = |field: &str| {
        llm["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["field"] == field)
            .unwrap_or_else(|| panic!("no {field} difference in {llm}"))
            .clone()
    };
    assert_eq!(diff("model")["a"], "gpt-4o-mini");
    assert_eq!(diff("model")["b"], "gpt-4o");
    assert_eq!(diff("input_tokens")["delta"], 500.0);
    assert_eq!(diff("duration_ms")["delta"], 500.0);
    assert!(
        llm["differences"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["field"] != "output_tokens"),
        "equal output tokens are not a difference: {llm}"
    );
    let only_b = cmp["only_in_b"].as_array().unwrap();
    assert_eq!(only_b.len(), 1, "{cmp}");
    assert_eq!(only_b[0]["name"], "search_docs");
    assert!(cmp["only_in_a"].as_array().unwrap().is_empty());
    assert_eq!(cmp["totals_diff"]["span_count"], 1);

    // A missing trace is named.
    let missing = "0123456789abcdef0123456789abcdef";
    let (status, err) = loupe
        .get(&format!("/api/v1/compare?a={}&b={missing}", hex(&a)))
        .await;
    assert_eq!(status, 404);
    assert!(err["error"].as_str().unwrap().contains("trace b"), "{err}");
    let (status, _) = loupe.get(&format!("/api/v1/compare?a={}", hex(&a))).await;
    assert_eq!(status, 400);
}

/// POSTs scores to the ingest port; returns status and body.
async fn post_scores(loupe: &Loupe, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scores", loupe.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn scores_are_durable_shown_with_traces_filter_searches_and_have_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    let (good, spans_good) = llm_trace("erin", "rag", "gpt-4o-mini", (100, 10), 200, false);
    let (bad, spans_bad) = llm_trace("erin", "rag", "gpt-4o-mini", (100, 10), 200, false);
    let llm_span = hex(&spans_bad[1].span_id);
    let mut spans = spans_good;
    spans.extend(spans_bad);
    client.export(request("shop", spans)).await.unwrap();

    let now = chrono::Utc::now();
    let last_week = (now - chrono::Duration::days(7)).to_rfc3339();
    let (status, resp) = post_scores(
        &loupe,
        serde_json::json!([
            {"trace_id": hex(&good), "name": "faithfulness", "value": 0.9, "source": "llm_judge"},
            {"trace_id": hex(&bad), "name": "faithfulness", "value": 0.3, "source": "llm_judge",
             "comment": "cites a document that says otherwise", "id": "judge-1"},
            {"trace_id": hex(&bad), "span_id": llm_span, "name": "helpful", "value": false, "source": "human"},
            {"traceId": hex(&bad), "name": "topic", "value": "billing"},
            // Last week's judgements of other traces averaged 0.75.
            {"trace_id": "11111111111111111111111111111111", "name": "faithfulness", "value": 0.7, "timestamp": last_week},
            {"trace_id": "22222222222222222222222222222222", "name": "faithfulness", "value": 0.8, "timestamp": last_week},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["ids"].as_array().unwrap().len(), 6);
    assert_eq!(resp["ids"][1], "judge-1");

    // A bad score is refused whole, naming it.
    let (status, err) = post_scores(
        &loupe,
        serde_json::json!([{"trace_id": hex(&bad), "name": "x", "value": 1, "source": "robot"}]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("scores[0]: source must be"),
        "{err}"
    );

    check_scores(&loupe, &hex(&bad), &llm_span).await;

    // Durable: after a restart the scores come from blocks, each once.
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(loupe.terminate().success());
    assert!(
        walk(dir.path())
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".scores.parquet")),
        "scores are in a block"
    );
    let loupe = Loupe::start(dir.path(), &[]);
    check_scores(&loupe, &hex(&bad), &llm_span).await;

    // Sent again with its id, a score is replaced.
    let (status, _) = post_scores(
        &loupe,
        serde_json::json!({"trace_id": hex(&bad), "name": "faithfulness", "value": 0.95, "id": "judge-1"}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, found) = loupe
        .get("/api/v1/traces?since=24h&score=faithfulness<0.5")
        .await;
    assert!(found["traces"].as_array().unwrap().is_empty(), "{found}");
}

/// What a user checks of the scores posted in the scores test.
async fn check_scores(loupe: &Loupe, bad: &str, llm_span: &str) {
    // Returned with the trace: the trace's and the span's.
    let (_, trace) = loupe.get(&format!("/api/v1/traces/{}", bad)).await;
    let scores = trace["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 3, "{trace}");
    let f = scores.iter().find(|s| s["name"] == "faithfulness").unwrap();
    assert_eq!(f["value"], 0.3);
    assert_eq!(f["source"], "llm_judge");
    assert_eq!(f["comment"], "cites a document that says otherwise");
    let h = scores.iter().find(|s| s["name"] == "helpful").unwrap();
    assert_eq!(h["span_id"], llm_span);
    assert_eq!(
        (h["data_type"].as_str(), h["label"].as_str()),
        (Some("boolean"), Some("false"))
    );
    let t = scores.iter().find(|s| s["name"] == "topic").unwrap();
    assert_eq!(t["label"], "billing");

    // "faithfulness < 0.5 in the last 24 h" finds the bad trace only.
    let (status, found) = loupe
        .get("/api/v1/traces?since=24h&score=faithfulness<0.5")
        .await;
    assert_eq!(status, 200, "{found}");
    let ids: Vec<&str> = found["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bad]);
    let (_, found) = loupe
        .get("/api/v1/traces?since=24h&score=helpful=false,topic=billing")
        .await;
    assert_eq!(found["traces"].as_array().unwrap().len(), 1, "{found}");

    // Week over week: 0.75 last week, 0.6 this week: a 20 % drop.
    let (status, m) = loupe
        .get("/api/v1/scores/metrics?since=14d&step=7d&name=faithfulness")
        .await;
    assert_eq!(status, 200, "{m}");
    let series = &m["series"][0];
    assert_eq!(series["count"], 4);
    let points = series["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{m}");
    assert!(
        (points[0]["avg"].as_f64().unwrap() - 0.75).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (points[1]["avg"].as_f64().unwrap() - 0.6).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (points[1]["change"].as_f64().unwrap() + 0.2).abs() < 1e-9,
        "{m}"
    );

    let (_, listed) = loupe
        .get(&format!("/api/v1/scores?since=1h&trace_id={}", bad))
        .await;
    assert_eq!(listed["scores"].as_array().unwrap().len(), 3, "{listed}");
}

#[tokio::test]
async fn sessions_list_their_turns_in_order_and_users_their_totals() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    // alice: a 3-turn conversation and a 1-turn one; bob: one turn with a big model.
    let turns = [
        ("alice", "s-1", "gpt-4o-mini", 1),
        ("alice", "s-1", "gpt-4o-mini", 2),
        ("alice", "s-1", "gpt-4o-mini", 3),
        ("alice", "s-2", "gpt-4o-mini", 4),
        ("bob", "s-3", "gpt-4o", 5),
    ];
    let mut ids = Vec::new();
    let mut spans = Vec::new();
    for (user, session, model, second) in turns {
        let (t, mut trace) = llm_trace(user, "chat", model, (1000, 100), 300, false);
        trace[0].attributes.push(kv("session.id", session));
        for s in &mut trace {
            s.start_time_unix_nano += second * 1_000_000_000;
            s.end_time_unix_nano += second * 1_000_000_000;
        }
        ids.push(hex(&t));
        spans.extend(trace);
    }
    client.export(request("chat", spans)).await.unwrap();

    let (status, sessions) = loupe.get("/api/v1/sessions?since=1h").await;
    assert_eq!(status, 200, "{sessions}");
    let list = sessions["sessions"].as_array().unwrap();
    let order: Vec<&str> = list.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        order,
        ["s-3", "s-2", "s-1"],
        "most recent first: {sessions}"
    );
    let s1 = &list[2];
    assert_eq!(s1["user_id"], "alice");
    assert_eq!(s1["traces"], 3);
    assert_eq!(s1["input_tokens"], 3000);
    let (_, mine) = loupe.get("/api/v1/sessions?since=1h&user_id=alice").await;
    assert_eq!(mine["sessions"].as_array().unwrap().len(), 2, "{mine}");

    // A session's turns, oldest first.
    let (status, s) = loupe.get("/api/v1/sessions/s-1?since=1h").await;
    assert_eq!(status, 200, "{s}");
    let turns: Vec<&str> = s["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(turns, [ids[0].as_str(), ids[1].as_str(), ids[2].as_str()]);
    let (status, _) = loupe.get("/api/v1/sessions/nope?since=1h").await;
    assert_eq!(status, 404);

    // Users by cost: bob's one gpt-4o call costs more than alice's four mini calls.
    let (status, users) = loupe.get("/api/v1/users?since=1h").await;
    assert_eq!(status, 200, "{users}");
    let list = users["users"].as_array().unwrap();
    assert_eq!(list[0]["id"], "bob", "{users}");
    assert!(close(
        list[0]["cost_usd"].as_f64().unwrap(),
        price("gpt-4o", 1000, 100)
    ));
    assert_eq!(list[1]["id"], "alice");
    assert_eq!(list[1]["traces"], 4);
    assert_eq!(list[1]["sessions"], 2);
    let (_, by_traces) = loupe.get("/api/v1/users?since=1h&order=traces").await;
    assert_eq!(by_traces["users"][0]["id"], "alice");
    let (status, err) = loupe.get("/api/v1/users?order=colour").await;
    assert_eq!(status, 400, "{err}");
}

#[tokio::test]
async fn every_route_of_the_openapi_document_answers() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    let (t, mut spans) = llm_trace("gina", "chat", "gpt-4o-mini", (10, 1), 100, false);
    spans[0].attributes.push(kv("session.id", "s-9"));
    client.export(request("chat", spans)).await.unwrap();

    let (status, doc) = loupe.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 19, "{}", paths.len());
    for (path, ops) in paths {
        if ops.get("get").is_none() {
            continue;
        }
        let url = path
            .replace("{trace_id}", &hex(&t))
            .replace("{session_id}", "s-9")
            .replace("{tag}", "name");
        let url = if path == "/api/v1/compare" {
            format!("{url}?a={0}&b={0}", hex(&t))
        } else if url.starts_with("/api/v1/")
            && !url.ends_with("openapi.json")
            && !url.contains(&hex(&t))
        {
            format!("{url}?since=1h")
        } else {
            url
        };
        let r = reqwest::get(format!("{}{url}", loupe.query)).await.unwrap();
        assert_eq!(r.status(), 200, "GET {url}: {}", r.text().await.unwrap());
    }
}
