//! Replies out: the `email.send` job builds one queued reply (text and HTML from templates,
//! threading headers, `Auto-Submitted: auto-replied`) and hands it to the mailbox's SMTP server.
//! Its Message-ID is derived from the reply's id, so every attempt sends the same message.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox as Address, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use minijinja::{context, Environment};
use stele_aggregates::conversation::{ConversationCommand, ConversationError};
use stele_engine::queue::worker::{Done, HandlerError, HandlerResult};
use stele_engine::queue::Job;
use stele_engine::{CommandError, CommandMeta};
use url::Url;

use super::parse::OWN_ID_PREFIX;
use super::{decoded, Configured, Email};

/// The built-in templates.
const TEXT_TEMPLATE: &str = include_str!("../../templates/email/reply.txt");
const HTML_TEMPLATE: &str = include_str!("../../templates/email/reply.html");

/// A job's payload: which message of which conversation.
#[derive(Debug, serde::Deserialize)]
pub(super) struct MessageJob {
    pub(super) conversation: String,
    pub(super) message_id: String,
}

/// The rustls settings for a mailbox's servers: the web's roots, and `ca_file` when given.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<tokio_rustls::rustls::ClientConfig> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A mailbox's SMTP server.
pub(crate) struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl Smtp {
    /// `smtps://user:password@host:port` (TLS from the start) or `smtp://…` (STARTTLS).
    pub(crate) fn new(text: &str, ca_file: Option<&Path>) -> anyhow::Result<Smtp> {
        let url = Url::parse(text).map_err(|e| anyhow::anyhow!("the SMTP URL: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the SMTP URL names no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| anyhow::anyhow!("SMTP TLS settings: {e}"))?;
        let (tls, port) = match url.scheme() {
            "smtps" => (Tls::Wrapper(tls), 465),
            "smtp" => (Tls::Required(tls), 587),
            other => anyhow::bail!("the SMTP URL's scheme is {other:?}: expected smtps or smtp"),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(url.port().unwrap_or(port))
            .tls(tls)
            .timeout(Some(Duration::from_secs(30)));
        if !url.username().is_empty() {
            builder = builder.credentials(Credentials::new(
                decoded(url.username()),
                decoded(url.password().unwrap_or("")),
            ));
        }
        Ok(Smtp {
            transport: builder.build(),
        })
    }
}

/// The reply templates: `reply.txt` and `reply.html` (HTML-escaped), from a folder or built in.
pub(crate) struct Templates {
    env: Environment<'static>,
}

impl Templates {
    pub(crate) fn load(folder: Option<&Path>) -> anyhow::Result<Templates> {
        let mut env = Environment::new();
        for (name, builtin) in [("reply.txt", TEXT_TEMPLATE), ("reply.html", HTML_TEMPLATE)] {
            let source = match folder.map(|f| f.join(name)).filter(|p| p.exists()) {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("the template {}: {e}", path.display()))?,
                None => builtin.to_owned(),
            };
            env.add_template_owned(name, source)
                .map_err(|e| anyhow::anyhow!("the template {name}: {e}"))?;
        }
        Ok(Templates { env })
    }

    /// The text and HTML bodies of a reply.
    pub(crate) fn render(
        &self,
        text: &str,
        subject: &str,
        from_name: &str,
    ) -> anyhow::Result<(String, String)> {
        let paragraphs: Vec<Vec<String>> = text
            .split("\n\n")
            .map(|p| p.trim_matches('\n'))
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.lines().map(str::to_owned).collect())
            .collect();
        let ctx = context! { text, subject, from_name, paragraphs };
        let plain = self.env.get_template("reply.txt")?.render(&ctx)?;
        let html = self.env.get_template("reply.html")?.render(&ctx)?;
        Ok((plain, html))
    }
}

/// The DKIM signer of a mailbox: relaxed canonicalization, and the headers that make a reply
/// what it is (sender, recipient, subject, date, its ids and its automatic nature).
pub(crate) fn dkim_config(
    settings: &super::DkimSettings,
    from: &Address,
) -> anyhow::Result<lettre::message::dkim::DkimConfig> {
    use lettre::message::dkim::{
        DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
        DkimSigningKey,
    };
    let algorithm = match settings.algorithm.as_deref().unwrap_or("rsa") {
        "rsa" => DkimSigningAlgorithm::Rsa,
        "ed25519" => DkimSigningAlgorithm::Ed25519,
        other => anyhow::bail!("algorithm {other:?}: expected rsa or ed25519"),
    };
    let text = std::fs::read_to_string(&settings.key_file)
        .map_err(|e| anyhow::anyhow!("the key {}: {e}", settings.key_file.display()))?;
    let key = DkimSigningKey::new(text.trim(), algorithm)
        .map_err(|e| anyhow::anyhow!("the key {}: {e}", settings.key_file.display()))?;
    let headers = [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Auto-Submitted",
    ]
    .into_iter()
    .map(HeaderName::new_from_ascii_str)
    .collect();
    Ok(DkimConfig::new(
        settings.selector.clone(),
        settings
            .domain
            .clone()
            .unwrap_or_else(|| from.email.domain().to_owned()),
        key,
        headers,
        DkimCanonicalization {
            header: DkimCanonicalizationType::Relaxed,
            body: DkimCanonicalizationType::Relaxed,
        },
    ))
}

/// A header lettre has no type for, with its value as given.
#[derive(Clone)]
struct Raw(&'static str, String);

fn raw_header(name: &'static str, value: String) -> HeaderValue {
    HeaderValue::new(HeaderName::new_from_ascii_str(name), value)
}

/// The Message-ID of reply `reply` in thread `token`, on the domain of `from`.
pub fn message_id_of(token: &str, reply: &str, from: &Address) -> String {
    let safe: String = reply
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{OWN_ID_PREFIX}{token}.{safe}@{}>", from.email.domain())
}

/// `Re: ` before a subject that has none, and the thread's token after it when asked for.
pub fn reply_subject(subject: Option<&str>, token: &str, with_token: bool) -> String {
    let subject = subject.map(str::trim).filter(|s| !s.is_empty());
    let mut line = match subject {
        Some(s) if s.to_lowercase().starts_with("re:") => s.to_owned(),
        Some(s) => format!("Re: {s}"),
        None => "Re: your message".to_owned(),
    };
    let tag = format!("[#{token}]");
    if with_token && !line.contains(&tag) {
        line.push(' ');
        line.push_str(&tag);
    }
    line
}

impl Email {
    pub(super) async fn on_send(&self, job: Job) -> HandlerResult {
        let p: MessageJob = serde_json::from_value(job.payload.clone())?;
        let Some((mailbox, token)) = self.mailbox_of(&p.conversation) else {
            return Ok(Done::Complete);
        };
        let (conversation, _) = self.conversations.load(&p.conversation).await?;
        let Some(message) = conversation.message(&p.message_id).cloned() else {
            return Ok(Done::Complete);
        };
        if !message.awaits_delivery() {
            return Ok(Done::Complete);
        }
        let meta = || CommandMeta::new("email", "system");
        let fail = |error: String, will_retry: bool| ConversationCommand::MarkDeliveryFailed {
            message_id: p.message_id.clone(),
            error,
            will_retry,
        };
        // The reply goes to whoever wrote the message it answers, else the thread's person.
        let answered = message
            .in_reply_to
            .as_deref()
            .and_then(|id| conversation.message(id));
        let recipient = answered
            .and_then(|m| conversation.participants.get(&m.from))
            .or_else(|| {
                conversation.participants.values().find(|m| {
                    m.present && m.participant.subject.is_some() && m.participant.address.is_some()
                })
            })
            .and_then(|m| {
                let address = m.participant.address.as_ref()?.get()?.clone();
                let name = m
                    .participant
                    .display_name
                    .as_ref()
                    .and_then(|n| n.get().cloned());
                Some((name, address, m.participant.subject.clone()))
            });
        let Some((name, address, reader)) = recipient else {
            let failed = fail("no one to send it to (the person was erased)".into(), false);
            self.conversations
                .execute(&p.conversation, failed, meta())
                .await?;
            return Ok(Done::Complete);
        };
        let to = match address.parse() {
            Ok(email) => Address::new(name, email),
            Err(e) => {
                let failed = fail(
                    format!("the recipient's address does not parse: {e}"),
                    false,
                );
                self.conversations
                    .execute(&p.conversation, failed, meta())
                    .await?;
                return Ok(Done::Complete);
            }
        };
        let message_id = message_id_of(&token, &p.message_id, &mailbox.from);
        let subject = reply_subject(
            conversation.subject.as_deref(),
            &token,
            mailbox.config.subject_token,
        );
        // Files the reply carries are the reader's (kept sealed with their key).
        let mut files = Vec::new();
        for attachment in &message.attachments {
            let (Some(digest), Some(reader)) = (&attachment.digest, &reader) else {
                continue;
            };
            match self.subjects.blobs().get(reader, digest).await {
                Ok(Some((content_type, bytes))) => {
                    files.push((attachment.name.clone(), content_type, bytes))
                }
                Ok(None) => {
                    tracing::warn!(digest = %digest, "a reply's file is not kept (or its person erased): sent without it")
                }
                Err(e) => return Err(HandlerError::msg(format!("reading a reply's file: {e}"))),
            }
        }
        let built = Self::build(
            &mailbox,
            &conversation,
            &message,
            to,
            &message_id,
            &subject,
            files,
        )
        .map_err(|e| HandlerError::msg(format!("{e:#}")))?;
        match mailbox.smtp.transport.send(built).await {
            Ok(_) => {
                let delivered = ConversationCommand::MarkDelivered {
                    message_id: p.message_id.clone(),
                    external_id: message_id,
                };
                match self
                    .conversations
                    .execute(&p.conversation, delivered, meta())
                    .await
                {
                    Ok(_)
                    | Err(CommandError::Rejected(ConversationError::AlreadyDelivered { .. })) => {}
                    Err(e) => return Err(e.into()),
                }
                Ok(Done::Complete)
            }
            Err(error) => {
                // A permanent refusal (5xx: no such user, refused as spam…) will not change.
                let will_retry = !error.is_permanent();
                // (Servers' answers name recipients: kept without their addresses.)
                let failed = fail(
                    super::parse::redact_addresses(&error.to_string()),
                    will_retry,
                );
                self.conversations
                    .execute(&p.conversation, failed, meta())
                    .await?;
                if will_retry {
                    return Err(HandlerError::msg(format!(
                        "SMTP: {}",
                        super::parse::redact_addresses(&error.to_string())
                    )));
                }
                Ok(Done::Complete)
            }
        }
    }

    fn build(
        mailbox: &Configured,
        conversation: &stele_aggregates::conversation::Conversation,
        message: &stele_aggregates::conversation::Message,
        to: Address,
        message_id: &str,
        subject: &str,
        files: Vec<(String, String, Vec<u8>)>,
    ) -> anyhow::Result<lettre::Message> {
        let from_name = mailbox
            .from
            .name
            .clone()
            .unwrap_or_else(|| mailbox.from.email.to_string());
        let (plain, html) = mailbox
            .templates
            .render(&message.text, subject, &from_name)?;
        // The thread: the mail that started it, then the one answered.
        let mut references: Vec<String> = Vec::new();
        if let Some(root) = conversation.external_id.as_deref() {
            references.push(root.to_owned());
        }
        if let Some(parent) = message.in_reply_to_external.as_deref() {
            if !references.iter().any(|r| r == parent) {
                references.push(parent.to_owned());
            }
        }
        let mut builder = lettre::Message::builder()
            .from(mailbox.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(message_id.to_owned()))
            .date_now();
        if let Some(parent) = message.in_reply_to_external.clone() {
            builder = builder.in_reply_to(parent);
        }
        if !references.is_empty() {
            builder = builder.references(references.join(" "));
        }
        let body = MultiPart::alternative_plain_html(plain, html);
        let mut built = if files.is_empty() {
            builder.multipart(body)?
        } else {
            let mut mixed = MultiPart::mixed().multipart(body);
            for (name, content_type, bytes) in files {
                let content_type = ContentType::parse(&content_type)
                    .unwrap_or_else(|_| ContentType::parse("application/octet-stream").unwrap());
                mixed = mixed
                    .singlepart(lettre::message::Attachment::new(name).body(bytes, content_type));
            }
            builder.multipart(mixed)?
        };
        // RFC 3834: an automatic answer says so, and asks Exchange-style servers for no
        // auto-replies of their own.
        for Raw(name, value) in [
            Raw("Auto-Submitted", "auto-replied".into()),
            Raw("X-Auto-Response-Suppress", "All".into()),
        ] {
            built.headers_mut().insert_raw(raw_header(name, value));
        }
        if let Some(dkim) = &mailbox.dkim {
            built.sign(dkim);
        }
        Ok(built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_one_re_and_carry_the_thread_token() {
        assert_eq!(
            reply_subject(Some("Invoice"), "0123456789abcdef", true),
            "Re: Invoice [#0123456789abcdef]"
        );
        assert_eq!(
            reply_subject(
                Some("RE: Invoice [#0123456789abcdef]"),
                "0123456789abcdef",
                true
            ),
            "RE: Invoice [#0123456789abcdef]"
        );
        assert_eq!(reply_subject(None, "ab", false), "Re: your message");
    }

    #[test]
    fn message_ids_name_the_thread_and_the_reply() {
        let from: Address = "Help <help@stele.test>".parse().unwrap();
        let id = message_id_of("t0k", "reply-01/x", &from);
        assert_eq!(id, "<stele.t0k.reply-01_x@stele.test>");
        assert_eq!(
            super::super::parse::own_parts(&id),
            Some(("t0k", "reply-01_x"))
        );
    }

    // (On a runtime: the mailbox's SMTP pool needs one, even unused.)
    #[tokio::test]
    async fn a_reply_is_threaded_automatic_and_carries_its_files() {
        use stele_aggregates::conversation::{
            Conversation, ConversationEvent, Delivery, MessageDirection,
        };
        let mailbox = Configured::new(super::super::MailboxConfig::new(
            "imaps://help:pw@localhost/INBOX",
            "smtps://help:pw@localhost",
            "Help <help@stele.test>",
        ))
        .unwrap();
        let mut conversation = Conversation::default();
        cqrs_es::Aggregate::apply(
            &mut conversation,
            ConversationEvent::ConversationOpened {
                channel: stele_aggregates::conversation::Channel::EMAIL,
                external_id: "<root@x.org>".into(),
                subject: None,
                address: None,
                owner: None,
                participants: vec![],
            },
        );
        let message = stele_aggregates::conversation::Message {
            message_id: "reply-1".into(),
            seq: 2,
            direction: MessageDirection::Outbound,
            from: "stele".into(),
            external_id: None,
            text: "Here it is.".into(),
            attachments: vec![],
            in_reply_to: Some("mail-1".into()),
            in_reply_to_external: Some("<q@x.org>".into()),
            sent_at: None,
            task_id: None,
            delivery: Delivery::Queued,
            failed_attempts: 0,
            no_reply: None,
            screened: None,
        };
        let built = Email::build(
            &mailbox,
            &conversation,
            &message,
            "ana@x.org".parse().unwrap(),
            "<stele.t.reply-1@stele.test>",
            "Re: plan [#t]",
            vec![(
                "plan.pdf".into(),
                "application/pdf".into(),
                b"%PDF-1.4".to_vec(),
            )],
        )
        .unwrap();
        let text = String::from_utf8(built.formatted()).unwrap();
        for needle in [
            "In-Reply-To: <q@x.org>",
            "References: <root@x.org> <q@x.org>",
            "Auto-Submitted: auto-replied",
            "Message-ID: <stele.t.reply-1@stele.test>",
            "multipart/mixed",
            "multipart/alternative",
            "filename=\"plan.pdf\"",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }

    #[test]
    fn templates_escape_html_and_keep_paragraphs() {
        let templates = Templates::load(None).unwrap();
        let (plain, html) = templates
            .render("Hello <b>you</b>\nline two\n\nSecond", "Re: x", "Help")
            .unwrap();
        assert!(plain.starts_with("Hello <b>you</b>"));
        assert!(html.contains("Hello &lt;b&gt;you&lt;"), "{html}");
        assert!(html.contains("<br>line two</p>"), "{html}");
        assert!(html.contains(">Second</p>"));
    }
}
