//! `/v1/tasks`: create, list, read, cancel and signal tasks.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use stele_aggregates::channel::Channel;
use stele_aggregates::task::{InvalidInput, Requester, TaskInput};
use stele_engine::{CommandMeta, Position};
use stele_workflows::runtime::{Created, TaskView};
use uuid::Uuid;

use super::{parse_id, ApiPath, CanRead, CanWrite, NoQuery, StrictQuery};
use crate::json::{OptionalJson, StrictJson};
use crate::problem::{ApiError, Code, Problem};
use crate::state::AppState;
use crate::wire::*;

/// Names the idempotency keys of task creation apart from other UUIDv5 uses.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x5f1e_7a3b_9c2d_4e8f_a1b0_c3d4_e5f6_0718);

/// Longest `Idempotency-Key` accepted, in bytes (each is one visible ASCII character).
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// An `Idempotency-Key`: 1 to 200 visible ASCII characters (`!` to `~`), as the document's
/// pattern says.
fn idempotency_key(value: &axum::http::HeaderValue) -> Result<&str, ApiError> {
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY
        || !bytes.iter().all(|b| (b'!'..=b'~').contains(b))
    {
        return Err(ApiError::new(
            Code::InvalidIdempotencyKey,
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        ));
    }
    value
        .to_str()
        .map_err(|e| ApiError::new(Code::InvalidIdempotencyKey, e.to_string()))
}

