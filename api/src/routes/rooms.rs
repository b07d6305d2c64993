//! Rooms over HTTP: several agents and people in one conversation (`docs/rooms.md`). Reading
//! needs `tasks:read`; opening a room, posting, taking a turn and moderating `tasks:write`. A
//! room's live view is a WebSocket of its events.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use stele_aggregates::room::{Room, RoomCommand, RoomError, Seat, TurnPolicy};
use stele_engine::{CommandMeta, EventLog, StreamId};
use stele_workflows::runtime::RuntimeError;
use utoipa::IntoParams;

use crate::json::StrictJson;
use crate::problem::{ApiError, Code, Problem};
use crate::routes::{ApiPath, CanRead, CanWrite, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{
    CreateRoom, EventBody, PostRoomMessage, RoomActionBody, RoomActionKind, RoomBody, RoomList,
    RoomMessageBody, RoomName, RoomPolicyBody, RoomQuery, RoomSummary, SeatView, TurnBody,
};

/// The most rooms a list answers.
const MAX_LISTED: usize = 1000;
/// Messages a room shows when `limit` is left out.
const DEFAULT_MESSAGES: u32 = 100;

fn meta(caller: &crate::auth::Caller) -> CommandMeta {
    CommandMeta::new(format!("key:{}", caller.key_id), "api")
}

/// A refusal of the room (or of the runtime around it) as a problem.
fn refused(e: RuntimeError) -> ApiError {
    match e {
        RuntimeError::Room(e) => {
            let code = match &e {
                RoomError::NotCreated => Code::RoomNotFound,
                RoomError::AlreadyCreated => Code::RoomExists,
                RoomError::Invalid(_) => Code::InvalidRoom,
                RoomError::NotModerator(_) => Code::NotModerator,
                RoomError::NotMember(_)
                | RoomError::Muted(_)
                | RoomError::NotItsTurn { .. }
                | RoomError::TurnBudget(_)
                | RoomError::NoMessage(_) => Code::RoomState,
            };
            ApiError::new(code, e.to_string())
        }
        RuntimeError::ModelsFailed(why) => ApiError::new(Code::ModelUnavailable, why),
        other => other.into(),
    }
}

async fn existing(state: &AppState, name: &str) -> Result<Room, ApiError> {
    state.runtime.room(name).await.map_err(|e| match e {
        RuntimeError::Room(RoomError::NotCreated) => {
            ApiError::new(Code::RoomNotFound, format!("no room {name:?}"))
        }
        other => refused(other),
    })
}

/// The wire form of `room`, with the messages `query` asks for.
pub fn body(room: &Room, query: &RoomQuery, now: chrono::DateTime<chrono::Utc>) -> RoomBody {
    let limit = query.limit.unwrap_or(DEFAULT_MESSAGES) as usize;
    let messages: Vec<RoomMessageBody> = match query.after {
        Some(after) => room
            .lines
            .iter()
            .filter(|l| l.seq > after)
            .take(limit)
            .map(message)
            .collect(),
        None => room.lines[room.lines.len().saturating_sub(limit)..]
            .iter()
            .map(message)
            .collect(),
    };
    let (policy, moderator_agent) = match &room.policy {
        TurnPolicy::RoundRobin => (RoomPolicyBody::RoundRobin, None),
        TurnPolicy::Addressed => (RoomPolicyBody::Addressed, None),
        TurnPolicy::Moderator { agent } => (RoomPolicyBody::Moderator, Some(agent.clone())),
    };
    RoomBody {
        name: room.name.clone(),
        topic: room.topic.clone(),
        agents: room
            .agents
            .iter()
            .map(|seat| SeatView {
                name: seat.name.clone(),
                role: seat.role.clone(),
                personality: seat.personality.clone(),
                traits: seat.traits.clone(),
                model: seat.model.clone(),
                muted: room.muted.contains(&seat.name),
                removed: room.removed.contains(&seat.name),
            })
            .collect(),
        moderators: room.moderators.clone(),
        policy,
        moderator_agent,
        turns_per_hour: room.turns_per_hour,
        turns_left: room.turns_left(now),
        turns: room.turns,
        next_speaker: room.next_speaker(),
        muted: room.muted.clone(),
        removed: room.removed.clone(),
        message_count: room.lines.len() as u64,
        messages,
    }
}

fn message(line: &stele_aggregates::room::Line) -> RoomMessageBody {
    RoomMessageBody {
        seq: line.seq,
        from: line.from.clone(),
        agent: line.agent,
        text: line.text.get().cloned(),
        at: line.at,
        pinned: line.pinned,
    }
}

/// The rooms, by name.
#[utoipa::path(
    get, path = "/v1/rooms", tag = "rooms",
    responses((status = 200, description = "The rooms, by name", body = RoomList)),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn list_rooms(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<RoomList>, ApiError> {
    let names = stele_projections::list_streams(
        &state.pool,
        Some(<Room as cqrs_es::Aggregate>::TYPE),
        MAX_LISTED,
    )
    .await
    .map_err(ApiError::internal)?;
    let mut rooms = Vec::with_capacity(names.len());
    for row in names {
        match state.runtime.room(&row.aggregate_id).await {
            Ok(room) => rooms.push(RoomSummary {
                agents: room.agents.iter().map(|s| s.name.clone()).collect(),
                message_count: room.lines.len() as u64,
                turns: room.turns,
                last_message_at: room.lines.last().map(|l| l.at),
                name: room.name,
                topic: room.topic,
            }),
            Err(RuntimeError::Room(RoomError::NotCreated)) => {}
            Err(e) => return Err(refused(e)),
        }
    }
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(RoomList { rooms }))
}

/// Open a room: its agents (each a seat with a role, a personality, traits and optionally a
/// model of its own), the people who moderate it, and who speaks next (`round_robin`,
/// `addressed`, or `moderator` with a `moderator_agent` that gives the floor). Recorded as
/// `RoomCreated` on the stream `room/<name>`.
#[utoipa::path(
    post, path = "/v1/rooms", tag = "rooms",
    request_body = CreateRoom,
    responses(
        (status = 201, description = "Opened", body = RoomBody),
        (status = 409, description = "`room_exists`: the name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_room` (two agents of one name, a moderator agent that is not one of the agents, …), `unknown_model` (an agent's role or model that is not configured)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn create_room(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<CreateRoom>,
) -> Result<(StatusCode, Json<RoomBody>), ApiError> {
    let policy = match (request.policy.unwrap_or_default(), request.moderator_agent) {
        (RoomPolicyBody::Moderator, Some(agent)) => TurnPolicy::Moderator { agent },
        (RoomPolicyBody::Moderator, None) => {
            return Err(ApiError::new(
                Code::InvalidRoom,
                "the `moderator` policy needs a `moderator_agent`",
            ))
        }
        (_, Some(_)) => {
            return Err(ApiError::new(
                Code::InvalidRoom,
                "`moderator_agent` goes with the `moderator` policy only",
            ))
        }
        (RoomPolicyBody::RoundRobin, None) => TurnPolicy::RoundRobin,
        (RoomPolicyBody::Addressed, None) => TurnPolicy::Addressed,
    };
    let agents = request
        .agents
        .into_iter()
        .map(|seat| Seat {
            name: seat.name,
            role: seat.role,
            personality: seat.personality.unwrap_or_default(),
            traits: seat
                .traits
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.0)
                .collect(),
            memory: None,
            model: seat.model,
        })
        .collect();
    let create = RoomCommand::Create {
        name: request.name.clone(),
        topic: request.topic.unwrap_or_default(),
        agents,
        moderators: request
            .moderators
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.0)
            .collect(),
        policy,
        turns_per_hour: request.turns_per_hour.unwrap_or(60),
    };
    state
        .runtime
        .room_command(&request.name, create, meta(&caller))
        .await
        .map_err(refused)?;
    let room = existing(&state, &request.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(body(&room, &RoomQuery::default(), state.runtime.now())),
    ))
}

