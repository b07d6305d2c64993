//! The audit tree as stored: leaves (`audit_records`), stored hashes (`audit_hashes`, in the
//! layout of Go's `tlog`, which `tlog_tiles` implements), signed checkpoints
//! (`audit_checkpoints`). The Merkle arithmetic is `tlog_tiles`'s; this module reads and writes
//! its hashes.

use std::collections::HashMap;

use base64::Engine as _;
use stele_engine::store::sql::{Db, Dialects, Row};
use stele_engine::Position;
use tlog_tiles::{Hash, HashReader};

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A hash as stored (base64).
pub fn encode(hash: &Hash) -> String {
    BASE64.encode(hash.0)
}

/// A stored hash.
pub fn decode(text: &str) -> Option<Hash> {
    let bytes = BASE64.decode(text).ok()?;
    Some(Hash(bytes.try_into().ok()?))
}

/// Hashes in memory, by stored-hash index: what a batch reads and writes.
#[derive(Default)]
pub struct Hashes(pub HashMap<u64, Hash>);

impl HashReader for Hashes {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.0
                    .get(i)
                    .copied()
                    .ok_or(tlog_tiles::Error::InvalidInput(format!(
                        "stored hash {i} is not at hand"
                    )))
            })
            .collect()
    }
}

/// The stored-hash indexes that [`tlog_tiles::stored_hashes`] may read to append records from
/// `size` on: the roots of the complete subtrees on the tree's right edge.
pub fn frontier(size: u64) -> Vec<u64> {
    (0..64u8)
        .filter_map(|level| {
            let count = size >> level;
            (count > 0).then(|| tlog_tiles::stored_hash_index(level, count - 1))
        })
        .collect()
}

pub(crate) struct Statements {
    pub size: &'static str,
    pub hashes: &'static str,
    pub hash_range: &'static str,
    pub insert_record: &'static str,
    pub insert_hash: &'static str,
    pub last_checkpoint: &'static str,
    pub insert_checkpoint: &'static str,
    pub checkpoints: &'static str,
    pub records: &'static str,
    pub record_of: &'static str,
}

pub(crate) const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        size: "SELECT COALESCE(MAX(idx) + 1, 0) AS size FROM audit_records",
        hashes: "SELECT idx, hash FROM audit_hashes WHERE idx = ANY($1::int8[])",
        hash_range: "SELECT idx, hash FROM audit_hashes WHERE idx >= $1 AND idx < $2 ORDER BY idx",
        insert_record: "INSERT INTO audit_records (idx, position) \
                        SELECT * FROM UNNEST($1::int8[], $2::int8[])",
        insert_hash:
            "INSERT INTO audit_hashes (idx, hash) SELECT * FROM UNNEST($1::int8[], $2::text[])",
        last_checkpoint: "SELECT size, signed_at FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
        insert_checkpoint: "INSERT INTO audit_checkpoints (size, root, note) VALUES ($1, $2, $3) \
                            ON CONFLICT (size) DO NOTHING",
        checkpoints: "SELECT size, root, note, signed_at FROM audit_checkpoints ORDER BY size",
        records: "SELECT idx, position FROM audit_records WHERE idx >= $1 ORDER BY idx LIMIT $2",
        record_of: "SELECT idx FROM audit_records WHERE position = $1",
    },
    sqlite: Statements {
        size: "SELECT COALESCE(MAX(idx) + 1, 0) AS size FROM audit_records",
        hashes: "SELECT idx, hash FROM audit_hashes \
                 WHERE idx IN (SELECT CAST(value AS INTEGER) FROM json_each($1))",
        hash_range: "SELECT idx, hash FROM audit_hashes WHERE idx >= $1 AND idx < $2 ORDER BY idx",
        insert_record: "INSERT INTO audit_records (idx, position) VALUES ($1, $2)",
        insert_hash: "INSERT INTO audit_hashes (idx, hash) VALUES ($1, $2)",
        last_checkpoint: "SELECT size, signed_at FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
        insert_checkpoint: "INSERT INTO audit_checkpoints (size, root, note, signed_at) \
                            VALUES ($1, $2, $3, $4) ON CONFLICT (size) DO NOTHING",
        checkpoints: "SELECT size, root, note, signed_at FROM audit_checkpoints ORDER BY size",
        records: "SELECT idx, position FROM audit_records WHERE idx >= $1 ORDER BY idx LIMIT $2",
        record_of: "SELECT idx FROM audit_records WHERE position = $1",
    },
};

