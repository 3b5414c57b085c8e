"""Tokenize stage: static shapes, masking, EOS, packing without cross-sample attention, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trnft.common import cli
from trnft.common.config.run_config import load_config
from trnft.common.testing.fixtures import bundled_dataset_path
from trnft.common.tokenize import TokenizeFigures, build_samples, pack_best_fit, run, to_arrays
from trnft.common.training.data import IGNORE_INDEX, TokenizeOutput, batch_indices, segment_attention_mask

pytestmark = pytest.mark.both_lines  # shared code whose libraries differ between the lines

QUIET = lambda m: None  # noqa: E731


@pytest.fixture
def parquet_file(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines()]
    path = tmp_path / "data.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def tokenize(run_config, *overrides, **sections):
    cfg = load_config(run_config(**sections), list(overrides))
    result = run(cfg, log=QUIET)
    return cfg, result, TokenizeOutput(result.path)


def segments(row_segments: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of every sample in a sequence."""
    spans = []
    for seg in np.unique(row_segments):
        if seg == 0:
            continue
        where = np.flatnonzero(row_segments == seg)
        assert (np.diff(where) == 1).all(), "a sample must be contiguous"
        spans.append((int(where[0]), int(where[-1]) + 1))
    return sorted(spans)


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_static_shapes_masking_and_eos(run_config, parquet_file, source, packing):
    from transformers import AutoTokenizer

    dataset = {"packing": packing, "max_seq_length": 128}
    if source == "parquet":
        dataset["files"] = [str(parquet_file)]
    _cfg, result, out = tokenize(run_config, dataset=dataset)
    tok = AutoTokenizer.from_pretrained(out.tokenizer_dir)
    info = out.info
    assert info["pad_token_id"] != info["eos_token_id"]
    train_text = [json.loads(line) for line in out.text("train").read_text().splitlines()]
    expected_samples = {(r["input"], r["output"]) for r in train_text}

    split = out.split("train")
    assert split.input_ids.shape == split.labels.shape == (len(split), 128)
    seen = set()
    for row in range(len(split)):
        ids, labels, pos, seg = (
            np.asarray(a[row]) for a in (split.input_ids, split.labels, split.position_ids, split.segment_ids)
        )
        assert (labels[seg == 0] == IGNORE_INDEX).all() and (ids[seg == 0] == info["pad_token_id"]).all()
        spans = segments(seg)
        assert len(spans) == 1 or packing
        for start, end in spans:
            sample_ids, sample_labels = ids[start:end], labels[start:end]
            assert (pos[start:end] == np.arange(end - start)).all()
            supervised = np.flatnonzero(sample_labels != IGNORE_INDEX)
            # labels are the tokens themselves where supervised, a contiguous suffix ending in one EOS
            assert (sample_labels[supervised] == sample_ids[supervised]).all()
            assert (np.diff(supervised) == 1).all() and supervised[-1] == end - start - 1
            assert sample_labels[0] == IGNORE_INDEX
            assert (sample_labels == info["eos_token_id"]).sum() == 1 and sample_ids[-1] == info[
                "eos_token_id"
            ]
            prompt = tok.decode(sample_ids[: supervised[0]], skip_special_tokens=True)
            response = tok.decode(sample_ids[supervised[0] : -1], skip_special_tokens=True)
            seen.add((prompt, response))
    assert seen == expected_samples  # every training sample lands once, prompt masked, response supervised
    fig = TokenizeFigures.of(result.manifest)
    assert fig.mode == ("packed" if packing else "padded")
    assert fig.train.sequences == len(split)
    if packing:
        assert fig.train.non_pad_fraction > 2 * fig.train.non_pad_fraction_if_padded


def test_packed_samples_do_not_attend_across_boundaries(run_config, tiny_llama):
    """Logits of a packed sequence equal the logits of each of its samples run alone."""
    from transformers import AutoModelForCausalLM

    _, _, out = tokenize(run_config, dataset={"max_seq_length": 256})
    split = out.split("train")
    row = next(r for r in range(len(split)) if len(segments(np.asarray(split.segment_ids[r]))) >= 3)
    batch = {k: torch.from_numpy(v) for k, v in split.rows([row]).items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=segment_attention_mask(batch["segment_ids"]),
            position_ids=batch["position_ids"],
        ).logits[0]
        for start, end in segments(batch["segment_ids"][0].numpy()):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
    # and the mask really matters: without it the second sample sees the first
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0]
    start, end = segments(batch["segment_ids"][0].numpy())[1]
    assert not torch.allclose(leaky[start:end], packed[start:end], atol=1e-4)


