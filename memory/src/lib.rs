//! The memory: what Stele remembers, as a projection of the log.
//!
//! - **What is remembered.** Explicit facts (`MemoryStored`, the [`Memory`] aggregate: content,
//!   importance, tags, scope, an optional key), and conversation messages in and out
//!   (`MessageReceived`, `ReplyQueued`). Each memory cites the event it came from (its position
//!   and event id) and is valid from that event's time until a later fact with the same key in
//!   the same scope supersedes it, or it is forgotten: "what was true then" stays answerable.
//! - **The index** ([`index`]): vectors (pgvector HNSW or sqlite-vec) and full-text terms
//!   (`tsvector` or FTS5), searched together ([`Memories::search`]) and fused by Reciprocal Rank
//!   Fusion, with filters by scope that keep recall.
//! - **Vectors are cached** by (model, sha256 of the text) in `embedding_cache`, so a rebuild
//!   never embeds the same text twice.
//! - **Erasure.** A person's memories, vectors, terms and cached vectors are deleted when they
//!   are erased (`SubjectErased`); since their content in the log is sealed with their destroyed
//!   key, a rebuild after erasure has none of them.
//!
//! [`Memory`]: stele_aggregates::memory::Memory

pub mod agents;
pub mod index;
mod projection;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use stele_aggregates::memory::{Memory, MemoryCommand, MemoryScope};
use stele_aggregates::personal::Personal;
use stele_engine::store::{Store, StorePool};
use stele_engine::{CommandBus, CommandMeta};
use stele_models::embed::EmbeddingModel;
use stele_privacy::Sealer;

pub use index::{Filter, Scope, VectorIndex};
pub use projection::{MemoryProjection, MEMORY};

/// Reciprocal Rank Fusion's constant: a result at rank r of one list adds 1 / (k + r).
pub const RRF_K: f64 = 60.0;

/// In hybrid search, the full-text list holds only memories with at least this share of the
/// query's terms (Elasticsearch's `minimum_should_match: 75%`): a memory that shares one or two
/// common words with a question would otherwise rank in both lists and push the vector
/// search's best answer down (on `bench/data/retrieval-qa.json`, fusion with any-word matches
/// fell below the vector search alone; see `bench/RESULTS.md`).
pub const HYBRID_MIN_MATCH: f64 = 0.75;

/// Errors of the memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0}")]
    Refused(#[from] stele_aggregates::memory::MemoryError),
    #[error("embedding failed: {0}")]
    Embedding(#[from] stele_models::embed::EmbeddingError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Store(String),
}

/// How to search.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Vectors and full text, fused.
    #[default]
    Hybrid,
    /// Vectors only.
    Dense,
    /// Full text only.
    Text,
}

/// A search.
#[derive(Clone, Debug)]
pub struct Search {
    pub query: String,
    pub filter: Filter,
    pub limit: usize,
    pub mode: Mode,
}

/// A memory found.
#[derive(Clone, Debug, Serialize)]
pub struct Hit {
    pub memory_id: String,
    pub kind: String,
    /// Its content (`[erased]` if its person was erased since).
    pub content: String,
    /// The fused score (higher is better).
    pub score: f64,
    pub importance: f64,
    pub tags: Vec<String>,
    pub key: Option<String>,
    pub agent: Option<String>,
    pub conversation: Option<String>,
    pub subject: Option<String>,
    pub workflow: Option<String>,
    pub tenant: Option<String>,
    /// The log position of the event it came from, and the events' ids it cites.
    pub position: i64,
    pub sources: Vec<String>,
    pub valid_from: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
}

/// A fact to remember.
#[derive(Clone, Debug, Default)]
pub struct NewMemory {
    pub content: String,
    pub importance: f32,
    pub tags: Vec<String>,
    pub scope: MemoryScope,
    pub key: Option<String>,
    pub sources: Vec<String>,
}

/// Candidates weighed for a context: this many relevant, half as many important and recent.
const CONTEXT_CANDIDATES: usize = 20;
/// A memory's recency weight halves every this many days.
pub const RECENCY_HALF_LIFE_DAYS: f64 = 7.0;
/// The first line of a context.
const CONTEXT_HEADER: &str = "What you remember that may bear on this (most relevant first):";

/// An estimate of the tokens `text` takes: a quarter of its characters, rounded up (the rule
/// of thumb for English with BPE tokenizers; the models behind a role differ, and a budget
/// needs a bound, not an exact count).
pub fn tokens(text: &str) -> u32 {
    (text.chars().count() as u32).div_ceil(4)
}

