//! `stele events tail`: the global log as NDJSON.

use std::io::{self, Write};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::store::{Migrate, Store};
use stele_engine::{EventMetadata, Position, RecordedEvent};

use crate::StoreArgs;

#[derive(Args)]
pub struct TailArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Start after the event at this position (0: from the beginning).
    #[arg(long, default_value_t = Position::START, value_name = "POSITION")]
    after: Position,
    /// Keep running and print new events as they are committed.
    #[arg(long)]
    follow: bool,
    /// Only events of this stream: an aggregate id, or TYPE/ID.
    #[arg(long, value_name = "ID")]
    stream: Option<String>,
}

/// One line of output.
#[derive(Serialize)]
struct Line<'a> {
    position: Position,
    stream: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    #[serde(rename = "type")]
    event_type: &'a str,
    version: &'a str,
    recorded_at: DateTime<Utc>,
    metadata: &'a EventMetadata,
    payload: &'a Value,
}

fn matches(filter: Option<&str>, event: &RecordedEvent) -> bool {
    match filter {
        None => true,
        Some(filter) => match filter.split_once('/') {
            Some((kind, id)) => {
                event.stream.aggregate_type == kind && event.stream.aggregate_id == id
            }
            None => event.stream.aggregate_id == filter,
        },
    }
}

/// Writes one event; `Ok(false)` when the reader went away (closed pipe).
pub(crate) fn print(out: &mut impl Write, event: &RecordedEvent) -> anyhow::Result<bool> {
    let line = Line {
        position: event.position,
        stream: event.stream.to_string(),
        aggregate_type: &event.stream.aggregate_type,
        aggregate_id: &event.stream.aggregate_id,
        sequence: event.sequence,
        event_type: &event.event_type,
        version: &event.event_version,
        recorded_at: event.recorded_at,
        metadata: &event.metadata,
        payload: &event.payload,
    };
    let written = serde_json::to_writer(&mut *out, &line)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"));
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    // People's data is shown readable (or `[erased]`): the log itself holds it sealed.
    let private = crate::privacy::open(&args.store, Migrate::Require).await?;
    let result = run(&private.store, &args).await;
    private.store.close().await;
    result
}

async fn run(store: &Store, args: &TailArgs) -> anyhow::Result<()> {
    let filter = args.stream.as_deref();
    let stdout = io::stdout();
    if args.follow {
        let mut subscription = subscribe(
            store.log.clone(),
            args.after,
            SubscriptionOptions::default(),
        );
        // Fail fast on a bad position before waiting for events.
        store.log.read_all(args.after, 1).await?;
        loop {
            let event = tokio::select! {
                event = subscription.next() => event?,
                _ = crate::shutdown_signal() => return Ok(()),
            };
            if matches(filter, &event) {
                let mut out = stdout.lock();
                if !print(&mut out, &event)? || out.flush().is_err() {
                    return Ok(());
                }
            }
        }
    }
    // Everything committed after `after`, printed batch by batch.
    let mut out = io::BufWriter::new(stdout.lock());
    let mut position = args.after;
    loop {
        let batch = store.log.read_all(position, 5000).await?;
        let Some(last) = batch.last() else {
            break;
        };
        position = last.position;
        for event in &batch {
            if matches(filter, event) && !print(&mut out, event)? {
                return Ok(());
            }
        }
    }
    let _ = out.flush();
    Ok(())
}
