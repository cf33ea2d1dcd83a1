//! API keys: every request names its tenant through a key, and a key is good for one
//! thing — sending spans (`ingest`) or reading them (`query`).
//!
//! Keys are random (`loupe_ik_…` / `loupe_qk_…`, 40 alphanumeric characters, about
//! 238 bits) and only their SHA-256 is stored in the config. A fast hash is the right
//! one for high-entropy random tokens (a slow password hash protects guessable
//! secrets, which these are not). A key is never logged and never echoed in an error.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DataPlaneConfig;
use crate::{Error, TenantId};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Send spans and scores.
    Ingest,
    /// Read traces, metrics and scores.
    Query,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Query => "query",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Scope::Ingest => "loupe_ik_",
            Scope::Query => "loupe_qk_",
        }
    }
}

/// Characters of randomness in a generated key.
const KEY_CHARS: usize = 40;

/// A new random key of `scope`, from the thread's cryptographically secure generator
/// (ChaCha, seeded by the operating system).
pub fn generate(scope: Scope) -> String {
    let body: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(KEY_CHARS)
        .map(char::from)
        .collect();
    format!("{}{body}", scope.prefix())
}

/// The SHA-256 of a key, written `sha256:<64 hex digits>` in the config.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for KeyHash {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyHash, String> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or("a key hash is written sha256:<64 hex digits> (see `loupe keys new`)")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(
                "a key hash is written sha256:<64 hex digits> (see `loupe keys new`)".into(),
            );
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(KeyHash(out))
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyHash, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A key of a tenant, as the config lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Who holds the key (`ci`, `grafana`, …): shown in logs instead of the key.
    pub name: String,
    pub scope: Scope,
    pub hash: KeyHash,
}

/// Whom a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOwner {
    pub tenant: TenantId,
    pub scope: Scope,
    pub name: String,
    /// The tenant's environment, when the config lists the tenant.
    pub environment: Option<crate::tenant::Environment>,
}

/// Why a request was refused. The messages never contain the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no key: send `Authorization: Bearer <key>` (create one with `loupe keys new`)")]
    Missing,
    #[error("the key is not valid")]
    Unknown,
    #[error("this is a {have} key; {need} needs a {need_scope} key of the project", have = .have.as_str(), need_scope = .need.as_str(), need = match .need { Scope::Ingest => "sending spans", Scope::Query => "reading traces" })]
    WrongScope { have: Scope, need: Scope },
}

impl AuthError {
    /// `unauthenticated` (no or unknown key) or `permission_denied` (wrong scope).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Unknown => "unauthenticated",
            AuthError::WrongScope { .. } => "permission_denied",
        }
    }
}

/// Every key of every tenant, by hash.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: HashMap<KeyHash, KeyOwner>,
    environments: HashMap<TenantId, crate::tenant::Environment>,
}