/// What a prompt's context is drawn from.
#[derive(Clone, Debug, Default)]
pub struct ContextRequest {
    pub query: String,
    pub filter: Filter,
    /// At most this many tokens ([`tokens`]).
    pub tokens: u32,
    /// The time recency is measured from (now when absent).
    pub now: Option<DateTime<Utc>>,
}

/// Remembered context for a prompt.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Context {
    /// The text to put before the prompt (empty when nothing fits or bears on it).
    pub text: String,
    /// Its estimated tokens.
    pub tokens: u32,
    /// One line per memory, in the text's order.
    #[serde(skip)]
    pub lines: Vec<String>,
    /// The memories it holds, in the text's order.
    pub memories: Vec<Hit>,
}

/// Counts of the memory.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub memories: i64,
    pub valid: i64,
    pub cached_vectors: i64,
    pub model: String,
    pub dimensions: usize,
}

/// The memory's service: remember facts and search.
pub struct Memories {
    pool: StorePool,
    /// Where searches read ([`Store::reads`]).
    reads: StorePool,
    bus: CommandBus<Memory>,
    embedder: Arc<dyn EmbeddingModel>,
    sealer: Arc<Sealer>,
}

impl Memories {
    /// The memory of `store` (its `log` seals personal values), embedding with `embedder`, opening
    /// sealed content with `sealer`.
    pub fn new(store: &Store, embedder: Arc<dyn EmbeddingModel>, sealer: Arc<Sealer>) -> Self {
        Memories {
            pool: store.pool.clone(),
            reads: store.reads.clone(),
            bus: CommandBus::new(store.log.clone(), ()),
            embedder,
            sealer,
        }
    }

    /// The embedding model.
    pub fn embedder(&self) -> &Arc<dyn EmbeddingModel> {
        &self.embedder
    }

    /// The store's pool the index lives in.
    pub fn pool(&self) -> &StorePool {
        &self.pool
    }

    /// The projection that keeps this memory's index.
    pub fn projection(&self) -> Arc<MemoryProjection> {
        Arc::new(MemoryProjection::new(
            self.embedder.clone(),
            self.sealer.clone(),
        ))
    }

    /// Records a fact (`MemoryStored`); the projection indexes it. Returns its id.
    pub async fn store(&self, memory: NewMemory, meta: CommandMeta) -> Result<String, MemoryError> {
        let id = uuid::Uuid::now_v7().to_string();
        let content = match &memory.scope.subject {
            Some(subject) => Personal::of(subject.clone(), memory.content),
            None => Personal::plain(memory.content),
        };
        self.bus
            .create(
                &id,
                MemoryCommand::Store {
                    content,
                    importance: memory.importance,
                    tags: memory.tags,
                    scope: memory.scope,
                    key: memory.key,
                    sources: memory.sources,
                },
                meta,
            )
            .await
            .map_err(|e| match e {
                stele_engine::CommandError::Rejected(refused) => MemoryError::Refused(refused),
                other => MemoryError::Store(other.to_string()),
            })?;
        Ok(id)
    }

    /// Forgets a memory (`MemoryForgotten`).
    pub async fn forget(
        &self,
        id: &str,
        reason: &str,
        meta: CommandMeta,
    ) -> Result<(), MemoryError> {
        self.bus
            .execute(
                id,
                MemoryCommand::Forget {
                    reason: reason.to_owned(),
                },
                meta,
            )
            .await
            .map_err(|e| match e {
                stele_engine::CommandError::Rejected(refused) => MemoryError::Refused(refused),
                other => MemoryError::Store(other.to_string()),
            })?;
        Ok(())
    }

    /// The memories best matching `search`, best first.
    pub async fn search(&self, search: &Search) -> Result<Vec<Hit>, MemoryError> {
        self.search_with(search, async {
            if search.mode == Mode::Text {
                return Ok(None);
            }
            let mut vectors = self
                .embedder
                .embed(std::slice::from_ref(&search.query))
                .await?;
            Ok(Some(vectors.pop().unwrap_or_default()))
        })
        .await
    }

    /// [`Self::search`] with the query's vector given (`None` in text mode): what the index
    /// does, without the embedding.
    pub async fn search_embedded(
        &self,
        search: &Search,
        vector: Option<&[f32]>,
    ) -> Result<Vec<Hit>, MemoryError> {
        self.search_with(search, async { Ok(vector.map(<[f32]>::to_vec)) })
            .await
    }

