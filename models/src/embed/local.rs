//! What the local backends share: a sentence-transformers model folder, checked before use;
//! the tokenizer set up as sentence-transformers runs it; batching; and the adapter that runs
//! a backend's encoder off the async runtime.
//!
//! Each backend ([`super::candle`], [`super::tch`]) only turns a padded batch of token ids into
//! mean-pooled vectors; everything else is here, so the backends cannot drift apart.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::{normalise, EmbeddingError, EmbeddingModel, ALL_MINILM_L6_V2, ALL_MINILM_L6_V2_SHA256};

/// Texts encoded per forward pass, as sentence-transformers' default.
pub const BATCH_SIZE: usize = 32;

/// The weights file of a model folder.
const WEIGHTS: &str = "model.safetensors";
/// The optional checksum file: `sha256sum` output, one `<hex>  <file>` line per file.
const SHA256SUMS: &str = "SHA256SUMS";

/// A sentence-embedding model that runs in this process, on candle or on libtorch.
pub struct LocalEmbeddingModel {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    dimensions: usize,
    backend: &'static str,
    tokenizer: Tokenizer,
    pad_id: u32,
    encoder: Box<dyn Encoder>,
}

impl fmt::Debug for LocalEmbeddingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEmbeddingModel")
            .field("name", &self.inner.name)
            .field("dimensions", &self.inner.dimensions)
            .field("backend", &self.inner.backend)
            .finish()
    }
}

/// A backend's BERT encoder with mean pooling: one (not yet normalised) vector per row.
pub(super) trait Encoder: Send + Sync {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbeddingError>;
}

/// A batch of tokenized texts, padded to its longest: row-major `rows × len` arrays.
pub(super) struct Batch {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1 for a token, 0 for padding.
    pub mask: Vec<u32>,
}

/// A model folder that passed the checks, ready for a backend to load.
pub(super) struct Folder {
    pub path: PathBuf,
    pub weights: PathBuf,
    pub config: BertConfig,
    pub max_seq_length: usize,
    pub name: String,
}

/// The fields of `config.json` the backends use.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct BertConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

/// The GELU of the feed-forward layers, as `hidden_act` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gelu {
    /// The exact one, with the error function (BERT's `gelu`).
    Erf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    Tanh,
}

impl BertConfig {
    pub fn gelu(&self, backend: &'static str) -> Result<Gelu, EmbeddingError> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Gelu::Erf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_approximate" => Ok(Gelu::Tanh),
            other => Err(EmbeddingError::Backend {
                backend,
                source: format!("unsupported hidden_act `{other}`").into(),
            }),
        }
    }
}

/// A checkpoint's tensors by name, taken out one by one as a backend assembles its BERT.
pub(super) struct Weights<T> {
    backend: &'static str,
    tensors: HashMap<String, T>,
}

/// One encoder layer's tensors, each a `(weight, bias)` pair.
pub(super) struct LayerWeights<T> {
    pub query: (T, T),
    pub key: (T, T),
    pub value: (T, T),
    pub attention_out: (T, T),
    pub attention_norm: (T, T),
    pub intermediate: (T, T),
    pub output: (T, T),
    pub output_norm: (T, T),
}

impl<T> Weights<T> {
    pub fn new(backend: &'static str, tensors: impl IntoIterator<Item = (String, T)>) -> Self {
        let tensors = tensors
            .into_iter()
            // Checkpoints saved from a model with a head prefix their encoder's names.
            .map(|(name, tensor)| match name.strip_prefix("bert.") {
                Some(short) => (short.to_owned(), tensor),
                None => (name, tensor),
            })
            .collect();
        Self { backend, tensors }
    }

    pub fn take(&mut self, name: &str) -> Result<T, EmbeddingError> {
        self.tensors
            .remove(name)
            .ok_or_else(|| EmbeddingError::Backend {
                backend: self.backend,
                source: format!("the weights have no tensor `{name}`").into(),
            })
    }

