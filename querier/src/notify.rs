//! Alert notifications: a generic JSON webhook, a Slack-compatible incoming webhook
//! and Alertmanager's v2 API, each retried with backoff and a per-request timeout.
//!
//! Payloads are built by pure functions (tested against their formats); [`Notifier`]
//! sends them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::alerts::{AlertKind, AlertState, format_value};
use crate::model::rfc3339;

/// Where a rule's notifications go: exactly one of the three.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<UrlTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<UrlTarget>,
    /// The Alertmanager's base URL (`/api/v2/alerts` is appended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<UrlTarget>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UrlTarget {
    pub url: String,
}

/// A validated target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Webhook(String),
    Slack(String),
    Alertmanager(String),
}

impl Sink {
    /// `webhook`, `slack` or `alertmanager`, for status and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Webhook(_) => "webhook",
            Sink::Slack(_) => "slack",
            Sink::Alertmanager(_) => "alertmanager",
        }
    }

    /// The URL the payload is posted to.
    pub fn endpoint(&self) -> String {
        match self {
            Sink::Webhook(u) | Sink::Slack(u) => u.clone(),
            Sink::Alertmanager(u) => format!("{}/api/v2/alerts", u.trim_end_matches('/')),
        }
    }

    /// The target without any secret a URL may carry (Slack's are tokens): scheme
    /// and host only.
    pub fn redacted(&self) -> String {
        let url = match self {
            Sink::Webhook(u) | Sink::Slack(u) | Sink::Alertmanager(u) => u,
        };
        let shown = url::Url::parse(url)
            .ok()
            .map(|u| {
                format!(
                    "{}://{}{}",
                    u.scheme(),
                    u.host_str().unwrap_or(""),
                    u.port().map(|p| format!(":{p}")).unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "<invalid url>".into());
        format!("{} {shown}", self.kind())
    }
}

impl Target {
    pub fn validate(&self) -> Result<Sink, String> {
        let check = |u: &UrlTarget| -> Result<String, String> {
            let parsed = url::Url::parse(&u.url).map_err(|e| format!("url {:?}: {e}", u.url))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("url {:?}: must be http or https", u.url));
            }
            Ok(u.url.clone())
        };
        match (&self.webhook, &self.slack, &self.alertmanager) {
            (Some(u), None, None) => Ok(Sink::Webhook(check(u)?)),
            (None, Some(u), None) => Ok(Sink::Slack(check(u)?)),
            (None, None, Some(u)) => Ok(Sink::Alertmanager(check(u)?)),
            _ => Err("set exactly one of webhook, slack or alertmanager".into()),
        }
    }
}

/// What one notification says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notification {
    pub rule: String,
    pub project: String,
    pub kind: AlertKind,
    /// `Firing` or `Resolved`.
    pub state: AlertState,
    pub value: Option<f64>,
    pub threshold: f64,
    pub summary: String,
    /// When the alert entered its state, Unix nanoseconds.
    pub since_ns: i64,
    /// The evaluated window.
    pub window_start_ns: i64,
    pub window_end_ns: i64,
    /// The traces behind the alert (the most expensive, slowest, lowest-scored or
    /// failed ones of the window).
    pub traces_url: String,
}

/// How long Alertmanager keeps a firing alert without hearing of it again: a few
/// evaluation intervals, so an evaluator that stops lets it resolve by itself.
pub fn alertmanager_ends_at(now_ns: i64, interval: Duration) -> i64 {
    now_ns + 4 * interval.as_nanos() as i64
}

/// The generic webhook's JSON.
pub fn webhook_payload(n: &Notification) -> Value {
    json!({
        "version": "1",
        "rule": n.rule,
        "project": n.project,
        "kind": n.kind.as_str(),
        "state": n.state.as_str().to_ascii_lowercase(),
        "value": n.value,
        "threshold": n.threshold,
        "summary": n.summary,
        "since": rfc3339(n.since_ns),
        "window": { "start": rfc3339(n.window_start_ns), "end": rfc3339(n.window_end_ns) },
        "traces_url": n.traces_url,
    })
}

