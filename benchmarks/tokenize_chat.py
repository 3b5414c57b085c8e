"""Benchmark: the tokenize stage on conversations (chat template, assistant-only masks) against the template
path on the same text, tokens per second of the whole stage. Goal: chat within 2x of the template path.

Corpus: the long-tailed synthetic instruction rows of ``benchmarks/tokenize.py``. The template run reads them
as rows with ``input_template``/``output_template``; the chat run reads the same rows as conversations
(instruction and context as the user turn, the response as the assistant turn; every third conversation
takes the next row as a second turn), rendered with the tiny tokenizer's chat template. Both at num_proc 1,
max_seq_length 1024, packed. Prints stage wall time, non-pad and supervised tokens, tokens/s and the ratio.

    python benchmarks/tokenize_chat.py [--rows 15000]

``--turns 2,10,100``: instead, conversations of that many user/assistant pairs rendered and encoded
(``chat.render`` + ``chat.encode``, the tiny tokenizer's template), rows/s and milliseconds per turn for
each length: the per-turn cost stays flat when rendering is linear in turns (it grew 180x from 2 to 100
turns when every turn re-rendered its prefix).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the stdlib module `tokenize` when this folder is first on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _corpus_module():
    # benchmarks/tokenize.py is named like the stdlib module: load it by path.
    spec = importlib.util.spec_from_file_location("bench_tokenize", Path(__file__).with_name("tokenize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_conversations(rows: list[dict]) -> list[dict]:
    out, i, n = [], 0, 0
    while i < len(rows):
        turns = 2 if n % 3 == 2 else 1
        messages = []
        for row in rows[i : i + turns]:
            user = row["instruction"] + (f"\n{row['context']}" if row["context"] else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]
        out.append({"messages": messages})
        i, n = i + turns, n + 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=15000)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--turns", default=None, help="Comma-separated conversation lengths (pairs).")
    args = parser.parse_args()
    if args.turns:
        return by_turns([int(t) for t in args.turns.split(",")])

    from trnft.common import tokenize as stage
    from trnft.common.config.run_config import load_config
    from trnft.common.testing.fixtures import build_tiny_model, train_tokenizer

    bench = _corpus_module()
    work = Path(tempfile.mkdtemp(prefix="trnft-bench-chat-"))
    corpus = work / "corpus.jsonl"
    bench.make_corpus(corpus, args.rows)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    chats = work / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in to_conversations(rows)))
    tokenizer = train_tokenizer([" ".join(r.values()) for r in rows[:3000]], vocab_size=16000)
    model_dir = build_tiny_model(work / "model", tokenizer=tokenizer)

    common = {
        "train_ratio": 0.9,
        "validation_ratio": 0.05,
        "test_ratio": 0.05,
        "max_seq_length": args.max_seq_length,
    }
    runs = {
        "template": {
            "files": [str(corpus)],
            "input_template": "### Instruction:\n{instruction}\n\nContext: {context}\n### Response:\n",
            "output_template": "{response}",
        },
        "chat": {"files": [str(chats)], "messages_field": "messages"},
    }
    results = {}
    for name, dataset in runs.items():
        raw = {
            "run": {"name": "bench", "root": str(work / name)},
            "model": {"name_or_path": str(model_dir)},
            "dataset": {**dataset, **common},
        }
        path = work / f"{name}.yaml"
        path.write_text(json.dumps(raw))
        t0 = time.perf_counter()
        result = stage.run(load_config(path), log=lambda m: None)
        seconds = time.perf_counter() - t0
        figures = result.manifest["figures"]
        tokens = figures["train"]["non_pad_tokens"] + figures["validation"]["non_pad_tokens"]
        supervised = figures["train"]["supervised_tokens"] + figures["validation"]["supervised_tokens"]
        results[name] = (seconds, tokens, supervised)

    print(
        f"corpus: {args.rows} rows ({len(to_conversations(rows))} conversations), max_seq_length {args.max_seq_length}"
    )
    print(f"{'path':>9} {'stage wall s':>13} {'non-pad tokens':>15} {'supervised':>11} {'tokens/s':>10}")
    for name, (seconds, tokens, supervised) in results.items():
        print(f"{name:>9} {seconds:>13.2f} {tokens:>15,} {supervised:>11,} {tokens / seconds:>10,.0f}")
    ratio = (results["template"][1] / results["template"][0]) / (results["chat"][1] / results["chat"][0])
    print(f"template tokens/s / chat tokens/s: {ratio:.2f} (goal <= 2)")
    return 0 if ratio <= 2 else 1


def by_turns(lengths: list[int], seconds_each: float = 3.0) -> int:
    from trnft.common import chat
    from trnft.common.testing.fixtures import TINY_CHAT_TEMPLATE, bundled_texts, train_tokenizer

    tokenizer = train_tokenizer(bundled_texts())
    print(f"{'turns':>6} {'rows/s':>9} {'ms/row':>9} {'ms/turn':>8}")
    per_turn = []
    for turns in lengths:
        messages = []
        for t in range(turns):
            messages += [
                {"role": "user", "content": f"Repeat the words, number {t}.\nred owl {t}"},
                {"role": "assistant", "content": f"red owl {t}, as asked."},
            ]
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds_each or rows < 3:
            chat.encode(tokenizer, chat.render(tokenizer, messages, TINY_CHAT_TEMPLATE), 1 << 20)
            rows += 1
        ms = 1000 * (time.perf_counter() - t0) / rows
        per_turn.append(ms / turns)
        print(f"{turns:>6} {1000 / ms:>9.1f} {ms:>9.2f} {ms / turns:>8.3f}")
    growth = per_turn[-1] / per_turn[0]
    print(f"per-turn cost at {lengths[-1]} turns / at {lengths[0]}: {growth:.2f} (linear: about 1 or less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
