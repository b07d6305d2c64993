//! Personal data on the command line: where the key-encryption key comes from, opening a store
//! with personal data sealed, and `stele subjects`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use stele_aggregates::channel::Channel;
use stele_aggregates::subject::{Identifier, Purpose};
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::{Migrate, Store, StoreLocation};
use stele_engine::CommandMeta;
use stele_privacy::blobs::BlobStore;
use stele_privacy::{Kek, Policy, Private};

use crate::node::WorkflowArgs;
use crate::StoreArgs;

/// The file in the embedded store's data directory that holds its key-encryption key.
pub const KEK_FILE: &str = "kek";

/// The key-encryption key for `location`: `STELE_KEK` (64 hexadecimal digits), else the file
/// given, else (embedded) the data directory's, made on first start; PostgreSQL needs one of the
/// first two.
pub fn kek_for(location: &StoreLocation, file: Option<&Path>) -> anyhow::Result<Kek> {
    if let Ok(hex) = std::env::var("STELE_KEK") {
        return Kek::from_hex(&hex).map_err(|_| {
            anyhow::anyhow!("STELE_KEK is not a key-encryption key: expected 64 hexadecimal digits")
        });
    }
    match (file, location) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file).with_context(|| {
                format!("cannot read the key-encryption key {}", file.display())
            })?;
            Kek::from_hex(&text).map_err(|_| {
                anyhow::anyhow!(
                    "{} is not a key-encryption key: expected 64 hexadecimal digits",
                    file.display()
                )
            })
        }
        (None, StoreLocation::Embedded(dir)) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(Kek::load_or_create(&dir.join(KEK_FILE))?)
        }
        (None, StoreLocation::Postgres(_)) => anyhow::bail!(
            "no key-encryption key: set STELE_KEK (64 hexadecimal digits, e.g. from `openssl rand -hex 32`) or --kek-file / kek_file; keep it apart from the database's backups"
        ),
    }
}

/// `store` with personal data sealed, and its subjects service (see
/// [`stele_privacy::private_store`]); a key-encryption key other than the store's is refused
/// before anything is read or written.
pub async fn private(
    store: &Store,
    kek_file: Option<&Path>,
    blob_store: Option<&str>,
    policy: Policy,
) -> anyhow::Result<Private> {
    let kek = kek_for(&store.location, kek_file)?;
    let blobs = match (blob_store, &store.location) {
        (Some(url), _) => Some(stele_privacy::blobs::blob_store(url, &store.pool)?),
        (None, StoreLocation::Embedded(dir)) => Some(Arc::new(
            stele_privacy::blobs::ObjectBlobs::folder(&dir.join(BLOBS_DIR))?,
        ) as Arc<dyn BlobStore>),
        (None, StoreLocation::Postgres(_)) => None,
    };
    Ok(stele_privacy::private_store_with_blobs(store, &kek, policy, blobs).await?)
}

/// The folder of the embedded store's files, in its data directory.
const BLOBS_DIR: &str = "blobs";

/// The blob store of `--blob-store` / `STELE_BLOB_STORE`, or else of the configuration file
/// named by `STELE_CONFIG`, for the commands that are not a node.
fn blob_store_for(args: &StoreArgs) -> anyhow::Result<Option<String>> {
    if let Some(url) = args.blob_store.clone().filter(|u| !u.is_empty()) {
        return Ok(Some(url));
    }
    let Ok(path) = std::env::var("STELE_CONFIG") else {
        return Ok(None);
    };
    Ok(crate::serve::read_config(Path::new(&path))?.blob_store)
}

/// The policy of the configuration file named by `STELE_CONFIG` (its `[privacy]` table), for the
/// commands that are not a node; the default (nothing required, kept until erased) without one.
pub fn policy_from_env() -> anyhow::Result<Policy> {
    let Ok(path) = std::env::var("STELE_CONFIG") else {
        return Ok(Policy::default());
    };
    Ok(crate::serve::read_config(Path::new(&path))?
        .privacy
        .unwrap_or_default())
}

