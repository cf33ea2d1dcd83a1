//! Loupe ingester: OTLP receivers (gRPC and HTTP), the receive pipeline (validate,
//! normalize, price), the embedded write-ahead queue of standalone mode, and the
//! Parquet block writer.

pub mod block;
pub mod compactor;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod queue;
pub mod sink;
pub mod usage;
pub mod wal;
pub mod writer;

pub use ingest::{Ingest, IngestError, Payload};
pub use queue::{EmbeddedQueue, QueueConfig};
