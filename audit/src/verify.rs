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
    // Reader tasks fetch the next pages (events, their leaves' positions, the stored hashes they
    // should produce) and hash their leaves, several at once, while this one folds the current
    // page into the tree. (The embedded store has one connection: this task lets go of it first.)
    drop(db);
    let (pages, mut incoming) = tokio::sync::mpsc::channel::<Result<Page, AuditError>>(READERS);
    let reader = tokio::spawn(read_pages(log, pool.clone(), sealed, pages));
    while let Some(page) = incoming.recv().await {
        let Page {
            records,
            leaves,
            stored,
        } = page?;
        for (i, &(position, leaf_hash)) in leaves.iter().enumerate() {
            report.events += 1;
            let sealed_position = records[i].1;
            if sealed_position != position {
                let what = if sealed_position < position {
                    format!(
                        "the event sealed as leaf {n} (position {sealed_position}) is not in the log: deleted or moved"
                    )
                } else {
                    format!(
                        "the event at position {position} was never sealed: inserted afterwards or moved (leaf {n} is position {sealed_position})"
                    )
                };
                report.mismatch = Some(Mismatch {
                    position: Some(sealed_position.min(position)),
                    leaf: Some(n),
                    checkpoint: None,
                    what,
                });
                return Ok(finish(report, started));
            }
            let new = tlog_tiles::stored_hashes_for_record_hash(n, leaf_hash, &hashes)
                .map_err(|e| AuditError::Tree(e.to_string()))?;
            let first = tlog_tiles::stored_hash_count(n);
            for (j, hash) in new.into_iter().enumerate() {
                let index = first + j as u64;
                if stored.get(&index) != Some(&hash) {
                    report.mismatch = Some(Mismatch {
                        position: Some(position),
                        leaf: Some(n),
                        checkpoint: None,
                        what: if j == 0 {
                            format!(
                                "the event at position {position} is not the one sealed: its stored bytes changed"
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
                        position: Some(position),
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
        if leaves.len() < records.len() {
            // The log ended before the page's leaves did.
            break;
        }
    }
    drop(incoming);
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

/// Pages read and hashed at once.
const READERS: usize = 3;

/// One page of the log with what the tree holds for it.
struct Page {
    /// The tree's leaves for the page: (leaf index, position sealed).
    records: Vec<(u64, Position)>,
    /// The log's events read for those leaves (fewer where the log ends): (position, leaf hash).
    leaves: Vec<(Position, Hash)>,
    /// The stored hashes the page's leaves should produce, by index.
    stored: HashMap<u64, Hash>,
}

/// Reads the tree's `sealed` leaves page by page, each with the log's events for them (read
/// after the previous leaf's position, since positions may have gaps) and the stored hashes they
/// should produce, [`READERS`] pages at once, and sends them in order until the tree ends or the
/// receiver is gone.
async fn read_pages(
    log: Arc<dyn EventLog>,
    pool: StorePool,
    sealed: u64,
    pages: tokio::sync::mpsc::Sender<Result<Page, AuditError>>,
) {
    let mut in_flight = std::collections::VecDeque::new();
    let mut n: u64 = 0;
    let mut after = Position::START;
    loop {
        while in_flight.len() < READERS && n < sealed {
            let count = PAGE.min((sealed - n) as usize);
            let records = match tree::records(&mut Db::from(&pool), n, count).await {
                Ok(records) if records.is_empty() => break,
                Ok(records) => records,
                Err(e) => {
                    in_flight.push_back(tokio::spawn(
                        async move { Err::<Page, AuditError>(e.into()) },
                    ));
                    break;
                }
            };
            let from = after;
            after = records.last().expect("a page has leaves").1;
            n += records.len() as u64;
            in_flight.push_back(tokio::spawn(read_page(
                log.clone(),
                pool.clone(),
                from,
                records,
            )));
        }
        let Some(next) = in_flight.pop_front() else {
            return;
        };
        let page = next
            .await
            .unwrap_or_else(|e| Err(AuditError::Tree(e.to_string())));
        let failed = page.is_err();
        if pages.send(page).await.is_err() || failed {
            return;
        }
    }
}

/// One page: the events after `after` for `records`, hashed, and the stored hashes they should
/// produce.
async fn read_page(
    log: Arc<dyn EventLog>,
    pool: StorePool,
    after: Position,
    records: Vec<(u64, Position)>,
) -> Result<Page, AuditError> {
    let first = records.first().map_or(0, |(n, _)| *n);
    let end = first + records.len() as u64;
    let events = log.read_all(after, records.len()).await?;
    let stored: HashMap<u64, Hash> = tree::range(
        &mut Db::from(&pool),
        tlog_tiles::stored_hash_count(first),
        tlog_tiles::stored_hash_count(end),
    )
    .await?
    .into_iter()
    .collect();
    let leaves = events
        .iter()
        .map(|event| (event.position, leaf::leaf_hash(event)))
        .collect();
    Ok(Page {
        records,
        leaves,
        stored,
    })
}

fn finish(mut report: Report, started: std::time::Instant) -> Report {
    report.seconds = started.elapsed().as_secs_f64();
    report
}
