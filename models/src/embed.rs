//! The embedding port: text in, one L2-normalised vector per text out, for semantic search and
//! memory. [`EmbeddingModel`] is the port; [`load_embedding_model`] turns a one-line spec (from
//! configuration or the environment) into an adapter:
//!
//! | spec | adapter |
//! |---|---|
//! | `<folder>` or `candle:<folder>` | [`LocalEmbeddingModel::candle`], pure Rust (feature `candle`, on by default) |
//! | `tch:<folder>` | [`LocalEmbeddingModel::tch`], on libtorch (feature `tch`) |
//! | `openai:<base url>#<model>[@<dimensions>]` | [`OpenAiEmbeddingModel`], any OpenAI-compatible server |
//! | `hf:<repo id>` | downloads the folder from the Hugging Face hub into its cache (feature `hf`), then as `<folder>` |
//!
//! A plain `<folder>` uses candle when it is built in, else tch. The folder is a
//! sentence-transformers model (e.g. all-MiniLM-L6-v2): `model.safetensors`, `config.json`,
//! `tokenizer.json`, and optionally `sentence_bert_config.json` and `SHA256SUMS`.
//!
//! **Invariant**: every adapter returns unit-length vectors of exactly
//! [`EmbeddingModel::dimensions`] components, in the order of the texts, so that cosine
//! similarity is a dot product and vectors from different adapters of the same model compare.

#[cfg(any(feature = "candle", feature = "tch"))]
mod local;
pub mod openai;

#[cfg(feature = "candle")]
mod candle;
#[cfg(feature = "hf")]
pub mod hf;
#[cfg(feature = "tch")]
mod tch;

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ApiKey;
use crate::ModelError;

#[cfg(any(feature = "candle", feature = "tch"))]
pub use local::{LocalEmbeddingModel, BATCH_SIZE};
pub use openai::OpenAiEmbeddingModel;

/// The sha256 of all-MiniLM-L6-v2's `model.safetensors` (sentence-transformers' upstream
/// revision): a folder holding exactly these weights needs no `SHA256SUMS`.
pub const ALL_MINILM_L6_V2_SHA256: &str =
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// The name of the model whose weights are [`ALL_MINILM_L6_V2_SHA256`].
pub const ALL_MINILM_L6_V2: &str = "all-MiniLM-L6-v2";

/// The environment variable holding the API key for `openai:` specs (sent as a bearer token
/// when set).
pub const API_KEY_VAR: &str = "STELE_EMBEDDING_API_KEY";

/// A sentence-embedding model: the port every embedding adapter implements.
#[async_trait]
pub trait EmbeddingModel: Send + Sync {
    /// The model's name, e.g. `all-MiniLM-L6-v2`. Two models with the same name produce the
    /// same vectors (within float noise), so the name and the text's sha256 make a cache key.
    fn name(&self) -> &str;

    /// The number of components of every vector.
    fn dimensions(&self) -> usize;

    /// One L2-normalised vector of [`dimensions`](Self::dimensions) components per text, in the
    /// order of `texts`. An empty slice gives an empty result without any work.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError>;
}

