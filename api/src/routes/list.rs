//! The task list, from the `task_list` read model. The rows hold people's data sealed, as the
//! log does: a page is opened in one pass before it is answered. A search (`q`) reads pages,
//! opens them and keeps the tasks that hold its words (see [`search`]).

use crate::problem::{ApiError, Code};
use crate::routes::ops::bounded;
use crate::state::AppState;
use crate::wire::{RequesterBody, TaskListQuery, TaskPage, TaskSummary};
use serde_json::Value;
use stele_aggregates::task::Requester;
use stele_privacy::export::plainly;

/// The most tasks one page of a search looks at.
const SEARCH_BUDGET: usize = 2_000;
/// Tasks read (and opened) at a time while searching.
const SEARCH_BATCH: usize = 250;

pub async fn list(state: &AppState, query: TaskListQuery) -> Result<TaskPage, ApiError> {
    if let Some(cursor) = &query.cursor {
        if !is_cursor(cursor) {
            return Err(list_error(stele_projections::TaskViewError::InvalidCursor));
        }
    }
    let limit = bounded(query.limit, 50, 500)?;
    let words = match &query.q {
        Some(q) if q.trim().is_empty() || q.chars().count() > 200 => {
            return Err(ApiError::new(
                Code::InvalidQuery,
                "`q` has 1 to 200 characters, not all white space",
            ))
        }
        Some(q) => Some(
            q.split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let filter = stele_projections::TaskQuery {
        status: query.status.map(|s| s.as_str().to_owned()),
        workflow: query.workflow,
        subject: subject_of(state, query.subject, query.requester, &query.channel).await?,
        channel: query.channel,
        created_after: query.created_after,
        created_before: query.created_before,
        cursor: query.cursor,
        limit,
    };
    match words {
        None => {
            let page = stele_projections::list_tasks(&state.pool, &filter)
                .await
                .map_err(list_error)?;
            Ok(TaskPage {
                tasks: opened(state, page.tasks).await?,
                next_cursor: page.next_cursor,
                searched: None,
            })
        }
        Some(words) => search(state, filter, &words).await,
    }
}

/// The subject a listing is narrowed to: the one named, or the person a requester is (the rows
/// name no one in the clear). A requester no one is matches no task.
async fn subject_of(
    state: &AppState,
    subject: Option<String>,
    requester: Option<String>,
    channel: &Option<String>,
) -> Result<Option<String>, ApiError> {
    Ok(match (subject, requester, state.runtime.subjects()) {
        (Some(subject), _, _) => Some(subject),
        (None, Some(user_id), Some(subjects)) => {
            let channel = channel.as_deref().unwrap_or("api");
            let found = match Requester::parse(&user_id, channel) {
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
    })
}

/// A page of the tasks (after the filters) that hold every word, looking at up to
/// [`SEARCH_BUDGET`] tasks.
///
/// Written as a scan, not an index: a task's input, requester, result and error are sealed with
/// their person's key, and an index of their words would be a readable copy that erasure would
/// have to chase. The scan opens rows as the page would, so it finds what the reader would see.
async fn search(
    state: &AppState,
    mut filter: stele_projections::TaskQuery,
    words: &[String],
) -> Result<TaskPage, ApiError> {
    let limit = filter.limit;
    let mut found = Vec::new();
    let mut searched = 0;
    let next_cursor = loop {
        filter.limit = SEARCH_BATCH.min(SEARCH_BUDGET - searched);
        let page = stele_projections::list_tasks(&state.pool, &filter)
            .await
            .map_err(list_error)?;
        let cursors: Vec<String> = page
            .tasks
            .iter()
            .map(stele_projections::task_cursor)
            .collect();
        let count = cursors.len();
        let tasks = opened(state, page.tasks).await?;
        let mut full_at = None;
        for (i, task) in tasks.into_iter().enumerate() {
            searched += 1;
            if holds(&task, words) {
                found.push(task);
                if found.len() == limit {
                    full_at = Some(i);
                    break;
                }
            }
        }
        match (full_at, page.next_cursor) {
            // The page is full: the search goes on after its last task, if any task is left.
            (Some(i), next) if i + 1 < count || next.is_some() => break Some(cursors[i].clone()),
            (_, None) => break None,
            (_, Some(next)) if searched >= SEARCH_BUDGET => break Some(next),
            (_, Some(next)) => filter.cursor = Some(next),
        }
    };
    Ok(TaskPage {
        tasks: found,
        next_cursor,
        searched: Some(searched),
    })
}

/// Whether every word (lower case) is in one of the task's texts, or begins its id (as the
/// short ids people copy do).
fn holds(task: &TaskSummary, words: &[String]) -> bool {
    let id = task.id.to_lowercase();
    let result = task.result.as_ref().map(Value::to_string);
    let texts: Vec<String> = [
        task.workflow.as_ref(),
        Some(&task.requester.user_id),
        Some(&task.input),
        result.as_ref(),
        task.error.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|text| text.to_lowercase())
    .collect();
    words.iter().all(|word| {
        id.starts_with(word.as_str()) || texts.iter().any(|text| text.contains(word.as_str()))
    })
}

/// The rows as the API answers them, their sealed values opened in one pass.
async fn opened(
    state: &AppState,
    rows: Vec<stele_projections::TaskRow>,
) -> Result<Vec<TaskSummary>, ApiError> {
    let mut sealed = Value::Array(
        rows.iter()
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
    if let Some(subjects) = state.runtime.subjects() {
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
    Ok(rows
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
        .collect())
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
