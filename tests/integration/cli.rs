//! `loupe traces get|search` and `loupe demo` against a running standalone.

use std::process::Command;

use crate::harness::*;

fn loupe_cmd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loupe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn traces_commands_print_the_tree_and_the_search_table() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let (t, req) = simple_trace("cli-svc", "u-cli");
    loupe.grpc_client().await.export(req).await.unwrap();
    let id = hex(&t);

    let tree = loupe_cmd(&["traces", "get", &id, "--url", &loupe.query]);
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

    let table = loupe_cmd(&[
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

    let json = loupe_cmd(&[
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
    let out = loupe_cmd(&[
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
