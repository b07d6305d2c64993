//! The embedding adapters: the local backends against vectors computed with Python
//! sentence-transformers (`fixtures/minilm-golden.json`), the weights check, the OpenAI client
//! and the hub download against real (fake) HTTP servers.
//!
//! The local tests need all-MiniLM-L6-v2 in the folder `STELE_EMBEDDING_MODEL` names
//! (`bash scripts/services.sh up` provides it); without it they fail, saying so.

#[path = "support/embeddings.rs"]
#[cfg_attr(not(feature = "hf"), allow(dead_code))]
mod fakes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use stele_models::config::ApiKey;
use stele_models::embed::{ALL_MINILM_L6_V2, ALL_MINILM_L6_V2_SHA256};
use stele_models::{
    load_embedding_model, EmbeddingError, EmbeddingModel, ModelError, OpenAiEmbeddingModel,
};

use fakes::{Answer, FakeEmbeddings};

#[derive(Deserialize)]
struct Golden {
    safetensors_sha256: String,
    dimensions: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    vector: Vec<f32>,
}

fn golden() -> Golden {
    let text = include_str!("fixtures/minilm-golden.json");
    serde_json::from_str(text).expect("minilm-golden.json")
}

/// The all-MiniLM-L6-v2 folder. Its absence fails the test: a skipped golden test would pass
/// unnoticed on a machine that never ran it.
fn model_folder() -> PathBuf {
    let folder = std::env::var_os("STELE_EMBEDDING_MODEL").unwrap_or_else(|| {
        panic!(
            "STELE_EMBEDDING_MODEL is not set: it must name the all-MiniLM-L6-v2 folder \
             (model.safetensors, tokenizer.json, config.json, …). Run `bash scripts/services.sh up` \
             and export what it prints."
        )
    });
    let folder = PathBuf::from(folder);
    assert!(
        folder.join("model.safetensors").is_file(),
        "STELE_EMBEDDING_MODEL={} has no model.safetensors",
        folder.display()
    );
    folder
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn norm(vector: &[f32]) -> f64 {
    vector
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Checks `model` against every golden case: all texts in one call (several batches of mixed
/// lengths, so padding is exercised), then each text alone (no padding at all).
async fn assert_matches_golden(model: &dyn EmbeddingModel) {
    let golden = golden();
    assert_eq!(model.name(), ALL_MINILM_L6_V2);
    assert_eq!(model.dimensions(), golden.dimensions);
    // Three copies of the 16 cases: 48 texts, two batches of 32 and 16.
    let texts: Vec<String> = (0..3)
        .flat_map(|_| golden.cases.iter().map(|case| case.text.clone()))
        .collect();
    let together = model.embed(&texts).await.expect("embed the batch");
    assert_eq!(together.len(), texts.len());
    for (index, vector) in together.iter().enumerate() {
        let case = &golden.cases[index % golden.cases.len()];
        assert_eq!(vector.len(), golden.dimensions);
        assert!((norm(vector) - 1.0).abs() < 1e-5, "not unit length");
        let similarity = cosine(vector, &case.vector);
        assert!(
            similarity >= 0.9999,
            "batched: cosine {similarity} for {:?}",
            case.text
        );
    }
    for case in &golden.cases {
        let alone = model
            .embed(std::slice::from_ref(&case.text))
            .await
            .expect("embed one text");
        let similarity = cosine(&alone[0], &case.vector);
        assert!(
            similarity >= 0.9999,
            "alone: cosine {similarity} for {:?}",
            case.text
        );
    }
    assert!(model.embed(&[]).await.expect("nothing to embed").is_empty());
}

#[test]
fn the_golden_file_is_of_the_weights_the_loader_knows() {
    assert_eq!(golden().safetensors_sha256, ALL_MINILM_L6_V2_SHA256);
}

#[cfg(feature = "candle")]
#[tokio::test]
async fn candle_matches_sentence_transformers() {
    let folder = model_folder();
    let model = load_embedding_model(&folder.to_string_lossy()).expect("load on candle");
    assert_matches_golden(model.as_ref()).await;
    let explicit = stele_models::LocalEmbeddingModel::candle(&folder).expect("load on candle");
    assert_eq!(explicit.backend(), "candle");
}

#[cfg(feature = "tch")]
#[tokio::test]
async fn tch_matches_sentence_transformers() {
    let folder = model_folder();
    let model =
        load_embedding_model(&format!("tch:{}", folder.display())).expect("load on libtorch");
    assert_matches_golden(model.as_ref()).await;
}

/// A folder that links to the model's files, except those the test writes itself.
fn folder_like_the_model(except: &[&str]) -> tempfile::TempDir {
    let source = model_folder();
    let folder = tempfile::tempdir().expect("temporary folder");
    for file in [
        "config.json",
        "tokenizer.json",
        "sentence_bert_config.json",
        "model.safetensors",
    ] {
        if !except.contains(&file) {
            std::os::unix::fs::symlink(source.join(file), folder.path().join(file))
                .expect("link a model file");
        }
    }
    folder
}

fn load(folder: &Path) -> Result<Arc<dyn EmbeddingModel>, EmbeddingError> {
    load_embedding_model(&folder.to_string_lossy())
}

#[test]
fn weights_that_differ_from_sha256sums_are_refused() {
    let folder = folder_like_the_model(&[]);
    let wrong = "0".repeat(64);
    std::fs::write(
        folder.path().join("SHA256SUMS"),
        format!("{wrong}  model.safetensors\n"),
    )
    .unwrap();
    let error = load(folder.path()).err().expect("refused");
    assert!(
        matches!(&error, EmbeddingError::ChecksumMismatch { actual, expected, .. }
            if actual == ALL_MINILM_L6_V2_SHA256 && *expected == wrong),
        "{error}"
    );
    assert!(error.to_string().contains("SHA256SUMS"), "{error}");
}

#[test]
fn unknown_weights_without_sha256sums_are_refused_with_the_fix() {
    let folder = folder_like_the_model(&["model.safetensors"]);
    std::fs::write(folder.path().join("model.safetensors"), b"not the weights").unwrap();
    let error = load(folder.path()).err().expect("refused");
    assert!(
        matches!(error, EmbeddingError::Unverified { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("sha256sum model.safetensors > SHA256SUMS"),
        "{message}"
    );

    // With the hash recorded, the check passes and the (broken) weights reach the backend.
    let actual = match &error {
        EmbeddingError::Unverified { actual, .. } => actual.clone(),
        _ => unreachable!(),
    };
    std::fs::write(
        folder.path().join("SHA256SUMS"),
        format!("{actual}  model.safetensors\n"),
    )
    .unwrap();
    let error = load(folder.path()).err().expect("not loadable weights");
    assert!(
        matches!(
            error,
            EmbeddingError::Backend { .. } | EmbeddingError::FeatureDisabled { .. }
        ),
        "{error}"
    );
}

#[test]
fn a_folder_without_weights_says_which_file_is_missing() {
    let folder = folder_like_the_model(&["model.safetensors"]);
    let error = load(folder.path()).err().expect("no weights");
    assert!(matches!(error, EmbeddingError::Read { .. }), "{error}");
    assert!(error.to_string().contains("model.safetensors"), "{error}");
}

// ---- the OpenAI-compatible client ------------------------------------------------------------

#[tokio::test]
async fn openai_client_sends_the_standard_json_and_reads_vectors_by_index() {
    let server = FakeEmbeddings::start(Answer::Vectors { dimensions: 4 }).await;
    let model = OpenAiEmbeddingModel::new(
        &server.base_url,
        "text-embedding-3-small",
        4,
        Some(ApiKey::new("sk-embed")),
    )
    .unwrap();
    assert_eq!(model.name(), "text-embedding-3-small");
    assert_eq!(model.dimensions(), 4);
    let texts = vec!["abc".to_owned(), "a".to_owned(), "abcd".to_owned()];
    let vectors = model.embed(&texts).await.expect("embeddings");

    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].body,
        serde_json::json!({"model": "text-embedding-3-small", "input": ["abc", "a", "abcd"]})
    );
    assert_eq!(
        received[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer sk-embed")
    );
    // The server listed them in reverse; input i's raw vector is [len, i + 1, 0, 0].
    for (index, (text, vector)) in texts.iter().zip(&vectors).enumerate() {
        let raw = [text.len() as f32, (index + 1) as f32, 0.0, 0.0];
        assert!((norm(vector) - 1.0).abs() < 1e-6);
        assert!(cosine(vector, &raw) > 0.999_999, "{text}: {vector:?}");
    }
    assert!(model.embed(&[]).await.unwrap().is_empty());
    assert_eq!(server.received().len(), 1, "nothing sent for no texts");
}

#[tokio::test]
async fn openai_client_reaches_the_endpoint_from_a_spec_with_or_without_v1() {
    let server = FakeEmbeddings::start(Answer::Vectors { dimensions: 384 }).await;
    for base in [server.base_url.clone(), format!("{}/v1/", server.base_url)] {
        let model = load_embedding_model(&format!("openai:{base}#all-MiniLM-L6-v2")).unwrap();
        assert_eq!(model.dimensions(), 384);
        let vectors = model.embed(&["hello".to_owned()]).await.unwrap();
        assert_eq!(vectors[0].len(), 384);
    }
    assert_eq!(server.received().len(), 2);
}

#[tokio::test]
async fn openai_errors_carry_the_status_and_the_body() {
    let server = FakeEmbeddings::start(Answer::Status(
        401,
        r#"{"error":{"message":"Incorrect API key provided"}}"#,
    ))
    .await;
    let model = OpenAiEmbeddingModel::new(&server.base_url, "m", 8, None).unwrap();
    let error = model.embed(&["x".to_owned()]).await.expect_err("401");
    assert!(
        matches!(&error, EmbeddingError::Provider(ModelError::Status { status: 401, body })
            if body.contains("Incorrect API key")),
        "{error}"
    );
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("401"), "{error}");

    let server = FakeEmbeddings::start(Answer::Status(503, "overloaded")).await;
    let model = OpenAiEmbeddingModel::new(&server.base_url, "m", 8, None).unwrap();
    let error = model.embed(&["x".to_owned()]).await.expect_err("503");
    assert!(error.is_retryable(), "{error}");
}

#[tokio::test]
async fn openai_vectors_of_the_wrong_size_are_refused() {
    let server = FakeEmbeddings::start(Answer::Vectors { dimensions: 3 }).await;
    let model = OpenAiEmbeddingModel::new(&server.base_url, "m", 8, None).unwrap();
    let error = model.embed(&["x".to_owned()]).await.expect_err("3 != 8");
    assert!(
        matches!(
            error,
            EmbeddingError::Dimensions {
                expected: 8,
                actual: 3
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn openai_connection_failures_are_retryable() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let model = OpenAiEmbeddingModel::new(&format!("http://{address}"), "m", 8, None).unwrap();
    let error = model.embed(&["x".to_owned()]).await.expect_err("refused");
    assert!(
        matches!(error, EmbeddingError::Provider(ModelError::Connect(_))),
        "{error}"
    );
    assert!(error.is_retryable());
}

// ---- the hub download --------------------------------------------------------------------

#[cfg(all(feature = "hf", feature = "candle"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_downloads_the_folder_into_the_cache_and_loads_it() {
    let repo = "sentence-transformers/all-MiniLM-L6-v2";
    let hub = fakes::FakeHub::start(
        repo,
        model_folder(),
        &[
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "README.md",
        ],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let endpoint = hub.endpoint.clone();
    let cache_dir = cache.path().to_owned();
    // The hub client blocks: off the runtime that serves the fake hub.
    let folder = tokio::task::spawn_blocking(move || {
        stele_models::embed::hf::download_from(repo, &endpoint, &cache_dir)
    })
    .await
    .unwrap()
    .expect("download");
    assert!(folder.starts_with(cache.path()));
    assert!(folder.ends_with(fakes::FAKE_COMMIT), "{}", folder.display());
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "1_Pooling/config.json",
    ] {
        assert!(folder.join(file).is_file(), "{file} downloaded");
    }
    assert!(
        !folder.join("README.md").exists(),
        "only what a backend reads"
    );

    let model = load(&folder).expect("load the downloaded folder");
    let golden = golden();
    let vectors = model.embed(&[golden.cases[0].text.clone()]).await.unwrap();
    assert!(cosine(&vectors[0], &golden.cases[0].vector) >= 0.9999);

    let error = tokio::task::spawn_blocking({
        let endpoint = hub.endpoint.clone();
        let cache_dir = cache.path().to_owned();
        move || stele_models::embed::hf::download_from("someone/else", &endpoint, &cache_dir)
    })
    .await
    .unwrap()
    .expect_err("no such repository");
    assert!(matches!(error, EmbeddingError::Download { .. }), "{error}");
}
