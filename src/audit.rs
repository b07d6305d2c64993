//! The audit log on the command line: the signing key, `stele audit …`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde::Deserialize;
use stele_audit::proof::{self, Proof};
use stele_audit::{SealerOptions, SigningKey};
use stele_engine::store::{Migrate, Store, StoreLocation};
use stele_engine::Position;

use crate::StoreArgs;

/// The file in the embedded store's data directory that holds its audit signing key.
pub const KEY_FILE: &str = "audit.key";
/// The name (checkpoints' origin) of a key the embedded store makes for itself.
pub const DEFAULT_NAME: &str = "stele.local/audit";

/// When checkpoints are signed (`[audit]` in the configuration).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// At least every this many events (10,000 by default).
    pub every: Option<u64>,
    /// And when the last checkpoint is older than this and the log grew ("10s" by default).
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
}

impl AuditConfig {
    pub fn options(&self) -> SealerOptions {
        let default = SealerOptions::default();
        SealerOptions {
            every: self.every.unwrap_or(default.every).max(1),
            interval: self.interval.unwrap_or(default.interval),
        }
    }
}

/// The audit signing key for `location`: `STELE_AUDIT_KEY` (a signed-note signer key), else the
/// file given, else (embedded) the data directory's, made on first start; PostgreSQL needs one of
/// the first two.
pub fn key_for(location: &StoreLocation, file: Option<&Path>) -> anyhow::Result<SigningKey> {
    if let Ok(text) = std::env::var("STELE_AUDIT_KEY") {
        return SigningKey::from_text(&text).context("STELE_AUDIT_KEY");
    }
    match (file, location) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the audit signing key {}", file.display()))?;
            Ok(SigningKey::from_text(&text)
                .with_context(|| format!("{}", file.display()))?)
        }
        (None, StoreLocation::Embedded(dir)) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(SigningKey::load_or_create(&dir.join(KEY_FILE), DEFAULT_NAME)?)
        }
        (None, StoreLocation::Postgres(_)) => anyhow::bail!(
            "no audit signing key: set STELE_AUDIT_KEY or --audit-key-file / audit_key_file (`stele audit keygen --name <log name>` makes one)"
        ),
    }
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Make a new signing key for a log named NAME: the private key on standard output, the
    /// public verifier key on standard error.
    Keygen {
        /// The log's name, e.g. `audit.example.org/stele` (no spaces, no `+`).
        #[arg(long)]
        name: String,
    },
    /// Print the public verifier key third parties check checkpoints and proofs with.
    Key {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Recompute the audit tree from the log and check every checkpoint; name the first
    /// position where anything differs.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Check against this verifier key rather than the configured key's.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the signed checkpoints.
    Checkpoints {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// A proof: that the event at --position is in a checkpoint (the newest, or --size), or
    /// that the checkpoint of --to extends the one of --from.
    Prove {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, conflicts_with_all = ["from", "to"])]
        position: Option<Position>,
        #[arg(long, requires = "position")]
        size: Option<u64>,
        #[arg(long, requires = "to")]
        from: Option<u64>,
        #[arg(long, requires = "from")]
        to: Option<u64>,
        /// Write the proof here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Who did what, when, through which channel: the audit view, in log order.
    Log {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        actor: Option<String>,
        /// A subject's id.
        #[arg(long)]
        subject: Option<String>,
        /// A task's id.
        #[arg(long)]
        task: Option<String>,
        /// `type/id`, or `type`.
        #[arg(long)]
        stream: Option<String>,
        /// From this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Before this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// After this position.
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The state of an aggregate (task, workflow run, conversation, API key, subject) as it was
    /// at a position or a time: its events up to then, folded.
    At {
        #[command(flatten)]
        store: StoreArgs,
        /// A position of the log, or a time (RFC 3339).
        at: String,
        /// The aggregate's stream: `task/<id>`, `workflow_run/<id>`, `conversation/<id>`,
        /// `api_key/<id>`, `subject/<id>`.
        #[arg(long)]
        stream: String,
    },
    /// Check a proof offline, with nothing but the log's verifier key.
    CheckProof {
        /// The proof (JSON, as `stele audit prove` writes it).
        file: PathBuf,
        /// The log's verifier key (`stele audit key`).
        #[arg(long)]
        key: String,
    },
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Keygen { name } => {
            let key = SigningKey::generate(&name)?;
            println!("{}", key.private_text());
            eprintln!("{}", key.verifier_key());
            Ok(())
        }
        AuditCommand::CheckProof { file, key } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let proof: Proof = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an audit proof", file.display()))?;
            let checked = proof::check(&proof, &key)?;
            match (checked.position, checked.sizes.as_slice()) {
                (Some(position), [size]) => {
                    println!(
                        "ok: the event at position {position} is in the signed {size}-event log"
                    )
                }
                (_, [older, newer]) => {
                    println!(
                        "ok: the signed {newer}-event log extends the signed {older}-event log"
                    )
                }
                _ => println!("ok"),
            }
            Ok(())
        }
        AuditCommand::Log {
            store,
            actor,
            subject,
            task,
            stream,
            since,
            until,
            after,
            limit,
            json,
        } => {
            let opened = Store::open(store.location()?, Migrate::Require).await?;
            let result = async {
                // The view is a projection: bring it up to date first (or wait for the node
                // that holds it).
                let runner = stele_engine::projection::ProjectionRunner::new(
                    &opened,
                    stele_projections::all(),
                );
                runner.setup().await?;
                crate::privacy::catch_up(
                    &runner,
                    opened.stored.as_ref(),
                    stele_audit::view::AUDIT_VIEW,
                    Duration::from_secs(30),
                )
                .await?;
                runner.release_all().await?;
                let filter = stele_audit::view::AuditFilter {
                    actor,
                    subject,
                    task,
                    stream,
                    since,
                    until,
                    after,
                    limit,
                };
                for row in stele_audit::view::list(&opened.pool, &filter).await? {
                    if json {
                        println!("{}", serde_json::to_string(&row)?);
                    } else {
                        println!(
                            "{:>8}  {}  {:<24} {:<8} {:<20} {}",
                            row.position,
                            row.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                            row.actor,
                            row.channel,
                            row.event_type,
                            row.stream
                        );
                    }
                }
                anyhow::Ok(())
            }
            .await;
            opened.close().await;
            result
        }
        AuditCommand::At { store, at, stream } => {
            let moment = match at.parse::<Position>() {
                Ok(position) => Moment::Position(position),
                Err(_) => Moment::Time(at.parse().map_err(|_| {
                    anyhow::anyhow!("{at:?} is neither a position nor an RFC 3339 time")
                })?),
            };
            let (kind, id) = stream
                .split_once('/')
                .ok_or_else(|| anyhow::anyhow!("--stream is TYPE/ID, e.g. task/<id>"))?;
            let private = crate::privacy::open(&store, Migrate::Require).await?;
            let result = state_at(&private.store, kind, id, moment).await;
            private.store.close().await;
            println!("{}", serde_json::to_string_pretty(&result?)?);
            Ok(())
        }
        AuditCommand::Key { store } => {
            let key = key_for(&store.location()?, store.audit_key_file.as_deref())?;
            println!("{}", key.verifier_key());
            Ok(())
        }
        AuditCommand::Verify { store, key, json } => {
            let opened = Store::open(store.location()?, Migrate::Require).await?;
            let result = verify(&opened, &store, key, json).await;
            opened.close().await;
            result
        }
        AuditCommand::Checkpoints { store, json } => {
            let opened = Store::open(store.location()?, Migrate::Require).await?;
            let result = async {
                let mut db = stele_engine::store::sql::Db::from(&opened.pool);
                for checkpoint in stele_audit::tree::checkpoints(&mut db).await? {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "size": checkpoint.size,
                                "root": checkpoint.root,
                                "signed_at": checkpoint.signed_at,
                                "note": checkpoint.note,
                            })
                        );
                    } else {
                        println!(
                            "{:>12}  {}  {}",
                            checkpoint.size,
                            checkpoint.root,
                            checkpoint.signed_at.to_rfc3339()
                        );
                    }
                }
                anyhow::Ok(())
            }
            .await;
            opened.close().await;
            result
        }
        AuditCommand::Prove {
            store,
            position,
            size,
            from,
            to,
            out,
        } => {
            let opened = Store::open(store.location()?, Migrate::Require).await?;
            let result = async {
                let proof = match (position, from, to) {
                    (Some(position), _, _) => {
                        proof::prove_inclusion(opened.stored.as_ref(), &opened.pool, position, size)
                            .await?
                    }
                    (None, Some(from), Some(to)) => {
                        proof::prove_consistency(&opened.pool, from, to).await?
                    }
                    _ => anyhow::bail!("say what to prove: --position P, or --from M --to N"),
                };
                let text = serde_json::to_string_pretty(&proof)?;
                match out {
                    Some(path) => std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?,
                    None => println!("{text}"),
                }
                Ok(())
            }
            .await;
            opened.close().await;
            result
        }
    }
}

