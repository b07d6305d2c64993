//! Reading one mail: the parts the channel records (with `mail-parser`: charsets,
//! quoted-printable, HTML-only mail as text), the quoted history cut from the text agents see,
//! and the verdicts taken before anything is answered: is it a machine's mail (no automatic
//! reply, RFC 3834 and the headers mailing lists and autoresponders set), a delivery report
//! about one of our replies, or spam.

use chrono::{DateTime, Utc};
use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};
use stele_aggregates::conversation::Attachment;

/// A mail read well enough to record.
#[derive(Clone, Debug, PartialEq)]
pub struct Mail {
    /// The Message-ID with its angle brackets; made from the raw bytes' digest when the mail has
    /// none (`synthetic_id`), so the same mail always gets the same one.
    pub message_id: String,
    /// Whether `message_id` was made up.
    pub synthetic_id: bool,
    /// The ids this mail answers, oldest first: `References`, then `In-Reply-To`.
    pub references: Vec<String>,
    /// `In-Reply-To`, if any.
    pub in_reply_to: Option<String>,
    /// The sender's address, lowercased.
    pub from: String,
    /// The sender's name, if given.
    pub from_name: Option<String>,
    /// Where answers go (`Reply-To`, else the sender).
    pub reply_to: String,
    /// The subject, if any.
    pub subject: Option<String>,
    /// The text, with quoted history and signatures' separators cut.
    pub text: String,
    /// What is known of the attached files.
    pub attachments: Vec<Attachment>,
    /// The attached files' bytes, in the order of `attachments`.
    pub files: Vec<Vec<u8>>,
    /// The `Date` header.
    pub sent_at: Option<DateTime<Utc>>,
    /// Why no automatic answer may go to it, if none may.
    pub automated: Option<String>,
    /// The spam score the receiving server gave it, or the built-in guess.
    pub spam_score: f64,
    /// A delivery status report, when the mail is one.
    pub report: Option<Report>,
}

/// A delivery status notification (RFC 3464): which of our messages could not be delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The Message-IDs of the messages it reports on (found in its returned headers).
    pub original_ids: Vec<String>,
    /// The recipient that failed.
    pub recipient: String,
    /// `failed`, `delayed`, `delivered`…
    pub action: String,
    /// The status code, for example `5.1.1`.
    pub status: String,
    /// What the receiving server said.
    pub diagnostic: String,
}

/// Why a mail could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong.
    pub reason: String,
    /// Its Message-ID, if that much could be read.
    pub message_id: Option<String>,
    /// The sender's address, if that much could be read.
    pub from: Option<String>,
}

/// The channel's own addresses and Message-ID domain, which no automatic answer goes to.
#[derive(Clone, Debug, Default)]
pub struct Own {
    /// Our mailboxes' addresses, lowercased.
    pub addresses: Vec<String>,
}

/// A Message-ID as recorded: trimmed, with angle brackets.
pub fn normalise_id(id: &str) -> String {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    format!("<{id}>")
}

