//! The compactor and deletion on request, through the real binary: `loupe compactor`
//! killed at random moments while a querier keeps answering, and `DELETE` requests
//! carried out by standalone's in-process compactor.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::harness::*;

/// What a user sees of the whole project: spans stored (from the blocks a query
/// reads), traces, tokens and cost.
async fn totals(q: &Loupe) -> (u64, u64, i64, String) {
    let (status, m) = q.get("/api/v1/metrics?since=6h&step=6h&level=trace").await;
    assert_eq!(status, 200, "{m}");
    let series = m["series"].as_array().unwrap();
    let sum_u = |f: &str| series.iter().map(|s| s[f].as_u64().unwrap()).sum::<u64>();
    let sum_i = |f: &str| series.iter().map(|s| s[f].as_i64().unwrap()).sum::<i64>();
    let cost: f64 = series.iter().map(|s| s["cost_usd"].as_f64().unwrap()).sum();
    (
        m["sampling"]["kept_spans"].as_u64().unwrap(),
        sum_u("requests"),
        sum_i("input_tokens"),
        format!("{cost:.6}"),
    )
}

/// (metadata files, Parquet files without metadata) under `dir`.
fn count_files(dir: &Path) -> (usize, usize) {
    let files: Vec<String> = walk(dir)
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let metas: Vec<&String> = files.iter().filter(|f| f.ends_with(".meta.json")).collect();
    let orphans = files
        .iter()
        .filter(|f| f.ends_with(".parquet") && !f.ends_with(".scores.parquet"))
        .filter(|f| !metas.contains(&&format!("{}.meta.json", f.trim_end_matches(".parquet"))))
        .count();
    (metas.len(), orphans)
}

