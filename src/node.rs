//! Assembling a node's workflow runtime from its settings: the definitions (shipped and from a
//! folder), the agent roles and their models, the tools. `up`, `serve`, `worker`, the `tasks`
//! commands and the benchmarks all build their runtime here.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use stele_engine::store::Store;
use stele_memory::Memories;
use stele_models::{ModelRouter, ModelsConfig};
use stele_tools::{Sandbox, SandboxLimits, SandboxMode, ToolHost, Web, WebSettings, Workspaces};
use stele_workflows::agents::ModelAgents;
use stele_workflows::catalog;
use stele_workflows::decide::Catalog;
use stele_workflows::runtime::Runtime;
use stele_workflows::sanitize::{Sanitizer, SanitizerPolicy};
use stele_workflows::tools::Tools;

/// The workflow a task runs when it names none.
pub const DEFAULT_WORKFLOW: &str = "assistant";

/// Where definitions and agent roles come from.
#[derive(Args, Clone, Debug, Default)]
pub struct WorkflowArgs {
    /// A folder of workflow definitions (YAML) to load besides the shipped ones.
    #[arg(long, env = "STELE_WORKFLOWS", value_name = "DIR")]
    pub workflows: Option<PathBuf>,
    /// Providers and agent roles (TOML); the shipped roles on the scripted model otherwise.
    /// STELE_MODEL_* variables route roles to an OpenAI-compatible server.
    #[arg(long, env = "STELE_MODELS", value_name = "FILE")]
    pub models: Option<PathBuf>,
    /// How `shell.run` isolates commands: auto (bubblewrap when it works here, else a limited
    /// process), bubblewrap (required) or process.
    #[arg(long, env = "STELE_SANDBOX", value_name = "MODE")]
    pub sandbox: Option<SandboxMode>,
    /// Hosts `web.fetch` may fetch from, comma-separated (`example.org`, `host:port`,
    /// `*.example.org`); none by default.
    #[arg(
        long,
        env = "STELE_WEB_ALLOW",
        value_name = "HOSTS",
        value_delimiter = ','
    )]
    pub web_allow: Vec<String>,
    /// The input sanitiser's policy (`[sanitizer]` in the configuration file; the default
    /// policy otherwise).
    #[arg(skip)]
    pub sanitizer: Option<SanitizerPolicy>,
}

impl WorkflowArgs {
    /// The model router and the validated catalog (shipped definitions plus the folder's).
    pub fn load(&self) -> anyhow::Result<(ModelRouter, Tools, Catalog)> {
        self.load_with(None, None, RuntimeCell::default())
    }

    /// [`Self::load`], with the memory's tools when there is a memory, and the workspace, shell
    /// and web tools working on `host` (described only without one).
    fn load_with(
        &self,
        memory: Option<Arc<Memories>>,
        host: Option<Arc<ToolHost>>,
        runtime: RuntimeCell,
    ) -> anyhow::Result<(ModelRouter, Tools, Catalog)> {
        let config = match &self.models {
            Some(path) => ModelsConfig::load(path)?,
            None => ModelsConfig::default(),
        }
        .with_process_env()?;
        let router = ModelRouter::new(config)?;
        let mut tools = room_tool(stele_tools::register(Tools::builtin(), host), runtime);
        if let Some(memory) = memory {
            tools = stele_memory::agents::register(tools, memory);
        }
        let mut sources = catalog::builtin();
        sources.extend(catalog::shipped(&[catalog::ROOM_TURN]));
        if let Some(dir) = &self.workflows {
            sources.extend(catalog::read(dir)?);
        }
        let catalog = catalog::build(&sources, &|a| router.agent(a).is_some(), &|t| {
            tools.contains(t)
        })?;
        Ok((router, tools, catalog))
    }

    /// A runtime on `store`, its definitions recorded in (and completed from) the log, keeping
    /// tasks as their requesters' personal data with `subjects` (see [`Runtime::with_subjects`]).
    pub async fn runtime_with(
        &self,
        store: &Store,
        subjects: Option<Arc<stele_privacy::Subjects>>,
    ) -> anyhow::Result<Arc<Runtime>> {
        self.runtime_of(store, subjects, None, false).await
    }