/// `text` with every word that holds an `@` (an address, bracketed or not) replaced by
/// `[address]`: servers' diagnostics and SMTP errors name recipients, and these texts are kept
/// in plain event fields.
pub fn redact_addresses(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if word.contains('@') {
                "[address]"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first `len` hex digits of the SHA-256 of `bytes`.
pub fn digest(bytes: &[u8], len: usize) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.truncate(len);
    hex
}

fn ids_of(value: &HeaderValue) -> Vec<String> {
    match value {
        HeaderValue::Text(id) => vec![normalise_id(id)],
        HeaderValue::TextList(ids) => ids.iter().map(|id| normalise_id(id)).collect(),
        _ => Vec::new(),
    }
}

/// Reads `raw`.
pub fn parse(raw: &[u8], own: &Own) -> Result<Mail, Malformed> {
    let malformed = |reason: &str, message_id: Option<String>, from: Option<String>| Malformed {
        reason: reason.to_owned(),
        message_id,
        from,
    };
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(malformed("an empty message", None, None));
    }
    let Some(message) = MessageParser::default().parse(raw) else {
        return Err(malformed("not a mail message (no headers)", None, None));
    };
    let message_id = message.message_id().map(normalise_id);
    let from = message.from().and_then(|from| from.first());
    let address = from
        .and_then(|from| from.address())
        .map(|a| a.trim().to_lowercase())
        .filter(|a| well_formed_address(a));
    let Some(address) = address else {
        let reason = match message.header_raw("From") {
            None => "no From header",
            Some(_) => "a From header without a valid address",
        };
        return Err(malformed(reason, message_id, None));
    };
    if message.headers().len() > MAX_HEADERS {
        return Err(malformed(
            &format!("more than {MAX_HEADERS} header fields"),
            message_id,
            Some(address),
        ));
    }
    let synthetic_id = message_id.is_none();
    let message_id = message_id
        .filter(|id| id.len() > 2 && id.len() <= 998)
        .unwrap_or_else(|| format!("<{}@synthetic.stele>", digest(raw, 32)));
    let in_reply_to = ids_of(message.in_reply_to()).into_iter().next();
    let mut references = ids_of(message.references());
    if let Some(parent) = &in_reply_to {
        if !references.contains(parent) {
            references.push(parent.clone());
        }
    }
    references.retain(|id| id != &message_id);
    let reply_to = message
        .reply_to()
        .and_then(|to| to.first())
        .and_then(|to| to.address())
        .map(|a| a.trim().to_lowercase())
        .filter(|a| well_formed_address(a))
        .unwrap_or_else(|| address.clone());
    let text = message
        .body_text(0)
        .map(|text| text.into_owned())
        .unwrap_or_default();
    let attachments = message
        .attachments()
        .map(|part| Attachment {
            name: part
                .attachment_name()
                .map(str::to_owned)
                .unwrap_or_else(|| "attachment".into()),
            content_type: part
                .content_type()
                .map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{sub}", ct.ctype()),
                    None => ct.ctype().to_owned(),
                })
                .unwrap_or_else(|| "application/octet-stream".into()),
            size: part.contents().len() as u64,
            digest: Some(format!("sha256:{}", digest(part.contents(), 64))),
            not_kept: None,
        })
        .collect();
    let files = message
        .attachments()
        .map(|part| part.contents().to_vec())
        .collect();
    let sent_at = message
        .date()
        .and_then(|date| DateTime::from_timestamp(date.to_timestamp(), 0));
    let header = |name: &str| message.header_raw(name).map(|v| v.trim().to_owned());
    let report = report_of(raw, &message_id, header("Content-Type").as_deref());
    let automated = automated(&header, &address, &message_id, own, report.is_some());
    let subject = message.subject().map(|s| s.trim().to_owned());
    let spam_score = spam_score(&header, subject.as_deref(), &text);
    Ok(Mail {
        message_id,
        synthetic_id,
        references,
        in_reply_to,
        from: address,
        from_name: from
            .and_then(|from| from.name())
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty()),
        reply_to,
        subject,
        text: trim_quoted(&text),
        attachments,
        files,
        sent_at,
        automated,
        spam_score,
        report,
    })
}

/// More header fields than any real mail has: a mail built to exhaust its reader.
const MAX_HEADERS: usize = 1000;

fn well_formed_address(address: &str) -> bool {
    match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !address.contains(char::is_whitespace)
                && address.len() <= 320
        }
        None => false,
    }
}

/// Whether a machine sent it, or it is ours: then nothing answers it automatically.
fn automated(
    header: &impl Fn(&str) -> Option<String>,
    from: &str,
    message_id: &str,
    own: &Own,
    is_report: bool,
) -> Option<String> {
    if is_report {
        return Some("a delivery status report".into());
    }
    if let Some(value) = header("Auto-Submitted") {
        let kind = value.split(';').next().unwrap_or("").trim().to_lowercase();
        if kind != "no" {
            return Some(format!("Auto-Submitted: {kind}"));
        }
    }
    if let Some(value) = header("Precedence") {
        let value = value.trim().to_lowercase();
        if ["bulk", "list", "junk"].contains(&value.as_str()) {
            return Some(format!("Precedence: {value}"));
        }
    }
    for name in ["X-Auto-Response-Suppress", "List-Id", "X-Loop"] {
        if header(name).is_some() {
            return Some(format!("a {name} header"));
        }
    }
    if let Some(path) = header("Return-Path") {
        if path.trim() == "<>" {
            return Some("a null sender (Return-Path: <>)".into());
        }
    }
    let local = from.split('@').next().unwrap_or("");
    let machine = [
        "mailer-daemon",
        "postmaster",
        "no-reply",
        "noreply",
        "do-not-reply",
        "donotreply",
        "bounce",
        "bounces",
    ];
    if machine
        .iter()
        .any(|m| local == *m || local.starts_with(&format!("{m}+")))
    {
        return Some(format!("a machine's address ({local})"));
    }
    if own.addresses.iter().any(|a| a == from) {
        return Some("one of our own addresses".into());
    }
    if is_ours(message_id) {
        return Some("one of our own messages".into());
    }
    None
}

