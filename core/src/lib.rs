//! Loupe core: the span model, normalization of OTLP LLM spans, pricing, tenants,
//! limits and the storage layout shared by every role.

pub mod error;
pub mod span;
pub mod tenant;

pub use error::Error;
pub use span::{LlmKind, SpanBatch, SpanRecord, StatusCode};
pub use tenant::{Environment, TenantId};
pub mod config;
pub mod deletion;
pub mod ids;
pub mod keys;
pub mod normalize;
pub mod pricing;
pub mod redact;
pub mod sampling;
pub mod score;
pub mod storage;