/// A Slack-compatible incoming webhook's JSON: readable text with the numbers and
/// a link.
pub fn slack_payload(n: &Notification) -> Value {
    let (icon, word) = match n.state {
        AlertState::Resolved => (":white_check_mark:", "RESOLVED"),
        _ => (":rotating_light:", "FIRING"),
    };
    let value = n
        .value
        .map(|v| format_value(n.kind, v))
        .unwrap_or_else(|| "no data".into());
    json!({
        "text": format!(
            "{icon} *[{word}] {}* ({}, {})\n{} — value {value}, threshold {}\n<{}|Traces behind it>",
            n.rule,
            n.project,
            n.kind.as_str(),
            n.summary,
            format_value(n.kind, n.threshold),
            n.traces_url,
        ),
    })
}

/// Alertmanager v2's `POST /api/v2/alerts` body: one alert, with `endsAt` in the
/// future while firing (re-sent every evaluation) and now once resolved.
pub fn alertmanager_payload(n: &Notification, now_ns: i64, interval: Duration) -> Value {
    let ends = match n.state {
        AlertState::Resolved => now_ns,
        _ => alertmanager_ends_at(now_ns, interval),
    };
    json!([{
        "labels": {
            "alertname": n.rule,
            "project": n.project,
            "kind": n.kind.as_str(),
            "source": "loupe",
        },
        "annotations": {
            "summary": n.summary,
            "value": n.value.map(|v| format_value(n.kind, v)),
            "threshold": format_value(n.kind, n.threshold),
            "traces_url": n.traces_url,
        },
        "startsAt": rfc3339(n.since_ns),
        "endsAt": rfc3339(ends),
        "generatorURL": n.traces_url,
    }])
}

/// Sends notifications over HTTP(S).
#[derive(Clone)]
pub struct Notifier {
    client: reqwest::Client,
    /// Attempts per notification (1 + retries).
    pub attempts: u32,
    /// First backoff; doubled each retry, with jitter.
    pub backoff: Duration,
    /// The evaluation interval (Alertmanager's `endsAt`).
    pub interval: Duration,
}

