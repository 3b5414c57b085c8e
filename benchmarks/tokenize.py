"""Benchmark of the tokenize stage: tokens/s at num_proc 1 and 2, and packing vs padding efficiency.

Corpus: synthetic instruction rows whose prompt and response lengths follow a long-tailed, Dolly-15k-like
distribution (instruction ~12 words; a context on 30% of rows, median ~75 words with a tail past 1,000;
response median ~45 words with a tail past 1,000). Words are pseudo-words from syllables, and the
tokenizer is a 16k byte-level BPE trained on the corpus, so tokens per word look like a real tokenizer's.

Runs the real stage (``trnft.common.tokenize.run``) at max_seq_length 1024 and prints, per num_proc:
stage wall time, tokenization time and tokens/s, then packed non-pad fraction (goal >= 0.97) against
padding every sample to 1024.

    python benchmarks/tokenize.py [--rows 15000]
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module `tokenize` (which linecache imports lazily); running it puts
# its folder first on sys.path, so take that folder off before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng"]


def words(rng: np.random.Generator, n: int) -> str:
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        out.append("".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), k)))
    return " ".join(out)


def lognormal_words(rng: np.random.Generator, median: float, sigma: float, cap: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), 1, cap))


def make_corpus(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for _ in range(rows):
            row = {
                "instruction": words(rng, lognormal_words(rng, 12, 0.5, 120)),
                "context": words(rng, lognormal_words(rng, 75, 1.0, 1500)) if rng.random() < 0.3 else "",
                "response": words(rng, lognormal_words(rng, 45, 1.0, 1500)),
            }
            fh.write(json.dumps(row) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=15000)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    args = parser.parse_args()

    from trnft.common import tokenize as stage
    from trnft.common.config.run_config import load_config
    from trnft.common.testing.fixtures import build_tiny_model, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="trnft-bench-tokenize-"))
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.rows)
    texts = [" ".join(json.loads(line).values()) for line in corpus.read_text().splitlines()[:3000]]
    tokenizer = train_tokenizer(texts, vocab_size=16000)
    model_dir = build_tiny_model(work / "model", tokenizer=tokenizer)

    timings = {}
    encode_time: dict[int, float] = {}
    original_encode = stage.encode_pairs

    def timed_encode(pairs, tokenizer_dir, num_proc):
        t0 = time.perf_counter()
        out = original_encode(pairs, tokenizer_dir, num_proc)
        encode_time[num_proc] = encode_time.get(num_proc, 0.0) + time.perf_counter() - t0
        return out

    stage.encode_pairs = timed_encode
    manifests = {}
    for num_proc in (1, 2):
        raw = {
            "run": {"name": "bench", "root": str(work / f"run{num_proc}")},
            "model": {"name_or_path": str(model_dir)},
            "dataset": {
                "files": [str(corpus)],
                "input_template": "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n",
                "output_template": "{response}",
                "train_ratio": 0.9,
                "validation_ratio": 0.05,
                "test_ratio": 0.05,
                "max_seq_length": args.max_seq_length,
                "num_proc": num_proc,
            },
        }
        path = work / f"run{num_proc}.yaml"
        path.write_text(json.dumps(raw))
        cfg = load_config(path)
        t0 = time.perf_counter()
        result = stage.run(cfg, log=lambda m: None)
        timings[num_proc] = time.perf_counter() - t0
        manifests[num_proc] = result.manifest["figures"]

    figs = manifests[1]
    tokens = figs["train"]["non_pad_tokens"] + figs["validation"]["non_pad_tokens"]
    same = all(
        np.array_equal(
            np.load(work / "run1" / "tokenize" / "train" / f"{a}.npy"),
            np.load(work / "run2" / "tokenize" / "train" / f"{a}.npy"),
        )
        for a in ("input_ids", "labels", "position_ids", "segment_ids")
    )
    print(f"corpus: {args.rows} rows, {tokens} tokens after templating, max_seq_length {args.max_seq_length}")
    print(
        f"{'num_proc':>8} {'stage wall s':>13} {'tokenize s':>11} {'tokens/s (tokenize)':>20} {'tokens/s (stage)':>17}"
    )
    for num_proc in (1, 2):
        print(
            f"{num_proc:>8} {timings[num_proc]:>13.2f} {encode_time[num_proc]:>11.2f} "
            f"{tokens / encode_time[num_proc]:>20,.0f} {tokens / timings[num_proc]:>17,.0f}"
        )
    train = figs["train"]
    print(
        f"speed-up of tokenization at num_proc 2: {encode_time[1] / encode_time[2]:.2f}x; identical output: {same}"
    )
    print(
        f"packing: {train['sequences']} sequences, non-pad fraction {train['non_pad_fraction']:.4f} "
        f"(goal >= 0.97); padding each sample to {args.max_seq_length}: {train['non_pad_fraction_if_padded']:.4f} "
        f"({train['kept']} sequences); {train['truncated_prompt']} prompts and {train['truncated_response']} "
        "responses truncated"
    )
    print(f"ratio packed/padded sequences: {train['sequences'] / train['kept']:.3f}")
    return 0 if train["non_pad_fraction"] >= 0.97 and same else 1


if __name__ == "__main__":
    sys.exit(main())