async fn verify(
    opened: &Store,
    store: &StoreArgs,
    key: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let vkey = match key {
        Some(vkey) => vkey,
        None => key_for(&opened.location, store.audit_key_file.as_deref())?
            .verifier_key()
            .to_owned(),
    };
    let report = stele_audit::verify(opened.stored.clone(), &opened.pool, &vkey).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    match &report.mismatch {
        None => {
            if !json {
                println!(
                    "ok: {} events, {} sealed, {} checkpoints verified in {:.2} s ({:.0} events/s)",
                    report.events,
                    report.sealed,
                    report.checkpoints,
                    report.seconds,
                    report.events as f64 / report.seconds.max(1e-9)
                );
            }
            Ok(())
        }
        Some(mismatch) => anyhow::bail!(
            "the audit log does not verify{}: {}",
            mismatch
                .position
                .map(|p| format!(" at position {p}"))
                .unwrap_or_default(),
            mismatch.what
        ),
    }
}

/// A moment of the log.
#[derive(Clone, Copy, Debug)]
enum Moment {
    Position(Position),
    Time(chrono::DateTime<chrono::Utc>),
}

/// The aggregate `kind/id` folded from its events up to `moment`, people's values readable.
async fn state_at(
    store: &Store,
    kind: &str,
    id: &str,
    moment: Moment,
) -> anyhow::Result<serde_json::Value> {
    use stele_aggregates::api_key::ApiKey;
    use stele_aggregates::conversation::Conversation;
    use stele_aggregates::subject::Subject;
    use stele_aggregates::task::Task;
    use stele_aggregates::workflow_run::WorkflowRun;

    fn fold<A: cqrs_es::Aggregate + serde::Serialize>(
        events: &[stele_engine::RecordedEvent],
    ) -> anyhow::Result<serde_json::Value> {
        let mut state = A::default();
        for event in events {
            let decoded: A::Event = serde_json::from_value(event.payload.clone())
                .with_context(|| format!("event {} is unreadable", event.position))?;
            state.apply(decoded);
        }
        Ok(serde_json::to_value(state)?)
    }

    let stream = stele_engine::StreamId::new(kind, id);
    let events: Vec<_> = store
        .log
        .read_stream(&stream, 0)
        .await?
        .into_iter()
        .filter(|e| match moment {
            Moment::Position(p) => e.position <= p,
            Moment::Time(t) => e.recorded_at <= t,
        })
        .collect();
    let state = match kind {
        "task" => fold::<Task>(&events)?,
        "workflow_run" => fold::<WorkflowRun>(&events)?,
        "conversation" => fold::<Conversation>(&events)?,
        "api_key" => fold::<ApiKey>(&events)?,
        "subject" => fold::<Subject>(&events)?,
        other => anyhow::bail!(
            "no aggregate type {other:?}: task, workflow_run, conversation, api_key or subject"
        ),
    };
    let last = events.last();
    Ok(serde_json::json!({
        "stream": stream.to_string(),
        "at": match moment {
            Moment::Position(p) => serde_json::json!({ "position": p }),
            Moment::Time(t) => serde_json::json!({ "time": t }),
        },
        "events": events.len(),
        "version": last.map_or(0, |e| e.sequence),
        "last_position": last.map(|e| e.position),
        "state": stele_privacy::export::plainly(&state),
    }))
}

