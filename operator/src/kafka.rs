//! The platform's Kafka topic: created with the requested partitions, grown when the
//! spec asks for more, never shrunk (Kafka cannot remove partitions).

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

/// How to reach a platform's Kafka, with secrets already read.
#[derive(Clone)]
pub struct KafkaTarget {
    pub brokers: String,
    /// librdkafka properties (`security.protocol`, `sasl.*`, `ssl.ca.pem`); values may
    /// be secrets and are never logged.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaTarget")
            .field("brokers", &self.brokers)
            .field("properties", &keys)
            .finish()
    }
}

/// What to do about the topic, given the partitions it has (`None`: missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicAction {
    Create,
    Grow {
        from: i32,
    },
    Keep,
    /// The spec asks for fewer partitions than the topic has; Kafka cannot do that.
    CannotShrink {
        have: i32,
    },
}

pub fn topic_action(have: Option<i32>, want: i32) -> TopicAction {
    match have {
        None => TopicAction::Create,
        Some(h) if h < want => TopicAction::Grow { from: h },
        Some(h) if h > want => TopicAction::CannotShrink { have: h },
        Some(_) => TopicAction::Keep,
    }
}

/// What happened to the topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    Created { partitions: i32 },
    Grown { from: i32, to: i32 },
    Unchanged { partitions: i32 },
    CannotShrink { have: i32, want: i32 },
}

impl TopicOutcome {
    pub fn partitions(&self) -> i32 {
        match self {
            TopicOutcome::Created { partitions } | TopicOutcome::Unchanged { partitions } => {
                *partitions
            }
            TopicOutcome::Grown { to, .. } => *to,
            TopicOutcome::CannotShrink { have, .. } => *have,
        }
    }
}

/// Makes the topic match the spec. A trait so reconcile tests run without a broker.
pub trait TopicAdmin: Send + Sync {
    fn ensure(
        &self,
        target: KafkaTarget,
        topic: String,
        partitions: i32,
        replication: Option<i32>,
    ) -> BoxFuture<'static, Result<TopicOutcome, String>>;
}

/// The real one: rdkafka's admin client.
pub struct RdKafkaTopics {
    pub timeout: Duration,
}

impl Default for RdKafkaTopics {
    fn default() -> Self {
        RdKafkaTopics {
            timeout: Duration::from_secs(15),
        }
    }
}

impl TopicAdmin for RdKafkaTopics {
    fn ensure(
        &self,
        target: KafkaTarget,
        topic: String,
        partitions: i32,
        replication: Option<i32>,
    ) -> BoxFuture<'static, Result<TopicOutcome, String>> {
        let timeout = self.timeout;
        Box::pin(async move {
            let mut cfg = ClientConfig::new();
            cfg.set("bootstrap.servers", &target.brokers);
            cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
            for (k, v) in &target.properties {
                cfg.set(k, v);
            }
            let admin: AdminClient<DefaultClientContext> = cfg
                .create()
                .map_err(|e| format!("invalid Kafka client settings: {e}"))?;
            let have = current_partitions(&admin, &topic, timeout).await?;
            let opts = AdminOptions::new().operation_timeout(Some(timeout));
            match topic_action(have, partitions) {
                TopicAction::Keep => Ok(TopicOutcome::Unchanged { partitions }),
                TopicAction::CannotShrink { have } => Ok(TopicOutcome::CannotShrink {
                    have,
                    want: partitions,
                }),
                TopicAction::Create => {
                    // -1: the broker's default.replication.factor.
                    let rf = TopicReplication::Fixed(replication.unwrap_or(-1));
                    let results = admin
                        .create_topics(&[NewTopic::new(&topic, partitions, rf)], &opts)
                        .await
                        .map_err(|e| format!("CreateTopics failed: {e}"))?;
                    for r in results {
                        match r {
                            Ok(_) => {}
                            // Another operator replica, or a role, was first.
                            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                                let have = current_partitions(&admin, &topic, timeout)
                                    .await?
                                    .unwrap_or(partitions);
                                return Ok(TopicOutcome::Unchanged { partitions: have });
                            }
                            Err((_, code)) => {
                                return Err(format!("creating topic {topic:?} failed: {code}"));
                            }
                        }
                    }
                    Ok(TopicOutcome::Created { partitions })
                }
                TopicAction::Grow { from } => {
                    let results = admin
                        .create_partitions(
                            &[NewPartitions::new(&topic, partitions as usize)],
                            &opts,
                        )
                        .await
                        .map_err(|e| format!("CreatePartitions failed: {e}"))?;
                    for r in results {
                        if let Err((_, code)) = r {
                            return Err(format!(
                                "adding partitions to {topic:?} ({from} → {partitions}) failed: {code}"
                            ));
                        }
                    }
                    Ok(TopicOutcome::Grown {
                        from,
                        to: partitions,
                    })
                }
            }
        })
    }
}

/// Partitions of `topic`, `None` when it does not exist.
async fn current_partitions(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, String> {
    // A metadata request blocks; tell the runtime so other tasks move off this worker.
    let metadata = tokio::task::block_in_place(|| {
        admin
            .inner()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("cannot reach Kafka: {e}"))
    })?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => Ok(Some(t.partitions().len() as i32)),
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(e) => Err(format!(
            "reading topic {topic:?} failed: {}",
            RDKafkaErrorCode::from(e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_added_never_removed() {
        assert_eq!(topic_action(None, 12), TopicAction::Create);
        assert_eq!(topic_action(Some(12), 12), TopicAction::Keep);
        assert_eq!(topic_action(Some(8), 12), TopicAction::Grow { from: 8 });
        assert_eq!(
            topic_action(Some(16), 12),
            TopicAction::CannotShrink { have: 16 }
        );
    }

    #[test]
    fn secrets_in_properties_are_not_printed() {
        let t = KafkaTarget {
            brokers: "k:9092".into(),
            properties: vec![("sasl.password".into(), "hunter2".into())],
        };
        let s = format!("{t:?}");
        assert!(s.contains("sasl.password") && !s.contains("hunter2"), "{s}");
    }

    /// Against a real broker when `LOUPE_TEST_KAFKA` names one (tansu, or any Kafka):
    /// the topic is created with the requested partitions, and a second call sees it.
    #[tokio::test(flavor = "multi_thread")]
    async fn creates_the_topic_on_a_real_broker() {
        let Ok(brokers) = std::env::var("LOUPE_TEST_KAFKA") else {
            eprintln!("skipped: set LOUPE_TEST_KAFKA=host:port to run against a broker");
            return;
        };
        let topic = format!("loupe-operator-test-{}", rand::random::<u32>());
        let target = KafkaTarget {
            brokers,
            properties: vec![],
        };
        let admin = RdKafkaTopics::default();
        let first = admin
            .ensure(target.clone(), topic.clone(), 3, Some(1))
            .await
            .unwrap();
        assert_eq!(first, TopicOutcome::Created { partitions: 3 });
        let again = admin.ensure(target, topic, 3, Some(1)).await.unwrap();
        assert_eq!(again, TopicOutcome::Unchanged { partitions: 3 });
    }
}
