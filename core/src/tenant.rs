//! Tenants: one `TraceProject` each, named `<namespace>/<project>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A validated tenant id, `<namespace>/<project>`.
///
/// Both halves are Kubernetes DNS labels, so a tenant id can never contain `..`, a
/// slash beyond the separator, or any character that could escape its storage prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId {
    id: String,
    slash: usize,
}

impl TenantId {
    /// The tenant standalone mode serves without a key.
    pub fn default_tenant() -> TenantId {
        "default/default"
            .parse()
            .expect("the default tenant id is valid")
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn namespace(&self) -> &str {
        &self.id[..self.slash]
    }

    pub fn project(&self) -> &str {
        &self.id[self.slash + 1..]
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl FromStr for TenantId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once('/') {
            Some((ns, project)) if is_dns_label(ns) && is_dns_label(project) => Ok(TenantId {
                id: s.to_owned(),
                slash: ns.len(),
            }),
            _ => Err(Error::InvalidTenant(s.chars().take(128).collect())),
        }
    }
}

impl TryFrom<String> for TenantId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.id
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// A project's environment. Dev and prod are separate projects; the environment is a
/// property of the project, shown on every trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Dev,
    Staging,
    Prod,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Staging => "staging",
            Environment::Prod => "prod",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_tenants() {
        let t: TenantId = "team-a/chatbot-prod".parse().unwrap();
        assert_eq!(t.namespace(), "team-a");
        assert_eq!(t.project(), "chatbot-prod");
        assert_eq!(t.to_string(), "team-a/chatbot-prod");
    }

    #[test]
    fn rejects_ids_that_could_escape_a_prefix() {
        for bad in [
            "", "default", "/x", "x/", "../x", "a/../b", "a/b/c", "A/b", "a/b ", "-a/b", "a/b-",
            "a\\b/c", "a/b\0", "..", "a/..",
        ] {
            let err = bad.parse::<TenantId>().unwrap_err();
            assert!(
                err.to_string().contains("invalid tenant id"),
                "{bad:?}: {err}"
            );
        }
        let long = format!("{}/x", "a".repeat(64));
        assert!(long.parse::<TenantId>().is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let t: TenantId = serde_json::from_str("\"ns/p\"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"ns/p\"");
        assert!(serde_json::from_str::<TenantId>("\"ns/../p\"").is_err());
    }
}
