//! The libtorch backend: the BERT encoder written with tch operations over the tensors of the
//! folder's safetensors (`Tensor::read_safetensors`), so no TorchScript export is needed.
//! Attention is libtorch's fused `scaled_dot_product_attention`, as in transformers' BERT.
//! Mean pooling over the attention mask; normalisation is done by the caller.

use std::sync::{Mutex, PoisonError};

use tch::{Device, Kind, TchError, Tensor};

use super::local::{Batch, BertConfig, Encoder, Folder, Gelu, Weights};
use super::EmbeddingError;

pub(super) struct TchEncoder {
    // A `Tensor` may move between threads but not be shared by them; calls take turns, and
    // each runs on all of libtorch's threads anyway.
    bert: Mutex<Bert>,
}

struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    heads: i64,
    hidden: i64,
    eps: f64,
    /// The `approximate` argument of `gelu`.
    gelu: &'static str,
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

impl TchEncoder {
    pub(super) fn load(folder: &Folder) -> Result<Self, EmbeddingError> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
        let tensors = Tensor::read_safetensors(&folder.weights).map_err(backend)?;
        let mut weights = Weights::new("tch", tensors);
        let bert = Bert::load(&mut weights, &folder.config)?;
        Ok(Self {
            bert: Mutex::new(bert),
        })
    }
}

impl Encoder for TchEncoder {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        // Nothing is left half-updated by a panic: the weights are only read.
        let bert = self.bert.lock().unwrap_or_else(PoisonError::into_inner);
        let _no_grad = tch::no_grad_guard();
        bert.forward(batch).map_err(backend)
    }
}

impl Bert {
    fn load(weights: &mut Weights<Tensor>, config: &BertConfig) -> Result<Self, EmbeddingError> {
        let gelu = match config.gelu("tch")? {
            Gelu::Erf => "none",
            Gelu::Tanh => "tanh",
        };
        let layers = (0..config.num_hidden_layers)
            .map(|index| {
                let w = weights.layer(index)?;
                Ok(Layer {
                    query: Linear::from(w.query),
                    key: Linear::from(w.key),
                    value: Linear::from(w.value),
                    attention_out: Linear::from(w.attention_out),
                    attention_norm: Norm::from(w.attention_norm),
                    intermediate: Linear::from(w.intermediate),
                    output: Linear::from(w.output),
                    output_norm: Norm::from(w.output_norm),
                })
            })
            .collect::<Result<Vec<_>, EmbeddingError>>()?;
        let (norm_weight, norm_bias) = weights.pair("embeddings.LayerNorm")?;
        Ok(Self {
            word_embeddings: weights.take("embeddings.word_embeddings.weight")?,
            position_embeddings: weights.take("embeddings.position_embeddings.weight")?,
            token_type_embeddings: weights.take("embeddings.token_type_embeddings.weight")?,
            embeddings_norm: Norm::from((norm_weight, norm_bias)),
            layers,
            heads: to_i64(config.num_attention_heads),
            hidden: to_i64(config.hidden_size),
            eps: config.layer_norm_eps,
            gelu,
        })
    }

    fn forward(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, TchError> {
        let (rows, len) = (to_i64(batch.rows), to_i64(batch.len));
        let as_tensor = |values: &[u32]| -> Result<Tensor, TchError> {
            let values: Vec<i64> = values.iter().map(|&value| i64::from(value)).collect();
            Tensor::f_from_slice(&values)?.f_view([rows, len])
        };
        let ids = as_tensor(&batch.ids)?;
        let type_ids = as_tensor(&batch.type_ids)?;
        let mask = as_tensor(&batch.mask)?;
        let positions = Tensor::f_arange(len, (Kind::Int64, Device::Cpu))?;

        let embeddings = Tensor::f_embedding(&self.word_embeddings, &ids, -1, false, false)?
            .f_add(&Tensor::f_embedding(
                &self.token_type_embeddings,
                &type_ids,
                -1,
                false,
                false,
            )?)?
            .f_add(&Tensor::f_embedding(
                &self.position_embeddings,
                &positions,
                -1,
                false,
                false,
            )?)?;
        let mut hidden = self
            .embeddings_norm
            .forward(&embeddings, self.hidden, self.eps)?;

        // True where a query may attend: every real token of its text, no padding.
        let attend = mask.f_to_kind(Kind::Bool)?.f_view([rows, 1, 1, len])?;
        let head_size = self.hidden / self.heads;
        let split_heads = |x: Tensor| -> Result<Tensor, TchError> {
            x.f_view([rows, len, self.heads, head_size])?
                .f_transpose(1, 2)
        };
        for layer in &self.layers {
            let query = split_heads(layer.query.forward(&hidden)?)?;
            let key = split_heads(layer.key.forward(&hidden)?)?;
            let value = split_heads(layer.value.forward(&hidden)?)?;
            let context = Tensor::f_scaled_dot_product_attention(
                &query,
                &key,
                &value,
                Some(&attend),
                0.0,
                false,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_reshape([rows, len, self.hidden])?;
            let attended = layer.attention_out.forward(&context)?.f_add(&hidden)?;
            let attended = layer
                .attention_norm
                .forward(&attended, self.hidden, self.eps)?;
            let intermediate = layer.intermediate.forward(&attended)?.f_gelu(self.gelu)?;
            let output = layer.output.forward(&intermediate)?.f_add(&attended)?;
            hidden = layer.output_norm.forward(&output, self.hidden, self.eps)?;
        }

        // Mean over the real tokens: padding is zeroed out of the sum and out of the count.
        let mask = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
        let summed = hidden
            .f_mul(&mask)?
            .f_sum_dim_intlist(1, false, Kind::Float)?;
        let counts = mask
            .f_sum_dim_intlist(1, false, Kind::Float)?
            .f_clamp_min(1e-9)?;
        let pooled = summed.f_div(&counts)?.f_contiguous()?;
        Vec::<Vec<f32>>::try_from(&pooled)
    }
}

impl From<(Tensor, Tensor)> for Linear {
    fn from((weight, bias): (Tensor, Tensor)) -> Self {
        Self { weight, bias }
    }
}

impl From<(Tensor, Tensor)> for Norm {
    fn from((weight, bias): (Tensor, Tensor)) -> Self {
        Self { weight, bias }
    }
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

impl Norm {
    fn forward(&self, x: &Tensor, hidden: i64, eps: f64) -> Result<Tensor, TchError> {
        x.f_layer_norm([hidden], Some(&self.weight), Some(&self.bias), eps, false)
    }
}

/// Sizes of a model and a batch fit an `i64` by far.
fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn backend(error: TchError) -> EmbeddingError {
    EmbeddingError::Backend {
        backend: "tch",
        source: Box::new(error),
    }
}
