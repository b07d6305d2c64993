//! The projection that keeps the memory's index: facts, messages and replies in, a person's
//! memories out when they are erased.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use stele_aggregates::memory::MemoryEvent;
use stele_aggregates::personal::Personal;
use stele_aggregates::workflow_run::RunEvent;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Value};
use stele_engine::store::StorePool;
use stele_engine::RecordedEvent;
use stele_models::embed::EmbeddingModel;
use stele_privacy::Sealer;

use crate::index::{self, Doc, Scope};

/// The projection's name.
pub const MEMORY: &str = "memory";

/// Keeps `memories` (and, on SQLite, `memory_bits` and `memory_terms`).
pub struct MemoryProjection {
    embedder: Arc<dyn EmbeddingModel>,
    sealer: Arc<Sealer>,
}

impl MemoryProjection {
    pub fn new(embedder: Arc<dyn EmbeddingModel>, sealer: Arc<Sealer>) -> Self {
        MemoryProjection { embedder, sealer }
    }

    /// The memory an event adds, with its text, if it adds one (and its text can be read).
    async fn doc(&self, event: &RecordedEvent) -> Result<Option<(Doc, String)>, ProjectionError> {
        if event.event_type == "StepCompleted"
            && event
                .payload
                .pointer("/data/remember")
                .is_none_or(Json::is_null)
        {
            // Most steps' outputs are not to be remembered: not even opened.
            return Ok(None);
        }
        let stored = event.payload.get("data").cloned().unwrap_or_default();
        let mut opened = event.payload.clone();
        self.sealer
            .open(&mut opened)
            .await
            .map_err(|e| ProjectionError::Apply(format!("opening {}: {e}", event.position)))?;
        let data = opened.get("data").cloned().unwrap_or_default();
        let event_id = event.metadata.event_id.to_string();
        let stream_id = &event.stream.aggregate_id;
        let (memory_id, kind, content_field, scope, importance, tags, key, sources) =
            match event.event_type.as_str() {
                "MemoryStored" => {
                    let Ok(MemoryEvent::MemoryStored {
                        importance,
                        tags,
                        scope,
                        key,
                        mut sources,
                        ..
                    }) = serde_json::from_value::<MemoryEvent>(opened.clone())
                    else {
                        return Ok(None);
                    };
                    sources.insert(0, event_id);
                    (
                        stream_id.clone(),
                        "fact",
                        "content",
                        scope,
                        f64::from(importance),
                        tags,
                        key,
                        sources,
                    )
                }
                "MessageReceived" | "ReplyQueued" => {
                    let message_id = data
                        .get("message_id")
                        .and_then(Json::as_str)
                        .unwrap_or_default();
                    let mut subjects = BTreeSet::new();
                    stele_privacy::subjects_in(&stored["text"], &mut subjects);
                    let scope = Scope {
                        conversation: Some(stream_id.clone()),
                        subject: subjects.into_iter().next(),
                        ..Scope::default()
                    };
                    let kind = if event.event_type == "ReplyQueued" {
                        "reply"
                    } else {
                        "message"
                    };
                    (
                        format!("{stream_id}/{message_id}"),
                        kind,
                        "text",
                        scope,
                        0.3,
                        Vec::new(),
                        None,
                        vec![event_id],
                    )
                }
                "StepCompleted" => {
                    let Ok(RunEvent::StepCompleted {
                        step,
                        attempt,
                        remember: Some(remember),
                        ..
                    }) = serde_json::from_value::<RunEvent>(opened.clone())
                    else {
                        return Ok(None);
                    };
                    (
                        format!("{stream_id}/{step}/{attempt}"),
                        "step",
                        "output",
                        remember.scope,
                        f64::from(remember.importance),
                        remember.tags,
                        None,
                        vec![event_id],
                    )
                }
                "AgentSpoke" if event.stream.aggregate_type == "room" => {
                    // A room agent's words, in its seat's memory scope.
                    let seq = data.get("seq").and_then(Json::as_u64).unwrap_or_default();
                    let mut subjects = BTreeSet::new();
                    stele_privacy::subjects_in(&stored["text"], &mut subjects);
                    let scope = Scope {
                        agent: data.get("memory").and_then(Json::as_str).map(str::to_owned),
                        conversation: Some(format!("room/{stream_id}")),
                        subject: subjects.into_iter().next(),
                        ..Scope::default()
                    };
                    (
                        format!("room/{stream_id}/{seq}"),
                        "room",
                        "text",
                        scope,
                        0.3,
                        Vec::new(),
                        None,
                        vec![event_id],
                    )
                }
                _ => return Ok(None),
            };
        // A message's text, a fact's content, a step's output (its text, or its JSON).
        let Ok(text) = serde_json::from_value::<Personal<Json>>(data[content_field].clone()) else {
            return Ok(None);
        };
        let text = text.get().map(|value| match value {
            Json::String(text) => text.clone(),
            other => other.to_string(),
        });
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
            // Erased (or unreadable): nothing of it is remembered.
            return Ok(None);
        };
        let doc = Doc {
            memory_id,
            kind: kind.to_owned(),
            position: event.position.0,
            content: stored[content_field].to_string(),
            text_sha256: hex::encode(Sha256::digest(text.as_bytes())),
            text: String::new(),
            scope,
            importance,
            tags,
            key,
            sources,
            valid_from: event.recorded_at,
            vector: Vec::new(),
        };
        Ok(Some((doc, text)))
    }

    /// Vectors for `texts` (by their hashes): from the cache, the rest embedded and cached.
    async fn vectors(
        &self,
        db: &mut Db<'_>,
        texts: &[(String, String)],
    ) -> Result<HashMap<String, Vec<f32>>, ProjectionError> {
        let model = self.embedder.name();
        let hashes: Vec<String> = texts.iter().map(|(hash, _)| hash.clone()).collect();
        let lookup = match db.dialect() {
            stele_engine::store::sql::Dialect::Postgres => {
                "SELECT text_sha256, vector FROM embedding_cache \
                 WHERE model = $1 AND text_sha256 = ANY($2)"
            }
            stele_engine::store::sql::Dialect::Sqlite => {
                "SELECT text_sha256, vector FROM embedding_cache \
                 WHERE model = $1 AND text_sha256 IN (SELECT value FROM json_each($2))"
            }
        };
        let mut found = HashMap::new();
        for row in db
            .fetch_all(lookup, &[model.into(), Value::Texts(&hashes)])
            .await?
        {
            let hash: String = row.get("text_sha256")?;
            let text: String = row.get("vector")?;
            if let Ok(vector) = serde_json::from_str::<Vec<f32>>(&text) {
                found.insert(hash, vector);
            }
        }
        let mut missing: Vec<&(String, String)> = texts
            .iter()
            .filter(|(h, _)| !found.contains_key(h))
            .collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(found);
        }
        let inputs: Vec<String> = missing.iter().map(|(_, t)| t.clone()).collect();
        let vectors = self
            .embedder
            .embed(&inputs)
            .await
            .map_err(|e| ProjectionError::Apply(format!("embedding: {e}")))?;
        let insert = "INSERT INTO embedding_cache (model, text_sha256, vector) \
                      VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
        for ((hash, _), vector) in missing.into_iter().zip(vectors) {
            let text = index::vector_text(&vector);
            db.execute(insert, &[model.into(), hash.into(), (&text).into()])
                .await?;
            found.insert(hash.clone(), vector);
        }
        Ok(found)
    }
}

