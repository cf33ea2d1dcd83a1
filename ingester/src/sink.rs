//! Where accepted spans go: the embedded queue in standalone, Kafka in distributed mode.

use futures::future::BoxFuture;
use loupe_core::{SpanRecord, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The queue cannot take spans now; the client should retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A durable destination for normalized spans.
pub trait SpanSink: Send + Sync + 'static {
    /// Resolves once the spans are durable (fsynced, or acknowledged by every replica).
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        spans: Vec<SpanRecord>,
    ) -> BoxFuture<'a, Result<(), SinkError>>;
}
