//! Read models built by replaying the event log: the streams view, the task list and the API
//! keys view.
//!
//! Each projection implements [`stele_engine::projection::Projection`] and owns the SQL of its
//! own tables; the engine's runner feeds it events and keeps its checkpoint.

mod api_keys;
mod streams;
mod tasks;

use std::sync::Arc;

use stele_engine::projection::Projection;

pub use api_keys::{list_keys, ApiKeysView, KeyRow};
pub use streams::{list_streams, StreamRow, StreamsView};
pub use tasks::{
    encode_cursor as task_cursor, finished_tasks, get_task_row, list_tasks, TaskPage, TaskQuery,
    TaskRow, TaskViewError, TasksView, MAX_LIMIT,
};

/// The projections Stele runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(StreamsView),
        Arc::new(TasksView),
        Arc::new(ApiKeysView),
        Arc::new(stele_privacy::index::SubjectIndex),
        Arc::new(stele_audit::view::AuditView),
    ]
}
