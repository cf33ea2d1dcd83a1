//! OTLP/HTTP receiver: `POST /v1/traces` and the Langfuse SDK path
//! `POST /api/public/otel/v1/traces`, protobuf or JSON, optionally gzip-compressed.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prost::Message;

use crate::ingest::{Ingest, IngestError, Payload, RETRY_AFTER};

/// Paths on which OTLP/HTTP traces are accepted.
pub const TRACE_PATHS: [&str; 2] = ["/v1/traces", "/api/public/otel/v1/traces"];

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// `google.rpc.Status`, the body of OTLP/HTTP error responses.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// Paths on which scores are accepted (the second is Langfuse's).
pub const SCORE_PATHS: [&str; 2] = ["/api/v1/scores", "/api/public/scores"];

/// The OTLP/HTTP routes, and the scores route.
pub fn router(ingest: Arc<Ingest>) -> Router {
    let mut router = Router::new();
    for path in TRACE_PATHS {
        router = router.route(path, post(export));
    }
    for path in SCORE_PATHS {
        router = router.route(path, post(scores));
    }
    router.with_state(ingest)
}

/// `POST /api/v1/scores`: JSON scores, durable before the answer (`{"ids": [...]}`).
#[tracing::instrument(skip_all, fields(protocol = "scores"))]
async fn scores(State(ingest): State<Arc<Ingest>>, headers: HeaderMap, body: Body) -> Response {
    let refuse = |err: IngestError| {
        ingest.record_refusal("scores", &err);
        error_response(Encoding::Json, &err)
    };
    if encoding_of(&headers).ok() != Some(Encoding::Json) {
        let mut r = refuse(IngestError::InvalidArgument(
            "scores are JSON: send content-type application/json".into(),
        ));
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let (tenant, bytes) = match authenticated_body(&ingest, &headers, body).await {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    match ingest.submit_scores(&tenant, &bytes).await {
        Ok(ids) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "ids": ids })),
        )
            .into_response(),
        Err(e) => error_response(Encoding::Json, &e),
    }
}

fn error_response(encoding: Encoding, err: &IngestError) -> Response {
    let (http, grpc) = match err {
        IngestError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, 3),
        IngestError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 8),
        IngestError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, 14),
        IngestError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, 16),
        IngestError::PermissionDenied(_) => (StatusCode::FORBIDDEN, 7),
        IngestError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, 13),
        IngestError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, 8),
    };
    let status = RpcStatus {
        code: grpc,
        message: err.to_string(),
    };
    let body = match encoding {
        Encoding::Protobuf => status.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&status).expect("status serializes"),
    };
    let mut response = (
        http,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response();
    let retry_after = match err {
        IngestError::Unavailable(_) => Some(RETRY_AFTER),
        // Retry-After counts whole seconds: round up.
        IngestError::RateLimited { retry_after, .. } => {
            Some(*retry_after + Duration::from_millis(999))
        }
        _ => None,
    };
    if let Some(wait) = retry_after {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
    }
    response
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        other => Err(format!(
            "unsupported content-type {other:?}: send application/x-protobuf or application/json"
        )),
    }
}

/// The tenant of the request's ingest key, then its body (bounded).
async fn authenticated_body(
    ingest: &Ingest,
    headers: &HeaderMap,
    body: Body,
) -> Result<(loupe_core::TenantId, Bytes), IngestError> {
    let tenant = ingest.authenticate(headers)?;
    let bytes = read_body(headers, body, ingest.limits().max_request_bytes).await?;
    Ok((tenant, bytes))
}

/// Reads the body, decompressing gzip, and never holds more than `limit` bytes.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, IngestError> {
    let raw = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            IngestError::TooLarge {
                size: limit + 1,
                limit,
            }
        } else {
            IngestError::InvalidArgument(format!("reading request body: {e}"))
        }
    })?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "identity" | "" => Ok(raw),
        "gzip" => {
            let mut out = Vec::with_capacity((raw.len() * 4).min(limit));
            let mut decoder = flate2::read::GzDecoder::new(&raw[..]).take(limit as u64 + 1);
            decoder.read_to_end(&mut out).map_err(|e| {
                IngestError::InvalidArgument(format!("gzip body cannot be decompressed: {e}"))
            })?;
            if out.len() > limit {
                return Err(IngestError::TooLarge {
                    size: out.len(),
                    limit,
                });
            }
            Ok(Bytes::from(out))
        }
        other => Err(IngestError::InvalidArgument(format!(
            "unsupported content-encoding {other:?}: send gzip or no encoding"
        ))),
    }
}

#[tracing::instrument(skip_all, fields(protocol = "http"))]
async fn export(State(ingest): State<Arc<Ingest>>, headers: HeaderMap, body: Body) -> Response {
    let encoding = match encoding_of(&headers) {
        Ok(e) => e,
        Err(msg) => {
            let err = IngestError::InvalidArgument(msg);
            ingest.record_refusal("http", &err);
            let mut r = error_response(Encoding::Json, &err);
            *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return r;
        }
    };
    let refuse = |err: IngestError| {
        ingest.record_refusal("http", &err);
        error_response(encoding, &err)
    };
    let (tenant, bytes) = match authenticated_body(&ingest, &headers, body).await {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    let payload = match encoding {
        Encoding::Protobuf => Payload::Protobuf(bytes),
        Encoding::Json => Payload::Json(bytes),
    };
    match ingest.export(&tenant, "http", payload).await {
        Ok(resp) => {
            let body = match encoding {
                Encoding::Protobuf => resp.encode_to_vec(),
                Encoding::Json => serde_json::to_vec(&resp).expect("response serializes"),
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, encoding.content_type())],
                body,
            )
                .into_response()
        }
        Err(e) => error_response(encoding, &e),
    }
}
