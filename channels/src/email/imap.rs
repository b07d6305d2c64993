//! Mail in: one reader per mailbox (under a hold, so one node reads it), which fetches what is
//! new since the recorded cursor, records each mail in its thread's conversation, tells the
//! server (`\Seen` or a move), then records the cursor; and waits with IDLE (renewed every
//! `idle_timeout`), or polls where the server has no IDLE. Errors reconnect with backoff.
//!
//! A crash at any point re-reads mail rather than skipping it: the cursor moves only after the
//! mail before it is recorded, and recording a mail again is a no-op (its Message-ID is seen in
//! its conversation; the thread it goes to is found the same way again).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use stele_aggregates::conversation::{
    Attachment, Channel, ConversationCommand, ConversationError, ConversationStatus, Participant,
};
use stele_aggregates::mailbox::MailboxCommand;
use stele_aggregates::subject::Identifier;
use stele_engine::projection::Hold;
use stele_engine::{CommandError, CommandMeta};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;
use uuid::Uuid;

use super::parse::{self, own_parts, Mail};
use super::{Configured, Email, AGENT};

/// Names the commands a mail leads to, so reading it again repeats the same ids.
const MAIL_NAMESPACE: Uuid = Uuid::from_u128(0x0b7e_51a2_6c3d_4f8e_a1b2_c3d4_e5f6_0718);

/// How long a reader waits before trying again after an error, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Mails fetched per round trip.
const BATCH: usize = 100;

/// Threads recorded at once.
const THREADS_AT_ONCE: usize = 16;

type Session = async_imap::Session<TlsStream<TcpStream>>;