    /// Runs `search` with the query's vector from `vector`: the full-text side does not wait
    /// for it (the query is embedded while the text index is read), and the two sides read on
    /// their own connections, side by side.
    async fn search_with(
        &self,
        search: &Search,
        vector: impl std::future::Future<Output = Result<Option<Vec<f32>>, MemoryError>>,
    ) -> Result<Vec<Hit>, MemoryError> {
        let index = index::for_pool(&self.reads);
        let limit = search.limit.clamp(1, 100);
        let candidates = (limit * 4).max(50);
        let dense = async {
            if search.mode == Mode::Text {
                return Ok(None);
            }
            let Some(vector) = vector.await? else {
                return Ok(None);
            };
            Ok::<_, MemoryError>(Some(
                index
                    .vector_search(&self.reads, &vector, &search.filter, candidates, false)
                    .await?,
            ))
        };
        let text = async {
            if search.mode == Mode::Dense {
                return Ok(None);
            }
            let min_match = match search.mode {
                Mode::Hybrid => HYBRID_MIN_MATCH,
                Mode::Text | Mode::Dense => 0.0,
            };
            Ok::<_, MemoryError>(Some(
                index
                    .text_search(
                        &self.reads,
                        &search.query,
                        &search.filter,
                        candidates,
                        min_match,
                    )
                    .await?,
            ))
        };
        let (dense, text) = tokio::try_join!(dense, text)?;
        let lists: Vec<Vec<String>> = dense.into_iter().chain(text).collect();
        let ranked = fuse(&lists, RRF_K);
        let top: Vec<(String, f64)> = ranked.into_iter().take(limit).collect();
        self.hits(top).await
    }

    /// The memories `top` names (with their scores), in that order, their contents opened.
    async fn hits(&self, top: Vec<(String, f64)>) -> Result<Vec<Hit>, MemoryError> {
        let index = index::for_pool(&self.reads);
        let ids: Vec<String> = top.iter().map(|(id, _)| id.clone()).collect();
        let mut rows: HashMap<String, index::Row> = index
            .fetch(&self.reads, &ids)
            .await?
            .into_iter()
            .map(|r| (r.memory_id.clone(), r))
            .collect();
        let mut hits = Vec::with_capacity(top.len());
        for (id, score) in top {
            let Some(row) = rows.remove(&id) else {
                continue;
            };
            hits.push(Hit {
                content: self.open(&row.content).await,
                memory_id: row.memory_id,
                kind: row.kind,
                score,
                importance: row.importance,
                tags: row.tags,
                key: row.key,
                agent: row.scope.agent,
                conversation: row.scope.conversation,
                subject: row.scope.subject,
                workflow: row.scope.workflow,
                tenant: row.scope.tenant,
                position: row.position,
                sources: row.sources,
                valid_from: row.valid_from,
                valid_until: row.valid_until,
            });
        }
        Ok(hits)
    }

