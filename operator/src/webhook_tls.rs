//! The injection webhook's TLS: a self-managed CA kept in a Secret, the serving
//! certificate renewed before it expires, and the MutatingWebhookConfiguration's
//! `caBundle` kept current; or, with cert-manager, the certificate files it writes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::controller::{Context, secret_text as text};

/// The webhook's name in the MutatingWebhookConfiguration (the chart's).
pub const WEBHOOK_NAME: &str = "inject.loupe.dev";
/// Annotation on the Secret: when its serving certificate expires.
pub const NOT_AFTER_ANNOTATION: &str = "loupe.dev/not-after";
/// Annotation on the Secret: the names its certificate is valid for, comma-separated
/// (a certificate for other names is issued again).
pub const NAMES_ANNOTATION: &str = "loupe.dev/names";
/// Certificates are issued for a year and renewed a month before they expire.
const VALIDITY: SignedDuration = SignedDuration::from_hours(365 * 24);
const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);
/// How often the certificate (Secret or files) is checked.
const CHECK_EVERY: Duration = Duration::from_secs(300);

/// Where the webhook's certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// cert-manager (or anything) writes `tls.crt` and `tls.key` here.
    Files(PathBuf),
    /// The operator issues and renews it.
    SelfManaged(SelfManaged),
}

