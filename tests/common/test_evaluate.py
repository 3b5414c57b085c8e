"""Evaluate stage: offline end to end on the tiny model, reproducible, fine-tuned beats base, no-op flagged."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from helpers import complete_by_hand, ok, smoke_raw, write_config

from trnft.common import cli
from trnft.common.evaluate import (
    METRICS,
    EvaluateFigures,
    normalise,
    strip_header,
    template_header,
    vllm_lora_rank,
)

pytestmark = pytest.mark.both_lines  # generation and scoring run on either line's transformers

EVAL = {"max_samples": 16, "batch_size": 8, "max_new_tokens": 12}


def read_metrics(stage_dir) -> EvaluateFigures:
    return EvaluateFigures.from_json(json.loads((stage_dir / METRICS).read_text()))


@pytest.mark.parametrize(
    "template, header",
    [
        ("{response}", ""),
        ("### Response:\n{output}", "### Response:\n"),
        ("{{x}} {a}", "{x} "),
        ("fixed", ""),
    ],
)
def test_template_header(template, header):
    assert template_header(template) == header


def test_references_and_predictions_lose_the_header_only_when_present():
    assert strip_header("### Response:\nfoo", "### Response:\n") == "foo"
    assert strip_header("foo", "### Response:\n") == "foo"
    assert normalise("  a \n b ") == "a b"


def test_vllm_lora_rank_comes_from_the_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12, "rank_pattern": {"q_proj": 4}}))
    assert vllm_lora_rank(tmp_path) == 16


def _evaluate_base_as_merged(run, tiny_llama):
    """Evaluate with the base model standing in for the merged model (no training needed): train,
    consolidate and merge are put in place by hand, so evaluate's upstream checks pass."""
    from trnft.common.config.run_config import load_config

    cfg = load_config(run.config)
    for stage in ("train", "consolidate"):
        complete_by_hand(cfg, stage)
    shutil.copytree(tiny_llama, run.root / "merge")
    complete_by_hand(cfg, "merge")


