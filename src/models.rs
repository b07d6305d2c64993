//! `stele models …`: the providers and agent roles of the models configuration, and a test call
//! through the same router the workers use (fallbacks, retries, breakers).

use std::time::Instant;

use clap::Subcommand;
use serde_json::json;
use stele_models::{CallOverrides, ChatMessage, ModelRoute};

use stele_engine::store::Migrate;
use stele_engine::CommandMeta;

use crate::node::WorkflowArgs;
use crate::StoreArgs;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Choose the model an agent role tries first in every task from now on (one of its
    /// route; the rest stays its fallbacks), or `default` for its own route again. Recorded as
    /// an event; a chat's own choice (`/models`) goes over it.
    Use {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        workflows: WorkflowArgs,
        /// The agent role.
        role: String,
        /// `provider/model`, or `default`.
        model: String,
    },
    /// List the providers (kind, address, the models routes name there) and the agent roles
    /// with their routes (primary first, then fallbacks). A running server's circuits are in
    /// `GET /v1/models`.
    List {
        #[command(flatten)]
        workflows: WorkflowArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a role (or one model, `--model provider/model`) a short question: which model
    /// answered, how long it took, the tokens, and the start of the answer; exits 1 when no
    /// model answers.
    Test {
        #[command(flatten)]
        workflows: WorkflowArgs,
        /// The agent role.
        role: String,
        /// One model to try instead of the role's route.
        #[arg(long)]
        model: Option<String>,
        /// What to ask.
        #[arg(long, default_value = "Say hello in five words.")]
        prompt: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Use {
            store,
            workflows,
            role,
            model,
        } => {
            let private = crate::privacy::open(&store, Migrate::Require).await?;
            let result = async {
                let runtime = workflows
                    .runtime_with(&private.store, Some(private.subjects.clone()))
                    .await?;
                let model = (model != "default").then_some(model);
                let meta = CommandMeta::new(format!("user:{}", crate::tasks::whoami()), "cli");
                runtime
                    .choose_role_model(&role, model.clone(), meta)
                    .await?;
                match model {
                    Some(model) => println!("{role} now tries {model} first in every task"),
                    None => println!("{role} is back to its own models"),
                }
                anyhow::Ok(())
            }
            .await;
            private.store.close().await;
            result
        }
        ModelsCommand::List { workflows, json } => {
            let (router, _, _) = workflows.load()?;
            let overview = router.overview();
            if json {
                println!("{}", serde_json::to_string(&overview)?);
                return Ok(());
            }
            println!("providers:");
            for p in &overview.providers {
                let at = p.base_url.as_deref().unwrap_or("");
                println!(
                    "  {:<16} {:<10} {at}  models: {}",
                    p.name,
                    p.kind,
                    p.models.join(", ")
                );
            }
            println!("roles:");
            for r in &overview.roles {
                println!("  {:<16} {}", r.name, r.route.join(" → "));
            }
            Ok(())
        }
        ModelsCommand::Test {
            workflows,
            role,
            model,
            prompt,
            json,
        } => {
            let (router, _, _) = workflows.load()?;
            if router.agent(&role).is_none() {
                let mut known: Vec<String> = router.agents().map(|r| r.name.clone()).collect();
                known.sort();
                anyhow::bail!(
                    "there is no agent role {role:?} (there are: {})",
                    known.join(", ")
                );
            }
            let mut overrides = CallOverrides::default();
            if let Some(model) = &model {
                let route: ModelRoute = model
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--model {model:?}: {e}"))?;
                overrides.route = Some(vec![route]);
            }
            let started = Instant::now();
            let reply = router
                .call(&role, vec![ChatMessage::user(prompt)], &overrides)
                .await;
            let elapsed = started.elapsed().as_millis() as u64;
            let answered = reply.calls.iter().rev().find(|c| c.error.is_none());
            match (&reply.result, answered) {
                (Ok(response), Some(call)) => {
                    if json {
                        println!(
                            "{}",
                            json!({
                                "role": role,
                                "model": format!("{}/{}", call.provider, call.model),
                                "fallback_index": call.fallback_index,
                                "attempts": reply.calls.len(),
                                "latency_ms": elapsed,
                                "input_tokens": response.usage.input_tokens,
                                "output_tokens": response.usage.output_tokens,
                                "answer": response.content,
                            })
                        );
                    } else {
                        let start: String = response.content.chars().take(200).collect();
                        println!(
                            "{role}: {}/{} answered in {elapsed} ms ({} attempt(s), fallback {}; {} tokens in, {} out): {}",
                            call.provider,
                            call.model,
                            reply.calls.len(),
                            call.fallback_index,
                            response.usage.input_tokens,
                            response.usage.output_tokens,
                            start.replace('\n', " ")
                        );
                    }
                    Ok(())
                }
                (Err(e), _) => anyhow::bail!("{role}: no model answered: {e}"),
                (Ok(_), None) => anyhow::bail!("{role}: the answer names no model"),
            }
        }
    }
}
