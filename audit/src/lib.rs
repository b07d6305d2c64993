//! The audit log: tamper evidence and provable completeness for the event log.
//!
//! - **The tree.** A sealer ([`Sealer`], a projection of the log as stored) appends each event, in
//!   log order, as a leaf of an RFC 6962 Merkle tree: the leaf hashes the event's canonical bytes
//!   ([`leaf`]), which cover its stored (sealed) payload, so erasing a person never changes a leaf.
//!   The tree's stored hashes use the layout of Go's `tlog` (as Certificate Transparency, the Go
//!   checksum database and the C2SP tlog specifications do), computed by `tlog_tiles`.
//! - **Checkpoints.** At least every `every` events (and whenever the sealer catches up after
//!   `interval`), the tree head (size, root) is signed with Ed25519 as a C2SP `tlog-checkpoint`
//!   signed note (`signed_note`), so existing transparency-log tooling and witnesses can read and
//!   co-sign it.
//! - **Verification** ([`verify`]) recomputes every leaf from the log, every stored hash and every
//!   checkpoint's root, checks each signature, and names the first position where anything
//!   differs.
//!
//! The format a third party needs is in `docs/audit-log.md`.

pub mod leaf;
pub mod proof;
mod sealer;
pub mod tree;
mod verify;
pub mod view;

use std::path::Path;

pub use sealer::{Sealer, SealerOptions, AUDIT};
pub use verify::{verify, Mismatch, Report};

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit signing key is malformed: {0}")]
    MalformedKey(String),
    #[error("cannot read the audit signing key from {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("{0}")]
    Tree(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Log(#[from] stele_engine::LogError),
}

/// The key that signs checkpoints: a signed-note signer key (`PRIVATE+KEY+<name>+<id>+<key>`).
pub struct SigningKey {
    skey: String,
    signer: signed_note::StandardSigner,
    vkey: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.vkey)
    }
}

impl SigningKey {
    /// A new key for the log named `name` (the checkpoints' origin, e.g. `stele.example/audit`).
    pub fn generate(name: &str) -> Result<SigningKey, AuditError> {
        if !signed_note::is_key_name_valid(name) {
            return Err(AuditError::MalformedKey(format!(
                "{name:?} is not a key name (no spaces, no '+')"
            )));
        }
        let (skey, _) = signed_note::generate_key(&mut rand_core::OsRng, name);
        SigningKey::from_text(&skey)
    }

    /// The key from its signer-key text.
    pub fn from_text(text: &str) -> Result<SigningKey, AuditError> {
        let skey = text.trim().to_owned();
        let signer = signed_note::StandardSigner::new(&skey)
            .map_err(|e| AuditError::MalformedKey(e.to_string()))?;
        // The verifier key: name, key id and public key, from the signer's parts.
        let (_, rest) = skey
            .split_once("PRIVATE+KEY+")
            .ok_or_else(|| AuditError::MalformedKey("no PRIVATE+KEY+ prefix".into()))?;
        let (name, _) = rest
            .split_once('+')
            .ok_or_else(|| AuditError::MalformedKey("no name".into()))?;
        let vkey = verifier_key(name, &skey)?;
        Ok(SigningKey { skey, signer, vkey })
    }

    /// The key in `path`; if there is no such file, a new key for `name` written there, readable
    /// by its owner only (the embedded mode's data directory).
    pub fn load_or_create(path: &Path, name: &str) -> Result<SigningKey, AuditError> {
        let failed = |e: std::io::Error| AuditError::KeyFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => SigningKey::from_text(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(name)?;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path).map_err(failed)?;
                std::io::Write::write_all(&mut file, key.skey.as_bytes()).map_err(failed)?;
                Ok(key)
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// The private signer key's text (`PRIVATE+KEY+…`), to keep secret.
    pub fn private_text(&self) -> &str {
        &self.skey
    }

    /// The public verifier key (`<name>+<id>+<key>`), what third parties check notes with.
    pub fn verifier_key(&self) -> &str {
        &self.vkey
    }

    /// The checkpoints' origin (the key's name).
    pub fn name(&self) -> &str {
        signed_note::Signer::name(&self.signer)
    }

    /// The signed note of the tree head (size, root).
    pub fn sign(&self, size: u64, root: tlog_tiles::Hash) -> Result<String, AuditError> {
        let checkpoint = tlog_tiles::Checkpoint::new(self.name(), size, root, "")
            .map_err(|e| AuditError::Tree(e.to_string()))?;
        let mut note = signed_note::Note::new(&checkpoint.to_bytes(), &[])
            .map_err(|e| AuditError::Tree(e.to_string()))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| AuditError::Tree(e.to_string()))?;
        String::from_utf8(note.to_bytes()).map_err(|e| AuditError::Tree(e.to_string()))
    }
}

/// The verifier key of a signer key (name, key id, `0x01 ‖ public key`).
fn verifier_key(name: &str, skey: &str) -> Result<String, AuditError> {
    use base64::Engine as _;
    // `PRIVATE+KEY+<name>+<id>+<base64>`: the key is what follows the fifth part's `+` (base64
    // may hold `+` itself).
    let encoded = skey
        .splitn(5, '+')
        .nth(4)
        .ok_or_else(|| AuditError::MalformedKey("no key".into()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| AuditError::MalformedKey(e.to_string()))?;
    let secret: [u8; 32] = bytes
        .get(1..33)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| AuditError::MalformedKey("not an Ed25519 key".into()))?;
    let signing = ed25519_dalek::SigningKey::from_bytes(&secret);
    Ok(signed_note::new_ed25519_verifier_key(
        name,
        &signing.verifying_key(),
    ))
}

/// Opens a signed checkpoint with `vkey`: its size and root, if the signature is the key's.
pub fn open_checkpoint(note: &str, vkey: &str) -> Result<(u64, tlog_tiles::Hash), AuditError> {
    let verifier = signed_note::StandardVerifier::new(vkey)
        .map_err(|e| AuditError::MalformedKey(e.to_string()))?;
    let note = signed_note::Note::from_bytes(note.as_bytes())
        .map_err(|e| AuditError::Tree(format!("not a signed note: {e}")))?;
    let known = signed_note::VerifierList::new(vec![Box::new(verifier)]);
    note.verify(&known).map_err(|e| {
        AuditError::Tree(format!("the checkpoint's signature does not verify: {e}"))
    })?;
    let checkpoint = tlog_tiles::Checkpoint::from_bytes(note.text())
        .map_err(|e| AuditError::Tree(e.to_string()))?;
    Ok((checkpoint.size(), *checkpoint.hash()))
}
