//! Status conditions, following Kubernetes conventions: one condition per type,
//! `lastTransitionTime` moves only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set: type, whether it holds, a PascalCase reason and a message a
/// human can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Cond {
        Cond {
            type_,
            ok,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// The conditions after setting `new` on `old` at `now`, in a stable order (by type).
/// A condition whose status is unchanged keeps its `lastTransitionTime`; conditions of
/// other types are kept.
pub fn merge(
    old: &[Condition],
    new: &[Cond],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|c| !new.iter().any(|n| n.type_ == c.type_))
        .cloned()
        .collect();
    for n in new {
        let status = if n.ok { "True" } else { "False" };
        let since = old
            .iter()
            .find(|c| c.type_ == n.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        out.push(Condition {
            type_: n.type_.to_owned(),
            status: status.to_owned(),
            reason: n.reason.clone(),
            message: n.message.clone(),
            last_transition_time: since,
            observed_generation: generation,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = merge(
            &[],
            &[Cond::new("Ready", false, "WaitingForPlatform", "x")],
            Some(1),
            t0,
        );
        assert_eq!(first[0].last_transition_time, Time(t0));
        let same = merge(
            &first,
            &[Cond::new("Ready", false, "WaitingForPlatform", "y")],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!(same[0].message, "y");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Cond::new("Ready", true, "Serving", "z")],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, Time(t1));
        assert_eq!(flipped[0].status, "True");
        let other = merge(
            &flipped,
            &[Cond::new("KafkaTopic", true, "Exists", "")],
            Some(2),
            t1,
        );
        let types: Vec<_> = other.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["KafkaTopic", "Ready"]);
    }
}
