//! The custom resources of Loupe (API group `loupe.dev`, version `v1alpha1`).
//!
//! Field doc comments are what `kubectl explain` shows: they are written for users.
//! `crds/*.yaml` is generated from these types (`loupe crds`) and checked by a test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Loupe resource.
pub const GROUP: &str = "loupe.dev";

/// A duration such as `30s`, `10m`, `24h` or `30d` (units ns, us, ms, s, m, h, d, w).
const DURATION_PATTERN: &str = r"^([0-9]+(ns|us|ms|s|m|h|d|w))+$";

// ---------------------------------------------------------------------------------
// TracePlatform
// ---------------------------------------------------------------------------------

/// A Loupe data plane: OTLP receivers, Kafka-fed writers, queriers, and the tenant
/// config of every TraceProject that points at it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "loupe.dev",
    version = "v1alpha1",
    kind = "TracePlatform",
    doc = "A Loupe data plane: OTLP receivers, Kafka-fed writers and queriers, with the tenant config of the TraceProjects that point at it",
    namespaced,
    status = "TracePlatformStatus",
    shortname = "tplat",
    category = "loupe",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Projects","type":"integer","jsonPath":".status.projects"}"#,
    printcolumn = r#"{"name":"OTLP gRPC","type":"string","jsonPath":".status.endpoints.otlpGrpc"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.write.replicas) || self.write.replicas <= self.kafka.partitions").message("write.replicas cannot exceed kafka.partitions: a writer without a partition idles"),
    validation = Rule::new("!has(self.write.autoscaling) || self.write.autoscaling.maxReplicas <= self.kafka.partitions").message("write.autoscaling.maxReplicas cannot exceed kafka.partitions: a writer without a partition idles"),
    validation = Rule::new("!has(self.compactor.autoscaling) && (!has(self.compactor.replicas) || self.compactor.replicas <= 1)").message("the compactor runs as one pod (replicas 0 or 1, no autoscaling): two would merge the same blocks")
)]
#[serde(rename_all = "camelCase")]
pub struct TracePlatformSpec {
    /// Container image of every role, e.g. `ghcr.io/loupe-dev/loupe:0.1.0`. Defaults
    /// to the image of the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of every role (Always, IfNotPresent or Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// The Kafka cluster that buffers spans between receivers and writers.
    pub kafka: KafkaSpec,
    /// Where trace blocks are stored.
    pub storage: StorageSpec,
    /// The OTLP receivers (`loupe ingester --role receive`): stateless, scale with
    /// the span rate.
    #[serde(default)]
    pub receive: RoleSpec,
    /// The writers (`loupe ingester --role write`): a Kafka consumer group that
    /// tail-samples and writes Parquet blocks; at most one per partition does work.
    #[serde(default)]
    pub write: RoleSpec,
    /// The queriers (`loupe querier`): stateless, serve the query API.
    #[serde(default)]
    pub querier: RoleSpec,
    /// The compactor (`loupe compactor`): one pod that merges small blocks, removes
    /// duplicate spans, applies each project's retention and carries out deletion
    /// requests. `replicas: 0` stops it.
    #[serde(default)]
    pub compactor: RoleSpec,
}

/// Image pull policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

fn default_topic() -> String {
    "loupe.spans".into()
}

fn default_partitions() -> i32 {
    12
}

/// How to reach Kafka.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port[,host:port…]`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Topic of normalized spans. The operator creates it when missing.
    #[serde(default = "default_topic")]
    #[schemars(pattern(r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
    /// Partitions of the topic: the most writers that can share the work. Raising it
    /// adds partitions; lowering it is not possible in Kafka and is reported in the
    /// `KafkaTopic` condition.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    /// Replication factor of the topic when the operator creates it; absent uses the
    /// broker's `default.replication.factor`. Use 3 in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub replication_factor: Option<i32>,
    /// Authentication and encryption; absent is PLAINTEXT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<KafkaSecurity>,
}

