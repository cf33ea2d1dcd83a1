//! An OTLP trace exporter over gRPC (tonic) or HTTP/protobuf (reqwest), used by
//! `loupe demo` and `loupe loadgen`.

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (default port 4318).
    Http,
}

pub enum Exporter {
    Grpc {
        client: TraceServiceClient<Channel>,
        key: Option<String>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        key: Option<String>,
    },
}

impl Exporter {
    /// `key`: the project's ingest key, sent as `Authorization: Bearer`.
    pub async fn connect(
        endpoint: &str,
        protocol: Protocol,
        key: Option<String>,
    ) -> anyhow::Result<Exporter> {
        match protocol {
            Protocol::Grpc => {
                let channel = Channel::from_shared(endpoint.to_owned())
                    .with_context(|| format!("invalid gRPC endpoint {endpoint:?}"))?
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to OTLP/gRPC at {endpoint}"))?;
                Ok(Exporter::Grpc {
                    client: TraceServiceClient::new(channel).max_decoding_message_size(64 << 20),
                    key,
                })
            }
            Protocol::Http => {
                let base = endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_owned()
                } else {
                    format!("{base}/v1/traces")
                };
                Ok(Exporter::Http {
                    client: reqwest::Client::new(),
                    url,
                    key,
                })
            }
        }
    }

    /// Sends one request; returns the OTLP response, or an error naming the status.
    pub async fn export(
        &mut self,
        request: ExportTraceServiceRequest,
    ) -> anyhow::Result<ExportTraceServiceResponse> {
        match self {
            Exporter::Grpc { client, key } => {
                let mut request = tonic::Request::new(request);
                if let Some(key) = key {
                    let value = format!("Bearer {key}")
                        .parse()
                        .context("the key is not a valid header value")?;
                    request.metadata_mut().insert("authorization", value);
                }
                Ok(client
                    .export(request)
                    .await
                    .map_err(|s| anyhow::anyhow!("export refused: {}: {}", s.code(), s.message()))?
                    .into_inner())
            }
            Exporter::Http { client, url, key } => {
                let mut post = client.post(url.as_str());
                if let Some(key) = key {
                    post = post.bearer_auth(key);
                }
                let response = post
                    .header("content-type", "application/x-protobuf")
                    .body(request.encode_to_vec())
                    .send()
                    .await
                    .with_context(|| format!("cannot reach OTLP/HTTP at {url}"))?;
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() {
                    bail!(
                        "export refused: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    );
                }
                Ok(ExportTraceServiceResponse::decode(body.as_ref())
                    .context("the server's OTLP response cannot be decoded")?)
            }
        }
    }
}
