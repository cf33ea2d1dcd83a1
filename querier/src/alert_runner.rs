//! Evaluating alert rules on a schedule and notifying: what `loupe standalone
//! --alert-rules` runs. Each pass evaluates every rule (one failing never stops the
//! others), advances its state, and sends notifications in the background so that a
//! slow or failing target delays nothing; the outcome of each target is kept for the
//! status (`GET /api/v1/alerts`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use loupe_core::TenantId;
use serde::Serialize;

use crate::alerts::{
    AlertData, AlertState, AlertStatus, NamedRule, Rule, advance, evaluate, format_value,
};
use crate::model::rfc3339;
use crate::notify::{Notification, Notifier, Sink};

/// One rule with where it applies.
pub struct LoadedRule {
    pub named: NamedRule,
    pub rule: Rule,
    pub tenant: TenantId,
}

/// A notification target's last outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, schemars::JsonSchema)]
pub struct TargetState {
    /// `slack https://hooks.slack.com` (never the URL's path: it may be a secret).
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a rule looks like now.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct RuleState {
    pub name: String,
    pub project: String,
    pub kind: String,
    /// Inactive, Pending, Firing or Resolved.
    pub state: String,
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The value as people read it (`3.00×`, `10.00 %`, `12500 ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_text: Option<String>,
    pub threshold: f64,
    pub threshold_text: String,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_evaluation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The traces behind the value (a trace search).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traces: Option<String>,
    pub targets: Vec<TargetState>,
}

/// The states of every rule, shared with the API.
pub type SharedStates = Arc<RwLock<Vec<RuleState>>>;

/// The rules and their states.
pub struct AlertRunner {
    rules: Vec<LoadedRule>,
    statuses: Vec<AlertStatus>,
    states: SharedStates,
    notifier: Notifier,
    /// Prefix of the trace links (`http://loupe.example.com`).
    base_url: String,
}

impl AlertRunner {
    pub fn new(rules: Vec<LoadedRule>, notifier: Notifier, base_url: &str) -> AlertRunner {
        let states = rules
            .iter()
            .map(|r| RuleState {
                name: r.named.name.clone(),
                project: r.tenant.to_string(),
                kind: r.rule.kind.as_str().into(),
                state: AlertState::Inactive.as_str().into(),
                since: String::new(),
                value: None,
                value_text: None,
                threshold: r.rule.threshold,
                threshold_text: format_value(r.rule.kind, r.rule.threshold),
                summary: "not evaluated yet".into(),
                last_evaluation: None,
                last_error: None,
                traces: None,
                targets: r
                    .named
                    .sinks
                    .iter()
                    .map(|s| TargetState {
                        target: s.redacted(),
                        ..TargetState::default()
                    })
                    .collect(),
            })
            .collect();
        AlertRunner {
            statuses: vec![AlertStatus::default(); rules.len()],
            rules,
            states: Arc::new(RwLock::new(states)),
            notifier,
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn states(&self) -> SharedStates {
        self.states.clone()
    }

    /// Evaluates every rule once at `now_ns`, with `data` giving each tenant's
    /// numbers. Notifications go out in the background.
    pub async fn pass<D: AlertData>(&mut self, data: impl Fn(&TenantId) -> D, now_ns: i64) {
        for (i, loaded) in self.rules.iter().enumerate() {
            let source = data(&loaded.tenant);
            let result = evaluate(&loaded.rule, &source, now_ns).await;
            let (status, changed) = advance(
                &self.statuses[i],
                &loaded.rule,
                result.as_ref().map_err(String::as_str),
                now_ns,
            );
            if let Err(e) = &result {
                tracing::warn!(rule = %loaded.named.name, error = %e, "alert rule could not be evaluated");
            }
            if let Some(state) = changed {
                tracing::info!(
                    rule = %loaded.named.name,
                    project = %loaded.tenant,
                    state = state.as_str(),
                    value = ?status.value,
                    "alert state changed"
                );
            }
            let traces = result
                .as_ref()
                .ok()
                .map(|e| format!("{}{}", self.base_url, e.traces_path(&loaded.rule)));
            {
                let mut states = self.states.write().expect("alert states lock");
                let st = &mut states[i];
                st.state = status.state.as_str().into();
                st.since = if status.since_ns > 0 {
                    rfc3339(status.since_ns)
                } else {
                    String::new()
                };
                st.value = status.value;
                st.value_text = status.value.map(|v| format_value(loaded.rule.kind, v));
                st.last_evaluation = Some(rfc3339(now_ns));
                st.last_error = status.last_error.clone();
                if let Ok(e) = &result {
                    st.summary = e.summary.clone();
                    st.traces = traces.clone();
                }
            }
            // Firing and resolving notify every target; while firing, Alertmanager
            // hears of the alert again at each pass (it expires otherwise).
            let send_to = |sink: &Sink| match changed {
                Some(AlertState::Firing) | Some(AlertState::Resolved) => true,
                None => status.state == AlertState::Firing && matches!(sink, Sink::Alertmanager(_)),
                Some(_) => false,
            };
            if let (Ok(e), true) = (&result, loaded.named.sinks.iter().any(send_to)) {
                let note = Notification {
                    rule: loaded.named.name.clone(),
                    project: loaded.tenant.to_string(),
                    kind: loaded.rule.kind,
                    state: status.state,
                    value: e.value,
                    threshold: e.threshold,
                    summary: e.summary.clone(),
                    since_ns: status.since_ns,
                    window_start_ns: e.start_ns,
                    window_end_ns: e.end_ns,
                    traces_url: traces.clone().unwrap_or_default(),
                };
                for (j, sink) in loaded.named.sinks.iter().enumerate() {
                    if !send_to(sink) {
                        continue;
                    }
                    let (notifier, sink, note) =
                        (self.notifier.clone(), sink.clone(), note.clone());
                    let states = self.states.clone();
                    tokio::spawn(async move {
                        let outcome = notifier.send(&sink, &note, now_ns).await;
                        if let Err(e) = &outcome {
                            tracing::warn!(rule = %note.rule, error = %e, "alert notification failed");
                        }
                        let mut states = states.write().expect("alert states lock");
                        let t = &mut states[i].targets[j];
                        match outcome {
                            Ok(()) => {
                                t.last_sent = Some(rfc3339(now_ns));
                                t.last_error = None;
                            }
                            Err(e) => t.last_error = Some(e),
                        }
                    });
                }
            }
            self.statuses[i] = status;
        }
    }

    /// Evaluates every `interval` until `shutdown` resolves.
    pub async fn run<D: AlertData>(
        mut self,
        data: impl Fn(&TenantId) -> D,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            self.pass(&data, crate::api::now_ns()).await;
        }
    }
}

/// Loads a rules file for `default` (the tenant of rules that name no project).
pub fn load_rules(text: &str, default: &TenantId) -> Result<Vec<LoadedRule>, String> {
    Ok(crate::alerts::RulesFile::parse(text)?
        .into_iter()
        .map(|(named, rule)| LoadedRule {
            tenant: named.project.clone().unwrap_or_else(|| default.clone()),
            named,
            rule,
        })
        .collect())
}

/// The states of one tenant's rules.
pub fn states_of(states: &SharedStates, tenant: &TenantId) -> Vec<RuleState> {
    let project = tenant.to_string();
    states
        .read()
        .expect("alert states lock")
        .iter()
        .filter(|s| s.project == project)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    use axum::Json;
    use axum::extract::State;
    use serde_json::{Value, json};

    use super::*;
    use crate::scores::ScoreMetrics;
    use crate::stats::MetricsResponse;

    /// Records what each path was sent.
    type Received = Arc<Mutex<Vec<(String, Value)>>>;

    async fn receiver() -> (String, Received) {
        let got: Received = Arc::default();
        let app =
            axum::Router::new()
                .route(
                    "/{*path}",
                    axum::routing::post(
                        |State(got): State<Received>,
                         uri: axum::http::Uri,
                         Json(body): Json<Value>| async move {
                            got.lock().unwrap().push((uri.path().to_owned(), body));
                            "ok"
                        },
                    ),
                )
                .with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), got)
    }

    /// An error rate that the test sets between passes.
    struct Rate(Arc<Mutex<(u64, u64)>>);

    impl AlertData for Rate {
        async fn metrics(
            &self,
            _range: (i64, i64),
            _params: &HashMap<String, String>,
        ) -> Result<MetricsResponse, String> {
            let (requests, errors) = *self.0.lock().unwrap();
            let est = json!({ "requests": requests as f64, "input_tokens": 0.0, "output_tokens": 0.0, "cost_usd": 0.0 });
            Ok(serde_json::from_value(json!({
                "level": "trace", "start": "", "end": "", "start_ns": 0, "end_ns": 0,
                "step_seconds": 60.0, "group_by": [], "rows": "traces", "groups_omitted": 0,
                "sampling": { "kept_spans": 0, "seen_spans": 0, "extrapolated": false, "note": "" },
                "series": [{ "group": {}, "requests": requests, "errors": errors, "input_tokens": 0,
                    "output_tokens": 0, "cost_usd": 0.0, "estimated": est, "points": [] }],
            }))
            .unwrap())
        }

        async fn score_metrics(
            &self,
            _range: (i64, i64),
            _step_ns: i64,
            _name: &str,
            _filters: &BTreeMap<String, String>,
        ) -> Result<ScoreMetrics, String> {
            Err("no scores here".into())
        }
    }

    async fn eventually_len(got: &Received, n: usize) -> Vec<(String, Value)> {
        for _ in 0..200 {
            if got.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        got.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn firing_and_resolving_notify_every_target_and_alertmanager_hears_it_while_firing() {
        let (base, got) = receiver().await;
        let rules = format!(
            "rules:\n- name: errors\n  project: team-a/chat\n  kind: error_rate\n  window: 5m\n  threshold: 0.05\n  minCount: 10\n  filters: {{ service: chat, environment: prod }}\n  notify:\n  - webhook: {{ url: '{base}/hook' }}\n  - slack: {{ url: '{base}/slack/T0/secret' }}\n  - alertmanager: {{ url: '{base}/am' }}\n"
        );
        let loaded = load_rules(&rules, &TenantId::default_tenant()).unwrap();
        let mut runner = AlertRunner::new(
            loaded,
            Notifier::new(Duration::from_secs(60)),
            "http://loupe:3000/",
        );
        let states = runner.states();
        let rate = Arc::new(Mutex::new((100, 20)));
        let data = |_: &TenantId| Rate(rate.clone());
        let s = 1_000_000_000i64;
        let t0 = 1_800_000_000 * s;

        // 20 % errors: firing, every target told once.
        runner.pass(data, t0).await;
        let sent = eventually_len(&got, 3).await;
        let paths: Vec<&str> = sent.iter().map(|(p, _)| p.as_str()).collect();
        assert!(
            paths.contains(&"/hook")
                && paths.contains(&"/slack/T0/secret")
                && paths.contains(&"/am/api/v2/alerts"),
            "{paths:?}"
        );
        let hook = &sent.iter().find(|(p, _)| p == "/hook").unwrap().1;
        assert_eq!(hook["state"], "firing");
        assert_eq!(hook["project"], "team-a/chat");
        // The link lists the failed traces of the window, with the search filters the
        // rule has (environment is not a search filter).
        let link = hook["traces_url"].as_str().unwrap();
        assert!(
            link.starts_with("http://loupe:3000/api/v1/traces?start="),
            "{link}"
        );
        assert!(
            link.contains("&service=chat&status=error&limit=50") && !link.contains("environment"),
            "{link}"
        );
        {
            let st = &states.read().unwrap()[0];
            assert_eq!(st.state, "Firing");
            assert_eq!(st.value_text.as_deref(), Some("20.00 %"));
        }
        for _ in 0..100 {
            if states.read().unwrap()[0]
                .targets
                .iter()
                .all(|t| t.last_sent.is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let targets = states.read().unwrap()[0].targets.clone();
        assert!(
            targets
                .iter()
                .all(|t| t.last_sent.is_some() && t.last_error.is_none()),
            "{targets:?}"
        );
        assert_eq!(
            targets[1].target,
            format!("slack {base}"),
            "no secret path in the status"
        );

        // Still firing: only Alertmanager hears of it again.
        runner.pass(data, t0 + 60 * s).await;
        let sent = eventually_len(&got, 4).await;
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[3].0, "/am/api/v2/alerts");

        // 1 % errors: resolved, every target told.
        *rate.lock().unwrap() = (100, 1);
        runner.pass(data, t0 + 120 * s).await;
        let sent = eventually_len(&got, 7).await;
        assert_eq!(sent.len(), 7);
        let slack = sent[4..]
            .iter()
            .find(|(p, _)| p.starts_with("/slack"))
            .unwrap();
        assert!(
            slack.1["text"]
                .as_str()
                .unwrap()
                .contains("[RESOLVED] errors")
        );
        let am = sent[4..]
            .iter()
            .find(|(p, _)| p.starts_with("/am"))
            .unwrap();
        assert_eq!(am.1[0]["endsAt"], rfc3339(t0 + 120 * s));
        assert_eq!(states.read().unwrap()[0].state, "Resolved");

        // Another pass, still clear: nobody is told again.
        runner.pass(data, t0 + 180 * s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(got.lock().unwrap().len(), 7);
        // Each project sees only its own rules.
        assert_eq!(states_of(&states, &"team-a/chat".parse().unwrap()).len(), 1);
        assert!(states_of(&states, &TenantId::default_tenant()).is_empty());
    }
}
