//! Schedules over HTTP: workflows started on a timetable. Reading needs `tasks:read`; creating,
//! pausing, resuming and removing `tasks:write` (a schedule starts tasks).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use stele_aggregates::schedule::{
    CatchUp, Overlap, Schedule, ScheduleError, ScheduleSpec, ScheduleStatus, Timing,
};
use stele_engine::CommandMeta;
use stele_workflows::runtime::{scheduled_task_id, RuntimeError};

use crate::json::StrictJson;
use crate::problem::{ApiError, Code, Problem};
use crate::routes::{ApiPath, CanRead, CanWrite, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{
    CatchUpBody, CreateSchedule, CronTiming, EveryTiming, OverlapBody, ScheduleBody, ScheduleList,
    ScheduleName, ScheduleStatusBody, TimingBody,
};

/// The most schedules a list answers.
const MAX_LISTED: usize = 1000;

fn meta(caller: &crate::auth::Caller) -> CommandMeta {
    CommandMeta::new(format!("key:{}", caller.key_id), "api")
}

fn refused(e: RuntimeError) -> ApiError {
    match e {
        RuntimeError::Schedule(e) => {
            let code = match e {
                ScheduleError::NotFound => Code::ScheduleNotFound,
                ScheduleError::AlreadyExists => Code::ScheduleExists,
                ScheduleError::Removed | ScheduleError::Paused | ScheduleError::NotPaused => {
                    Code::ScheduleState
                }
                ScheduleError::InvalidName
                | ScheduleError::InvalidTiming(_)
                | ScheduleError::NoWorkflow
                | ScheduleError::InvalidInput => Code::InvalidSchedule,
            };
            ApiError::new(code, e.to_string())
        }
        other => other.into(),
    }
}

/// The wire form of `schedule`.
pub fn body(schedule: Schedule) -> ScheduleBody {
    let spec = schedule.spec.unwrap_or(ScheduleSpec {
        timing: Timing::Every { seconds: 0 },
        workflow: String::new(),
        input: String::new(),
        catch_up: CatchUp::default(),
        overlap: Overlap::default(),
    });
    let (cron, timezone, every_seconds) = match spec.timing {
        Timing::Cron { pattern, timezone } => (Some(pattern), Some(timezone), None),
        Timing::Every { seconds } => (None, None, Some(seconds)),
    };
    ScheduleBody {
        last_task_id: schedule
            .last_fired
            .map(|due| scheduled_task_id(&schedule.name, due).to_string()),
        name: schedule.name,
        status: match schedule.status {
            ScheduleStatus::Paused => ScheduleStatusBody::Paused,
            ScheduleStatus::Removed => ScheduleStatusBody::Removed,
            ScheduleStatus::Active | ScheduleStatus::New => ScheduleStatusBody::Active,
        },
        cron,
        timezone,
        every_seconds,
        workflow: spec.workflow,
        input: spec.input,
        catch_up: match spec.catch_up {
            CatchUp::All => CatchUpBody::All,
            CatchUp::Latest => CatchUpBody::Latest,
            CatchUp::Skip => CatchUpBody::Skip,
        },
        overlap: match spec.overlap {
            Overlap::Skip => OverlapBody::Skip,
            Overlap::Allow => OverlapBody::Allow,
        },
        next_due: schedule.next_due,
        last_fired: schedule.last_fired,
        fired: schedule.fired,
        skipped: schedule.skipped,
    }
}

/// The timing a request describes.
pub fn timing_of(
    cron: Option<String>,
    timezone: Option<String>,
    every: Option<&str>,
) -> Result<Timing, String> {
    match (cron, every) {
        (Some(pattern), None) => Ok(Timing::Cron {
            pattern: pattern.trim().to_owned(),
            timezone: timezone
                .map(|t| t.trim().to_owned())
                .unwrap_or_else(|| "UTC".into()),
        }),
        (None, Some(every)) => {
            let duration = humantime::parse_duration(every.trim()).map_err(|e| {
                format!("`every` {every:?} is not a duration (as 90s, 15m, 1h 30m): {e}")
            })?;
            if duration.subsec_nanos() != 0 || duration.as_secs() == 0 {
                return Err(format!(
                    "`every` {every:?} is not a whole number of seconds, at least one"
                ));
            }
            Ok(Timing::Every {
                seconds: duration.as_secs(),
            })
        }
        _ => Err("give exactly one of `cron` and `every`".into()),
    }
}

async fn existing(state: &AppState, name: &str) -> Result<Schedule, ApiError> {
    state
        .runtime
        .schedule(name)
        .await
        .map_err(refused)?
        .ok_or_else(|| ApiError::new(Code::ScheduleNotFound, format!("no schedule {name:?}")))
}

enum Change {
    Pause,
    Resume,
    Remove,
}

/// Applies `change` to the existing schedule `name`.
async fn change(
    state: &AppState,
    caller: &crate::auth::Caller,
    name: &str,
    change: Change,
) -> Result<Schedule, ApiError> {
    existing(state, name).await?;
    let runtime = &state.runtime;
    let meta = meta(caller);
    match change {
        Change::Pause => runtime.pause_schedule(name, meta).await,
        Change::Resume => runtime.resume_schedule(name, meta).await,
        Change::Remove => runtime.remove_schedule(name, meta).await,
    }
    .map_err(refused)
}

/// The schedules (removed ones too, with their status), by name.
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules",
    responses((status = 200, description = "The schedules, by name", body = ScheduleList)),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn list_schedules(
    State(state): State<AppState>,
    _caller: CanRead,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ScheduleList>, ApiError> {
    let names = stele_projections::list_streams(
        &state.pool,
        Some(<Schedule as cqrs_es::Aggregate>::TYPE),
        MAX_LISTED,
    )
    .await
    .map_err(ApiError::internal)?;
    let mut schedules = Vec::with_capacity(names.len());
    for row in names {
        if let Some(schedule) = state
            .runtime
            .schedule(&row.aggregate_id)
            .await
            .map_err(refused)?
        {
            schedules.push(body(schedule));
        }
    }
    schedules.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(ScheduleList { schedules }))
}

/// Create a schedule: from now on it starts `workflow` with `input` at each moment of its
/// `timing`, a cron pattern (in a time zone) or an interval. Moments missed while no node runs are handled by
/// `catch_up`; a moment that comes while the last one's task still runs by `overlap`. Each
/// moment fires once across all nodes and restarts; each is recorded (`ScheduleFired`,
/// `ScheduleSkipped`) and its task's id is derived from the schedule and the moment.
#[utoipa::path(
    post, path = "/v1/schedules", tag = "schedules",
    request_body = CreateSchedule,
    responses(
        (status = 201, description = "Created", body = ScheduleBody),
        (status = 409, description = "`schedule_exists`: the name is taken (removed schedules keep theirs)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_schedule` (a pattern, time zone or interval that does not parse, or a pattern that never fires), `unknown_workflow`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn create_schedule(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<CreateSchedule>,
) -> Result<(StatusCode, Json<ScheduleBody>), ApiError> {
    let timing = match request.timing {
        TimingBody::Cron(CronTiming { cron, timezone }) => timing_of(Some(cron), timezone, None),
        TimingBody::Every(EveryTiming { every }) => timing_of(None, None, Some(&every)),
    }
    .map_err(|why| ApiError::new(Code::InvalidSchedule, why))?;
    let spec = ScheduleSpec {
        timing,
        workflow: request.workflow,
        input: request.input,
        catch_up: match request.catch_up.unwrap_or_default() {
            CatchUpBody::All => CatchUp::All,
            CatchUpBody::Latest => CatchUp::Latest,
            CatchUpBody::Skip => CatchUp::Skip,
        },
        overlap: match request.overlap.unwrap_or_default() {
            OverlapBody::Skip => Overlap::Skip,
            OverlapBody::Allow => Overlap::Allow,
        },
    };
    let schedule = state
        .runtime
        .create_schedule(&request.name, spec, meta(&caller))
        .await
        .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(body(schedule))))
}

