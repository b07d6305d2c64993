//! Conversations over HTTP, read-only: Telegram chats and email threads with their messages in
//! and out, each reply's delivery state, and the task each message started (`tasks:read`, which
//! shows tasks' inputs too). Changing a conversation is its channel's business.

use axum::extract::State;
use axum::Json;
use stele_aggregates::conversation::{
    Conversation, ConversationStatus, Delivery, Message, MessageDirection,
};
use stele_engine::CommandBus;

use crate::problem::{ApiError, Code, Problem};
use crate::routes::{ApiPath, CanRead, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{
    ConversationBody, ConversationId, ConversationList, ConversationMessageBody, ConversationQuery,
    ConversationSummary,
};

/// Conversations a list shows when `limit` is left out.
const DEFAULT_LISTED: u32 = 50;

fn status(status: ConversationStatus) -> &'static str {
    match status {
        ConversationStatus::New => "new",
        ConversationStatus::Open => "open",
        ConversationStatus::Closed => "closed",
    }
}

async fn load(state: &AppState, id: &str) -> Result<Option<Conversation>, ApiError> {
    let bus: CommandBus<Conversation> = CommandBus::new(state.log.clone(), ());
    let (conversation, version) = bus.load(id).await.map_err(ApiError::internal)?;
    Ok((version > 0).then_some(conversation))
}

fn message(m: &Message) -> ConversationMessageBody {
    let (delivery, delivery_error) = match &m.delivery {
        Delivery::Received => ("received", None),
        Delivery::Queued => ("queued", None),
        Delivery::Delivered => ("delivered", None),
        Delivery::Failed { error, .. } => ("failed", Some(error.clone())),
        Delivery::Bounced { reason } => ("bounced", Some(reason.clone())),
    };
    ConversationMessageBody {
        seq: m.seq,
        direction: match m.direction {
            MessageDirection::Inbound => "inbound",
            MessageDirection::Outbound => "outbound",
        }
        .to_owned(),
        from: m.from.clone(),
        text: m.text.clone(),
        attachments: m.attachments.len() as u64,
        sent_at: m.sent_at,
        task_id: m.task_id.clone(),
        delivery: delivery.to_owned(),
        delivery_error,
        failed_attempts: m.failed_attempts,
        screened: m
            .screened
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_owned)),
        no_reply: m.no_reply.clone(),
    }
}

/// The conversations most recently active first (Telegram chats, email threads).
#[utoipa::path(
    get, path = "/v1/conversations", tag = "conversations",
    params(ConversationQuery),
    responses((status = 200, description = "The conversations, most recently active first", body = ConversationList)),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn list_conversations(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(query): StrictQuery<ConversationQuery>,
) -> Result<Json<ConversationList>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LISTED);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(Code::InvalidQuery, "`limit`: 1 to 200"));
    }
    let rows = stele_projections::list_streams(
        &state.pool,
        Some(<Conversation as cqrs_es::Aggregate>::TYPE),
        limit as usize,
    )
    .await
    .map_err(ApiError::internal)?;
    let mut conversations = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(c) = load(&state, &row.aggregate_id).await? {
            conversations.push(ConversationSummary {
                id: row.aggregate_id,
                channel: c.channel.as_ref().map(|ch| ch.as_str().to_owned()),
                status: status(c.status).to_owned(),
                message_count: c.messages.len() as u64,
                quarantined: c.quarantined,
                last_event_at: row.last_event_at,
            });
        }
    }
    Ok(Json(ConversationList { conversations }))
}

/// A conversation: its messages in and out, each reply's delivery state (queued, delivered,
/// failed with the error, bounced), what the input sanitiser did, and the task each belongs to.
/// A person's words read `[erased]` once they are erased.
#[utoipa::path(
    get, path = "/v1/conversations/{id}", tag = "conversations",
    params(ConversationId),
    responses(
        (status = 200, description = "The conversation", body = ConversationBody),
        (status = 404, description = "`conversation_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn get_conversation(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(ConversationId { id }): ApiPath<ConversationId>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ConversationBody>, ApiError> {
    let Some(c) = load(&state, &id).await? else {
        return Err(ApiError::new(
            Code::ConversationNotFound,
            format!("no conversation {id:?}"),
        ));
    };
    Ok(Json(ConversationBody {
        id,
        channel: c.channel.as_ref().map(|ch| ch.as_str().to_owned()),
        status: status(c.status).to_owned(),
        subject: c.subject.clone(),
        owner: c.owner.clone(),
        participants: c.participants.keys().cloned().collect(),
        quarantined: c.quarantined,
        close_reason: c.close_reason.clone(),
        messages: c.messages.iter().map(message).collect(),
    }))
}