/// The prefix of the Message-IDs the channel gives its replies: `<stele.<thread>.<reply>@domain>`.
pub const OWN_ID_PREFIX: &str = "<stele.";

/// Whether `message_id` is one the channel made.
pub fn is_ours(message_id: &str) -> bool {
    message_id.starts_with(OWN_ID_PREFIX)
}

/// The thread token and reply id of one of our Message-IDs.
pub fn own_parts(message_id: &str) -> Option<(&str, &str)> {
    let rest = message_id.strip_prefix(OWN_ID_PREFIX)?;
    let (local, _domain) = rest.trim_end_matches('>').split_once('@')?;
    let (token, reply) = local.split_once('.')?;
    (!token.is_empty() && !reply.is_empty()).then_some((token, reply))
}

/// A delivery status report's fields, when `raw` is one (`multipart/report;
/// report-type=delivery-status`). Read from the raw text: the report's parts are plain
/// `name: value` lines, and the returned message's ids are `Message-ID:` lines after them.
fn report_of(raw: &[u8], own_id: &str, content_type: Option<&str>) -> Option<Report> {
    let content_type = content_type?.to_lowercase();
    if !content_type.contains("multipart/report") || !content_type.contains("delivery-status") {
        return None;
    }
    let text = String::from_utf8_lossy(raw);
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let after_type = |value: String| match value.split_once(';') {
        Some((_, rest)) => rest.trim().to_owned(),
        None => value,
    };
    let mut original_ids: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            if key.trim().eq_ignore_ascii_case("message-id") {
                let id = normalise_id(value);
                if id != own_id && !original_ids.contains(&id) {
                    original_ids.push(id);
                }
            }
        }
    }
    Some(Report {
        original_ids,
        recipient: field("Final-Recipient")
            .or_else(|| field("Original-Recipient"))
            .map(after_type)
            .unwrap_or_default(),
        action: field("Action").unwrap_or_default().to_lowercase(),
        status: field("Status").unwrap_or_default(),
        diagnostic: field("Diagnostic-Code").map(after_type).unwrap_or_default(),
    })
}

/// The receiving server's spam score (`X-Spam-Score`, `X-Rspamd-Score`, `X-Spam-Status:
/// score=`, `X-Spam-Flag: YES`), or else a small built-in guess from the subject and text.
fn spam_score(header: &impl Fn(&str) -> Option<String>, subject: Option<&str>, text: &str) -> f64 {
    let number = |value: &str| {
        value
            .trim()
            .split(|c: char| c.is_whitespace() || c == '/' || c == ',')
            .next()
            .and_then(|n| n.parse::<f64>().ok())
    };
    for name in ["X-Spam-Score", "X-Rspamd-Score"] {
        if let Some(score) = header(name).as_deref().and_then(number) {
            return score;
        }
    }
    if let Some(status) = header("X-Spam-Status") {
        if let Some(score) = status
            .split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|part| part.strip_prefix("score="))
            .and_then(number)
        {
            return score;
        }
    }
    if header("X-Spam-Flag").is_some_and(|flag| flag.eq_ignore_ascii_case("yes")) {
        return 100.0;
    }
    builtin_spam_score(subject.unwrap_or(""), text)
}

/// A deliberately simple guess for servers that score nothing: a few classic signs, a point or
/// two each. The threshold (5 by default) needs several of them together.
pub fn builtin_spam_score(subject: &str, text: &str) -> f64 {
    let mut score = 0.0;
    let letters: Vec<char> = subject.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.len() >= 8 && letters.iter().all(|c| c.is_uppercase()) {
        score += 1.5;
    }
    if subject.matches('!').count() >= 3 {
        score += 1.0;
    }
    let lower = format!("{subject}\n{text}").to_lowercase();
    let phrases = [
        "you have won",
        "lottery",
        "wire transfer",
        "viagra",
        "crypto giveaway",
        "claim your prize",
        "100% free",
        "act now",
        "click here",
        "verify your account",
    ];
    score += 2.0 * phrases.iter().filter(|p| lower.contains(*p)).count() as f64;
    let links = lower.matches("http://").count() + lower.matches("https://").count();
    if links > 10 {
        score += 1.5;
    }
    score
}

