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
    /// Where a short input's forward pass runs (see [`PARALLEL_ROWS`]).
    short: rayon::ThreadPool,
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
    /// The weight in half precision, for short inputs (see [`HalfPanels`]); none when a weight
    /// is beyond half precision's range.
    half: Option<HalfPanels>,
    bias: Vec<f32>,
}

impl Dense {
    fn new((weight, bias): (Tensor, Tensor)) -> candle_core::Result<Self> {
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            half: HalfPanels::new(&weight_t)?,
            weight_t,
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
        let op = AddMatmul {
            bias: &self.bias,
            half: self.half.as_ref(),
        };
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
    half: Option<&'a HalfPanels>,
}

/// A linear layer's weight `(in, out)` in half precision, cut into panels of [`PANEL`] columns,
/// each panel's rows one after the other.
///
/// For a short input (one query: a dozen tokens) a linear layer's product is bound by reading
/// its weight from memory, not by arithmetic: a query's forward pass reads all 42 MB of the
/// encoder's weights (more than the processor's cache holds, so from memory every time) and took
/// 5.8 ms for one word, 8.2 ms for ten. Half the bytes are read when the weight is kept in half
/// precision and widened a panel at a time into a buffer the cache holds, which gemm then reads
/// as the single-precision weight; the arithmetic stays in single precision. The rounding
/// (relative error below 2⁻¹¹ per weight) keeps a text's vector within a cosine of 0.9999998 of
/// the single-precision one (the golden vectors' test embeds each text alone too). With this, one
/// ten-word query took 5.5–6.4 ms instead of 8.2 ms, one word 2.8 ms instead of 5.8. Batches
/// (the projection's) are bound by arithmetic and use the single-precision weight.
///
/// Written by hand: gemm's half-precision product takes every operand in half precision, and
/// the `half` crate widens a slice eight values per (non-inlined) call.
struct HalfPanels {
    inputs: usize,
    outputs: usize,
    /// The `f16` bits.
    bits: Vec<u16>,
}

/// Columns per panel: a panel widened is at most 1536 × 128 floats (768 KiB), within the
/// processor's second-level cache.
const PANEL: usize = 128;

impl HalfPanels {
    /// None when a weight is beyond half precision's range (±65504): that layer's products
    /// then read the single-precision weight whatever the input's length.
    fn new(weight_t: &Tensor) -> candle_core::Result<Option<Self>> {
        let (inputs, outputs) = weight_t.dims2()?;
        let weight: Vec<f32> = weight_t.flatten_all()?.to_vec1()?;
        if weight.iter().any(|x| x.abs() > f32::from(half::f16::MAX)) {
            return Ok(None);
        }
        let mut bits = Vec::with_capacity(inputs * outputs);
        for start in (0..outputs).step_by(PANEL) {
            let end = (start + PANEL).min(outputs);
            for row in weight.chunks_exact(outputs) {
                bits.extend(
                    row[start..end]
                        .iter()
                        .map(|&x| half::f16::from_f32(x).to_bits()),
                );
            }
        }
        Ok(Some(Self {
            inputs,
            outputs,
            bits,
        }))
    }