/// A room: its agents (muted or removed), moderators, turns, and its messages — the latest
/// `limit` (100), or those after `after`.
#[utoipa::path(
    get, path = "/v1/rooms/{name}", tag = "rooms",
    params(RoomName, RoomQuery),
    responses(
        (status = 200, description = "The room", body = RoomBody),
        (status = 404, description = "`room_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn get_room(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(RoomName { name }): ApiPath<RoomName>,
    StrictQuery(query): StrictQuery<RoomQuery>,
) -> Result<Json<RoomBody>, ApiError> {
    if query.limit.is_some_and(|l| !(1..=1000).contains(&l)) {
        return Err(ApiError::new(Code::InvalidQuery, "`limit`: 1 to 1,000"));
    }
    let room = existing(&state, &name).await?;
    Ok(Json(body(&room, &query, state.runtime.now())))
}

/// A person says something in a room (`MessagePosted`). With `subject`, the words are that
/// person's data: sealed with their key, in their export, unreadable once they are erased.
#[utoipa::path(
    post, path = "/v1/rooms/{name}/messages", tag = "rooms",
    params(RoomName),
    request_body = PostRoomMessage,
    responses(
        (status = 201, description = "Posted", body = RoomMessageBody),
        (status = 404, description = "`room_not_found`, `subject_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`room_state`: the person is muted or removed; `subject_state`: the subject was erased", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_room`: `from` is one of the room's agents", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn post_message(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(RoomName { name }): ApiPath<RoomName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<PostRoomMessage>,
) -> Result<(StatusCode, Json<RoomMessageBody>), ApiError> {
    existing(&state, &name).await?;
    if let Some(subject) = &request.subject {
        let known = match state.runtime.subjects() {
            Some(subjects) => subjects.get(subject).await?,
            None => None,
        };
        match known {
            None => {
                return Err(ApiError::new(
                    Code::SubjectNotFound,
                    format!("no subject {subject:?}"),
                ))
            }
            Some(s) if s.erased.is_some() || s.merged_into.is_some() => {
                return Err(ApiError::new(
                    Code::SubjectState,
                    format!("the subject {subject:?} was erased or merged into another"),
                ))
            }
            Some(_) => {}
        }
    }
    let post = RoomCommand::Post {
        from: request.from.clone(),
        subject: request.subject,
        text: request.text,
        at: state.runtime.now(),
    };
    state
        .runtime
        .room_command(&name, post, meta(&caller))
        .await
        .map_err(refused)?;
    let room = existing(&state, &name).await?;
    let line = room
        .lines
        .iter()
        .rev()
        .find(|l| l.from == request.from && !l.agent)
        .ok_or_else(|| ApiError::internal("a posted message is not in its room"))?;
    Ok((StatusCode::CREATED, Json(message(line))))
}

/// Take one agent's turn now: whose, the room's policy says (under `moderator`, the moderator
/// agent is asked). Its words are recorded as `AgentSpoke`, with the model that answered and the
/// tokens used.
#[utoipa::path(
    post, path = "/v1/rooms/{name}/turns", tag = "rooms",
    params(RoomName),
    responses(
        (status = 201, description = "An agent spoke", body = TurnBody),
        (status = 404, description = "`room_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`room_state`: no agent may speak (all muted or removed), or the hour's turns are used", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "`model_unavailable`: no model answered for the agent (nothing is recorded)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn take_turn(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(RoomName { name }): ApiPath<RoomName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<(StatusCode, Json<TurnBody>), ApiError> {
    existing(&state, &name).await?;
    let Some(turn) = state
        .runtime
        .room_turn(&name, meta(&caller))
        .await
        .map_err(refused)?
    else {
        return Err(ApiError::new(
            Code::RoomState,
            "no agent may speak now: all are muted or removed, or the hour's turns are used",
        ));
    };
    let room = existing(&state, &name).await?;
    let seq = room
        .lines
        .iter()
        .rev()
        .find(|l| l.agent && l.from == turn.agent)
        .map_or(0, |l| l.seq);
    Ok((
        StatusCode::CREATED,
        Json(TurnBody {
            agent: turn.agent,
            text: turn.text,
            seq,
            model: turn.model,
            input_tokens: turn.input_tokens,
            output_tokens: turn.output_tokens,
        }),
    ))
}

/// A moderator's action: `mute`, `unmute` or `remove` a `member` (an agent, or a person who has
/// spoken), or `pin` message `seq`. Only the room's moderators may; each action is an event.
#[utoipa::path(
    post, path = "/v1/rooms/{name}/actions", tag = "rooms",
    params(RoomName),
    request_body = RoomActionBody,
    responses(
        (status = 200, description = "Done (doing it again changes nothing)", body = RoomBody),
        (status = 403, description = "`not_moderator`: `by` is not one of the room's moderators; `forbidden`: the key lacks the scope tasks:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`room_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`room_state`: no such member or message", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_room`: `pin` without `seq`, another action without `member`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn moderate(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(RoomName { name }): ApiPath<RoomName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<RoomActionBody>,
) -> Result<Json<RoomBody>, ApiError> {
    existing(&state, &name).await?;
    let by = request.by;
    let member = request.member.unwrap_or_default();
    let command = match request.action {
        RoomActionKind::Mute => RoomCommand::Mute { member, by },
        RoomActionKind::Unmute => RoomCommand::Unmute { member, by },
        RoomActionKind::Remove => RoomCommand::Remove { member, by },
        RoomActionKind::Pin => RoomCommand::Pin {
            seq: request.seq.unwrap_or_default(),
            by,
        },
    };
    state
        .runtime
        .room_command(&name, command, meta(&caller))
        .await
        .map_err(refused)?;
    let room = existing(&state, &name).await?;
    Ok(Json(body(
        &room,
        &RoomQuery::default(),
        state.runtime.now(),
    )))
}

/// Where a room's live view starts.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RoomStreamQuery {
    /// The last event's `sequence` already seen (from the start when left out).
    #[param(minimum = 0)]
    pub after: Option<i64>,
}

/// A room's live view over WebSocket: each text message is `{"sequence": …, "event": {…}}`, an
/// event of the room's stream (`RoomCreated`, `MessagePosted`, `AgentSpoke`, `MemberMuted`, …,
/// a person's words as they read, `[erased]` once they are erased), from the start or after
/// `?after=<sequence>`, then live as they are recorded by any node. The socket stays open until
/// the client closes it.
#[utoipa::path(
    get, path = "/v1/rooms/{name}/ws", tag = "rooms",
    params(RoomName, RoomStreamQuery,
           ("Connection" = String, Header, pattern = "[Uu][Pp][Gg][Rr][Aa][Dd][Ee]", description = "The WebSocket handshake (RFC 6455): holds `upgrade` (any case)"),
           ("Upgrade" = String, Header, pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$", description = "The WebSocket handshake: `websocket` (any case)"),
           ("Sec-WebSocket-Version" = String, Header, pattern = "^13$", description = "The WebSocket handshake: `13`"),
           ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake: a base64 nonce")),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "`not_websocket`: not a WebSocket handshake; `invalid_query`, `invalid_character`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`room_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn room_ws(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(RoomName { name }): ApiPath<RoomName>,
    StrictQuery(query): StrictQuery<RoomStreamQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if query.after.is_some_and(|a| a < 0) {
        return Err(ApiError::new(Code::InvalidQuery, "`after`: 0 or more"));
    }
    existing(&state, &name).await?;
    let upgrade = upgrade.map_err(|e| ApiError::new(Code::NotWebsocket, e.body_text()))?;
    let stream = StreamId::new(<Room as cqrs_es::Aggregate>::TYPE, name);
    let log = state.log.clone();
    let after = query.after.unwrap_or(0);
    Ok(upgrade
        .on_upgrade(move |socket| send_room(socket, log, stream, after))
        .into_response())
}

/// Sends the room's events after `after`, then each as it is recorded (woken by the log's append
/// notifications, reading anyway every second), until the client goes.
async fn send_room(
    mut socket: WebSocket,
    log: std::sync::Arc<dyn EventLog>,
    stream: StreamId,
    mut after: i64,
) {
    let mut appends = log.appends();
    loop {
        appends.borrow_and_update();
        match log.read_stream(&stream, after).await {
            Ok(events) => {
                for event in events {
                    after = event.sequence;
                    let message = serde_json::json!({
                        "sequence": event.sequence,
                        "event": EventBody::from(&event),
                    });
                    if socket
                        .send(Message::Text(message.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "room socket failed");
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(1), appends.changed()) => {}
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
