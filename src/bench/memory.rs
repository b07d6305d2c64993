//! `stele bench memory`: the memory's figures.
//!
//! - **Embedding throughput**, batch 32, against Python sentence-transformers on the same
//!   sentences (the first 256 passages of `bench/data/retrieval-qa.json`), alternating rounds in
//!   the same run; the tch adapter too when the binary is built with `--features tch`.
//! - **Retrieval quality**: nDCG@10 of dense, full-text and hybrid search on
//!   `bench/data/retrieval-qa.json` (graded relevance), on each store.
//! - **At scale** (100,000 memories by default), on each store: ingest rate with cached vectors
//!   (the projection catching up with `MemoryStored` events whose vectors are in
//!   `embedding_cache`), hybrid search latency (with and without embedding the query), and recall@10
//!   of the vector search against exact search, unfiltered and with filters that keep 1% and
//!   10% of the memories.
//!
//! The memories at scale are the labelled passages again and again, each copy with its own
//! number (so its text, and its terms, are its own) and its own vector: the passage's, moved by
//! Gaussian noise (σ = 0.02 a component, a cosine of about 0.93 to the passage), so that the
//! index holds dense clusters of near neighbours, as a real memory of repeated facts does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stele_aggregates::memory::MemoryScope;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::sql::{Db, Dialect, Value};
use stele_engine::store::{Migrate, Store};
use stele_engine::CommandMeta;
use stele_memory::index::{self, Filter};
use stele_memory::{Memories, Mode, NewMemory, Search, MEMORY};
use stele_models::embed::{load_embedding_model, EmbeddingModel};

use super::{Latency, Machine, Scratch, Targets};

/// The labelled passages and queries.
const QA: &str = include_str!("../../bench/data/retrieval-qa.json");

#[derive(Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    targets: Targets,
    #[command(flatten)]
    model: crate::memory::ModelArgs,
    /// Memories in the index for the ingest, latency and recall figures.
    #[arg(long, default_value_t = 100_000)]
    memories: usize,
    /// Searches timed on each store.
    #[arg(long, default_value_t = 300)]
    searches: usize,
    /// Alternating rounds of the embedding comparison (the medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Passes over the sentences in each round.
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// The Python with sentence-transformers to compare with (`scripts/services.sh
    /// sentence-transformers` prints it); without it, no comparison.
    #[arg(long, env = "STELE_SENTENCE_TRANSFORMERS")]
    python: Option<PathBuf>,
    /// Only the embedding comparison and the quality figures (no store at scale).
    #[arg(long)]
    no_scale: bool,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    model: String,
    embedding: Option<EmbeddingFigure>,
    results: Vec<StoreFigure>,
}

#[derive(Serialize)]
struct EmbeddingFigure {
    sentences: usize,
    batch: usize,
    /// Sentences per second, each round (alternating: candle, tch, Python).
    rounds: Vec<Round>,
    candle_sentences_per_sec: f64,
    tch_sentences_per_sec: Option<f64>,
    python_sentences_per_sec: Option<f64>,
    /// Medians of each round's ratio to Python.
    candle_vs_python: Option<f64>,
    tch_vs_python: Option<f64>,
    /// Why tch was not measured, when it was not.
    tch_note: Option<String>,
}

#[derive(Serialize)]
struct Round {
    candle: f64,
    tch: Option<f64>,
    python: Option<f64>,
}

#[derive(Serialize)]
struct StoreFigure {
    backend: &'static str,
    /// nDCG@10 on the labelled set.
    ndcg_at_10: Quality,
    memories: usize,
    ingest_memories_per_sec: f64,
    /// From the end of the ingest until every memory is in the approximate index (PostgreSQL's
    /// HNSW, built behind the ingest; meanwhile fresh memories are searched exactly).
    settled_in_seconds: f64,
    /// Hybrid search, the query embedded by the model in each call.
    hybrid_search: Latency,
    /// The same searches with the queries' vectors given: what the index takes.
    hybrid_search_index_only: Latency,
    /// The vector search alone, and the text mode alone (any of the query's words: not hybrid
    /// search's full-text side, which keeps rows holding 75% of them).
    dense_search_index_only: Latency,
    text_search_index_only: Latency,
    /// Recall@10 of the vector search against exact search.
    recall_at_10: Recall,
}

