//! Proofs a third party can check with nothing but the log's public key: that an event is in a
//! signed tree (inclusion), and that a signed tree extends an earlier one (consistency), RFC 6962
//! §2.1. Their JSON form is documented in `docs/audit-log.md`.

use std::cell::RefCell;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use stele_engine::store::sql::Db;
use stele_engine::store::StorePool;
use stele_engine::{EventLog, Position};
use tlog_tiles::{Hash, HashReader};

use crate::tree::{self, Hashes};
use crate::{leaf, open_checkpoint, AuditError};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The proofs' format name.
pub const FORMAT: &str = "stele.audit-proof/1";

/// A proof, as exported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Proof {
    /// The event at `position` is leaf `leaf_index` of the tree the checkpoint signs.
    Inclusion {
        format: String,
        /// The signed checkpoint (a C2SP signed note).
        checkpoint: String,
        position: i64,
        leaf_index: u64,
        /// The event's canonical bytes (base64): its leaf hash is `SHA-256(0x00 ‖ bytes)`.
        event: String,
        /// The audit path, leaf to root (base64 hashes).
        path: Vec<String>,
    },
    /// The tree the newer checkpoint signs extends the tree the older one signs.
    Consistency {
        format: String,
        older: String,
        newer: String,
        path: Vec<String>,
    },
}

/// Records the stored-hash indexes a proof reads (the indexes depend on the sizes only).
struct Recorder(RefCell<Vec<u64>>);

impl HashReader for Recorder {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.0.borrow_mut().extend_from_slice(indexes);
        Ok(vec![Hash([0; 32]); indexes.len()])
    }
}

/// Runs `prove` with the stored hashes it needs, read in one query.
async fn with_hashes<T>(
    db: &mut Db<'_>,
    prove: impl Fn(&dyn HashReaderDyn) -> Result<T, tlog_tiles::Error>,
) -> Result<T, AuditError> {
    let recorder = Recorder(RefCell::new(Vec::new()));
    prove(&recorder).map_err(|e| AuditError::Tree(e.to_string()))?;
    let wanted = recorder.0.into_inner();
    let hashes = tree::read(db, &wanted).await?;
    if wanted.iter().any(|i| !hashes.0.contains_key(i)) {
        return Err(AuditError::Tree(
            "the tree lacks a stored hash the proof needs".into(),
        ));
    }
    prove(&hashes).map_err(|e| AuditError::Tree(e.to_string()))
}

/// `HashReader` as a trait object (the two passes read through different types).
trait HashReaderDyn {
    fn read(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error>;
}

impl<R: HashReader> HashReaderDyn for R {
    fn read(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.read_hashes(indexes)
    }
}

struct Dyn<'a>(&'a dyn HashReaderDyn);

impl HashReader for Dyn<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        self.0.read(indexes)
    }
}

/// The checkpoint of `size`, or the newest.
async fn checkpoint(
    db: &mut Db<'_>,
    size: Option<u64>,
) -> Result<tree::StoredCheckpoint, AuditError> {
    let all = tree::checkpoints(db).await?;
    match size {
        Some(size) => all
            .into_iter()
            .find(|c| c.size == size)
            .ok_or_else(|| AuditError::Tree(format!("no checkpoint of size {size}"))),
        None => all
            .into_iter()
            .last()
            .ok_or_else(|| AuditError::Tree("no checkpoint was signed yet".into())),
    }
}

/// The inclusion proof of the event at `position` in the checkpoint of `size` (the newest by
/// default). `log` is the log as stored.
pub async fn prove_inclusion(
    log: &dyn EventLog,
    pool: &StorePool,
    position: Position,
    size: Option<u64>,
) -> Result<Proof, AuditError> {
    let mut db = Db::from(pool);
    let leaf_index = tree::record_of(&mut db, position)
        .await?
        .ok_or_else(|| AuditError::Tree(format!("no sealed event at position {position}")))?;
    let checkpoint = checkpoint(&mut db, size).await?;
    prove_leaf(log, &mut db, position, leaf_index, &checkpoint).await
}

/// The inclusion proof of the event at `position`, sealed as leaf `leaf_index`, in `checkpoint`.
async fn prove_leaf(
    log: &dyn EventLog,
    db: &mut Db<'_>,
    position: Position,
    leaf_index: u64,
    checkpoint: &tree::StoredCheckpoint,
) -> Result<Proof, AuditError> {
    if leaf_index >= checkpoint.size {
        return Err(AuditError::Tree(format!(
            "the event at position {position} was sealed after the checkpoint of size {}",
            checkpoint.size
        )));
    }
    // The log is read after the previous leaf's event (positions may have gaps).
    let before = match leaf_index {
        0 => Position::START,
        n => tree::records(db, n - 1, 1)
            .await?
            .first()
            .map_or(Position::START, |(_, p)| *p),
    };
    let event = log
        .read_all(before, 1)
        .await
        .ok()
        .and_then(|events| events.into_iter().next())
        .filter(|e| e.position == position)
        .ok_or_else(|| AuditError::Tree(format!("no event at position {position} in the log")))?;
    let t = checkpoint.size;
    let path = with_hashes(db, |r| tlog_tiles::prove_record(t, leaf_index, &Dyn(r))).await?;
    Ok(Proof::Inclusion {
        format: FORMAT.into(),
        checkpoint: checkpoint.note.clone(),
        position: position.0,
        leaf_index,
        event: BASE64.encode(leaf::leaf_bytes(&event)),
        path: path.iter().map(tree::encode).collect(),
    })
}