    /// Remembered context for a prompt, at most `request.tokens` long: candidates are the
    /// memories most relevant to the query (hybrid search), the most important and the most
    /// recent in the filter's scope; each is weighed by relevance (its fused score over the
    /// best one's), importance and recency (halved every [`RECENCY_HALF_LIFE_DAYS`]), and the
    /// heaviest are taken while they fit, best first.
    pub async fn context(&self, request: &ContextRequest) -> Result<Context, MemoryError> {
        let empty = Context::default();
        if request.tokens == 0 {
            return Ok(empty);
        }
        let relevant = self
            .search(&Search {
                query: request.query.clone(),
                filter: request.filter.clone(),
                limit: CONTEXT_CANDIDATES,
                mode: Mode::Hybrid,
            })
            .await?;
        let mut others = Vec::new();
        for order in [index::Order::Importance, index::Order::Recent] {
            others.extend(
                index::list(&self.reads, &request.filter, order, CONTEXT_CANDIDATES / 2).await?,
            );
        }
        let best = relevant
            .first()
            .map_or(1.0, |hit| hit.score)
            .max(f64::EPSILON);
        let mut weighed: HashMap<String, (f64, Hit)> = HashMap::new();
        let now = request.now.unwrap_or_else(Utc::now);
        let weigh = |hit: &Hit, relevance: f64| {
            let age_days = (now - hit.valid_from).num_seconds().max(0) as f64 / 86_400.0;
            let recency = 0.5f64.powf(age_days / RECENCY_HALF_LIFE_DAYS);
            0.6 * relevance + 0.25 * hit.importance.clamp(0.0, 1.0) + 0.15 * recency
        };
        for hit in relevant {
            let weight = weigh(&hit, hit.score / best);
            weighed.insert(hit.memory_id.clone(), (weight, hit));
        }
        others.retain(|id| !weighed.contains_key(id));
        others.sort();
        others.dedup();
        for hit in self
            .hits(others.into_iter().map(|id| (id, 0.0)).collect())
            .await?
        {
            let weight = weigh(&hit, 0.0);
            weighed.insert(hit.memory_id.clone(), (weight, hit));
        }
        let mut ranked: Vec<(f64, Hit)> = weighed.into_values().collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.memory_id.cmp(&b.1.memory_id)));
        let mut context = empty;
        let mut used = tokens(CONTEXT_HEADER);
        for (_, hit) in ranked {
            if hit.content == stele_aggregates::personal::SEALED {
                continue;
            }
            let line = format!(
                "- ({}, {}) {}",
                hit.valid_from.format("%Y-%m-%d"),
                hit.kind,
                hit.content.replace('\n', " ")
            );
            let cost = tokens(&line);
            if used + cost > request.tokens {
                continue;
            }
            used += cost;
            context.lines.push(line);
            context.memories.push(hit);
        }
        if !context.lines.is_empty() {
            context.tokens = used;
            context.text = format!("{CONTEXT_HEADER}\n{}", context.lines.join("\n"));
        }
        Ok(context)
    }

    /// The text of a stored content (a sealed personal value as JSON).
    async fn open(&self, content: &str) -> String {
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(content) else {
            return content.to_owned();
        };
        if self.sealer.open(&mut value).await.is_err() {
            return stele_aggregates::personal::SEALED.to_owned();
        }
        match serde_json::from_value::<Personal<serde_json::Value>>(value) {
            Ok(personal) => match personal.get() {
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None if matches!(personal, Personal::Erased { .. }) => {
                    stele_aggregates::personal::ERASED.to_owned()
                }
                None => stele_aggregates::personal::SEALED.to_owned(),
            },
            Err(_) => stele_aggregates::personal::SEALED.to_owned(),
        }
    }

    /// Counts.
    pub async fn stats(&self) -> Result<Stats, MemoryError> {
        let (memories, valid) = index::for_pool(&self.pool).count(&self.pool).await?;
        let cached_vectors = projection::cached(&self.pool, self.embedder.name()).await?;
        Ok(Stats {
            memories,
            valid,
            cached_vectors,
            model: self.embedder.name().to_owned(),
            dimensions: self.embedder.dimensions(),
        })
    }
}

impl Memories {
    /// Moves fresh memories into the approximate index (PostgreSQL's HNSW), some at a time:
    /// see [`index::VectorIndex::settle`]. Returns how many moved (0: none left).
    pub async fn settle(&self) -> Result<usize, MemoryError> {
        Ok(index::for_pool(&self.pool).settle(&self.pool).await?)
    }

    /// Settles fresh memories as they come, until `stopped`: the node's task beside the
    /// projection (inserting into HNSW costs far more than the row, so the projection stores
    /// rows and this follows behind; a search reads fresh rows exactly meanwhile). On SQLite
    /// there is nothing to settle.
    pub async fn settle_until(&self, stopped: impl std::future::Future<Output = ()>) {
        let mut stopped = std::pin::pin!(stopped);
        if matches!(self.pool, StorePool::Sqlite(_)) {
            // Nothing to do, but the node takes a task that ends for a node that stops.
            return stopped.await;
        }
        loop {
            let pause = match self.settle().await {
                Ok(0) => std::time::Duration::from_secs(1),
                Ok(_) => std::time::Duration::ZERO,
                Err(e) => {
                    tracing::warn!(error = %e, "settling fresh memories failed; trying again");
                    std::time::Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Reciprocal Rank Fusion of ranked lists: each id scores Σ 1 / (k + rank), rank from 1; best
/// first (ties by id, for stable results).
pub fn fuse(lists: &[Vec<String>], k: f64) -> Vec<(String, f64)> {
    let mut scores: HashMap<&str, f64> = HashMap::new();
    for list in lists {
        for (rank, id) in list.iter().enumerate() {
            *scores.entry(id).or_default() += 1.0 / (k + rank as f64 + 1.0);
        }
    }
    let mut fused: Vec<(String, f64)> = scores
        .into_iter()
        .map(|(id, score)| (id.to_owned(), score))
        .collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement() {
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let fused = fuse(&[ids(&["a", "b", "c"]), ids(&["c", "b", "d"])], 60.0);
        let order: Vec<&str> = fused.iter().map(|(id, _)| id.as_str()).collect();
        // c: 1/63 + 1/61 edges out b: 2/62.
        assert_eq!(order, ["c", "b", "a", "d"]);
        assert!((fused[0].1 - (1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-12);
    }
}