/// Opens a store for a command, sealed, with the policy of `STELE_CONFIG`.
pub async fn open(args: &StoreArgs, migrate: Migrate) -> anyhow::Result<Private> {
    let store = Store::open(args.location()?, migrate).await?;
    let opened = match blob_store_for(args) {
        Ok(blobs) => match policy_from_env() {
            Ok(policy) => private(&store, args.kek_file.as_deref(), blobs.as_deref(), policy).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match opened {
        Ok(private) => Ok(private),
        Err(e) => {
            store.close().await;
            Err(e)
        }
    }
}

/// Brings the projection `name` up to the log's head as it is now: steps it here, or, when
/// another process holds it, waits for that process (at most `patience`).
pub async fn catch_up(
    runner: &ProjectionRunner,
    log: &dyn stele_engine::EventLog,
    name: &str,
    patience: Duration,
) -> anyhow::Result<()> {
    let head = log.head().await?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if runner.step(name).await?.read > 0 {
            continue;
        }
        let at = runner
            .status()
            .await?
            .into_iter()
            .find(|s| s.checkpoint.name == name)
            .map(|s| s.checkpoint.position);
        if at.is_some_and(|at| at >= head) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the {name} index has not caught up with the log within {patience:?}: is a node stopped while holding it, or is it failed (`stele projections status`)?"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Subcommand)]
pub enum SubjectsCommand {
    /// List the people Stele knows (ids, not names).
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Continue after this subject id.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show a subject (by id, or by an identifier such as email:ana@example.org).
    Show {
        #[command(flatten)]
        store: StoreArgs,
        subject: String,
        #[arg(long)]
        json: bool,
    },
    /// Register a person by their identifiers (or find them, if the first is known).
    Register {
        #[command(flatten)]
        store: StoreArgs,
        /// telegram:<user id>, email:<address> or api:<requester id> (repeat for several).
        #[arg(long = "identifier", required = true)]
        identifiers: Vec<String>,
        /// The person is a minor: only a guardian's consent counts.
        #[arg(long)]
        minor: bool,
        #[arg(long)]
        json: bool,
    },
    /// Record a consent given (or withdrawn) for a purpose.
    Consent {
        #[command(flatten)]
        store: StoreArgs,
        subject: String,
        #[arg(long)]
        purpose: String,
        /// Withdraw the consent instead of giving it.
        #[arg(long)]
        withdraw: bool,
        /// Given by this guardian (a minor's consent is their guardian's).
        #[arg(long)]
        guardian: Option<String>,
        /// The channel it was given through.
        #[arg(long, default_value = "cli")]
        channel: String,
        #[arg(long)]
        json: bool,
    },
    /// Merge a subject into another (two identifiers found to be one person).
    Merge {
        #[command(flatten)]
        store: StoreArgs,
        subject: String,
        #[arg(long)]
        into: String,
        #[arg(long)]
        json: bool,
    },
    /// Export everything held about a subject (JSON, with an HTML timeline inside).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        subject: String,
        /// Write the bundle here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// (The bundle is JSON either way.)
        #[arg(long)]
        json: bool,
    },
    /// Erase a subject: destroy their keys, so nothing of theirs can be read again.
    Erase {
        #[command(flatten)]
        store: StoreArgs,
        subject: String,
        #[arg(long, default_value = "erased at the person's request")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

impl SubjectsCommand {
    fn store(&self) -> &StoreArgs {
        match self {
            SubjectsCommand::List { store, .. }
            | SubjectsCommand::Show { store, .. }
            | SubjectsCommand::Register { store, .. }
            | SubjectsCommand::Consent { store, .. }
            | SubjectsCommand::Merge { store, .. }
            | SubjectsCommand::Export { store, .. }
            | SubjectsCommand::Erase { store, .. } => store,
        }
    }
}

pub async fn subjects(command: SubjectsCommand) -> anyhow::Result<()> {
    let private = open(command.store(), Migrate::Require).await?;
    let result = subjects_on(&private, command).await;
    private.store.close().await;
    result
}

fn operator() -> String {
    format!(
        "user:{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into())
    )
}

/// A subject named by its id or by one of its identifiers.
async fn subject_id(private: &Private, text: &str) -> anyhow::Result<String> {
    if !text.contains(':') {
        return Ok(text.to_owned());
    }
    let identifier = Identifier::parse(text)?;
    private
        .subjects
        .find(&identifier)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no subject is known by {identifier}"))
}

/// The subjects index, brought up to date.
async fn index(private: &Private) -> anyhow::Result<ProjectionRunner> {
    let runner = ProjectionRunner::new(&private.store, stele_projections::all());
    runner.setup().await?;
    catch_up(
        &runner,
        private.store.log.as_ref(),
        "subjects",
        Duration::from_secs(30),
    )
    .await?;
    Ok(runner)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn subjects_on(private: &Private, command: SubjectsCommand) -> anyhow::Result<()> {
    let subjects = &private.subjects;
    let meta = || CommandMeta::new(operator(), "cli");
    match command {
        SubjectsCommand::List {
            after, limit, json, ..
        } => {
            let runner = index(private).await?;
            runner.release_all().await?;
            let rows =
                stele_privacy::index::list_subjects(&private.store.pool, after.as_deref(), limit)
                    .await?;
            for row in rows {
                if json {
                    print_json(&row)?;
                } else {
                    println!(
                        "{:<36}  {:<8}  last seen {}{}",
                        row.subject_id,
                        if row.minor { "minor" } else { "" },
                        row.last_seen_at.to_rfc3339(),
                        match (&row.erased_at, &row.merged_into) {
                            (Some(at), _) => format!("  erased {}", at.to_rfc3339()),
                            (None, Some(into)) => format!("  merged into {into}"),
                            _ => String::new(),
                        }
                    );
                }
            }
            Ok(())
        }
        SubjectsCommand::Show { subject, json, .. } => {
            let id = subject_id(private, &subject).await?;
            let state = subjects
                .get(&id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no subject {id}"))?;
            let view = stele_api::routes::subjects::subject_body(&id, &state);
            if json {
                print_json(&view)?;
            } else {
                println!("subject      {}", view.id);
                println!("identifiers  {}", view.identifiers.join(", "));
                println!("minor        {}", view.minor);
                for consent in &view.consents {
                    println!(
                        "consent      {:<12} {:<9} by {} via {} at {}",
                        consent.purpose,
                        if consent.given { "given" } else { "withdrawn" },
                        consent.guardian.as_deref().unwrap_or("the subject"),
                        consent.channel,
                        consent.at.to_rfc3339()
                    );
                }
                if let Some(into) = &view.merged_into {
                    println!("merged into  {into}");
                }
                if let Some(erased) = &view.erased {
                    println!(
                        "erased       {} by {} ({})",
                        erased.at.to_rfc3339(),
                        erased.by,
                        erased.reason
                    );
                }
            }
            Ok(())
        }
        SubjectsCommand::Register {
            identifiers,
            minor,
            json,
            ..
        } => {
            let identifiers = identifiers
                .iter()
                .map(|i| Identifier::parse(i))
                .collect::<Result<Vec<_>, _>>()?;
            let id = subjects.register(&identifiers, minor, meta()).await?;
            if json {
                print_json(&serde_json::json!({ "id": id }))?;
            } else {
                println!("{id}");
            }
            Ok(())
        }
        SubjectsCommand::Consent {
            subject,
            purpose,
            withdraw,
            guardian,
            channel,
            json,
            ..
        } => {
            let id = subject_id(private, &subject).await?;
            let purpose = Purpose::parse(&purpose)?;
            let channel = Channel::parse(&channel)?;
            subjects
                .consent(&id, purpose.clone(), !withdraw, guardian, channel, meta())
                .await?;
            let what = if withdraw { "withdrawn" } else { "given" };
            if json {
                print_json(&serde_json::json!({
                    "id": id, "purpose": purpose.as_str(), "given": !withdraw
                }))?;
            } else {
                println!("consent to {} {what} for {id}", purpose.as_str());
            }
            Ok(())
        }
        SubjectsCommand::Merge {
            subject,
            into,
            json,
            ..
        } => {
            let from = subject_id(private, &subject).await?;
            let into = subject_id(private, &into).await?;
            subjects.merge(&from, &into, meta()).await?;
            if json {
                print_json(&serde_json::json!({ "merged": from, "into": into }))?;
            } else {
                println!("{from} merged into {into}");
            }
            Ok(())
        }
        SubjectsCommand::Export {
            store,
            subject,
            out,
            ..
        } => {
            let id = subject_id(private, &subject).await?;
            let runner = index(private).await?;
            runner.release_all().await?;
            let head = private.store.log.head().await?;
            let mut bundle = subjects
                .export(private.store.log.as_ref(), &id, head, &operator(), meta())
                .await?;
            let positions: Vec<_> = bundle.events.iter().map(|e| e.position).collect();
            let attestation = crate::audit::attest_now(&private.store, &store, &positions).await?;
            bundle.audit = attestation.map(serde_json::to_value).transpose()?;
            let text = serde_json::to_string_pretty(&bundle)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "exported {} events of {id} to {}",
                        bundle.events.len(),
                        path.display()
                    );
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "{text}")?;
                }
            }
            Ok(())
        }
        SubjectsCommand::Erase {
            subject,
            reason,
            json,
            store,
        } => {
            let id = subject_id(private, &subject).await?;
            let runner = index(private).await?;
            runner.release_all().await?;
            let runtime = WorkflowArgs::default()
                .runtime_with(&private.store, Some(private.subjects.clone()))
                .await?;
            let _ = store;
            let erasure = runtime
                .erase_subject(&id, &operator(), &reason, meta())
                .await?;
            if json {
                print_json(&erasure)?;
            } else {
                println!(
                    "{id} erased: {} key(s) destroyed at {}",
                    erasure.keys.len(),
                    erasure.at.to_rfc3339()
                );
            }
            Ok(())
        }
    }
}
