//! Throughput of the local embedding backends, comparable with `scripts/embed-bench.py`
//! (Python sentence-transformers): same sentences, batch size 32, one warm-up pass, then
//! ITERATIONS timed passes.
//!
//! ```text
//! # 256 sentences of about 20 words, the same on every run
//! cargo run --release -p stele-models --example embed_speed -- sentences /tmp/sentences.json
//! # candle (default features) or tch (--features tch, with LIBTORCH and LD_LIBRARY_PATH set)
//! cargo run --release -p stele-models --example embed_speed -- candle /tmp/sentences.json "$STELE_EMBEDDING_MODEL" 5
//! ```
//!
//! `embed_speed single candle|tch MODEL_DIR ITERATIONS` times one query at a time instead (its
//! first `WORDS` words, 10 unless that variable says otherwise).
//!
//! Prints one JSON line, like the Python script:
//! `{"backend": "candle", "sentences_per_sec": 171.3, "seconds": 7.47, "threads": 2}`.

use std::error::Error;
use std::time::Instant;

use stele_models::LocalEmbeddingModel;

const SENTENCES: usize = 256;

const WORDS: &[&str] = &[
    "the",
    "workflow",
    "engine",
    "records",
    "every",
    "decision",
    "as",
    "an",
    "event",
    "in",
    "append-only",
    "log",
    "when",
    "a",
    "worker",
    "crashes",
    "another",
    "one",
    "picks",
    "up",
    "task",
    "from",
    "last",
    "checkpoint",
    "and",
    "replays",
    "history",
    "to",
    "rebuild",
    "its",
    "state",
    "before",
    "continuing",
    "with",
    "next",
    "step",
    "assistant",
    "answers",
    "email",
    "about",
    "invoice",
    "that",
    "was",
    "due",
    "on",
    "monday",
    "customer",
    "asked",
    "for",
    "refund",
    "because",
    "delivery",
    "arrived",
    "late",
    "team",
    "agreed",
    "move",
    "meeting",
    "thursday",
    "afternoon",
    "after",
    "lunch",
    "scheduler",
    "retries",
    "failed",
    "jobs",
    "exponential",
    "backoff",
    "until",
    "they",
    "succeed",
    "or",
    "give",
    "database",
    "stores",
    "snapshots",
    "of",
    "aggregate",
    "so",
    "reads",
    "stay",
    "fast",
    "even",
    "millions",
    "events",
    "small",
    "model",
    "summarises",
    "long",
    "conversation",
    "into",
    "few",
    "lines",
    "operator",
    "reviews",
    "audit",
    "trail",
    "signed",
    "checkpoints",
    "proofs",
    "inclusion",
    "privacy",
    "rules",
    "erase",
    "personal",
    "data",
    "request",
    "memory",
    "retrieval",
    "finds",
    "similar",
    "notes",
    "quickly",
    "server",
    "restarted",
    "night",
    "nobody",
    "noticed",
    "queue",
    "drained",
    "slowly",
    "morning",
    "traffic",
    "peaked",
    "around",
    "nine",
];

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sentences", out] => {
            std::fs::write(out, serde_json::to_string_pretty(&sentences())?)?;
            Ok(())
        }
        ["single", backend, folder, iterations] => single(backend, folder, iterations.parse()?),
        [backend, sentences, folder, iterations] => {
            let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(sentences)?)?;
            let iterations: usize = iterations.parse()?;
            bench(backend, &texts, folder, iterations.max(1))
        }
        _ => Err(
            "usage: embed_speed sentences OUT.json | embed_speed candle|tch SENTENCES.json \
                  MODEL_DIR ITERATIONS | embed_speed single candle|tch MODEL_DIR ITERATIONS"
                .into(),
        ),
    }
}

fn bench(
    backend: &str,
    texts: &[String],
    folder: &str,
    iterations: usize,
) -> Result<(), Box<dyn Error>> {
    let model = load(backend, folder)?;
    model.embed_blocking(texts)?; // warm-up: allocator, kernels, tokenizer caches
    let start = Instant::now();
    for _ in 0..iterations {
        model.embed_blocking(texts)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "{}",
        serde_json::json!({
            "backend": backend,
            "sentences_per_sec": ((texts.len() * iterations) as f64 / seconds * 1000.0).round() / 1000.0,
            "seconds": (seconds * 1e6).round() / 1e6,
            "threads": threads,
        })
    );
    Ok(())
}

fn load(backend: &str, folder: &str) -> Result<LocalEmbeddingModel, Box<dyn Error>> {
    match backend {
        #[cfg(feature = "candle")]
        "candle" => Ok(LocalEmbeddingModel::candle(folder)?),
        #[cfg(feature = "tch")]
        "tch" => Ok(LocalEmbeddingModel::tch(folder)?),
        other => Err(format!("backend `{other}` is unknown or not built in ({folder})").into()),
    }
}

/// `SENTENCES` sentences of 16 to 24 words, from a fixed seed.
fn sentences() -> Vec<String> {
    let mut state: u64 = 0x5eed_cafe_f00d_1234;
    let mut next = move || {
        // xorshift64: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..SENTENCES)
        .map(|_| {
            let words = 16 + (next() % 9) as usize;
            let mut sentence: Vec<&str> = (0..words)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            let first = sentence[0];
            let capitalised = first[..1].to_uppercase() + &first[1..];
            sentence[0] = "";
            format!("{capitalised}{}.", sentence.join(" "))
        })
        .collect()
}

/// One short query at a time (what a search embeds): the median and 95th percentile of
/// ITERATIONS calls, in milliseconds.
fn single(backend: &str, folder: &str, iterations: usize) -> Result<(), Box<dyn Error>> {
    let model = load(backend, folder)?;
    let words = std::env::var("WORDS")
        .ok()
        .and_then(|words| words.parse().ok())
        .unwrap_or(10);
    let queries: Vec<String> = sentences()
        .into_iter()
        .map(|s| s.split(' ').take(words).collect::<Vec<_>>().join(" "))
        .collect();
    model.embed_blocking(&queries[..1])?;
    let mut times: Vec<f64> = (0..iterations.max(1))
        .map(|i| {
            let start = Instant::now();
            model
                .embed_blocking(std::slice::from_ref(&queries[i % queries.len()]))
                .map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{}",
        serde_json::json!({"backend": backend, "query_ms_p50": at(0.5), "query_ms_p95": at(0.95)})
    );
    Ok(())
}