/// Kafka security settings; secrets are read from Secrets in the platform's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.protocol.startsWith('SASL') || has(self.sasl)").message("SASL protocols need sasl settings"),
    validation = Rule::new("self.protocol.startsWith('SASL') || !has(self.sasl)").message("sasl settings need a SASL_PLAINTEXT or SASL_SSL protocol")
)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecurity {
    /// `security.protocol`: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    pub protocol: KafkaProtocol,
    /// SASL mechanism and the Secret holding the username and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
    /// A Secret holding the CA certificate (PEM) that signs the brokers' certificates;
    /// absent trusts the image's system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
}

/// Kafka `security.protocol`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KafkaProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaProtocol::Plaintext => "PLAINTEXT",
            KafkaProtocol::Ssl => "SSL",
            KafkaProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            KafkaProtocol::SaslSsl => "SASL_SSL",
        }
    }
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// SASL credentials.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// `sasl.mechanism`.
    pub mechanism: SaslMechanism,
    /// Secret in the platform's namespace with the username and password.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Key of the username in the Secret.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

/// SASL mechanism.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The CA that signs the brokers' certificates.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTls {
    /// Secret in the platform's namespace holding the CA certificate.
    #[schemars(length(min = 1))]
    pub ca_secret_name: String,
    /// Key of the PEM certificate in the Secret.
    #[serde(default = "default_ca_key")]
    pub ca_key: String,
}

/// Where blocks are stored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.url.startsWith('file://') || has(self.volumeClaim)").message("file:// storage needs volumeClaim: writers and queriers must share the volume")
)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Object store URL: `file:///var/lib/loupe` (a shared volume, see volumeClaim) or
    /// `s3://bucket/prefix`.
    #[schemars(pattern(r"^(file:///|s3://)[^\s]+$"))]
    pub url: String,
    /// For `file://` URLs: a PersistentVolumeClaim (ReadWriteMany when writers and
    /// queriers run on several nodes) mounted at the URL's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim: Option<String>,
    /// Secret in the platform's namespace whose keys become environment variables of
    /// the writers and queriers (e.g. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Pods of one role.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Pods when autoscaling is off (default 2 for receive and querier, 1 for write
    /// and the compactor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// A HorizontalPodAutoscaler on CPU; replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// CPU and memory requests and limits of the role's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_cpu_target() -> i32 {
    70
}

/// Autoscaling on CPU utilization.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be at least minReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Fewest pods.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilization, in percent of the CPU request, the autoscaler aims at.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

/// Observed state of a TracePlatform.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracePlatformStatus {
    /// `Ready`: every role is deployed and the tenant config is current. `KafkaTopic`:
    /// the topic exists with the requested partitions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where applications send spans and where the query API is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// TraceProjects in the tenant config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<i32>,
    /// Partitions of the Kafka topic, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_partitions: Option<i32>,
}

/// Service addresses inside the cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// OTLP/gRPC, e.g. `loupe-receive.observability.svc:4317`.
    pub otlp_grpc: String,
    /// OTLP/HTTP base URL, e.g. `http://loupe-receive.observability.svc:4318`.
    pub otlp_http: String,
    /// Query API and Tempo-compatible API base URL.
    pub query: String,
}

// ---------------------------------------------------------------------------------
// TraceProject
// ---------------------------------------------------------------------------------

