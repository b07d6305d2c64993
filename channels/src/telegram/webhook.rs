//! Updates in by webhook, for production: Telegram posts each update to a route of the API
//! server, checked with the secret token it was given (`X-Telegram-Bot-Api-Secret-Token`), and
//! the route answers 200 only once the update is recorded. Telegram posts an update again until
//! it gets a 2xx, so as with polling nothing is lost, and a repeat records nothing twice.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use teloxide::payloads::SetWebhookSetters;
use teloxide::prelude::Requester;
use teloxide::types::Update;

use super::Telegram;

/// The header Telegram sends the secret token in.
const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

impl Telegram {
    /// The secret Telegram is given for the webhook: the configured one, else one derived from
    /// the token (the same on every node, and unknown to whoever does not know the token).
    pub fn webhook_secret(&self) -> String {
        match &self.config.webhook_secret {
            Some(secret) => secret.clone(),
            None => {
                let digest = Sha256::digest(format!("stele webhook {}", self.config.token));
                // Telegram allows 1-256 characters of A-Z, a-z, 0-9, _ and -.
                digest.iter().map(|b| format!("{b:02x}")).collect()
            }
        }
    }

    /// The route Telegram posts updates to (the path of `webhook_url`), when webhooks are on.
    pub fn webhook_router(self: &Arc<Self>) -> anyhow::Result<Option<Router>> {
        let Some(url) = &self.config.webhook_url else {
            return Ok(None);
        };
        let url: url::Url = url
            .parse()
            .map_err(|e| anyhow::anyhow!("STELE_TELEGRAM_WEBHOOK_URL {url:?}: {e}"))?;
        let router = Router::new()
            .route(url.path(), post(receive))
            .with_state(self.clone());
        Ok(Some(router))
    }

    /// Tells Telegram where to post updates (`setWebhook`), trying again until it answers or
    /// `stopped`.
    pub(super) async fn set_webhook(&self, url: &str) -> anyhow::Result<()> {
        let url: url::Url = url.parse()?;
        let mut backoff = Duration::from_millis(500);
        loop {
            let request = self
                .bot
                .set_webhook(url.clone())
                .secret_token(self.webhook_secret());
            match request.await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "setWebhook failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        if let Ok(me) = self.bot.get_me().await {
            let _ = self
                .username
                .set(me.user.username.clone().unwrap_or_default());
        }
        if let Err(e) = self.register_commands().await {
            tracing::warn!(error = %e, "registering the bot's commands failed");
        }
        tracing::info!(bot = %self.bot_id, %url, "Telegram webhook set");
        Ok(())
    }
}

async fn receive(
    State(telegram): State<Arc<Telegram>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let given = headers
        .get(SECRET_HEADER)
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(telegram.webhook_secret().as_bytes())) {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(raw) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let Some(id) = raw.get("update_id").and_then(Value::as_i64) else {
        return StatusCode::BAD_REQUEST;
    };
    // From the bytes: teloxide reads an update's kind by borrowing its key, which a `Value`
    // cannot lend.
    let incoming = serde_json::from_slice::<Update>(&body).map_err(|_| (id, raw));
    match telegram.record_all(vec![incoming]).await {
        Ok(()) => StatusCode::OK,
        Err(e) => {
            // Telegram posts it again later.
            tracing::warn!(error = %e, update = id, "recording a webhook update failed");
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}
