//! Black-box tests: they start the real `loupe` binary on free loopback ports and talk
//! to it with real OTLP clients (Rust tonic/reqwest, and the Python OpenTelemetry SDK).

mod agent;
mod alerts;
mod analytics;
mod bad_input;
mod chart;
mod cli;
mod compaction;
mod distributed;
mod durability;
mod e2e;
mod harness;
mod otlp;
mod python_sdk;
mod redaction;
mod s3;
mod tempo;
mod tenancy;
mod ui;