/// A schedule.
#[utoipa::path(
    get, path = "/v1/schedules/{name}", tag = "schedules",
    params(ScheduleName),
    responses(
        (status = 200, description = "The schedule", body = ScheduleBody),
        (status = 404, description = "`schedule_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn get_schedule(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(ScheduleName { name }): ApiPath<ScheduleName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ScheduleBody>, ApiError> {
    Ok(Json(body(existing(&state, &name).await?)))
}

/// Pause a schedule: it fires no more until resumed (pausing a paused one changes nothing).
#[utoipa::path(
    post, path = "/v1/schedules/{name}/pause", tag = "schedules",
    params(ScheduleName),
    responses(
        (status = 200, description = "Paused", body = ScheduleBody),
        (status = 404, description = "`schedule_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`schedule_state`: it was removed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn pause_schedule(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(ScheduleName { name }): ApiPath<ScheduleName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ScheduleBody>, ApiError> {
    Ok(Json(body(
        change(&state, &caller, &name, Change::Pause).await?,
    )))
}

/// Resume a paused schedule: it fires next at its first moment from now (what it missed while
/// paused is not caught up).
#[utoipa::path(
    post, path = "/v1/schedules/{name}/resume", tag = "schedules",
    params(ScheduleName),
    responses(
        (status = 200, description = "Resumed", body = ScheduleBody),
        (status = 404, description = "`schedule_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`schedule_state`: it is not paused, or was removed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn resume_schedule(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(ScheduleName { name }): ApiPath<ScheduleName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<ScheduleBody>, ApiError> {
    Ok(Json(body(
        change(&state, &caller, &name, Change::Resume).await?,
    )))
}

/// Remove a schedule for good (its history stays in the log, its name stays taken; removing
/// it again changes nothing).
#[utoipa::path(
    delete, path = "/v1/schedules/{name}", tag = "schedules",
    params(ScheduleName),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "`schedule_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:write"]))
)]
pub async fn remove_schedule(
    State(state): State<AppState>,
    CanWrite(caller): CanWrite,
    ApiPath(ScheduleName { name }): ApiPath<ScheduleName>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<StatusCode, ApiError> {
    change(&state, &caller, &name, Change::Remove).await?;
    Ok(StatusCode::NO_CONTENT)
}
