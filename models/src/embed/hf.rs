//! `hf:<repo id>` specs: the model folder downloaded from the Hugging Face hub into the hub's
//! own cache (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`), so that Python tools and
//! this crate share one copy. Files already in the cache are not fetched again.
//!
//! Only the files a local backend reads are fetched; `SHA256SUMS` too when the repository has
//! one. The weights are then checked like any folder's (see [`super::load_embedding_model`]).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

use super::EmbeddingError;

/// Files every model folder needs.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// Files read when the repository has them.
const OPTIONAL: [&str; 3] = [
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "SHA256SUMS",
];

/// Downloads `repo_id`'s model folder (main revision) into the hub cache and returns the
/// folder. The hub and the cache come from the environment as the Python `huggingface_hub`
/// reads them: `HF_ENDPOINT`, `HF_HOME`, and the token `HF_HOME/token`. Blocks.
pub fn download(repo_id: &str) -> Result<PathBuf, EmbeddingError> {
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|error| download_error(repo_id, "the hub client", error))?;
    fetch(&api, repo_id)
}

/// Like [`download`], from the hub at `endpoint` into the cache folder `cache_dir`.
pub fn download_from(
    repo_id: &str,
    endpoint: &str,
    cache_dir: &Path,
) -> Result<PathBuf, EmbeddingError> {
    let api = ApiBuilder::from_cache(Cache::new(cache_dir.to_owned()))
        .with_endpoint(endpoint.trim_end_matches('/').to_owned())
        .with_progress(false)
        .build()
        .map_err(|error| download_error(repo_id, "the hub client", error))?;
    fetch(&api, repo_id)
}

fn fetch(api: &Api, repo_id: &str) -> Result<PathBuf, EmbeddingError> {
    let repo = api.repo(Repo::new(repo_id.to_owned(), RepoType::Model));
    let listed: Vec<String> = repo
        .info()
        .map_err(|error| download_error(repo_id, "the file list", error))?
        .siblings
        .into_iter()
        .map(|sibling| sibling.rfilename)
        .collect();
    let wanted = REQUIRED.iter().chain(
        OPTIONAL
            .iter()
            .filter(|file| listed.iter().any(|name| name == *file)),
    );
    let mut weights = None;
    for file in wanted {
        let path = repo
            .get(file)
            .map_err(|error| download_error(repo_id, file, error))?;
        if *file == "model.safetensors" {
            weights = Some(path);
        }
    }
    // All files of one revision land in one snapshot folder: the weights' parent.
    weights
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .ok_or_else(|| download_error(repo_id, "model.safetensors", "no path in the cache"))
}

/// Accepts `owner/name` or `name`, as the hub does.
pub(super) fn check_repo_id(spec: &str, repo_id: &str) -> Result<(), EmbeddingError> {
    let valid_part = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let valid = match repo_id.split_once('/') {
        Some((owner, name)) => valid_part(owner) && valid_part(name),
        None => valid_part(repo_id),
    };
    if valid {
        Ok(())
    } else {
        Err(EmbeddingError::InvalidSpec {
            spec: spec.to_owned(),
            reason:
                "expected `hf:<owner>/<name>`, e.g. `hf:sentence-transformers/all-MiniLM-L6-v2`"
                    .to_owned(),
        })
    }
}

fn download_error(
    repo_id: &str,
    file: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> EmbeddingError {
    EmbeddingError::Download {
        repo: repo_id.to_owned(),
        file: file.to_owned(),
        source: error.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_and_name() {
        assert!(check_repo_id("s", "sentence-transformers/all-MiniLM-L6-v2").is_ok());
        assert!(check_repo_id("s", "gpt2").is_ok());
        assert!(check_repo_id("s", "").is_err());
        assert!(check_repo_id("s", "a/b/c").is_err());
        assert!(check_repo_id("s", "../etc").is_err());
        assert!(check_repo_id("s", "owner/").is_err());
    }
}
