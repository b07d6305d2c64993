//! Files that are a person's data — a mail's raw form, attachments — content-addressed and
//! sealed with that person's data key, in a [`BlobStore`]: the store's own database (the
//! `blobs` table, PostgreSQL or SQLite), a folder (the embedded store's default, `blobs/` in
//! its data directory), or an S3-compatible object store for production. Events refer to a file
//! by its digest; erasing the person shreds the key, so the file is unreadable at once, and
//! deletes it from every store.
//!
//! The digest is the SHA-256 of the plain bytes, per person: the same file of the same person
//! is stored once, and the digest recorded in an event names what was received. A store only
//! ever sees sealed bytes, so an object store's operator reads nothing of them either.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;

use crate::{KeyState, KeyStore, PrivacyError};

/// The largest file kept: 25 MiB (a mail server's usual limit; Telegram's is 20 MB).
pub const MAX_BLOB_BYTES: usize = 25 * 1024 * 1024;

/// The digest files are named by: `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Where sealed files are kept. Implementations store and return the bytes as given (already
/// sealed); a second `put` of the same subject and digest keeps the first.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Where it keeps them, for the start-up line (no secrets).
    fn describe(&self) -> String;

    async fn put(
        &self,
        subject: &str,
        digest: &str,
        content_type: &str,
        sealed: Vec<u8>,
    ) -> Result<(), PrivacyError>;

    /// The content type and sealed bytes of `subject`'s file `digest`, if kept here.
    async fn get(
        &self,
        subject: &str,
        digest: &str,
    ) -> Result<Option<(String, Vec<u8>)>, PrivacyError>;

    /// The digests of `subject`'s files, oldest first.
    async fn list(&self, subject: &str) -> Result<Vec<String>, PrivacyError>;

    /// Deletes every file of `subject`.
    async fn forget(&self, subject: &str) -> Result<(), PrivacyError>;
}

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

/// Files in the store's own database (the `blobs` table): PostgreSQL's default, and where the
/// embedded store kept them before it kept them in a folder.
pub struct TableBlobs {
    pool: StorePool,
}

impl TableBlobs {
    pub fn new(pool: StorePool) -> TableBlobs {
        TableBlobs { pool }
    }
}

#[async_trait]
impl BlobStore for TableBlobs {
    fn describe(&self) -> String {
        "the database".into()
    }

    async fn put(
        &self,
        subject: &str,
        digest: &str,
        content_type: &str,
        sealed: Vec<u8>,
    ) -> Result<(), PrivacyError> {
        // (The sealed size: the plain one is not the store's to know.)
        let size = sealed.len() as i64;
        let sealed = base64::engine::general_purpose::STANDARD.encode(sealed);
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        db.execute(
            sql.insert,
            &[
                subject.into(),
                digest.into(),
                content_type.into(),
                size.into(),
                sealed.as_str().into(),
                Utc::now().into(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn get(
        &self,
        subject: &str,
        digest: &str,
    ) -> Result<Option<(String, Vec<u8>)>, PrivacyError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let Some(row) = db
            .fetch_optional(sql.read, &[subject.into(), digest.into()])
            .await?
        else {
            return Ok(None);
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(row.get::<String>("sealed")?)
            .map_err(|_| PrivacyError::Unreadable)?;
        Ok(Some((row.get::<String>("content_type")?, sealed)))
    }

    async fn list(&self, subject: &str) -> Result<Vec<String>, PrivacyError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let rows = db.fetch_all(sql.list, &[subject.into()]).await?;
        rows.iter()
            .map(|row| Ok(row.get::<String>("digest")?))
            .collect()
    }

    async fn forget(&self, subject: &str) -> Result<(), PrivacyError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        db.execute(sql.forget, &[subject.into()]).await?;
        Ok(())
    }
}

/// Files in an object store: a local folder or an S3-compatible bucket (the `object_store`
/// crate speaks to both). One object per file at `<subject>/<sha256-hex>`, holding the content
/// type on its first line and the sealed bytes after it (so that a folder, which keeps no
/// object attributes, needs nothing beside the file).
pub struct ObjectBlobs {
    store: Arc<dyn ObjectStore>,
    describe: String,
}

impl ObjectBlobs {
    pub fn new(store: Arc<dyn ObjectStore>, describe: impl Into<String>) -> ObjectBlobs {
        ObjectBlobs {
            store,
            describe: describe.into(),
        }
    }

    /// A folder (created if missing).
    pub fn folder(dir: &std::path::Path) -> Result<ObjectBlobs, PrivacyError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            PrivacyError::Blobs(format!("cannot create the folder {}: {e}", dir.display()))
        })?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| PrivacyError::Blobs(e.to_string()))?;
        Ok(ObjectBlobs::new(
            Arc::new(store),
            format!("the folder {}", dir.display()),
        ))
    }

    /// An S3-compatible bucket, `s3://bucket[/prefix]`, with the endpoint, region and
    /// credentials of the standard `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP` for a plain-HTTP one).
    pub fn s3(url: &str) -> Result<ObjectBlobs, PrivacyError> {
        // The S3 client's TLS runs on ring, installed here as the process's provider unless
        // one already is.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let parsed = url::Url::parse(url)
            .map_err(|e| PrivacyError::Blobs(format!("{url} is not a URL: {e}")))?;
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_url(url)
            .build()
            .map_err(|e| PrivacyError::Blobs(format!("cannot use {url}: {e}")))?;
        let prefix = parsed.path().trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(ObjectBlobs::new(store, url))
    }

    fn dir_of(subject: &str) -> ObjectPath {
        ObjectPath::from_iter([PathPart::from(subject)])
    }

    fn path_of(subject: &str, digest: &str) -> ObjectPath {
        let name = digest.replace(':', "-");
        ObjectPath::from_iter([PathPart::from(subject), PathPart::from(name.as_str())])
    }

    fn failed(&self, what: &str, e: object_store::Error) -> PrivacyError {
        PrivacyError::Blobs(format!("{what} in {}: {e}", self.describe))
    }
}

