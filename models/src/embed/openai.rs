//! The adapter for OpenAI-compatible embedding servers (OpenAI, Ollama, vLLM, text-embeddings-
//! inference, llama.cpp server, …): `POST {base}/v1/embeddings` with `{"model", "input": [...]}`.
//!
//! Errors reuse the chat adapter's [`ModelError`]s (status, rate limiting, timeouts), so the
//! same retry rules apply. Vectors are normalised here: not every server does it.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{normalise, EmbeddingError, EmbeddingModel};
use crate::config::ApiKey;
use crate::openai::{chain, status_error, transport_error, truncate};
use crate::ModelError;

/// Texts per request: servers cap the size of `input` (OpenAI at 2,048).
pub const REQUEST_BATCH: usize = 256;

/// How long one request may take, reply included, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one embedding model on an OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct OpenAiEmbeddingModel {
    model: String,
    dimensions: usize,
    endpoint: String,
    api_key: Option<ApiKey>,
    timeout: Duration,
    client: reqwest::Client,
}

impl OpenAiEmbeddingModel {
    /// A client for `model`, whose vectors have `dimensions` components, at the server
    /// `base_url` (e.g. `https://api.openai.com`; a trailing `/v1` is accepted too). The
    /// `api_key`, when given, is sent as a bearer token.
    pub fn new(
        base_url: &str,
        model: impl Into<String>,
        dimensions: usize,
        api_key: Option<ApiKey>,
    ) -> Result<Self, EmbeddingError> {
        let client = reqwest::Client::builder()
            .connect_timeout(DEFAULT_TIMEOUT)
            .build()
            .map_err(|error| ModelError::Config(format!("HTTP client: {}", chain(&error))))?;
        let base = base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        Ok(Self {
            model: model.into(),
            dimensions,
            endpoint: format!("{base}/v1/embeddings"),
            api_key,
            timeout: DEFAULT_TIMEOUT,
            client,
        })
    }

    /// Bounds each request, reply included, by `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn request(&self, input: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let body = WireRequest {
            model: &self.model,
            input,
        };
        let builder = self
            .client
            .post(&self.endpoint)
            .json(&body)
            .timeout(self.timeout);
        let builder = match &self.api_key {
            Some(key) => builder.bearer_auth(key.expose()),
            None => builder,
        };
        let response = builder
            .send()
            .await
            .map_err(|error| transport_error(&error, self.timeout))?;
        if !response.status().is_success() {
            return Err(status_error(response).await.into());
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|error| transport_error(&error, self.timeout))?;
        let reply: WireResponse = serde_json::from_slice(&bytes).map_err(|error| {
            ModelError::Decode(format!(
                "{error} in {}",
                truncate(String::from_utf8_lossy(&bytes).into_owned())
            ))
        })?;
        self.vectors(reply, input.len())
    }

    /// The reply's vectors in input order (`data[i].index`, which servers need not sort),
    /// checked and normalised.
    fn vectors(
        &self,
        reply: WireResponse,
        expected: usize,
    ) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if reply.data.len() != expected {
            return Err(ModelError::Decode(format!(
                "asked for {expected} embeddings, got {}",
                reply.data.len()
            ))
            .into());
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
        for item in reply.data {
            let slot = vectors.get_mut(item.index).ok_or_else(|| {
                ModelError::Decode(format!("embedding index {} out of range", item.index))
            })?;
            if slot.replace(item.embedding).is_some() {
                return Err(
                    ModelError::Decode(format!("embedding index {} twice", item.index)).into(),
                );
            }
        }
        vectors
            .into_iter()
            .map(|vector| {
                // Every slot is filled: as many items as slots, and no index twice.
                let mut vector = vector.unwrap_or_default();
                if vector.len() != self.dimensions {
                    return Err(EmbeddingError::Dimensions {
                        expected: self.dimensions,
                        actual: vector.len(),
                    });
                }
                normalise(&mut vector);
                Ok(vector)
            })
            .collect()
    }
}

#[async_trait]
impl EmbeddingModel for OpenAiEmbeddingModel {
    fn name(&self) -> &str {
        &self.model
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let mut vectors = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(REQUEST_BATCH) {
            vectors.extend(self.request(chunk).await?);
        }
        Ok(vectors)
    }
}

// ---- wire types (OpenAI embeddings JSON) ----

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    input: &'a [String],
}

#[derive(Deserialize)]
struct WireResponse {
    data: Vec<WireEmbedding>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    index: usize,
    embedding: Vec<f32>,
}
