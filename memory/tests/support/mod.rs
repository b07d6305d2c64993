//! What the memory's test files share.

use std::sync::{Arc, OnceLock};

use stele_models::embed::{load_embedding_model, EmbeddingModel};

/// all-MiniLM-L6-v2, loaded once per test binary.
pub fn model() -> Arc<dyn EmbeddingModel> {
    static MODEL: OnceLock<Arc<dyn EmbeddingModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = std::env::var("STELE_EMBEDDING_MODEL").expect(
                "STELE_EMBEDDING_MODEL names the all-MiniLM-L6-v2 folder (scripts/services.sh up)",
            );
            load_embedding_model(&dir).expect("the model loads")
        })
        .clone()
}