#[derive(Serialize)]
struct Quality {
    dense: f64,
    text: f64,
    hybrid: f64,
}

#[derive(Serialize)]
struct Recall {
    unfiltered: f64,
    filter_1_percent: f64,
    filter_10_percent: f64,
}

#[derive(Deserialize)]
struct QaSet {
    passages: Vec<Passage>,
    queries: Vec<Query>,
}

#[derive(Deserialize)]
struct Passage {
    id: String,
    text: String,
}

#[derive(Deserialize)]
struct Query {
    text: String,
    relevant: std::collections::BTreeMap<String, u32>,
}

pub async fn run(args: MemoryArgs) -> anyhow::Result<Report> {
    let qa: QaSet = serde_json::from_str(QA).context("bench/data/retrieval-qa.json")?;
    let spec = args.model.embedding_model.clone();
    let model = crate::memory::model(spec.as_deref())?;
    let embedding = match &args.python {
        Some(python) => Some(embedding(&args, &qa, &model, python).await?),
        None => None,
    };
    let mut results = Vec::new();
    if let Some(url) = &args.targets.database_url {
        let scratch = Scratch::postgres(url).await?;
        let figure = measure(&scratch, "postgres", &args, &qa, &model).await;
        scratch.remove().await;
        results.push(figure?);
    }
    if !args.targets.no_sqlite {
        let scratch = Scratch::sqlite(args.targets.scratch_dir.as_ref())?;
        let figure = measure(&scratch, "sqlite", &args, &qa, &model).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "memory",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        model: model.name().to_owned(),
        embedding,
        results,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Sentences per second of `model` over `sentences`, `passes` times after a warm-up pass.
async fn throughput(
    model: &Arc<dyn EmbeddingModel>,
    sentences: &[String],
    passes: usize,
) -> anyhow::Result<f64> {
    model.embed(sentences).await?;
    let started = Instant::now();
    for _ in 0..passes {
        model.embed(sentences).await?;
    }
    Ok((sentences.len() * passes) as f64 / started.elapsed().as_secs_f64())
}

/// Python sentence-transformers over the same sentences (`scripts/embed-bench.py`).
async fn python_throughput(
    python: &PathBuf,
    file: &std::path::Path,
    folder: &str,
    passes: usize,
) -> anyhow::Result<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/embed-bench.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(file)
        .arg(folder)
        .arg(passes.to_string())
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the Python comparison failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    line["sentences_per_sec"]
        .as_f64()
        .context("the Python comparison printed no rate")
}

async fn embedding(
    args: &MemoryArgs,
    qa: &QaSet,
    model: &Arc<dyn EmbeddingModel>,
    python: &PathBuf,
) -> anyhow::Result<EmbeddingFigure> {
    let folder = args
        .model
        .embedding_model
        .as_deref()
        .map(|spec| spec.trim_start_matches("candle:").to_owned())
        .context("the comparison needs a local model folder")?;
    let sentences: Vec<String> = qa
        .passages
        .iter()
        .take(256)
        .map(|p| p.text.clone())
        .collect();
    let file = std::env::temp_dir().join(format!("stele-bench-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_vec(&sentences)?)?;
    let (tch, tch_note) = match load_embedding_model(&format!("tch:{folder}")) {
        Ok(model) => (Some(model), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let candle = throughput(model, &sentences, args.passes).await?;
        let tch = match &tch {
            Some(tch) => Some(throughput(tch, &sentences, args.passes).await?),
            None => None,
        };
        let python = python_throughput(python, &file, &folder, args.passes).await;
        let python = match python {
            Ok(rate) => Some(rate),
            Err(e) => {
                let _ = std::fs::remove_file(&file);
                return Err(e);
            }
        };
        rounds.push(Round {
            candle,
            tch,
            python,
        });
    }
    let _ = std::fs::remove_file(&file);
    let ratio = |pick: &dyn Fn(&Round) -> Option<f64>| {
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(pick(r)? / r.python?))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    };
    let all = |pick: &dyn Fn(&Round) -> Option<f64>| {
        let values: Vec<f64> = rounds.iter().filter_map(pick).collect();
        (!values.is_empty()).then(|| median(values))
    };
    Ok(EmbeddingFigure {
        sentences: sentences.len(),
        batch: stele_models::embed::BATCH_SIZE,
        candle_sentences_per_sec: median(rounds.iter().map(|r| r.candle).collect()),
        tch_sentences_per_sec: all(&|r| r.tch),
        python_sentences_per_sec: all(&|r| r.python),
        candle_vs_python: ratio(&|r| Some(r.candle)),
        tch_vs_python: ratio(&|r| r.tch),
        tch_note,
        rounds,
    })
}

/// nDCG@10 of one ranked list of passage ids.
fn ndcg_at_10(ranked: &[String], relevant: &std::collections::BTreeMap<String, u32>) -> f64 {
    let gain = |rel: u32| f64::from((1u32 << rel) - 1);
    let dcg: f64 = ranked
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, id)| gain(*relevant.get(id).unwrap_or(&0)) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<u32> = relevant.values().copied().collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, rel)| gain(*rel) / ((i + 2) as f64).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

fn meta() -> CommandMeta {
    CommandMeta::new("user:bench", "bench")
}

/// Mean nDCG@10 of each mode on the labelled set, in a store of its own.
async fn quality(
    scratch_location: stele_engine::store::StoreLocation,
    qa: &QaSet,
    model: &Arc<dyn EmbeddingModel>,
) -> anyhow::Result<Quality> {
    let store = Store::open(scratch_location, Migrate::Apply).await?;
    let memories = memories(&store, model).await?;
    for passage in &qa.passages {
        memories
            .store(
                NewMemory {
                    content: passage.text.clone(),
                    importance: 0.5,
                    key: Some(passage.id.clone()),
                    ..NewMemory::default()
                },
                meta(),
            )
            .await?;
    }
    let runner = ProjectionRunner::new(&store, vec![memories.projection()]);
    runner.setup().await?;
    while runner.step(MEMORY).await?.read > 0 {}
    let mut scores = [Vec::new(), Vec::new(), Vec::new()];
    for query in &qa.queries {
        for (i, mode) in [Mode::Dense, Mode::Text, Mode::Hybrid]
            .into_iter()
            .enumerate()
        {
            let hits = memories
                .search(&Search {
                    query: query.text.clone(),
                    filter: Filter::default(),
                    limit: 10,
                    mode,
                })
                .await?;
            let ranked: Vec<String> = hits.into_iter().filter_map(|h| h.key).collect();
            scores[i].push(ndcg_at_10(&ranked, &query.relevant));
        }
    }
    runner.release_all().await?;
    store.close().await;
    let mean = |s: &Vec<f64>| (s.iter().sum::<f64>() / s.len().max(1) as f64 * 1e4).round() / 1e4;
    Ok(Quality {
        dense: mean(&scores[0]),
        text: mean(&scores[1]),
        hybrid: mean(&scores[2]),
    })
}

/// The memory of `store`, sealing as a node's does.
async fn memories(store: &Store, model: &Arc<dyn EmbeddingModel>) -> anyhow::Result<Memories> {
    let private = stele_privacy::private_store(
        store,
        &stele_privacy::Kek::generate(),
        stele_privacy::Policy::default(),
    )
    .await?;
    Ok(Memories::new(
        &private.store,
        model.clone(),
        private.subjects.sealer().clone(),
    ))
}

/// A standard normal sample (Box–Muller: two uniforms, one normal).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn normalized(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}

/// `base` moved by noise of σ = 0.02 a component, renormalised.
fn near(base: &[f32], rng: &mut impl Rng) -> Vec<f32> {
    normalized(base.iter().map(|x| x + 0.02 * gaussian(rng)).collect())
}

/// Puts `vectors` of `texts` in the embedding cache (as the projection would have).
async fn cache(store: &Store, model: &str, entries: &[(String, Vec<f32>)]) -> anyhow::Result<()> {
    let mut db = Db::from(&store.pool);
    for chunk in entries.chunks(2_000) {
        let hashes: Vec<String> = chunk
            .iter()
            .map(|(text, _)| hex::encode(Sha256::digest(text.as_bytes())))
            .collect();
        let vectors: Vec<String> = chunk.iter().map(|(_, v)| index::vector_text(v)).collect();
        match db.dialect() {
            Dialect::Postgres => {
                db.execute(
                    "INSERT INTO embedding_cache (model, text_sha256, vector) \
                     SELECT $1, h, v FROM unnest($2::text[], $3::text[]) AS t(h, v) \
                     ON CONFLICT DO NOTHING",
                    &[model.into(), Value::Texts(&hashes), Value::Texts(&vectors)],
                )
                .await?;
            }
            Dialect::Sqlite => {
                // One array of [hash, vector] pairs: json_each reads it once.
                let pairs =
                    serde_json::to_string(&hashes.iter().zip(&vectors).collect::<Vec<_>>())?;
                db.execute(
                    "INSERT INTO embedding_cache (model, text_sha256, vector) \
                     SELECT $1, value ->> 0, value ->> 1 FROM json_each($2) WHERE true \
                     ON CONFLICT DO NOTHING",
                    &[model.into(), (&pairs).into()],
                )
                .await?;
            }
        }
    }
    Ok(())
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    args: &MemoryArgs,
    qa: &QaSet,
    model: &Arc<dyn EmbeddingModel>,
) -> anyhow::Result<StoreFigure> {
    // Quality, on the labelled set alone (a store of its own beside the scratch one).
    let quality_scratch = match backend {
        "postgres" => {
            Scratch::postgres(args.targets.database_url.as_deref().expect("postgres")).await?
        }
        _ => Scratch::sqlite(args.targets.scratch_dir.as_ref())?,
    };
    let ndcg = quality(quality_scratch.location.clone(), qa, model).await;
    quality_scratch.remove().await;
    let ndcg_at_10 = ndcg?;
    if args.no_scale {
        return Ok(StoreFigure {
            backend,
            ndcg_at_10,
            memories: 0,
            ingest_memories_per_sec: 0.0,
            settled_in_seconds: 0.0,
            hybrid_search: Latency::default(),
            hybrid_search_index_only: Latency::default(),
            dense_search_index_only: Latency::default(),
            text_search_index_only: Latency::default(),
            recall_at_10: Recall {
                unfiltered: 0.0,
                filter_1_percent: 0.0,
                filter_10_percent: 0.0,
            },
        });
    }

    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let memories = Arc::new(memories(&store, model).await?);
    let texts: Vec<String> = qa.passages.iter().map(|p| p.text.clone()).collect();
    let bases = model.embed(&texts).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261130);
    let total = args.memories;
    let scope = |i: usize| MemoryScope {
        tenant: Some(format!("t{}", i % 100)),
        workflow: Some(format!("w{}", i % 10)),
        ..MemoryScope::default()
    };
    let text = |i: usize| format!("{} [{i}]", texts[i % texts.len()]);
    let entries: Vec<(String, Vec<f32>)> = (0..total)
        .map(|i| (text(i), near(&bases[i % bases.len()], &mut rng)))
        .collect();
    cache(&store, model.name(), &entries).await?;
    drop(entries);
    // The events, by 64 writers at a time.
    let stored = futures::stream::iter(0..total)
        .map(|i| {
            let memories = memories.clone();
            async move {
                memories
                    .store(
                        NewMemory {
                            content: text(i),
                            importance: (i % 10) as f32 / 10.0,
                            scope: scope(i),
                            ..NewMemory::default()
                        },
                        meta(),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    for result in stored {
        result?;
    }
    let runner = ProjectionRunner::new(&store, vec![memories.projection()]).with_batch_size(1_000);
    runner.setup().await?;
    let started = Instant::now();
    while runner.step(MEMORY).await?.read > 0 {}
    let ingest = total as f64 / started.elapsed().as_secs_f64();
    runner.release_all().await?;
    let started = Instant::now();
    while memories.settle().await? > 0 {}
    let settled_in = started.elapsed().as_secs_f64();
    if let stele_engine::store::StorePool::Postgres(pool) = &store.pool {
        // As autovacuum would after a bulk load: the planner's row estimate.
        sqlx::query("ANALYZE memories").execute(pool).await?;
    }

    // Searches: the labelled queries, round and round.
    let queries: Vec<String> = qa.queries.iter().map(|q| q.text.clone()).collect();
    let vectors = model.embed(&queries).await?;
    let search = |i: usize| Search {
        query: queries[i % queries.len()].clone(),
        filter: Filter::default(),
        limit: 10,
        mode: Mode::Hybrid,
    };
    for i in 0..queries.len().min(20) {
        memories.search(&search(i)).await?; // warm-up
    }
    let (mut full, mut index_only) = (Vec::new(), Vec::new());
    let (mut dense, mut text) = (Vec::new(), Vec::new());
    for i in 0..args.searches {
        let begun = Instant::now();
        memories.search(&search(i)).await?;
        full.push(begun.elapsed());
        let vector = Some(vectors[i % vectors.len()].as_slice());
        for (mode, times) in [
            (Mode::Hybrid, &mut index_only),
            (Mode::Dense, &mut dense),
            (Mode::Text, &mut text),
        ] {
            let begun = Instant::now();
            memories
                .search_embedded(&Search { mode, ..search(i) }, vector)
                .await?;
            times.push(begun.elapsed());
        }
    }

    // Recall@10 of the vector search against exact search, for held-out vectors near the
    // passages and for the labelled queries.
    let adapter = index::for_pool(&store.pool);
    let mut probes: Vec<Vec<f32>> = vectors.clone();
    probes.extend((0..100).map(|i| near(&bases[(i * 7) % bases.len()], &mut rng)));
    let mut recall = Vec::new();
    for filter in [
        Filter::default(),
        Filter {
            scope: MemoryScope {
                tenant: Some("t7".into()),
                ..MemoryScope::default()
            },
            ..Filter::default()
        },
        Filter {
            scope: MemoryScope {
                workflow: Some("w3".into()),
                ..MemoryScope::default()
            },
            ..Filter::default()
        },
    ] {
        let (mut found, mut wanted) = (0usize, 0usize);
        for probe in &probes {
            let approximate = adapter
                .vector_search(&store.pool, probe, &filter, 10, false)
                .await?;
            let exact = adapter
                .vector_search(&store.pool, probe, &filter, 10, true)
                .await?;
            wanted += exact.len();
            found += exact.iter().filter(|id| approximate.contains(id)).count();
        }
        recall.push((found as f64 / wanted.max(1) as f64 * 1e4).round() / 1e4);
    }
    store.close().await;
    Ok(StoreFigure {
        backend,
        ndcg_at_10,
        memories: total,
        ingest_memories_per_sec: ingest.round(),
        settled_in_seconds: (settled_in * 10.0).round() / 10.0,
        hybrid_search: Latency::of(full),
        hybrid_search_index_only: Latency::of(index_only),
        dense_search_index_only: Latency::of(dense),
        text_search_index_only: Latency::of(text),
        recall_at_10: Recall {
            unfiltered: recall[0],
            filter_1_percent: recall[1],
            filter_10_percent: recall[2],
        },
    })
}
