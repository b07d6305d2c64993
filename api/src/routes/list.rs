//! The task list, from the `tasks` read model.

use crate::problem::{ApiError, Code};
use crate::routes::ops::bounded;
use crate::state::AppState;
use crate::wire::{RequesterBody, TaskListQuery, TaskPage, TaskSummary};

pub async fn list(state: &AppState, query: TaskListQuery) -> Result<TaskPage, ApiError> {
    if let Some(cursor) = &query.cursor {
        if !is_cursor(cursor) {
            return Err(list_error(stele_projections::TaskViewError::InvalidCursor));
        }
    }
    let limit = bounded(query.limit, 50, 500)?;
    let page = stele_projections::list_tasks(
        &state.pool,
        &stele_projections::TaskQuery {
            status: query.status.map(|s| s.as_str().to_owned()),
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
            ApiError::new(Code::InvalidCursor, e.to_string())
        }
        other => ApiError::internal(other),
    }
}

/// Whether `cursor` has the form the document gives it (`^[0-9]{1,18}\\.([2-7][0-9a-f])+$`: a
/// position, then the task id's bytes in hex, each a printable ASCII character), the form of
/// every cursor this server hands out. Checked here so that the server takes exactly what the
/// document allows (and never looks up a task id with a control character, `NUL` above all).
fn is_cursor(cursor: &str) -> bool {
    let Some((position, hex)) = cursor.split_once('.') else {
        return false;
    };
    (1..=18).contains(&position.len())
        && position.bytes().all(|b| b.is_ascii_digit())
        && !hex.is_empty()
        && hex.len() % 2 == 0
        && hex.bytes().step_by(2).all(|b| (b'2'..=b'7').contains(&b))
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cursors_have_the_documented_form() {
        for good in ["1.30", "123456789012345678.2d41"] {
            assert!(super::is_cursor(good), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.",
            ".30",
            "1.3",
            "1.ff",
            "1.00",
            "1.1f",
            "1.3G",
            "1234567890123456789.30",
            "+1.30",
            "1.30.",
        ] {
            assert!(!super::is_cursor(bad), "{bad}");
        }
    }
}
