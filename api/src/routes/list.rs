//! The task list, from the `task_list` read model. The rows hold people's data sealed, as the
//! log does: a page is opened in one pass before it is answered.

use crate::problem::{ApiError, Code};
use crate::routes::ops::bounded;
use crate::state::AppState;
use crate::wire::{RequesterBody, TaskListQuery, TaskPage, TaskSummary};
use serde_json::Value;
use stele_aggregates::task::Requester;
use stele_privacy::export::plainly;

pub async fn list(state: &AppState, query: TaskListQuery) -> Result<TaskPage, ApiError> {
    if let Some(cursor) = &query.cursor {
        if !is_cursor(cursor) {
            return Err(list_error(stele_projections::TaskViewError::InvalidCursor));
        }
    }
    let limit = bounded(query.limit, 50, 500)?;
    let subjects = state.runtime.subjects();
    // A requester is found by their subject (the rows name no one in the clear).
    let subject = match (&query.subject, &query.requester, subjects) {
        (Some(subject), _, _) => Some(subject.clone()),
        (None, Some(user_id), Some(subjects)) => {
            let channel = query.channel.as_deref().unwrap_or("api");
            let found = match Requester::parse(user_id, channel) {
                Ok(requester) => match stele_privacy::subjects::identifier_of(&requester) {
                    Ok(identifier) => subjects
                        .find(&identifier)
                        .await
                        .map_err(ApiError::internal)?,
                    Err(_) => None,
                },
                Err(_) => None,
            };
            // No such person: no task matches (an id no subject has).
            Some(found.unwrap_or_else(|| "-".into()))
        }
        (None, Some(_), None) => Some("-".into()),
        (None, None, _) => None,
    };
    let page = stele_projections::list_tasks(
        &state.pool,
        &stele_projections::TaskQuery {
            status: query.status.map(|s| s.as_str().to_owned()),
            workflow: query.workflow,
            subject,
            channel: query.channel,
            cursor: query.cursor,
            limit,
        },
    )
    .await
    .map_err(list_error)?;
    // The page's sealed values, opened at once.
    let mut sealed = Value::Array(
        page.tasks
            .iter()
            .map(|row| {
                serde_json::json!([
                    row.requester,
                    row.input,
                    row.result.clone().unwrap_or(Value::Null),
                    row.error.clone().unwrap_or(Value::Null)
                ])
            })
            .collect(),
    );
    if let Some(subjects) = subjects {
        subjects
            .sealer()
            .open(&mut sealed)
            .await
            .map_err(ApiError::internal)?;
    }
    let opened = match plainly(&sealed) {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    };
    Ok(TaskPage {
        tasks: page
            .tasks
            .into_iter()
            .zip(opened)
            .map(|(row, opened)| {
                let text = |value: &Value| match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let requester = &opened[0];
                TaskSummary {
                    id: row.task_id,
                    status: row.status,
                    workflow: row.workflow,
                    run_id: row.run_id,
                    requester: RequesterBody {
                        user_id: requester
                            .get("user_id")
                            .map_or_else(|| text(requester), text),
                        channel: row.requester_channel,
                    },
                    input: text(&opened[1]),
                    current_step: row.current_step,
                    result: row.result.map(|_| opened[2].clone()),
                    error: row.error.map(|_| text(&opened[3])),
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                }
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