    /// `{prefix}.weight` and `{prefix}.bias`.
    pub fn pair(&mut self, prefix: &str) -> Result<(T, T), EmbeddingError> {
        Ok((
            self.take(&format!("{prefix}.weight"))?,
            self.take(&format!("{prefix}.bias"))?,
        ))
    }

    /// The tensors of encoder layer `index`.
    pub fn layer(&mut self, index: usize) -> Result<LayerWeights<T>, EmbeddingError> {
        let prefix = format!("encoder.layer.{index}");
        Ok(LayerWeights {
            query: self.pair(&format!("{prefix}.attention.self.query"))?,
            key: self.pair(&format!("{prefix}.attention.self.key"))?,
            value: self.pair(&format!("{prefix}.attention.self.value"))?,
            attention_out: self.pair(&format!("{prefix}.attention.output.dense"))?,
            attention_norm: self.pair(&format!("{prefix}.attention.output.LayerNorm"))?,
            intermediate: self.pair(&format!("{prefix}.intermediate.dense"))?,
            output: self.pair(&format!("{prefix}.output.dense"))?,
            output_norm: self.pair(&format!("{prefix}.output.LayerNorm"))?,
        })
    }
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_hidden_act() -> String {
    "gelu".to_owned()
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

impl LocalEmbeddingModel {
    /// Loads the model folder `folder` on candle (pure Rust, CPU).
    #[cfg(feature = "candle")]
    pub fn candle(folder: impl AsRef<Path>) -> Result<Self, EmbeddingError> {
        Self::candle_named(folder.as_ref(), None)
    }

    #[cfg(feature = "candle")]
    pub(super) fn candle_named(folder: &Path, label: Option<&str>) -> Result<Self, EmbeddingError> {
        let folder = Folder::open(folder, label)?;
        let encoder = super::candle::CandleEncoder::load(&folder)?;
        Self::new(folder, "candle", Box::new(encoder))
    }

    /// Loads the model folder `folder` on libtorch (CPU), with as many threads as the process
    /// may use cores.
    #[cfg(feature = "tch")]
    pub fn tch(folder: impl AsRef<Path>) -> Result<Self, EmbeddingError> {
        Self::tch_named(folder.as_ref(), None)
    }

    #[cfg(feature = "tch")]
    pub(super) fn tch_named(folder: &Path, label: Option<&str>) -> Result<Self, EmbeddingError> {
        let folder = Folder::open(folder, label)?;
        let encoder = super::tch::TchEncoder::load(&folder)?;
        Self::new(folder, "tch", Box::new(encoder))
    }

    fn new(
        folder: Folder,
        backend: &'static str,
        encoder: Box<dyn Encoder>,
    ) -> Result<Self, EmbeddingError> {
        let (tokenizer, pad_id) = load_tokenizer(&folder.path, folder.max_seq_length)?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: folder.name,
                dimensions: folder.config.hidden_size,
                backend,
                tokenizer,
                pad_id,
                encoder,
            }),
        })
    }

    /// Which backend runs the model: `candle` or `tch`.
    pub fn backend(&self) -> &'static str {
        self.inner.backend
    }

    /// Embeds `texts` on the calling thread, in batches of [`BATCH_SIZE`]. This is what
    /// [`EmbeddingModel::embed`] runs on a blocking thread; call it directly only off the async
    /// runtime.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        self.inner.embed(texts)
    }
}

impl Inner {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        // One text is encoded on this thread: `encode_batch` hands its texts to rayon's pool.
        let encodings = match texts {
            [text] => vec![self
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(EmbeddingError::Tokenizer)?],
            _ => {
                let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
                self.tokenizer
                    .encode_batch(inputs, true)
                    .map_err(EmbeddingError::Tokenizer)?
            }
        };
        // Longest first, as sentence-transformers does: texts of similar length share a batch,
        // so little of each batch is padding. Padding does not change a text's vector (the
        // attention mask hides it), only the work.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&index| std::cmp::Reverse(encodings[index].get_ids().len()));