def test_output_does_not_depend_on_num_proc(run_config, tmp_path, monkeypatch):
    from trnft.common import tokenize as stage

    monkeypatch.setattr(stage, "ENCODE_CHUNK", 64)  # the 384 training rows make 6 chunks: a real pool of 2
    arrays = []
    workers = []
    for num_proc in (1, 2):
        cfg = load_config(
            run_config(dataset={"num_proc": num_proc, "max_seq_length": 128}),
            [f"run.root={tmp_path}/r{num_proc}"],
        )
        result = run(cfg, log=QUIET)
        workers.append(TokenizeFigures.of(result.manifest).train.tokenize_workers)
        out = TokenizeOutput(result.path)
        arrays.append(out.split("train").rows(range(len(out.split("train")))))
        arrays.append(out.text("test").read_text())
    assert workers == [1, 2]  # the second run encoded through a pool of two processes
    for a, b in zip(arrays[0].values(), arrays[2].values()):
        assert np.array_equal(a, b)
    assert arrays[1] == arrays[3]


def test_rerun_is_skipped_and_a_template_change_redoes_it(run_config):
    config = run_config()
    cfg = load_config(config)
    first = run(cfg, log=QUIET)
    logs: list[str] = []
    assert run(cfg, log=logs.append).skipped
    assert "already complete" in logs[0]
    changed = load_config(config, ["dataset.input_template=Q: {instruction} {context}\\nA: "])
    second = run(changed, log=logs.append)
    assert not second.skipped
    assert any("config changed: dataset.input_template" in m for m in logs)
    assert (
        TokenizeFigures.of(second.manifest).template_digest
        != TokenizeFigures.of(first.manifest).template_digest
    )
    assert json.loads(TokenizeOutput(second.path).text("test").read_text().splitlines()[0])[
        "input"
    ].startswith("Q: ")


