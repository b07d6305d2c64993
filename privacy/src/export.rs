//! A subject's export (GDPR art. 15 and 20): everything Stele holds about a person, as one JSON
//! bundle with a human-readable timeline (HTML) inside. The format is documented in
//! `docs/subject-export.md`; a snapshot test holds it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use stele_aggregates::personal::{as_marker, marker, ERASED, SEALED};
use stele_aggregates::subject::{Erasure, SubjectCommand};
use stele_aggregates::task::{Task, TaskEvent};
use stele_engine::{CommandMeta, EventLog, Position, RecordedEvent, StreamId};
use uuid::Uuid;

use crate::index::{events_of, SUBJECT_TYPE};
use crate::subjects::{Subjects, SubjectsError};

/// The format's name and version.
pub const FORMAT: &str = "stele.subject-export/1";

/// A subject's export.
#[derive(Clone, Debug, Serialize)]
pub struct Bundle {
    pub format: &'static str,
    pub subject: String,
    pub generated_at: DateTime<Utc>,
    /// The last position of the log when the export was made: every event up to it that
    /// concerns the subject is in `events`.
    pub log_head: Position,
    /// Subjects merged into this one (their data is part of the export).
    pub merged_from: Vec<String>,
    pub minor: bool,
    /// The identifiers that lead to the person (none after erasure).
    pub identifiers: Vec<String>,
    /// The erasure, if they were erased: which keys, when, by whom.
    pub erased: Option<Erasure>,
    /// Every consent given or withdrawn, oldest first.
    pub consents: Vec<ConsentEntry>,
    /// Their tasks, as they stand.
    pub tasks: Vec<TaskEntry>,
    /// Conversations and memories derived from them (filled by the channels and the memory).
    pub conversations: Vec<Value>,
    pub memories: Vec<Value>,
    /// Every event that concerns them, in log order, with their data readable (or `[erased]`).
    pub events: Vec<ExportedEvent>,
    /// Their files (raw mails, attachments), named by the digests the events refer to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    /// The same as a page for people: a timeline.
    pub timeline_html: String,
    /// Inclusion proofs of `events` against the newest signed checkpoint of the audit log
    /// (`stele.audit-proof/1`), added by whoever has the audit log at hand; `null` without one.
    pub audit: Option<Value>,
}

/// A file of the person's.
#[derive(Clone, Debug, Serialize)]
pub struct FileEntry {
    pub digest: String,
    pub content_type: String,
    pub size: usize,
    /// The bytes, in base64.
    pub content_base64: String,
}

/// A consent as recorded.
#[derive(Clone, Debug, Serialize)]
pub struct ConsentEntry {
    pub position: Position,
    pub purpose: String,
    pub given: bool,
    /// `subject` or `guardian`.
    pub by: String,
    pub guardian: Option<String>,
    pub channel: String,
    pub at: DateTime<Utc>,
}

/// A task of the subject.
#[derive(Clone, Debug, Serialize)]
pub struct TaskEntry {
    pub task_id: String,
    pub status: String,
    pub channel: Option<String>,
    pub workflow: Option<String>,
    pub input: String,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An event, as exported.
#[derive(Clone, Debug, Serialize)]
pub struct ExportedEvent {
    pub position: Position,
    pub stream: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    pub actor: String,
    pub channel: String,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    /// The payload, personal values shown as their values (or `[erased]`).
    pub data: Value,
}

/// `value` with every personal form replaced by what it holds: the value, `[erased]`, or
/// `[sealed]`.
pub fn plainly(value: &Value) -> Value {
    if let Some((found, body)) = as_marker(value) {
        return match found {
            marker::PERSONAL => plainly(body.get("value").unwrap_or(&Value::Null)),
            marker::ERASED => Value::String(ERASED.into()),
            _ => Value::String(SEALED.into()),
        };
    }
    match value {
        Value::Array(items) => Value::Array(items.iter().map(plainly).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), plainly(v))).collect())
        }
        other => other.clone(),
    }
}