impl KeyRing {
    pub fn from_config(config: &DataPlaneConfig) -> KeyRing {
        let mut keys = HashMap::new();
        let mut environments = HashMap::new();
        for t in &config.tenants {
            environments.insert(t.id.clone(), t.environment);
            for k in &t.keys {
                keys.insert(
                    k.hash,
                    KeyOwner {
                        tenant: t.id.clone(),
                        scope: k.scope,
                        name: k.name.clone(),
                        environment: Some(t.environment),
                    },
                );
            }
        }
        KeyRing { keys, environments }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn find(&self, key: &str) -> Option<&KeyOwner> {
        self.keys.get(&KeyHash::of(key))
    }
}

/// The key a request carries: `Authorization: Bearer <key>` (what OTLP exporters send
/// with `OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20<key>`), `x-loupe-key`, or
/// HTTP Basic with the key as the password (`Authorization: Basic
/// base64(<anything>:<key>)`, what Langfuse's SDKs send from their public and secret
/// key: give the Loupe key as the secret key).
pub fn credential(headers: &http::HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    if let Some(v) = headers.get(http::header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
    {
        let v = v.trim();
        if let Some((scheme, token)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(Cow::Borrowed(token.trim()));
            }
            if scheme.eq_ignore_ascii_case("basic") {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(token.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())?;
                let (_, password) = decoded.split_once(':')?;
                return Some(Cow::Owned(password.trim().to_owned()));
            }
        }
    }
    headers
        .get("x-loupe-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| Cow::Borrowed(v.trim()))
}

/// Who may do what, reloaded with the config.
///
/// With no key in the config, and open access allowed (loopback, or `--no-auth`),
/// every request belongs to the open tenant. As soon as the config lists a key, every
/// request needs one.
pub struct AccessControl {
    open_tenant: Option<TenantId>,
    ring: RwLock<Arc<KeyRing>>,
}

impl AccessControl {
    /// `open_tenant`: the tenant served without keys while the config lists none;
    /// `None` refuses keyless requests whatever the config.
    pub fn new(config: &DataPlaneConfig, open_tenant: Option<TenantId>) -> AccessControl {
        AccessControl {
            open_tenant,
            ring: RwLock::new(Arc::new(KeyRing::from_config(config))),
        }
    }

    /// Takes the keys of a new config.
    pub fn reload(&self, config: &DataPlaneConfig) {
        *self.ring.write().expect("key ring lock") = Arc::new(KeyRing::from_config(config));
    }

    /// Whether requests are served without keys right now.
    pub fn is_open(&self) -> bool {
        self.open_tenant.is_some() && self.ring.read().expect("key ring lock").is_empty()
    }

    pub fn keys(&self) -> usize {
        self.ring.read().expect("key ring lock").len()
    }

    /// The tenant of a request that needs `scope`.
    pub fn authorize(
        &self,
        headers: &http::HeaderMap,
        scope: Scope,
    ) -> Result<TenantId, AuthError> {
        self.authorize_key(credential(headers).as_deref(), scope)
    }

    pub fn authorize_key(&self, key: Option<&str>, scope: Scope) -> Result<TenantId, AuthError> {
        self.owner_of_key(key, scope).map(|o| o.tenant)
    }

    /// Whom a request that needs `scope` comes from: the key's tenant and name
    /// (`anonymous` while requests are served without keys).
    pub fn owner(&self, headers: &http::HeaderMap, scope: Scope) -> Result<KeyOwner, AuthError> {
        self.owner_of_key(credential(headers).as_deref(), scope)
    }

    fn owner_of_key(&self, key: Option<&str>, scope: Scope) -> Result<KeyOwner, AuthError> {
        let ring = self.ring.read().expect("key ring lock").clone();
        if ring.is_empty()
            && let Some(open) = &self.open_tenant
        {
            return Ok(KeyOwner {
                tenant: open.clone(),
                scope,
                name: "anonymous".into(),
                environment: ring.environments.get(open).copied(),
            });
        }
        let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::Missing)?;
        let owner = ring.find(key).ok_or(AuthError::Unknown)?;
        if owner.scope != scope {
            return Err(AuthError::WrongScope {
                have: owner.scope,
                need: scope,
            });
        }
        Ok(owner.clone())
    }
}

/// Checks the keys of a config: well-formed names, and no key listed twice (a key
/// belongs to exactly one tenant and scope).
pub(crate) fn validate(config: &DataPlaneConfig) -> Result<(), Error> {
    let mut seen: HashMap<KeyHash, String> = HashMap::new();
    for (i, t) in config.tenants.iter().enumerate() {
        for (j, k) in t.keys.iter().enumerate() {
            let field = format!("tenants[{i}].keys[{j}]");
            if k.name.is_empty() || k.name.len() > 63 {
                return Err(Error::InvalidConfig {
                    field: format!("{field}.name"),
                    reason: "a key name is 1 to 63 characters".into(),
                });
            }
            if let Some(first) = seen.insert(k.hash, field.clone()) {
                return Err(Error::InvalidConfig {
                    field: format!("{field}.hash"),
                    reason: format!("the same key is already listed at {first}"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> DataPlaneConfig {
        DataPlaneConfig::from_yaml(yaml).unwrap()
    }

    #[test]
    fn generated_keys_are_random_and_hash_round_trips() {
        let a = generate(Scope::Ingest);
        let b = generate(Scope::Ingest);
        assert_ne!(a, b);
        assert!(
            a.starts_with("loupe_ik_") && a.len() == 9 + KEY_CHARS,
            "{a}"
        );
        assert!(generate(Scope::Query).starts_with("loupe_qk_"));
        let h = KeyHash::of(&a);
        let text = h.to_string();
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<KeyHash>().unwrap(), h);
        // The known SHA-256 of "abc".
        assert_eq!(
            KeyHash::of("abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!("sha1:00".parse::<KeyHash>().is_err());
        assert!(
            format!("sha256:{}", "g".repeat(64))
                .parse::<KeyHash>()
                .is_err()
        );
    }

    #[test]
    fn keys_name_their_tenant_and_scope() {
        let ik = generate(Scope::Ingest);
        let qk = generate(Scope::Query);
        let other = generate(Scope::Query);
        let cfg = config(&format!(
            "tenants:\n  - id: a/dev\n    keys:\n      - {{ name: app, scope: ingest, hash: \"{}\" }}\n      - {{ name: ui, scope: query, hash: \"{}\" }}\n  - id: a/prod\n    keys:\n      - {{ name: ui, scope: query, hash: \"{}\" }}\n",
            KeyHash::of(&ik),
            KeyHash::of(&qk),
            KeyHash::of(&other)
        ));
        let access = AccessControl::new(&cfg, Some(TenantId::default_tenant()));
        assert!(!access.is_open(), "keys are listed: no open access");
        let dev: TenantId = "a/dev".parse().unwrap();
        assert_eq!(
            access.authorize_key(Some(&ik), Scope::Ingest),
            Ok(dev.clone())
        );
        assert_eq!(access.authorize_key(Some(&qk), Scope::Query), Ok(dev));
        assert_eq!(
            access.authorize_key(Some(&other), Scope::Query),
            Ok("a/prod".parse().unwrap())
        );
        assert_eq!(
            access.authorize_key(Some(&ik), Scope::Query),
            Err(AuthError::WrongScope {
                have: Scope::Ingest,
                need: Scope::Query
            })
        );
        let err = access.authorize_key(Some(&qk), Scope::Ingest).unwrap_err();
        assert_eq!(err.reason(), "permission_denied");
        assert!(!err.to_string().contains(&qk));
        assert_eq!(
            access.authorize_key(None, Scope::Query),
            Err(AuthError::Missing)
        );
        let unknown = generate(Scope::Query);
        let err = access
            .authorize_key(Some(&unknown), Scope::Query)
            .unwrap_err();
        assert_eq!(err, AuthError::Unknown);
        assert!(!err.to_string().contains(&unknown));

        // A reload that drops the keys opens access again only where it was allowed.
        access.reload(&DataPlaneConfig::default());
        assert!(access.is_open());
        assert_eq!(
            access.authorize_key(None, Scope::Ingest),
            Ok(TenantId::default_tenant())
        );
        let closed = AccessControl::new(&DataPlaneConfig::default(), None);
        assert_eq!(
            closed.authorize_key(None, Scope::Ingest),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn credentials_come_from_bearer_basic_or_x_loupe_key() {
        let mut h = http::HeaderMap::new();
        assert_eq!(credential(&h), None);
        h.insert("authorization", "Bearer  k1 ".parse().unwrap());
        assert_eq!(credential(&h).as_deref(), Some("k1"));
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "bearer k2".parse().unwrap());
        assert_eq!(credential(&h).as_deref(), Some("k2"));
        let mut h = http::HeaderMap::new();
        h.insert("x-loupe-key", "k3".parse().unwrap());
        assert_eq!(credential(&h).as_deref(), Some("k3"));
        // Langfuse's SDKs: Basic base64(public key:secret key).
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("pk-lf-1:loupe_ik_k4");
        let mut h = http::HeaderMap::new();
        h.insert("authorization", format!("Basic {basic}").parse().unwrap());
        assert_eq!(credential(&h).as_deref(), Some("loupe_ik_k4"));
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Basic not-base64!".parse().unwrap());
        assert_eq!(credential(&h), None);
    }

    #[test]
    fn a_key_listed_twice_is_rejected_naming_the_field() {
        let h = KeyHash::of(&generate(Scope::Ingest));
        let err = DataPlaneConfig::from_yaml(&format!(
            "tenants:\n  - id: a/b\n    keys: [{{ name: x, scope: ingest, hash: \"{h}\" }}]\n  - id: a/c\n    keys: [{{ name: y, scope: query, hash: \"{h}\" }}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenants[1].keys[0].hash"), "{err}");
        assert!(err.contains("tenants[0].keys[0]"), "{err}");
        let err = DataPlaneConfig::from_yaml(
            "tenants:\n  - id: a/b\n    keys: [{ name: x, scope: ingest, hash: \"md5:1\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sha256:<64 hex digits>"), "{err}");
        let err = DataPlaneConfig::from_yaml(
            "tenants:\n  - id: a/b\n    keys: [{ name: x, scope: admin, hash: \"md5:1\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin"), "{err}");
    }
}