impl Email {
    /// Reads every mailbox until `stopped`.
    pub async fn receive(
        self: &Arc<Self>,
        stopped: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (stop, watch) = tokio::sync::watch::channel(false);
        let mut readers = tokio::task::JoinSet::new();
        for mailbox in self.boxes.values() {
            let (email, mailbox, mut watch) = (self.clone(), mailbox.clone(), watch.clone());
            readers.spawn(async move {
                let stopped = async move {
                    let _ = watch.wait_for(|stop| *stop).await;
                };
                email.read(&mailbox, stopped).await
            });
        }
        stopped.await;
        let _ = stop.send(true);
        while let Some(done) = readers.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Reads one mailbox until `stopped`, while this process holds its hold.
    async fn read(
        &self,
        mailbox: &Configured,
        stopped: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let owner = format!("reader-{}", Uuid::now_v7().simple());
        let name = format!("email-reader:{}", mailbox.config.name);
        let hold = Hold::new(&self.pool, &name, &owner, Duration::from_secs(60)).await?;
        tokio::pin!(stopped);
        let mut backoff = Duration::from_millis(500);
        // The session, and whether its server offers IDLE.
        let mut session: Option<(Session, bool)> = None;
        loop {
            let step = async {
                match hold.acquire().await {
                    Ok(true) => {}
                    Ok(false) => {
                        session = None;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        return Ok(());
                    }
                    Err(e) => anyhow::bail!("taking the mailbox's hold: {e}"),
                }
                let (mut current, idle) = match session.take() {
                    Some(current) => current,
                    None => self.connect(mailbox).await?,
                };
                self.sync(mailbox, &mut current).await?;
                session = Some((self.wait(mailbox, current, idle).await?, idle));
                Ok(())
            };
            tokio::select! {
                _ = &mut stopped => break,
                result = step => match result {
                    Ok(()) => backoff = Duration::from_millis(500),
                    Err(e) => {
                        session = None;
                        tracing::warn!(mailbox = %mailbox.config.name, error = %format!("{e:#}"), retry_in = ?backoff, "reading mail failed");
                        tokio::select! {
                            _ = &mut stopped => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        if let Some((mut session, _)) = session {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
        }
        if let Err(e) = hold.release().await {
            tracing::warn!(error = %e, "giving the mailbox's hold up failed");
        }
        Ok(())
    }

    /// Logs in over TLS (IMAPS, or STARTTLS on a plain connection) and selects the folder; the
    /// session, and whether the server offers IDLE.
    async fn connect(&self, mailbox: &Configured) -> anyhow::Result<(Session, bool)> {
        let target = &mailbox.imap;
        let tcp = tokio::time::timeout(
            Duration::from_secs(30),
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("connecting to {}:{} timed out", target.host, target.port)
        })??;
        let connector = tokio_rustls::TlsConnector::from(mailbox.tls.clone());
        let server_name =
            tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| anyhow::anyhow!("the IMAP host {:?}: {e}", target.host))?;
        let tls = if target.tls {
            let tls = connector.connect(server_name, tcp).await?;
            let mut client = async_imap::Client::new(tls);
            client
                .read_response()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the IMAP server closed before its greeting"))?;
            client
        } else {
            let mut client = async_imap::Client::new(tcp);
            client
                .read_response()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the IMAP server closed before its greeting"))?;
            client.run_command_and_check_ok("STARTTLS", None).await?;
            let tcp = client.into_inner();
            async_imap::Client::new(connector.connect(server_name, tcp).await?)
        };
        let mut session = tls
            .login(&target.user, &target.password)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("IMAP login as {}: {e}", target.user))?;
        if let (super::AfterRecording::Move, Some(folder)) =
            (&mailbox.config.after, mailbox.config.move_to.as_deref())
        {
            // The folder recorded mail moves to; "already exists" is the usual answer.
            let _ = session.create(folder).await;
        }
        session.select(&target.folder).await?;
        let idle = session.capabilities().await?.has_str("IDLE");
        if !idle {
            tracing::info!(
                mailbox = %mailbox.config.name,
                every = ?mailbox.config.poll_interval,
                "the IMAP server has no IDLE: polling"
            );
        }
        Ok((session, idle))
    }

    /// Records what is new since the cursor.
    async fn sync(&self, mailbox: &Configured, session: &mut Session) -> anyhow::Result<()> {
        let selected = session.select(&mailbox.imap.folder).await?;
        let validity = selected
            .uid_validity
            .ok_or_else(|| anyhow::anyhow!("the server gave the folder no UIDVALIDITY"))?;
        let stream = mailbox.config.name.as_str();
        // Each command its own id (a repeated id is taken for a retry and records nothing).
        let meta = || CommandMeta::new("email", "system");
        let (mut cursor, _) = self.cursors.load(stream).await?;
        if cursor.uid_validity != Some(validity) {
            if let Some(old) = cursor.uid_validity {
                tracing::warn!(mailbox = %stream, old, new = validity, "the folder's UIDVALIDITY changed: reading it again from the start");
            }
            self.cursors
                .execute(
                    stream,
                    MailboxCommand::Validate {
                        uid_validity: validity,
                    },
                    meta(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            cursor = self.cursors.load(stream).await?.0;
        }
        loop {
            let uids: Vec<u32> = {
                let found = session
                    .uid_search(format!("UID {}:*", cursor.last_uid + 1))
                    .await?;
                let mut uids: Vec<u32> = found
                    .into_iter()
                    .filter(|uid| *uid > cursor.last_uid)
                    .collect();
                uids.sort_unstable();
                uids.truncate(BATCH);
                uids
            };
            if uids.is_empty() {
                return Ok(());
            }
            let set = uids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let fetched: Vec<_> = session
                .uid_fetch(&set, "(UID BODY.PEEK[])")
                .await?
                .try_collect()
                .await?;
            let mut mails: Vec<(u32, Vec<u8>)> = fetched
                .iter()
                .filter_map(|f| Some((f.uid?, f.body().unwrap_or_default().to_vec())))
                .collect();
            mails.sort_by_key(|(uid, _)| *uid);
            // Threads are recorded concurrently, each thread's mails in order. (Two groups that
            // turn out to be one thread only race for its stream, which the command bus
            // retries.)
            let mut threads: BTreeMap<String, Vec<(u32, Vec<u8>)>> = BTreeMap::new();
            for (uid, raw) in mails {
                threads
                    .entry(thread_key(&raw))
                    .or_default()
                    .push((uid, raw));
            }
            let results: Vec<anyhow::Result<()>> = futures::stream::iter(threads.into_values())
                .map(|mails| async move {
                    for (uid, raw) in &mails {
                        // The root of the trace of what the mail causes.
                        let span = tracing::info_span!(
                            "email.receive",
                            otel.name = "email receive",
                            otel.kind = "consumer",
                            email.mailbox = %mailbox.config.name,
                            imap.uid = uid,
                        );
                        self.record(mailbox, *uid, raw).instrument(span).await?;
                    }
                    Ok(())
                })
                .buffer_unordered(THREADS_AT_ONCE)
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<()>>()?;
            let last = *uids.last().unwrap_or(&cursor.last_uid);
            match (&mailbox.config.after, mailbox.config.move_to.as_deref()) {
                (super::AfterRecording::Seen, _) => {
                    let _: Vec<_> = session
                        .uid_store(&set, "+FLAGS (\\Seen)")
                        .await?
                        .try_collect()
                        .await?;
                }
                (super::AfterRecording::Move, Some(folder)) => {
                    session.uid_mv(&set, folder).await?;
                }
                _ => {}
            }
            self.cursors
                .execute(
                    stream,
                    MailboxCommand::Advance {
                        uid_validity: validity,
                        last_uid: last,
                    },
                    meta(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            cursor.last_uid = last;
        }
    }

    /// Waits for news: IDLE for up to `idle_timeout` where the server has it, else a poll
    /// interval. Returns the session for the next round.
    async fn wait(
        &self,
        mailbox: &Configured,
        session: Session,
        idle: bool,
    ) -> anyhow::Result<Session> {
        if !idle {
            tokio::time::sleep(mailbox.config.poll_interval).await;
            return Ok(session);
        }
        let mut idle = session.idle();
        idle.init().await?;
        let (wait, _interrupt) = idle.wait_with_timeout(mailbox.config.idle_timeout);
        match wait.await? {
            IdleResponse::NewData(_) | IdleResponse::Timeout | IdleResponse::ManualInterrupt => {}
        }
        Ok(idle.done().await?)
    }

    /// Records one mail as the reader of mailbox `name` would (for imports and benchmarks).
    pub async fn record_raw(&self, name: &str, raw: &[u8]) -> anyhow::Result<()> {
        let mailbox = self
            .boxes
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no mailbox {name:?}"))?
            .clone();
        self.record(&mailbox, 0, raw).await
    }

    /// Records one mail: a bounce on the reply it reports, spam and unreadable mail in
    /// quarantine, anything else as a message of its thread.
    async fn record(&self, mailbox: &Configured, uid: u32, raw: &[u8]) -> anyhow::Result<()> {
        let name = &mailbox.config.name;
        let key = |message_id: &str| format!("{name}:{}", message_id.to_lowercase());
        let meta = |message_id: &str, what: &str| {
            CommandMeta::new("email", "system").with_command_id(Uuid::new_v5(
                &MAIL_NAMESPACE,
                format!("{}:{what}", key(message_id)).as_bytes(),
            ))
        };
        let mail = match parse::parse(raw, &self.own) {
            Ok(mail) => mail,
            Err(malformed) => {
                let id = malformed
                    .message_id
                    .clone()
                    .unwrap_or_else(|| format!("<{}@unreadable.stele>", parse::digest(raw, 32)));
                let conversation = Self::conversation_id(name, &Self::token_of(&id));
                let subject = self
                    .subject_of(malformed.from.as_deref(), &id, &meta(&id, "subject"))
                    .await?;
                tracing::info!(mailbox = %name, uid, reason = %malformed.reason, "a mail quarantined");
                return self
                    .quarantine(
                        &conversation,
                        raw,
                        &subject,
                        &malformed.reason,
                        &id,
                        meta(&id, "quarantine"),
                    )
                    .await;
            }
        };
        let id = mail.message_id.clone();
        let sender = self
            .subject_of(Some(&mail.from), &id, &meta(&id, "subject"))
            .await?;
        if let Some(report) = &mail.report {
            if self
                .record_bounce(mailbox, &mail, report, &sender, &meta)
                .await?
            {
                return Ok(());
            }
        }
        let conversation = self.thread_of(mailbox, &mail).await?;
        let score = self.spam_score(mailbox, &mail, raw).await;
        if score >= mailbox.config.spam_threshold && mail.automated.is_none() {
            let reason = format!(
                "spam: score {score:.1} is at or above the threshold {:.1}",
                mailbox.config.spam_threshold
            );
            return self
                .quarantine(
                    &conversation,
                    raw,
                    &sender,
                    &reason,
                    &id,
                    meta(&id, "quarantine"),
                )
                .await;
        }
        self.record_message(&conversation, &mail, &sender, raw, &meta)
            .await
    }

    async fn record_message(
        &self,
        conversation: &str,
        mail: &Mail,
        sender: &str,
        raw: &[u8],
        meta: &impl Fn(&str, &str) -> CommandMeta,
    ) -> anyhow::Result<()> {
        let id = &mail.message_id;
        let open = ConversationCommand::Open {
            channel: Channel::EMAIL,
            external_id: id.clone(),
            subject: mail.subject.clone(),
            address: None,
            owner: Some(sender.to_owned()),
            participants: vec![Participant::agent(AGENT)],
        };
        // The raw mail and its files are kept sealed with the sender's key; the message refers
        // to them by digest.
        let mut attachments = mail.attachments.clone();
        for (attachment, bytes) in attachments.iter_mut().zip(&mail.files) {
            attachment.digest = self.keep(sender, bytes, &attachment.content_type).await?;
            attachment.not_kept = attachment.digest.is_none().then(over_the_limit);
        }
        if !raw.is_empty() {
            let digest = self.keep(sender, raw, "message/rfc822").await?;
            attachments.push(Attachment {
                name: "original.eml".into(),
                content_type: "message/rfc822".into(),
                size: raw.len() as u64,
                not_kept: digest.is_none().then(over_the_limit),
                digest,
            });
        }
        let receive = ConversationCommand::ReceiveMessage {
            message_id: format!("mail-{}", parse::digest(id.to_lowercase().as_bytes(), 24)),
            external_id: id.clone(),
            from: Participant::subject(
                sender,
                sender,
                mail.from_name.clone(),
                Some(mail.reply_to.clone()),
            ),
            text: mail.text.clone(),
            attachments,
            in_reply_to: mail.in_reply_to.clone(),
            sent_at: mail.sent_at,
            no_reply: mail.automated.clone(),
        };
        match crate::conversation::opened(
            &self.conversations,
            conversation,
            receive,
            &open,
            meta(id, "receive"),
            meta(id, "open"),
        )
        .await
        {
            Ok(()) => Ok(()),
            // Refused for its content (empty, too long): kept aside, never dropped.
            Err(CommandError::Rejected(refused)) => {
                let reason = refused.to_string();
                self.quarantine(
                    conversation,
                    raw,
                    sender,
                    &reason,
                    id,
                    meta(id, "quarantine"),
                )
                .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A delivery report about one of our replies: recorded in that reply's conversation (as a
    /// message no one answers) and marked on the reply. `false` when it names none of ours.
    async fn record_bounce(
        &self,
        mailbox: &Configured,
        mail: &Mail,
        report: &parse::Report,
        sender: &str,
        meta: &impl Fn(&str, &str) -> CommandMeta,
    ) -> anyhow::Result<bool> {
        let Some((token, reply)) = report.original_ids.iter().find_map(|id| own_parts(id)) else {
            return Ok(false);
        };
        let conversation = Self::conversation_id(&mailbox.config.name, token);
        let (state, _) = self.conversations.load(&conversation).await?;
        let Some(ours) = state.message(reply) else {
            return Ok(false);
        };
        let reply = ours.message_id.clone();
        self.record_message(&conversation, mail, sender, b"", meta)
            .await?;
        if report.action != "failed" {
            return Ok(true);
        }
        let bounced = ConversationCommand::MarkBounced {
            message_id: reply,
            recipient: report.recipient.clone(),
            status: report.status.clone(),
            diagnostic: parse::redact_addresses(&report.diagnostic),
        };
        match self
            .conversations
            .execute(&conversation, bounced, meta(&mail.message_id, "bounce"))
            .await
        {
            Ok(_) | Err(CommandError::Rejected(ConversationError::NotAReply { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(mailbox = %mailbox.config.name, status = %report.status, "a reply bounced");
        Ok(true)
    }

    /// The conversation a mail belongs to: the one it started (read again), the thread of the
    /// first message it names that one is known for, the `[#token]` in its subject, else a new
    /// one of its own.
    async fn thread_of(&self, mailbox: &Configured, mail: &Mail) -> anyhow::Result<String> {
        let name = &mailbox.config.name;
        let own = Self::conversation_id(name, &Self::token_of(&mail.message_id));
        if self.exists(&own).await? {
            return Ok(own);
        }
        for id in &mail.references {
            let candidate = match own_parts(id) {
                Some((token, _)) => Self::conversation_id(name, token),
                None => Self::conversation_id(name, &Self::token_of(id)),
            };
            if self.exists(&candidate).await? {
                return Ok(candidate);
            }
        }
        if let Some(token) = mail.subject.as_deref().and_then(subject_token) {
            let candidate = Self::conversation_id(name, token);
            if self.exists(&candidate).await? {
                return Ok(candidate);
            }
        }
        Ok(own)
    }

    /// A mail's spam score: rspamd's, else spamd's, where configured and answering; else the
    /// one read from the mail (the receiving server's headers, or the built-in guess).
    async fn spam_score(&self, mailbox: &Configured, mail: &Mail, raw: &[u8]) -> f64 {
        if let Some(url) = &mailbox.config.rspamd_url {
            match rspamd_score(&self.http, url, raw).await {
                Ok(score) => return score,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "rspamd did not answer: the next source is used")
                }
            }
        }
        if let Some(addr) = &mailbox.config.spamd_addr {
            match spamd_score(addr, raw).await {
                Ok(score) => return score,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "spamd did not answer: the mail's own score is used")
                }
            }
        }
        mail.spam_score
    }

    async fn exists(&self, conversation: &str) -> anyhow::Result<bool> {
        let (state, _) = self.conversations.load(conversation).await?;
        Ok(state.status != ConversationStatus::New)
    }

    /// Keeps a file of `subject`'s; its digest, or none when it is over the size limit (the
    /// message still records its name, type and size).
    async fn keep(
        &self,
        subject: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> anyhow::Result<Option<String>> {
        if bytes.len() > stele_privacy::blobs::MAX_BLOB_BYTES {
            tracing::info!(size = bytes.len(), "a file over the size limit is not kept");
            return Ok(None);
        }
        Ok(Some(
            self.subjects
                .blobs()
                .put(subject, bytes, content_type)
                .await?,
        ))
    }

    async fn quarantine(
        &self,
        conversation: &str,
        raw: &[u8],
        subject: &str,
        reason: &str,
        message_id: &str,
        meta: CommandMeta,
    ) -> anyhow::Result<()> {
        // Text as it came; bytes that are not UTF-8, in base64, so none is lost.
        let raw = match std::str::from_utf8(raw) {
            Ok(text) => text.to_owned(),
            Err(_) => format!(
                "base64:{}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw)
            ),
        };
        let command = ConversationCommand::Quarantine {
            raw,
            subject: Some(subject.to_owned()),
            reason: reason.to_owned(),
            external_id: Some(message_id.to_owned()),
        };
        self.conversations
            .execute(conversation, command, meta)
            .await?;
        Ok(())
    }

    /// The subject a sender is (a new one on first contact); for mail with no readable sender,
    /// one made for that mail, so its raw form is a person's data that can be erased.
    async fn subject_of(
        &self,
        address: Option<&str>,
        message_id: &str,
        meta: &CommandMeta,
    ) -> anyhow::Result<String> {
        let identifier = match address {
            Some(address) => format!("email:{address}"),
            None => format!("api:email-{}", parse::digest(message_id.as_bytes(), 24)),
        };
        let identifier = match Identifier::parse(&identifier) {
            Ok(identifier) => identifier,
            Err(_) => Identifier::parse(&format!(
                "api:email-{}",
                parse::digest(message_id.as_bytes(), 24)
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        };
        Ok(self.subjects.resolve(&identifier, meta).await?)
    }
}

/// What groups a mail with the others of its thread within a batch: the first id it refers to
/// (the thread's first mail, for clients that keep `References`), else its own.
fn thread_key(raw: &[u8]) -> String {
    match parse::parse(raw, &parse::Own::default()) {
        Ok(mail) => mail
            .references
            .first()
            .cloned()
            .unwrap_or(mail.message_id)
            .to_lowercase(),
        Err(_) => String::new(),
    }
}

/// rspamd's score of a mail (its `/checkv2` endpoint).
pub async fn rspamd_score(http: &reqwest::Client, url: &str, raw: &[u8]) -> anyhow::Result<f64> {
    #[derive(serde::Deserialize)]
    struct Answer {
        score: f64,
    }
    let answer: Answer = http
        .post(format!("{}/checkv2", url.trim_end_matches('/')))
        .body(raw.to_vec())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer.score)
}

/// SpamAssassin's score of a mail, asked of `spamd` at `addr` with its `CHECK` command.
///
/// Written here: no maintained crate speaks the spamc protocol, and a check is one request (a
/// command line, `Content-length`, the mail) and one `Spam: <bool> ; <score> / <threshold>`
/// header back.
pub async fn spamd_score(addr: &str, raw: &[u8]) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!("CHECK SPAMC/1.5\r\nContent-length: {}\r\n\r\n", raw.len());
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(raw).await?;
        stream.shutdown().await?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("spamd at {addr} took over 30 s"))??;
    let answer = String::from_utf8_lossy(&answer);
    let mut lines = answer.lines();
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("SPAMD/") || !status.contains(" 0 ") {
        anyhow::bail!("spamd answered {status:?}");
    }
    lines
        .find_map(|line| {
            let value = line.strip_prefix("Spam:")?;
            let (_, scores) = value.split_once(';')?;
            scores.split('/').next()?.trim().parse::<f64>().ok()
        })
        .ok_or_else(|| anyhow::anyhow!("spamd's answer has no score"))
}

/// The `[#token]` in a subject, if any (hex digits only).
fn subject_token(subject: &str) -> Option<&str> {
    let start = subject.rfind("[#")? + 2;
    let end = start + subject[start..].find(']')?;
    let token = &subject[start..end];
    (token.len() == 16 && token.bytes().all(|b| b.is_ascii_hexdigit())).then_some(token)
}

/// Why a file over [`stele_privacy::blobs::MAX_BLOB_BYTES`] has no digest.
fn over_the_limit() -> String {
    format!(
        "over the limit of {} MiB for a kept file",
        stele_privacy::blobs::MAX_BLOB_BYTES / (1024 * 1024)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rspamd_scores_the_raw_mail() {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/checkv2",
            post(|body: axum::body::Bytes| async move {
                let score = if body.windows(4).any(|w| w == b"SPAM") { 15.0 } else { 0.5 };
                axum::Json(serde_json::json!({ "score": score, "required_score": 15.0, "action": "no action" }))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        assert_eq!(
            rspamd_score(&http, &url, b"From: a@b\r\n\r\nSPAM")
                .await
                .unwrap(),
            15.0
        );
        assert_eq!(
            rspamd_score(&http, &format!("{url}/"), b"hello")
                .await
                .unwrap(),
            0.5
        );
        assert!(rspamd_score(&http, "http://127.0.0.1:1", b"x")
            .await
            .is_err());
    }

    #[tokio::test]
    async fn spamd_scores_the_raw_mail_and_refusals_are_errors() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A spamd that reads the request to its end and answers as SpamAssassin 4 does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                socket.read_to_end(&mut request).await.unwrap();
                let request = String::from_utf8_lossy(&request).into_owned();
                let answer = if !request.starts_with("CHECK SPAMC/1.5\r\nContent-length: ") {
                    "SPAMD/1.5 76 Bad header line\r\n\r\n"
                } else if request.contains("GTUBE") {
                    "SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1002.3 / 5.0\r\n\r\n"
                } else if request.contains("broken") {
                    "SPAMD/1.1 0 EX_OK\r\n\r\n"
                } else {
                    "SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.9 / 5.0\r\n\r\n"
                };
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let score = |raw: &'static [u8]| spamd_score(&addr, raw);
        assert_eq!(score(b"Subject: x\r\n\r\nGTUBE").await.unwrap(), 1002.3);
        assert_eq!(score(b"Subject: x\r\n\r\nhello").await.unwrap(), 0.9);
        assert!(score(b"Subject: broken\r\n\r\n").await.is_err());
        assert!(spamd_score("127.0.0.1:1", b"x").await.is_err());
    }

    #[test]
    fn subject_tokens_are_hex_in_brackets() {
        assert_eq!(
            subject_token("Re: Invoice [#0123456789abcdef]"),
            Some("0123456789abcdef")
        );
        assert_eq!(subject_token("Re: [#nothex!!]"), None);
        assert_eq!(subject_token("Re: [#12]"), None);
        assert_eq!(subject_token("plain"), None);
    }
}