pub fn body(view: &TaskView) -> TaskBody {
    TaskBody {
        id: view.task_id.to_string(),
        status: serde_json::to_value(view.task.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        input: view.task.input.text().to_owned(),
        workflow: view.task.workflow.clone(),
        requester: view.task.requester.as_ref().map(|r| RequesterBody {
            user_id: r.user_id.clone(),
            channel: r.channel.to_string(),
        }),
        result: view.task.result.as_ref().map(|r| r.json()),
        error: view.task.error.as_ref().map(|e| e.text().to_owned()),
        // A run the task was routed to that has not started (yet, or ever) holds nothing to show.
        run: view
            .run
            .as_ref()
            .filter(|run| run.started())
            .map(|run| RunBody {
                id: run.run_id.to_string(),
                workflow: run.workflow.clone(),
                version: run.version,
                status: run.status.as_str().to_owned(),
                current_step: run.current.as_ref().map(ToString::to_string),
                steps: run
                    .path
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter_map(|id| {
                        let step = run.step(id)?;
                        Some(StepBody {
                            id: id.to_string(),
                            status: format!("{:?}", step.status).to_lowercase(),
                            attempt: step.attempt.max(1),
                            output: step.output.clone(),
                            error: step.error.clone(),
                        })
                    })
                    .collect(),
                replies: run.replies.clone(),
            }),
    }
}

fn meta(caller: &crate::auth::Caller) -> CommandMeta {
    CommandMeta::new(format!("key:{}", caller.key_id), "api")
}

/// Create a task.
///
/// The task is recorded durably before the answer; its workflow starts right after. With an
/// `Idempotency-Key`, a repeated request with the same body answers the same task (200), and a
/// different body with the same key is refused (422).
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks",
    request_body = CreateTask,
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200, pattern = r"^[!-~]{1,200}$",
         description = "Makes retries safe: the same key and body give the same task. 1 to 200 visible ASCII characters"),
    ),
    responses(
        (status = 201, description = "Created", body = TaskBody,
         headers(("Location" = String, description = "The task's URL")),
         links(
            ("GetTask" = (operation_id = "get_task", parameters(("id" = "$response.body#/id")), description = "Read the task")),
            ("TaskEvents" = (operation_id = "task_events", parameters(("id" = "$response.body#/id")), description = "The task's history")),
            ("FollowTask" = (operation_id = "sse", parameters(("id" = "$response.body#/id")), description = "Follow the task's progress")),
            ("CancelTask" = (operation_id = "cancel_task", parameters(("id" = "$response.body#/id")), description = "Cancel the task")),
            ("SignalTask" = (operation_id = "signal_task", parameters(("id" = "$response.body#/id")), description = "Send the task's run a signal")),
         )),
        (status = 200, description = "Already created with this idempotency key", body = TaskBody,
         headers(("Location" = String, description = "The task's URL"))),
        (status = 400, description = "`malformed_json`, `json_too_deep`, `unreadable_body`: the body is not JSON; `invalid_idempotency_key`; `invalid_query`, `invalid_character`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`body_too_large`: the body is over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `invalid_input`, `input_too_long`, `invalid_requester`, `invalid_character`: the body breaks its schema; `unknown_workflow`; `unknown_model`: a chosen model is not one of its agent role's; `input_blocked`: the input sanitiser blocked the input (recorded on the task's stream); `idempotency_key_reused`: the key was used with another body; `unstorable_input`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn create_task(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    headers: HeaderMap,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<CreateTask>,
) -> Result<Response, ApiError> {
    let input = TaskInput::parse(request.input.clone()).map_err(|e| match e {
        InvalidInput::Empty => ApiError::new(Code::InvalidInput, "`input` is empty"),
        InvalidInput::TooLong(_) => ApiError::new(Code::InputTooLong, format!("`input`: {e}")),
        InvalidInput::Nul => ApiError::new(Code::InvalidCharacterInBody, format!("`input`: {e}")),
    })?;
    let requester = match &request.requester {
        Some(r) => Requester::parse(&r.user_id, &r.channel)
            .map_err(|e| ApiError::new(Code::InvalidRequester, format!("`requester`: {e}")))?,
        None => Requester {
            user_id: caller.name.clone(),
            channel: Channel::API,
        },
    };
    let mut meta = meta(&caller);
    if let Some(value) = headers.get("idempotency-key") {
        let key = idempotency_key(value)?;
        // One task per (key, idempotency key): its id is derived from them.
        let id = Uuid::new_v5(
            &IDEMPOTENCY_NAMESPACE,
            format!("{}:{key}", caller.key_id).as_bytes(),
        );
        meta = meta.with_command_id(id);
    }
    let created = state
        .runtime
        .create_task_from(
            input,
            requester.clone(),
            request.workflow.clone(),
            None,
            request.models.clone().unwrap_or_default(),
            meta,
        )
        .await?;
    let task_id = created.task_id().to_owned();
    let (status, answer) = match created {
        // Just recorded: answer from the request instead of reading it back.
        Created::New { task_id, workflow } => (
            StatusCode::CREATED,
            TaskBody {
                id: task_id.into_string(),
                status: if workflow.is_some() {
                    "executing"
                } else {
                    "pending"
                }
                .into(),
                input: request.input,
                workflow: workflow.or(request.workflow),
                requester: Some(RequesterBody {
                    user_id: requester.user_id,
                    channel: requester.channel.to_string(),
                }),
                result: None,
                error: None,
                run: None,
            },
        ),
        Created::Repeated(view) => (StatusCode::OK, body(&view)),
        Created::KeyReused(_) => {
            return Err(ApiError::new(
                Code::IdempotencyKeyReused,
                "this Idempotency-Key was used for a task with another body",
            ))
        }
    };
    let mut response = (status, Json(answer)).into_response();
    if let Ok(location) = format!("/v1/tasks/{task_id}").parse() {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, location);
    }
    Ok(response)
}

/// How fresh a read must be.
#[derive(Clone, Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Read the log itself rather than the server's in-memory view (which may be a few
    /// milliseconds behind).
    pub consistent: Option<bool>,
    /// The task as it was at this log position (its events up to it, replayed).
    #[param(minimum = 0)]
    pub at: Option<i64>,
}