def test_evaluate_runs_offline_and_is_reproducible(make_run, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_run(eval=EVAL)
    _evaluate_base_as_merged(run, tiny_llama)
    assert cli.main(["evaluate", "--config", str(run.config)]) == 0
    out = run.root / "evaluate"
    metrics = read_metrics(out)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics.scores.samples == len(rows) == 16
    assert 0.0 <= metrics.scores.exact_match <= 1.0
    for key in ("precision", "recall", "f1"):
        assert 0.0 < getattr(metrics.scores.bertscore, key) <= 1.0
        mean = sum(r["bertscore"][key] for r in rows) / len(rows)
        assert abs(mean - getattr(metrics.scores.bertscore, key)) < 1e-6
    assert metrics.scorer.num_layers == 6  # the MiniLM's last layer
    assert EvaluateFigures.of(run.manifest("evaluate")) == metrics
    test_rows = [json.loads(x) for x in (run.root / "tokenize" / "test.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [t["input"] for t in test_rows[:16]]
    assert [r["reference"] for r in rows] == [t["output"] for t in test_rows[:16]]
    # the merged model here is the base itself: flagged
    assert metrics.identical_to_base is True and metrics.changed_vs_base == 0
    manifest = run.manifest("evaluate")
    assert "IDENTICAL TO BASE" in manifest["summary"]
    assert cli.main(["evaluate", "--config", str(run.config), "--force"]) == 0
    again = read_metrics(out)
    for key in ("bertscore", "exact_match", "mean_words", "mean_new_tokens"):
        assert getattr(again.scores, key) == getattr(metrics.scores, key)


def test_an_unmerged_zero_adapter_is_evaluated_and_flagged(make_run, tiny_llama):
    """eval.use_adapter: base + the consolidate stage's adapter through PEFT; a zero adapter is a no-op."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trnft.common.config.run_config import load_config

    run = make_run(eval={**EVAL, "use_adapter": True, "max_samples": 8})
    cfg = load_config(run.config)
    complete_by_hand(cfg, "train")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj"])
    )
    model.save_pretrained(run.root / "consolidate")  # PEFT's default init: B = 0
    complete_by_hand(cfg, "consolidate")
    assert cli.main(["evaluate", "--config", str(run.config)]) == 0
    metrics = read_metrics(run.root / "evaluate")
    assert metrics.model.startswith("base ") and "adapter" in metrics.model
    assert metrics.identical_to_base is True


def test_a_bad_scorer_fails_before_generating(make_run, tiny_llama, tmp_path, capsys):
    run = make_run(eval={**EVAL, "scorer_model": str(tmp_path / "nowhere")})
    _evaluate_base_as_merged(run, tiny_llama)
    assert cli.main(["evaluate", "--config", str(run.config)]) != 0
    err = capsys.readouterr().err
    assert "eval.scorer_model" in err and err.strip().count("\n") == 0
    assert not (run.root / "evaluate").exists()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"eval": {**EVAL, "backend": "vllm"}}, "eval.backend: vllm needs CUDA and the vllm package"),
        (
            {"eval": {**EVAL, "use_adapter": True}, "lora": {"enabled": False}},
            "eval.use_adapter: full fine-tuning has no adapter",
        ),
        ({"eval": {**EVAL, "scorer_num_layers": 9}}, "eval.scorer_num_layers:"),
    ],
    ids=["vllm-on-cpu", "adapter-without-lora", "scorer-layers"],
)
def test_bad_eval_settings_are_one_line(make_run, tiny_llama, capsys, sections, message):
    from trnft.common.errors import ConfigError

    run = make_run(**sections)
    # Refused when the config is loaded, before any stage runs: the CLI must say the same.
    with contextlib.suppress(ConfigError):
        _evaluate_base_as_merged(run, tiny_llama)
    assert cli.main(["evaluate", "--config", str(run.config)]) != 0
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert not (run.root / "evaluate").exists()


def test_a_missing_test_split_names_the_setting(make_run, tiny_llama, capsys):
    from trnft.common.pipeline.rundir import RunDir

    run = make_run(eval=EVAL)
    # A tokenize output without a test split, as dataset.test_ratio=0 writes it (manifest included).
    rundir = RunDir(run.root)
    tokenize = rundir.stage_dir("tokenize")
    (tokenize / "test.jsonl").unlink()
    manifest = rundir.manifest("tokenize")
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "test.jsonl"]
    rundir.write_manifest(tokenize, manifest)
    _evaluate_base_as_merged(run, tiny_llama)
    assert cli.main(["evaluate", "--config", str(run.config)]) != 0
    assert "set dataset.test_ratio > 0 and rerun tokenize" in capsys.readouterr().err


# The smoke recipe run stage by stage: tests/e2e/test_smoke.py runs the same recipe through `trnft smoke` on
# every platform in the slow suite and asserts all of this there, so CI runs it once (extended here).
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.integration
@pytest.mark.trn1
def test_after_training_the_model_beats_its_base(tmp_path, tiny_llama):
    """The smoke recipe (300 LoRA steps, CPU-XLA): BERTScore F1 and exact match above the base model's."""
    from helpers import Run

    raw = smoke_raw(
        tmp_path / "run", tiny_llama, eval={"max_samples": 48, "batch_size": 16, "max_new_tokens": 16}
    )
    run = Run(tmp_path / "run", raw)
    write_config(run.config, raw)
    for stage in ("tokenize", "train", "consolidate", "merge", "evaluate"):
        ok(run.stage(stage, timeout=1200))
    metrics = read_metrics(run.root / "evaluate")
    tuned, base = metrics.scores, metrics.base
    print("tuned", tuned.bertscore, tuned.exact_match, "base", base.bertscore, base.exact_match)
    assert tuned.bertscore.f1 > base.bertscore.f1 + 0.05
    assert tuned.exact_match > base.exact_match
    assert metrics.identical_to_base is False
    assert tuned.hit_max_new_tokens < tuned.samples  # it learned to stop (EOS)


@pytest.mark.gpu
def test_vllm_agrees_with_transformers_on_greedy_answers(make_run, tiny_llama):
    """vLLM (merged model and base + adapter) against the transformers backend on the same prompts."""
    pytest.importorskip("vllm")
    answers = {}
    for backend, use_adapter in (("transformers", False), ("vllm", False), ("vllm", True)):
        run = make_run(
            platform="gpu",
            train={"max_steps": 60, "save_steps": 60},
            eval={**EVAL, "backend": backend, "use_adapter": use_adapter, "compare_base": False},
        )
        for stage in ("train", "consolidate", "merge", "evaluate"):
            ok(run.stage(stage))
        metrics = read_metrics(run.root / "evaluate")
        assert metrics.backend == backend
        rows = (run.root / "evaluate" / "predictions.jsonl").read_text().splitlines()
        answers[(backend, use_adapter)] = [json.loads(r)["prediction"] for r in rows]
        print(backend, use_adapter, "samples/s", metrics.scores.samples_per_second)
    reference = answers[("transformers", False)]
    for key in (("vllm", False), ("vllm", True)):
        same = sum(a == b for a, b in zip(answers[key], reference)) / len(reference)
        assert same >= 0.8, (key, same)


def test_a_generation_in_its_own_process_equals_one_in_this_process(tiny_llama, tokenized):
    """The isolation vLLM gets (one spawned process per model) returns exactly what this process makes."""
    from trnft.common.config.run_config import EvalSection
    from trnft.common.evaluate import GenerationJob, run_generation, run_generation_in_own_process

    prompts = [json.loads(x)["input"] for x in (tokenized / "test.jsonl").read_text().splitlines()[:4]]
    job = GenerationJob(
        backend="transformers",
        model_dir=str(tiny_llama),
        adapter_dir=None,
        tokenizer_dir=str(tokenized / "tokenizer"),
        prompts=prompts,
        settings=EvalSection(max_new_tokens=6, batch_size=2),
        trust_remote_code=False,
        device="cpu",
    )
    here = run_generation(job, lambda m: None)
    there = run_generation_in_own_process(job, lambda m: None)
    assert there.texts == here.texts and there.new_tokens == here.new_tokens and len(here.texts) == 4


def test_a_failed_generation_process_is_one_line(tmp_path, tokenized):
    from trnft.common.config.run_config import EvalSection
    from trnft.common.errors import TrnftError
    from trnft.common.evaluate import GenerationJob, run_generation_in_own_process

    job = GenerationJob("transformers", str(tmp_path / "absent"), None, str(tokenized / "tokenizer"), ["x"],
                        EvalSection(max_new_tokens=2), False, "cpu")  # fmt: skip
    with pytest.raises(
        TrnftError, match=r"evaluate: the transformers process generating with .*absent exited with code 1"
    ):
        run_generation_in_own_process(job, lambda m: None)


@pytest.mark.gpu
def test_compare_base_with_vllm_runs_each_engine_in_its_own_process(make_run):
    """vLLM on the merged model, then on the base: two engines, one after the other, on one GPU."""
    pytest.importorskip("vllm")
    run = make_run(
        platform="gpu",
        train={"max_steps": 60, "save_steps": 60},
        eval={**EVAL, "backend": "vllm", "compare_base": True, "gpu_memory_utilization": 0.8},
    )
    for stage in ("train", "consolidate", "merge", "evaluate"):
        ok(run.stage(stage))
    metrics = read_metrics(run.root / "evaluate")
    assert (
        metrics.backend == "vllm"
        and metrics.base is not None
        and metrics.base.samples == metrics.scores.samples
    )
    assert metrics.changed_vs_base is not None and metrics.changed_vs_base > 0
