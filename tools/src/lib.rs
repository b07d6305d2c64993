//! Agents' tools that touch the world: a workspace per run (`fs.read`, `fs.write`, `fs.list`,
//! `fs.patch`), commands in a sandbox over that workspace (`shell.run`), and HTTP GETs to
//! allowed hosts (`web.fetch`). Each call's input and output are recorded in the step's events
//! by the runtime (sealed with the run's person, like the rest of the step); the workspace's files
//! stay in the store, readable after the run.

pub mod sandbox;
pub mod web;
pub mod workspace;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use stele_workflows::tools::{Caller, Tools};

pub use sandbox::{RunReport, Sandbox, SandboxLimits, SandboxMode};
pub use web::{Web, WebSettings};
pub use workspace::{Listing, Owner, WorkspaceEraser, WorkspaceError, WorkspaceLimits, Workspaces};

use workspace::{clean_dir, clean_path, FileEntry};

/// The names of the tools this crate registers.
pub const NAMES: [&str; 6] = [
    "fs.list",
    "fs.read",
    "fs.write",
    "fs.patch",
    "shell.run",
    "web.fetch",
];

/// Most bytes `fs.read` returns at once.
const MAX_READ: usize = 256 * 1024;

/// What the tools work on: the store's workspaces, the sandbox, the web client.
pub struct ToolHost {
    pub workspaces: Arc<Workspaces>,
    pub sandbox: Sandbox,
    pub web: Web,
}