/// How many leaves the stored tree has.
pub async fn size(db: &mut Db<'_>) -> Result<u64, sqlx::Error> {
    let sql = db.pick(&SQL);
    let row = db.fetch_one(sql.size, &[]).await?;
    Ok(row.get::<i64>("size")? as u64)
}

fn hash_row(row: &Row) -> Result<(u64, Hash), sqlx::Error> {
    let idx = row.get::<i64>("idx")? as u64;
    let text: String = row.get("hash")?;
    let hash = decode(&text).ok_or_else(|| {
        sqlx::Error::Decode(format!("stored audit hash {idx} is not a hash").into())
    })?;
    Ok((idx, hash))
}

/// The stored hashes at `indexes` (those missing are left out).
pub async fn read(db: &mut Db<'_>, indexes: &[u64]) -> Result<Hashes, sqlx::Error> {
    let sql = db.pick(&SQL);
    let mut hashes = Hashes::default();
    if indexes.is_empty() {
        return Ok(hashes);
    }
    let texts: Vec<String> = indexes.iter().map(u64::to_string).collect();
    for row in db.fetch_all(sql.hashes, &[texts.as_slice().into()]).await? {
        let (idx, hash) = hash_row(&row)?;
        hashes.0.insert(idx, hash);
    }
    Ok(hashes)
}

/// The stored hashes with indexes in `from..to`, in order.
pub async fn range(db: &mut Db<'_>, from: u64, to: u64) -> Result<Vec<(u64, Hash)>, sqlx::Error> {
    let sql = db.pick(&SQL);
    db.fetch_all(sql.hash_range, &[(from as i64).into(), (to as i64).into()])
        .await?
        .iter()
        .map(hash_row)
        .collect()
}

/// The leaves from `from` on (at most `limit`): (leaf index, event position).
pub async fn records(
    db: &mut Db<'_>,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Position)>, sqlx::Error> {
    let sql = db.pick(&SQL);
    db.fetch_all(sql.records, &[(from as i64).into(), (limit as i64).into()])
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.get::<i64>("idx")? as u64,
                Position(row.get::<i64>("position")?),
            ))
        })
        .collect()
}

/// The leaf index of the event at `position`, if it is in the tree.
pub async fn record_of(db: &mut Db<'_>, position: Position) -> Result<Option<u64>, sqlx::Error> {
    let sql = db.pick(&SQL);
    db.fetch_optional(sql.record_of, &[position.0.into()])
        .await?
        .map(|row| Ok(row.get::<i64>("idx")? as u64))
        .transpose()
}

/// Stores a signed checkpoint (a second one of the same size is no change).
pub async fn insert_checkpoint(
    db: &mut Db<'_>,
    size: u64,
    root: &str,
    note: &str,
) -> Result<(), sqlx::Error> {
    let sql = db.pick(&SQL);
    db.execute(
        sql.insert_checkpoint,
        &[(size as i64).into(), root.into(), note.into()],
    )
    .await?;
    Ok(())
}

/// A signed checkpoint as stored.
#[derive(Clone, Debug)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: String,
    pub note: String,
    pub signed_at: chrono::DateTime<chrono::Utc>,
}

/// Every checkpoint, oldest first.
pub async fn checkpoints(db: &mut Db<'_>) -> Result<Vec<StoredCheckpoint>, sqlx::Error> {
    let sql = db.pick(&SQL);
    db.fetch_all(sql.checkpoints, &[])
        .await?
        .iter()
        .map(|row| {
            Ok(StoredCheckpoint {
                size: row.get::<i64>("size")? as u64,
                root: row.get("root")?,
                note: row.get("note")?,
                signed_at: row.time("signed_at")?,
            })
        })
        .collect()
}