        let mut vectors = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH_SIZE) {
            let len = chunk
                .iter()
                .map(|&index| encodings[index].get_ids().len())
                .max()
                .unwrap_or(0);
            let mut batch = Batch {
                rows: chunk.len(),
                len,
                ids: vec![self.pad_id; chunk.len() * len],
                type_ids: vec![0; chunk.len() * len],
                mask: vec![0; chunk.len() * len],
            };
            for (row, &index) in chunk.iter().enumerate() {
                let encoding = &encodings[index];
                let start = row * len;
                let ids = encoding.get_ids();
                batch.ids[start..start + ids.len()].copy_from_slice(ids);
                let type_ids = encoding.get_type_ids();
                batch.type_ids[start..start + type_ids.len()].copy_from_slice(type_ids);
                batch.mask[start..start + ids.len()].fill(1);
            }
            let pooled = self.encoder.encode(&batch)?;
            if pooled.len() != chunk.len() {
                return Err(EmbeddingError::Backend {
                    backend: self.backend,
                    source: format!("{} vectors for {} texts", pooled.len(), chunk.len()).into(),
                });
            }
            for (&index, mut vector) in chunk.iter().zip(pooled) {
                if vector.len() != self.dimensions {
                    return Err(EmbeddingError::Dimensions {
                        expected: self.dimensions,
                        actual: vector.len(),
                    });
                }
                normalise(&mut vector);
                vectors[index] = vector;
            }
        }
        Ok(vectors)
    }
}

#[async_trait]
impl EmbeddingModel for LocalEmbeddingModel {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        // Inference keeps a core busy for tens of milliseconds per batch: off the runtime's
        // worker threads, so that it cannot stall other tasks.
        let inner = Arc::clone(&self.inner);
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || inner.embed(&texts)).await?
    }
}

impl Folder {
    /// Reads the folder's configuration and checks its weights (see [`verify_weights`]).
    /// `label` names the model when its weights are not all-MiniLM-L6-v2's (the folder's name
    /// by default).
    pub(super) fn open(path: &Path, label: Option<&str>) -> Result<Self, EmbeddingError> {
        let config_path = path.join("config.json");
        let config: BertConfig = read_json(&config_path)?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(EmbeddingError::InvalidFile {
                path: config_path,
                message: format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            });
        }
        let sentence_config = path.join("sentence_bert_config.json");
        let max_seq_length = if sentence_config.exists() {
            read_json::<SentenceBertConfig>(&sentence_config)?.max_seq_length
        } else {
            None
        }
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
        let pooling = path.join("1_Pooling").join("config.json");
        if pooling.exists() && !read_json::<PoolingConfig>(&pooling)?.pooling_mode_mean_tokens {
            return Err(EmbeddingError::InvalidFile {
                path: pooling,
                message: "only mean pooling is supported".to_owned(),
            });
        }
        let weights = path.join(WEIGHTS);
        let sha256 = verify_weights(path, &weights)?;
        let name = if sha256 == ALL_MINILM_L6_V2_SHA256 {
            ALL_MINILM_L6_V2.to_owned()
        } else {
            // Distinct weights under one folder name must not share cached vectors.
            let label = label.map(str::to_owned).unwrap_or_else(|| {
                path.canonicalize()
                    .ok()
                    .as_deref()
                    .unwrap_or(path)
                    .file_name()
                    .map_or_else(
                        || "model".to_owned(),
                        |name| name.to_string_lossy().into_owned(),
                    )
            });
            format!("{label}@{}", &sha256[..12])
        };
        Ok(Self {
            path: path.to_owned(),
            weights,
            config,
            max_seq_length,
            name,
        })
    }
}

