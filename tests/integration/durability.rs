//! An acknowledged span is never lost: SIGKILL after the acknowledgement, restart,
//! and every span is there exactly once.

use std::time::Duration;

use crate::harness::*;

/// Sends `n` traces of 2 spans (gRPC and HTTP alternately); returns their ids once
/// every export was acknowledged.
async fn send_traces(loupe: &Loupe, n: usize, tag: &str) -> Vec<String> {
    let mut client = loupe.grpc_client().await;
    let mut ids = Vec::new();
    for i in 0..n {
        let (t, req) = simple_trace("durable-svc", &format!("{tag}-{i}"));
        if i % 2 == 0 {
            client.export(req).await.unwrap();
        } else {
            assert_eq!(loupe.post_protobuf(&req).await.status(), 200);
        }
        ids.push(hex(&t));
    }
    ids
}

async fn assert_all_present_once(loupe: &Loupe, ids: &[String]) {
    for id in ids {
        let trace = loupe.trace(id).await;
        assert_eq!(trace["span_count"], 2, "trace {id}");
    }
    let found = loupe.search_ids("service=durable-svc").await;
    assert_eq!(found.len(), ids.len(), "search finds each trace once");
    let (_, body) = loupe
        .get("/api/v1/traces?start=0&limit=1000&service=durable-svc")
        .await;
    for t in body["traces"].as_array().unwrap() {
        assert_eq!(t["span_count"], 2, "no duplicated spans in {t}");
    }
}

fn count_files(dir: &std::path::Path, suffix: &str) -> usize {
    walk(dir)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .count()
}

#[tokio::test]
async fn sigkill_after_acknowledgement_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();

    // 1. Everything only in the write-ahead log (no flush for an hour).
    let loupe = Loupe::start(dir.path(), &["--flush-interval", "1h"]);
    let mut ids = send_traces(&loupe, 40, "wal").await;
    loupe.kill9();
    assert_eq!(
        count_files(dir.path(), ".parquet"),
        0,
        "nothing was flushed"
    );

    let loupe = Loupe::start(dir.path(), &["--flush-interval", "300ms"]);
    assert_all_present_once(&loupe, &ids).await;
    assert!(
        loupe
            .log()
            .contains("replayed spans from the write-ahead log"),
        "{}",
        loupe.log()
    );

    // 2. Some spans in blocks, some only in the log, then SIGKILL again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count_files(dir.path(), ".meta.json") == 0 {
        assert!(std::time::Instant::now() < deadline, "no block was flushed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids.extend(send_traces(&loupe, 30, "mixed").await);
    loupe.kill9();

    let mut loupe = Loupe::start(dir.path(), &["--flush-interval", "1h"]);
    assert_all_present_once(&loupe, &ids).await;

    // 3. A graceful stop writes everything into blocks and empties the log.
    assert!(loupe.terminate().success());
    let wal_bytes: u64 = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(wal_bytes, 0, "the log holds nothing a block does not");
    let loupe = Loupe::start(dir.path(), &[]);
    assert!(!loupe.log().contains("replayed spans"), "{}", loupe.log());
    assert_all_present_once(&loupe, &ids).await;
}