/// A certificate the operator issues and renews, keeping CA and certificate in a
/// Secret.
#[derive(Clone, Debug)]
pub struct SelfManaged {
    /// The operator's namespace, where the Secret and the Service are.
    pub namespace: String,
    /// The Service the API server calls (`<service>.<namespace>.svc`).
    pub service: String,
    /// More names (DNS names or IP addresses) the certificate is valid for: the
    /// host of the webhook's URL when the API server calls the operator outside
    /// the cluster (`--webhook-url`).
    pub hosts: Vec<String>,
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` the operator keeps.
    pub configuration: String,
}

impl SelfManaged {
    /// The stored certificate and CA bundle, issued or renewed first when needed
    /// ([`ensure`]).
    pub async fn ensure(&self, client: &Client) -> Result<(Issued, String), String> {
        let names = names(&self.service, &self.namespace, &self.hosts);
        ensure(client, &self.namespace, &names, &self.secret).await
    }
}

/// A serving certificate and its CA, PEM.
#[derive(Clone, Debug, PartialEq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub not_after: Timestamp,
}

/// The names a certificate for `service` in `namespace` is valid for, then `hosts`.
pub fn names(service: &str, namespace: &str, hosts: &[String]) -> Vec<String> {
    let mut names = vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    names
}

/// Issues a fresh CA and a serving certificate for `names` (the first is the
/// Service's; IP addresses become IP names).
pub fn issue(names: &[String], now: Timestamp) -> Result<Issued, rcgen::Error> {
    let date = |t: Timestamp| {
        let d = t.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(d.year().into(), d.month() as u8, d.day() as u8)
    };
    let yesterday = now - SignedDuration::from_hours(24);
    let not_after = now + VALIDITY;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Loupe injection webhook CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = date(yesterday);
    ca.not_after = date(not_after + SignedDuration::from_hours(24));
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let common = names.get(2).or(names.first()).cloned().unwrap_or_default();
    params.distinguished_name.push(DnType::CommonName, common);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = date(yesterday);
    params.not_after = date(not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: ca_cert.pem(),
        not_after,
    })
}

/// Whether a certificate expiring at `not_after` is due for renewal at `now`.
pub fn needs_renewal(not_after: Option<Timestamp>, now: Timestamp) -> bool {
    not_after.is_none_or(|t| t.duration_since(now) < RENEW_BEFORE)
}

/// The certificate in `secret`, when it is complete and valid for `names`.
fn stored(secret: &Secret, names: &[String]) -> Option<Issued> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let not_after = annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?;
    if annotations.get(NAMES_ANNOTATION).map(String::as_str) != Some(&names.join(",")) {
        return None;
    }
    Some(Issued {
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        ca_pem: text(secret, "ca.crt")?,
        not_after,
    })
}

/// The certificate in the Secret, issued (or renewed) first when needed, and the CA
/// bundle the webhook configuration must trust (the new CA and, while a renewal is
/// fresh, the previous one, so that replicas still serving the old certificate are
/// trusted too).
pub async fn ensure(
    client: &Client,
    namespace: &str,
    names: &[String],
    secret_name: &str,
) -> Result<(Issued, String), String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets
        .get_opt(secret_name)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{secret_name}: {e}"))?;
    let now = Timestamp::now();
    if let Some(s) = &existing
        && let Some(issued) = stored(s, names)
        && !needs_renewal(Some(issued.not_after), now)
    {
        let bundle = text(s, "ca-bundle.crt").unwrap_or_else(|| issued.ca_pem.clone());
        return Ok((issued, bundle));
    }
    let issued = issue(names, now).map_err(|e| format!("issuing a certificate: {e}"))?;
    let previous = existing.as_ref().and_then(|s| text(s, "ca.crt"));
    let bundle = match previous {
        Some(old) if old != issued.ca_pem => format!("{}{old}", issued.ca_pem),
        _ => issued.ca_pem.clone(),
    };
    let data = BTreeMap::from([
        (
            "tls.crt".to_owned(),
            ByteString(issued.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(issued.key_pem.clone().into_bytes()),
        ),
        (
            "ca.crt".to_owned(),
            ByteString(issued.ca_pem.clone().into_bytes()),
        ),
        (
            "ca-bundle.crt".to_owned(),
            ByteString(bundle.clone().into_bytes()),
        ),
    ]);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(secret_name.to_owned()),
            namespace: Some(namespace.to_owned()),
            annotations: Some(BTreeMap::from([
                (
                    NOT_AFTER_ANNOTATION.to_owned(),
                    issued.not_after.to_string(),
                ),
                (NAMES_ANNOTATION.to_owned(), names.join(",")),
            ])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "loupe-operator".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    secrets
        .patch(
            secret_name,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| format!("writing Secret {namespace}/{secret_name}: {e}"))?;
    tracing::info!(secret = %secret_name, not_after = %issued.not_after, "issued the webhook's certificate");
    // Another replica may have written at the same moment: serve what is stored.
    let stored_now = secrets
        .get_opt(secret_name)
        .await
        .ok()
        .flatten()
        .and_then(|s| stored(&s, names).map(|i| (i, text(&s, "ca-bundle.crt"))));
    Ok(match stored_now {
        Some((i, b)) => {
            let bundle = b.unwrap_or_else(|| i.ca_pem.clone());
            (i, bundle)
        }
        None => (issued, bundle),
    })
}

/// Sets the webhook's `caBundle` in `configuration` (a strategic merge on the
/// webhook named [`WEBHOOK_NAME`]; nothing else changes).
pub async fn publish_ca(
    client: &Client,
    configuration: &str,
    bundle_pem: &str,
) -> Result<(), String> {
    use base64::Engine;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let patch = json!({
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": { "caBundle": base64::engine::general_purpose::STANDARD.encode(bundle_pem) },
        }],
    });
    api.patch(
        configuration,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map_err(|e| {
        format!("setting the caBundle of MutatingWebhookConfiguration {configuration}: {e}")
    })?;
    Ok(())
}

/// Serves the webhook over TLS on `addr` until `handle` shuts it down, keeping its
/// certificate current.
pub async fn serve(
    ctx: Arc<Context>,
    addr: SocketAddr,
    source: CertSource,
    handle: axum_server::Handle<SocketAddr>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = ctx.client.clone();
    let config = match &source {
        CertSource::Files(dir) => {
            RustlsConfig::from_pem_file(dir.join("tls.crt"), dir.join("tls.key"))
                .await
                .with_context(|| {
                    format!("reading the webhook certificate from {}", dir.display())
                })?
        }
        CertSource::SelfManaged(managed) => {
            let (issued, bundle) = managed.ensure(&client).await.map_err(anyhow::Error::msg)?;
            if let Err(e) = publish_ca(&client, &managed.configuration, &bundle).await {
                tracing::warn!(error = %e, "the webhook's CA is not published; the API server will not reach the webhook until it is");
            }
            RustlsConfig::from_pem(issued.cert_pem.into_bytes(), issued.key_pem.into_bytes())
                .await
                .context("loading the webhook certificate")?
        }
    };
    // Keep the certificate current.
    let refresh = {
        let config = config.clone();
        tokio::spawn(async move {
            let mut last_cert = String::new();
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                let result = match &source {
                    CertSource::Files(dir) => config
                        .reload_from_pem_file(dir.join("tls.crt"), dir.join("tls.key"))
                        .await
                        .map_err(|e| e.to_string()),
                    CertSource::SelfManaged(managed) => match managed.ensure(&client).await {
                        Ok((issued, bundle)) if issued.cert_pem != last_cert => {
                            last_cert = issued.cert_pem.clone();
                            let published =
                                publish_ca(&client, &managed.configuration, &bundle).await;
                            config
                                .reload_from_pem(
                                    issued.cert_pem.into_bytes(),
                                    issued.key_pem.into_bytes(),
                                )
                                .await
                                .map_err(|e| e.to_string())
                                .and(published)
                        }
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not refresh the webhook certificate; serving the current one");
                }
            }
        })
    };
    tracing::info!(%addr, "serving the injection webhook");
    let served = axum_server::bind_rustls(addr, config)
        .handle(handle)
        .serve(crate::webhook::router(ctx).into_make_service())
        .await;
    refresh.abort();
    served.context("the injection webhook server stopped")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::fixtures::*;

    #[test]
    fn certificates_are_renewed_a_month_before_they_expire() {
        let now: Timestamp = "2026-11-22T00:00:00Z".parse().unwrap();
        assert!(needs_renewal(None, now));
        assert!(needs_renewal(
            Some(now + SignedDuration::from_hours(29 * 24)),
            now
        ));
        assert!(!needs_renewal(
            Some(now + SignedDuration::from_hours(31 * 24)),
            now
        ));
    }

    #[tokio::test]
    async fn the_webhook_serves_tls_with_a_certificate_it_issued_and_publishes_its_ca() {
        let api = FakeApi::default();
        let webhook_config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": "loupe" },
            "webhooks": [{
                "name": WEBHOOK_NAME, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": { "service": { "name": "loupe", "namespace": "loupe-system", "path": "/mutate-pods" } },
            }],
        }))
        .unwrap();
        api.put(&webhook_config);
        let (ctx, _server) = context(&api, &FakeTopics::default());
        let handle = axum_server::Handle::new();
        let source = CertSource::SelfManaged(SelfManaged {
            namespace: "loupe-system".into(),
            service: "loupe".into(),
            hosts: vec!["127.0.0.1".into()],
            secret: "loupe-webhook-tls".into(),
            configuration: "loupe".into(),
        });
        let server = tokio::spawn(serve(
            ctx,
            "127.0.0.1:0".parse().unwrap(),
            source,
            handle.clone(),
        ));
        let addr = tokio::time::timeout(Duration::from_secs(10), handle.listening())
            .await
            .unwrap()
            .expect("the webhook listens");

        // The Secret holds the CA and the certificate; the configuration trusts the CA.
        let secret: Secret = serde_json::from_value(
            api.get("/api/v1/namespaces/loupe-system/secrets/loupe-webhook-tls")
                .unwrap(),
        )
        .unwrap();
        let ca = text(&secret, "ca.crt").unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let published = api
            .get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/loupe")
            .unwrap();
        use base64::Engine;
        let bundle = base64::engine::general_purpose::STANDARD
            .decode(
                published["webhooks"][0]["clientConfig"]["caBundle"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(String::from_utf8(bundle).unwrap(), ca);

        // A client trusting only that CA reaches the webhook by its Service name.
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .resolve("loupe.loupe-system.svc", addr)
            .build()
            .unwrap();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop", "operation": "CREATE", "userInfo": {},
                "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "namespace": "shop" },
                            "spec": { "containers": [{ "name": "c", "image": "i" }] } },
            },
        });
        let post = |client: reqwest::Client, url: String| {
            let review = review.clone();
            async move {
                let answer: Value = client
                    .post(url)
                    .json(&review)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                answer
            }
        };
        let answer = post(
            client,
            format!("https://loupe.loupe-system.svc:{}/mutate-pods", addr.port()),
        )
        .await;
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);

        // An operator outside the cluster is called by URL: the certificate holds its
        // host too (here an IP address).
        let by_ip = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .build()
            .unwrap();
        let answer = post(
            by_ip,
            format!("https://127.0.0.1:{}/mutate-pods", addr.port()),
        )
        .await;
        assert_eq!(answer["response"]["allowed"], true);

        // Restarting reuses the stored certificate rather than issuing another; other
        // names get a new one.
        let client = context(&api, &FakeTopics::default()).0.client.clone();
        let same = names("loupe", "loupe-system", &["127.0.0.1".into()]);
        let (again, _) = ensure(&client, "loupe-system", &same, "loupe-webhook-tls")
            .await
            .unwrap();
        assert_eq!(again.ca_pem, ca);
        let other = names("loupe", "loupe-system", &[]);
        let (reissued, bundle) = ensure(&client, "loupe-system", &other, "loupe-webhook-tls")
            .await
            .unwrap();
        assert_ne!(reissued.ca_pem, ca);
        assert_eq!(
            bundle,
            format!("{}{ca}", reissued.ca_pem),
            "old and new CA trusted"
        );
        assert_rbac_allows(&api.calls());
        handle.graceful_shutdown(Some(Duration::from_secs(1)));
        let _ = server.await;
    }
}