    /// [`Self::runtime_with`], with a memory: agents get the `memory.*` tools their roles list,
    /// and steps the context they ask for.
    pub async fn runtime_with_memory(
        &self,
        store: &Store,
        subjects: Option<Arc<stele_privacy::Subjects>>,
        memory: Option<Arc<Memories>>,
    ) -> anyhow::Result<Arc<Runtime>> {
        self.runtime_of(store, subjects, memory, true).await
    }

    /// The runtime; `node`: for a node that runs steps, which says which sandbox is active.
    async fn runtime_of(
        &self,
        store: &Store,
        subjects: Option<Arc<stele_privacy::Subjects>>,
        memory: Option<Arc<Memories>>,
        node: bool,
    ) -> anyhow::Result<Arc<Runtime>> {
        let host = self.tool_host(store, subjects.as_deref()).await?;
        if node && host.sandbox.kind() == "bubblewrap" {
            tracing::info!(sandbox = %host.sandbox.describe(), "commands of agents run sandboxed");
        } else if node {
            tracing::warn!(
                sandbox = %host.sandbox.describe(),
                "bubblewrap is not installed or not allowed here: commands of agents run in the weaker process sandbox"
            );
        }
        let cell = RuntimeCell::default();
        let (router, tools, mut catalog) =
            self.load_with(memory.clone(), Some(host), cell.clone())?;
        stele_workflows::catalog::publish(store.log.as_ref(), &mut catalog).await?;
        let agents = Arc::new(ModelAgents::new(router, tools.clone()));
        let mut runtime =
            Runtime::new(store, catalog, agents, tools).with_default_workflow(DEFAULT_WORKFLOW);
        if let Some(subjects) = subjects {
            runtime = runtime.with_subjects(subjects);
        }
        if let Some(memory) = memory {
            runtime = runtime.with_recall(memory);
        }
        if let Some(policy) = &self.sanitizer {
            runtime = runtime.with_sanitizer(Sanitizer::new(policy.clone()));
        }
        let runtime = Arc::new(runtime);
        let _ = cell.set(Arc::downgrade(&runtime));
        Ok(runtime)
    }

    /// What the workspace, shell and web tools work on, on `store`: its workspaces (sealed with
    /// people's keys when there are `subjects`), the sandbox this machine allows, the web hosts.
    pub async fn tool_host(
        &self,
        store: &Store,
        subjects: Option<&stele_privacy::Subjects>,
    ) -> anyhow::Result<Arc<ToolHost>> {
        let workspaces = Workspaces::new(store.pool.clone(), subjects.map(|s| s.sealer().clone()));
        let sandbox = Sandbox::detect(
            self.sandbox.unwrap_or_default(),
            SandboxLimits::default(),
            workspaces.limits().clone(),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let web = Web::new(WebSettings {
            allow: self.web_allow.clone(),
            ..WebSettings::default()
        });
        Ok(Arc::new(ToolHost {
            workspaces: Arc::new(workspaces),
            sandbox,
            web,
        }))
    }
}

/// The runtime, for tools that act on it (`room.turn`), set once it is made (the tools are
/// registered before it).
type RuntimeCell = Arc<std::sync::OnceLock<std::sync::Weak<Runtime>>>;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomTurnInput {
    room: String,
}

/// `tools` with `room.turn`: one agent's turn in a room (the shipped `room_turn` workflow's
/// step). Its command id is derived from the step's run, so a retried step takes no second turn.
fn room_tool(tools: Tools, runtime: RuntimeCell) -> Tools {
    tools
        .register_for_caller(
            "room.turn",
            move |input: RoomTurnInput, caller: stele_workflows::tools::Caller| {
                let runtime = runtime.get().and_then(std::sync::Weak::upgrade);
                async move {
                    let runtime = runtime.ok_or("this process runs no rooms")?;
                    let id = uuid::Uuid::new_v5(
                        &uuid::Uuid::NAMESPACE_OID,
                        format!("room.turn:{}:{}", caller.run_id.as_str(), caller.step.as_str())
                            .as_bytes(),
                    );
                    let meta = stele_engine::CommandMeta::new("room", "system").with_command_id(id);
                    runtime
                        .room_turn(&input.room, meta)
                        .await
                        .map_err(|e| e.to_string())
                }
            },
        )
        .describe(
            "room.turn",
            "Takes one agent's turn in a room: who speaks follows the room's policy.",
            serde_json::json!({ "type": "object", "required": ["room"], "properties": { "room": { "type": "string" } } }),
        )
}
