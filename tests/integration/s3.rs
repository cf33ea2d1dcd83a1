//! Object storage on a real S3 API: moto's S3 server on loopback (from the test
//! venv), with credentials and endpoint given the way a user gives them for AWS S3 or
//! MinIO (`AWS_*` variables). Standalone writes blocks there, the querier reads them,
//! the compactor merges them and carries out a deletion, `generate` fills a bucket.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const BUCKET: &str = "loupe-test";

/// An S3 server (moto) on a free loopback port, with one bucket.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    async fn start() -> S3Server {
        tls();
        let python = std::env::var_os("LOUPE_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
            });
        assert!(
            python.exists(),
            "moto (the S3 test server) is needed: run scripts/test.sh (it creates target/test-venv)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            match client.put(format!("{endpoint}/{BUCKET}")).send().await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => panic!("the S3 server did not start: {other:?}"),
            }
        }
        S3Server { child, endpoint }
    }

    /// What a user sets for an S3-compatible endpoint.
    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "loupe-test-key"),
            ("AWS_SECRET_ACCESS_KEY", "loupe-test-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
    }

    /// Keys of the bucket's objects under `prefix`.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let body = reqwest::get(format!(
            "{}/{BUCKET}?list-type=2&prefix={prefix}&max-keys=1000",
            self.endpoint
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        body.split("<Key>")
            .skip(1)
            .map(|k| k[..k.find("</Key>").unwrap()].to_owned())
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn standalone_writes_and_reads_blocks_in_an_s3_bucket() {
    let s3 = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/standalone");
    let args = ["--storage", &url, "--flush-interval", "200ms"];
    let mut loupe = Loupe::start_with_env(dir.path(), &args, &s3.env());
    let mut client = loupe.grpc_client().await;
    let mut ids = Vec::new();
    for user in ["ana", "ben"] {
        let (t, req) = simple_trace("chat", user);
        client.export(req).await.unwrap();
        ids.push(hex(&t));
    }
    eventually(Duration::from_secs(20), || async {
        let metas = s3
            .keys("standalone/tenants/default/default/blocks/")
            .await
            .into_iter()
            .filter(|k| k.ends_with(".meta.json"))
            .count();
        (metas > 0)
            .then_some(())
            .ok_or(format!("{metas} blocks in the bucket"))
    })
    .await;
    assert!(loupe.terminate().success());
    // Nothing is left on local disk but the log; a new process finds the blocks.
    assert!(
        !walk(dir.path())
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".parquet"))
    );
    let loupe = Loupe::start_with_env(dir.path(), &args, &s3.env());
    let mut found = loupe.search_ids("").await;
    found.sort();
    ids.sort();
    assert_eq!(found, ids);
    assert_eq!(loupe.trace(&ids[0]).await["span_count"], 2);
}

#[tokio::test]
async fn querier_and_compactor_work_on_an_s3_bucket() {
    let s3 = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/cluster");
    loupe_ok_env(
        &[
            "generate",
            "--storage",
            &url,
            "--spans",
            "2000",
            "--block-spans",
            "100",
            "--window",
            "2h",
        ],
        &s3.env(),
    );
    let metas = async |s3: &S3Server| {
        s3.keys("cluster/tenants/")
            .await
            .into_iter()
            .filter(|k| k.ends_with(".meta.json"))
            .count()
    };
    let before = metas(&s3).await;
    assert!(before >= 20, "{before}");
    let q = Loupe::querier(&url, dir.path(), &s3.env());
    let totals = |q: &Loupe| {
        let q = q.query.clone();
        async move {
            let m: Value = reqwest::get(format!("{q}/api/v1/metrics?since=3h&step=3h&level=trace"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let series = m["series"].as_array().unwrap().clone();
            (
                m["sampling"]["kept_spans"].as_u64().unwrap(),
                series
                    .iter()
                    .map(|s| s["requests"].as_u64().unwrap())
                    .sum::<u64>(),
            )
        }
    };
    let expected = totals(&q).await;
    assert!(expected.0 >= 2000 && expected.1 > 100, "{expected:?}");

    let compact = [
        "compactor",
        "--storage",
        &url,
        "--once",
        "--min-age",
        "0s",
        "--grace",
        "0s",
    ];
    let out = loupe_ok_env(&compact, &s3.env());
    // "compaction pass done: merged N blocks, …": all but a window's lone block.
    let merged: usize = out
        .split("merged ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(merged + 3 >= before, "{out}");
    assert_eq!(totals(&q).await, expected);
    loupe_ok_env(&compact, &s3.env());
    let after = metas(&s3).await;
    assert!(after < before / 4, "{after} blocks left of {before}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(totals(&q).await, expected);

    // A deletion request is recorded in the bucket and carried out there.
    let victim = q.search_ids("limit=1").await.remove(0);
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/traces/{victim}", q.query))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(s3.keys("cluster/deletions/").await.len(), 1);
    loupe_ok_env(&compact, &s3.env());
    loupe_ok_env(&compact, &s3.env());
    let (_, list) = q.get("/api/v1/deletions").await;
    assert_eq!(list["deletions"][0]["status"], "completed", "{list}");
    let (status, _) = q.get(&format!("/api/v1/traces/{victim}")).await;
    assert_eq!(status, 404);

    // Purging the project empties its prefixes in the bucket (batched deletes).
    let blocks = metas(&s3).await;
    let out = loupe_ok_env(
        &[
            "purge",
            "--storage",
            &url,
            "--tenant",
            "default/default",
            "--yes",
        ],
        &s3.env(),
    );
    assert!(out.starts_with(&format!("deleted {blocks} block")), "{out}");
    assert!(s3.keys("cluster/tenants/").await.is_empty());
    assert!(s3.keys("cluster/deletions/").await.is_empty());
    eventually(Duration::from_secs(10), || {
        let q = &q;
        async move {
            let (_, found) = q.get("/api/v1/traces?since=3h&limit=5").await;
            let n = found["traces"].as_array().map_or(usize::MAX, Vec::len);
            (n == 0)
                .then_some(())
                .ok_or(format!("{n} traces still served"))
        }
    })
    .await;
}
