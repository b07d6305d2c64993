//! `stele jobs …`: operators' view of the job queue.

use clap::{Args, Subcommand};
use stele_engine::queue::{Job, JobFilter, JobState};
use stele_engine::store::{Migrate, Store};
use uuid::Uuid;

use crate::StoreArgs;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List(ListArgs),
    /// Show one job with every attempt's error.
    Show(JobArgs),
    /// List dead jobs (failed on their last attempt).
    Dead(ListArgs),
    /// Run a dead or cancelled job again, with a fresh set of attempts.
    Retry(JobArgs),
    /// Cancel an available or running job.
    Cancel(JobArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only jobs in this state: available, running, completed, dead, cancelled.
    #[arg(long)]
    state: Option<JobState>,
    /// Only jobs of this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only jobs of this kind.
    #[arg(long)]
    kind: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct JobArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The job's id.
    id: Uuid,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List(args) => list(args, None).await,
        JobsCommand::Dead(args) => list(args, Some(JobState::Dead)).await,
        JobsCommand::Show(args) => {
            let store = open(&args.store).await?;
            let job = store.queue.get(args.id).await;
            store.close().await;
            match job? {
                Some(job) => print_job(&job, args.json),
                None => anyhow::bail!("no job {}", args.id),
            }
        }
        JobsCommand::Retry(args) => {
            let store = open(&args.store).await?;
            let job = store.queue.retry(args.id).await;
            store.close().await;
            print_job(&job?, args.json)
        }
        JobsCommand::Cancel(args) => {
            let store = open(&args.store).await?;
            let job = store.queue.cancel(args.id).await;
            store.close().await;
            print_job(&job?, args.json)
        }
    }
}

async fn open(args: &StoreArgs) -> anyhow::Result<Store> {
    Ok(Store::open(args.location()?, Migrate::Require).await?)
}

async fn list(args: ListArgs, state: Option<JobState>) -> anyhow::Result<()> {
    let store = open(&args.store).await?;
    let jobs = store
        .queue
        .list(JobFilter {
            state: state.or(args.state),
            queue: args.queue,
            kind: args.kind,
            limit: args.limit,
        })
        .await;
    store.close().await;
    let jobs = jobs?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<10}  {:<12}  {:<20}  {:>7}  {:<20}  LAST ERROR",
        "ID", "STATE", "QUEUE", "KIND", "ATTEMPT", "RUN AT"
    );
    for job in &jobs {
        println!(
            "{:<36}  {:<10}  {:<12}  {:<20}  {:>3}/{:<3}  {:<20}  {}",
            job.id,
            job.state,
            truncate(&job.queue, 12),
            truncate(&job.kind, 20),
            job.attempt,
            job.max_attempts,
            job.run_at.format("%Y-%m-%d %H:%M:%S"),
            job.last_error
                .as_deref()
                .map(|e| truncate(e, 60))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn truncate(text: &str, width: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= width {
        line.to_owned()
    } else {
        let cut: String = line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn print_job(job: &Job, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    println!("id:            {}", job.id);
    println!("state:         {}", job.state);
    println!("queue / kind:  {} / {}", job.queue, job.kind);
    println!("attempt:       {} of {}", job.attempt, job.max_attempts);
    println!("priority:      {}", job.priority);
    println!("run at:        {}", job.run_at);
    println!("timeout:       {:?}", job.timeout());
    if let Some(key) = &job.ordering_key {
        println!("ordering key:  {key}");
    }
    if let Some(key) = &job.idempotency_key {
        println!("idempotency:   {key}");
    }
    if let (Some(by), Some(until)) = (&job.locked_by, job.lease_expires_at) {
        println!("leased by:     {by} until {until}");
    }
    println!("created:       {}", job.created_at);
    if let Some(finished) = job.finished_at {
        println!("finished:      {finished}");
    }
    println!("payload:       {}", job.payload);
    for error in &job.errors {
        println!("attempt {} at {}: {}", error.attempt, error.at, error.error);
    }
    Ok(())
}
