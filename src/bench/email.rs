//! `stele bench email`: the email channel end to end against a real IMAP and SMTP server — a
//! `stele serve` node (a separate process, on a scratch PostgreSQL database, scripted model)
//! reading a mailbox.
//!
//! - **Ingest**: the mailbox is filled with threads (five mails each, `References` set) before
//!   the node starts; measured from the node's start to its cursor (the `Mailbox` aggregate)
//!   passing the last mail. The mails are marked `Precedence: bulk`, as a mailbox's backlog
//!   being imported would be answered by no one: the figure is reading, parsing, threading and
//!   recording.
//! - **Latency**: questions sent over SMTP one at a time by a person; from each submission to
//!   its answer being visible in that person's mailbox over IMAP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::Serialize;
use stele_aggregates::mailbox::Mailbox;
use stele_engine::store::{Migrate, Store};
use stele_engine::CommandBus;

use super::{Latency, Machine, Scratch};

#[derive(Args)]
pub struct EmailBenchArgs {
    /// PostgreSQL server to benchmark on (a scratch database is created there).
    #[arg(long, env = "STELE_DATABASE_URL")]
    database_url: String,
    /// The mailbox the node reads (empty, or holding only mail of earlier runs):
    /// `imaps://user:password@host:port/INBOX`.
    #[arg(long)]
    mailbox: String,
    /// A person's mailbox, where the answers arrive: `imaps://user:password@host:port/INBOX`.
    #[arg(long)]
    person: String,
    /// The SMTP server questions are submitted to and answers sent through:
    /// `smtp://host:port` (STARTTLS) or `smtps://…`; the mailbox's credentials are used.
    #[arg(long)]
    smtp: String,
    /// The mail domain of both users (`user@domain`).
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// An extra CA certificate (PEM) to trust.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Mails in the mailbox for the ingest phase.
    #[arg(long, default_value_t = 5000)]
    mails: usize,
    /// Questions in the latency phase.
    #[arg(long, default_value_t = 40)]
    questions: usize,
}

#[derive(Serialize)]
pub struct Report {
    scenario: &'static str,
    date: String,
    machine: Machine,
    ingest: Ingest,
    answer: Answer,
}

#[derive(Serialize)]
struct Ingest {
    mails: usize,
    threads: usize,
    seconds: f64,
    mails_per_sec: f64,
    goal_per_sec: f64,
}

#[derive(Serialize)]
struct Answer {
    questions: usize,
    answered: usize,
    /// From the SMTP submission to the answer visible over IMAP.
    latency: Latency,
    goal_p95_ms: f64,
}

struct Account {
    url: url::Url,
    user: String,
    password: String,
    folder: String,
}

impl Account {
    fn parse(text: &str) -> anyhow::Result<Account> {
        let url = url::Url::parse(text).map_err(|e| anyhow::anyhow!("{text}: {e}"))?;
        anyhow::ensure!(url.scheme() == "imaps", "{text}: an imaps:// URL is needed");
        let folder = url.path().trim_start_matches('/').to_owned();
        Ok(Account {
            user: url.username().to_owned(),
            password: url.password().unwrap_or("").to_owned(),
            folder: if folder.is_empty() {
                "INBOX".into()
            } else {
                folder
            },
            url,
        })
    }

    async fn session(
        &self,
        tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> anyhow::Result<async_imap::Session<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>
    {
        let host = self.url.host_str().unwrap_or("localhost").to_owned();
        let tcp =
            tokio::net::TcpStream::connect((host.as_str(), self.url.port().unwrap_or(993))).await?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host)?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await?;
        let mut client = async_imap::Client::new(tls);
        client.read_response().await?;
        let mut session = client
            .login(&self.user, &self.password)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("login as {}: {e}", self.user))?;
        session.select(&self.folder).await?;
        Ok(session)
    }
}

pub async fn run(args: EmailBenchArgs) -> anyhow::Result<Report> {
    let mailbox = Account::parse(&args.mailbox)?;
    let person = Account::parse(&args.person)?;
    let tls = Arc::new(stele_channels::email::tls_config(args.ca_file.as_deref())?);
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let threads = args.mails.div_ceil(5);

    // The backlog, put straight into the folder.
    let mut session = mailbox.session(&tls).await?;
    let from = format!("{}@{}", person.user, args.domain);
    for n in 0..args.mails {
        let thread = n % threads;
        let place = n / threads;
        let id = |p: usize| format!("<bench-{run_id}-{thread}-{p}@{}>", args.domain);
        let references: Vec<String> = (0..place).map(id).collect();
        let mut raw = format!(
            "From: Person {thread} <{from}>\r\nTo: {}@{}\r\nSubject: Thread {thread}\r\n\
             Message-ID: {}\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\nPrecedence: bulk\r\n",
            mailbox.user,
            args.domain,
            id(place)
        );
        if let Some(parent) = references.last() {
            raw.push_str(&format!(
                "In-Reply-To: {parent}\r\nReferences: {}\r\n",
                references.join(" ")
            ));
        }
        raw.push_str(&format!(
            "\r\nMessage {place} of thread {thread}: some words to read.\r\n"
        ));
        session
            .append(&mailbox.folder, None, None, raw.as_bytes())
            .await?;
    }
    let last_uid = {
        let uids = session.uid_search("ALL").await?;
        uids.into_iter().max().unwrap_or(0)
    };
    let _ = session.logout().await;

    let scratch = Scratch::postgres(&args.database_url).await?;
    let result = measure(&args, &mailbox, &person, &tls, &scratch, last_uid, threads).await;
    scratch.remove().await;
    result
}