impl Notifier {
    pub fn new(interval: Duration) -> Notifier {
        // One process-wide TLS provider; a second install is refused, harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Notifier {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client with default settings builds"),
            attempts: 4,
            backoff: Duration::from_secs(1),
            interval,
        }
    }

    /// Posts `n` to `sink`, retrying server errors, 429 and connection failures with
    /// exponential backoff and jitter. The error names the target without its URL's
    /// path (a Slack URL is a secret).
    pub async fn send(&self, sink: &Sink, n: &Notification, now_ns: i64) -> Result<(), String> {
        let body = match sink {
            Sink::Webhook(_) => webhook_payload(n),
            Sink::Slack(_) => slack_payload(n),
            Sink::Alertmanager(_) => alertmanager_payload(n, now_ns, self.interval),
        };
        let endpoint = sink.endpoint();
        let mut last = String::new();
        for attempt in 0..self.attempts.max(1) {
            if attempt > 0 {
                let base = self.backoff * 2u32.pow(attempt - 1);
                let jitter = base.mul_f64(rand::random::<f64>() * 0.5);
                tokio::time::sleep(base + jitter).await;
            }
            match self.client.post(&endpoint).json(&body).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status();
                    last = format!("{}: HTTP {status}", sink.redacted());
                    let retry = status.is_server_error() || status.as_u16() == 429;
                    if !retry {
                        return Err(last);
                    }
                }
                Err(e) => {
                    last = format!(
                        "{}: {}",
                        sink.redacted(),
                        if e.is_timeout() {
                            "timed out".to_owned()
                        } else if e.is_connect() {
                            "connection refused or unreachable".to_owned()
                        } else {
                            "request failed".to_owned()
                        }
                    );
                }
            }
        }
        Err(format!("{last} (after {} attempts)", self.attempts.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(state: AlertState) -> Notification {
        Notification {
            rule: "chat-errors".into(),
            project: "team-a/chat".into(),
            kind: AlertKind::ErrorRate,
            state,
            value: Some(0.1),
            threshold: 0.01,
            summary: "4 of 40 requests failed in 10m: 10.00 % (threshold 1.00 %)".into(),
            since_ns: 1_800_000_000_000_000_000,
            window_start_ns: 1_799_999_400_000_000_000,
            window_end_ns: 1_800_000_000_000_000_000,
            traces_url: "http://loupe:3000/api/v1/traces?status=error".into(),
        }
    }

    #[test]
    fn slack_text_carries_the_numbers_and_a_link() {
        let text = slack_payload(&note(AlertState::Firing))["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            text,
            ":rotating_light: *[FIRING] chat-errors* (team-a/chat, error_rate)\n\
             4 of 40 requests failed in 10m: 10.00 % (threshold 1.00 %) — value 10.00 %, threshold 1.00 %\n\
             <http://loupe:3000/api/v1/traces?status=error|Traces behind it>"
        );
        let resolved = slack_payload(&note(AlertState::Resolved));
        assert!(
            resolved["text"]
                .as_str()
                .unwrap()
                .starts_with(":white_check_mark: *[RESOLVED]")
        );
    }

    #[test]
    fn alertmanager_alerts_end_in_the_future_while_firing_and_now_when_resolved() {
        let now = 1_800_000_100_000_000_000;
        let minute = Duration::from_secs(60);
        let firing = alertmanager_payload(&note(AlertState::Firing), now, minute);
        assert_eq!(firing[0]["labels"]["alertname"], "chat-errors");
        assert_eq!(firing[0]["labels"]["project"], "team-a/chat");
        assert_eq!(firing[0]["startsAt"], rfc3339(1_800_000_000_000_000_000));
        assert_eq!(firing[0]["endsAt"], rfc3339(now + 240_000_000_000));
        assert_eq!(
            firing[0]["generatorURL"],
            "http://loupe:3000/api/v1/traces?status=error"
        );
        let resolved = alertmanager_payload(&note(AlertState::Resolved), now, minute);
        assert_eq!(resolved[0]["endsAt"], rfc3339(now));
    }

    #[test]
    fn webhook_json_is_versioned_and_complete() {
        let v = webhook_payload(&note(AlertState::Firing));
        assert_eq!(v["version"], "1");
        assert_eq!(v["state"], "firing");
        assert_eq!(v["kind"], "error_rate");
        assert_eq!(v["value"], 0.1);
        assert!(v["window"]["start"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn targets_are_exactly_one_url_and_never_shown_with_their_path() {
        let t: Target = serde_json::from_value(
            json!({ "slack": { "url": "https://hooks.slack.com/services/T0/B0/secret" } }),
        )
        .unwrap();
        let sink = t.validate().unwrap();
        assert_eq!(sink.redacted(), "slack https://hooks.slack.com");
        let two: Target = serde_json::from_value(
            json!({ "slack": { "url": "http://a" }, "webhook": { "url": "http://b" } }),
        )
        .unwrap();
        assert!(two.validate().is_err());
        let bad: Target =
            serde_json::from_value(json!({ "webhook": { "url": "ftp://a" } })).unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("must be http or https")
        );
        let am = Target {
            alertmanager: Some(UrlTarget {
                url: "http://am:9093/".into(),
            }),
            ..Target::default_empty()
        };
        assert_eq!(
            am.validate().unwrap().endpoint(),
            "http://am:9093/api/v2/alerts"
        );
    }

    impl Target {
        fn default_empty() -> Target {
            Target {
                webhook: None,
                slack: None,
                alertmanager: None,
            }
        }
    }

    #[tokio::test]
    async fn a_failing_target_is_retried_then_reported_without_its_secret() {
        // Nothing listens on port 9 (discard) of loopback.
        let mut notifier = Notifier::new(Duration::from_secs(60));
        notifier.backoff = Duration::from_millis(1);
        let sink = Sink::Slack("http://127.0.0.1:9/services/T0/B0/secret".into());
        let err = notifier
            .send(&sink, &note(AlertState::Firing), 0)
            .await
            .unwrap_err();
        assert!(
            err.starts_with("slack http://127.0.0.1:9: connection refused"),
            "{err}"
        );
        assert!(err.ends_with("(after 4 attempts)"), "{err}");
        assert!(!err.contains("secret"));
    }
}
