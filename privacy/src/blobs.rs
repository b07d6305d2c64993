//! Files that are a person's data — a mail's raw form, attachments — content-addressed and
//! sealed with that person's data key, in the store's own database (the `blobs` table, on
//! PostgreSQL and SQLite alike). Events refer to a file by its digest; erasing the person shreds
//! the key, so the file is unreadable at once, and deletes it.
//!
//! The digest is the SHA-256 of the plain bytes, per person: the same file of the same person
//! is stored once, and the digest recorded in an event names what was received.

use base64::Engine;
use chrono::Utc;
use sha2::{Digest, Sha256};
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;

use crate::{KeyState, KeyStore, PrivacyError};

/// The largest file kept: 25 MiB (a mail server's usual limit; Telegram's is 20 MB).
pub const MAX_BLOB_BYTES: usize = 25 * 1024 * 1024;

struct Statements {
    insert: &'static str,
    read: &'static str,
    list: &'static str,
    forget: &'static str,
}

/// The same SQL on both stores.
const STATEMENTS: Statements = Statements {
    insert: "INSERT INTO blobs (subject_id, digest, content_type, size, sealed, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (subject_id, digest) DO NOTHING",
    read: "SELECT content_type, sealed FROM blobs WHERE subject_id = $1 AND digest = $2",
    list: "SELECT digest FROM blobs WHERE subject_id = $1 ORDER BY created_at, digest",
    forget: "DELETE FROM blobs WHERE subject_id = $1",
};

const SQL: Dialects<Statements> = Dialects {
    postgres: STATEMENTS,
    sqlite: STATEMENTS,
};

/// The digest files are named by: `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A person's files.
pub struct Blobs<'a> {
    pool: &'a StorePool,
    keys: &'a KeyStore,
}

impl<'a> Blobs<'a> {
    pub fn new(pool: &'a StorePool, keys: &'a KeyStore) -> Blobs<'a> {
        Blobs { pool, keys }
    }

    /// Keeps `bytes` as `subject`'s file; its digest. Refused when over [`MAX_BLOB_BYTES`] or
    /// when the subject was erased.
    pub async fn put(
        &self,
        subject: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<String, PrivacyError> {
        if bytes.len() > MAX_BLOB_BYTES {
            return Err(PrivacyError::Malformed(format!(
                "a file of {} bytes is over the limit of {MAX_BLOB_BYTES}",
                bytes.len()
            )));
        }
        let digest = digest_of(bytes);
        let KeyState::Live(key) = self.keys.data_key(subject).await? else {
            return Err(PrivacyError::Malformed(
                "the person was erased: nothing more is kept of them".into(),
            ));
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .encode(key.seal(bytes, format!("{subject}:{digest}").as_bytes()));
        let mut db = Db::from(self.pool);
        let sql = db.pick(&SQL);
        db.execute(
            sql.insert,
            &[
                subject.into(),
                digest.as_str().into(),
                content_type.into(),
                (bytes.len() as i64).into(),
                sealed.as_str().into(),
                Utc::now().into(),
            ],
        )
        .await?;
        Ok(digest)
    }

    /// The digests of `subject`'s files, oldest first.
    pub async fn list(&self, subject: &str) -> Result<Vec<String>, PrivacyError> {
        let mut db = Db::from(self.pool);
        let sql = db.pick(&SQL);
        let rows = db.fetch_all(sql.list, &[subject.into()]).await?;
        rows.iter()
            .map(|row| Ok(row.get::<String>("digest")?))
            .collect()
    }

    /// `subject`'s file `digest` and its content type; `None` when there is none, or no longer
    /// a key to read it with.
    pub async fn get(
        &self,
        subject: &str,
        digest: &str,
    ) -> Result<Option<(String, Vec<u8>)>, PrivacyError> {
        let row = {
            let mut db = Db::from(self.pool);
            let sql = db.pick(&SQL);
            db.fetch_optional(sql.read, &[subject.into(), digest.into()])
                .await?
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let KeyState::Live(key) = self.keys.key(subject).await? else {
            return Ok(None);
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(row.get::<String>("sealed")?)
            .map_err(|_| PrivacyError::Unreadable)?;
        let bytes = key.open(&sealed, format!("{subject}:{digest}").as_bytes())?;
        Ok(Some((row.get::<String>("content_type")?, bytes)))
    }
}

/// Deletes every file of `subject` (after their key is shredded, on erasure).
pub(crate) async fn forget(pool: &StorePool, subject: &str) -> Result<(), PrivacyError> {
    let mut db = Db::from(pool);
    let sql = db.pick(&SQL);
    db.execute(sql.forget, &[subject.into()]).await?;
    Ok(())
}