/// A project: one tenant of a TracePlatform, with its own keys and data. Dev and
/// prod are separate projects, usually in separate namespaces.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "loupe.dev",
    version = "v1alpha1",
    kind = "TraceProject",
    doc = "A Loupe project: one tenant of a TracePlatform, with its own keys (in a Secret the operator creates) and data",
    namespaced,
    status = "TraceProjectStatus",
    shortname = "tproj",
    category = "loupe",
    printcolumn = r#"{"name":"Environment","type":"string","jsonPath":".spec.environment"}"#,
    printcolumn = r#"{"name":"Platform","type":"string","jsonPath":".spec.platformRef.name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Keys","type":"string","jsonPath":".status.keysSecret"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TraceProjectSpec {
    /// The TracePlatform that serves this project.
    pub platform_ref: PlatformRef,
    /// dev, staging or prod; shown on every trace of the project.
    pub environment: ProjectEnvironment,
    /// How long traces are kept, e.g. `30d` (at least `1h`); absent keeps them until
    /// deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub retention: Option<String>,
    /// Ingest rates; beyond them exports are refused with a retry hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ProjectLimits>,
    /// PII redaction at ingest, before anything is stored. Absent: the built-in
    /// detectors mask emails, phone numbers, card numbers, IBANs, US SSNs and secrets
    /// (API keys, tokens, private keys) in every text a span carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redaction: Option<RedactionSpec>,
    /// Prices that beat the built-in table for this project's models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub pricing: Vec<PriceOverride>,
    /// Settings of the instrumentation sidecar injected into this namespace's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injection: Option<InjectionSpec>,
    /// What happens to stored traces when the project is deleted: Retain (default)
    /// keeps them; Delete removes them before the project goes away.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// A reference to a TracePlatform.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlatformRef {
    /// Name of the TracePlatform.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace; absent is the project's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl TraceProject {
    /// The namespace and name of the project's TracePlatform (the project's own
    /// namespace when the reference names none).
    pub fn platform(&self) -> (String, &str) {
        let r = &self.spec.platform_ref;
        let ns = r
            .namespace
            .clone()
            .or_else(|| kube::ResourceExt::namespace(self))
            .unwrap_or_default();
        (ns, &r.name)
    }
}

/// A project's environment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProjectEnvironment {
    Dev,
    Staging,
    Prod,
}

impl From<ProjectEnvironment> for loupe_core::Environment {
    fn from(e: ProjectEnvironment) -> Self {
        match e {
            ProjectEnvironment::Dev => loupe_core::Environment::Dev,
            ProjectEnvironment::Staging => loupe_core::Environment::Staging,
            ProjectEnvironment::Prod => loupe_core::Environment::Prod,
        }
    }
}

/// Per-project ingest rates.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectLimits {
    /// Spans per second (bursts of one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub spans_per_second: Option<u32>,
    /// Bytes of OTLP payload per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bytes_per_second: Option<u32>,
}

/// PII redaction of a project's spans (see docs/redaction.md).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedactionSpec {
    /// false turns redaction off for this project (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Actions that replace a built-in detector's default (ip is off by default, the
    /// others mask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detectors: Option<DetectorActions>,
    /// Custom patterns, applied to every text of a span.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub rules: Vec<RedactionRule>,
    /// Rules on attribute keys (exact match, at any level), applied to the whole value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub attributes: Vec<AttributeRedaction>,
}

/// The action of each built-in detector; unset ones keep their default.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DetectorActions {
    /// `local@domain.tld` addresses (default mask: `[EMAIL]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<DetectorAction>,
    /// E.164 and common national phone numbers (default mask: `[PHONE]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<DetectorAction>,
    /// Luhn-valid payment card numbers (default mask: `[CARD]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<DetectorAction>,
    /// IBANs passing the mod-97 check (default mask: `[IBAN]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iban: Option<DetectorAction>,
    /// US social security numbers (default mask: `[SSN]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us_ssn: Option<DetectorAction>,
    /// IPv4 and IPv6 addresses (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<DetectorAction>,
    /// API keys, cloud access keys, tokens, JWTs, private keys (default mask: `[SECRET]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<DetectorAction>,
}

/// What a detector does with what it finds.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectorAction {
    Off,
    Mask,
    Hash,
    Drop,
}

