"""Rows far longer than a sample: clipped before encoding, to the same samples, in bounded memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from helpers import smoke_raw, write_config
from transformers import AutoTokenizer

from trnft.common import chat, tokenize
from trnft.common.testing.fixtures import TINY_CHAT_TEMPLATE, bundled_dataset_path
from trnft.common.tokenize import TokenizeFigures

WORDS = ["red", "fig", "grape", "owl", "dog", "blue", "cat", "tree", "sun", "alphabetically"]


def _text(chars: int, *, seed: int, spaces: bool = True, extra: str = "") -> str:
    rng = random.Random(seed)
    sep = " " if spaces else ""
    pieces = [rng.choice(WORDS + ([extra] if extra else [])) for _ in range(chars // 3)]
    return sep.join(pieces)[:chars]


LONG = {
    "prompt": lambda: (_text(20_000, seed=1), "owl fig"),
    "response": lambda: ("Repeat:", _text(20_000, seed=2)),
    "both": lambda: (_text(9_000, seed=3), _text(9_000, seed=4)),
    "multibyte": lambda: (_text(20_000, seed=5, extra="größe 日本語 🦉"), _text(20_000, seed=6, extra="€")),
    "no-whitespace": lambda: (_text(20_000, seed=7, spaces=False), _text(20_000, seed=8, spaces=False)),
}


@pytest.mark.parametrize("max_len", [16, 64])
@pytest.mark.parametrize("case", LONG)
def test_clipping_before_encoding_gives_the_samples_of_the_whole_text(tiny_llama, case, max_len):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = [LONG[case](), ("short prompt", "owl")]
    limit = tokenize.text_limit(tok, max_len)
    clipped, count = tokenize.clip_pairs(pairs, limit)
    assert count == 1 and max(len(p) + len(r) for p, r in clipped) <= 2 * (
        limit + tokenize.CLIP_WHITESPACE_WINDOW
    )

    def samples(rows):
        ids = tokenize.encode_pairs(rows, tiny_llama, num_proc=1).ids
        out, stats = tokenize.build_samples(ids, max_len, tok.eos_token_id, tok.bos_token_id)
        return out, (stats.truncated_prompt, stats.truncated_response, stats.fit_whole, stats.kept)

    assert samples(clipped) == samples(pairs)


def test_a_conversation_with_a_huge_message_encodes_as_the_whole_one(tiny_llama):
    """Clipping a message's content keeps the conversation's head, which is what chat truncation keeps."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = TINY_CHAT_TEMPLATE
    max_len = 48
    messages = [
        {"role": "user", "content": "Repeat the words.\nred owl"},
        {"role": "assistant", "content": "red owl"},
        {"role": "user", "content": _text(30_000, seed=9)},
        {"role": "assistant", "content": _text(30_000, seed=10)},
    ]
    limit = tokenize.text_limit(tok, max_len)
    clipped = [{**m, "content": tokenize.clip_head(m["content"], limit)} for m in messages]
    whole = chat.encode(tok, chat.render(tok, messages, TINY_CHAT_TEMPLATE), max_len)
    short = chat.encode(tok, chat.render(tok, clipped, TINY_CHAT_TEMPLATE), max_len)
    assert short == whole and whole.dropped_turns == 1


def test_tokenize_with_one_50_mb_row_stays_under_2_gb_and_logs_the_cut(tmp_path, tiny_llama):
    """480 rows, one of them 50 MB (its context): once 8.5 GB peak, now the size of a normal run (1.2 GB,
    mostly the imported libraries). Measured as the peak RSS of the stage process."""
    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines()]
    rows[17]["context"] = _text(50_000_000, seed=11)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    raw = smoke_raw(tmp_path / "run", tiny_llama)
    raw["dataset"]["files"] = [str(data)]
    config = write_config(tmp_path / "run.yaml", raw)
    # the stage's own peak: wait4 reports the rusage of that one child
    proc = subprocess.Popen(
        [sys.executable, "-m", "trnft.common.cli", "tokenize", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    assert usage.ru_maxrss < 2 * 1024**2, f"peak {usage.ru_maxrss / 1024**2:.2f} GiB"
    out = tmp_path / "run" / "tokenize"
    figures = TokenizeFigures.of(json.loads((out / "manifest.json").read_text()))
    # row 17 lands in the validation split (the smoke config's seed); its cut is in the manifest and the log
    assert rows[17]["context"][:100] in (out / "validation.jsonl").read_text()
    split = "validation"
    assert figures.validation.truncated_prompt == 1
    assert f"tokenize: {split}: 1 of" in output and "(1 in the prompt, 0 in the response)" in output, output