fn owner(caller: &Caller) -> Owner {
    Owner {
        run_id: caller.run_id.as_str().to_owned(),
        task_id: caller.task_id.as_ref().map(|t| t.as_str().to_owned()),
        subject: caller.subject.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListInput {
    #[serde(default)]
    path: Option<String>,
}

#[derive(Serialize)]
struct ListOutput {
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadInput {
    path: String,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Serialize)]
struct ReadOutput {
    path: String,
    size: usize,
    content: String,
    truncated: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteInput {
    path: String,
    content: String,
}

#[derive(Serialize)]
struct WriteOutput {
    path: String,
    bytes: usize,
    created: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchInput {
    path: String,
    /// The exact text to replace.
    old: String,
    new: String,
    /// Replace every occurrence (otherwise `old` must occur exactly once).
    #[serde(default)]
    all: bool,
}

#[derive(Serialize)]
struct PatchOutput {
    path: String,
    replaced: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunInput {
    command: String,
    #[serde(default)]
    timeout_s: Option<u64>,
}

fn host_of(host: &Option<Arc<ToolHost>>) -> Result<Arc<ToolHost>, String> {
    host.clone()
        .ok_or_else(|| "this process has no workspace store: tools run on a node".to_owned())
}

/// `tools` with the workspace, shell and web tools on `host` (described only, failing when
/// called, without one: enough to check definitions that name them).
pub fn register(tools: Tools, host: Option<Arc<ToolHost>>) -> Tools {
    let h = host.clone();
    let tools = tools
        .register_for_caller("fs.list", move |input: ListInput, caller: Caller| {
            let host = host_of(&h);
            async move {
                let host = host?;
                let dir = clean_dir(input.path.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
                let snapshot = host
                    .workspaces
                    .read(caller.run_id.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let files = snapshot
                    .files
                    .under(&dir)
                    .map(|(path, bytes)| FileEntry {
                        path: path.clone(),
                        size: bytes.len(),
                        digest: workspace::digest_of(bytes),
                    })
                    .collect();
                Ok::<_, String>(ListOutput { files })
            }
        })
        .describe(
            "fs.list",
            "Lists the files of the run's workspace (all, or those under a folder).",
            json!({ "type": "object", "properties": { "path": { "type": "string", "description": "A folder of the workspace; the whole workspace when left out." } } }),
        );
    let h = host.clone();
    let tools = tools
        .register_for_caller("fs.read", move |input: ReadInput, caller: Caller| {
            let host = host_of(&h);
            async move {
                let host = host?;
                let path = clean_path(&input.path).map_err(|e| e.to_string())?;
                let mut snapshot = host
                    .workspaces
                    .read(caller.run_id.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let bytes = snapshot.files.0.remove(&path).ok_or_else(|| {
                    if snapshot.files.is_dir(&path) {
                        format!("{path} is a folder: list it with fs.list")
                    } else {
                        format!("no file {path} in the workspace")
                    }
                })?;
                let limit = input.limit.unwrap_or(MAX_READ).min(MAX_READ);
                let start = input.offset.min(bytes.len());
                let end = start.saturating_add(limit).min(bytes.len());
                Ok::<_, String>(ReadOutput {
                    path,
                    size: bytes.len(),
                    content: String::from_utf8_lossy(&bytes[start..end]).into_owned(),
                    truncated: end < bytes.len(),
                })
            }
        })
        .describe(
            "fs.read",
            "Reads a file of the run's workspace (as text; long files in parts with offset and limit).",
            json!({ "type": "object", "required": ["path"], "properties": {
                "path": { "type": "string", "description": "The file's path, relative to the workspace." },
                "offset": { "type": "integer", "minimum": 0, "description": "The byte to start at." },
                "limit": { "type": "integer", "minimum": 1, "description": "Most bytes to read (at most 262144)." } } }),
        );
    let h = host.clone();
    let tools = tools
        .register_for_caller("fs.write", move |input: WriteInput, caller: Caller| {
            let host = host_of(&h);
            async move {
                let host = host?;
                let path = clean_path(&input.path).map_err(|e| e.to_string())?;
                let bytes = input.content.into_bytes();
                let size = bytes.len();
                let created = host
                    .workspaces
                    .change(&owner(&caller), |files| files.write(path.clone(), bytes.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(WriteOutput {
                    path,
                    bytes: size,
                    created,
                })
            }
        })
        .describe(
            "fs.write",
            "Writes a file of the run's workspace (created, or replaced whole), making its folders.",
            json!({ "type": "object", "required": ["path", "content"], "properties": {
                "path": { "type": "string", "description": "The file's path, relative to the workspace." },
                "content": { "type": "string", "description": "The file's whole new content." } } }),
        );
    let h = host.clone();
    let tools = tools
        .register_for_caller("fs.patch", move |input: PatchInput, caller: Caller| {
            let host = host_of(&h);
            async move {
                let host = host?;
                let path = clean_path(&input.path).map_err(|e| e.to_string())?;
                if input.old.is_empty() {
                    return Err("`old` is empty: give the exact text to replace".to_owned());
                }
                let replaced = host
                    .workspaces
                    .change(&owner(&caller), |files| {
                        let bytes = files
                            .0
                            .get(&path)
                            .ok_or_else(|| WorkspaceError::NotFound(path.clone()))?;
                        let text = std::str::from_utf8(bytes).map_err(|_| {
                            WorkspaceError::Path(format!("{path} is not text: patch it by writing it whole"))
                        })?;
                        let count = text.matches(input.old.as_str()).count();
                        if count == 0 {
                            return Err(WorkspaceError::Path(format!(
                                "{path} does not contain the text to replace (read it again first)"
                            )));
                        }
                        if count > 1 && !input.all {
                            return Err(WorkspaceError::Path(format!(
                                "{path} contains the text to replace {count} times: give more context, or all = true"
                            )));
                        }
                        let text = text.replace(input.old.as_str(), &input.new);
                        files.0.insert(path.clone(), text.into_bytes());
                        Ok(count)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(PatchOutput { path, replaced })
            }
        })
        .describe(
            "fs.patch",
            "Replaces exact text in a file of the run's workspace (once, unless all is true).",
            json!({ "type": "object", "required": ["path", "old", "new"], "properties": {
                "path": { "type": "string" },
                "old": { "type": "string", "description": "The exact text to replace; it must occur once unless all is true." },
                "new": { "type": "string", "description": "The text to put in its place." },
                "all": { "type": "boolean" } } }),
        );
    let h = host.clone();
    let tools = tools
        .register_for_caller("shell.run", move |input: RunInput, caller: Caller| {
            let host = host_of(&h);
            async move {
                let host = host?;
                if input.command.trim().is_empty() {
                    return Err("the command is empty".to_owned());
                }
                let owner = owner(&caller);
                let before = host
                    .workspaces
                    .read(&owner.run_id)
                    .await
                    .map_err(|e| e.to_string())?
                    .files;
                let (report, after) = host
                    .sandbox
                    .run(&before, &input.command, input.timeout_s.map(Duration::from_secs))
                    .await
                    .map_err(|e| e.to_string())?;
                // The command's changes, applied over the workspace as it is now (another step
                // of the run may have changed other files meanwhile).
                host.workspaces
                    .change(&owner, |files| {
                        for path in &report.changed {
                            match after.0.get(path) {
                                Some(bytes) => {
                                    files.0.insert(path.clone(), bytes.clone());
                                }
                                None => {
                                    files.0.remove(path);
                                }
                            }
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::debug!(
                    run = %owner.run_id,
                    exit_code = ?report.exit_code,
                    timed_out = report.timed_out,
                    duration_ms = report.duration_ms,
                    "a sandboxed command ran"
                );
                Ok::<_, String>(report)
            }
        })
        .describe(
            "shell.run",
            "Runs a shell command (sh -c) in the run's workspace, in a sandbox without network; returns its exit code and output, and keeps the files it leaves.",
            json!({ "type": "object", "required": ["command"], "properties": {
                "command": { "type": "string", "description": "The command line, run by /bin/sh -c in the workspace." },
                "timeout_s": { "type": "integer", "minimum": 1, "description": "Seconds before it is killed (the node's default and maximum apply)." } } }),
        );
    let h = host;
    tools
        .register("web.fetch", move |input: web::FetchInput| {
            let host = host_of(&h);
            async move { host?.web.fetch(input).await }
        })
        .describe(
            "web.fetch",
            "Fetches a web page or file by HTTP GET, from the hosts this node allows; returns its status and text (cut at the size limit).",
            json!({ "type": "object", "required": ["url"], "properties": {
                "url": { "type": "string", "description": "An http or https URL on an allowed host." } } }),
        )
}