/// Checks the sha256 of `weights` against the folder's `SHA256SUMS` when it has one, else
/// against all-MiniLM-L6-v2's known hash, and refuses weights that match neither: loading
/// unchecked weights would let a damaged or swapped file produce plausible but wrong vectors,
/// which nothing downstream would notice. Returns the hash.
fn verify_weights(folder: &Path, weights: &Path) -> Result<String, EmbeddingError> {
    let actual = sha256_file(weights)?;
    let sums_path = folder.join(SHA256SUMS);
    let sums = match std::fs::read_to_string(&sums_path) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(EmbeddingError::Read {
                path: sums_path,
                source,
            })
        }
    };
    let (expected, expected_from) = match sums {
        Some(text) => {
            let expected =
                expected_hash(&text, WEIGHTS).ok_or_else(|| EmbeddingError::InvalidFile {
                    path: sums_path.clone(),
                    message: format!("no sha256 line for {WEIGHTS}"),
                })?;
            (expected, sums_path.display().to_string())
        }
        None if actual == ALL_MINILM_L6_V2_SHA256 => return Ok(actual),
        None => {
            return Err(EmbeddingError::Unverified {
                folder: folder.to_owned(),
                actual,
            })
        }
    };
    if expected != actual {
        return Err(EmbeddingError::ChecksumMismatch {
            path: weights.to_owned(),
            actual,
            expected,
            expected_from,
        });
    }
    Ok(actual)
}

/// The hash `sha256sum` output gives for `file` (`<hex>  <file>`, or `<hex> *<file>` in binary
/// mode), lowercased.
fn expected_hash(sums: &str, file: &str) -> Option<String> {
    sums.lines().find_map(|line| {
        let (hash, name) = line.trim().split_once(char::is_whitespace)?;
        let name = name.trim_start();
        let name = name.strip_prefix('*').unwrap_or(name);
        let name = name.strip_prefix("./").unwrap_or(name);
        (name == file && hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_ascii_lowercase())
    })
}

fn sha256_file(path: &Path) -> Result<String, EmbeddingError> {
    let read_error = |source| EmbeddingError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(read_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmbeddingError> {
    let text = std::fs::read_to_string(path).map_err(|source| EmbeddingError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|error| EmbeddingError::InvalidFile {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// Loads `tokenizer.json` as sentence-transformers runs it: truncated at the model's
/// `max_seq_length`, not padded (batches are padded to their longest text when built). The
/// file of all-MiniLM-L6-v2 pads every text to 128 tokens and truncates at 128, which would
/// waste work on short texts and cut long ones shorter than sentence-transformers does.
/// Returns the tokenizer and the padding token's id.
fn load_tokenizer(
    folder: &Path,
    max_seq_length: usize,
) -> Result<(Tokenizer, u32), EmbeddingError> {
    let path = folder.join("tokenizer.json");
    if !path.exists() {
        return Err(EmbeddingError::Read {
            path,
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        });
    }
    let mut tokenizer = Tokenizer::from_file(&path).map_err(EmbeddingError::Tokenizer)?;
    let pad_id = tokenizer
        .get_padding()
        .map(|padding| padding.pad_id)
        .or_else(|| tokenizer.token_to_id("[PAD]"))
        .unwrap_or(0);
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_seq_length,
            ..tokenizers::TruncationParams::default()
        }))
        .map_err(EmbeddingError::Tokenizer)?;
    Ok((tokenizer, pad_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256sums_lines_are_read_in_text_and_binary_mode() {
        let hash = "AB".repeat(32);
        let sums = format!(
            "{}  tokenizer.json\n{hash} *model.safetensors\n",
            "0".repeat(64)
        );
        assert_eq!(expected_hash(&sums, WEIGHTS), Some("ab".repeat(32)));
        assert_eq!(
            expected_hash(&format!("{hash}  ./model.safetensors"), WEIGHTS),
            Some("ab".repeat(32))
        );
        assert_eq!(expected_hash("short  model.safetensors", WEIGHTS), None);
        assert_eq!(expected_hash("", WEIGHTS), None);
    }
}
