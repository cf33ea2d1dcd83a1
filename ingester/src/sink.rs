//! Where accepted spans go: the embedded queue in standalone, Kafka in distributed mode.

use futures::future::BoxFuture;
use loupe_core::score::ScoreRecord;
use loupe_core::{SpanRecord, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The queue cannot take spans now; the client should retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A durable destination for normalized spans and scores.
pub trait SpanSink: Send + Sync + 'static {
    /// Resolves once the spans and scores are durable (fsynced, or acknowledged by
    /// every replica).
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        spans: Vec<SpanRecord>,
        scores: Vec<ScoreRecord>,
    ) -> BoxFuture<'a, Result<(), SinkError>>;
}