#[async_trait]
impl BlobStore for ObjectBlobs {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn put(
        &self,
        subject: &str,
        digest: &str,
        content_type: &str,
        sealed: Vec<u8>,
    ) -> Result<(), PrivacyError> {
        let path = Self::path_of(subject, digest);
        // Content-addressed: a file already there is this one.
        match self.store.head(&path).await {
            Ok(_) => return Ok(()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.failed("cannot look for a file", e)),
        }
        let mut object = Vec::with_capacity(content_type.len() + 1 + sealed.len());
        object.extend_from_slice(content_type.replace('\n', " ").as_bytes());
        object.push(b'\n');
        object.extend_from_slice(&sealed);
        self.store
            .put(&path, PutPayload::from(object))
            .await
            .map_err(|e| self.failed("cannot keep a file", e))?;
        Ok(())
    }

    async fn get(
        &self,
        subject: &str,
        digest: &str,
    ) -> Result<Option<(String, Vec<u8>)>, PrivacyError> {
        let path = Self::path_of(subject, digest);
        let object = match self.store.get(&path).await {
            Ok(object) => object,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed("cannot read a file", e)),
        };
        let bytes = object
            .bytes()
            .await
            .map_err(|e| self.failed("cannot read a file", e))?;
        let Some(split) = bytes.iter().position(|b| *b == b'\n') else {
            return Err(PrivacyError::Unreadable);
        };
        let content_type = String::from_utf8_lossy(&bytes[..split]).into_owned();
        Ok(Some((content_type, bytes[split + 1..].to_vec())))
    }

    async fn list(&self, subject: &str) -> Result<Vec<String>, PrivacyError> {
        let dir = Self::dir_of(subject);
        let mut found: Vec<_> = self
            .store
            .list(Some(&dir))
            .map_ok(|meta| {
                let name = meta.location.filename().unwrap_or_default().to_owned();
                (meta.last_modified, name.replacen('-', ":", 1))
            })
            .try_collect()
            .await
            .map_err(|e| self.failed("cannot list files", e))?;
        found.sort();
        Ok(found.into_iter().map(|(_, digest)| digest).collect())
    }

    async fn forget(&self, subject: &str) -> Result<(), PrivacyError> {
        let dir = Self::dir_of(subject);
        let paths = self
            .store
            .list(Some(&dir))
            .map_ok(|meta| meta.location)
            .boxed();
        self.store
            .delete_stream(paths)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.failed("cannot delete files", e))?;
        Ok(())
    }
}

/// The blob store a URL names: `database` (the store's own), `file:///path` or a path (a
/// folder), `s3://bucket[/prefix]`.
pub fn blob_store(url: &str, pool: &StorePool) -> Result<Arc<dyn BlobStore>, PrivacyError> {
    let url = url.trim();
    if url == "database" {
        return Ok(Arc::new(TableBlobs::new(pool.clone())));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(ObjectBlobs::folder(std::path::Path::new(path))?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(ObjectBlobs::s3(url)?));
    }
    if url.starts_with('/') || url.starts_with('.') {
        return Ok(Arc::new(ObjectBlobs::folder(std::path::Path::new(url))?));
    }
    Err(PrivacyError::Blobs(format!(
        "{url:?} names no file store: use `database`, a folder (file:///path) or s3://bucket[/prefix]"
    )))
}

/// A person's files, sealed on the way in and opened on the way out. New files go to the first
/// store; the others are read (and erased) too, so that files kept before a change of store
/// stay readable.
pub struct Blobs<'a> {
    stores: &'a [Arc<dyn BlobStore>],
    keys: &'a KeyStore,
}

impl<'a> Blobs<'a> {
    pub fn new(stores: &'a [Arc<dyn BlobStore>], keys: &'a KeyStore) -> Blobs<'a> {
        assert!(!stores.is_empty(), "files need somewhere to go");
        Blobs { stores, keys }
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
        let sealed = key.seal(bytes, format!("{subject}:{digest}").as_bytes());
        self.stores[0]
            .put(subject, &digest, content_type, sealed)
            .await?;
        Ok(digest)
    }

    /// The digests of `subject`'s files, oldest first (those of the first store first).
    pub async fn list(&self, subject: &str) -> Result<Vec<String>, PrivacyError> {
        let mut all = Vec::new();
        for store in self.stores {
            for digest in store.list(subject).await? {
                if !all.contains(&digest) {
                    all.push(digest);
                }
            }
        }
        Ok(all)
    }

    /// `subject`'s file `digest` and its content type; `None` when there is none, or no longer
    /// a key to read it with.
    pub async fn get(
        &self,
        subject: &str,
        digest: &str,
    ) -> Result<Option<(String, Vec<u8>)>, PrivacyError> {
        let mut found = None;
        for store in self.stores {
            found = store.get(subject, digest).await?;
            if found.is_some() {
                break;
            }
        }
        let Some((content_type, sealed)) = found else {
            return Ok(None);
        };
        let KeyState::Live(key) = self.keys.key(subject).await? else {
            return Ok(None);
        };
        let bytes = key.open(&sealed, format!("{subject}:{digest}").as_bytes())?;
        Ok(Some((content_type, bytes)))
    }

    /// Deletes every file of `subject` from every store (after their key is shredded, on
    /// erasure).
    pub(crate) async fn forget(&self, subject: &str) -> Result<(), PrivacyError> {
        for store in self.stores {
            store.forget(subject).await?;
        }
        Ok(())
    }
}