/// Read a task with its run's progress.
///
/// Served from the server's in-memory view of recent tasks, which follows the log within
/// milliseconds; `?consistent=true` reads the log itself.
#[utoipa::path(
    get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), ReadQuery),
    responses(
        (status = 200, description = "The task", body = TaskBody),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn get_task(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    StrictQuery(query): StrictQuery<ReadQuery>,
) -> Result<Json<TaskBody>, ApiError> {
    let id = parse_id("task", &id)?.to_string();
    if let Some(at) = query.at {
        if at < 0 {
            return Err(ApiError::new(
                Code::InvalidQuery,
                "`at` is a position: 0 or more",
            ));
        }
        let view = state.runtime.task_at(&id, Position(at)).await?;
        return Ok(Json(body(&view)));
    }
    if !query.consistent.unwrap_or(false) {
        if let Some(view) = match &state.tasks {
            Some(cache) => cache.get(&id).await,
            None => None,
        } {
            return Ok(Json(body(&view)));
        }
    }
    let view = state.runtime.task(&id).await?;
    let answer = body(&view);
    if let Some(cache) = &state.tasks {
        cache.insert(view).await;
    }
    Ok(Json(answer))
}

/// Drops a task this request changed from the process's cache: its caller reads its own change.
async fn forget(state: &AppState, id: &str) {
    if let Some(cache) = &state.tasks {
        cache.invalidate(id).await;
    }
}

/// A task's full history: its events, its run's and its child runs', in order.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The events", body = TaskEvents),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn task_events(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<TaskEvents>, ApiError> {
    let id = parse_id("task", &id)?.to_string();
    let events = state.runtime.history(&id).await?;
    Ok(Json(TaskEvents {
        events: events.iter().map(EventBody::from).collect(),
    }))
}

/// Cancel a task, its run, its child runs and its queued steps.
#[utoipa::path(
    post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    request_body(content = Option<CancelBody>, description = "Optional: a reason. Leave the body out for none (`null` is not a body)"),
    responses(
        (status = 202, description = "Cancelling", body = Accepted),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`task_state`: the task is finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn cancel_task(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    OptionalJson(request): OptionalJson<CancelBody>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let id = parse_id("task", &id)?.to_string();
    let reason = request
        .reason
        .unwrap_or_else(|| format!("cancelled by key {}", caller.name));
    state
        .runtime
        .cancel_task(&id, reason, meta(&caller))
        .await?;
    forget(&state, &id).await;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            status: "cancelling".into(),
        }),
    ))
}

/// Send a signal (an approval, a reply) to a task's run.
#[utoipa::path(
    post, path = "/v1/tasks/{id}/signals/{name}", tag = "tasks",
    params(
        ("id" = Uuid, Path, description = "The task's id"),
        ("name" = String, Path, description = "The signal's name, as a `wait` step names it"),
    ),
    request_body(content = Option<SignalBody>, description = "Optional: a payload. Leave the body out for none (`null` is not a body)"),
    responses(
        (status = 202, description = "Recorded", body = Accepted),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`run_state`, `run_not_started`, `task_state`: the run is finished or not started", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn signal_task(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath((id, name)): ApiPath<(String, String)>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    OptionalJson(request): OptionalJson<SignalBody>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let id = parse_id("task", &id)?.to_string();
    state
        .runtime
        .signal_task(
            &id,
            name,
            request
                .payload
                .map_or(serde_json::Value::Null, serde_json::Value::Object),
            meta(&caller),
        )
        .await?;
    forget(&state, &id).await;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            status: "recorded".into(),
        }),
    ))
}

/// List tasks, newest first, with filters and cursor pagination.
#[utoipa::path(
    get, path = "/v1/tasks", tag = "tasks",
    params(TaskListQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage,
         links(
            ("GetTask" = (operation_id = "get_task", parameters(("id" = "$response.body#/tasks/0/id")), description = "Read the first task")),
            ("NextPage" = (operation_id = "list_tasks", parameters(("cursor" = "$response.body#/next_cursor")), description = "The next page")),
         )),
        (status = 400, description = "`invalid_query`: an unknown parameter, a wrong type or a value out of range; `invalid_cursor`; `invalid_character`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn list_tasks(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(query): StrictQuery<TaskListQuery>,
) -> Result<Json<TaskPage>, ApiError> {
    crate::routes::list::list(&state, query).await.map(Json)
}
