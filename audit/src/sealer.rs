//! The sealer: appends each event of the log, in log order, to the audit tree, and signs a
//! checkpoint at least every `every` events, or at the end of a batch when the last checkpoint is
//! older than `interval`. It is a projection of the log as stored, whose batch and checkpoint
//! commit together, so the tree is always a prefix of the log; it is never rebuilt (its tables
//! are write-once).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stele_engine::log::LogTransaction;
use stele_engine::projection::{Projection, ProjectionError, Tables};
use stele_engine::store::sql::{Db, Value};
use stele_engine::RecordedEvent;

use crate::tree::{self, SQL};
use crate::{leaf, SigningKey};

/// The sealer's name (its checkpoint).
pub const AUDIT: &str = "audit";

/// When checkpoints are signed.
#[derive(Clone, Copy, Debug)]
pub struct SealerOptions {
    /// At least every this many events.
    pub every: u64,
    /// And at the end of a batch when the last one is older than this.
    pub interval: Duration,
}

impl Default for SealerOptions {
    fn default() -> Self {
        SealerOptions {
            every: 10_000,
            interval: Duration::from_secs(10),
        }
    }
}

/// The sealer (see the module's documentation).
pub struct Sealer {
    key: Arc<SigningKey>,
    options: SealerOptions,
}

impl Sealer {
    pub fn new(key: Arc<SigningKey>, options: SealerOptions) -> Sealer {
        Sealer { key, options }
    }
}

fn failed(e: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::Apply(format!("sealing the audit tree: {e}"))
}

#[async_trait]
impl Projection for Sealer {
    fn name(&self) -> &'static str {
        AUDIT
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    async fn create(&self, _: &mut dyn LogTransaction, _: &Tables) -> Result<(), ProjectionError> {
        // The tables (write-once, with their triggers) come with the migrations.
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn LogTransaction,
        _: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut db = Db::from(tx.connection());
        let start = tree::size(&mut db).await?;
        let mut hashes = tree::read(&mut db, &tree::frontier(start)).await?;
        let mut records = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len() * 2);
        for (offset, event) in events.iter().enumerate() {
            let n = start + offset as u64;
            let new = tlog_tiles::stored_hashes_for_record_hash(n, leaf::leaf_hash(event), &hashes)
                .map_err(failed)?;
            let first = tlog_tiles::stored_hash_count(n);
            for (i, hash) in new.into_iter().enumerate() {
                let index = first + i as u64;
                hashes.0.insert(index, hash);
                stored.push((index, tree::encode(&hash)));
            }
            records.push((n, event.position.0));
        }
        let sql = db.pick(&SQL);
        let rows: Vec<[Value; 2]> = records
            .iter()
            .map(|(n, position)| [(*n as i64).into(), (*position).into()])
            .collect();
        db.execute_rows(sql.insert_record, &rows).await?;
        let rows: Vec<[Value; 2]> = stored
            .iter()
            .map(|(index, hash)| [(*index as i64).into(), hash.into()])
            .collect();
        db.execute_rows(sql.insert_hash, &rows).await?;

        let size = start + events.len() as u64;
        let last = db.fetch_optional(sql.last_checkpoint, &[]).await?;
        let (last_size, last_at) = match &last {
            Some(row) => (row.get::<i64>("size")? as u64, Some(row.time("signed_at")?)),
            None => (0, None),
        };
        let stale = last_at.is_none_or(|at| {
            chrono::Utc::now() - at
                > chrono::Duration::from_std(self.options.interval).unwrap_or_default()
        });
        if size > last_size && (size - last_size >= self.options.every || stale) {
            let root = tlog_tiles::tree_hash(size, &hashes).map_err(failed)?;
            let note = self.key.sign(size, root).map_err(failed)?;
            tree::insert_checkpoint(&mut db, size, &tree::encode(&root), &note).await?;
        }
        Ok(())
    }
}
