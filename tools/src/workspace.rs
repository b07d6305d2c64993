//! A workspace per run: the files an agent's tools read, write and run, kept in the store (the
//! `workspaces` table) so that every node sees the same files and they stay readable after the
//! run. A workspace is one document (path → bytes), sealed with the data key of the person the
//! run is for: their erasure leaves it unreadable, like the rest of their data.
//!
//! Paths are relative, `/`-separated and confined: absolute paths, `..`, empty or hidden-root
//! names are refused before anything is read or written, and a workspace holds regular files
//! only (a symbolic link a command makes is not kept, so nothing can point out of it).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stele_engine::store::sql::{Db, Dialects};
use stele_engine::store::StorePool;
use stele_privacy::KeyState;
use stele_privacy::Sealer;

/// Limits of one workspace.
#[derive(Clone, Debug)]
pub struct WorkspaceLimits {
    /// Files in one workspace.
    pub max_files: usize,
    /// Bytes of all its files together.
    pub max_bytes: usize,
    /// Bytes of one file.
    pub max_file_bytes: usize,
}

impl Default for WorkspaceLimits {
    fn default() -> Self {
        WorkspaceLimits {
            max_files: 1_000,
            max_bytes: 16 * 1024 * 1024,
            max_file_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Why a workspace could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The path is not one the workspace can hold (the message says why).
    #[error("{0}")]
    Path(String),
    /// A limit would be passed.
    #[error("{0}")]
    Limit(String),
    /// No such file.
    #[error("no file {0} in the workspace")]
    NotFound(String),
    /// The person the run was for was erased: the files are gone with them.
    #[error("the workspace's person was erased: its files are gone")]
    Erased,
    #[error("the workspace store failed: {0}")]
    Store(String),
}

impl From<sqlx::Error> for WorkspaceError {
    fn from(e: sqlx::Error) -> Self {
        WorkspaceError::Store(e.to_string())
    }
}

impl From<stele_privacy::PrivacyError> for WorkspaceError {
    fn from(e: stele_privacy::PrivacyError) -> Self {
        WorkspaceError::Store(e.to_string())
    }
}

/// A workspace's path in its canonical form (`a/b.txt`), or why it is refused.
pub fn clean_path(path: &str) -> Result<String, WorkspaceError> {
    let refuse = |why: &str| Err(WorkspaceError::Path(format!("path {path:?}: {why}")));
    if path.contains('\0') {
        return refuse("holds a NUL character");
    }
    if path.starts_with('/') || path.starts_with('\\') || path.get(1..2) == Some(":") {
        return refuse("absolute paths are refused: give a path inside the workspace");
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => continue,
            ".." => return refuse("`..` is refused: paths stay inside the workspace"),
            part if part.contains('\\') => return refuse("backslashes are refused"),
            part if part.len() > 255 => return refuse("a name is longer than 255 bytes"),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return refuse("names no file");
    }
    let clean = parts.join("/");
    if clean.len() > 1024 {
        return refuse("longer than 1024 bytes");
    }
    Ok(clean)
}

/// A directory prefix (`""` for the whole workspace) in canonical form.
pub fn clean_dir(path: &str) -> Result<String, WorkspaceError> {
    if path.trim_matches('/').is_empty() || path == "." || path == "./" {
        return Ok(String::new());
    }
    clean_path(path)
}

/// The files of one workspace, by canonical path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Files(#[serde(with = "as_base64")] pub BTreeMap<String, Vec<u8>>);

impl Files {
    pub fn size(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    /// Checks the workspace's limits.
    pub fn check(&self, limits: &WorkspaceLimits) -> Result<(), WorkspaceError> {
        if self.0.len() > limits.max_files {
            return Err(WorkspaceError::Limit(format!(
                "a workspace holds at most {} files",
                limits.max_files
            )));
        }
        if let Some((path, bytes)) = self
            .0
            .iter()
            .find(|(_, bytes)| bytes.len() > limits.max_file_bytes)
        {
            return Err(WorkspaceError::Limit(format!(
                "{path} has {} bytes, over the limit of {} for one file",
                bytes.len(),
                limits.max_file_bytes
            )));
        }
        let size = self.size();
        if size > limits.max_bytes {
            return Err(WorkspaceError::Limit(format!(
                "the workspace would hold {size} bytes, over its limit of {}",
                limits.max_bytes
            )));
        }
        Ok(())
    }

    /// The files under `dir` (`""`: all).
    pub fn under<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a String, &'a Vec<u8>)> {
        self.0.iter().filter(move |(path, _)| {
            dir.is_empty()
                || path.as_str() == dir
                || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
        })
    }

    /// Whether `path` is a directory: some file lies under it.
    pub fn is_dir(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.0.keys().any(|p| p.starts_with(&prefix))
    }

    /// Writes `path`, refusing a path that is a directory or lies under a file.
    pub fn write(&mut self, path: String, bytes: Vec<u8>) -> Result<bool, WorkspaceError> {
        if self.is_dir(&path) {
            return Err(WorkspaceError::Path(format!("{path} is a directory")));
        }
        let mut parent = path.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            if self.0.contains_key(up) {
                return Err(WorkspaceError::Path(format!(
                    "{up} is a file, not a directory"
                )));
            }
            parent = up;
        }
        Ok(self.0.insert(path, bytes).is_none())
    }
}

mod as_base64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        files: &BTreeMap<String, Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let engine = base64::engine::general_purpose::STANDARD;
        serializer.collect_map(
            files
                .iter()
                .map(|(path, bytes)| (path, engine.encode(bytes))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let encoded = BTreeMap::<String, String>::deserialize(deserializer)?;
        encoded
            .into_iter()
            .map(|(path, text)| {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map(|bytes| (path, bytes))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// A workspace as read: its version (0: none yet) and files.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: i64,
    pub files: Files,
}

/// One file of a workspace, as listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: usize,
    /// `sha256:<hex>` of its content.
    pub digest: String,
}

/// A run's workspace, as listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub run_id: String,
    pub files: Vec<FileEntry>,
}

pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Statements {
    read: &'static str,
    insert: &'static str,
    update: &'static str,
    of_task: &'static str,
    forget: &'static str,
}

const STATEMENTS: Statements = Statements {
    read: "SELECT version, subject_id, content FROM workspaces WHERE run_id = $1",
    insert: "INSERT INTO workspaces (run_id, task_id, subject_id, version, files, size, content, updated_at) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7) ON CONFLICT (run_id) DO NOTHING",
    update: "UPDATE workspaces SET version = version + 1, files = $3, size = $4, content = $5, updated_at = $6 \
             WHERE run_id = $1 AND version = $2",
    of_task: "SELECT run_id FROM workspaces WHERE task_id = $1 ORDER BY run_id",
    forget: "DELETE FROM workspaces WHERE subject_id = $1",
};

const SQL: Dialects<Statements> = Dialects {
    postgres: STATEMENTS,
    sqlite: STATEMENTS,
};

/// The workspaces of a store.
pub struct Workspaces {
    pool: StorePool,
    sealer: Option<Arc<Sealer>>,
    limits: WorkspaceLimits,
}

/// The owner of a run's workspace: its run, task and person.
#[derive(Clone, Debug, Default)]
pub struct Owner {
    pub run_id: String,
    pub task_id: Option<String>,
    pub subject: Option<String>,
}

impl Workspaces {
    /// Workspaces in `pool`, sealed with people's keys by `sealer` (plain without one: a store
    /// without personal data).
    pub fn new(pool: StorePool, sealer: Option<Arc<Sealer>>) -> Workspaces {
        Workspaces {
            pool,
            sealer,
            limits: WorkspaceLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: WorkspaceLimits) -> Workspaces {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &WorkspaceLimits {
        &self.limits
    }

    fn context(run_id: &str) -> Vec<u8> {
        format!("workspace:{run_id}").into_bytes()
    }

    /// The run's workspace (empty, version 0, when it has none yet).
    pub async fn read(&self, run_id: &str) -> Result<Snapshot, WorkspaceError> {
        let row = {
            let mut db = Db::from(&self.pool);
            let sql = db.pick(&SQL);
            db.fetch_optional(sql.read, &[run_id.into()]).await?
        };
        let Some(row) = row else {
            return Ok(Snapshot::default());
        };
        let version: i64 = row.get("version")?;
        let subject: Option<String> = row.get("subject_id")?;
        let content = base64::engine::general_purpose::STANDARD
            .decode(row.get::<String>("content")?)
            .map_err(|e| WorkspaceError::Store(format!("a workspace is unreadable: {e}")))?;
        let plain = match (&subject, &self.sealer) {
            (Some(subject), Some(sealer)) => match sealer.keys().key(subject).await? {
                KeyState::Live(key) => key.open(&content, &Self::context(run_id))?,
                KeyState::Shredded | KeyState::None => return Err(WorkspaceError::Erased),
            },
            (Some(_), None) => {
                return Err(WorkspaceError::Store(
                    "a sealed workspace needs the store's key to be read".into(),
                ))
            }
            (None, _) => content,
        };
        let files = serde_json::from_slice(&plain)
            .map_err(|e| WorkspaceError::Store(format!("a workspace is unreadable: {e}")))?;
        Ok(Snapshot { version, files })
    }

    /// Writes `files` as the workspace's next version over `version` (what was read); false
    /// when someone else changed it since (read it again and redo the change).
    async fn write(
        &self,
        owner: &Owner,
        version: i64,
        files: &Files,
    ) -> Result<bool, WorkspaceError> {
        files.check(&self.limits)?;
        let plain = serde_json::to_vec(files).expect("files serialize");
        let content = match (&owner.subject, &self.sealer) {
            (Some(subject), Some(sealer)) => match sealer.keys().data_key(subject).await? {
                KeyState::Live(key) => key.seal(&plain, &Self::context(&owner.run_id)),
                KeyState::Shredded | KeyState::None => return Err(WorkspaceError::Erased),
            },
            _ => plain,
        };
        let content = base64::engine::general_purpose::STANDARD.encode(content);
        let count = files.0.len() as i64;
        let size = files.size() as i64;
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let changed = if version == 0 {
            db.execute(
                sql.insert,
                &[
                    owner.run_id.as_str().into(),
                    owner.task_id.as_deref().into(),
                    owner.subject.as_deref().into(),
                    count.into(),
                    size.into(),
                    content.as_str().into(),
                    Utc::now().into(),
                ],
            )
            .await?
        } else {
            db.execute(
                sql.update,
                &[
                    owner.run_id.as_str().into(),
                    version.into(),
                    count.into(),
                    size.into(),
                    content.as_str().into(),
                    Utc::now().into(),
                ],
            )
            .await?
        };
        Ok(changed == 1)
    }

    /// Applies `change` to the run's files and keeps the result; a change that raced another
    /// one is applied again to the files as the other left them.
    pub async fn change<T>(
        &self,
        owner: &Owner,
        mut change: impl FnMut(&mut Files) -> Result<T, WorkspaceError>,
    ) -> Result<T, WorkspaceError> {
        for _ in 0..20 {
            let Snapshot { version, mut files } = self.read(&owner.run_id).await?;
            let before = files.clone();
            let out = change(&mut files)?;
            if files == before || self.write(owner, version, &files).await? {
                return Ok(out);
            }
        }
        Err(WorkspaceError::Store(
            "the workspace kept changing under this change: try again".into(),
        ))
    }

    /// The run's files, listed.
    pub async fn list(&self, run_id: &str) -> Result<Listing, WorkspaceError> {
        let snapshot = self.read(run_id).await?;
        Ok(Listing {
            run_id: run_id.to_owned(),
            files: snapshot
                .files
                .0
                .iter()
                .map(|(path, bytes)| FileEntry {
                    path: path.clone(),
                    size: bytes.len(),
                    digest: digest_of(bytes),
                })
                .collect(),
        })
    }

    /// The runs of a task that have a workspace, oldest first.
    pub async fn runs_of_task(&self, task_id: &str) -> Result<Vec<String>, WorkspaceError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        let runs = db
            .fetch_all(sql.of_task, &[task_id.into()])
            .await?
            .iter()
            .map(|row| row.get::<String>("run_id"))
            .collect::<Result<_, _>>()?;
        Ok(runs)
    }

    /// A file of one of a task's runs (`run`: which one; the first that holds `path` without).
    pub async fn task_file(
        &self,
        task_id: &str,
        run: Option<&str>,
        path: &str,
    ) -> Result<(String, Vec<u8>), WorkspaceError> {
        let path = clean_path(path)?;
        for run_id in self.runs_of_task(task_id).await? {
            if run.is_some_and(|run| run != run_id) {
                continue;
            }
            let mut files = self.read(&run_id).await?.files;
            if let Some(bytes) = files.0.remove(&path) {
                return Ok((run_id, bytes));
            }
        }
        Err(WorkspaceError::NotFound(path))
    }

    /// Deletes the workspaces of an erased person (already unreadable: their key is gone).
    pub async fn forget(&self, subject: &str) -> Result<(), WorkspaceError> {
        let mut db = Db::from(&self.pool);
        let sql = db.pick(&SQL);
        db.execute(sql.forget, &[subject.into()]).await?;
        Ok(())
    }
}

/// Deletes an erased person's workspaces (already unreadable: their key is gone) as their
/// erasure is recorded, on whichever node erased them. Its own table it has none: the rows are
/// the workspaces'; replaying it deletes nothing more.
pub struct WorkspaceEraser;

#[async_trait::async_trait]
impl stele_engine::projection::Projection for WorkspaceEraser {
    fn name(&self) -> &'static str {
        "workspace_erasure"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &["SubjectErased"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    fn deferred_flush(&self) -> bool {
        true
    }

    async fn create(
        &self,
        _tx: &mut dyn stele_engine::log::LogTransaction,
        _tables: &stele_engine::projection::Tables,
    ) -> Result<(), stele_engine::projection::ProjectionError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut dyn stele_engine::log::LogTransaction,
        _tables: &stele_engine::projection::Tables,
        events: &[stele_engine::RecordedEvent],
    ) -> Result<(), stele_engine::projection::ProjectionError> {
        let mut db = Db::from(tx.connection());
        let sql = db.pick(&SQL);
        for event in events {
            let keys = event
                .payload
                .pointer("/data/keys")
                .and_then(|k| k.as_array());
            for subject in keys.into_iter().flatten().filter_map(|k| k.as_str()) {
                db.execute(sql.forget, &[subject.into()])
                    .await
                    .map_err(|e| stele_engine::projection::ProjectionError::Apply(e.to_string()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        assert_eq!(clean_path("a/./b.txt").unwrap(), "a/b.txt");
        assert_eq!(clean_path("src//main.py").unwrap(), "src/main.py");
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "",
            ".",
            "a\\..\\b",
            "C:/x",
            "a\0b",
        ] {
            assert!(clean_path(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(clean_dir(".").unwrap(), "");
        assert_eq!(clean_dir("/").unwrap(), "");
        assert!(clean_dir("../").is_err());
    }

    #[test]
    fn files_and_directories_do_not_collide() {
        let mut files = Files::default();
        assert!(files.write("a/b.txt".into(), b"x".to_vec()).unwrap());
        assert!(!files.write("a/b.txt".into(), b"y".to_vec()).unwrap());
        assert!(files.write("a".into(), b"z".to_vec()).is_err());
        assert!(files.write("a/b.txt/c".into(), b"z".to_vec()).is_err());
        assert_eq!(files.under("a").count(), 1);
        assert_eq!(files.under("").count(), 1);
        assert_eq!(files.under("a/b").count(), 0);
    }

    #[test]
    fn limits_hold() {
        let limits = WorkspaceLimits {
            max_files: 2,
            max_bytes: 10,
            max_file_bytes: 6,
        };
        let mut files = Files::default();
        files.write("a".into(), vec![0; 6]).unwrap();
        assert!(files.check(&limits).is_ok());
        files.write("b".into(), vec![0; 7]).unwrap();
        assert!(files.check(&limits).is_err());
        files.write("b".into(), vec![0; 5]).unwrap();
        assert!(files.check(&limits).is_err(), "11 bytes in all");
    }
}
