//! A task's workspaces over HTTP: the files its agents wrote and its sandboxed commands left,
//! listed and read after (or during) the run. They are the task's person's data, read with the
//! task's scope like its output.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use stele_tools::WorkspaceError;

use crate::problem::{ApiError, Code, Problem};
use crate::routes::{parse_id, ApiPath, CanRead, NoQuery, StrictQuery};
use crate::state::AppState;
use crate::wire::{RunWorkspace, TaskWorkspace, WorkspaceFile, WorkspaceFileQuery};

fn failed(e: WorkspaceError) -> ApiError {
    match e {
        WorkspaceError::Path(message) => ApiError::new(Code::InvalidQuery, message),
        WorkspaceError::NotFound(path) => ApiError::new(
            Code::FileNotFound,
            format!("no file {path} in the task's workspaces"),
        ),
        WorkspaceError::Erased => ApiError::new(
            Code::FileNotFound,
            "the task's person was erased: its files are gone",
        ),
        other => ApiError::internal(other),
    }
}

/// The files of a task's workspaces: what its agents wrote (`fs.write`, `fs.patch`) and its
/// sandboxed commands (`shell.run`) left, per run.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/workspace", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The files, per run", body = TaskWorkspace),
        (status = 404, description = "`task_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn task_workspace(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<TaskWorkspace>, ApiError> {
    let id = parse_id("task", &id)?.to_string();
    state.runtime.task(&id).await?;
    let runs = state.workspaces.runs_of_task(&id).await.map_err(failed)?;
    let mut out = Vec::new();
    for run in runs {
        match state.workspaces.list(&run).await {
            Ok(listing) => out.push(RunWorkspace {
                run_id: listing.run_id,
                erased: false,
                files: listing
                    .files
                    .into_iter()
                    .map(|f| WorkspaceFile {
                        path: f.path,
                        size: f.size as u64,
                        digest: f.digest,
                    })
                    .collect(),
            }),
            Err(WorkspaceError::Erased) => out.push(RunWorkspace {
                run_id: run,
                erased: true,
                files: Vec::new(),
            }),
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(Json(TaskWorkspace { runs: out }))
}

/// One file of a task's workspaces, as bytes (`application/octet-stream`).
#[utoipa::path(
    get, path = "/v1/tasks/{id}/workspace/file", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), WorkspaceFileQuery),
    responses(
        (status = 200, description = "The file's content", content_type = "application/octet-stream", body = Vec<u8>,
         headers(("X-Stele-Run" = String, description = "The run whose workspace holds it"))),
        (status = 400, description = "`invalid_query`: the path is not one a workspace holds (absolute, `..`, empty)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`task_not_found`; `file_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["tasks:read"]))
)]
pub async fn workspace_file(
    State(state): State<AppState>,
    _caller: CanRead,
    ApiPath(id): ApiPath<String>,
    StrictQuery(query): StrictQuery<WorkspaceFileQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id("task", &id)?.to_string();
    let path = stele_tools::workspace::clean_path(&query.path).map_err(failed)?;
    state.runtime.task(&id).await?;
    let (run, bytes) = state
        .workspaces
        .task_file(&id, query.run.as_deref(), &path)
        .await
        .map_err(failed)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::HeaderName::from_static("x-stele-run"), run),
        ],
        bytes,
    ))
}