/// What a rule does with what it matches: mask (a token such as `[ORDER]`), hash
/// (a keyed HMAC, so equal values stay joinable) or drop (the whole attribute).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedactionAction {
    #[default]
    Mask,
    Hash,
    Drop,
}

/// A custom redaction pattern.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RedactionRule {
    /// Name of the rule, shown in metrics; the mask is `[<NAME>]` unless
    /// `replacement` says otherwise.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Regular expression (Rust regex syntax, no look-around).
    #[schemars(length(min = 1, max = 4096))]
    pub pattern: String,
    #[serde(default)]
    pub action: RedactionAction,
    /// Text put in place of each match by `mask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub replacement: Option<String>,
}

/// A rule on an attribute key: `user.email`, `enduser.id`…
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttributeRedaction {
    #[schemars(length(min = 1, max = 255))]
    pub key: String,
    #[serde(default)]
    pub action: RedactionAction,
}

/// A price for models whose id matches `match`. Prices are USD per 1 million tokens.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PriceOverride {
    /// Unique within the project; written to a priced span's cost source.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// Regular expression searched in the lower-cased model id.
    #[serde(rename = "match")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: String,
    /// Provider name, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// USD per 1M uncached input tokens.
    #[schemars(range(min = 0.0))]
    pub input: f64,
    /// USD per 1M output tokens.
    #[schemars(range(min = 0.0))]
    pub output: f64,
    /// USD per 1M input tokens read from the prompt cache; absent is the input rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub cached_input: Option<f64>,
    /// USD per 1M reasoning tokens; absent is the output rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub reasoning: Option<f64>,
    /// First day (UTC, `YYYY-MM-DD`) the price applies.
    #[schemars(pattern(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
    pub valid_from: String,
}

/// The instrumentation sidecar of the project's pods.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InjectionSpec {
    /// Sidecar image; absent is the platform's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Fraction of traces the sidecar forwards (head sampling, by trace id), 0 to 1;
    /// absent forwards every trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub head_sampling_ratio: Option<f64>,
}

/// What deleting a project does to its stored traces.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Keep them.
    #[default]
    Retain,
    /// Delete them.
    Delete,
}

/// Observed state of a TraceProject.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TraceProjectStatus {
    /// `Ready`: the keys exist and the platform's tenant config serves them.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The tenant id, `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Secret in the project's namespace with `ingest-key` and `query-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,
    /// Where to send spans and query them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// The SamplingPolicy applied to the project, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_policy: Option<String>,
}

// ---------------------------------------------------------------------------------
// SamplingPolicy
// ---------------------------------------------------------------------------------

/// Tail-sampling rules for projects in the same namespace. A trace is kept when any
/// rule keeps it; of the rest, `percentage` percent are kept (chosen by trace id).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "loupe.dev",
    version = "v1alpha1",
    kind = "SamplingPolicy",
    doc = "Tail-sampling rules for the TraceProjects of its namespace it selects",
    namespaced,
    status = "SamplingPolicyStatus",
    shortname = "tsamp",
    category = "loupe",
    printcolumn = r#"{"name":"Percentage","type":"number","jsonPath":".spec.rules.percentage"}"#,
    printcolumn = r#"{"name":"Projects","type":"string","jsonPath":".status.projects"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("has(self.projects) != has(self.selector)").message("select projects either by name (projects) or by label (selector)")
)]
#[serde(rename_all = "camelCase")]
pub struct SamplingPolicySpec {
    /// Names of TraceProjects in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub projects: Option<Vec<String>>,
    /// A label selector over TraceProjects in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The rules.
    pub rules: SamplingRules,
}

fn default_true() -> bool {
    true
}

fn default_percentage() -> f64 {
    100.0
}