def test_a_changed_data_file_redoes_the_stage(run_config, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(bundled_dataset_path().read_text())
    config = run_config(dataset={"files": [str(data)]})
    run(load_config(config), log=QUIET)
    data.write_text("".join(bundled_dataset_path().read_text().splitlines(keepends=True)[:300]))
    logs: list[str] = []
    result = run(load_config(config), log=logs.append)
    assert not result.skipped and any("input changed" in m and "rows.jsonl" in m for m in logs)
    assert TokenizeFigures.of(result.manifest).rows.loaded == 300


def test_truncation_prompt_left_first_then_response():
    bos, eos = 1, 2
    encoded = [([bos, 10, 11, 12, 13], [20, 21]), ([bos, 10], [20, 21, 22, 23, 24, 25])]
    samples, stats = build_samples(encoded, max_len=5, eos_id=eos, bos_id=bos)
    # sample 1: prompt loses its oldest tokens (BOS kept), response + EOS intact
    assert samples[0] == ([bos, 13, 20, 21, eos], [IGNORE_INDEX, IGNORE_INDEX, 20, 21, eos])
    # sample 2: prompt down to BOS, then the response is cut from the right (no EOS: the text goes on)
    assert samples[1] == ([bos, 20, 21, 22, 23], [IGNORE_INDEX, 20, 21, 22, 23])
    assert (stats.truncated_prompt, stats.truncated_response, stats.kept) == (2, 1, 2)
    # a sample that cannot keep any supervised token is dropped and counted
    _, stats = build_samples([([bos, 5], [6])], max_len=1, eos_id=eos, bos_id=bos)
    assert (stats.kept, stats.dropped_no_supervised) == (0, 1)


def test_best_fit_packing_is_tight_and_complete():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(5, 0.9, size=2000), 8, 1024)]
    bins = pack_best_fit(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (len(bins) * 1024) > 0.97
    arrays = to_arrays([([3] * n, [3] * n) for n in lengths[:50]], 1024, pad_id=0, packing=True)
    assert arrays["input_ids"].shape[1] == 1024 and arrays["input_ids"].dtype == np.int32


def test_batches_are_always_full_and_resumable():
    n, g = 10, 4
    steps = [batch_indices(s, g, n, seed=3) for s in range(6)]
    assert all(len(b) == g for b in steps)
    stream = np.concatenate(steps)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert np.array_equal(batch_indices(4, g, n, seed=3), steps[4])  # any step, no replay needed
    assert not np.array_equal(stream[:10], stream[10:20])  # each epoch reshuffles


# -- bad input: one line, non-zero exit, nothing written --------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset.input_template={instruction} {contxt}"],
            "dataset.input_template: placeholder {contxt} needs column 'contxt', which the dataset does not have "
            "(columns: instruction, context, response, category)",
        ),
        (
            ["dataset.test_ratio=0.001", "dataset.train_ratio=0.899"],
            "the test split of 480 rows would be empty",
        ),
        (["dataset.train_ratio=0.5"], "train_ratio + validation_ratio + test_ratio must be 1"),
        (
            ["model.tokenizer=/nonexistent/tokenizer"],
            "model.tokenizer: cannot load a tokenizer from '/nonexistent/tokenizer'",
        ),
        (
            ["dataset.max_seq_length=16"],
            "dataset.max_seq_length: 16 tokens cannot hold any train sample whole (the shortest needs",
        ),
        (["dataset.files=[/nonexistent/data.jsonl]"], "dataset.files: /nonexistent/data.jsonl not found"),
        (["dataset.field_mapping={instruction: nope}"], "placeholder {instruction} needs column 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_config, capsys, overrides, message):
    config = run_config()
    code = cli.main(["tokenize", "--config", str(config), *overrides])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.count("\n") == 1, err
    root = Path(load_config(config).run.root)
    assert not (root / "tokenize").exists()
    assert not list(root.glob("tokenize.staging-*"))


def test_converter(run_config, tmp_path, monkeypatch):
    module = tmp_path / "my_converter.py"
    module.write_text(
        "def convert(row):\n"
        "    if row['category'] == 'sort':\n"
        "        raise ValueError('skip')\n"
        "    return {'input': row['instruction'].upper() + ' ' + row['context'], 'output': row['response']}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _cfg, result, out = tokenize(run_config, dataset={"converter": "my_converter:convert"})
    rows = TokenizeFigures.of(result.manifest).rows
    assert rows.dropped_converter == 60 and rows.formatted == 420
    first = json.loads(out.text("train").read_text().splitlines()[0])
    assert first["input"].split(" ")[0].isupper()
    assert any(e["name"] == "converter_source" for e in result.manifest["external_inputs"])


def test_missing_pad_token_gets_a_distinct_one(run_config, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token  # the classic mistake in the samples
    no_pad = tmp_path / "tok-pad-is-eos"
    tok.save_pretrained(no_pad)
    _, result, out = tokenize(run_config, model={"tokenizer": str(no_pad)})
    pad = TokenizeFigures.of(result.manifest).pad_token
    assert pad.original_pad_token == "</s>"
    assert (pad.pad_token, pad.how) == ("<pad>", "existing pad-like token")
    assert out.info["pad_token_id"] != out.info["eos_token_id"]
    assert AutoTokenizer.from_pretrained(out.tokenizer_dir).pad_token == "<pad>"


def _tokenizer_with(special: list[str], pad: str | None, eos: str = "</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*special, "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)


@pytest.mark.parametrize(
    ("special", "pad", "chosen", "how"),
    [
        (["</s>", "<pad>"], "<pad>", "<pad>", "tokenizer"),
        (
            ["</s>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>"],
            "</s>",
            "<|finetune_right_pad_id|>",
            "existing pad-like token",
        ),
        (
            ["</s>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"],
            None,
            "<|reserved_special_token_1|>",
            "reserved special token",
        ),
        (["</s>"], "</s>", "<|pad|>", "added"),
    ],
)
def test_pad_token_choice(run_config, special, pad, chosen, how):
    from trnft.common.tokenize import ensure_pad_token

    tok = _tokenizer_with(special, pad)
    record = ensure_pad_token(tok, load_config(run_config()))
    assert (record.pad_token, record.how) == (chosen, how)
    assert tok.pad_token == chosen and tok.pad_token_id != tok.eos_token_id


def test_explicit_pad_token_must_exist_and_differ_from_eos(run_config):
    from trnft.common.errors import TrnftError
    from trnft.common.tokenize import ensure_pad_token

    with pytest.raises(
        TrnftError, match=r"dataset\.pad_token: '<nope>' is not in the tokenizer's vocabulary"
    ):
        ensure_pad_token(
            _tokenizer_with(["</s>"], None), load_config(run_config(), ["dataset.pad_token=<nope>"])
        )
    with pytest.raises(TrnftError, match="is the EOS token"):
        ensure_pad_token(
            _tokenizer_with(["</s>"], None), load_config(run_config(), ["dataset.pad_token=</s>"])
        )


def test_a_full_disk_while_writing_the_arrays_is_one_line_naming_the_file(run_config, monkeypatch, capsys):
    """numpy's save on a full volume raises `OSError: 15104 requested and 9184 written` (no errno, no file):
    one line with the array's path and what to do, exit 1, no staging folder left."""
    cfg_path = run_config()
    real_save = np.save

    def short_write(path, array, *args, **kwargs):
        if str(path).endswith("labels.npy"):
            raise OSError("15104 requested and 9184 written")
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", short_write)
    assert cli.main(["tokenize", "--config", str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels.npy: no space left on the device" in err[0], err
    root = load_config(cfg_path).root
    assert not list(root.glob("tokenize*staging*")) and not (root / "tokenize" / "manifest.json").exists()
