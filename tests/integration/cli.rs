//! `loupe traces get|search` and `loupe demo` against a running standalone.

use std::process::Command;

use crate::harness::*;

#[tokio::test]
async fn traces_commands_print_the_tree_and_the_search_table() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let (t, req) = simple_trace("cli-svc", "u-cli");
    loupe.grpc_client().await.export(req).await.unwrap();
    let id = hex(&t);

    let tree = loupe_ok(&["traces", "get", &id, "--url", &loupe.query]);
    assert!(
        tree.starts_with(&format!("trace {id}  rag.query  (cli-svc)")),
        "{tree}"
    );
    assert!(tree.contains("2 spans · 1,500 tokens"), "{tree}");
    let llm_line = tree
        .lines()
        .find(|l| l.contains("└─ llm.chat"))
        .unwrap_or_else(|| panic!("{tree}"));
    assert!(
        llm_line.contains("LLM") && llm_line.contains("700 ms"),
        "{llm_line}"
    );
    assert!(
        llm_line.contains("gpt-4o-mini") && llm_line.contains("1,500 tok"),
        "{llm_line}"
    );

    let table = loupe_ok(&[
        "traces",
        "search",
        "--url",
        &loupe.query,
        "--user-id",
        "u-cli",
    ]);
    assert!(
        table.lines().next().unwrap().starts_with("TRACE ID"),
        "{table}"
    );
    assert!(
        table.contains(&id) && table.contains("rag.query (cli-svc)"),
        "{table}"
    );
    assert!(table.ends_with("1 traces\n"), "{table}");

    let json = loupe_ok(&[
        "traces",
        "search",
        "--url",
        &loupe.query,
        "--json",
        "--user-id",
        "nobody",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["traces"].as_array().unwrap().len(), 0);

    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(["traces", "get", "zz", "--url", &loupe.query])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 hexadecimal"));
}

#[tokio::test]
async fn demo_sends_every_scenario_through_otlp() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let out = loupe_ok(&[
        "demo",
        "--endpoint",
        &loupe.grpc,
        "--traces",
        "60",
        "--seed",
        "7",
    ]);
    assert!(out.starts_with("sent 60 demo traces"), "{out}");
    let (status, body) = loupe.get("/api/v1/traces?since=3h&limit=1000").await;
    assert_eq!(status, 200);
    let traces = body["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 60, "{body}");
    for kind in [
        "LLM",
        "CHAIN",
        "RETRIEVER",
        "EMBEDDING",
        "TOOL",
        "RERANKER",
        "AGENT",
    ] {
        assert!(
            !loupe
                .search_ids(&format!("llm_kind={kind}"))
                .await
                .is_empty(),
            "no {kind} span"
        );
    }
    assert!(!loupe.search_ids("status=error").await.is_empty());
    assert!(traces.iter().any(|t| t["cost_usd"].as_f64().unwrap() > 0.0));
}

#[tokio::test]
async fn generate_writes_blocks_that_standalone_serves_whole() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = dir.path().join("blocks");
    let out = loupe_ok(&[
        "generate",
        "--storage",
        blocks.to_str().unwrap(),
        "--spans",
        "3k",
        "--block-spans",
        "1k",
        "--window",
        "2h",
    ]);
    // "wrote N spans (T traces) in 3 blocks, …"
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words[0], "wrote", "{out}");
    let spans: u64 = words[1].parse().unwrap();
    let traces: usize = words[3].trim_start_matches('(').parse().unwrap();
    assert!((3_000..3_300).contains(&spans), "{out}");
    assert!(out.contains("in 3 blocks"), "{out}");
    let metas = walk(&blocks)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".meta.json"))
        .count();
    assert_eq!(metas, 3);

    // Standalone finds the blocks under its data directory and serves every span.
    let loupe = Loupe::start(dir.path(), &[]);
    let (status, found) = loupe.get("/api/v1/traces?since=3h&limit=1000").await;
    assert_eq!(status, 200, "{found}");
    let found = found["traces"].as_array().unwrap();
    assert_eq!(found.len(), traces);
    let span_sum: u64 = found
        .iter()
        .map(|t| t["span_count"].as_u64().unwrap())
        .sum();
    assert_eq!(span_sum, spans);
    assert!(found.iter().any(|t| t["cost_usd"].as_f64().unwrap() > 0.0));
    let (status, metrics) = loupe
        .get("/api/v1/metrics?since=3h&step=3h&group_by=model")
        .await;
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics["series"].as_array().unwrap().len() >= 3,
        "several models: {metrics}"
    );

    // Bad counts are refused with the reason.
    let bad = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args([
            "generate",
            "--storage",
            blocks.to_str().unwrap(),
            "--spans",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be between 1 and"));
}

#[tokio::test]
async fn purge_deletes_one_projects_data_and_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = dir.path().join("blocks");
    let storage = blocks.to_str().unwrap();
    for (tenant, spans) in [("default/default", "2k"), ("team-b/chat", "1k")] {
        loupe_ok(&[
            "generate",
            "--storage",
            storage,
            "--tenant",
            tenant,
            "--spans",
            spans,
            "--block-spans",
            "1k",
            "--window",
            "1h",
        ]);
    }
    // Without keys the querier serves default/default.
    let querier = Loupe::querier(storage, &dir.path().join("logs"), &[]);
    let (status, found) = querier.get("/api/v1/traces?since=2h&limit=5").await;
    assert_eq!(status, 200, "{found}");
    let first = found["traces"][0]["trace_id"].as_str().unwrap().to_owned();
    // A deletion request leaves a record, which the purge removes too.
    loupe_ok(&["traces", "delete", &first, "--url", &querier.query]);
    let records = blocks.join("deletions/default/default");
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 1);

    // A dry run says what would go and deletes nothing.
    let dry = loupe_ok(&["purge", "--storage", storage, "--tenant", "default/default"]);
    assert!(dry.starts_with("dry run: would delete 2 blocks ("), "{dry}");
    assert!(dry.contains("nothing deleted"), "{dry}");
    let (_, still) = querier.get("/api/v1/traces?since=2h&limit=5").await;
    assert_eq!(still["traces"].as_array().unwrap().len(), 5);

    let done = loupe_ok(&[
        "purge",
        "--storage",
        storage,
        "--tenant",
        "default/default",
        "--yes",
    ]);
    assert!(done.starts_with("deleted 2 blocks ("), "{done}");
    eventually(std::time::Duration::from_secs(10), || {
        let q = &querier;
        async move {
            let (status, found) = q.get("/api/v1/traces?since=2h&limit=5").await;
            let n = found["traces"].as_array().map_or(usize::MAX, Vec::len);
            (status == 200 && n == 0)
                .then_some(())
                .ok_or(format!("{status}: {n} traces still served"))
        }
    })
    .await;
    assert!(walk(&blocks.join("tenants/default")).is_empty());
    assert!(!records.exists() || walk(&records).is_empty());
    // The other project keeps every block.
    let left = loupe_ok(&["purge", "--storage", storage, "--tenant", "team-b/chat"]);
    assert!(
        left.starts_with("dry run: would delete 1 block ("),
        "{left}"
    );
}