/// What went wrong loading or calling an embedding model.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    /// The spec given to [`load_embedding_model`] cannot be understood.
    #[error("invalid embedding model spec `{spec}`: {reason}")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it, and what would be right.
        reason: String,
    },
    /// The spec needs a backend that this build leaves out.
    #[error("`{spec}` needs stele-models built with the `{feature}` feature")]
    FeatureDisabled {
        /// The spec as given.
        spec: String,
        /// The cargo feature to enable.
        feature: &'static str,
    },
    /// A file of the model folder cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the model folder is there but not what a sentence-transformers folder holds.
    #[error("{}: {message}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The weights' sha256 differs from the one they were checked against.
    #[error(
        "{} has sha256 {actual}, but {expected_from} says {expected}: the file is damaged or not \
         the model meant",
        path.display()
    )]
    ChecksumMismatch {
        /// The weights file.
        path: PathBuf,
        /// The sha256 computed.
        actual: String,
        /// The sha256 expected.
        expected: String,
        /// Where the expected hash comes from (`SHA256SUMS` or the known all-MiniLM-L6-v2 hash).
        expected_from: String,
    },
    /// The weights are not all-MiniLM-L6-v2's and no `SHA256SUMS` says what they should be.
    #[error(
        "refusing to load {folder}/model.safetensors: its sha256 {actual} is not \
         all-MiniLM-L6-v2's, and the folder has no SHA256SUMS to check it against. Once the file \
         is the one you trust, record its hash: `cd {folder} && sha256sum model.safetensors > \
         SHA256SUMS`",
        folder = folder.display()
    )]
    Unverified {
        /// The model folder.
        folder: PathBuf,
        /// The sha256 computed.
        actual: String,
    },
    /// The tokenizer could not be loaded, configured or run.
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] Box<dyn StdError + Send + Sync>),
    /// The local backend failed (a missing tensor, a shape it cannot handle, …).
    #[error("{backend}: {source}")]
    Backend {
        /// `candle` or `tch`.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The inference task ended without a result (it panicked or was cancelled).
    #[error("the embedding task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The embedding server failed or answered something unusable.
    #[error("embedding provider: {0}")]
    Provider(#[from] ModelError),
    /// A vector has the wrong number of components.
    #[error("expected vectors of {expected} dimensions, got {actual}")]
    Dimensions {
        /// [`EmbeddingModel::dimensions`].
        expected: usize,
        /// What came back.
        actual: usize,
    },
    /// A file could not be fetched from the Hugging Face hub.
    #[error("cannot download {file} of `{repo}` from the Hugging Face hub: {source}")]
    Download {
        /// The repository id.
        repo: String,
        /// The file, or `the file list`.
        file: String,
        /// The hub client's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl EmbeddingError {
    /// Whether trying again later may succeed: only a provider's transient failures (see
    /// [`ModelError::is_retryable`]). A local model fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Provider(error) => error.is_retryable(),
            _ => false,
        }
    }

    fn invalid_spec(spec: &str, reason: impl Into<String>) -> Self {
        Self::InvalidSpec {
            spec: spec.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Loads the embedding model `spec` names (see the [module documentation](self) for the forms).
///
/// Local models are read and checked here (the weights' sha256 against `SHA256SUMS` or the
/// known all-MiniLM-L6-v2 hash), and `hf:` downloads here: this blocks, for a second or more,
/// so async code should call it through `tokio::task::spawn_blocking`.
pub fn load_embedding_model(spec: &str) -> Result<Arc<dyn EmbeddingModel>, EmbeddingError> {
    let trimmed = spec.trim();
    if let Some(rest) = trimmed.strip_prefix("openai:") {
        let (base_url, model, dimensions) = parse_openai(spec, rest)?;
        let api_key = std::env::var(API_KEY_VAR)
            .ok()
            .filter(|key| !key.trim().is_empty())
            .map(ApiKey::new);
        return Ok(Arc::new(OpenAiEmbeddingModel::new(
            base_url, model, dimensions, api_key,
        )?));
    }
    if let Some(repo) = trimmed.strip_prefix("hf:") {
        return load_hf(spec, repo.trim());
    }
    let (backend, folder) = if let Some(folder) = trimmed.strip_prefix("tch:") {
        (Some(Backend::Tch), folder.trim())
    } else if let Some(folder) = trimmed.strip_prefix("candle:") {
        (Some(Backend::Candle), folder.trim())
    } else {
        (None, trimmed)
    };
    if folder.is_empty() {
        return Err(EmbeddingError::invalid_spec(
            spec,
            "no model folder; expected a model folder, `tch:<folder>`, \
             `openai:<base url>#<model>` or `hf:<repo id>`",
        ));
    }
    load_local(spec, Path::new(folder), None, backend)
}

/// The local backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Candle,
    Tch,
}

/// Loads a model folder on `backend`, or on the default one (candle when built in, else tch).
/// `label` names the model when its weights are not all-MiniLM-L6-v2's.
fn load_local(
    spec: &str,
    folder: &Path,
    label: Option<&str>,
    backend: Option<Backend>,
) -> Result<Arc<dyn EmbeddingModel>, EmbeddingError> {
    let backend = backend.unwrap_or(if cfg!(feature = "candle") || !cfg!(feature = "tch") {
        Backend::Candle
    } else {
        Backend::Tch
    });
    match backend {
        #[cfg(feature = "candle")]
        Backend::Candle => Ok(Arc::new(LocalEmbeddingModel::candle_named(folder, label)?)),
        #[cfg(feature = "tch")]
        Backend::Tch => Ok(Arc::new(LocalEmbeddingModel::tch_named(folder, label)?)),
        #[allow(unreachable_patterns)]
        missing => {
            let _ = (folder, label);
            Err(EmbeddingError::FeatureDisabled {
                spec: spec.to_owned(),
                feature: if missing == Backend::Tch {
                    "tch"
                } else {
                    "candle"
                },
            })
        }
    }
}

#[cfg(feature = "hf")]
fn load_hf(spec: &str, repo: &str) -> Result<Arc<dyn EmbeddingModel>, EmbeddingError> {
    hf::check_repo_id(spec, repo)?;
    let folder = hf::download(repo)?;
    let name = repo.rsplit('/').next().unwrap_or(repo);
    load_local(spec, &folder, Some(name), None)
}

#[cfg(not(feature = "hf"))]
fn load_hf(spec: &str, _repo: &str) -> Result<Arc<dyn EmbeddingModel>, EmbeddingError> {
    Err(EmbeddingError::FeatureDisabled {
        spec: spec.to_owned(),
        feature: "hf",
    })
}

/// Splits `openai:<base url>#<model>[@<dimensions>]` (given without its prefix).
fn parse_openai<'a>(
    spec: &str,
    rest: &'a str,
) -> Result<(&'a str, &'a str, usize), EmbeddingError> {
    let Some((base_url, model)) = rest.rsplit_once('#') else {
        return Err(EmbeddingError::invalid_spec(
            spec,
            "expected `openai:<base url>#<model>`, e.g. `openai:http://localhost:11434#nomic-embed-text@768`",
        ));
    };
    let base_url = base_url.trim();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(EmbeddingError::invalid_spec(
            spec,
            "the base URL must start with http:// or https://",
        ));
    }
    let model = model.trim();
    let (model, dimensions) = match model.rsplit_once('@') {
        Some((name, dimensions)) => {
            let dimensions = dimensions
                .parse::<usize>()
                .ok()
                .filter(|dimensions| *dimensions > 0)
                .ok_or_else(|| {
                    EmbeddingError::invalid_spec(
                        spec,
                        format!("`{dimensions}` is not a number of dimensions"),
                    )
                })?;
            (name, Some(dimensions))
        }
        None => (model, None),
    };
    if model.is_empty() {
        return Err(EmbeddingError::invalid_spec(
            spec,
            "no model name after `#`",
        ));
    }
    let dimensions = dimensions
        .or_else(|| known_dimensions(model))
        .ok_or_else(|| {
            EmbeddingError::invalid_spec(
                spec,
                format!(
                    "the dimensions of `{model}` are not known: add them after the model, e.g. \
                     `openai:{base_url}#{model}@768`"
                ),
            )
        })?;
    Ok((base_url, model, dimensions))
}

