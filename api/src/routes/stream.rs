//! Live progress of a task, as Server-Sent Events and over WebSocket.
//!
//! A [`TaskFollower`] reads the task's streams (the task, its run, the run's children as they are
//! started) after a cursor, so a client that connects late first gets what it missed, then live
//! events. The cursor ([`Cursor`], e.g. `3-12-2-2`) is each SSE event's `id`, so a dropped
//! connection resumes with `Last-Event-ID`, and it can be passed as `?after=`. Progress reaches a
//! client whichever process ran the step: followers wake on the log's append notifications
//! (LISTEN/NOTIFY across processes on PostgreSQL) and poll every second as a fallback.

use std::convert::Infallible;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use stele_engine::{LogError, RecordedEvent};
use stele_workflows::follow::{Cursor, TaskFollower};
use utoipa::IntoParams;

use super::{parse_id, ApiPath, CanRead, StrictQuery};
use crate::problem::{ApiError, Code, Problem};
use crate::state::AppState;
use crate::wire::{EventBody, SseStream};

/// Where to resume from.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A cursor from an earlier event (`Last-Event-ID` takes precedence); from the start when
    /// absent or empty.
    #[param(pattern = r"^([0-9]{1,18}(-[0-9]{1,18})*)?$")]
    pub after: Option<String>,
}

/// Yields the task's events after the follower's cursor until the task finishes, with each
/// event's cursor as a string.
fn follow(follower: TaskFollower) -> impl Stream<Item = Result<(String, RecordedEvent), LogError>> {
    futures::StreamExt::map(follower.follow(), |item| {
        item.map(|(cursor, event)| (cursor.to_string(), event))
    })
}

/// A cursor from a client: exactly the document's form (see [`Cursor`]).
fn parse_cursor(cursor: &str) -> Result<Cursor, ApiError> {
    cursor
        .parse::<Cursor>()
        .map_err(|e| ApiError::new(Code::InvalidCursor, e.to_string()))
}

async fn start(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: StreamQuery,
) -> Result<TaskFollower, ApiError> {
    let id = parse_id("task", id)?.to_string();
    state.runtime.task(&id).await?;
    // Both are checked; `Last-Event-ID` (what a reconnecting browser sends) wins.
    let after = query.after.as_deref().map(parse_cursor).transpose()?;
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        Code::InvalidCursor,
                        "Last-Event-ID is not a cursor from this task's stream",
                    )
                })
                .and_then(parse_cursor)
        })
        .transpose()?;
    Ok(state.runtime.follower(&id, header.or(after)))
}

/// Follow a task's progress as Server-Sent Events.
///
/// Each event's `event` is the event type, its `data` the event (as in `/v1/tasks/{id}/events`)
/// and its `id` a cursor to resume from with `Last-Event-ID`. The stream ends with an `end`
/// event when the task and its run are finished.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/stream", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), StreamQuery,
           ("Last-Event-ID" = Option<String>, Header, pattern = r"^([0-9]{1,18}(-[0-9]{1,18})*)?$",
            description = "Resume after this event (an event's `id`)")),
    responses(
        (status = 200, description = "The task's events, then live ones, until the task and its run are finished", content_type = "text/event-stream", body = SseStream),
        (status = 400, description = "`invalid_cursor`; `invalid_id`: not a task id (a UUID); `invalid_query`, `invalid_character`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn sse(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    StrictQuery(query): StrictQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let follower = start(&state, &id, &headers, query).await?;
    let events = follow(follower);
    let stream = async_stream::stream! {
        futures::pin_mut!(events);
        while let Some(item) = futures::StreamExt::next(&mut events).await {
            match item {
                Ok((cursor, event)) => {
                    let body = EventBody::from(&event);
                    let data = serde_json::to_string(&body).unwrap_or_default();
                    yield Ok(Event::default().id(cursor).event(event.event_type).data(data));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "task stream failed");
                    yield Ok(Event::default().event("error").data(e.to_string()));
                    return;
                }
            }
        }
        yield Ok(Event::default().event("end").data("{}"));
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Follow a task's progress over WebSocket.
///
/// Each text message is `{"cursor": …, "event": {…}}`; the server closes the socket when the
/// task and its run are finished. Resume with `?after=<cursor>`.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/ws", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), StreamQuery,
           ("Connection" = String, Header, pattern = "[Uu][Pp][Gg][Rr][Aa][Dd][Ee]", description = "The WebSocket handshake (RFC 6455): holds `upgrade` (any case)"),
           ("Upgrade" = String, Header, pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$", description = "The WebSocket handshake: `websocket` (any case)"),
           ("Sec-WebSocket-Version" = String, Header, pattern = "^13$", description = "The WebSocket handshake: `13`"),
           ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake: a base64 nonce")),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "`not_websocket`: not a WebSocket handshake; `invalid_cursor`; `invalid_id`: not a task id (a UUID); `invalid_query`, `invalid_character`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn ws(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    StrictQuery(query): StrictQuery<StreamQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let follower = start(&state, &id, &headers, query).await?;
    let upgrade = upgrade.map_err(|e| ApiError::new(Code::NotWebsocket, e.body_text()))?;
    Ok(upgrade
        .on_upgrade(move |socket| send_events(socket, follower))
        .into_response())
}

async fn send_events(mut socket: WebSocket, follower: TaskFollower) {
    let events = follow(follower);
    futures::pin_mut!(events);
    loop {
        tokio::select! {
            item = futures::StreamExt::next(&mut events) => match item {
                Some(Ok((cursor, event))) => {
                    let message = serde_json::json!({ "cursor": cursor, "event": EventBody::from(&event) });
                    if socket.send(Message::Text(message.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "task socket failed");
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
