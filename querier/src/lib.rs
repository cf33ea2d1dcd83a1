//! Loupe querier: tenant-scoped trace queries with DataFusion over Parquet blocks
//! (plus spans not yet flushed), served as an HTTP JSON API.

pub mod alert_runner;
pub mod alerts;
pub mod api;
pub mod compare;
pub mod deletions;
pub mod engine;
pub mod index;
pub mod model;
pub mod notify;
pub mod openapi;
pub mod prune;
pub mod scores;
pub mod sessions;
pub mod stats;
pub mod tempo;
pub mod ui;

pub use api::QueryMetrics;
pub use engine::{QueryEngine, QueryError, SearchQuery};
