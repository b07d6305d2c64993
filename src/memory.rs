//! `stele memory …`: remember a fact, search the memory, rebuild it, count it.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use stele_aggregates::memory::MemoryScope;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::Migrate;
use stele_engine::CommandMeta;
use stele_memory::{Filter, Memories, Mode, NewMemory, Search, MEMORY};
use stele_models::embed::EmbeddingModel;

use crate::privacy::{catch_up, open};
use crate::StoreArgs;

/// The embedding model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// The embedding model: a folder holding a sentence-transformers model (e.g.
    /// all-MiniLM-L6-v2), `openai:<base url>#<model>`, or `hf:<repo id>`.
    #[arg(long, env = "STELE_EMBEDDING_MODEL", value_name = "SPEC")]
    pub embedding_model: Option<String>,
}

/// Loads the embedding model `spec` names, or says how to name one.
pub fn model(spec: Option<&str>) -> anyhow::Result<Arc<dyn EmbeddingModel>> {
    let spec = spec.ok_or_else(|| {
        anyhow::anyhow!(
            "no embedding model: set --embedding-model or STELE_EMBEDDING_MODEL (a model folder, openai:<url>#<model> or hf:<repo>)"
        )
    })?;
    Ok(stele_models::embed::load_embedding_model(spec)?)
}

/// Where a memory belongs (each optional).
#[derive(Args, Clone, Debug, Default)]
pub struct ScopeArgs {
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    conversation: Option<String>,
    /// A subject id: the memory is theirs (sealed with their key, erased with them).
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    workflow: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
}

impl From<ScopeArgs> for MemoryScope {
    fn from(scope: ScopeArgs) -> Self {
        MemoryScope {
            agent: scope.agent,
            conversation: scope.conversation,
            subject: scope.subject,
            workflow: scope.workflow,
            tenant: scope.tenant,
        }
    }
}

#[derive(Subcommand)]
pub enum MemoryCommand {
    /// Remember a fact.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        model: ModelArgs,
        text: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// 0 (trivia) to 1 (never forget).
        #[arg(long, default_value_t = 0.5)]
        importance: f32,
        /// A later fact with the same key in the same scope supersedes this one.
        #[arg(long)]
        key: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Search the memory (vectors and full text, fused).
    Search {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        model: ModelArgs,
        query: String,
        #[command(flatten)]
        scope: ScopeArgs,
        /// hybrid, dense or text.
        #[arg(long, default_value = "hybrid")]
        mode: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// What was remembered at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the memory from the log (vectors come from the cache where they can).
    Rebuild {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Count the memories and cached vectors.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
}

impl MemoryCommand {
    fn args(&self) -> (&StoreArgs, &ModelArgs) {
        match self {
            MemoryCommand::Add { store, model, .. }
            | MemoryCommand::Search { store, model, .. }
            | MemoryCommand::Rebuild { store, model }
            | MemoryCommand::Stats { store, model, .. } => (store, model),
        }
    }
}

fn meta() -> CommandMeta {
    CommandMeta::new(
        format!(
            "user:{}",
            std::env::var("USER").unwrap_or_else(|_| "operator".into())
        ),
        "cli",
    )
}

pub async fn run(command: MemoryCommand) -> anyhow::Result<()> {
    let (store_args, model_args) = command.args();
    let embedder = model(model_args.embedding_model.as_deref())?;
    let private = open(store_args, Migrate::Require).await?;
    let memories = Memories::new(&private.store, embedder, private.subjects.sealer().clone());
    let runner = ProjectionRunner::new(&private.store, vec![memories.projection()]);
    let result = async {
        runner.setup().await?;
        run_on(&memories, &runner, &private.store, command).await
    }
    .await;
    runner.release_all().await?;
    private.store.close().await;
    result
}

async fn run_on(
    memories: &Memories,
    runner: &ProjectionRunner,
    store: &stele_engine::Store,
    command: MemoryCommand,
) -> anyhow::Result<()> {
    match command {
        MemoryCommand::Add {
            text,
            scope,
            importance,
            key,
            tags,
            ..
        } => {
            let id = memories
                .store(
                    NewMemory {
                        content: text,
                        importance,
                        tags,
                        scope: scope.into(),
                        key,
                        sources: Vec::new(),
                    },
                    meta(),
                )
                .await?;
            println!("{id}");
            Ok(())
        }
        MemoryCommand::Search {
            query,
            scope,
            mode,
            limit,
            at,
            json,
            ..
        } => {
            let mode: Mode = serde_json::from_value(serde_json::Value::String(mode.clone()))
                .map_err(|_| anyhow::anyhow!("--mode {mode:?}: hybrid, dense or text"))?;
            catch_up(
                runner,
                store.stored.as_ref(),
                MEMORY,
                Duration::from_secs(120),
            )
            .await?;
            let hits = memories
                .search(&Search {
                    query,
                    filter: Filter {
                        scope: scope.into(),
                        at,
                        no_subject: false,
                    },
                    limit,
                    mode,
                })
                .await?;
            for hit in hits {
                if json {
                    println!("{}", serde_json::to_string(&hit)?);
                } else {
                    println!("{:.4}  {}  {}", hit.score, hit.memory_id, hit.content);
                }
            }
            Ok(())
        }
        MemoryCommand::Rebuild { .. } => {
            let checkpoint = runner.rebuild(MEMORY, |_| {}).await?;
            eprintln!("memory rebuilt up to position {}", checkpoint.position);
            Ok(())
        }
        MemoryCommand::Stats { json, .. } => {
            catch_up(
                runner,
                store.stored.as_ref(),
                MEMORY,
                Duration::from_secs(120),
            )
            .await?;
            let stats = memories.stats().await?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "{} memories ({} valid now), {} cached vectors of {} ({} dimensions)",
                    stats.memories,
                    stats.valid,
                    stats.cached_vectors,
                    stats.model,
                    stats.dimensions
                );
            }
            Ok(())
        }
    }
}
