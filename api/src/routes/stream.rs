//! Live progress of a task, as Server-Sent Events and over WebSocket.
//!
//! A follower reads the task's streams (the task, its run, the run's children as they are
//! started) after a cursor, so a client that connects late first gets what it missed, then live
//! events. The cursor is the last sequence delivered of each stream, in discovery order, joined
//! by `-` (e.g. `3-12-2-2`): it is each SSE event's `id`, so a dropped connection resumes with
//! `Last-Event-ID`, and it can be passed as `?after=`. Progress reaches a client whichever process
//! ran the step: followers wake on the log's append notifications (LISTEN/NOTIFY across
//! processes on PostgreSQL) and poll every second as a fallback.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use stele_engine::{EventLog, LogError, RecordedEvent, StreamId};
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

/// A cursor: the last sequence delivered of each stream. Exactly the document's form,
/// `^([0-9]{1,18}(-[0-9]{1,18})*)?$` (1 to 18 digits, no sign, per stream); empty means from the
/// start.
pub fn parse_cursor(cursor: &str) -> Result<Vec<i64>, ApiError> {
    if cursor.is_empty() {
        return Ok(Vec::new());
    }
    let sequence = |part: &str| {
        ((1..=18).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<i64>().ok())
            .flatten()
    };
    cursor
        .split('-')
        .map(sequence)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            ApiError::new(
                Code::InvalidCursor,
                format!("{cursor:?} is not a cursor from this task's stream"),
            )
        })
}

/// Follows one task's streams.
pub struct Follower {
    log: Arc<dyn EventLog>,
    streams: Vec<StreamId>,
    read: Vec<i64>,
    delivered: Vec<i64>,
    task_done: bool,
    run_done: bool,
}

impl Follower {
    /// Follows `task_id` after `delivered` (a [`parse_cursor`] result; empty: from the start).
    pub fn new(log: Arc<dyn EventLog>, task_id: &str, delivered: Vec<i64>) -> Self {
        Self {
            log,
            streams: vec![StreamId::new("task", task_id)],
            read: vec![0],
            delivered,
            task_done: false,
            run_done: false,
        }
    }

    fn cursor(&self) -> String {
        let parts: Vec<String> = (0..self.streams.len())
            .map(|i| self.delivered.get(i).copied().unwrap_or(0).to_string())
            .collect();
        parts.join("-")
    }

    fn discover(&mut self, event: &RecordedEvent) {
        let data = &event.payload["data"];
        let mut add = |stream: StreamId| {
            if !self.streams.contains(&stream) {
                self.streams.push(stream);
                self.read.push(0);
            }
        };
        match event.event_type.as_str() {
            "TaskRouted" => {
                if let Some(run) = data["run_id"].as_str() {
                    add(StreamId::new("workflow_run", run));
                }
            }
            "ChildrenStarted" => {
                for child in data["children"].as_array().into_iter().flatten() {
                    if let Some(run) = child["run_id"].as_str() {
                        add(StreamId::new("workflow_run", run));
                    }
                }
            }
            _ => {}
        }
        match (
            event.stream.aggregate_type.as_str(),
            event.event_type.as_str(),
        ) {
            ("task", "TaskCompleted" | "TaskFailed" | "TaskCancelled") => self.task_done = true,
            ("workflow_run", "RunCompleted" | "RunFailed" | "RunCancelled")
                if Some(&event.stream) == self.streams.get(1) =>
            {
                self.run_done = true
            }
            _ => {}
        }
    }

    /// Events not delivered yet, each with the cursor after it, in the order they were recorded
    /// (each stream's events stay in sequence order).
    pub async fn next_batch(&mut self) -> Result<Vec<(String, RecordedEvent)>, LogError> {
        let mut fresh = Vec::new();
        let mut i = 0;
        while i < self.streams.len() {
            let events = self.log.read_stream(&self.streams[i], self.read[i]).await?;
            for event in events {
                self.read[i] = event.sequence;
                self.discover(&event);
                if event.sequence > self.delivered.get(i).copied().unwrap_or(0) {
                    fresh.push((i, event));
                }
            }
            i += 1;
        }
        fresh.sort_by_key(|(_, e)| (e.recorded_at, e.position));
        let mut out = Vec::with_capacity(fresh.len());
        for (i, event) in fresh {
            if self.delivered.len() <= i {
                self.delivered.resize(i + 1, 0);
            }
            self.delivered[i] = event.sequence;
            out.push((self.cursor(), event));
        }
        Ok(out)
    }

    /// The task and its run are finished (a task without a run ends with the task).
    pub fn finished(&self) -> bool {
        self.task_done && (self.run_done || self.streams.len() == 1)
    }
}

/// Yields the follower's events until the task finishes, waking on appends.
fn follow(
    log: Arc<dyn EventLog>,
    mut follower: Follower,
) -> impl Stream<Item = Result<(String, RecordedEvent), LogError>> {
    async_stream::stream! {
        let mut appends = log.appends();
        loop {
            appends.borrow_and_update();
            match follower.next_batch().await {
                Ok(batch) => {
                    for item in batch {
                        yield Ok(item);
                    }
                }
                Err(e) => {
                    yield Err(e);
                    return;
                }
            }
            if follower.finished() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), appends.changed()).await;
        }
    }
}

async fn start(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: StreamQuery,
) -> Result<Follower, ApiError> {
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
    Ok(Follower::new(
        state.log.clone(),
        &id,
        header.or(after).unwrap_or_default(),
    ))
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
    let events = follow(state.log.clone(), follower);
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
    let log = state.log.clone();
    Ok(upgrade
        .on_upgrade(move |socket| send_events(socket, log, follower))
        .into_response())
}

async fn send_events(mut socket: WebSocket, log: Arc<dyn EventLog>, follower: Follower) {
    let events = follow(log, follower);
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
