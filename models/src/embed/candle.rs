//! The candle backend: the BERT encoder written with candle operations over the folder's
//! safetensors, on the CPU, pure Rust. Mean pooling over the attention mask; normalisation is
//! done by the caller.
//!
//! candle-transformers has a `BertModel`, but on the CPU it spends a fifth of a forward pass in
//! GELU (a scalar `erf` call per element) and runs attention as separate steps (three
//! projections, a generic softmax, the scaling as its own pass). This one, like the tch
//! backend, projects query, key and value in one matrix product, folds the scaling into the
//! query's weights, uses candle's fused last-dimension softmax and layer norm, and computes GELU
//! with a vectorisable `erf` (below).

use std::sync::{Mutex, PoisonError};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, D,
};
use candle_nn::{Embedding, LayerNorm};

use super::local::{Batch, BertConfig, Encoder, Folder, Gelu, LayerWeights, Weights};
use super::EmbeddingError;

pub(super) struct CandleEncoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    gelu: Gelu,
    device: Device,
}

struct Layer {
    /// Query, key and value in one projection; the query's part is pre-scaled by
    /// `1/sqrt(head size)`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

/// A linear layer computed by one gemm call that also adds the bias (and the residual, when
/// there is one), with the weight kept transposed, `(in, out)` row-major.
///
/// Written against gemm directly rather than with candle's `Linear`: that multiplies by the
/// checkpoint's `(out, in)` weight seen transposed, and gemm then repacks the whole weight on
/// every call, which for a short text (one query: a few tokens, a million floats of weight)
/// takes longer than the product itself; stored transposed, the weight is already in the
/// column-major layout gemm's kernel reads. And candle would add the bias and the residual in
/// passes of their own over the output (a tenth of a batch's time); here the output starts as
/// bias plus residual and gemm accumulates the product onto it.
struct Dense {
    weight_t: Tensor,
    bias: Vec<f32>,
}

impl Dense {
    fn new((weight, bias): (Tensor, Tensor)) -> candle_core::Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias: bias.to_vec1()?,
        })
    }

    /// `x · Wᵀ + b (+ residual)` over the last dimension of `x`.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let inputs = dims.pop().unwrap_or(1);
        let rows = dims.iter().product::<usize>();
        let outputs = self.weight_t.dim(1)?;
        let x = x.reshape((rows, inputs))?.contiguous()?;
        let op = AddMatmul { bias: &self.bias };
        let out = match residual {
            Some(residual) => {
                let residual = residual.reshape((rows, outputs))?.contiguous()?;
                x.apply_op3_no_bwd(&self.weight_t, &residual, &op)?
            }
            None => x.apply_op2_no_bwd(&self.weight_t, &op)?,
        };
        dims.push(outputs);
        out.reshape(dims)
    }
}

/// `bias + residual + x · w` for contiguous f32 matrices `x` `(rows, in)`, `w` `(in, out)` and
/// `residual` `(rows, out)`.
struct AddMatmul<'a> {
    bias: &'a [f32],
}

impl AddMatmul<'_> {
    fn run(
        &self,
        (x, x_layout): (&CpuStorage, &Layout),
        (w, w_layout): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inputs) = x_layout.shape().dims2()?;
        let (w_inputs, outputs) = w_layout.shape().dims2()?;
        let x = contiguous_f32(x, x_layout)?;
        let w = contiguous_f32(w, w_layout)?;
        if w_inputs != inputs || self.bias.len() != outputs {
            candle_core::bail!(
                "add-matmul: ({rows}, {inputs}) × ({w_inputs}, {outputs}) + bias of {}",
                self.bias.len()
            );
        }
        let mut out = Vec::with_capacity(rows * outputs);
        match residual {
            Some((residual, layout)) => {
                if layout.shape().dims2()? != (rows, outputs) {
                    candle_core::bail!("add-matmul: residual of shape {:?}", layout.shape());
                }
                let residual = contiguous_f32(residual, layout)?;
                for row in residual.chunks_exact(outputs) {
                    out.extend(row.iter().zip(self.bias).map(|(r, b)| r + b));
                }
            }
            None => (0..rows).for_each(|_| out.extend_from_slice(self.bias)),
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 && rows >= PARALLEL_ROWS {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `out` holds rows × outputs floats, `x` rows × inputs and `w` inputs × outputs
        // (checked above), each row-major with the strides given; `out` is initialised (gemm
        // reads it: `read_dst`) and does not overlap the inputs.
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                inputs,
                out.as_mut_ptr(),
                1,
                outputs as isize,
                true,
                x.as_ptr(),
                1,
                inputs as isize,
                w.as_ptr(),
                1,
                outputs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, outputs))))
    }
}

