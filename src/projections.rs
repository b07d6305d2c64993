//! `stele projections …`, `stele replay` and `stele streams`: operating the read models.

use std::io::IsTerminal;
use std::sync::Arc;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use stele_engine::projection::{ProjectionRunner, ProjectionStatus};
use stele_engine::store::{Migrate, Store};

use crate::StoreArgs;

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Every projection's position, status and lag.
    Status(StatusArgs),
    /// Let a failed projection try its failing event again.
    Retry(NameArgs),
    /// Skip the event a failed projection stopped at (recorded as an event).
    Skip(NameArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NameArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The projection's name.
    name: String,
}

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The projection to rebuild.
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    projection: Option<String>,
    /// Rebuild every projection.
    #[arg(long)]
    all: bool,
    /// Replay only up to this position, into scratch tables (`--into`), for inspection: the
    /// live projection is not touched.
    #[arg(long, requires_all = ["projection", "into"])]
    until: Option<stele_engine::Position>,
    /// The scratch tables' suffix: tables `<table>__<NAME>` (1 to 32 of a-z, 0-9, _).
    #[arg(long, requires = "until")]
    into: Option<String>,
}

#[derive(Args)]
pub struct StreamsArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only streams of this aggregate type.
    #[arg(long = "type")]
    aggregate_type: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

async fn open(args: &StoreArgs) -> anyhow::Result<(Store, ProjectionRunner)> {
    let store = Store::open(args.location()?, Migrate::Require).await?;
    let runner = ProjectionRunner::new(&store, stele_projections::all());
    runner.setup().await?;
    Ok((store, runner))
}

pub async fn run(command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::Status(args) => {
            let (store, runner) = open(&args.store).await?;
            let status = runner.status().await;
            store.close().await;
            print_status(&status?, args.json)
        }
        ProjectionsCommand::Retry(args) => {
            let (store, runner) = open(&args.store).await?;
            let retried = runner.retry(&args.name).await;
            store.close().await;
            retried?;
            eprintln!("projection {} will retry its failing event", args.name);
            Ok(())
        }
        ProjectionsCommand::Skip(args) => {
            let (store, runner) = open(&args.store).await?;
            let actor = format!(
                "operator:{}",
                std::env::var("USER").unwrap_or_else(|_| "cli".into())
            );
            let skipped = runner.skip(&args.name, &actor).await;
            store.close().await;
            eprintln!(
                "projection {} skipped the event at position {}",
                args.name, skipped?
            );
            Ok(())
        }
    }
}

fn print_status(statuses: &[ProjectionStatus], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(statuses)?);
        return Ok(());
    }
    println!(
        "{:<20}  {:<10}  {:>10}  {:>10}  {:>10}  {:>9}  ERROR",
        "PROJECTION", "STATUS", "POSITION", "APPLIED", "LAG", "LAG (S)"
    );
    for s in statuses {
        let cp = &s.checkpoint;
        println!(
            "{:<20}  {:<10}  {:>10}  {:>10}  {:>10}  {:>9.1}  {}",
            cp.name,
            format!("{:?}", cp.status).to_lowercase(),
            cp.position,
            cp.events_applied,
            s.lag_events,
            s.lag_seconds,
            cp.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let (store, runner) = open(&args.store).await?;
    if let (Some(name), Some(until), Some(into)) = (&args.projection, args.until, &args.into) {
        let result = runner.replay_until(name, until, into).await;
        store.close().await;
        let (tables, applied) = result?;
        println!(
            "{}",
            serde_json::json!({ "projection": name, "until": until, "tables": tables, "events_applied": applied })
        );
        return Ok(());
    }
    let names: Vec<String> = match &args.projection {
        Some(name) => vec![name.clone()],
        None => runner.rebuildable().into_iter().map(String::from).collect(),
    };
    let result = rebuild_all(&runner, &names).await;
    store.close().await;
    result
}

async fn rebuild_all(runner: &ProjectionRunner, names: &[String]) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    for name in names {
        let bar = tty.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:40}] {pos}/{len} positions {per_sec} {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.clone());
            Arc::new(bar)
        });
        let progress_bar = bar.clone();
        let checkpoint = runner
            .rebuild(name, move |p| match &progress_bar {
                Some(bar) => {
                    bar.set_length(p.head.0.max(0) as u64);
                    bar.set_position(p.position.0.max(0) as u64);
                }
                None => println!(
                    "{}",
                    serde_json::json!({ "projection": name, "progress": p })
                ),
            })
            .await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        println!(
            "{}",
            serde_json::json!({ "projection": name, "rebuilt": true, "checkpoint": checkpoint })
        );
    }
    Ok(())
}

pub async fn streams(args: StreamsArgs) -> anyhow::Result<()> {
    let (store, runner) = open(&args.store).await?;
    // The view is as fresh as its projection: catch it up first.
    let caught_up = async {
        while runner.step("streams").await?.read > 0 {}
        runner.release_all().await?;
        anyhow::Ok(())
    }
    .await;
    let rows =
        stele_projections::list_streams(&store.pool, args.aggregate_type.as_deref(), args.limit)
            .await;
    store.close().await;
    caught_up?;
    let rows = rows?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<40}  {:>8}  {:>8}  LAST EVENT",
        "STREAM", "VERSION", "EVENTS"
    );
    for row in rows {
        println!(
            "{:<40}  {:>8}  {:>8}  {}",
            format!("{}/{}", row.aggregate_type, row.aggregate_id),
            row.version,
            row.events,
            row.last_event_at.format("%Y-%m-%d %H:%M:%S%.3f")
        );
    }
    Ok(())
}