#[tokio::test]
async fn killing_the_compactor_at_any_moment_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("blocks");
    let s = storage.to_str().unwrap();
    loupe_ok(&[
        "generate",
        "--storage",
        s,
        "--spans",
        "4000",
        "--block-spans",
        "100",
        "--window",
        "2h",
        "--seed",
        "11",
    ]);
    let (blocks_before, _) = count_files(&storage);
    assert!(blocks_before >= 40, "{blocks_before}");

    let q = Loupe::querier(s, dir.path(), &[]);
    let expected = totals(&q).await;
    assert!(expected.0 >= 4000, "{expected:?}");
    let sample: Vec<String> = q.search_ids("limit=5").await;
    let mut spans_of = Vec::new();
    for id in &sample {
        spans_of.push(q.trace(id).await["span_count"].clone());
    }

    let compact = |pause: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loupe"));
        cmd.args([
            "compactor",
            "--storage",
            s,
            "--once",
            "--min-age",
            "0s",
            "--grace",
            "2s",
            "--target-mib",
            "1",
            "--window",
            "1h",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(ms) = pause {
            cmd.env("LOUPE_FAULT_COMPACT_PAUSE_MS", ms);
        }
        cmd.spawn().unwrap()
    };

    // Kill the compactor at random moments of its passes; between kills, and while
    // it runs, the querier must see exactly the same project.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut kills, mut checks) = (0, 0);
    let started = Instant::now();
    while kills < 12 && started.elapsed() < Duration::from_secs(120) {
        let mut child = compact(Some("40"));
        let kill_at = Instant::now() + Duration::from_millis(rng.random_range(30..700));
        while Instant::now() < kill_at {
            assert_eq!(totals(&q).await, expected, "while compacting");
            checks += 1;
        }
        match child.try_wait().unwrap() {
            Some(status) => assert!(status.success(), "the compactor failed: {status}"),
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
        assert_eq!(totals(&q).await, expected, "after a kill");
        // Let grace periods run out now and then, so deletions get killed too.
        if rng.random_bool(0.3) {
            tokio::time::sleep(Duration::from_millis(2_100)).await;
        }
    }
    assert!(kills >= 5, "only {kills} kills in 2 minutes");

    // Then run it to the end: every replaced block and orphan goes, nothing else.
    let mut idle = 0;
    while idle < 2 {
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let out = compact(None).wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        idle = if text.contains("merged 0 blocks, wrote 0")
            && text.contains("deleted 0 replaced, 0 expired and 0 orphaned")
        {
            idle + 1
        } else {
            0
        };
        assert_eq!(totals(&q).await, expected);
        checks += 1;
    }
    let (blocks_after, orphans) = count_files(&storage);
    assert_eq!(orphans, 0);
    assert!(
        blocks_after < blocks_before / 4,
        "{blocks_before} blocks became {blocks_after}"
    );
    // Every file left is a block a query reads: nothing replaced stays behind.
    let metas: Vec<Value> = walk(&storage)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".meta.json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    let replaced: Vec<&Value> = metas
        .iter()
        .flat_map(|m| m["compaction"]["replaces"].as_array().into_iter().flatten())
        .collect();
    for m in &metas {
        assert!(
            !replaced.contains(&&m["block_id"]),
            "{} was left",
            m["block_id"]
        );
    }
    for (id, spans) in sample.iter().zip(&spans_of) {
        assert_eq!(&q.trace(id).await["span_count"], spans, "trace {id}");
    }
    eprintln!("{kills} kills, {checks} checks, {blocks_before} → {blocks_after} blocks");
}

#[tokio::test]
async fn deleted_traces_vanish_from_queries_at_once_and_from_storage_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(
        dir.path(),
        &[
            "--flush-interval",
            "200ms",
            "--compact-interval",
            "500ms",
            "--compaction-grace",
            "1s",
        ],
    );
    let mut client = loupe.grpc_client().await;
    let mut ids = Vec::new();
    for user in ["alice-7f3a", "alice-7f3a", "bob-91c2"] {
        let (t, req) = simple_trace("chat", user);
        client.export(req).await.unwrap();
        ids.push(hex(&t));
    }
    let all = ids.clone();
    eventually(Duration::from_secs(20), || async {
        let found = loupe.search_ids("").await;
        let (metas, _) = count_files(&dir.path().join("blocks"));
        (found.len() == 3 && metas > 0)
            .then_some(())
            .ok_or(format!("{} traces, {metas} blocks", found.len()))
    })
    .await;

    // One trace by id, with the CLI.
    let out = loupe_ok(&["traces", "delete", &ids[2], "--url", &loupe.query]);
    assert!(out.contains("1 trace(s) hidden"), "{out}");
    let (status, body) = loupe.get(&format!("/api/v1/traces/{}", ids[2])).await;
    assert_eq!(status, 404, "{body}");
    // A user's traces, through the API.
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/traces?user_id=alice-7f3a", loupe.query))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["traces"], 2, "{body}");
    assert!(loupe.search_ids("").await.is_empty());
    let (_, users) = loupe.get("/api/v1/users?since=1h").await;
    assert!(users["users"].as_array().unwrap().is_empty(), "{users}");
    // Deleting what is not there is a clear 404, and bad input a 400.
    let status = reqwest::Client::new()
        .delete(format!("{}/api/v1/traces/{}", loupe.query, ids[2]))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/traces", loupe.query))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("user_id"));

    // Storage is rewritten without them and the requests are marked completed.
    let blocks = dir.path().join("blocks");
    eventually(Duration::from_secs(30), || async {
        let (_, list) = loupe.get("/api/v1/deletions").await;
        let done = list["deletions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "completed")
            .count();
        (done == 2).then_some(()).ok_or(format!("{list}"))
    })
    .await;
    let out = loupe_ok(&["traces", "deletions", "--url", &loupe.query]);
    assert!(
        out.contains("completed") && out.contains("alice-7f3a"),
        "{out}"
    );
    for path in walk(&blocks) {
        let bytes = std::fs::read(&path).unwrap();
        for id in &all {
            let raw: Vec<u8> = (0..16)
                .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert!(
                !bytes.windows(16).any(|w| w == raw.as_slice()),
                "{} still holds trace {id}",
                path.display()
            );
        }
    }
    // The records stay as proof of the request.
    let records = walk(&dir.path().join("blocks").join("deletions"));
    assert_eq!(records.len(), 2, "{records:?}");
}