/// The text without the history mail clients quote below (or above) an answer: `>` lines, an
/// "On … wrote:" line before them, Outlook's "-----Original Message-----" and what follows, and
/// a signature after "-- ". The whole text when cutting would leave nothing.
pub fn trim_quoted(text: &str) -> String {
    let text = text.replace("\r\n", "\n");
    let lines: Vec<&str> = text.lines().collect();
    let mut kept: Vec<&str> = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if trimmed == "-----Original Message-----"
            || trimmed.starts_with("________________________________")
            || *line == "-- "
        {
            break;
        }
        let next_quoted = lines[at + 1..]
            .iter()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('>'));
        if (trimmed.starts_with("On ") || trimmed.starts_with("Le "))
            && (trimmed.ends_with("wrote:") || trimmed.ends_with("a écrit :"))
            && next_quoted
        {
            continue;
        }
        if trimmed.starts_with('>') {
            continue;
        }
        kept.push(line);
    }
    let cut = kept.join("\n").trim().to_owned();
    if cut.is_empty() {
        text.trim().to_owned()
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Own {
        Own {
            addresses: vec!["help@stele.test".into()],
        }
    }

    #[test]
    fn a_plain_mail_is_read_with_its_thread_headers() {
        let raw = b"From: Ana Lima <Ana@Example.org>\r\nTo: help@stele.test\r\n\
Subject: =?utf-8?q?Caf=C3=A9?=\r\nMessage-ID: <m2@example.org>\r\n\
In-Reply-To: <m1@example.org>\r\nReferences: <m0@example.org> <m1@example.org>\r\n\
Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nThanks!\r\n\r\nOn Monday, Bo wrote:\r\n> old text\r\n";
        let mail = parse(raw, &own()).unwrap();
        assert_eq!(mail.message_id, "<m2@example.org>");
        assert_eq!(mail.references, ["<m0@example.org>", "<m1@example.org>"]);
        assert_eq!(mail.in_reply_to.as_deref(), Some("<m1@example.org>"));
        assert_eq!(mail.from, "ana@example.org");
        assert_eq!(mail.from_name.as_deref(), Some("Ana Lima"));
        assert_eq!(mail.subject.as_deref(), Some("Café"));
        assert_eq!(mail.text, "Thanks!");
        assert!(mail.sent_at.is_some());
        assert_eq!(mail.automated, None);
        assert!(mail.spam_score < 1.0);
    }

    #[test]
    fn html_only_and_quoted_printable_mail_becomes_text() {
        let raw = b"From: a@example.org\r\nMessage-ID: <h@example.org>\r\n\
Content-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
<p>Bonjour <b>=E9t=E9</b></p>\r\n";
        let mail = parse(raw, &own()).unwrap();
        assert!(mail.text.contains("Bonjour"), "{}", mail.text);
        assert!(mail.text.contains("été"), "{}", mail.text);
    }

    #[test]
    fn machines_and_ourselves_get_no_automatic_answer() {
        let cases: [(&str, &str); 9] = [
            ("Auto-Submitted: auto-replied\r\n", "Auto-Submitted"),
            ("Precedence: bulk\r\n", "Precedence"),
            ("List-Id: <news.example.org>\r\n", "List-Id"),
            ("X-Loop: help@stele.test\r\n", "X-Loop"),
            (
                "X-Auto-Response-Suppress: All\r\n",
                "X-Auto-Response-Suppress",
            ),
            ("Return-Path: <>\r\n", "null sender"),
            ("Reply-To: x@example.org\r\n", ""),
            ("Auto-Submitted: no\r\n", ""),
            ("", ""),
        ];
        for (extra, why) in cases {
            let raw = format!(
                "From: a@example.org\r\nMessage-ID: <x@example.org>\r\n{extra}\r\nhello\r\n"
            );
            let verdict = parse(raw.as_bytes(), &own()).unwrap().automated;
            match why {
                "" => assert_eq!(verdict, None, "{extra}"),
                why => assert!(verdict.unwrap().contains(why), "{extra}"),
            }
        }
        for from in [
            "MAILER-DAEMON@example.org",
            "no-reply@x.org",
            "help@stele.test",
        ] {
            let raw = format!("From: {from}\r\nMessage-ID: <y@example.org>\r\n\r\nhi\r\n");
            assert!(parse(raw.as_bytes(), &own()).unwrap().automated.is_some());
        }
        let ours =
            "From: b@example.org\r\nMessage-ID: <stele.abc.reply-1@stele.test>\r\n\r\nhi\r\n";
        assert!(parse(ours.as_bytes(), &own()).unwrap().automated.is_some());
        assert_eq!(
            own_parts("<stele.abc.reply-1@stele.test>"),
            Some(("abc", "reply-1"))
        );
    }

    #[test]
    fn a_bounce_names_the_message_it_returns() {
        let raw = "From: MAILER-DAEMON@localhost\r\nTo: help@stele.test\r\n\
Message-ID: <dsn-1@localhost>\r\nAuto-Submitted: auto-replied\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; localhost\r\n\r\n\
Final-Recipient: rfc822; nobody@localhost\r\nAction: failed\r\nStatus: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 User doesn't exist\r\n\r\n\
--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: help@stele.test\r\n\
Message-ID: <stele.t0k3n.reply-9@stele.test>\r\nSubject: Re: hi\r\n\r\n--B--\r\n";
        let mail = parse(raw.as_bytes(), &own()).unwrap();
        let report = mail.report.unwrap();
        assert_eq!(report.original_ids, ["<stele.t0k3n.reply-9@stele.test>"]);
        assert_eq!(report.recipient, "nobody@localhost");
        assert_eq!(report.action, "failed");
        assert_eq!(report.status, "5.1.1");
        assert_eq!(report.diagnostic, "550 5.1.1 User doesn't exist");
        assert!(mail.automated.is_some());
    }

    #[test]
    fn spam_scores_come_from_the_server_or_the_fallback() {
        for (header, score) in [
            ("X-Spam-Score: 7.5\r\n", 7.5),
            ("X-Rspamd-Score: 12.0 / 15.0\r\n", 12.0),
            ("X-Spam-Status: Yes, score=6.1 required=5.0\r\n", 6.1),
            ("X-Spam-Flag: YES\r\n", 100.0),
        ] {
            let raw = format!("From: a@example.org\r\n{header}\r\nhi\r\n");
            assert_eq!(parse(raw.as_bytes(), &own()).unwrap().spam_score, score);
        }
        let raw = "From: a@example.org\r\nSubject: YOU HAVE WON THE LOTTERY!!!\r\n\r\n\
Claim your prize: click here and act now\r\n";
        assert!(parse(raw.as_bytes(), &own()).unwrap().spam_score >= 5.0);
    }

    #[test]
    fn unreadable_mail_is_malformed_and_says_why() {
        assert_eq!(parse(b"", &own()).unwrap_err().reason, "an empty message");
        let no_from = parse(b"Subject: hi\r\nMessage-ID: <a@b>\r\n\r\nhi", &own()).unwrap_err();
        assert_eq!(no_from.reason, "no From header");
        assert_eq!(no_from.message_id.as_deref(), Some("<a@b>"));
        let bad_from = parse(b"From: nobody\r\n\r\nhi", &own()).unwrap_err();
        assert!(bad_from.reason.contains("without a valid address"));
    }

    #[test]
    fn a_mail_without_message_id_gets_the_same_one_each_time() {
        let raw = b"From: a@example.org\r\n\r\nhi\r\n";
        let first = parse(raw, &own()).unwrap();
        assert!(first.synthetic_id);
        assert_eq!(first.message_id, parse(raw, &own()).unwrap().message_id);
    }

    #[test]
    fn addresses_are_taken_out_of_diagnostics() {
        assert_eq!(
            redact_addresses("550 5.1.1 <ghost@localhost>: User unknown"),
            "550 5.1.1 [address] User unknown"
        );
    }

    #[test]
    fn quoted_history_is_cut() {
        assert_eq!(
            trim_quoted("Yes.\n\n-----Original Message-----\nFrom: x\nold"),
            "Yes."
        );
        assert_eq!(trim_quoted("Sure\n-- \nAna\n"), "Sure");
        assert_eq!(trim_quoted("> only quoted"), "> only quoted");
        assert_eq!(trim_quoted("a > b\nsecond"), "a > b\nsecond");
    }
}
