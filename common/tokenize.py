"""Tokenize stage: any Hugging Face dataset to cached, static-shape, correctly masked training data.

What it does, in order:

1. Loads a hub dataset (``dataset.name``/``config``/``split``) or local json/jsonl/csv/parquet files through
   ``datasets.load_dataset``.
2. Formats every row into ``{"input", "output"}`` with ``input_template``/``output_template`` (``{field}``
   placeholders, ``field_mapping`` from placeholders to columns) or a ``module:function`` converter.
   Rows whose output is empty are dropped and counted.
3. Splits train/validation/test by ratio and seed and writes ``training.jsonl``, ``validation.jsonl`` and
   ``test.jsonl`` for inspection and evaluation.
4. Tokenizes (``num_proc`` workers; the output does not depend on their number): prompt tokens are masked
   (-100), EOS is appended to every response and supervised, the pad token differs from EOS. Over-long
   samples lose prompt tokens from the left first (BOS kept), then response tokens from the right;
   samples left with no supervised token are dropped and counted. Text longer than any sample can hold
   is clipped before it is encoded (to the same tokens), so memory follows ``max_seq_length``, not the
   longest row.
5. Packs samples into sequences of exactly ``max_seq_length`` tokens (best-fit decreasing), or pads each
   sample, and writes the arrays described in :mod:`trnft.common.training.data`.

Failures (a template field missing from the data, an empty split, a tokenizer that cannot load, a
``max_seq_length`` too small for any sample) stop with one line and leave no output.
"""

from __future__ import annotations

import bisect
import errno
import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .config.run_config import DatasetSection, RunConfig, stable_hash
from .errors import TrnftError
from .pipeline import inputs
from .pipeline.figures import Figures
from .pipeline.hashing import tree_digest
from .pipeline.registry import StageSpec
from .pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from .stop import worker_pool
from .training.data import ARRAYS, IGNORE_INDEX, SPLIT_DIRS, TEXT_FILES, TOKENIZER_DIR

SPLITS = ("train", "validation", "test")
FORMAT_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Tokens a tokenizer may already have that make a good pad when its pad is missing or equals EOS,
# in order of preference (Llama 3.x reserves the first; Qwen has the FIM/vision pads).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|fim_pad|>", "<|vision_pad|>")
RESERVED_TOKEN = re.compile(r"^<\|reserved_special_token_\d+\|>$")
ADDED_PAD = "<|pad|>"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(\w+)\}")
HISTOGRAM_BINS = 8
ENCODE_CHUNK = 512