/// Tail-sampling rules, as the data plane applies them.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SamplingRules {
    /// How long a trace is held after its last span before it is decided (at most
    /// 10m); default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub decision_wait: Option<String>,
    /// Keep every trace with an error span.
    #[serde(default = "default_true")]
    pub keep_errors: bool,
    /// Keep traces whose root span lasts longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub root_duration_over: Option<String>,
    /// Keep traces lasting longer than this, first span to last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub trace_duration_over: Option<String>,
    /// Keep traces costing more than this many USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub cost_over_usd: Option<f64>,
    /// Keep traces using more tokens than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tokens_over: Option<u64>,
    /// Keep traces with a span whose attribute has one of the values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub attributes: Vec<AttributeMatch>,
    /// Percent of the traces no rule kept that are kept anyway, 0 to 100.
    #[serde(default = "default_percentage")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percentage: f64,
}

/// Keep traces with a span whose attribute `key` has one of `values`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct AttributeMatch {
    /// Attribute key, e.g. `user.tier`.
    #[schemars(length(min = 1, max = 256))]
    pub key: String,
    /// Values that keep the trace.
    #[schemars(length(min = 1, max = 256))]
    pub values: Vec<String>,
}

/// Observed state of a SamplingPolicy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SamplingPolicyStatus {
    /// `Ready`: the rules are valid and applied; `Conflict`: another policy selects
    /// one of the same projects.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Projects the policy applies to.
    #[serde(default)]
    pub projects: Vec<String>,
}

// ---------------------------------------------------------------------------------
// AlertRule
// ---------------------------------------------------------------------------------

/// A condition on a project's traces that notifies someone.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "loupe.dev",
    version = "v1alpha1",
    kind = "AlertRule",
    doc = "A condition on a TraceProject's traces (cost spike, score drop, latency, error rate) and who to notify",
    namespaced,
    status = "AlertRuleStatus",
    shortname = "talert",
    category = "loupe",
    printcolumn = r#"{"name":"Project","type":"string","jsonPath":".spec.projectRef"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Threshold","type":"number","jsonPath":".spec.threshold"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Value","type":"string","jsonPath":".status.valueText"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.kind != 'ScoreDrop' || has(self.scoreName)").message("ScoreDrop needs scoreName"),
    validation = Rule::new("self.kind != 'LatencyPercentile' || has(self.percentile)").message("LatencyPercentile needs percentile"),
    validation = Rule::new("!has(self.percentile) || self.percentile in [50.0, 95.0, 99.0]").message("percentile is 50, 95 or 99"),
    validation = Rule::new("self.kind != 'CostSpike' || self.threshold > 1.0").message("CostSpike threshold is a ratio to the trailing average and must be above 1"),
    validation = Rule::new("!(self.kind == 'ScoreDrop' || self.kind == 'ErrorRate') || (self.threshold > 0.0 && self.threshold <= 1.0)").message("ScoreDrop and ErrorRate thresholds are fractions in (0, 1]"),
    validation = Rule::new("self.kind != 'LatencyPercentile' || self.threshold > 0.0").message("LatencyPercentile threshold is milliseconds above 0")
)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleSpec {
    /// Name of the TraceProject, in this namespace, whose traces are watched.
    #[schemars(length(min = 1, max = 253))]
    pub project_ref: String,
    /// What is watched:
    /// CostSpike: cost over `window` compared with its trailing average over
    /// `baseline` (threshold = ratio, e.g. 2 for twice);
    /// ScoreDrop: the average of score `scoreName` over `window` compared with the
    /// `baseline` before it (threshold = relative drop, e.g. 0.1 for 10%);
    /// LatencyPercentile: the `percentile` of trace latency over `window`
    /// (threshold = milliseconds);
    /// ErrorRate: the share of traces with an error over `window` (threshold =
    /// fraction, e.g. 0.05).
    pub kind: AlertKind,
    /// The window evaluated, e.g. `15m`.
    #[schemars(pattern(DURATION_PATTERN))]
    pub window: String,
    /// For CostSpike and ScoreDrop: the period compared with; default `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub baseline: Option<String>,
    /// The threshold, in the unit of `kind`.
    pub threshold: f64,
    /// How long the condition must hold before the alert fires, e.g. `5m`; absent
    /// fires at once.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub for_duration: Option<String>,
    /// For ScoreDrop: the score name, e.g. `faithfulness`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub score_name: Option<String>,
    /// For LatencyPercentile: 50, 95 or 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50.0, max = 99.0))]
    pub percentile: Option<f64>,
    /// For LatencyPercentile: `trace` (requests, default) or `span` (LLM calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<loupe_querier::alerts::LatencyLevel>,
    /// For CostSpike: the least cost in the window, in USD, that may fire (default
    /// 1), so an idle project does not page over cents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub min_cost: Option<f64>,
    /// For ScoreDrop: the least scores in the window and in the baseline (default
    /// 20); for ErrorRate: the least requests in the window (default 100); for
    /// LatencyPercentile: the least requests (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u64>,
    /// How long the condition must stay clear before a firing alert resolves;
    /// default `for`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub resolve_after: Option<String>,
    /// Equality filters on the traffic watched: `service`, `name` (a span name),
    /// `model`, `provider`, `feature`, `environment`, `prompt_name`,
    /// `prompt_version`, `user_id`, `session_id`, `llm_kind`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 11))]
    pub filters: BTreeMap<String, String>,
    /// Where notifications go.
    #[schemars(length(min = 1, max = 16))]
    pub notify: Vec<NotificationTarget>,
}

