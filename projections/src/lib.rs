//! Read models built by replaying the event log: views, the RAG memory and the audit view.
//!
//! Each projection implements [`stele_engine::projection::Projection`] and owns the SQL of its
//! own tables; the engine's runner feeds it events and keeps its checkpoint.

mod api_keys;
mod streams;

use std::sync::Arc;

use stele_engine::projection::Projection;

pub use api_keys::{list_keys, ApiKeysView, KeyRow};
pub use streams::{list_streams, StreamRow, StreamsView};

/// The projections Stele runs.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(StreamsView), Arc::new(ApiKeysView)]
}
