#!/usr/bin/env python3
"""Python sentence-transformers throughput, the reference for the Rust embedding benchmarks.

    "$STELE_SENTENCE_TRANSFORMERS" scripts/embed-bench.py SENTENCES.json MODEL_DIR ITERATIONS

SENTENCES.json holds a JSON list of strings. The model is loaded on the CPU from MODEL_DIR,
warmed up with one pass over the sentences, then all of them are encoded ITERATIONS times
(batch size 32, L2-normalised, like the Rust backends). torch uses one thread per CPU core
available to the process. Prints one JSON line on stdout:

    {"sentences_per_sec": 171.3, "seconds": 5.84, "torch_threads": 2}

where seconds covers the timed passes only. Everything else goes to stderr.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BATCH_SIZE = 32


def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / cgroup cpusets
    except AttributeError:
        return os.cpu_count() or 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", help="JSON file with a list of strings")
    parser.add_argument("model_dir", help="all-MiniLM-L6-v2 folder")
    parser.add_argument("iterations", type=int, help="timed passes over all sentences")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("iterations must be at least 1")

    with open(args.sentences, encoding="utf-8") as f:
        sentences = json.load(f)
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        sys.exit(f"{args.sentences}: expected a non-empty JSON list of strings")

    import torch
    from sentence_transformers import SentenceTransformer

    threads = cpu_cores()
    torch.set_num_threads(threads)
    model = SentenceTransformer(args.model_dir, device="cpu")

    def encode():
        return model.encode(
            sentences,
            batch_size=BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    with torch.inference_mode():
        encode()  # warm-up: allocator, oneDNN kernels, tokenizer caches
        start = time.perf_counter()
        for _ in range(args.iterations):
            encode()
        seconds = time.perf_counter() - start

    result = {
        "sentences_per_sec": round(len(sentences) * args.iterations / seconds, 3),
        "seconds": round(seconds, 6),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