/// Signs the tree's tail every `interval` until `stopped` (the sealer signs when events arrive;
/// this covers a log that went quiet).
pub async fn sign_tail(
    store: stele_engine::store::StorePool,
    key: Arc<SigningKey>,
    interval: Duration,
    stopped: impl std::future::Future<Output = ()>,
) {
    let tick = async {
        let mut every = tokio::time::interval(interval);
        every.tick().await;
        loop {
            every.tick().await;
            if let Err(e) = proof::checkpoint_now(&store, &key).await {
                tracing::warn!(error = %e, "signing the audit tree's tail failed");
            }
        }
    };
    tokio::select! {
        _ = tick => {}
        _ = stopped => {}
    }
}

/// Inclusion proofs of the events at `positions` for an export: the audit tree is caught up here
/// (or by the node that holds it) and its tail signed first, so every event is proved.
pub async fn attest_now(
    store: &Store,
    args: &StoreArgs,
    positions: &[Position],
) -> anyhow::Result<Option<proof::Attestation>> {
    let key = Arc::new(key_for(&args.location()?, args.audit_key_file.as_deref())?);
    let runner = stele_engine::projection::ProjectionRunner::new(
        store,
        vec![Arc::new(stele_audit::Sealer::new(
            key.clone(),
            SealerOptions::default(),
        ))],
    );
    runner.setup().await?;
    let caught = crate::privacy::catch_up(
        &runner,
        store.stored.as_ref(),
        stele_audit::AUDIT,
        Duration::from_secs(30),
    )
    .await;
    runner.release_all().await?;
    caught?;
    proof::checkpoint_now(&store.pool, &key).await?;
    Ok(proof::attest(store.stored.as_ref(), &store.pool, positions).await?)
}