SPEC = StageSpec(
    name="tokenize",
    help="Load, format, split and tokenize the dataset into static-shape sequences.",
    needs=lambda cfg: (),
    config_keys=lambda cfg: ("model.name_or_path", "model.tokenizer", "model.revision", "dataset"),
    inputs=inputs.tokenize_inputs,
)


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """Run the tokenize stage of ``cfg`` (skipped when complete and unchanged)."""
    return run_stage(SPEC, cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# 1. Loading


def _why_not_a_file(path: Path) -> str:
    """Why ``path`` is not a readable file, as the OS says (a symbolic link loop is not "not found")."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a loop of symbolic links; point it at the real file"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if exc.errno == errno.ENOENT:
            return "not found"
        return f"cannot be read ({exc.strerror})"
    import stat

    return "is a folder, not a file" if stat.S_ISDIR(mode) else "is not a regular file"


def load_source(d: DatasetSection) -> Any:
    """The source rows as a ``datasets.Dataset``; a clear TrnftError if they cannot be read."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    if d.files is not None:
        for f in d.files:
            if not Path(f).is_file():
                raise TrnftError(f"dataset.files: {f} {_why_not_a_file(Path(f))}")
        if d.format != "auto":
            fmt = d.format
        else:
            formats = {FORMAT_BY_SUFFIX.get(Path(f).suffix.lower()) for f in d.files}
            if None in formats or len(formats) != 1:
                raise TrnftError(
                    f"dataset.files: cannot tell one format from {[Path(f).name for f in d.files]}; "
                    "use .json/.jsonl/.csv/.parquet files of one kind or set dataset.format"
                )
            (fmt,) = formats
        for f in d.files:
            check_text_file(Path(f), fmt)
        what, load = (
            f"dataset.files ({fmt})",
            lambda: datasets.load_dataset(fmt, data_files=list(d.files), split="train", **d.load_kwargs),
        )
    else:
        what, load = (
            f"dataset.name {d.name!r}",
            lambda: datasets.load_dataset(d.name, d.config, split=d.split, **d.load_kwargs),
        )
    try:
        ds = load()
    except Exception as exc:  # datasets raises many types; the user needs the reason in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrnftError(f"{what}: cannot load ({type(exc).__name__}: {reason})") from exc
    if d.max_samples is not None and len(ds) > d.max_samples:
        ds = ds.select(range(d.max_samples))
    if len(ds) == 0:
        raise TrnftError(f"{what}: has no rows")
    return ds


def check_text_file(path: Path, fmt: str) -> None:
    """Refuse, naming the file and line, a local data file the datasets library would fail on vaguely:
    empty, not UTF-8, or (JSON) a line that is not one JSON object (parquet is binary and not checked)."""
    if fmt not in ("json", "csv"):
        return
    first = None
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TrnftError(
                    f"dataset.files: {path} line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                    f"column {exc.start + 1}); save the file as UTF-8"
                ) from exc
            if first is None and line.strip():
                first = line.lstrip()
            if fmt == "json" and line.strip() and first is not None and not first.startswith("["):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrnftError(
                        f"dataset.files: {path} line {number}: not valid JSON ({exc.msg} at column "
                        f"{exc.colno}); each line of a JSON Lines file is one row"
                    ) from exc
                if not isinstance(row, dict):
                    raise TrnftError(
                        f"dataset.files: {path} line {number}: a {type(row).__name__}, not a JSON object of "
                        "columns; each line of a JSON Lines file is one row"
                    )
    if first is None:
        raise TrnftError(f"dataset.files: {path} is empty; point dataset.files at a file with rows")
    if fmt == "json" and first.startswith("["):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TrnftError(
                f"dataset.files: {path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc


# --------------------------------------------------------------------------------------------------
# 2. Formatting


def placeholders(template: str) -> list[str]:
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` by ``values[name]``; ``{{`` and ``}}`` are literal braces."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) else m.group(0)[0], template)


def _load_converter(spec: str) -> Callable[[dict[str, Any]], Any]:
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TrnftError(f"dataset.converter: cannot import {module_name!r} ({exc})") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TrnftError(f"dataset.converter: {module_name!r} has no function {func_name!r}")
    return func


@dataclass
class FormatStats:
    rows: int = 0
    formatted: int = 0
    dropped_empty_output: int = 0
    dropped_converter: int = 0
    first_converter_error: str | None = None
    dropped_bad_conversation: int = 0
    chat: ChatCounts | None = None
    render_workers: int = 1


@dataclass
class ChatCounts:
    """What the chat template did to the conversations it rendered (:class:`trnft.common.chat.Rendered`),
    summed over rows, and the first row of each kind."""

    reasoning_dropped_turns: int = 0
    reasoning_kept_turns: int = 0
    rewritten_turns: int = 0
    empty_assistant_turns: int = 0
    left_out_messages: int = 0
    first_rows: dict[str, int] = field(default_factory=dict)

    def add(self, row: int, rendered: Any) -> None:
        for name, value in (
            ("reasoning_dropped_turns", rendered.reasoning_dropped),
            ("reasoning_kept_turns", rendered.reasoning_kept),
            ("rewritten_turns", rendered.rewritten),
            ("empty_assistant_turns", rendered.empty),
            ("left_out_messages", rendered.left_out),
        ):
            if value:
                setattr(self, name, getattr(self, name) + value)
                self.first_rows.setdefault(name, row)

    def notes(self) -> list[str]:
        """One log line per thing the template did that changes what is trained."""
        first = self.first_rows
        lines = []
        if self.reasoning_dropped_turns:
            lines.append(
                f"the chat template leaves out the reasoning (<think>...</think>) of {self.reasoning_dropped_turns} "
                f"assistant turns (first: row {first['reasoning_dropped_turns']}); they are trained without it "
                "and evaluated against the same text; set dataset.keep_reasoning: true to train the last turn's"
            )
        if self.reasoning_kept_turns:
            lines.append(
                f"{self.reasoning_kept_turns} last assistant turns are trained with the reasoning the chat "
                "template leaves out (dataset.keep_reasoning)"
            )
        if self.rewritten_turns:
            lines.append(
                f"the chat template changes the text of {self.rewritten_turns} assistant turns (first: row "
                f"{first['rewritten_turns']}); they are trained and evaluated as the template writes them"
            )
        if self.empty_assistant_turns:
            lines.append(
                f"{self.empty_assistant_turns} empty assistant turns are kept in their conversations but not "
                f"trained (first: row {first['empty_assistant_turns']})"
            )
        if self.left_out_messages:
            lines.append(
                f"the chat template leaves {self.left_out_messages} system or user messages out of the training "
                f"text (first: row {first['left_out_messages']}); check the template if they matter"
            )
        return lines


def format_rows(ds: Any, d: DatasetSection) -> tuple[list[tuple[str, str]], FormatStats]:
    """``(input, output)`` text pairs in dataset order, and what was dropped."""
    stats = FormatStats(rows=len(ds))
    pairs: list[tuple[str, str]] = []
    if d.converter:
        convert = _load_converter(d.converter)
        for row in ds:
            try:
                result = convert(row)
                text_in, text_out = str(result["input"]), str(result["output"])
            except Exception as exc:  # a row the converter cannot handle is dropped and counted
                stats.dropped_converter += 1
                stats.first_converter_error = stats.first_converter_error or f"{type(exc).__name__}: {exc}"
                continue
            if not text_out.strip():
                stats.dropped_empty_output += 1
                continue
            pairs.append((text_in, text_out))
        if not pairs and stats.dropped_converter:
            raise TrnftError(f"dataset.converter: failed on every row (first: {stats.first_converter_error})")
    else:
        columns = list(ds.column_names)
        needed = {}
        for key in ("input_template", "output_template"):
            for name in placeholders(getattr(d, key)):
                column = d.field_mapping.get(name, name)
                if column not in columns:
                    raise TrnftError(
                        f"dataset.{key}: placeholder {{{name}}} needs column {column!r}, which the dataset "
                        f"does not have (columns: {', '.join(columns)}); fix the template or dataset.field_mapping"
                    )
                needed[name] = column
        for row in ds:
            values = {name: "" if row[col] is None else str(row[col]) for name, col in needed.items()}
            text_out = fill(d.output_template, values)
            if not text_out.strip():
                stats.dropped_empty_output += 1
                continue
            pairs.append((fill(d.input_template, values), text_out))
    stats.formatted = len(pairs)
    if not pairs:
        raise TrnftError(
            "dataset: every row has an empty output after formatting; check dataset.output_template"
        )
    return pairs, stats


BAD_ROWS_LOGGED = 10


# Conversations rendered per task in a worker pool (dataset.num_proc).
RENDER_CHUNK = 256


@dataclass(frozen=True)
class _ChatRendering:
    """What rendering a conversation needs besides the tokenizer (sent once per chunk to a worker)."""

    message_format: str
    role_key: str
    content_key: str
    template: str
    text_limit: int
    keep_reasoning: bool


def _render_chunk(tokenizer: Any, job: _ChatRendering, values: Sequence[Any]) -> list[Any]:
    """Per row: the rendered conversation, or the reason it cannot be used (a str)."""
    from . import chat

    out: list[Any] = []
    for value in values:
        try:
            messages = chat.parse(value, job.message_format, job.role_key, job.content_key)
            # A conversation keeps its head: a message longer than any sample is clipped (see clip_head).
            messages = [{**m, "content": clip_head(m["content"], job.text_limit)} for m in messages]
            out.append(chat.render(tokenizer, messages, job.template, job.keep_reasoning))
        except chat.BadConversation as exc:
            out.append(str(exc))
    return out


def _render_in_worker(job: _ChatRendering, values: Sequence[Any]) -> list[Any]:
    return _render_chunk(_WORKER_TOKENIZER, job, values)


def format_conversations(
    ds: Any, d: DatasetSection, tok: Any, log: Callable[[str], None], tokenizer_dir: str | Path
) -> tuple[list[tuple[str, str, Any]], FormatStats, str]:
    """``(prompt, reference, rendered conversation)`` per usable row (:mod:`trnft.common.chat`), the counts,
    and the chat template used. Rows are rendered by ``dataset.num_proc`` workers (the result does not
    depend on their number). Unusable rows are named (the first few) and counted; more than
    ``dataset.max_bad_row_fraction`` of them stops the stage."""
    import functools

    from . import chat

    if d.messages_field not in ds.column_names:
        raise TrnftError(
            f"dataset.messages_field: column {d.messages_field!r} is not in the dataset (columns: "
            f"{', '.join(ds.column_names)})"
        )
    template = chat.load_template(d.chat_template, tok)
    role_key, content_key = chat.keys(d.message_format, d.role_key, d.content_key)
    job = _ChatRendering(
        d.message_format, role_key, content_key, template, text_limit(tok, d.max_seq_length), d.keep_reasoning
    )
    values = ds[d.messages_field]
    chunks = [values[i : i + RENDER_CHUNK] for i in range(0, len(values), RENDER_CHUNK)]
    stats = FormatStats(rows=len(ds), chat=ChatCounts())
    if d.num_proc <= 1 or len(chunks) <= 1:
        results = [item for chunk in chunks for item in _render_chunk(tok, job, chunk)]
    else:
        # The pool's size is what is reported: which of its processes rendered which chunk is scheduling
        # (under load one process can take every chunk before the other has started).
        stats.render_workers = min(d.num_proc, len(chunks))
        with worker_pool(stats.render_workers, _init_worker, (str(tokenizer_dir),)) as pool:
            parts = list(pool.imap(functools.partial(_render_in_worker, job), chunks))
        results = [item for part in parts for item in part]
    records, bad = [], []
    for i, result in enumerate(results):
        if isinstance(result, str):
            bad.append((i, result))
            if len(bad) <= BAD_ROWS_LOGGED:
                log(f"tokenize: row {i} dropped: {result}")
            continue
        stats.chat.add(i, result)
        records.append((result.prompt, result.answer, result))
    if len(bad) > BAD_ROWS_LOGGED:
        log(f"tokenize: ... and {len(bad) - BAD_ROWS_LOGGED} more rows dropped")
    if bad and len(bad) > d.max_bad_row_fraction * stats.rows:
        first_row, reason = bad[0]
        raise TrnftError(
            f"dataset.messages_field: {len(bad)} of {stats.rows} rows cannot be used, more than "
            f"dataset.max_bad_row_fraction={d.max_bad_row_fraction:g} (first: row {first_row}: {reason}); fix the "
            "data or dataset.message_format / role_key / content_key / chat_template"
        )
    for line in stats.chat.notes():
        log(f"tokenize: {line}")
    stats.dropped_bad_conversation = len(bad)
    stats.formatted = len(records)
    return records, stats, template


# --------------------------------------------------------------------------------------------------
# 3. Splits


def split_rows(pairs: Sequence[tuple[str, str]], d: DatasetSection) -> dict[str, list[tuple[str, str]]]:
    """Deterministic train/validation/test split by ratio and seed; a split with a ratio > 0 is never empty."""
    n = len(pairs)
    order = np.random.default_rng(d.seed).permutation(n)
    n_val = round(n * d.validation_ratio)
    n_test = round(n * d.test_ratio)
    n_train = n - n_val - n_test
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    ratios = {"train": d.train_ratio, "validation": d.validation_ratio, "test": d.test_ratio}
    for name in SPLITS:
        if ratios[name] > 0 and sizes[name] <= 0:
            raise TrnftError(
                f"dataset.{name if name != 'train' else 'train'}_ratio: the {name} split of {n} rows would be "
                f"empty at ratio {ratios[name]:g}; use more data or a larger ratio"
            )
    bounds = np.cumsum([0, n_train, n_val, n_test])
    return {
        name: [pairs[i] for i in sorted(order[bounds[k] : bounds[k + 1]])] for k, name in enumerate(SPLITS)
    }


def write_jsonl(path: Path, pairs: Iterable[Sequence[Any]]) -> None:
    """``{"input", "output"}`` per row: the prompt and the reference (a conversation: up to its last
    assistant turn with the generation prompt, and that turn)."""
    with open(path, "w") as fh:
        for item in pairs:
            fh.write(json.dumps({"input": item[0], "output": item[1]}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# 4. Tokenizer and tokenization


def _load_tokenizer(source: str, cfg: RunConfig) -> Any:
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrnftError(
            f"{key}: cannot load a tokenizer from {source!r} ({reason}); point it at a folder or hub id with "
            "tokenizer files"
        ) from exc
    if not getattr(tok, "is_fast", False):
        raise TrnftError(f"{key}: {source!r} has no fast tokenizer (tokenizer.json); trnft needs one")
    if tok.eos_token_id is None:
        raise TrnftError(f"{key}: the tokenizer of {source!r} has no EOS token; set eos_token in its config")
    return tok


def _model_vocab_size(cfg: RunConfig) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception:
        return None
    return getattr(config, "vocab_size", None)


@dataclass(frozen=True)
class PadChoice:
    """The pad token the stage chose and why (recorded in the manifest)."""

    pad_token: str
    pad_token_id: int
    how: str  # dataset.pad_token | tokenizer | existing pad-like token | reserved special token | unk token | added
    original_pad_token: str | None


def ensure_pad_token(tok: Any, cfg: RunConfig) -> PadChoice:
    """Give ``tok`` a pad token distinct from EOS; return what was done.

    Order: ``dataset.pad_token`` if set; the tokenizer's own pad if it differs from EOS; a known pad-like
    token already in the vocabulary; a reserved special token; UNK; else a new ``<|pad|>`` token, which
    must fit in the model's embedding (its vocab_size) because the base model is not resized.
    """
    vocab = tok.get_vocab()
    eos = tok.eos_token_id
    original = tok.pad_token

    def use(token: str, how: str) -> PadChoice:
        tok.pad_token = token
        return PadChoice(token, tok.pad_token_id, how, original)

    if cfg.dataset.pad_token is not None:
        if cfg.dataset.pad_token not in vocab:
            raise TrnftError(
                f"dataset.pad_token: {cfg.dataset.pad_token!r} is not in the tokenizer's vocabulary"
            )
        if vocab[cfg.dataset.pad_token] == eos:
            raise TrnftError(f"dataset.pad_token: {cfg.dataset.pad_token!r} is the EOS token; choose another")
        return use(cfg.dataset.pad_token, "dataset.pad_token")
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return PadChoice(tok.pad_token, tok.pad_token_id, "tokenizer", original)
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != eos:
            return use(token, "existing pad-like token")
    reserved = sorted((t for t in vocab if RESERVED_TOKEN.match(t)), key=lambda t: vocab[t])
    if reserved:
        return use(reserved[-1], "reserved special token")
    if tok.unk_token_id is not None and tok.unk_token_id != eos:
        return use(tok.unk_token, "unk token")
    tok.add_special_tokens({"pad_token": ADDED_PAD})
    limit = _model_vocab_size(cfg)
    if limit is not None and tok.pad_token_id >= limit:
        raise TrnftError(
            f"dataset.pad_token: the tokenizer has no pad token distinct from EOS and a new one (id "
            f"{tok.pad_token_id}) does not fit the model's vocab_size {limit}; set dataset.pad_token to an "
            "existing token"
        )
    return PadChoice(ADDED_PAD, tok.pad_token_id, "added", original)


# A worker process's own tokenizer, loaded once by the pool initializer (never set in the main process).
_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    from transformers import AutoTokenizer

    _WORKER_TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_with(tokenizer: Any, chunk: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    # The Rust backend gives the same ids as tokenizer(...)["input_ids"] without building the masks.
    backend = tokenizer.backend_tokenizer
    prompts = backend.encode_batch([p for p, _ in chunk], add_special_tokens=True)
    responses = backend.encode_batch([r for _, r in chunk], add_special_tokens=False)
    return [(p.ids, r.ids) for p, r in zip(prompts, responses)]


def _encode_in_worker(chunk: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    return _encode_with(_WORKER_TOKENIZER, chunk)


# Text longer than a sample can hold is clipped before it is encoded, so encoding memory follows
# ``max_seq_length``, not the longest row (a 50 MB row once took 8.5 GB). The clipped text still holds at
# least ``max_seq_length + 1`` tokens, because no token covers more characters than its vocabulary string
# has (a byte-level token covers at most one character per byte; a sentencepiece piece one per symbol), so
# every truncation decision and every kept token is what the whole text gives. The cut is moved to a
# whitespace within ``CLIP_WHITESPACE_WINDOW`` characters so that it falls between pre-tokenizer words.
CLIP_WHITESPACE_WINDOW = 4096


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters any token of ``tokenizer`` (added tokens included) can stand for."""
    return max(len(token) for token in tokenizer.get_vocab())


def text_limit(tokenizer: Any, max_len: int) -> int:
    """Characters enough for ``max_len + 1`` tokens of any text."""
    return (max_len + 1) * longest_token_chars(tokenizer)


def _whitespace_at_or_after(text: str, start: int, stop: int) -> int:
    found = [i for i in (text.find(" ", start, stop), text.find("\n", start, stop)) if i >= 0]
    return min(found, default=start)


def clip_head(text: str, limit: int) -> str:
    """The first ``limit`` characters or a few more (to the next whitespace): what a truncation that keeps
    the head of ``text`` can use."""
    if len(text) <= limit:
        return text
    return text[: _whitespace_at_or_after(text, limit, limit + CLIP_WHITESPACE_WINDOW)]


def clip_tail(text: str, limit: int) -> str:
    """The last ``limit`` characters or a few more (back to a whitespace): what a truncation that keeps
    the tail of ``text`` (the prompt, losing tokens from the left) can use."""
    if len(text) <= limit:
        return text
    start = len(text) - limit
    found = [i for i in (text.rfind(" ", start - CLIP_WHITESPACE_WINDOW, start + 1),
                         text.rfind("\n", start - CLIP_WHITESPACE_WINDOW, start + 1)) if i >= 0]  # fmt: skip
    return text[max(found, default=start) :]


def clip_pairs(pairs: Sequence[tuple[str, str]], limit: int) -> tuple[list[tuple[str, str]], int]:
    """(prompt tail, response head) per pair within ``limit`` characters, and how many were clipped."""
    clipped = [(clip_tail(p, limit), clip_head(r, limit)) for p, r in pairs]
    return clipped, sum(len(a) + len(b) != len(p) + len(r) for (a, b), (p, r) in zip(clipped, pairs))


@dataclass
class EncodedPairs:
    """Token ids per (prompt, response) pair, in order, and how many processes the encoding pool had (1
    without one)."""

    ids: list[tuple[list[int], list[int]]]
    workers: int


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer_dir: str | Path, num_proc: int) -> EncodedPairs:
    """(prompt ids with special tokens, response ids without) per pair, in order, for any ``num_proc``.

    Pairs go in chunks of ``ENCODE_CHUNK``; with ``num_proc`` > 1 and more than one chunk, a pool of up to
    ``num_proc`` forked workers encodes them (``workers``: the pool's size; which process encoded which
    chunk is scheduling).
    """
    # Imported here, before any fork, so that workers share it instead of each importing it again.
    from transformers import AutoTokenizer

    chunks = [list(pairs[i : i + ENCODE_CHUNK]) for i in range(0, len(pairs), ENCODE_CHUNK)]
    if num_proc <= 1 or len(chunks) <= 1:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return EncodedPairs([item for chunk in chunks for item in _encode_with(tokenizer, chunk)], workers=1)
    workers = min(num_proc, len(chunks))
    with worker_pool(workers, _init_worker, (str(tokenizer_dir),)) as pool:
        parts = list(pool.imap(_encode_in_worker, chunks))
    return EncodedPairs([item for part in parts for item in part], workers=workers)


@dataclass
class SampleStats:
    samples: int = 0
    kept: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped_no_supervised: int = 0
    fit_whole: int = 0
    shortest_needed: int = 0
    lengths: list[int] = field(default_factory=list)


def build_samples(
    encoded: Sequence[tuple[list[int], list[int]]], max_len: int, eos_id: int, bos_id: int | None
) -> tuple[list[tuple[list[int], list[int]]], SampleStats]:
    """(input_ids, labels) per kept sample, with EOS appended, masking and truncation applied."""
    stats = SampleStats(samples=len(encoded))
    out = []
    needed = []
    for prompt, response in encoded:
        response = [*response, eos_id]
        needed.append(len(prompt) + len(response))
        excess = len(prompt) + len(response) - max_len
        if excess > 0:
            keep_head = 1 if prompt and bos_id is not None and prompt[0] == bos_id else 0
            cut = min(excess, len(prompt) - keep_head)
            if cut > 0:
                prompt = prompt[:keep_head] + prompt[keep_head + cut :]
                stats.truncated_prompt += 1
                excess -= cut
            if excess > 0:
                response = response[: len(response) - excess]
                stats.truncated_response += 1
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        # The first token of a sample is never predicted: in a packed sequence the position before it
        # belongs to another sample.
        labels[0] = IGNORE_INDEX
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped_no_supervised += 1
            continue
        out.append((ids, labels))
        stats.lengths.append(len(ids))
    stats.kept = len(out)
    stats.fit_whole = sum(n <= max_len for n in needed)
    stats.shortest_needed = min(needed, default=0)
    return out, stats


# --------------------------------------------------------------------------------------------------
# 5. Static shapes


def pack_best_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group sample indices into bins of total length <= ``max_len`` (best-fit decreasing).

    Deterministic: samples are placed longest first (ties by index) into the bin with the least room
    that still fits; each bin lists its samples in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # sorted (room left, bin id)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        assert 0 < need <= max_len
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return [sorted(b) for b in bins]


def to_arrays(
    samples: Sequence[tuple[list[int], list[int]]], max_len: int, pad_id: int, packing: bool
) -> dict[str, np.ndarray]:
    """Sequences of exactly ``max_len`` tokens as the arrays of :mod:`trnft.common.training.data`."""
    bins = (
        pack_best_fit([len(s[0]) for s in samples], max_len)
        if packing
        else [[i] for i in range(len(samples))]
    )
    n = len(bins)
    arrays = {
        "input_ids": np.full((n, max_len), pad_id, dtype=np.int32),
        "labels": np.full((n, max_len), IGNORE_INDEX, dtype=np.int32),
        "position_ids": np.zeros((n, max_len), dtype=np.int32),
        "segment_ids": np.zeros((n, max_len), dtype=np.int32),
    }
    for row, members in enumerate(bins):
        at = 0
        for segment, i in enumerate(members, start=1):
            ids, labels = samples[i]
            end = at + len(ids)
            arrays["input_ids"][row, at:end] = ids
            arrays["labels"][row, at:end] = labels
            arrays["position_ids"][row, at:end] = np.arange(len(ids))
            arrays["segment_ids"][row, at:end] = segment
            at = end
    return arrays


@dataclass(frozen=True)
class LengthBin:
    """Samples whose token count lies in ``[shortest, longest]``."""

    shortest: int
    longest: int
    count: int


def length_histogram(lengths: Sequence[int], max_len: int, bins: int = HISTOGRAM_BINS) -> list[LengthBin]:
    edges = np.linspace(0, max_len, bins + 1).astype(int)
    counts, _ = np.histogram(np.asarray(lengths), bins=edges)
    return [LengthBin(int(edges[k]) + 1, int(edges[k + 1]), int(counts[k])) for k in range(bins)]


# --------------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class RowCounts:
    loaded: int
    formatted: int
    dropped_empty_output: int
    dropped_converter: int
    dropped_bad_conversation: int = 0
    # Conversations only: what the chat template did to them (reasoning left out, text changed, ...).
    chat: ChatCounts | None = None


@dataclass(frozen=True)
class SplitFigures:
    """One tokenized split: what was kept, truncated or dropped, and how full its sequences are."""

    samples: int
    kept: int
    truncated_prompt: int
    truncated_response: int
    dropped_no_supervised: int
    fit_whole: int
    sequences: int
    tokenize_workers: int
    tokens: int
    non_pad_tokens: int
    supervised_tokens: int
    non_pad_fraction: float
    non_pad_fraction_if_padded: float  # what padding every sample would have kept (the packing gain)
    length_histogram: list[LengthBin]
    # Conversations (dataset.messages_field) that lost trailing turns to max_seq_length; cut inside their
    # first assistant turn are counted in truncated_response.
    truncated_turns: int = 0


@dataclass(frozen=True)
class TokenizeFigures(Figures):
    KIND: ClassVar[str] = "tokenize"

    tokenizer_digest: str
    template_digest: str
    max_seq_length: int
    mode: str  # packed | padded
    partial_batches: str
    pad_token: PadChoice
    rows: RowCounts
    split_rows: dict[str, int]
    train: SplitFigures
    validation: SplitFigures | None

    def summary(self) -> str:
        t = self.train
        return (
            f"train {t.kept} samples -> {t.sequences} x {self.max_seq_length} tokens "
            f"({self.mode}, {100 * t.non_pad_fraction:.1f}% non-pad); "
            f"validation {self.split_rows['validation']}, test {self.split_rows['test']} rows"
        )


# --------------------------------------------------------------------------------------------------
# The stage body: set up the tokenizer, write the text splits, tokenize train/validation, report


def _write_split(out: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    folder = out / SPLIT_DIRS[name]
    folder.mkdir()
    for key in ARRAYS:
        path = folder / f"{key}.npy"
        try:
            np.save(path, arrays[key])
        except OSError as exc:
            if exc.errno is not None:
                raise
            # numpy's short write on a full volume carries no errno and no file name.
            raise OSError(errno.ENOSPC, f"no space left ({exc})", str(path)) from exc


def _setup_tokenizer(ctx: StageContext) -> tuple[Any, PadChoice, str]:
    """The tokenizer with a pad token distinct from EOS, and where it came from."""
    source = ctx.cfg.model.tokenizer or ctx.cfg.model.name_or_path
    tok = _load_tokenizer(source, ctx.cfg)
    pad = ensure_pad_token(tok, ctx.cfg)
    ctx.log(f"tokenize: tokenizer {source} (pad {pad.pad_token!r} via {pad.how}, eos {tok.eos_token!r})")
    return tok, pad, source


def _text_splits(
    ctx: StageContext, tok: Any, tok_dir: Path
) -> tuple[dict[str, list[Any]], FormatStats, str | None]:
    """Load, format and split the rows; write them as JSONL for inspection and evaluation. Also the chat
    template, when the rows are conversations."""
    d = ctx.cfg.dataset
    template = None
    if d.messages_field:
        pairs, fmt, template = format_conversations(load_source(d), d, tok, ctx.log, tok_dir)
        dropped = f"{fmt.dropped_bad_conversation} unusable conversations dropped"
    else:
        pairs, fmt = format_rows(load_source(d), d)
        dropped = (
            f"{fmt.dropped_empty_output} empty outputs, {fmt.dropped_converter} converter failures dropped"
        )
    splits = split_rows(pairs, d)
    for name in SPLITS:
        write_jsonl(ctx.out_dir / TEXT_FILES[name], splits[name])
    ctx.log(
        f"tokenize: {fmt.rows} rows, {fmt.formatted} formatted ({dropped}); "
        + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS)
    )
    return splits, fmt, template


def _tokenize_split(
    out: Path,
    name: str,
    pairs: Sequence[tuple[str, str]],
    tok: Any,
    tok_dir: Path,
    d: DatasetSection,
    render_workers: int,
) -> SplitFigures:
    """Encode, mask, truncate and pack one split into ``out``; its figures."""
    max_len = d.max_seq_length
    if d.messages_field:
        samples, stats, truncated_turns = _chat_samples(pairs, tok, max_len)
        workers = render_workers
    else:
        clipped, _ = clip_pairs(pairs, text_limit(tok, max_len))
        encoded = encode_pairs(clipped, tok_dir, d.num_proc)
        samples, stats = build_samples(encoded.ids, max_len, tok.eos_token_id, tok.bos_token_id)
        workers, truncated_turns = encoded.workers, 0
    if not samples or stats.fit_whole == 0:
        raise TrnftError(
            f"dataset.max_seq_length: {max_len} tokens cannot hold any {name} sample whole (the shortest "
            f"needs {stats.shortest_needed}); raise dataset.max_seq_length"
        )
    arrays = to_arrays(samples, max_len, tok.pad_token_id, d.packing)
    _write_split(out, name, arrays)
    non_pad = int((arrays["segment_ids"] != 0).sum())
    total = int(arrays["input_ids"].size)
    return SplitFigures(
        samples=stats.samples,
        kept=stats.kept,
        truncated_prompt=stats.truncated_prompt,
        truncated_response=stats.truncated_response,
        dropped_no_supervised=stats.dropped_no_supervised,
        fit_whole=stats.fit_whole,
        sequences=int(arrays["input_ids"].shape[0]),
        tokenize_workers=workers,
        tokens=total,
        non_pad_tokens=non_pad,
        supervised_tokens=int((arrays["labels"] != IGNORE_INDEX).sum()),
        non_pad_fraction=round(non_pad / total, 5),
        non_pad_fraction_if_padded=round(sum(stats.lengths) / (len(stats.lengths) * max_len), 5),
        length_histogram=length_histogram(stats.lengths, max_len),
        truncated_turns=truncated_turns,
    )


def _chat_samples(
    records: Sequence[tuple[str, str, Any]], tok: Any, max_len: int
) -> tuple[list[tuple[list[int], list[int]]], SampleStats, int]:
    """(input_ids, labels) per conversation (:func:`trnft.common.chat.encode`), the sample counts, and how
    many conversations lost trailing turns."""
    from . import chat

    stats = SampleStats(samples=len(records))
    out, truncated_turns, needed = [], 0, []
    for _, _, rendered in records:
        encoded = chat.encode(tok, rendered, max_len)
        full = encoded.dropped_turns or encoded.cut_tokens
        needed.append(max_len + 1 if full else len(encoded.ids))
        truncated_turns += encoded.dropped_turns > 0
        stats.truncated_response += encoded.cut_tokens
        if all(label == IGNORE_INDEX for label in encoded.labels):
            stats.dropped_no_supervised += 1
            continue
        out.append((encoded.ids, encoded.labels))
        stats.lengths.append(len(encoded.ids))
    stats.kept = len(out)
    stats.fit_whole = sum(n <= max_len for n in needed)
    stats.shortest_needed = min(needed, default=0)
    return out, stats, truncated_turns


def _write_info(out: Path, tok: Any, d: DatasetSection, figures: TokenizeFigures) -> None:
    """``tokenize_info.json``: the token ids and templates the trainers and evaluate read."""
    info = {
        "max_seq_length": d.max_seq_length,
        "mode": figures.mode,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "vocab_size": len(tok),
        "input_template": d.input_template,
        "output_template": d.output_template,
        # Chat prompts carry the template's special tokens: evaluate encodes them without adding any.
        "chat": bool(d.messages_field),
        "splits": {
            name: split.sequences
            for name, split in (("train", figures.train), ("validation", figures.validation))
            if split is not None
        },
    }
    (out / "tokenize_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _body(ctx: StageContext) -> StageOutcome:
    out, d = ctx.out_dir, ctx.cfg.dataset
    tok, pad, source = _setup_tokenizer(ctx)
    tok_dir = out / TOKENIZER_DIR
    tok.save_pretrained(tok_dir)  # first: rendering workers load it
    splits, fmt, chat_template = _text_splits(ctx, tok, tok_dir)
    tokenized = {
        name: _tokenize_split(out, name, splits[name], tok, tok_dir, d, fmt.render_workers)
        if splits[name]
        else None
        for name in ("train", "validation")
    }
    for name, split in tokenized.items():
        if split is not None and (
            split.truncated_prompt or split.truncated_response or split.truncated_turns
        ):
            ctx.log(
                f"tokenize: {name}: {split.samples - split.fit_whole} of {split.samples} samples longer than "
                f"dataset.max_seq_length={d.max_seq_length} were cut ("
                + (
                    f"{split.truncated_turns} at a turn boundary, {split.truncated_response} inside their first "
                    "assistant turn"
                    if d.messages_field
                    else f"{split.truncated_prompt} in the prompt, {split.truncated_response} in the response"
                )
                + f"); {split.dropped_no_supervised} left with no supervised token were dropped"
            )
    template: dict[str, Any] = {
        "input_template": d.input_template,
        "output_template": d.output_template,
        "field_mapping": d.field_mapping,
        "converter": d.converter,
    }
    if d.messages_field:
        template = {
            "messages_field": d.messages_field,
            "message_format": d.message_format,
            "role_key": d.role_key,
            "content_key": d.content_key,
            "chat_template": chat_template,
            "keep_reasoning": d.keep_reasoning,
        }
    figures = TokenizeFigures(
        tokenizer_digest=tree_digest(tok_dir),
        template_digest=stable_hash(template),
        max_seq_length=d.max_seq_length,
        mode="packed" if d.packing else "padded",
        partial_batches="never: the trainers fill the last batch of an epoch from the next epoch",
        pad_token=pad,
        rows=RowCounts(
            fmt.rows,
            fmt.formatted,
            fmt.dropped_empty_output,
            fmt.dropped_converter,
            fmt.dropped_bad_conversation,
            fmt.chat,
        ),
        split_rows={n: len(splits[n]) for n in SPLITS},
        train=tokenized["train"],
        validation=tokenized["validation"],
    )
    _write_info(out, tok, d, figures)
    return StageOutcome(
        summary=figures.summary(),
        figures=figures,
        inputs=[{"name": "tokenizer_source", "path": source}],
        layout={"max_seq_length": d.max_seq_length, "mode": figures.mode},
    )