    /// `out += x · W` for `x` `(rows, inputs)` and `out` `(rows, outputs)`, both row-major.
    fn add_product(&self, rows: usize, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.inputs);
        assert_eq!(out.len(), rows * self.outputs);
        WIDENED.with_borrow_mut(|widened| {
            widened.resize(self.inputs * PANEL.min(self.outputs), 0.0);
            for (index, panel) in self.bits.chunks(self.inputs * PANEL).enumerate() {
                let start = index * PANEL;
                let width = panel.len() / self.inputs;
                let widened = &mut widened[..panel.len()];
                widen(panel, widened);
                // SAFETY: `widened` holds inputs × width floats (row-major), `x` rows × inputs
                // (checked above); the destination is `out`'s columns start..start + width of
                // each of its rows × outputs (row stride outputs, start + width ≤ outputs), read
                // and written (`read_dst`), not overlapping the inputs.
                unsafe {
                    gemm::gemm(
                        rows,
                        width,
                        self.inputs,
                        out.as_mut_ptr().add(start),
                        1,
                        self.outputs as isize,
                        true,
                        x.as_ptr(),
                        1,
                        self.inputs as isize,
                        widened.as_ptr(),
                        1,
                        width as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
    }
}

thread_local! {
    /// A panel of [`HalfPanels`] widened, reused from one product to the next.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f16` bits to `f32`, eight at a time with the F16C instruction where the processor has it.
fn widen(from: &[u16], to: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the processor has the features `widen_f16c` is compiled for.
        unsafe { widen_f16c(from, to) };
        return;
    }
    for (y, &x) in to.iter_mut().zip(from) {
        *y = half::f16::from_bits(x).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16c(from: &[u16], to: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let (whole, rest) = from.split_at(from.len() / 8 * 8);
    let (to_whole, to_rest) = to.split_at_mut(whole.len());
    for (x, y) in whole.chunks_exact(8).zip(to_whole.chunks_exact_mut(8)) {
        // SAFETY: `x` holds 8 u16 (16 bytes, read unaligned) and `y` 8 f32 (written unaligned).
        unsafe {
            let halves = _mm_loadu_si128(x.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(y.as_mut_ptr(), _mm256_cvtph_ps(halves));
        }
    }
    for (y, &x) in to_rest.iter_mut().zip(rest) {
        *y = half::f16::from_bits(x).to_f32();
    }
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
        if rows < PARALLEL_ROWS {
            if let Some(half) = self.half {
                half.add_product(rows, x, &mut out);
                return Ok((CpuStorage::F32(out), Shape::from((rows, outputs))));
            }
        }
        // The current pool's: one in a short input's pool (see PARALLEL_ROWS). Not candle's
        // `get_num_threads`, which reads /proc/cpuinfo on every call.
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
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

/// From this many rows (tokens in the batch) the forward pass is split over candle's threads.
/// Below, it runs on one thread: for one short query (a dozen tokens) handing halves to another
/// thread costs about what it saves, and the search waits for the slower half whenever the other
/// core is busy (a query's p95 doubled with two threads). Such a pass runs in a pool of one
/// thread ([`CandleEncoder::short`]): candle's softmax, layer norm and attention products split
/// their work over the current rayon pool, and in the global one each of those hand-offs woke
/// the other core's worker (a query took 14.7 ms instead of 12.2 with the pool of one).
const PARALLEL_ROWS: usize = 64;

/// Attention's products, `a · b` (or `a · bᵀ`) for each of the leading dimensions' matrices:
/// `a` `(…, m, k)` and `b` `(…, k, n)` (or `(…, n, k)`), both contiguous f32.
///
/// candle's `matmul` would do it, but it reads the thread count from /proc/cpuinfo on every call
/// (36 times in one query's forward pass, with the linear layers) and splits each small matrix
/// over the threads; here the matrices are shared out whole, over the current pool's threads.
struct BatchMatmul {
    rhs_transposed: bool,
}

impl CustomOp2 for BatchMatmul {
    fn name(&self) -> &'static str {
        "batch-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a_dims, b_dims) = (a_layout.shape().dims(), b_layout.shape().dims());
        let split = |dims: &[usize]| match dims {
            [batch @ .., rows, cols] => Ok((batch.to_vec(), *rows, *cols)),
            _ => Err(candle_core::Error::Msg(format!(
                "batch-matmul: {dims:?} is no matrix"
            ))),
        };
        let (batch, m, k) = split(a_dims)?;
        let (b_batch, b_rows, b_cols) = split(b_dims)?;
        let (b_k, n) = if self.rhs_transposed {
            (b_cols, b_rows)
        } else {
            (b_rows, b_cols)
        };
        if batch != b_batch || b_k != k {
            candle_core::bail!("batch-matmul: {a_dims:?} × {b_dims:?}");
        }
        let (a, b) = (contiguous_f32(a, a_layout)?, contiguous_f32(b, b_layout)?);
        // b's element (row i, column j) of the product's right side, as strides.
        let (b_cs, b_rs) = if self.rhs_transposed {
            (k as isize, 1)
        } else {
            (1, n as isize)
        };
        let mut out = vec![0f32; batch.iter().product::<usize>() * m * n];
        let product = |(index, out): (usize, &mut [f32])| {
            let (a, b) = (&a[index * m * k..][..m * k], &b[index * k * n..][..k * n]);
            // SAFETY: `out` holds m × n floats (row-major), `a` m × k (row-major) and `b` k × n
            // with the strides given (checked: `b` holds n × k or k × n floats); `out` is not
            // read (`read_dst` false) and does not overlap the inputs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        };
        if m * n > 0 {
            use rayon::prelude::*;
            out.par_chunks_mut(m * n).enumerate().for_each(product);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from(
                a_dims[..a_dims.len() - 1]
                    .iter()
                    .copied()
                    .chain([n])
                    .collect::<Vec<_>>(),
            ),
        ))
    }
}

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
            short: rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "stele-embed".to_owned())
                .build()
                .map_err(backend)?,
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
            let scores = query
                .apply_op2_no_bwd(
                    &key,
                    &BatchMatmul {
                        rhs_transposed: true,
                    },
                )?
                .broadcast_add(&padding)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = weights
                .apply_op2_no_bwd(
                    &value,
                    &BatchMatmul {
                        rhs_transposed: false,
                    },
                )?
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
        if batch.rows * batch.len < PARALLEL_ROWS {
            return self.short.install(|| self.forward(batch)).map_err(backend);
        }
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

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> EmbeddingError {
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
