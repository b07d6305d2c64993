//! The candle backend: candle-transformers' `BertModel` over the folder's safetensors, on the
//! CPU, pure Rust. Mean pooling over the attention mask; normalisation is done by the caller.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use super::local::{read_json, Batch, Encoder, Folder};
use super::EmbeddingError;

pub(super) struct CandleEncoder {
    model: BertModel,
    device: Device,
}

impl CandleEncoder {
    pub(super) fn load(folder: &Folder) -> Result<Self, EmbeddingError> {
        let config: Config = read_json(&folder.config_path)?;
        let device = Device::Cpu;
        // Read into memory rather than memory-mapped: no `unsafe`, and the 90 MB buffer is
        // dropped once the tensors are built.
        let bytes = std::fs::read(&folder.weights).map_err(|source| EmbeddingError::Read {
            path: folder.weights.clone(),
            source,
        })?;
        let vb =
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device).map_err(backend)?;
        let model = BertModel::load(vb, &config).map_err(backend)?;
        Ok(Self { model, device })
    }

    fn forward(&self, batch: &Batch) -> candle_core::Result<Vec<Vec<f32>>> {
        let shape = (batch.rows, batch.len);
        let ids = Tensor::from_slice(&batch.ids, shape, &self.device)?;
        let type_ids = Tensor::from_slice(&batch.type_ids, shape, &self.device)?;
        let mask = Tensor::from_slice(&batch.mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        // Mean over the real tokens: padding is zeroed out of the sum and out of the count.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        summed.broadcast_div(&counts)?.to_vec2::<f32>()
    }
}

impl Encoder for CandleEncoder {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        self.forward(batch).map_err(backend)
    }
}

fn backend(error: candle_core::Error) -> EmbeddingError {
    EmbeddingError::Backend {
        backend: "candle",
        source: Box::new(error),
    }
}
