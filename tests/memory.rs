//! `stele memory` end to end on the embedded store: facts added, found by meaning and by scope,
//! superseded, counted, rebuilt; and a clear line without an embedding model.

use serde_json::Value;

mod support;
use support::{stderr, stele};

fn memory(data_dir: &str, args: &[&str]) -> std::process::Output {
    stele()
        .arg("memory")
        .args(args)
        .args(["--data-dir", data_dir])
        .output()
        .unwrap()
}

fn hits(output: &std::process::Output) -> Vec<Value> {
    assert!(output.status.success(), "{}", stderr(output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn facts_are_remembered_found_superseded_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let migrated = stele()
        .args(["migrate", "--data-dir", &data_dir])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    for (text, extra) in [
        (
            "The staging database restarts every night at 03:00",
            vec!["--agent", "ops"],
        ),
        (
            "Bob prefers tea over coffee",
            vec!["--tenant", "home", "--key", "drink"],
        ),
        (
            "Invoices are due on the 5th of each month",
            vec!["--agent", "finance"],
        ),
    ] {
        let mut args = vec!["add", text];
        args.extend(extra);
        let added = memory(&data_dir, &args);
        assert!(added.status.success(), "{}", stderr(&added));
    }
    let found = hits(&memory(
        &data_dir,
        &[
            "search",
            "what does he like to drink?",
            "--json",
            "--mode",
            "dense",
        ],
    ));
    assert_eq!(
        found[0]["content"], "Bob prefers tea over coffee",
        "{found:?}"
    );
    assert!(found[0]["position"].as_i64().unwrap() > 0);
    let ops = hits(&memory(
        &data_dir,
        &["search", "when are bills due", "--agent", "ops", "--json"],
    ));
    assert!(ops.iter().all(|h| h["agent"] == "ops"), "{ops:?}");

    let moved = memory(
        &data_dir,
        &[
            "add",
            "Bob now drinks only coffee",
            "--tenant",
            "home",
            "--key",
            "drink",
        ],
    );
    assert!(moved.status.success(), "{}", stderr(&moved));
    let found = hits(&memory(
        &data_dir,
        &[
            "search",
            "what does Bob drink",
            "--tenant",
            "home",
            "--json",
        ],
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["content"], "Bob now drinks only coffee");

    let stats = memory(&data_dir, &["stats", "--json"]);
    assert!(stats.status.success(), "{}", stderr(&stats));
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        (stats["memories"].as_i64(), stats["valid"].as_i64()),
        (Some(4), Some(3))
    );
    assert_eq!(stats["model"], "all-MiniLM-L6-v2");

    let rebuilt = memory(&data_dir, &["rebuild"]);
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    let found = hits(&memory(&data_dir, &["search", "nightly restart", "--json"]));
    assert!(
        found[0]["content"].as_str().unwrap().contains("03:00"),
        "{found:?}"
    );

    let without = stele()
        .args(["memory", "search", "x", "--data-dir", &data_dir])
        .env_remove("STELE_EMBEDDING_MODEL")
        .output()
        .unwrap();
    assert!(!without.status.success());
    let line = stderr(&without);
    assert!(line.contains("no embedding model"), "{line}");
    assert_eq!(line.trim().lines().count(), 1, "{line}");
}

/// `stele bench memory` at a small scale on PostgreSQL (the memory's own suite covers both
/// stores): every figure is there, and the searches find the labelled passages.
#[test]
fn the_memory_benchmark_prints_json() {
    let url = stele_engine::testing::admin_url();
    let output = stele()
        .env_remove("STELE_SENTENCE_TRANSFORMERS")
        .args([
            "bench",
            "memory",
            "--memories",
            "600",
            "--searches",
            "20",
            "--no-sqlite",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{report:#}");
    for figure in results {
        assert_eq!(figure["memories"], 600);
        assert!(figure["ingest_memories_per_sec"].as_f64().unwrap() > 0.0);
        assert!(figure["hybrid_search"]["p95_ms"].as_f64().unwrap() > 0.0);
        for mode in ["dense", "text", "hybrid"] {
            let ndcg = figure["ndcg_at_10"][mode].as_f64().unwrap();
            assert!(ndcg > 0.3 && ndcg <= 1.0, "{mode}: {figure:#}");
        }
        for filter in ["unfiltered", "filter_1_percent", "filter_10_percent"] {
            let recall = figure["recall_at_10"][filter].as_f64().unwrap();
            assert!(recall > 0.8, "{filter}: {figure:#}");
        }
    }
}
