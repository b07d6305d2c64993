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
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use stele_engine::{LogError, RecordedEvent};
use stele_workflows::follow::{Cursor, TaskFollower};
use utoipa::IntoParams;

use super::{CanRead, StrictQuery};
use crate::problem::{ApiError, Problem};
use crate::state::AppState;
use crate::wire::EventBody;

/// Where to resume from.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A cursor from an earlier event (`Last-Event-ID` takes precedence); from the start when
    /// absent.
    pub after: Option<String>,
}

/// Yields the task's events after the follower's cursor until the task finishes, with each
/// event's cursor as a string.
fn follow(follower: TaskFollower) -> impl Stream<Item = Result<(String, RecordedEvent), LogError>> {
    futures::StreamExt::map(follower.follow(), |item| {
        item.map(|(cursor, event)| (cursor.to_string(), event))
    })
}

async fn start(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: StreamQuery,
) -> Result<TaskFollower, ApiError> {
    state.runtime.task(id).await?;
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.after)
        .map(|cursor| cursor.parse::<Cursor>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_cursor", e.to_string()))?;
    Ok(state.runtime.follower(id, cursor))
}

/// Follow a task's progress as Server-Sent Events.
///
/// Each event's `event` is the event type, its `data` the event (as in `/v1/tasks/{id}/events`)
/// and its `id` a cursor to resume from with `Last-Event-ID`. The stream ends with an `end`
/// event when the task and its run are finished.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/stream", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"), StreamQuery,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "The task's events, then live ones", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks tasks:read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn sse(
    State(state): State<AppState>,
    _caller: CanRead,
    Path(id): Path<String>,
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
    params(("id" = String, Path, description = "The task's id"), StreamQuery),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, description = "Invalid cursor, or not a WebSocket request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks tasks:read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn ws(
    State(state): State<AppState>,
    _caller: CanRead,
    Path(id): Path<String>,
    headers: HeaderMap,
    StrictQuery(query): StrictQuery<StreamQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let follower = start(&state, &id, &headers, query).await?;
    let upgrade = upgrade.map_err(|e| ApiError::bad_request("not_websocket", e.body_text()))?;
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
