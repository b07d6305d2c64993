//! Who may use the Telegram bot, over HTTP (`admin`): the recorded access list, and an id
//! allowed or denied (recorded, effective for the next message). The deployment's configured ids
//! (`STELE_TELEGRAM_ALLOW`) come on top of the recorded ones; a denial wins over both.

use axum::extract::State;
use axum::Json;
use stele_aggregates::access::{AccessCommand, AccessList};
use stele_engine::{CommandBus, CommandError, CommandMeta};

use crate::json::StrictJson;
use crate::problem::{ApiError, Code, Problem};
use crate::routes::{ApiPath, IsAdmin, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{AccessChange, AccessListBody, AccessRule};

/// The Telegram channel's access list stream.
const TELEGRAM: &str = "telegram";

fn bus(state: &AppState) -> CommandBus<AccessList> {
    CommandBus::new(state.log.clone(), ())
}

async fn list(state: &AppState) -> Result<AccessListBody, ApiError> {
    let (list, _) = bus(state)
        .load(TELEGRAM)
        .await
        .map_err(ApiError::internal)?;
    Ok(AccessListBody {
        allowed: list.allowed.into_iter().collect(),
        denied: list.denied.into_iter().collect(),
    })
}

/// The Telegram bot's recorded access list: ids allowed and denied at run time.
#[utoipa::path(
    get, path = "/v1/channels/telegram/access", tag = "operators",
    responses((status = 200, description = "The access list", body = AccessListBody)),
    security(("api_key" = ["admin"]))
)]
pub async fn telegram_access(
    State(state): State<AppState>,
    IsAdmin(_caller): IsAdmin,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<AccessListBody>, ApiError> {
    Ok(Json(list(&state).await?))
}

/// Allow or deny a Telegram user or chat id (recorded as `AccessAllowed` / `AccessDenied`;
/// the same again changes nothing).
#[utoipa::path(
    put, path = "/v1/channels/telegram/access/{id}", tag = "operators",
    params(("id" = i64, Path, description = "A Telegram user id (positive) or chat id")),
    request_body = AccessChange,
    responses(
        (status = 200, description = "The access list after the change", body = AccessListBody),
        (status = 400, description = "`invalid_id`: not a Telegram id (an integer)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["admin"]))
)]
pub async fn change_telegram_access(
    State(state): State<AppState>,
    IsAdmin(caller): IsAdmin,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(change): StrictJson<AccessChange>,
) -> Result<Json<AccessListBody>, ApiError> {
    let id = id
        .trim()
        .parse::<i64>()
        .map_err(|_| {
            ApiError::new(
                Code::InvalidId,
                format!("{id:?} is not a Telegram id (an integer, such as 123456789)"),
            )
        })?
        .to_string();
    let by = format!("key:{}", caller.key_id);
    let command = match change.access {
        AccessRule::Allow => AccessCommand::Allow { id, by: by.clone() },
        AccessRule::Deny => AccessCommand::Deny { id, by: by.clone() },
    };
    match bus(&state)
        .execute(TELEGRAM, command, CommandMeta::new(by, "api"))
        .await
    {
        Ok(_) => {}
        Err(CommandError::Rejected(refused)) => {
            return Err(ApiError::new(Code::InvalidId, refused.to_string()))
        }
        Err(e) => return Err(ApiError::internal(e)),
    }
    Ok(Json(list(&state).await?))
}
