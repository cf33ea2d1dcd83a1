//! Errors of the core crate.

/// Errors raised by core types; messages name the bad value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid tenant id {0:?}: expected <namespace>/<project>, each 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
    )]
    InvalidTenant(String),
    #[error("invalid pricing entry {id:?}: {reason}")]
    InvalidPricing { id: String, reason: String },
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("corrupt data: {0}")]
    Corrupt(String),
}
