//! `stele telegram`: who may use the bot (allow, deny, list), recorded as events; and the
//! channel's settings from the command line, the environment and the configuration file.

use clap::{Args, Subcommand};
use stele_channels::telegram::{RoleSummary, Telegram, TelegramConfig};
use stele_engine::store::{Migrate, Store};

use crate::StoreArgs;

/// The Telegram channel's options (over `[telegram]` in the configuration file).
#[derive(Args, Clone, Debug, Default)]
pub struct TelegramArgs {
    /// The bot's token (from @BotFather): with one, the node runs the Telegram channel.
    #[arg(
        long = "telegram-token",
        env = "STELE_TELEGRAM_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The Bot API's base URL (a local Bot API server; Telegram's by default).
    #[arg(
        long = "telegram-api-url",
        env = "STELE_TELEGRAM_API_URL",
        value_name = "URL"
    )]
    pub api_url: Option<String>,
    /// The workflow plain messages start (`assistant` by default).
    #[arg(
        long = "telegram-workflow",
        env = "STELE_TELEGRAM_WORKFLOW",
        value_name = "NAME"
    )]
    pub workflow: Option<String>,
    /// The public URL Telegram posts updates to (webhooks, served by the API); polling without.
    #[arg(
        long = "telegram-webhook-url",
        env = "STELE_TELEGRAM_WEBHOOK_URL",
        value_name = "URL"
    )]
    pub webhook_url: Option<String>,
    /// The secret Telegram sends with each webhook post (derived from the token by default).
    #[arg(
        long = "telegram-webhook-secret",
        env = "STELE_TELEGRAM_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
    /// User and chat ids allowed, comma-separated (once any is, others are refused).
    #[arg(
        long = "telegram-allow",
        env = "STELE_TELEGRAM_ALLOW",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub allow: Option<Vec<String>>,
}

impl TelegramArgs {
    /// The channel's settings: these options over the file's section; `None` without a token.
    pub fn resolve(&self, file: Option<TelegramConfig>) -> Option<TelegramConfig> {
        let token = self
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let mut config = match (file, token) {
            (Some(mut file), Some(token)) => {
                file.token = token.to_owned();
                file
            }
            (Some(file), None) if !file.token.trim().is_empty() => file,
            (Some(_), None) => return None,
            (None, Some(token)) => TelegramConfig::new(token),
            (None, None) => return None,
        };
        if let Some(url) = &self.api_url {
            config.api_url = Some(url.clone());
        }
        if let Some(url) = &self.webhook_url {
            config.webhook_url = Some(url.clone());
        }
        if let Some(secret) = &self.webhook_secret {
            config.webhook_secret = Some(secret.clone());
        }
        if let Some(workflow) = &self.workflow {
            config.workflow = workflow.clone();
        }
        if let Some(allow) = &self.allow {
            config.allow = allow
                .iter()
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty())
                .collect();
        }
        Some(config)
    }
}

/// The roles `/models` lists.
pub fn roles(models: &stele_models::ModelRouter) -> Vec<RoleSummary> {
    models
        .agents()
        .map(|role| RoleSummary {
            role: role.name.clone(),
            description: role.description.clone(),
            models: role.route.iter().map(|r| r.to_string()).collect(),
        })
        .collect()
}

#[derive(Subcommand)]
pub enum TelegramCommand {
    /// Let a Telegram user or chat id use the bot (recorded).
    Allow {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Shut a Telegram user or chat id out (recorded).
    Deny {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The ids allowed and denied at run time (the configuration's come on top).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub async fn run(command: TelegramCommand) -> anyhow::Result<()> {
    let store_args = match &command {
        TelegramCommand::Allow { store, .. }
        | TelegramCommand::Deny { store, .. }
        | TelegramCommand::List { store } => store.clone(),
    };
    let store = Store::open(store_args.location()?, Migrate::Apply).await?;
    let operator = format!(
        "user:{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into())
    );
    let result = async {
        match &command {
            TelegramCommand::Allow { id, .. } => {
                let id = telegram_id(id)?;
                Telegram::allow(&store, &id, &operator).await?;
                println!("allowed {id}");
            }
            TelegramCommand::Deny { id, .. } => {
                let id = telegram_id(id)?;
                Telegram::deny(&store, &id, &operator).await?;
                println!("denied {id}");
            }
            TelegramCommand::List { .. } => {
                let list = Telegram::access_list(&store).await?;
                println!(
                    "{}",
                    serde_json::json!({ "allowed": list.allowed, "denied": list.denied })
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}

/// A Telegram id: an integer (users are positive, groups negative).
fn telegram_id(id: &str) -> anyhow::Result<String> {
    let id = id.trim();
    id.parse::<i64>()
        .map(|n| n.to_string())
        .map_err(|_| anyhow::anyhow!("{id:?} is not a Telegram id (an integer, such as 123456789)"))
}
