//! The email channel's settings from the command line, the environment and the configuration
//! file (`[[email.mailboxes]]`).

use clap::Args;
use stele_channels::email::{EmailConfig, MailboxConfig};

/// One mailbox's options (added to `[[email.mailboxes]]` of the configuration file).
#[derive(Args, Clone, Debug, Default)]
pub struct EmailArgs {
    /// The mailbox read: `imaps://user:password@host:port/INBOX`, or `imap://…` (STARTTLS).
    #[arg(
        long = "email-imap-url",
        env = "STELE_EMAIL_IMAP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub email_imap_url: Option<String>,
    /// The server replies go through: `smtps://user:password@host:port`, or `smtp://…`
    /// (STARTTLS).
    #[arg(
        long = "email-smtp-url",
        env = "STELE_EMAIL_SMTP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub email_smtp_url: Option<String>,
    /// The address replies come from, e.g. `Help <help@example.org>`.
    #[arg(long = "email-from", env = "STELE_EMAIL_FROM", value_name = "ADDRESS")]
    pub email_from: Option<String>,
    /// The workflow a mail starts (`assistant` by default).
    #[arg(
        long = "email-workflow",
        env = "STELE_EMAIL_WORKFLOW",
        value_name = "NAME"
    )]
    pub email_workflow: Option<String>,
    /// An extra CA certificate (PEM) to trust, for private servers.
    #[arg(
        long = "email-ca-file",
        env = "STELE_EMAIL_CA_FILE",
        value_name = "FILE"
    )]
    pub email_ca_file: Option<std::path::PathBuf>,
}

impl EmailArgs {
    /// The channel's settings: the file's mailboxes and the one these options describe; `None`
    /// when there is none. Options given without an IMAP URL are an error worth a clear line.
    pub fn resolve(&self, file: Option<EmailConfig>) -> anyhow::Result<Option<EmailConfig>> {
        let mut config = file.unwrap_or_default();
        match (&self.email_imap_url, &self.email_smtp_url, &self.email_from) {
            (Some(imap), Some(smtp), Some(from)) => {
                let mut mailbox = MailboxConfig::new(imap, smtp, from);
                if let Some(workflow) = &self.email_workflow {
                    mailbox.workflow = workflow.clone();
                }
                mailbox.ca_file = self.email_ca_file.clone();
                config.mailboxes.push(mailbox);
            }
            (None, None, None) => {}
            _ => anyhow::bail!(
                "a mailbox needs STELE_EMAIL_IMAP_URL, STELE_EMAIL_SMTP_URL and STELE_EMAIL_FROM together"
            ),
        }
        Ok((!config.mailboxes.is_empty()).then_some(config))
    }
}