/// The most of a text its terms are drawn from (a `tsvector` holds at most 1 MB).
const MAX_TERMS_BYTES: usize = 64 * 1024;

/// The part of `text` the full-text index reads: at most [`MAX_TERMS_BYTES`], cut on a
/// character boundary, in words as queries are split (`index::words`): every character that is
/// neither a letter nor a digit becomes a space. So "E-4021" is the terms `e` and `4021` in a
/// memory as in a query (PostgreSQL's parser would read `-4021`, a signed number, which the
/// query's `4021` never matches), and no NUL reaches PostgreSQL's text (which refuses it: one
/// sender's message must not stop the projection for everyone).
fn terms_text(text: &str) -> String {
    text[..text.floor_char_boundary(MAX_TERMS_BYTES)]
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect()
}

/// How many vectors of `model` are cached.
pub(crate) async fn cached(pool: &StorePool, model: &str) -> Result<i64, sqlx::Error> {
    Db::from(pool)
        .fetch_one(
            "SELECT count(*) AS n FROM embedding_cache WHERE model = $1",
            &[model.into()],
        )
        .await?
        .get("n")
}

#[async_trait]
impl Projection for MemoryProjection {
    fn name(&self) -> &'static str {
        MEMORY
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[
            "MemoryStored",
            "MemoryForgotten",
            "MessageReceived",
            "ReplyQueued",
            "StepCompleted",
            "AgentSpoke",
            "SubjectErased",
        ]
    }

    /// Derived from the log alone: a batch lost with the database is applied again.
    fn deferred_flush(&self) -> bool {
        true
    }

    fn tables(&self) -> &'static [&'static str] {
        &[index::MEMORIES, index::VECTORS, index::TERMS, index::BITS]
    }

    async fn create(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
    ) -> Result<(), ProjectionError> {
        let mut db = Db::from(tx.connection());
        let index = match db.dialect() {
            stele_engine::store::sql::Dialect::Postgres => index::POSTGRES,
            stele_engine::store::sql::Dialect::Sqlite => index::SQLITE,
        };
        index
            .create(&mut db, tables, self.embedder.dimensions())
            .await?;
        Ok(())
    }

    /// The keys of the people in the batch, read before its transaction (then held in memory
    /// for `apply`'s openings: on the embedded store the transaction holds the one connection).
    async fn prepare(&self, events: &[RecordedEvent]) -> Result<(), ProjectionError> {
        let mut subjects = BTreeSet::new();
        for event in events {
            stele_privacy::subjects_in(&event.payload, &mut subjects);
        }
        self.sealer
            .hold(subjects)
            .await
            .map_err(|e| ProjectionError::Apply(format!("reading people's keys: {e}")))
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        // Read what the events add first, to embed their texts in one batch.
        let mut docs: HashMap<usize, Doc> = HashMap::new();
        let mut texts = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if let Some((doc, text)) = self.doc(event).await? {
                texts.push((doc.text_sha256.clone(), text.clone()));
                let mut doc = doc;
                doc.text = terms_text(&text);
                docs.insert(i, doc);
            }
        }
        let mut db = Db::from(tx.connection());
        let index = match db.dialect() {
            stele_engine::store::sql::Dialect::Postgres => index::POSTGRES,
            stele_engine::store::sql::Dialect::Sqlite => index::SQLITE,
        };
        let vectors = if texts.is_empty() {
            HashMap::new()
        } else {
            self.vectors(&mut db, &texts).await?
        };
        // Memories are written a run at a time, in the log's order: a run ends with a fact
        // that supersedes others, and before a forgetting or an erasure.
        let mut run: Vec<Doc> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if let Some(mut doc) = docs.remove(&i) {
                let Some(vector) = vectors.get(&doc.text_sha256) else {
                    continue;
                };
                doc.vector = vector.clone();
                let keyed = doc.key.is_some();
                run.push(doc);
                if keyed {
                    index.insert_all(&mut db, tables, &run).await?;
                    if let Some(fact) = run.last() {
                        index.supersede(&mut db, tables, fact).await?;
                    }
                    run.clear();
                }
                continue;
            }
            if matches!(
                event.event_type.as_str(),
                "MemoryForgotten" | "SubjectErased"
            ) {
                index.insert_all(&mut db, tables, &run).await?;
                run.clear();
            }
            match event.event_type.as_str() {
                "MemoryForgotten" => {
                    index
                        .forget(
                            &mut db,
                            tables,
                            &event.stream.aggregate_id,
                            event.recorded_at,
                        )
                        .await?;
                }
                "SubjectErased" => {
                    let keys: Vec<String> = event
                        .payload
                        .pointer("/data/keys")
                        .and_then(|k| serde_json::from_value(k.clone()).ok())
                        .unwrap_or_default();
                    let hashes = index.erase(&mut db, tables, &keys).await?;
                    let delete = match db.dialect() {
                        stele_engine::store::sql::Dialect::Postgres => {
                            "DELETE FROM embedding_cache WHERE text_sha256 = ANY($1)"
                        }
                        stele_engine::store::sql::Dialect::Sqlite => {
                            "DELETE FROM embedding_cache \
                             WHERE text_sha256 IN (SELECT value FROM json_each($1))"
                        }
                    };
                    db.execute(delete, &[Value::Texts(&hashes)]).await?;
                }
                _ => {}
            }
        }
        index.insert_all(&mut db, tables, &run).await?;
        Ok(())
    }
}
