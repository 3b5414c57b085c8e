"""`trnft smoke` end to end, as a user runs it: every stage in its own process, both platforms (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trnft.common.evaluate import EvaluateFigures
from trnft.common.fsdp.trainer import ShardedTrainFigures
from trnft.neuron.train import XlaTrainFigures

pytestmark = pytest.mark.slow


TRN1 = pytest.param("neuron", marks=pytest.mark.trn1)  # the XLA path: the trn1 line's environment
# neuron-native trains with the gpu platform's FSDP2 trainer on the CPU, so its smoke repeats the gpu one's
# numbers; CI runs every neuron-native stage in tests/gpu/test_families.py (two families, tp 1 and 2) and its
# two-rank resume and compile in tests/neuron/test_native.py, and this before a release (extended).
NATIVE = pytest.param("neuron-native", marks=pytest.mark.extended)


@pytest.mark.parametrize("platform", [TRN1, "gpu", NATIVE])
def test_smoke_runs_every_stage_and_the_tuned_model_beats_its_base(tmp_path, platform):
    root = tmp_path / f"smoke-{platform}"
    cmd = [sys.executable, "-m", "trnft.common.cli", "smoke", "--root", str(root), "--platform", platform]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("tokenize", "compile", "train", "consolidate", "merge", "evaluate"):
        manifest = json.loads((root / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["platform"] == platform
    assert "not built yet" not in proc.stdout
    figures = XlaTrainFigures if platform == "neuron" else ShardedTrainFigures
    train = figures.of(json.loads((root / "train" / "manifest.json").read_text()))
    assert train.final_loss < 1.0 < train.first_loss
    metrics = EvaluateFigures.of(json.loads((root / "evaluate" / "manifest.json").read_text()))
    tuned, base = metrics.scores, metrics.base
    print(
        platform, "tuned", tuned.bertscore.f1, tuned.exact_match, "base", base.bertscore.f1, base.exact_match
    )
    assert tuned.bertscore.f1 > base.bertscore.f1 + 0.05
    assert tuned.exact_match > base.exact_match
    assert metrics.identical_to_base is False
    assert tuned.hit_max_new_tokens < tuned.samples  # it learned to stop (EOS)
    # a second run skips every stage
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already complete") == 6, again.stdout[-2000:]


# The chat smoke of the XLA path is extended (beyond CI's budget): the gpu one runs the same conversations.
@pytest.mark.parametrize(
    "platform", [pytest.param("neuron", marks=[pytest.mark.trn1, pytest.mark.extended]), "gpu"]
)
def test_smoke_on_conversations_trains_on_assistant_turns_and_evaluates_chat_prompts(tmp_path, platform):
    """`trnft smoke --chat`: the bundled conversations (1 to 3 turns, some with a system prompt) rendered with
    the tiny tokenizer's chat template, loss on assistant turns only; evaluate prompts with the template's
    generation prompt and scores the last reply."""
    root = tmp_path / f"chat-{platform}"
    cmd = [
        sys.executable,
        "-m",
        "trnft.common.cli",
        "smoke",
        "--chat",
        "--root",
        str(root),
        "--platform",
        platform,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((root / "tokenize" / "tokenize_info.json").read_text())
    assert info["chat"] is True
    figures = XlaTrainFigures if platform == "neuron" else ShardedTrainFigures
    train = figures.of(json.loads((root / "train" / "manifest.json").read_text()))
    assert train.final_loss < train.first_loss
    metrics = EvaluateFigures.of(json.loads((root / "evaluate" / "manifest.json").read_text()))
    assert metrics.scores.bertscore.f1 > metrics.base.bertscore.f1
