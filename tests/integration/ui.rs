//! The web UI: the API it adds (who am I, annotations with a query key), and the
//! pages in a real headless Chromium driven by playwright-core
//! (`tests/ui/ui.test.mjs`), against `loupe standalone` with demo data. The browser
//! test runs when `LOUPE_TEST_CHROMIUM` names Chromium (`scripts/test.sh` installs
//! Debian's and the npm packages of `tests/ui`), and says it was skipped otherwise.
//! Screenshots of every page go to `target/ui-artifacts/`; `UPDATE_SCREENSHOTS=1`
//! copies them to `docs/screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use loupe_core::keys::{KeyHash, Scope, generate};
use serde_json::{Value, json};

use crate::harness::*;

/// A config with one prod project `shop/chat` and its two keys.
fn keyed_config(dir: &Path) -> (PathBuf, String, String) {
    let (ingest, query) = (generate(Scope::Ingest), generate(Scope::Query));
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "tenants:\n  - id: shop/chat\n    environment: prod\n    keys:\n      - {{ name: app, scope: ingest, hash: \"{}\" }}\n      - {{ name: ui, scope: query, hash: \"{}\" }}\n",
            KeyHash::of(&ingest),
            KeyHash::of(&query)
        ),
    )
    .unwrap();
    (path, ingest, query)
}

/// GETs a query API URL with a query key; the JSON answer.
async fn get_json(http: &reqwest::Client, url: String, key: &str) -> Value {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn whoami_names_the_project_and_environment_of_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ingest, query) = keyed_config(dir.path());
    let loupe = Loupe::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let http = reqwest::Client::new();
    let me = get_json(&http, format!("{}/api/v1/whoami", loupe.query), &query).await;
    assert_eq!(me["project"], "shop/chat");
    assert_eq!(me["environment"], "prod");
    assert_eq!(me["key_name"], "ui");
    assert_eq!(me["open"], false);
    assert_eq!(me["scores_writable"], true);
    for (key, status) in [
        (None, 401),
        (Some("loupe_qk_unknown"), 401),
        (Some(ingest.as_str()), 403),
    ] {
        let mut req = http.get(format!("{}/api/v1/whoami", loupe.query));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        assert_eq!(req.send().await.unwrap().status(), status, "{key:?}");
    }
}

#[tokio::test]
async fn a_person_scores_a_trace_through_the_query_api_with_a_query_key() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ingest, query) = keyed_config(dir.path());
    let loupe = Loupe::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let (trace, req) = simple_trace("chat", "ann");
    let sent = reqwest::Client::new()
        .post(format!("{}/v1/traces", loupe.http))
        .header("content-type", "application/x-protobuf")
        .bearer_auth(&ingest)
        .body(prost::Message::encode_to_vec(&req))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let trace_id = hex(&trace);
    let http = reqwest::Client::new();
    let post = |key: &str, body: Value| {
        http.post(format!("{}/api/v1/scores", loupe.query))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let score = json!({ "trace_id": trace_id, "name": "helpful", "value": false,
                        "source": "human", "comment": "answered another question" });
    let r = post(&query, score.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let ids: Value = r.json().await.unwrap();
    assert_eq!(ids["ids"].as_array().unwrap().len(), 1);
    // It is the project's, durable, and shows with the trace.
    let got = eventually(Duration::from_secs(20), || async {
        let v = get_json(
            &http,
            format!("{}/api/v1/traces/{trace_id}", loupe.query),
            &query,
        )
        .await;
        let scores = v["scores"].as_array().cloned().unwrap_or_default();
        scores
            .into_iter()
            .find(|s| s["name"] == "helpful")
            .ok_or_else(|| "no score yet".to_owned())
    })
    .await;
    assert_eq!(got["source"], "human");
    assert_eq!(got["label"], "false");
    assert_eq!(got["comment"], "answered another question");
    // The list and the trace name its user (the trace list's user column).
    let listed = get_json(
        &http,
        format!("{}/api/v1/traces?start=0", loupe.query),
        &query,
    )
    .await;
    assert_eq!(listed["traces"][0]["user_id"], "ann", "{listed}");
    let whole = get_json(
        &http,
        format!("{}/api/v1/traces/{trace_id}", loupe.query),
        &query,
    )
    .await;
    assert_eq!(whole["user_id"], "ann");
    // An ingest key does not read, and an invalid score is refused naming the field.
    assert_eq!(post(&ingest, score).await.unwrap().status(), 403);
    let bad = post(
        &query,
        json!({ "trace_id": trace_id, "name": "", "value": 1 }),
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("name"));
}

#[tokio::test]
async fn a_querier_without_a_write_path_says_where_scores_go() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("blocks");
    std::fs::create_dir_all(&storage).unwrap();
    let querier = Loupe::querier(storage.to_str().unwrap(), dir.path(), &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scores", querier.query))
        .json(&json!({ "trace_id": "0af7651916cd43dd8448eb211c80319c", "name": "x", "value": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.text().await.unwrap().contains("ingest endpoint"));
    // The UI itself is served there too.
    let page = reqwest::get(format!("{}/", querier.query)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/ui/js/main.js"));
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn the_ui_finds_opens_compares_and_charts_traces_in_a_real_browser() {
    let Ok(chromium) = std::env::var("LOUPE_TEST_CHROMIUM") else {
        eprintln!(
            "skipped: set LOUPE_TEST_CHROMIUM to Chromium (scripts/test.sh installs Debian's chromium and runs npm ci in tests/ui)"
        );
        return;
    };
    let ui_tests = repo().join("tests/ui");
    assert!(
        ui_tests.join("node_modules/playwright-core").is_dir(),
        "run `npm ci` in tests/ui (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let open = Loupe::start(
        &dir.path().join("open"),
        &["--demo", "--demo-traces", "150"],
    );
    // The demo's traces are stored.
    eventually(Duration::from_secs(60), || async {
        let n = open.search_ids("").await.len();
        (n >= 150)
            .then_some(())
            .ok_or(format!("{n} of 150 demo traces"))
    })
    .await;
    let (config, _, query_key) = keyed_config(dir.path());
    let keyed = Loupe::start(
        &dir.path().join("keyed"),
        &["--config", config.to_str().unwrap()],
    );

    // This run's screenshots only.
    let artifacts = repo().join("target/ui-artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = Command::new("node")
        .arg(ui_tests.join("ui.test.mjs"))
        .env("LOUPE_TEST_CHROMIUM", &chromium)
        .env("LOUPE_UI_URL", &open.query)
        .env("LOUPE_UI_INGEST_URL", &open.http)
        .env("LOUPE_UI_KEYED_URL", &keyed.query)
        .env("LOUPE_UI_QUERY_KEY", &query_key)
        .env("LOUPE_UI_ARTIFACTS", &artifacts)
        .current_dir(&ui_tests)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\nscreenshots in {}",
        artifacts.display()
    );
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let docs = repo().join("docs/screenshots");
        std::fs::create_dir_all(&docs).unwrap();
        for entry in std::fs::read_dir(&artifacts).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "png") {
                std::fs::copy(&p, docs.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
}
