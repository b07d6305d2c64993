//! Personal data: a data key per person, sealing and opening values with it, and erasure by
//! crypto-shredding.
//!
//! - The deployment has one **key-encryption key** ([`Kek`], 32 bytes, from configuration: a file
//!   or an environment variable; the embedded mode creates one in its data directory, readable by
//!   its owner only). It never encrypts data itself.
//! - Each person (subject) has a **data key**, random, stored only wrapped by the key-encryption
//!   key (AES-256-GCM, the subject's id as associated data, so a wrapped key moved to another
//!   subject's row does not open) in `subject_keys`.
//! - Values are **sealed** with the data key (AES-256-GCM, a random 96-bit nonce per value):
//!   `nonce ‖ ciphertext ‖ tag`.
//! - **Erasure** destroys the wrapped data key ([`KeyStore::shred`]): every value sealed for that
//!   person becomes unreadable at once, wherever it is stored (the append-only log, read models,
//!   job payloads), without rewriting any of it.
//! - A store remembers a value sealed with the key-encryption key it was first opened with
//!   (`kek_check`): opening it with another key is refused before anything is read or written.
//!
//! Written on RustCrypto's `aes-gcm` (no hand-made cryptography); the key table's SQL is written
//! once for both stores through `stele_engine::store::sql`.

pub mod blobs;
pub mod export;
pub mod index;
mod log;
mod seal;
pub mod subjects;

pub use log::{SealedLog, SUBJECT_ERASED};
pub use seal::{subjects_in, Sealer};
pub use subjects::{Policy, Subjects, SubjectsError};

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;
use zeroize::Zeroizing;

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;
/// What the key check seals.
const CHECK: &[u8] = b"stele key-encryption key check";

/// Errors of personal data.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("the key-encryption key is not 64 hexadecimal digits")]
    MalformedKek,
    #[error("cannot read the key-encryption key from {path}: {reason}")]
    KekFile { path: String, reason: String },
    #[error("the key-encryption key is not the one this store was created with: nothing was read or written")]
    WrongKek,
    #[error("a sealed value could not be opened (wrong key, or altered)")]
    Unreadable,
    #[error("{0}")]
    Malformed(String),
    #[error("the file store: {0}")]
    Blobs(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The deployment's key-encryption key.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; KEY_BYTES]>);

impl std::fmt::Debug for Kek {
    // Never printed, not even by a stray `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// A key from its 64 hexadecimal digits (white space around them ignored).
    pub fn from_hex(text: &str) -> Result<Kek, PrivacyError> {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        hex::decode_to_slice(text.trim(), key.as_mut()).map_err(|_| PrivacyError::MalformedKek)?;
        Ok(Kek(key))
    }

    /// A new random key.
    pub fn generate() -> Kek {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(key.as_mut());
        Kek(key)
    }

    /// The key in `path`; if there is no such file, a new key written there, readable by its
    /// owner only (the embedded mode's data directory).
    pub fn load_or_create(path: &Path) -> Result<Kek, PrivacyError> {
        let failed = |e: std::io::Error| PrivacyError::KekFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Kek::from_hex(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kek = Kek::generate();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path).map_err(failed)?;
                std::io::Write::write_all(&mut file, hex::encode(kek.0.as_ref()).as_bytes())
                    .map_err(failed)?;
                Ok(kek)
            }
            Err(e) => Err(failed(e)),
        }
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.0.as_ref()))
    }

    /// A key for another use, derived from this one (HKDF-SHA-256, `info` naming the use).
    pub fn derive(&self, info: &[u8]) -> Zeroizing<[u8; KEY_BYTES]> {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, self.0.as_ref())
            .expand(info, key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        key
    }
}

/// Puts sealing in front of `store`'s log (see [`SealedLog`]), checked against `kek`: the
/// store's log then seals personal values on the way in and opens them on the way out, while
/// projections and process managers read them sealed.
///
/// The returned store shares `store`'s connections: close one of them.
pub async fn seal_store(
    store: &stele_engine::Store,
    kek: &Kek,
) -> Result<(stele_engine::Store, std::sync::Arc<Sealer>), PrivacyError> {
    let keys = KeyStore::open(store.pool.clone(), kek.clone()).await?;
    let sealer = std::sync::Arc::new(Sealer::new(keys));
    let sealed = stele_engine::Store {
        location: store.location.clone(),
        log: std::sync::Arc::new(SealedLog::new(store.stored.clone(), sealer.clone())),
        stored: store.stored.clone(),
        queue: store.queue.clone(),
        pool: store.pool.clone(),
        reads: store.reads.clone(),
    };
    Ok((sealed, sealer))
}

/// A store with personal data sealed, and its subjects service.
pub struct Private {
    pub store: stele_engine::Store,
    pub subjects: std::sync::Arc<Subjects>,
}

/// [`seal_store`] and the subjects service on it, under `policy`.
pub async fn private_store(
    store: &stele_engine::Store,
    kek: &Kek,
    policy: Policy,
) -> Result<Private, PrivacyError> {
    private_store_with_blobs(store, kek, policy, None).await
}

/// [`private_store`] with people's files kept in `blobs` (the database's `blobs` table without
/// one).
pub async fn private_store_with_blobs(
    store: &stele_engine::Store,
    kek: &Kek,
    policy: Policy,
    blobs: Option<std::sync::Arc<dyn blobs::BlobStore>>,
) -> Result<Private, PrivacyError> {
    let (sealed, sealer) = seal_store(store, kek).await?;
    let mut subjects = Subjects::new(&sealed, sealer, kek, policy);
    if let Some(blobs) = blobs {
        subjects = subjects.with_blob_store(blobs);
    }
    let subjects = std::sync::Arc::new(subjects);
    Ok(Private {
        store: sealed,
        subjects,
    })
}