async fn measure(
    args: &EmailBenchArgs,
    mailbox: &Account,
    person: &Account,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    scratch: &Scratch,
    last_uid: u32,
    threads: usize,
) -> anyhow::Result<Report> {
    let url = scratch.url().expect("PostgreSQL");
    let kek: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let audit = stele_audit::SigningKey::generate("bench.stele/email")?;
    let smtp = url::Url::parse(&args.smtp)?;
    let smtp_url = format!(
        "{}://{}:{}@{}:{}",
        smtp.scheme(),
        mailbox.user,
        mailbox.password,
        smtp.host_str().unwrap_or("localhost"),
        smtp.port().unwrap_or(587)
    );
    // The per-sender cap would stop one person's forty questions: lifted for the benchmark.
    let dir = std::env::temp_dir().join(format!("stele-bench-email-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("stele.toml");
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_default();
    let mut mailbox_config = format!(
        "[[email.mailboxes]]\nimap_url = {}\nsmtp_url = {}\nfrom = {}\n\
         replies_per_sender_per_hour = 100000\n",
        quote(mailbox.url.as_str()),
        quote(&smtp_url),
        quote(&format!("Bench <{}@{}>", mailbox.user, args.domain)),
    );
    if let Some(ca) = &args.ca_file {
        mailbox_config.push_str(&format!("ca_file = {}\n", quote(&ca.display().to_string())));
    }
    std::fs::write(&config, mailbox_config)?;
    let mut node = tokio::process::Command::new(std::env::current_exe()?);
    node.args(["serve", "--database-url", url])
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("STELE_KEK", kek)
        .env("STELE_AUDIT_KEY", audit.private_text())
        .env_remove("STELE_EMBEDDING_MODEL")
        .env_remove("STELE_TELEGRAM_TOKEN")
        .env_remove("STELE_EMAIL_IMAP_URL")
        .env_remove("STELE_EMAIL_SMTP_URL")
        .env_remove("STELE_EMAIL_FROM")
        .env("STELE_LOG", "warn")
        .kill_on_drop(true);
    let started = Instant::now();
    let mut node = node.spawn()?;
    let result = phases(args, mailbox, person, tls, url, last_uid, threads, started).await;
    let _ = node.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[allow(clippy::too_many_arguments)]
async fn phases(
    args: &EmailBenchArgs,
    mailbox: &Account,
    person: &Account,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    url: &str,
    last_uid: u32,
    threads: usize,
    started: Instant,
) -> anyhow::Result<Report> {
    // Ingest: until the cursor passes the last mail.
    let store = loop {
        match Store::open(
            stele_engine::store::StoreLocation::Postgres(url.to_owned()),
            Migrate::Require,
        )
        .await
        {
            Ok(store) => break store,
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    let cursors: CommandBus<Mailbox> = CommandBus::new(store.log.clone(), ());
    let name = mailbox.user.to_lowercase();
    loop {
        let (cursor, _) = cursors.load(&name).await?;
        if cursor.last_uid >= last_uid {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the mailbox was not read within 30 minutes (cursor at {} of {last_uid})",
            cursor.last_uid
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    store.close().await;

    // Latency: one question at a time, its answer watched for in the person's mailbox.
    let smtp = url::Url::parse(&args.smtp)?;
    let host = smtp.host_str().unwrap_or("localhost").to_owned();
    let mut tls_params = lettre::transport::smtp::client::TlsParameters::builder(host.clone());
    if let Some(ca) = &args.ca_file {
        tls_params = tls_params.add_root_certificate(
            lettre::transport::smtp::client::Certificate::from_pem(&std::fs::read(ca)?)?,
        );
    }
    let tls_params = tls_params.build_rustls()?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(smtp.port().unwrap_or(587))
        .tls(match smtp.scheme() {
            "smtps" => lettre::transport::smtp::client::Tls::Wrapper(tls_params),
            _ => lettre::transport::smtp::client::Tls::Required(tls_params),
        })
        .credentials(lettre::transport::smtp::authentication::Credentials::new(
            person.user.clone(),
            person.password.clone(),
        ))
        .build();
    let mut watch = person.session(tls).await?;
    let mut samples = Vec::new();
    for n in 0..args.questions {
        let id = format!("<q-{}-{n}@{}>", uuid::Uuid::now_v7().simple(), args.domain);
        let question = lettre::Message::builder()
            .from(format!("{}@{}", person.user, args.domain).parse()?)
            .to(format!("{}@{}", mailbox.user, args.domain).parse()?)
            .subject(format!("Question {n}"))
            .message_id(Some(id.clone()))
            .body(format!("What about question {n}?"))?;
        let sent = Instant::now();
        transport.send(question).await?;
        let deadline = sent + Duration::from_secs(60);
        loop {
            let found = watch
                .uid_search(format!("HEADER In-Reply-To \"{id}\""))
                .await?;
            if !found.is_empty() {
                samples.push(sent.elapsed());
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            // NOOP brings the folder's news.
            watch.noop().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = watch.logout().await;
    Ok(Report {
        scenario: "email",
        date: chrono::Utc::now().to_rfc3339(),
        machine: Machine::this(),
        ingest: Ingest {
            mails: args.mails,
            threads,
            seconds: ingest_seconds,
            mails_per_sec: args.mails as f64 / ingest_seconds,
            goal_per_sec: 200.0,
        },
        answer: Answer {
            questions: args.questions,
            answered: samples.len(),
            latency: Latency::of(samples),
            goal_p95_ms: 3000.0,
        },
    })
}
