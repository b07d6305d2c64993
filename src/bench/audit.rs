//! `stele bench audit`: the audit tree at scale. Sealing rate (the sealer catching up with a
//! filled log), the sealer's lag under appends at 32 writers, verification rate, and the time to
//! make and to check an inclusion proof against the newest checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use stele_audit::{proof, Sealer, SealerOptions, SigningKey, AUDIT};
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::sql::Db;
use stele_engine::store::{Migrate, Store};
use stele_engine::{CommandBus, CommandMeta, Position};

use super::probe::{Probe, Record};
use super::{Latency, Machine, Scratch, Targets};

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    targets: Targets,
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Inclusion proofs made and checked.
    #[arg(long, default_value_t = 1_000)]
    proofs: usize,
    /// Verifications of the whole log (the median rate is reported).
    #[arg(long, default_value_t = 3)]
    verify_rounds: usize,
    /// Seconds of appends at 32 writers while the sealer follows.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    results: Vec<Figure>,
}

#[derive(Serialize)]
struct Figure {
    backend: &'static str,
    events: u64,
    seal_events_per_sec: f64,
    verify_events_per_sec: f64,
    proof: Latency,
    check: Latency,
    /// Appends at 32 writers with the sealer following: their rate, and how far behind the
    /// sealer was (seconds since the oldest event it had not sealed), sampled every 100 ms.
    follow_appends_per_sec: f64,
    follow_lag_p95_s: f64,
    follow_lag_max_s: f64,
}

pub async fn run(args: AuditArgs) -> anyhow::Result<Report> {
    let mut results = Vec::new();
    if let Some(url) = &args.targets.database_url {
        let scratch = Scratch::postgres(url).await?;
        let figure = measure(&scratch, "postgres", &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    if !args.targets.no_sqlite {
        let scratch = Scratch::sqlite(args.targets.scratch_dir.as_ref())?;
        let figure = measure(&scratch, "sqlite", &args).await;
        scratch.remove().await;
        results.push(figure?);
    }
    Ok(Report {
        scenario: "audit",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        results,
    })
}

fn sealer(key: &Arc<SigningKey>) -> Arc<Sealer> {
    Arc::new(Sealer::new(key.clone(), SealerOptions::default()))
}

async fn measure(
    scratch: &Scratch,
    backend: &'static str,
    args: &AuditArgs,
) -> anyhow::Result<Figure> {
    let store = Store::open(scratch.location.clone(), Migrate::Apply).await?;
    let key = Arc::new(SigningKey::generate("stele.bench/audit")?);
    super::replay::fill(&store, args.events).await?;

    let runner = ProjectionRunner::new(&store, vec![sealer(&key)]).with_batch_size(5_000);
    runner.setup().await?;
    let started = Instant::now();
    while runner.step(AUDIT).await?.read > 0 {}
    let seal_seconds = started.elapsed().as_secs_f64();
    proof::checkpoint_now(&store.pool, &key).await?;
    runner.release_all().await?;

    let mut rates = Vec::new();
    for _ in 0..args.verify_rounds.max(1) {
        let started = Instant::now();
        let report =
            stele_audit::verify(store.stored.clone(), &store.pool, key.verifier_key()).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.ok() && report.events == args.events as u64,
            "the bench's own log does not verify: {report:?}"
        );
        rates.push(report.events as f64 / seconds);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let verify_rate = rates[rates.len() / 2];

    // Proofs of events spread over the log, against the newest checkpoint.
    let positions = {
        let mut db = Db::from(&store.pool);
        let mut positions = Vec::new();
        let step = (args.events / args.proofs.max(1)).max(1) as u64;
        let mut leaf = 0;
        while positions.len() < args.proofs && leaf < args.events as u64 {
            if let Some((_, p)) = stele_audit::tree::records(&mut db, leaf, 1).await?.first() {
                positions.push(*p);
            }
            leaf += step;
        }
        positions
    };
    let (mut made, mut checked) = (Vec::new(), Vec::new());
    for position in positions {
        let begun = Instant::now();
        let inclusion =
            proof::prove_inclusion(store.stored.as_ref(), &store.pool, position, None).await?;
        made.push(begun.elapsed());
        let begun = Instant::now();
        proof::check(&inclusion, key.verifier_key())?;
        checked.push(begun.elapsed());
    }

    let (appended, lags) = follow(&store, &key, Duration::from_secs(args.seconds)).await?;
    store.close().await;
    let mut lags = lags;
    lags.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let at = |q: f64| {
        lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Figure {
        backend,
        events: args.events as u64,
        seal_events_per_sec: (args.events as f64 / seal_seconds).round(),
        verify_events_per_sec: verify_rate.round(),
        proof: Latency::of(made),
        check: Latency::of(checked),
        follow_appends_per_sec: (appended as f64 / args.seconds.max(1) as f64).round(),
        follow_lag_p95_s: (at(0.95) * 1000.0).round() / 1000.0,
        follow_lag_max_s: (at(1.0) * 1000.0).round() / 1000.0,
    })
}

/// Appends at 32 writers for `duration` while a runner follows the log with the sealer; samples
/// the sealer's lag every 100 ms. Returns the appends made and the lags (seconds).
async fn follow(
    store: &Store,
    key: &Arc<SigningKey>,
    duration: Duration,
) -> anyhow::Result<(u64, Vec<f64>)> {
    let runner = Arc::new(ProjectionRunner::new(store, vec![sealer(key)]).with_batch_size(5_000));
    runner.setup().await?;
    let (stop_runner, stopped) = tokio::sync::watch::channel(false);
    let following = {
        let runner = runner.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let bus = Arc::new(CommandBus::<Probe>::new(store.log.clone(), ()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            tokio::spawn(async move {
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    bus.create(
                        &uuid::Uuid::now_v7().to_string(),
                        Record { value: 1 },
                        CommandMeta::new("bench", "bench"),
                    )
                    .await?;
                    count += 1;
                }
                anyhow::Ok(count)
            })
        })
        .collect();
    let mut lags = Vec::new();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sealed = {
            let mut db = Db::from(&store.pool);
            stele_audit::tree::size(&mut db).await?
        };
        let last = if sealed == 0 {
            Position::START
        } else {
            let mut db = Db::from(&store.pool);
            stele_audit::tree::records(&mut db, sealed - 1, 1)
                .await?
                .first()
                .map_or(Position::START, |(_, p)| *p)
        };
        let lag = match store.stored.read_all(last, 1).await?.first() {
            Some(oldest) => {
                (chrono::Utc::now() - oldest.recorded_at)
                    .num_milliseconds()
                    .max(0) as f64
                    / 1000.0
            }
            None => 0.0,
        };
        lags.push(lag);
    }
    stop.store(true, Ordering::Relaxed);
    let mut appended = 0;
    for writer in writers {
        appended += writer.await??;
    }
    let _ = stop_runner.send(true);
    following.await??;
    Ok((appended, lags))
}