/// A person's data key.
pub struct DataKey(Zeroizing<[u8; KEY_BYTES]>);

impl DataKey {
    /// Seals `plaintext` for this person; `context` (e.g. the field's name) must be given again
    /// to open it.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        seal(&self.cipher(), plaintext, context)
    }

    /// Opens what [`DataKey::seal`] sealed with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, PrivacyError> {
        open(&self.cipher(), sealed, context)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.0.as_ref()))
    }
}

fn seal(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encrypts any input of a sane size");
    let mut sealed = nonce.to_vec();
    sealed.extend(ciphertext);
    sealed
}

fn open(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, PrivacyError> {
    if sealed.len() < NONCE_BYTES {
        return Err(PrivacyError::Unreadable);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| PrivacyError::Unreadable)
}

struct Statements {
    wrapped: &'static str,
    insert: &'static str,
    shred: &'static str,
    check: &'static str,
    insert_check: &'static str,
}

const SQL: Dialects<Statements> = Dialects {
    postgres: Statements {
        wrapped: "SELECT wrapped FROM subject_keys WHERE subject_id = $1",
        insert: "INSERT INTO subject_keys (subject_id, wrapped) VALUES ($1, $2) \
                 ON CONFLICT (subject_id) DO NOTHING",
        shred: "UPDATE subject_keys SET wrapped = NULL, shredded_at = now() \
                WHERE subject_id = $1 AND wrapped IS NOT NULL",
        check: "SELECT sealed FROM kek_check WHERE id = 1",
        insert_check:
            "INSERT INTO kek_check (id, sealed) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
    },
    sqlite: Statements {
        wrapped: "SELECT wrapped FROM subject_keys WHERE subject_id = $1",
        insert: "INSERT INTO subject_keys (subject_id, wrapped, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (subject_id) DO NOTHING",
        shred: "UPDATE subject_keys SET wrapped = NULL, shredded_at = $2 \
                WHERE subject_id = $1 AND wrapped IS NOT NULL",
        check: "SELECT sealed FROM kek_check WHERE id = 1",
        insert_check:
            "INSERT INTO kek_check (id, sealed) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
    },
};

/// What a subject's key is now.
pub enum KeyState {
    /// The subject's data key.
    Live(DataKey),
    /// The key was destroyed: everything sealed for this subject reads as erased.
    Shredded,
    /// No key was ever made for this subject (nothing was sealed for them).
    None,
}

/// The subjects' data keys in a store.
pub struct KeyStore {
    pool: StorePool,
    kek: Kek,
}

impl KeyStore {
    /// The key store of `pool`, checked against `kek`: the first opening records a value sealed
    /// with it, and any later opening with another key fails with [`PrivacyError::WrongKek`].
    pub async fn open(pool: StorePool, kek: Kek) -> Result<KeyStore, PrivacyError> {
        let mut db = Db::from(&pool);
        let sql = db.pick(&SQL);
        let check = match db.fetch_optional(sql.check, &[]).await? {
            Some(row) => row.get::<String>("sealed")?,
            None => {
                let sealed = hex::encode(seal(&kek.cipher(), CHECK, b"kek_check"));
                db.execute(sql.insert_check, &[sealed.as_str().into()])
                    .await?;
                db.fetch_one(sql.check, &[])
                    .await?
                    .get::<String>("sealed")?
            }
        };
        let sealed = hex::decode(check).map_err(|_| PrivacyError::WrongKek)?;
        match open(&kek.cipher(), &sealed, b"kek_check") {
            Ok(plain) if plain == CHECK => Ok(KeyStore { pool, kek }),
            _ => Err(PrivacyError::WrongKek),
        }
    }

    /// The subject's data key, made on first use.
    pub async fn data_key(&self, subject: &str) -> Result<KeyState, PrivacyError> {
        if let state @ (KeyState::Live(_) | KeyState::Shredded) = self.key(subject).await? {
            return Ok(state);
        }
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(key.as_mut());
        let wrapped = hex::encode(seal(&self.kek.cipher(), key.as_ref(), subject.as_bytes()));
        {
            // (Its connection goes back before the read below: the embedded store has one.)
            let mut db = Db::from(&self.pool);
            let sql = db.pick(&SQL);
            db.execute(sql.insert, &[subject.into(), wrapped.as_str().into()])
                .await?;
        }
        // Another process may have made it first: the stored key is the subject's.
        self.key(subject).await
    }

    /// The subject's key as it is, without making one.
    pub async fn key(&self, subject: &str) -> Result<KeyState, PrivacyError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let Some(row) = db.fetch_optional(sql.wrapped, &[subject.into()]).await? else {
            return Ok(KeyState::None);
        };
        let Some(wrapped) = row.get::<Option<String>>("wrapped")? else {
            return Ok(KeyState::Shredded);
        };
        let wrapped = hex::decode(wrapped).map_err(|_| PrivacyError::Unreadable)?;
        let plain = Zeroizing::new(open(&self.kek.cipher(), &wrapped, subject.as_bytes())?);
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        if plain.len() != KEY_BYTES {
            return Err(PrivacyError::Unreadable);
        }
        key.copy_from_slice(&plain);
        Ok(KeyState::Live(DataKey(key)))
    }

    /// Destroys the subject's data key (crypto-shredding); true when there was one to destroy.
    pub async fn shred(&self, subject: &str) -> Result<bool, PrivacyError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        Ok(db.execute(sql.shred, &[subject.into()]).await? == 1)
    }
}
