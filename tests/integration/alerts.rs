//! `loupe alerts check` and `loupe gate` against a running standalone: the rules and
//! bounds are evaluated over the query API, from spans and scores sent over OTLP and
//! the scores API.

use std::process::Command;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::Status;
use serde_json::{Value, json};

use crate::harness::*;

/// Runs `loupe <args>`: exit code, stdout, stderr.
fn loupe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 40 `chat` traces of ~900 ms, 4 of them failed, prompt v7 and v6 in turn; 25
/// faithfulness scores averaging 0.496 now (0.4 on the 13 v7 traces, 0.6 on the 12
/// v6 ones) and 25 of 0.9 two days ago.
async fn traffic(loupe: &Loupe) {
    let mut client = loupe.grpc_client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let (t, mut req) = simple_trace("chat", "u-1");
        let llm = &mut req.resource_spans[0].scope_spans[0].spans[1];
        let version = if i % 2 == 0 { "v7" } else { "v6" };
        llm.attributes
            .push(kv("llm.prompt_template.version", version));
        if i % 10 == 0 {
            llm.status = Some(Status {
                code: 2,
                message: "rate limited".into(),
            });
        }
        client.export(req).await.unwrap();
        ids.push(hex(&t));
    }
    let two_days_ago = chrono::Utc::now() - chrono::Duration::days(2);
    let scores: Vec<Value> = ids
        .iter()
        .take(25)
        .enumerate()
        .flat_map(|(i, id)| {
            [
                json!({ "trace_id": id, "name": "faithfulness", "value": if i % 2 == 0 { 0.4 } else { 0.6 } }),
                json!({ "trace_id": id, "name": "faithfulness", "value": 0.9,
                        "timestamp": two_days_ago.to_rfc3339() }),
            ]
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scores", loupe.http))
        .json(&scores)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(Duration::from_secs(10), || async {
        let (_, m) = loupe.get("/api/v1/metrics?since=1h&step=1h").await;
        let n = m["series"][0]["requests"].as_u64().unwrap_or(0);
        let (_, s) = loupe
            .get("/api/v1/scores/metrics?since=3d&step=3d&name=faithfulness")
            .await;
        let scores = s["series"][0]["count"].as_u64().unwrap_or(0);
        (n == 40 && scores == 50)
            .then_some(())
            .ok_or(format!("{n} requests and {scores} scores so far"))
    })
    .await;
}

const RULES: &str = "\
rules:
  - name: errors
    kind: error_rate
    window: 10m
    threshold: 0.05
    minCount: 10
  - name: slow
    kind: latency_percentile
    window: 10m
    percentile: 99
    threshold: 5000
  - name: faithfulness
    kind: score_drop
    scoreName: faithfulness
    window: 1h
    baseline: 7d
    threshold: 0.1
    for: 5m
  - name: cost
    kind: cost_spike
    window: 1h
    threshold: 2
";

#[tokio::test]
async fn alerts_check_evaluates_rules_against_the_query_api() {
    let dir = tempfile::tempdir().unwrap();
    let standalone = Loupe::start(dir.path(), &[]);
    traffic(&standalone).await;
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let rules = rules.to_str().unwrap();

    let (code, out, err) = loupe(&[
        "alerts",
        "check",
        "--rules",
        rules,
        "--url",
        &standalone.query,
        "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let states: Value = serde_json::from_str(&out).unwrap();
    let by_name = |n: &str| {
        states
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .unwrap()
            .clone()
    };
    // 4 of 40 requests failed: 10 % > 5 %, no `for`: firing.
    let errors = by_name("errors");
    assert_eq!(errors["state"], "Firing", "{errors}");
    assert!((errors["value"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    // ~900 ms traces are under 5 s.
    let slow = by_name("slow");
    assert_eq!(slow["state"], "Inactive", "{slow}");
    let p99 = slow["value"].as_f64().unwrap();
    assert!((850.0..1000.0).contains(&p99), "{slow}");
    // 0.496 against 0.9: a 44.9 % drop; with `for: 5m` it is pending.
    let faith = by_name("faithfulness");
    assert_eq!(faith["state"], "Pending", "{faith}");
    let drop = (0.9 - 0.496) / 0.9;
    assert!(
        (faith["value"].as_f64().unwrap() - drop).abs() < 1e-6,
        "{faith}"
    );
    // No cost before this hour: nothing to compare with.
    let cost = by_name("cost");
    assert_eq!(cost["state"], "Inactive", "{cost}");
    assert!(cost["value"].is_null());
    assert!(
        cost["summary"]
            .as_str()
            .unwrap()
            .contains("no cost in the baseline"),
        "{cost}"
    );

    // The table, for people.
    let (code, table, _) = loupe(&[
        "alerts",
        "check",
        "--rules",
        rules,
        "--url",
        &standalone.query,
    ]);
    assert_eq!(code, 0);
    let line = table
        .lines()
        .find(|l| l.starts_with("faithfulness"))
        .unwrap();
    assert!(
        line.contains("Pending")
            && line.contains("44.9 %")
            && line.contains("fires if it holds for 5m"),
        "{table}"
    );

    // A bad rule is refused with its name and field; an unreachable querier is an error.
    std::fs::write(
        dir.path().join("bad.yaml"),
        RULES.replace("threshold: 0.05", "threshold: 5"),
    )
    .unwrap();
    let (code, _, err) = loupe(&[
        "alerts",
        "check",
        "--rules",
        dir.path().join("bad.yaml").to_str().unwrap(),
        "--url",
        &standalone.query,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("rules[0] (errors): threshold: 5"), "{err}");
    let (code, out, err) = loupe(&[
        "alerts",
        "check",
        "--rules",
        rules,
        "--url",
        "http://127.0.0.1:9",
    ]);
    assert_ne!(code, 0);
    assert!(
        out.contains("Error") && err.contains("4 of 4 rules could not be evaluated"),
        "{out}\n{err}"
    );
}

#[tokio::test]
async fn gate_passes_and_fails_with_exit_codes_and_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let standalone = Loupe::start(dir.path(), &[]);
    traffic(&standalone).await;
    let url = standalone.query.as_str();

    // Latency and error bounds that hold: exit 0.
    let (code, out, err) = loupe(&[
        "gate",
        "--url",
        url,
        "--since",
        "10m",
        "--max-p99",
        "5s",
        "--max-error-rate",
        "20%",
        "--min-count",
        "10",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("gate passed (2 of 2 checks passed, last 10m)"),
        "{out}"
    );

    // The score average is 0.496 over the last hour: below 0.8, exit 1.
    let (code, out, _) = loupe(&[
        "gate",
        "--url",
        url,
        "--score",
        "faithfulness",
        "--min",
        "0.8",
        "--since",
        "1h",
        "--min-count",
        "20",
    ]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("score faithfulness"))
        .unwrap();
    assert!(
        line.contains("0.496") && line.contains("FAIL") && line.contains("25 scores"),
        "{out}"
    );

    // Filters narrow the traffic: 10 % errors in `chat` fail a 1 % bound …
    let (code, out, _) = loupe(&[
        "gate",
        "--url",
        url,
        "--filter",
        "service=chat",
        "--max-error-rate",
        "1%",
        "--json",
    ]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(v["checks"][0]["value"], 0.1);
    // … and too little traffic fails rather than passes.
    let (code, out, _) = loupe(&[
        "gate",
        "--url",
        url,
        "--filter",
        "service=nobody",
        "--max-p99",
        "5s",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("only 0 requests, at least 1 needed"), "{out}");

    // Scores of the traces with a matching span: v7 scored 0.4, v6 0.6.
    let (status, m) = standalone
        .get("/api/v1/scores/metrics?since=1h&step=1h&name=faithfulness&prompt_version=v7")
        .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["series"][0]["count"], 13, "{m}");
    assert!(
        (m["series"][0]["avg"].as_f64().unwrap() - 0.4).abs() < 1e-9,
        "{m}"
    );
    let (_, m) = standalone
        .get("/api/v1/scores/metrics?since=1h&step=1h&name=faithfulness&span_name=llm.chat")
        .await;
    assert_eq!(m["series"][0]["count"], 25, "{m}");
    let (code, out, _) = loupe(&[
        "gate",
        "--url",
        url,
        "--score",
        "faithfulness",
        "--filter",
        "prompt_version=v6",
        "--min",
        "0.55",
        "--min-count",
        "10",
    ]);
    assert_eq!(code, 0, "{out}");
    // v7 against v6: a third lower, over the 5 % allowed.
    let compare = [
        "gate",
        "--url",
        url,
        "--score",
        "faithfulness",
        "--compare",
        "prompt_version=v7",
        "--against",
        "prompt_version=v6",
        "--max-drop",
        "5%",
        "--min-count",
        "10",
    ];
    let (code, out, _) = loupe(&compare);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("v7 vs prompt_version=v6"))
        .unwrap();
    assert!(
        line.contains("0.3333")
            && line.contains("FAIL")
            && line.contains("0.400 over 13 scores vs 0.600 over 12"),
        "{out}"
    );
    // The other way round it is an improvement.
    let swapped = compare.map(|a| match a {
        "prompt_version=v7" => "prompt_version=v6",
        "prompt_version=v6" => "prompt_version=v7",
        other => other,
    });
    let (code, out, _) = loupe(&swapped);
    assert_eq!(code, 0, "{out}");

    // Bad bounds are refused with the reason.
    let (code, _, err) = loupe(&["gate", "--url", url, "--max-error-rate", "150%"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"150%\" is not between 0 and 100 %"), "{err}");
    let (code, _, err) = loupe(&["gate", "--url", url]);
    assert_ne!(code, 0);
    assert!(err.contains("nothing to check"), "{err}");
}

/// A real Alertmanager on a free loopback port, stopped on drop.
struct Alertmanager {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn alertmanager() -> Alertmanager {
    let bin = std::env::var("LOUPE_TEST_ALERTMANAGER")
        .ok()
        .or_else(|| {
            let p = std::path::Path::new("/usr/bin/prometheus-alertmanager");
            p.exists().then(|| p.display().to_string())
        })
        .expect("Alertmanager is needed: run scripts/test.sh (it installs Debian's prometheus-alertmanager)");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: none\nreceivers:\n  - name: none\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let am = Alertmanager {
        child,
        url: url.clone(),
        _dir: dir,
    };
    eventually(Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let r = reqwest::get(format!("{url}/-/ready"))
                .await
                .map_err(|e| e.to_string())?;
            r.status()
                .is_success()
                .then_some(())
                .ok_or("not ready".to_owned())
        }
    })
    .await;
    am
}

/// What a webhook receiver was sent: (path, JSON body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Default::default();
    let app = axum::Router::new()
        .route(
            "/{*path}",
            axum::routing::post(
                |axum::extract::State(got): axum::extract::State<Received>,
                 uri: axum::http::Uri,
                 axum::Json(body): axum::Json<Value>| async move {
                    got.lock().unwrap().push((uri.path().to_owned(), body));
                    "ok"
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

#[tokio::test]
async fn standalone_evaluates_its_rules_and_notifies_alertmanager_and_webhooks() {
    let am = alertmanager().await;
    let (hooks, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n\
             - name: chat-errors\n  kind: error_rate\n  window: 10m\n  threshold: 0.05\n  minCount: 10\n  filters: {{ service: chat }}\n  notify:\n\
             \x20 - webhook: {{ url: '{hooks}/hook' }}\n\
             \x20 - slack: {{ url: '{hooks}/services/T0/B0/secret' }}\n\
             \x20 - alertmanager: {{ url: '{}' }}\n\
             - name: chat-p99\n  kind: latency_percentile\n  percentile: 99\n  window: 10m\n  threshold: 10000\n",
            am.url
        ),
    )
    .unwrap();
    let standalone = Loupe::start(
        dir.path(),
        &[
            "--alert-rules",
            rules.to_str().unwrap(),
            "--alert-interval",
            "1s",
            "--public-url",
            "http://loupe.example:3000",
        ],
    );
    traffic(&standalone).await;

    // The state, through the query API.
    let alerts = eventually(Duration::from_secs(20), || async {
        let (status, v) = standalone.get("/api/v1/alerts").await;
        let firing = status == 200 && v["alerts"][0]["state"] == "Firing";
        let sent = v["alerts"][0]["targets"]
            .as_array()
            .is_some_and(|t| t.iter().all(|t| t["last_sent"].is_string()));
        (firing && sent).then_some(v.clone()).ok_or(format!("{v}"))
    })
    .await;
    assert_eq!(alerts["evaluated"], true);
    let errors = &alerts["alerts"][0];
    assert_eq!(errors["value_text"], "10.00 %");
    assert!(
        errors["traces"]
            .as_str()
            .unwrap()
            .starts_with("http://loupe.example:3000/api/v1/traces?start="),
        "{errors}"
    );
    assert_eq!(alerts["alerts"][1]["name"], "chat-p99");
    assert_eq!(alerts["alerts"][1]["state"], "Inactive");

    // The link lists the failed traces: 4 of them.
    let path = errors["traces"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://loupe.example:3000");
    let (_, listed) = standalone.get(path).await;
    assert_eq!(listed["traces"].as_array().unwrap().len(), 4, "{listed}");

    // Alertmanager holds the alert, with its labels and link.
    let held: Value = reqwest::get(format!("{}/api/v2/alerts", am.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let alert = held
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "chat-errors")
        .unwrap_or_else(|| panic!("{held}"));
    assert_eq!(alert["labels"]["project"], "default/default");
    assert_eq!(alert["status"]["state"], "active");
    assert!(
        alert["generatorURL"]
            .as_str()
            .unwrap()
            .contains("status=error")
    );

    // The webhook and the Slack-compatible hook, once each (no repeats while firing).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sent = got.lock().unwrap().clone();
    let hook: Vec<_> = sent.iter().filter(|(p, _)| p == "/hook").collect();
    assert_eq!(hook.len(), 1, "{sent:?}");
    assert_eq!(hook[0].1["state"], "firing");
    assert_eq!(hook[0].1["rule"], "chat-errors");
    let slack: Vec<_> = sent
        .iter()
        .filter(|(p, _)| p.starts_with("/services"))
        .collect();
    assert_eq!(slack.len(), 1);
    let text = slack[0].1["text"].as_str().unwrap();
    assert!(
        text.starts_with(":rotating_light: *[FIRING] chat-errors* (default/default, error_rate)"),
        "{text}"
    );
    assert!(text.contains("4 of 40 requests failed in 10m"), "{text}");
    // No notification URL (the Slack one is a secret) reaches the log.
    assert!(
        !standalone.log().contains("secret"),
        "the Slack URL leaked into the log"
    );
}

#[test]
fn standalone_refuses_a_bad_rules_file_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n- name: x\n  kind: error_rate\n  window: 10m\n  threshold: 0.05\n  notify:\n  - webhook: { url: 'ftp://example' }\n",
    )
    .unwrap();
    let (code, _, err) = loupe(&[
        "standalone",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--alert-rules",
        rules.to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--query-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("rules[0] (x): notify[0]: url \"ftp://example\": must be http or https"),
        "{err}"
    );
}
