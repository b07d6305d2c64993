//! Runs one test body against a fresh store of each backend (see `stele_engine::testing`).

#![allow(unused_imports)]

pub use stele_engine::for_each_backend;
pub use stele_engine::testing::{runtime, test_db, with_store, Kind};