/// The kind of condition an AlertRule watches.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    CostSpike,
    ScoreDrop,
    LatencyPercentile,
    ErrorRate,
}

/// One notification target: exactly one of `webhook`, `slack` or `alertmanager`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("[has(self.webhook), has(self.slack), has(self.alertmanager)].filter(x, x).size() == 1").message("set exactly one of webhook, slack or alertmanager")
)]
#[serde(rename_all = "camelCase")]
pub struct NotificationTarget {
    /// A JSON POST to a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<UrlTarget>,
    /// A Slack-compatible incoming webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<UrlTarget>,
    /// An Alertmanager (`/api/v2/alerts` is appended to the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<UrlTarget>,
}

/// A URL, given inline or read from a Secret (webhook URLs often carry a token).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("has(self.url) != has(self.urlFrom)").message("set either url or urlFrom")
)]
#[serde(rename_all = "camelCase")]
pub struct UrlTarget {
    /// The URL (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// A key of a Secret in this namespace holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretKeyRef>,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state of an AlertRule.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleStatus {
    /// `Ready`: the rule is valid and its project exists. `Evaluating`: whether the
    /// rule is being evaluated.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Inactive, Pending, Firing or Resolved once evaluated; NotEvaluated until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the state began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Since when a firing alert has been clear (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_since: Option<String>,
    /// The last value compared with the threshold, as a number and as people read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The numbers behind the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// A trace search listing the traces behind the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluation: Option<String>,
    /// Why the last evaluation failed (the state is kept meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Each notification target's last outcome, in `notify` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
}

/// A notification target's last outcome.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// `slack https://hooks.slack.com` (never a URL's path: it may be a secret).
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Parses a duration field (`30s`, `10m`, `30d`…), naming the field when it is wrong.
/// Admits what the schema's pattern admits, so a resource the API server accepted
/// parses.
pub fn parse_duration(field: &str, s: &str) -> Result<std::time::Duration, String> {
    static PATTERN: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(DURATION_PATTERN).expect("valid pattern"));
    if !PATTERN.is_match(s) {
        return Err(format!(
            "{field}: {s:?} is not a duration such as 30s, 10m, 24h or 30d"
        ));
    }
    humantime_serde::re::humantime::parse_duration(s)
        .map_err(|e| format!("{field}: {s:?} is not a duration ({e})"))
}

/// Labels common to every object the operator creates.
pub fn common_labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "loupe".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "loupe-operator".to_owned(),
        ),
    ])
}