/// Dimensions of well-known embedding models, so that their specs need not say them.
fn known_dimensions(model: &str) -> Option<usize> {
    // Servers name local models with or without their organisation (`sentence-transformers/…`).
    let short = model.rsplit('/').next().unwrap_or(model);
    match short {
        "text-embedding-3-small" | "text-embedding-ada-002" => Some(1536),
        "text-embedding-3-large" => Some(3072),
        ALL_MINILM_L6_V2 => Some(384),
        _ => None,
    }
}

/// Scales `vector` to unit length (a zero vector stays zero).
pub(crate) fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in vector.iter_mut() {
            *x /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_specs_name_a_base_url_a_model_and_maybe_dimensions() {
        fn parse(rest: &str) -> Result<(&str, &str, usize), EmbeddingError> {
            parse_openai("spec", rest)
        }
        let (base, model, dimensions) =
            parse("https://api.openai.com#text-embedding-3-small").expect("a known model");
        assert_eq!(
            (base, model, dimensions),
            ("https://api.openai.com", "text-embedding-3-small", 1536)
        );
        let (_, model, dimensions) =
            parse("http://localhost:11434#nomic-embed-text:latest@768").expect("explicit");
        assert_eq!((model, dimensions), ("nomic-embed-text:latest", 768));
        let (_, _, dimensions) =
            parse("http://h#sentence-transformers/all-MiniLM-L6-v2").expect("known");
        assert_eq!(dimensions, 384);
        assert!(parse("http://h#mystery").is_err());
        assert!(parse("http://h#mystery@zero").is_err());
        assert!(parse("http://h#@384").is_err());
        assert!(parse("localhost#text-embedding-3-small").is_err());
        assert!(parse("http://h").is_err());
    }

    #[test]
    fn specs_for_missing_backends_say_which_feature() {
        let error = load_embedding_model("").err().expect("empty spec");
        assert!(matches!(error, EmbeddingError::InvalidSpec { .. }));
        if !cfg!(feature = "tch") {
            let error = load_embedding_model("tch:/models/x").err().expect("no tch");
            assert!(error.to_string().contains("`tch` feature"), "{error}");
        }
    }

    #[test]
    fn normalise_gives_unit_length_and_leaves_zero_alone() {
        let mut vector = vec![3.0, 4.0];
        normalise(&mut vector);
        assert_eq!(vector, vec![0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        normalise(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}