impl Subjects {
    /// Everything held about `subject`, read through `log` (which opens sealed values); the
    /// export is recorded (`SubjectExported`). The subjects index must have caught up with the
    /// log (the caller sees to it).
    pub async fn export(
        &self,
        log: &dyn EventLog,
        subject: &str,
        head: Position,
        by: &str,
        meta: CommandMeta,
    ) -> Result<Bundle, SubjectsError> {
        let state = self
            .get(subject)
            .await?
            .ok_or_else(|| SubjectsError::NotFound(subject.to_owned()))?;
        let keys = state.keys();
        let concerned = events_of(self.pool(), &keys).await?;
        let positions: BTreeSet<Position> = concerned
            .iter()
            .filter(|(p, _)| *p <= head)
            .map(|(p, _)| *p)
            .collect();
        let streams: BTreeSet<StreamId> = concerned
            .into_iter()
            .filter(|(p, _)| *p <= head)
            .map(|(_, s)| s)
            .collect();
        // Every event of a stream that holds their data concerns them (their task's routing as
        // much as its input), up to the head the export was asked at.
        let mut events: Vec<RecordedEvent> = Vec::with_capacity(positions.len());
        for stream in &streams {
            let read = log
                .read_stream(stream, 0)
                .await
                .map_err(|e| SubjectsError::Store(e.to_string()))?;
            events.extend(read.into_iter().filter(|e| e.position <= head));
        }
        events.sort_by_key(|e| e.position);

        let mut consents = Vec::new();
        let mut tasks: BTreeMap<String, (Task, DateTime<Utc>)> = BTreeMap::new();
        for event in &events {
            if event.stream.aggregate_type == SUBJECT_TYPE {
                if let Some(consent) = consent_entry(event) {
                    consents.push(consent);
                }
            }
            if event.stream.aggregate_type == "task" {
                if let Ok(task_event) = serde_json::from_value::<TaskEvent>(event.payload.clone()) {
                    let (task, _) = tasks
                        .entry(event.stream.aggregate_id.clone())
                        .or_insert_with(|| (Task::default(), event.recorded_at));
                    cqrs_es::Aggregate::apply(task, task_event);
                }
            }
        }
        let tasks = tasks
            .into_iter()
            .map(|(task_id, (task, created_at))| TaskEntry {
                task_id,
                status: serde_json::to_value(task.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                channel: task.channel.map(|c| c.as_str().to_owned()),
                workflow: task.workflow,
                input: task.input.text().to_owned(),
                result: task.result.map(|r| r.json()),
                error: task.error.map(|e| e.text().to_owned()),
                created_at,
            })
            .collect();
        let events: Vec<ExportedEvent> = events
            .into_iter()
            .map(|e| ExportedEvent {
                position: e.position,
                stream: e.stream.to_string(),
                sequence: e.sequence,
                data: plainly(&e.payload),
                event_type: e.event_type,
                event_version: e.event_version,
                recorded_at: e.recorded_at,
                actor: e.metadata.command.actor,
                channel: e.metadata.command.channel,
                correlation_id: e.metadata.command.correlation_id,
                causation_id: e.metadata.command.causation_id,
            })
            .collect();
        let mut bundle = Bundle {
            format: FORMAT,
            subject: subject.to_owned(),
            generated_at: Utc::now(),
            log_head: head,
            merged_from: state.absorbed.iter().cloned().collect(),
            minor: state.minor,
            identifiers: state.identifiers.iter().map(|i| i.to_string()).collect(),
            erased: state.erased.clone(),
            consents,
            tasks,
            conversations: Vec::new(),
            memories: Vec::new(),
            events,
            files: Vec::new(),
            timeline_html: String::new(),
            audit: None,
        };
        for key in &keys {
            let blobs = self.blobs();
            for digest in blobs.list(key).await? {
                if let Some((content_type, bytes)) = blobs.get(key, &digest).await? {
                    bundle.files.push(FileEntry {
                        digest,
                        content_type,
                        size: bytes.len(),
                        content_base64: base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            &bytes,
                        ),
                    });
                }
            }
        }
        bundle.timeline_html = timeline(&bundle);
        let record = SubjectCommand::RecordExport {
            by: by.to_owned(),
            events: bundle.events.len() as u64,
            at: bundle.generated_at,
        };
        self.log()
            .execute(subject, record, meta)
            .await
            .map_err(SubjectsError::from)?;
        Ok(bundle)
    }
}

fn consent_entry(event: &RecordedEvent) -> Option<ConsentEntry> {
    let given = match event.event_type.as_str() {
        "ConsentGiven" => true,
        "ConsentWithdrawn" => false,
        _ => return None,
    };
    let data = plainly(event.payload.get("data")?);
    let text = |name: &str| data.get(name).and_then(Value::as_str).map(str::to_owned);
    Some(ConsentEntry {
        position: event.position,
        purpose: text("purpose")?,
        given,
        by: text("by")?,
        guardian: text("name"),
        channel: text("channel")?,
        at: serde_json::from_value(data.get("at")?.clone()).ok()?,
    })
}

/// The bundle as a page: who, what was erased, consents, then every event in order.
fn timeline(bundle: &Bundle) -> String {
    use std::fmt::Write as _;
    let escape = |text: &str| html_escape::encode_text(text).into_owned();
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Data held about subject {id}</title>\
         <style>body{{font-family:sans-serif;max-width:60em;margin:auto}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #ccc;\
         padding:.3em;vertical-align:top;text-align:left}}pre{{white-space:pre-wrap;margin:0}}</style>\
         </head><body>\n<h1>Data held about subject {id}</h1>\n\
         <p>Exported {at} (log position {head}); {count} events.</p>\n",
        id = escape(&bundle.subject),
        at = bundle.generated_at.to_rfc3339(),
        head = bundle.log_head,
        count = bundle.events.len(),
    );
    if let Some(erased) = &bundle.erased {
        let _ = writeln!(
            page,
            "<p><strong>Erased</strong> {} by {} ({}): the data below reads [erased].</p>",
            erased.at.to_rfc3339(),
            escape(&erased.by),
            escape(&erased.reason)
        );
    }
    if !bundle.identifiers.is_empty() {
        let _ = writeln!(
            page,
            "<p>Known as: {}</p>",
            escape(&bundle.identifiers.join(", "))
        );
    }
    page.push_str("<h2>Consents</h2>\n<table><tr><th>When</th><th>Purpose</th><th>Given</th><th>By</th><th>Channel</th></tr>\n");
    for c in &bundle.consents {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.at.to_rfc3339(),
            escape(&c.purpose),
            if c.given { "given" } else { "withdrawn" },
            escape(c.guardian.as_deref().unwrap_or(&c.by)),
            escape(&c.channel)
        );
    }
    page.push_str("</table>\n<h2>Timeline</h2>\n<table><tr><th>#</th><th>When</th><th>What</th><th>Where</th><th>Who</th><th>Data</th></tr>\n");
    for e in &bundle.events {
        let data =
            serde_json::to_string_pretty(e.data.get("data").unwrap_or(&e.data)).unwrap_or_default();
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} via {}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            e.position,
            e.recorded_at.to_rfc3339(),
            escape(&e.event_type),
            escape(&e.stream),
            escape(&e.channel),
            escape(&e.actor),
            escape(&data)
        );
    }
    page.push_str("</table>\n</body></html>\n");
    page
}
