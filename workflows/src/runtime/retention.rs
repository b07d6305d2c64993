//! Retention: a person's data is erased by itself when the deployment's retention for them ends
//! (`[privacy.retention]`: per purpose, counted from when they were last seen).
//!
//! A durable timer: [`RetentionManager`] arms a `privacy.retention` job for each subject when
//! they are registered or their consents change, due at the earliest their retention could end;
//! the job ([`Runtime::on_retention`]) works out when it really ends (the longest retention of
//! the purposes they consented to, from their last event) and either erases them, recorded like
//! any erasure (`by: retention`), or arms itself again for that moment. Jobs survive restarts and
//! run on any worker; a repeated job finds the subject erased and does nothing.

use stele_aggregates::subject::Subject;
use stele_privacy::subjects::retention_deadline;
use stele_privacy::Policy;

use super::*;

/// The retention manager's checkpoint name.
pub const RETENTION_MANAGER: &str = "privacy-retention";
/// The job that checks a subject's retention.
pub const RETENTION_JOB: &str = "privacy.retention";

#[derive(Debug, Serialize, Deserialize)]
struct RetentionJob {
    subject: String,
}

fn retention_job(subject: &str, at: chrono::DateTime<chrono::Utc>) -> NewJob {
    NewJob::new(
        QUEUE,
        RETENTION_JOB,
        json!(RetentionJob {
            subject: subject.to_owned()
        }),
    )
    .run_at(at)
    .max_attempts(10)
    .idempotency_key(format!("retention:{subject}:{}", at.timestamp_micros()))
}

/// Arms the retention timers (pure: the subject's events and the policy).
pub struct RetentionManager {
    /// The shortest retention of any purpose: no subject's can end sooner.
    shortest: Option<Duration>,
}

impl RetentionManager {
    pub fn new(policy: &Policy) -> RetentionManager {
        RetentionManager {
            shortest: policy.retention.values().min().copied(),
        }
    }
}

impl ProcessManager for RetentionManager {
    fn name(&self) -> &'static str {
        RETENTION_MANAGER
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["SubjectRegistered", "ConsentGiven", "ConsentWithdrawn"]
    }

    fn react(&self, event: &RecordedEvent) -> Vec<NewJob> {
        let Some(shortest) = self
            .shortest
            .and_then(|d| chrono::Duration::from_std(d).ok())
        else {
            return Vec::new();
        };
        if event.stream.aggregate_type != <Subject as cqrs_es::Aggregate>::TYPE {
            return Vec::new();
        }
        match event.recorded_at.checked_add_signed(shortest) {
            Some(at) => vec![retention_job(&event.stream.aggregate_id, at)],
            None => Vec::new(),
        }
    }
}

impl Runtime {
    /// The retention manager for this runtime's policy (`None` when nothing is kept for a
    /// limited time, or personal data is not kept).
    pub fn retention_manager(&self) -> Option<Arc<dyn ProcessManager>> {
        let policy = self.subjects.as_ref()?.policy();
        if policy.retention.is_empty() {
            return None;
        }
        Some(Arc::new(RetentionManager::new(policy)))
    }

    pub(super) async fn on_retention(self: Arc<Self>, job: Job) -> HandlerResult {
        let p: RetentionJob = serde_json::from_value(job.payload.clone())?;
        let Some(subjects) = self.subjects.clone() else {
            return Ok(Done::Complete);
        };
        let Some(subject) = subjects.get(&p.subject).await? else {
            return Ok(Done::Complete);
        };
        if subject.erased.is_some() || subject.merged_into.is_some() {
            return Ok(Done::Complete);
        }
        let now = self.clock.utc();
        let last_seen = subjects.last_seen(&p.subject).await?.unwrap_or(now);
        let Some(deadline) = retention_deadline(subjects.policy(), &subject, last_seen) else {
            return Ok(Done::Complete);
        };
        if deadline > now {
            // Seen since, or a purpose kept longer: check again when it ends.
            self.queue
                .enqueue(vec![retention_job(&p.subject, deadline)])
                .await?;
            return Ok(Done::Complete);
        }
        let meta = CommandMeta::new("retention", "system");
        let reason = format!(
            "the retention period ended (last seen {})",
            last_seen.to_rfc3339()
        );
        self.erase_subject(&p.subject, "retention", &reason, meta)
            .await?;
        Ok(Done::Complete)
    }
}