/// From this many rows (tokens in the batch) a product is split over candle's threads. Below, it
/// runs on the calling thread: for one short query (a dozen tokens) handing halves to another
/// thread costs about what it saves, and the search waits for the slower half whenever the other
/// core is busy (a query's p95 doubled with two threads).
const PARALLEL_ROWS: usize = 64;

/// The floats of a contiguous f32 tensor.
fn contiguous_f32<'s>(storage: &'s CpuStorage, layout: &Layout) -> candle_core::Result<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("add-matmul takes contiguous f32 tensors"),
    }
}

impl CustomOp2 for AddMatmul<'_> {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((x, x_layout), (w, w_layout), None)
    }
}

impl CustomOp3 for AddMatmul<'_> {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(
            (x, x_layout),
            (w, w_layout),
            Some((residual, residual_layout)),
        )
    }
}

impl CandleEncoder {
    pub(super) fn load(folder: &Folder) -> Result<Self, EmbeddingError> {
        let config = &folder.config;
        let gelu = config.gelu("candle")?;
        let device = Device::Cpu;
        // Read into memory rather than memory-mapped: no `unsafe`, and the 90 MB buffer is
        // dropped once the tensors are built.
        let bytes = std::fs::read(&folder.weights).map_err(|source| EmbeddingError::Read {
            path: folder.weights.clone(),
            source,
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device).map_err(backend)?;
        let mut weights = Weights::new(
            "candle",
            tensors
                .into_iter()
                .map(|(name, tensor)| Ok((name, tensor.to_dtype(DType::F32)?)))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(backend)?,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|index| Layer::new(weights.layer(index)?, config).map_err(backend))
            .collect::<Result<Vec<_>, _>>()?;
        let embedding = |weights: &mut Weights<Tensor>, name: &str| {
            Ok::<_, EmbeddingError>(Embedding::new(weights.take(name)?, config.hidden_size))
        };
        let (norm_weight, norm_bias) = weights.pair("embeddings.LayerNorm")?;
        Ok(Self {
            word_embeddings: embedding(&mut weights, "embeddings.word_embeddings.weight")?,
            position_embeddings: embedding(&mut weights, "embeddings.position_embeddings.weight")?,
            token_type_embeddings: embedding(
                &mut weights,
                "embeddings.token_type_embeddings.weight",
            )?,
            embeddings_norm: LayerNorm::new(norm_weight, norm_bias, config.layer_norm_eps),
            layers,
            heads: config.num_attention_heads,
            hidden: config.hidden_size,
            gelu,
            device,
        })
    }

    fn forward(&self, batch: &Batch) -> candle_core::Result<Vec<Vec<f32>>> {
        let (rows, len) = (batch.rows, batch.len);
        let ids = Tensor::from_slice(&batch.ids, (rows, len), &self.device)?;
        let type_ids = Tensor::from_slice(&batch.type_ids, (rows, len), &self.device)?;
        let mask =
            Tensor::from_slice(&batch.mask, (rows, len), &self.device)?.to_dtype(DType::F32)?;
        let positions = Tensor::arange(0u32, len as u32, &self.device)?;

        let embeddings = self
            .word_embeddings
            .forward(&ids)?
            .add(&self.token_type_embeddings.forward(&type_ids)?)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let mut hidden = self.embeddings_norm.forward(&embeddings)?;

        // Added to the scores: 0 where a query may attend (a real token of its text), a large
        // negative number at padding, whose weight after the softmax is then 0.
        let padding = ((mask.clone() - 1.0)? * 1e4)?.reshape((rows, 1, 1, len))?;
        let head_size = self.hidden / self.heads;
        for layer in &self.layers {
            // (rows, len, 3, heads, head size) → three (rows, heads, len, head size).
            let qkv = layer
                .qkv
                .forward(&hidden, None)?
                .reshape((rows, len, 3, self.heads, head_size))?
                .permute((2, 0, 3, 1, 4))?;
            let query = qkv.get(0)?.contiguous()?;
            let key = qkv.get(1)?.contiguous()?;
            let value = qkv.get(2)?.contiguous()?;
            let scores = query.matmul(&key.t()?)?.broadcast_add(&padding)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            let context =
                weights
                    .matmul(&value)?
                    .transpose(1, 2)?
                    .reshape((rows, len, self.hidden))?;
            let attended = layer.attention_out.forward(&context, Some(&hidden))?;
            let attended = layer.attention_norm.forward(&attended)?;
            let intermediate = layer.intermediate.forward(&attended, None)?;
            let intermediate = match self.gelu {
                Gelu::Erf => intermediate.apply_op1_no_bwd(&GeluErf)?,
                Gelu::Tanh => intermediate.gelu()?,
            };
            let output = layer.output.forward(&intermediate, Some(&attended))?;
            hidden = layer.output_norm.forward(&output)?;
        }

        // Mean over the real tokens: padding is zeroed out of the sum and out of the count.
        let mask = mask.unsqueeze(D::Minus1)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        summed.broadcast_div(&counts)?.to_vec2::<f32>()
    }
}

impl Layer {
    fn new(w: LayerWeights<Tensor>, config: &BertConfig) -> candle_core::Result<Self> {
        let scale = 1.0 / ((config.hidden_size / config.num_attention_heads) as f64).sqrt();
        let (query, query_bias) = w.query;
        let (key, key_bias) = w.key;
        let (value, value_bias) = w.value;
        let qkv = Dense::new((
            Tensor::cat(&[(query * scale)?, key, value], 0)?,
            Tensor::cat(&[(query_bias * scale)?, key_bias, value_bias], 0)?,
        ))?;
        let norm =
            |(weight, bias): (Tensor, Tensor)| LayerNorm::new(weight, bias, config.layer_norm_eps);
        Ok(Self {
            qkv,
            attention_out: Dense::new(w.attention_out)?,
            attention_norm: norm(w.attention_norm),
            intermediate: Dense::new(w.intermediate)?,
            output: Dense::new(w.output)?,
            output_norm: norm(w.output_norm),
        })
    }
}

impl Encoder for CandleEncoder {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        self.forward(batch).map_err(backend)
    }
}

