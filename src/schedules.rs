//! `stele schedules …`: workflows started on a timetable (cron patterns or intervals), as
//! durable timers that a running node fires.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use stele_aggregates::schedule::{CatchUp, Overlap, Schedule, ScheduleSpec};
use stele_api::routes::schedules::{body, timing_of};
use stele_api::wire::ScheduleBody;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::Migrate;
use stele_engine::CommandMeta;
use stele_workflows::runtime::{Runtime, RuntimeError};

use crate::node::WorkflowArgs;
use crate::StoreArgs;

#[derive(Subcommand)]
pub enum SchedulesCommand {
    /// List the schedules.
    List {
        #[command(flatten)]
        on: On,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule.
    Show {
        #[command(flatten)]
        on: On,
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a schedule: `--cron '0 9 * * 1-5' --timezone Europe/Paris` or `--every 15m`.
    Add(AddArgs),
    /// Pause a schedule: it fires no more until resumed.
    Pause {
        #[command(flatten)]
        on: On,
        name: String,
    },
    /// Resume a paused schedule from now on.
    Resume {
        #[command(flatten)]
        on: On,
        name: String,
    },
    /// Remove a schedule for good (its history stays in the log).
    Remove {
        #[command(flatten)]
        on: On,
        name: String,
    },
}

/// The store and the workflows a command works on.
#[derive(Args)]
pub struct On {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) workflows: WorkflowArgs,
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    on: On,
    /// Its name (1 to 64 of a-z, 0-9, '-', '_').
    name: String,
    /// A cron pattern: 5 fields (6 with seconds first), or @hourly, @daily, …
    #[arg(long, conflicts_with = "every", required_unless_present = "every")]
    cron: Option<String>,
    /// The time zone of --cron (an IANA name, e.g. Europe/Paris); UTC by default.
    #[arg(long, requires = "cron")]
    timezone: Option<String>,
    /// An interval instead: 90s, 15m, 1h 30m, 1d.
    #[arg(long)]
    every: Option<String>,
    /// The workflow each moment starts.
    #[arg(long)]
    workflow: String,
    /// The input of each moment's task.
    #[arg(long)]
    input: String,
    /// Moments missed while no node ran: all (each, oldest first), latest (the default), skip.
    #[arg(long, value_enum, default_value = "latest")]
    catch_up: CatchUpArg,
    /// A moment that comes while the last one's task still runs: skip (the default) or allow.
    #[arg(long, value_enum, default_value = "skip")]
    overlap: OverlapArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CatchUpArg {
    All,
    Latest,
    Skip,
}

#[derive(Clone, Copy, ValueEnum)]
enum OverlapArg {
    Skip,
    Allow,
}

fn meta() -> CommandMeta {
    CommandMeta::new(format!("user:{}", crate::tasks::whoami()), "cli")
}

pub async fn run(command: SchedulesCommand) -> anyhow::Result<()> {
    let on = match &command {
        SchedulesCommand::List { on, .. }
        | SchedulesCommand::Show { on, .. }
        | SchedulesCommand::Pause { on, .. }
        | SchedulesCommand::Resume { on, .. }
        | SchedulesCommand::Remove { on, .. } => on,
        SchedulesCommand::Add(args) => &args.on,
    };
    let private = crate::privacy::open(&on.store, Migrate::Require).await?;
    let result = match on
        .workflows
        .runtime_with(&private.store, Some(private.subjects.clone()))
        .await
    {
        Ok(runtime) => apply(&runtime, &private.store, command).await,
        Err(e) => Err(e),
    };
    private.store.close().await;
    result
}

/// `name`'s schedule, or a sentence saying there is none.
async fn existing(runtime: &Runtime, name: &str) -> anyhow::Result<Schedule> {
    runtime
        .schedule(name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("there is no schedule {name:?} (`stele schedules list`)"))
}

async fn apply(
    runtime: &Runtime,
    store: &stele_engine::Store,
    command: SchedulesCommand,
) -> anyhow::Result<()> {
    let done = |schedule: Schedule, what: &str| {
        println!("schedule {} {what}", schedule.name);
    };
    match command {
        SchedulesCommand::List { json, .. } => {
            // The list is as fresh as the streams view: bring it up to the log's head first.
            let runner = ProjectionRunner::new(store, stele_projections::all());
            runner.setup().await?;
            crate::privacy::catch_up(
                &runner,
                store.stored.as_ref(),
                "streams",
                Duration::from_secs(30),
            )
            .await?;
            runner.release_all().await?;
            let rows = stele_projections::list_streams(
                &store.pool,
                Some(<Schedule as cqrs_es::Aggregate>::TYPE),
                10_000,
            )
            .await?;
            let mut schedules = Vec::new();
            for row in rows {
                if let Some(schedule) = runtime.schedule(&row.aggregate_id).await? {
                    schedules.push(body(schedule));
                }
            }
            schedules.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                println!("{}", serde_json::to_string(&schedules)?);
            } else if schedules.is_empty() {
                println!("no schedules");
            } else {
                for schedule in &schedules {
                    println!("{}", line(schedule));
                }
            }
            Ok(())
        }
        SchedulesCommand::Show { name, json, .. } => {
            let schedule = body(existing(runtime, &name).await?);
            if json {
                println!("{}", serde_json::to_string(&schedule)?);
            } else {
                println!("{}", line(&schedule));
                println!("  input: {}", schedule.input);
                if let Some(task) = &schedule.last_task_id {
                    println!("  last task: {task}");
                }
            }
            Ok(())
        }
        SchedulesCommand::Add(args) => {
            let timing = timing_of(args.cron, args.timezone, args.every.as_deref())
                .map_err(|why| anyhow::anyhow!(why))?;
            let spec = ScheduleSpec {
                timing,
                workflow: args.workflow,
                input: args.input,
                catch_up: match args.catch_up {
                    CatchUpArg::All => CatchUp::All,
                    CatchUpArg::Latest => CatchUp::Latest,
                    CatchUpArg::Skip => CatchUp::Skip,
                },
                overlap: match args.overlap {
                    OverlapArg::Skip => Overlap::Skip,
                    OverlapArg::Allow => Overlap::Allow,
                },
            };
            let schedule = runtime
                .create_schedule(&args.name, spec, meta())
                .await
                .map_err(sentence)?;
            let schedule = body(schedule);
            if args.json {
                println!("{}", serde_json::to_string(&schedule)?);
            } else {
                println!("{}", line(&schedule));
            }
            Ok(())
        }
        SchedulesCommand::Pause { name, .. } => {
            existing(runtime, &name).await?;
            let schedule = runtime
                .pause_schedule(&name, meta())
                .await
                .map_err(sentence)?;
            done(schedule, "paused");
            Ok(())
        }
        SchedulesCommand::Resume { name, .. } => {
            existing(runtime, &name).await?;
            let schedule = runtime
                .resume_schedule(&name, meta())
                .await
                .map_err(sentence)?;
            let next = schedule
                .next_due
                .map(|at| format!(", next at {}", at.to_rfc3339()))
                .unwrap_or_default();
            done(schedule, &format!("resumed{next}"));
            Ok(())
        }
        SchedulesCommand::Remove { name, .. } => {
            existing(runtime, &name).await?;
            let schedule = runtime
                .remove_schedule(&name, meta())
                .await
                .map_err(sentence)?;
            done(schedule, "removed");
            Ok(())
        }
    }
}

/// A refusal, said about the schedule.
fn sentence(e: RuntimeError) -> anyhow::Error {
    match e {
        RuntimeError::Schedule(e) => anyhow::anyhow!("the schedule was refused: {e}"),
        other => other.into(),
    }
}

/// One line about a schedule.
fn line(schedule: &ScheduleBody) -> String {
    let when = match (&schedule.cron, schedule.every_seconds) {
        (Some(cron), _) => format!(
            "cron {cron:?} {}",
            schedule.timezone.as_deref().unwrap_or("UTC")
        ),
        (None, Some(seconds)) => format!(
            "every {}",
            humantime::format_duration(Duration::from_secs(seconds))
        ),
        (None, None) => String::new(),
    };
    let status = serde_json::to_value(schedule.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let next = schedule
        .next_due
        .map(|at| format!(", next {}", at.to_rfc3339()))
        .unwrap_or_default();
    format!(
        "{}  {status}  {when} → {}  fired {}, skipped {}{next}",
        schedule.name, schedule.workflow, schedule.fired, schedule.skipped
    )
}