/// The consistency proof between the checkpoints of sizes `older` and `newer`.
pub async fn prove_consistency(
    pool: &StorePool,
    older: u64,
    newer: u64,
) -> Result<Proof, AuditError> {
    let mut db = Db::from(pool);
    let old = checkpoint(&mut db, Some(older)).await?;
    let new = checkpoint(&mut db, Some(newer)).await?;
    if older > newer {
        return Err(AuditError::Tree(
            "the older checkpoint must be the smaller".into(),
        ));
    }
    let path = with_hashes(&mut db, |r| tlog_tiles::prove_tree(newer, older, &Dyn(r))).await?;
    Ok(Proof::Consistency {
        format: FORMAT.into(),
        older: old.note,
        newer: new.note,
        path: path.iter().map(tree::encode).collect(),
    })
}

fn hashes(path: &[String]) -> Result<Vec<Hash>, AuditError> {
    path.iter()
        .map(|h| tree::decode(h).ok_or_else(|| AuditError::Tree(format!("{h:?} is not a hash"))))
        .collect()
}

/// What a checked proof establishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Checked {
    /// The tree size(s) the proof holds against.
    pub sizes: Vec<u64>,
    /// For an inclusion proof: the event's position and leaf.
    pub position: Option<i64>,
    pub leaf_index: Option<u64>,
}

/// Checks `proof` with nothing but the log's verifier key `vkey`.
pub fn check(proof: &Proof, vkey: &str) -> Result<Checked, AuditError> {
    match proof {
        Proof::Inclusion {
            checkpoint,
            position,
            leaf_index,
            event,
            path,
            ..
        } => {
            let (size, root) = open_checkpoint(checkpoint, vkey)?;
            let bytes = BASE64
                .decode(event)
                .map_err(|_| AuditError::Tree("the event's bytes are not base64".into()))?;
            // The bytes name their own position: a proof for one event cannot be passed off
            // as another's.
            let named = bytes
                .get(leaf::DOMAIN.len()..leaf::DOMAIN.len() + 8)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes);
            if !bytes.starts_with(leaf::DOMAIN) || named != Some(*position) {
                return Err(AuditError::Tree(format!(
                    "the proof's event is not the one at position {position}"
                )));
            }
            tlog_tiles::check_record(
                &hashes(path)?,
                size,
                root,
                *leaf_index,
                tlog_tiles::record_hash(&bytes),
            )
            .map_err(|_| {
                AuditError::Tree(format!(
                    "the audit path does not lead from the event to the root of the {size}-leaf tree"
                ))
            })?;
            Ok(Checked {
                sizes: vec![size],
                position: Some(*position),
                leaf_index: Some(*leaf_index),
            })
        }
        Proof::Consistency {
            older, newer, path, ..
        } => {
            let (old_size, old_root) = open_checkpoint(older, vkey)?;
            let (new_size, new_root) = open_checkpoint(newer, vkey)?;
            tlog_tiles::check_tree(&hashes(path)?, new_size, new_root, old_size, old_root)
                .map_err(|_| {
                    AuditError::Tree(format!(
                        "the {new_size}-leaf tree is not shown to extend the {old_size}-leaf one"
                    ))
                })?;
            Ok(Checked {
                sizes: vec![old_size, new_size],
                position: None,
                leaf_index: None,
            })
        }
    }
}

/// Signs a checkpoint of the tree as it is now, if it has grown since the last one (for the
/// node's timer: the sealer signs only when events arrive). Returns the size signed.
pub async fn checkpoint_now(
    pool: &StorePool,
    key: &crate::SigningKey,
) -> Result<Option<u64>, AuditError> {
    let mut db = Db::from(pool);
    let size = tree::size(&mut db).await?;
    let last = tree::checkpoints(&mut db)
        .await?
        .last()
        .map_or(0, |c| c.size);
    if size <= last {
        return Ok(None);
    }
    let hashes: Hashes = tree::read(&mut db, &tree::frontier(size)).await?;
    let root = tlog_tiles::tree_hash(size, &hashes).map_err(|e| AuditError::Tree(e.to_string()))?;
    let note = key.sign(size, root)?;
    tree::insert_checkpoint(&mut db, size, &tree::encode(&root), &note).await?;
    Ok(Some(size))
}

/// Inclusion proofs for a set of events against one signed checkpoint: what an export carries
/// so that whoever receives it can check, with the log's public key alone, that each of its
/// events is in the log as it was signed.
#[derive(Clone, Debug, Serialize)]
pub struct Attestation {
    pub format: &'static str,
    /// The newest signed checkpoint, which every proof holds against.
    pub checkpoint: String,
    pub tree_size: u64,
    /// One inclusion proof per event sealed in that tree, in the order asked.
    pub proofs: Vec<Proof>,
    /// Events not yet in the signed tree (appended just before the export): the next
    /// checkpoint covers them.
    pub pending: Vec<i64>,
}

/// Inclusion proofs of the events at `positions` in the newest checkpoint; `None` when no
/// checkpoint was signed yet. `log` is the log as stored.
pub async fn attest(
    log: &dyn EventLog,
    pool: &StorePool,
    positions: &[Position],
) -> Result<Option<Attestation>, AuditError> {
    let mut db = Db::from(pool);
    let newest = match checkpoint(&mut db, None).await {
        Ok(newest) => newest,
        Err(AuditError::Tree(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut proofs = Vec::with_capacity(positions.len());
    let mut pending = Vec::new();
    for &position in positions {
        match tree::record_of(&mut db, position).await? {
            Some(leaf) if leaf < newest.size => {
                proofs.push(prove_leaf(log, &mut db, position, leaf, &newest).await?)
            }
            _ => pending.push(position.0),
        }
    }
    Ok(Some(Attestation {
        format: FORMAT,
        checkpoint: newest.note,
        tree_size: newest.size,
        proofs,
        pending,
    }))
}