/// BERT's exact GELU, `x · (1 + erf(x / √2)) / 2`, over a contiguous f32 tensor.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu-erf takes a contiguous f32 tensor");
        };
        let input = &values[start..end];
        let mut out = vec![0f32; input.len()];
        // In pieces over candle's own threads (those that run its matrix products), each piece
        // compiled for the widest SIMD the processor has.
        const PIECE: usize = 16 * 1024;
        let pieces: Vec<Mutex<(&[f32], &mut [f32])>> = input
            .chunks(PIECE)
            .zip(out.chunks_mut(PIECE))
            .map(Mutex::new)
            .collect();
        let arch = pulp::Arch::new();
        let run = |range: std::ops::Range<usize>| {
            for piece in &pieces[range] {
                // Each piece is taken by one thread only: the lock is never contended.
                let mut piece = piece.lock().unwrap_or_else(PoisonError::into_inner);
                let (from, to) = &mut *piece;
                arch.dispatch(|| {
                    for (y, &x) in to.iter_mut().zip(from.iter()) {
                        *y = gelu_erf(x);
                    }
                });
            }
        };
        // A short text's few pieces on the calling thread (see PARALLEL_ROWS).
        if pieces.len() <= 4 {
            run(0..pieces.len());
        } else {
            candle_core::utils::barrier_pool().execute_chunked(pieces.len(), run);
        }
        drop(pieces);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// GELU with the error function. Written by hand because the `erf` of `libm` (what candle calls)
/// branches by range and calls `exp`, one element at a time; this one is straight-line arithmetic
/// the compiler turns into SIMD over a slice. `erf` by Abramowitz & Stegun 7.1.26 (absolute error
/// below 1.5e-7, under f32's precision near 1), with `exp` of its own: `2^k · e^r`, `|r| ≤ ln2/2`,
/// by its Taylor series to `r⁶` (relative error below 2e-7).
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    // erf(|z|) is 1 to f32's precision beyond 4; clamping keeps exp's argument in range.
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs().min(4.0);
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * exp_small(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

/// `e^y` for `y` in [-16, 0].
#[inline(always)]
fn exp_small(y: f32) -> f32 {
    // Round to nearest by the 1.5·2²³ trick (no rounding instruction needed).
    const ROUND: f32 = 12_582_912.0;
    let shifted = y * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = y - k * std::f32::consts::LN_2;
    let e_r = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^k from its exponent bits; k is in [-24, 0], so 2^k is a normal number. `shifted`'s
    // bits minus ROUND's are k (two's complement), with no float-to-integer conversion.
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_k = f32::from_bits(k_bits.wrapping_add(127) << 23);
    e_r * two_k
}

fn backend(error: candle_core::Error) -> EmbeddingError {
    EmbeddingError::Backend {
        backend: "candle",
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_erf_is_the_exact_gelu_to_f32_precision() {
        // The reference: candle's own, element by element with libm's erf.
        let xs: Vec<f32> = (-8000..=8000).map(|i| i as f32 / 1000.0).collect();
        let exact = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, exact) in xs.into_iter().zip(exact) {
            let ours = gelu_erf(x);
            assert!(
                (ours - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "gelu({x}) = {ours}, not {exact}"
            );
        }
    }
}
