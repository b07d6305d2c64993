//! `stele workflows …` and `stele tasks …`: definitions, and tasks with their workflow runs.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use stele_aggregates::channel::Channel;
use stele_aggregates::task::{Requester, TaskInput};
use stele_engine::store::Migrate;
use stele_engine::CommandMeta;
use stele_workflows::catalog;
use stele_workflows::runtime::{Runtime, TaskView};

use crate::node::WorkflowArgs;
use crate::StoreArgs;

#[derive(Subcommand)]
pub enum WorkflowsCommand {
    /// List the workflow definitions (newest version of each).
    List {
        #[command(flatten)]
        args: WorkflowArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate definitions: a YAML file or a folder of them.
    Validate {
        path: PathBuf,
        #[command(flatten)]
        args: WorkflowArgs,
    },
}

#[derive(Subcommand)]
pub enum TasksCommand {
    /// Create a task; prints its id. `stele up` (or a worker) runs it.
    Create(CreateArgs),
    /// Show a task, its run and its steps.
    Show(TaskArgs),
    /// Print a task's events, its run's and its child runs', as NDJSON.
    History(TaskArgs),
    /// Cancel a task, its run, its child runs and its queued steps.
    Cancel {
        #[command(flatten)]
        task: TaskArgs,
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
    },
    /// Send a signal (an approval, a reply) to a task's run.
    Signal {
        #[command(flatten)]
        task: TaskArgs,
        /// The signal's name, as a `wait` step names it.
        name: String,
        /// The signal's payload (JSON; plain text is taken as a string).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Follow a task's progress live until it finishes.
    Watch(TaskArgs),
    /// List the files of a task's workspaces (what its agents wrote and its commands left), or
    /// print one of them.
    Workspace {
        #[command(flatten)]
        task: TaskArgs,
        /// A file to print (its bytes, as they are).
        path: Option<String>,
        /// The run whose workspace holds it (the first run holding the path otherwise).
        #[arg(long)]
        run: Option<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    workflow_args: WorkflowArgs,
    /// The workflow to run (the default workflow, `assistant`, otherwise).
    #[arg(long)]
    workflow: Option<String>,
    /// The task's input.
    #[arg(long)]
    input: String,
    /// Who asks.
    #[arg(long, default_value = "cli")]
    user: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TaskArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    workflow_args: WorkflowArgs,
    /// The task's id.
    #[arg(value_parser = task_id)]
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn workflows(command: WorkflowsCommand) -> anyhow::Result<()> {
    match command {
        WorkflowsCommand::List { args, json } => {
            let (_, _, catalog) = args.load()?;
            let mut out = io::stdout().lock();
            for definition in catalog.latest_all() {
                if json {
                    let line = json!({
                        "name": definition.name,
                        "version": definition.version,
                        "description": definition.description,
                        "steps": definition.steps.iter().map(|s| json!({ "id": s.id, "kind": s.kind.name() })).collect::<Vec<_>>(),
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{:<16} v{:<3} {:>2} {:<6} {}",
                        definition.name,
                        definition.version,
                        definition.steps.len(),
                        if definition.steps.len() == 1 {
                            "step"
                        } else {
                            "steps"
                        },
                        definition.description
                    )?;
                }
            }
            Ok(())
        }
        WorkflowsCommand::Validate { path, args } => {
            let sources = catalog::read(&path)?;
            let count = sources.len();
            if count == 0 {
                anyhow::bail!("{}: no .yaml or .yml files", path.display());
            }
            let (router, tools, _) = args.load()?;
            let mut all = catalog::builtin();
            all.extend(catalog::shipped(&[catalog::ROOM_TURN]));
            // Files given here replace shipped ones of the same file name.
            all.retain(|b| !sources.iter().any(|s| same_name(&s.file, &b.file)));
            all.extend(sources);
            catalog::build(&all, &|a| router.agent(a).is_some(), &|t| tools.contains(t))?;
            println!("ok: {count} definition(s) valid");
            Ok(())
        }
    }
}

fn same_name(a: &Path, b: &Path) -> bool {
    a.file_name() == b.file_name()
}

pub async fn tasks(command: TasksCommand) -> anyhow::Result<()> {
    let (store_args, workflow_args) = match &command {
        TasksCommand::Create(a) => (&a.store, &a.workflow_args),
        TasksCommand::Show(a) | TasksCommand::History(a) | TasksCommand::Watch(a) => {
            (&a.store, &a.workflow_args)
        }
        TasksCommand::Cancel { task, .. }
        | TasksCommand::Signal { task, .. }
        | TasksCommand::Workspace { task, .. } => (&task.store, &task.workflow_args),
    };
    let private = crate::privacy::open(store_args, Migrate::Require).await?;
    if let TasksCommand::Workspace { task, path, run } = &command {
        let workspaces = stele_tools::Workspaces::new(
            private.store.pool.clone(),
            Some(private.subjects.sealer().clone()),
        );
        let result = workspace(&workspaces, task, path.as_deref(), run.as_deref()).await;
        private.store.close().await;
        return result;
    }
    let result = match workflow_args
        .runtime_with(&private.store, Some(private.subjects.clone()))
        .await
    {
        Ok(runtime) => run(&runtime, command).await,
        Err(e) => Err(e),
    };
    private.store.close().await;
    result
}

async fn run(runtime: &Runtime, command: TasksCommand) -> anyhow::Result<()> {
    let meta = || CommandMeta::new(format!("user:{}", whoami()), "cli");
    match command {
        TasksCommand::Create(args) => {
            let input = TaskInput::parse(args.input)?;
            let requester = Requester {
                user_id: args.user,
                channel: Channel::CLI,
            };
            let created = runtime
                .create_task(input, requester, args.workflow, meta())
                .await?;
            let id = created.task_id();
            if args.json {
                println!("{}", json!({ "task_id": id }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
        TasksCommand::Show(args) => {
            let view = runtime.task(&args.id).await?;
            if args.json {
                let view = stele_privacy::export::plainly(&serde_json::to_value(&view)?);
                println!("{}", serde_json::to_string(&view)?);
            } else {
                print!("{}", render(&view));
            }
            Ok(())
        }
        TasksCommand::History(args) => {
            let events = runtime.history(&args.id).await?;
            let mut out = io::BufWriter::new(io::stdout().lock());
            for event in &events {
                if !crate::events::print(&mut out, event)? {
                    return Ok(());
                }
            }
            let _ = out.flush();
            Ok(())
        }
        TasksCommand::Cancel { task, reason } => {
            runtime.cancel_task(&task.id, reason, meta()).await?;
            println!("cancelling {}", task.id);
            Ok(())
        }
        TasksCommand::Signal {
            task,
            name,
            payload,
        } => {
            let payload = match payload {
                None => Value::Null,
                Some(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            };
            runtime
                .signal_task(&task.id, name.clone(), payload, meta())
                .await?;
            println!("signal {name} sent to {}", task.id);
            Ok(())
        }
        TasksCommand::Watch(args) => watch(runtime, &args.id).await,
        TasksCommand::Workspace { .. } => unreachable!("answered before a runtime is made"),
    }
}

/// Lists a task's workspaces, or prints one file of them.
async fn workspace(
    workspaces: &stele_tools::Workspaces,
    task: &TaskArgs,
    path: Option<&str>,
    run: Option<&str>,
) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if let Some(path) = path {
        let (_, bytes) = workspaces.task_file(&task.id, run, path).await?;
        out.write_all(&bytes)?;
        return Ok(());
    }
    for run_id in workspaces.runs_of_task(&task.id).await? {
        if run.is_some_and(|run| run != run_id) {
            continue;
        }
        let listing = match workspaces.list(&run_id).await {
            Ok(listing) => listing,
            Err(stele_tools::WorkspaceError::Erased) => {
                if task.json {
                    writeln!(out, "{}", json!({ "run_id": run_id, "erased": true }))?;
                } else {
                    writeln!(out, "run {run_id}: erased with its person")?;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if task.json {
            writeln!(out, "{}", serde_json::to_string(&listing)?)?;
            continue;
        }
        writeln!(out, "run {run_id}")?;
        for file in &listing.files {
            writeln!(out, "  {:>9}  {}", file.size, file.path)?;
        }
    }
    Ok(())
}

/// Prints the task's history so far, then its events as they are committed, until it finishes.
async fn watch(runtime: &Runtime, task_id: &str) -> anyhow::Result<()> {
    runtime.task(task_id).await?;
    let events = runtime.follower(task_id, None).follow();
    futures::pin_mut!(events);
    let mut out = io::stdout();
    loop {
        let next = tokio::select! {
            next = futures::StreamExt::next(&mut events) => next,
            _ = crate::shutdown_signal() => return Ok(()),
        };
        let Some(next) = next else {
            return Ok(());
        };
        let (_, event) = next.context("following the task")?;
        writeln!(out, "{}", line(&event))?;
        out.flush()?;
    }
}

fn line(event: &stele_engine::RecordedEvent) -> String {
    format!(
        "{} {:<28} {}",
        event.recorded_at.format("%H:%M:%S%.3f"),
        event.stream.aggregate_id,
        describe(event)
    )
}

fn render(view: &TaskView) -> String {
    let mut text = format!(
        "task      {}\nstatus    {:?}\nworkflow  {}\ninput     {}\n",
        view.task_id,
        view.task.status,
        view.task.workflow.as_deref().unwrap_or("-"),
        view.task.input.text()
    );
    if let Some(run) = view.run.as_ref().filter(|run| run.started()) {
        text += &format!(
            "run       {} ({} v{}) {}\n",
            run.run_id,
            run.workflow,
            run.version,
            run.status.as_str()
        );
        for id in &run.path {
            if let Some(step) = run.step(id) {
                text += &format!(
                    "  {:<14} {:<10} attempt {}{}\n",
                    id,
                    format!("{:?}", step.status).to_lowercase(),
                    step.attempt.max(1),
                    step.error
                        .as_deref()
                        .map(|e| format!("  error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if let Some(result) = &view.task.result {
        text += &format!("result    {}\n", result.json());
    }
    if let Some(error) = &view.task.error {
        text += &format!("error     {}\n", error.text());
    }
    text
}

/// A task id as given on the command line: task ids are UUIDs.
fn task_id(text: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(text)
        .map(|_| text.to_owned())
        .map_err(|_| format!("{text:?} is not a task id (task ids are UUIDs, as `stele tasks create` prints them)"))
}

pub(crate) fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

/// When a run event happened, for progress displays.
fn describe(event: &stele_engine::RecordedEvent) -> String {
    let data = &event.payload["data"];
    let field = |name: &str| data[name].as_str().unwrap_or_default().to_owned();
    match event.event_type.as_str() {
        "StepScheduled" | "StepStarted" => format!(
            "{} {} (attempt {})",
            event.event_type,
            field("step"),
            data["attempt"]
        ),
        "StepCompleted" | "StepFailed" | "StepSkipped" | "TimerArmed" | "TimerFired"
        | "WaitStarted" | "WaitTimedOut" | "ChildrenStarted" | "ReplyRequested" => {
            format!("{} {}", event.event_type, field("step"))
        }
        other => other.to_owned(),
    }
}
