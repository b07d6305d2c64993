//! Verification: the tree recomputed from the log, against what the sealer stored and signed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use stele_engine::store::sql::Db;
use stele_engine::store::StorePool;
use stele_engine::{EventLog, Position};
use tlog_tiles::Hash;

use crate::tree::{self, Hashes};
use crate::{leaf, open_checkpoint, AuditError};

/// Events read from the log per page.
const PAGE: usize = 5_000;

/// The first place where the log and its audit tree differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The log position concerned, when there is one.
    pub position: Option<Position>,
    /// The leaf (0, 1, …) concerned, when there is one.
    pub leaf: Option<u64>,
    /// The checkpoint (tree size) concerned, when there is one.
    pub checkpoint: Option<u64>,
    /// What differs.
    pub what: String,
}

/// What verification found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Events of the log read.
    pub events: u64,
    /// Leaves the tree holds.
    pub sealed: u64,
    /// Checkpoints whose signature and root were checked.
    pub checkpoints: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// The first difference, if any.
    pub mismatch: Option<Mismatch>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.mismatch.is_none()
    }
}

/// Recomputes the audit tree from `log` (the log as stored), compares every leaf's position and
/// every stored hash with what `pool` holds, and checks every checkpoint's signature (with
/// `vkey`) and root. Stops at the first difference.
pub async fn verify(
    log: Arc<dyn EventLog>,
    pool: &StorePool,
    vkey: &str,
) -> Result<Report, AuditError> {
    let started = std::time::Instant::now();
    let mut db = Db::from(pool);
    let sealed = tree::size(&mut db).await?;
    let mut checkpoints: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut report = Report {
        events: 0,
        sealed,
        checkpoints: 0,
        seconds: 0.0,
        mismatch: None,
    };
    for stored in tree::checkpoints(&mut db).await? {
        match open_checkpoint(&stored.note, vkey) {
            Ok((size, root)) if size == stored.size => {
                if size > sealed {
                    report.mismatch = Some(Mismatch {
                        position: None,
                        leaf: None,
                        checkpoint: Some(size),
                        what: format!("a checkpoint signs {size} leaves; the tree has {sealed}"),
                    });
                    return Ok(finish(report, started));
                }
                checkpoints.insert(size, root);
            }
            Ok((size, _)) => {
                report.mismatch = Some(Mismatch {
                    position: None,
                    leaf: None,
                    checkpoint: Some(stored.size),
                    what: format!(
                        "the checkpoint stored for size {} signs size {size}",
                        stored.size
                    ),
                });
                return Ok(finish(report, started));
            }
            Err(e) => {
                report.mismatch = Some(Mismatch {
                    position: None,
                    leaf: None,
                    checkpoint: Some(stored.size),
                    what: e.to_string(),
                });
                return Ok(finish(report, started));
            }
        }
    }

    // Only the tree's right edge is kept in memory: enough to append and to compute roots.
    let mut hashes = Hashes(HashMap::new());
    let mut n: u64 = 0;
    // A reader task fetches the next pages (events, their leaves' positions, the stored hashes
    // they should produce) while this one hashes the current page.
    // (The embedded store has one connection: this task lets go of it first.)
    drop(db);
    let (pages, mut incoming) = tokio::sync::mpsc::channel::<Result<Page, AuditError>>(2);
    let reader = tokio::spawn(read_pages(log, pool.clone(), pages));
    while let Some(page) = incoming.recv().await {
        let Page {
            events,
            records,
            stored,
        } = page?;
        for (i, event) in events.iter().enumerate() {
            report.events += 1;
            let Some(&(_, sealed_position)) = records.get(i) else {
                // The log is longer than the tree: the sealer has not read the rest yet.
                return Ok(finish(report, started));
            };
            if sealed_position != event.position {
                let what = if sealed_position < event.position {
                    format!(
                        "the event sealed as leaf {n} (position {sealed_position}) is not in the log: deleted or moved"
                    )
                } else {
                    format!(
                        "the event at position {} was never sealed: inserted afterwards or moved (leaf {n} is position {sealed_position})",
                        event.position
                    )
                };
                report.mismatch = Some(Mismatch {
                    position: Some(sealed_position.min(event.position)),
                    leaf: Some(n),
                    checkpoint: None,
                    what,
                });
                return Ok(finish(report, started));
            }
            let new = tlog_tiles::stored_hashes_for_record_hash(n, leaf::leaf_hash(event), &hashes)
                .map_err(|e| AuditError::Tree(e.to_string()))?;
            let first = tlog_tiles::stored_hash_count(n);
            for (j, hash) in new.into_iter().enumerate() {
                let index = first + j as u64;
                if stored.get(&index) != Some(&hash) {
                    report.mismatch = Some(Mismatch {
                        position: Some(event.position),
                        leaf: Some(n),
                        checkpoint: None,
                        what: if j == 0 {
                            format!(
                                "the event at position {} is not the one sealed: its stored bytes changed",
                                event.position
                            )
                        } else {
                            format!(
                                "the tree's stored hash {index} differs from the one recomputed"
                            )
                        },
                    });
                    return Ok(finish(report, started));
                }
                hashes.0.insert(index, hash);
            }
            n += 1;
            if let Some(root) = checkpoints.get(&n) {
                let computed = tlog_tiles::tree_hash(n, &hashes)
                    .map_err(|e| AuditError::Tree(e.to_string()))?;
                if computed != *root {
                    report.mismatch = Some(Mismatch {
                        position: Some(event.position),
                        leaf: Some(n - 1),
                        checkpoint: Some(n),
                        what: format!("the checkpoint of size {n} signs another root"),
                    });
                    return Ok(finish(report, started));
                }
                report.checkpoints += 1;
            }
            if n.is_multiple_of(4096) {
                let keep: std::collections::HashSet<u64> = tree::frontier(n).into_iter().collect();
                hashes.0.retain(|index, _| keep.contains(index));
            }
        }
    }
    reader.await.map_err(|e| AuditError::Tree(e.to_string()))?;
    if n < sealed {
        let mut db = Db::from(pool);
        let missing = tree::records(&mut db, n, 1).await?;
        report.mismatch = Some(Mismatch {
            position: missing.first().map(|(_, p)| *p),
            leaf: Some(n),
            checkpoint: None,
            what: format!(
                "the tree holds {sealed} events and the log only {n}: the log lost its tail (from leaf {n})"
            ),
        });
    }
    Ok(finish(report, started))
}

