//! The task list, from the `tasks` read model.

use crate::problem::ApiError;
use crate::routes::ops::bounded;
use crate::state::AppState;
use crate::wire::{RequesterBody, TaskListQuery, TaskPage, TaskSummary};

const STATUSES: [&str; 6] = [
    "pending",
    "routing",
    "executing",
    "completed",
    "failed",
    "cancelled",
];

pub async fn list(state: &AppState, query: TaskListQuery) -> Result<TaskPage, ApiError> {
    if let Some(status) = &query.status {
        if !STATUSES.contains(&status.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "unknown status {status:?} (expected one of: {})",
                    STATUSES.join(", ")
                ),
            ));
        }
    }
    let limit = bounded(query.limit, 50, 500)?;
    let page = stele_projections::list_tasks(
        &state.pool,
        &stele_projections::TaskQuery {
            status: query.status,
            workflow: query.workflow,
            requester: query.requester,
            channel: query.channel,
            cursor: query.cursor,
            limit,
        },
    )
    .await
    .map_err(list_error)?;
    Ok(TaskPage {
        tasks: page
            .tasks
            .into_iter()
            .map(|row| TaskSummary {
                id: row.task_id,
                status: row.status,
                workflow: row.workflow,
                run_id: row.run_id,
                requester: RequesterBody {
                    user_id: row.requester_user,
                    channel: row.requester_channel,
                },
                input: row.input,
                current_step: row.current_step,
                result: row.result,
                error: row.error,
                created_at: row.created_at,
                updated_at: row.updated_at,
            })
            .collect(),
        next_cursor: page.next_cursor,
    })
}

fn list_error(e: stele_projections::TaskViewError) -> ApiError {
    match e {
        e @ stele_projections::TaskViewError::InvalidCursor => {
            ApiError::bad_request("invalid_cursor", e.to_string())
        }
        other => ApiError::internal(other),
    }
}
