//! The Loupe operator: custom resources (`crd`), the pure rendering of what a
//! TracePlatform and its TraceProjects need (`render`, `tenants`), and the
//! controllers that apply it (`controller`).

pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod inject;
pub mod kafka;
pub mod metrics;
pub mod rbac;
pub mod render;
pub mod run;
pub mod status;
pub mod tenants;
pub mod webhook;
pub mod webhook_tls;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod reconcile_tests;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "loupe-operator";

/// Image the data plane runs when a TracePlatform names none.
pub fn default_image() -> String {
    format!("ghcr.io/loupe-dev/loupe:{}", env!("CARGO_PKG_VERSION"))
}