/// One page of the log with what the tree holds for it.
struct Page {
    events: Vec<stele_engine::RecordedEvent>,
    records: Vec<(u64, Position)>,
    stored: HashMap<u64, Hash>,
}

/// Reads the log page by page, with the tree's leaves and stored hashes for each, until the log
/// ends or the receiver is gone.
async fn read_pages(
    log: Arc<dyn EventLog>,
    pool: StorePool,
    pages: tokio::sync::mpsc::Sender<Result<Page, AuditError>>,
) {
    let mut after = Position::START;
    let mut n: u64 = 0;
    loop {
        let page = async {
            let events = log.read_all(after, PAGE).await?;
            let mut db = Db::from(&pool);
            let records = tree::records(&mut db, n, events.len()).await?;
            let stored: HashMap<u64, Hash> = tree::range(
                &mut db,
                tlog_tiles::stored_hash_count(n),
                tlog_tiles::stored_hash_count(n + events.len() as u64),
            )
            .await?
            .into_iter()
            .collect();
            Ok::<_, AuditError>(Page {
                events,
                records,
                stored,
            })
        }
        .await;
        let last = match &page {
            Ok(page) => match page.events.last() {
                Some(last) => Some(last.position),
                None => return,
            },
            Err(_) => None,
        };
        if let Ok(page) = &page {
            n += page.events.len() as u64;
        }
        if pages.send(page).await.is_err() {
            return;
        }
        match last {
            Some(position) => after = position,
            None => return,
        }
    }
}

fn finish(mut report: Report, started: std::time::Instant) -> Report {
    report.seconds = started.elapsed().as_secs_f64();
    report
}
