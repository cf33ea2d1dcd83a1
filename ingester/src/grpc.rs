//! OTLP/gRPC receiver (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
//!
//! tonic does the gRPC framing, gzip and the size bound; the request message is handed
//! to [`Ingest`] as bytes and decoded there, so that a malformed message is answered
//! INVALID_ARGUMENT naming the problem (tonic's generated code answers INTERNAL).

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::ingest::{Ingest, IngestError, Payload, RETRY_AFTER};

/// The gRPC method path of OTLP trace export.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Converts a refusal into a gRPC status; UNAVAILABLE carries the retry hint in
/// `grpc-retry-pushback-ms`.
pub fn status(err: &IngestError) -> Status {
    let msg = err.to_string();
    let mut status = match err {
        IngestError::InvalidArgument(_) => Status::invalid_argument(msg),
        IngestError::TooLarge { .. } => Status::resource_exhausted(msg),
        IngestError::Unavailable(_) => Status::unavailable(msg),
        IngestError::Unauthenticated(_) => Status::unauthenticated(msg),
        IngestError::PermissionDenied(_) => Status::permission_denied(msg),
        IngestError::Internal(_) => Status::internal(msg),
        IngestError::RateLimited { .. } => Status::resource_exhausted(msg),
    };
    let pushback = match err {
        IngestError::Unavailable(_) => Some(RETRY_AFTER),
        IngestError::RateLimited { retry_after, .. } => Some(*retry_after),
        _ => None,
    };
    if let Some(wait) = pushback {
        status.metadata_mut().insert(
            "grpc-retry-pushback-ms",
            wait.as_millis()
                .max(1)
                .to_string()
                .parse()
                .expect("ascii digits"),
        );
    }
    status
}

/// Passes request messages through as bytes; encodes responses with prost.
#[derive(Clone, Copy, Default)]
struct RawRequestCodec;

struct RawDecoder;
struct ResponseEncoder;

impl Codec for RawRequestCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(
        &mut self,
        item: ExportTraceServiceResponse,
        dst: &mut EncodeBuf<'_>,
    ) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding response: {e}")))
    }
}

#[derive(Clone)]
struct ExportMethod {
    ingest: Arc<Ingest>,
    headers: http::HeaderMap,
}

impl tonic::server::UnaryService<Bytes> for ExportMethod {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<ExportTraceServiceResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let ingest = self.ingest.clone();
        let headers = std::mem::take(&mut self.headers);
        Box::pin(async move {
            let refuse = |e: IngestError| {
                ingest.record_refusal("grpc", &e);
                status(&e)
            };
            let tenant = ingest.authenticate(&headers).map_err(refuse)?;
            ingest
                .export(&tenant, "grpc", Payload::Protobuf(request.into_inner()))
                .await
                .map(tonic::Response::new)
                .map_err(|e| status(&e))
        })
    }
}

/// The gRPC route, accepting gzip and bounded in message size.
pub fn router(ingest: Arc<Ingest>) -> axum::Router {
    axum::Router::new()
        .route(EXPORT_PATH, post(export))
        .fallback(unimplemented)
        .with_state(ingest)
}

#[tracing::instrument(skip_all, fields(protocol = "grpc"))]
async fn export(
    axum::extract::State(ingest): axum::extract::State<Arc<Ingest>>,
    request: http::Request<Body>,
) -> Response {
    let limit = ingest.limits().max_request_bytes;
    let method = ExportMethod {
        headers: request.headers().clone(),
        ingest,
    };
    let mut grpc = tonic::server::Grpc::new(RawRequestCodec)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(limit);
    let response = grpc.unary(method, request).await;
    oversize_is_resource_exhausted(response.map(Body::new))
}

async fn unimplemented() -> Response {
    Status::unimplemented("only OTLP trace export is served on this port")
        .into_http::<Body>()
        .into_response()
}

/// tonic answers a message over the size bound with OUT_OF_RANGE before any handler
/// runs; OTLP says RESOURCE_EXHAUSTED for a request over the server's limit.
fn oversize_is_resource_exhausted(mut response: http::Response<Body>) -> Response {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get(Status::GRPC_STATUS)
        .is_some_and(|v| v.as_bytes() == (Code::OutOfRange as i32).to_string().as_bytes());
    if out_of_range {
        headers.insert(Status::GRPC_STATUS, (Code::ResourceExhausted as i32).into());
    }
    response.into_response()
}
