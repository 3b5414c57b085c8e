"""Upstream behaviour the Trainium adapter relies on that the CPU rehearsal cannot execute.

The rehearsal (test_trainium_adapter.py) runs optimum-neuron 0.4.5's trainer at tensor-parallel size 1.
What only happens on a Neuron device or at tp > 1 is pinned here against the installed optimum-neuron source
(upstream file and function named in each test), so an upgrade that changes it fails loudly.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import re
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.trn1  # the trn1 line (tests/trn1_line.sh)


def _source(module: str, qualname: str) -> ast.AST:
    """The AST of a function or class in an optimum-neuron module, read without importing the module.

    (Importing most of them needs neuronx-distributed, which is not on PyPI.)
    """
    package = Path(importlib.util.find_spec("optimum.neuron").origin).parent
    relative = module.removeprefix("optimum.neuron.").replace(".", "/") + ".py"
    with warnings.catch_warnings():  # upstream strings with escapes like '\\w' warn when parsed
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse((package / relative).read_text())
    node: ast.AST = tree
    for part in qualname.split("."):
        node = next(
            n
            for n in ast.iter_child_nodes(node)
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.name == part
        )
    return node


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Call)
        and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)
    ]


def test_optimum_neuron_is_the_pinned_release():
    assert importlib.import_module("optimum.neuron.version").__version__ == "0.4.5"


def test_neuron_trainer_train_returns_nothing():
    """optimum/neuron/trainers/transformers.py NeuronTrainer._train: no value is returned (so train() -> None).

    trnft reads losses from ``trainer.state.log_history`` instead of ``train().training_loss``.
    """
    body = _source("optimum.neuron.trainers.transformers", "NeuronTrainer._train")
    returns = [n for n in ast.walk(body) if isinstance(n, ast.Return) and n.value is not None]
    assert returns == []


def test_neuron_trainer_refuses_resume_from_checkpoint():
    """NeuronTrainer._train raises on resume_from_checkpoint: trnft resumes by itself (weights, moments, step)."""
    body = _source("optimum.neuron.trainers.transformers", "NeuronTrainer._train")
    text = ast.unparse(body)
    assert "`resume_from_checkpoint` is not supported by the NeuronTrainer." in text


def test_peft_save_never_writes_optimizer_state():
    """optimum/neuron/peft/peft_model.py NeuronPeftModel.save_pretrained: NxD save_checkpoint gets no optimizer.

    Under model parallelism NeuronTrainer.save_model passes ``optimizer=`` to save_pretrained, where it lands in
    **kwargs and is dropped; trnft therefore writes every rank's moments to ``trnft_state/`` itself.
    """
    body = _source("optimum.neuron.peft.peft_model", "NeuronPeftModel.save_pretrained")
    saves = _calls(body, "save_checkpoint")
    assert len(saves) == 1
    assert "optimizer" not in {k.arg for k in saves[0].keywords}
    save_model = _source("optimum.neuron.trainers.transformers", "NeuronTrainer.save_model")
    assert any("optimizer" in {k.arg for k in c.keywords} for c in _calls(save_model, "save_pretrained"))


def test_the_accelerator_keeps_a_distributed_sampler():
    """optimum/neuron/accelerate/accelerator.py NeuronAccelerator._prepare_data_loader_for_distributed.

    A DataLoader whose sampler already is a DistributedSampler is returned unchanged; any other sampler is
    replaced by a shuffling DistributedSampler (which would break trnft's batch order).
    """
    body = _source(
        "optimum.neuron.accelerate.accelerator", "NeuronAccelerator._prepare_data_loader_for_distributed"
    )
    first = body.body[0]
    assert isinstance(first, ast.If)
    assert ast.unparse(first.test) == "isinstance(data_loader.sampler, DistributedSampler)"
    assert ast.unparse(first.body[0]) == "return data_loader"


def test_flash_attention_ignores_the_attention_mask():
    """optimum/neuron/models/training/masking_utils.py create_causal_mask returns None for flash_attention_2.

    So packed samples cannot be kept apart with flash attention on Trainium: trnft refuses packing there.
    """
    body = _source("optimum.neuron.models.training.masking_utils", "create_causal_mask")
    flash = next(
        n for n in ast.walk(body) if isinstance(n, ast.If) and "flash_attention_2" in ast.unparse(n.test)
    )
    assert isinstance(flash.body[-1], ast.Return) and ast.unparse(flash.body[-1]) == "return None"


def test_a_4d_mask_passes_through_unchanged():
    """masking_utils._compute_causal_mask: a 4-D attention_mask is used as given (neuron.attention=eager)."""
    body = _source("optimum.neuron.models.training.masking_utils", "_compute_causal_mask")
    text = ast.unparse(body)
    assert "attention_mask.dim() == 4" in text and "causal_mask = attention_mask" in text


def test_the_loss_is_divided_by_num_items_in_batch():
    """NeuronTrainer.compute_loss: with num_items_in_batch the model sums and the trainer divides by it.

    trnft's get_batch_samples override supplies the global batch's supervised tokens / dp there.
    """
    body = _source("optimum.neuron.trainers.transformers", "NeuronTrainer.compute_loss")
    text = ast.unparse(body)
    assert "inputs = dict(**inputs, reduction='sum')" in text
    assert "loss = loss / num_items_in_batch" in text


def test_every_argument_trnft_passes_exists():
    """optimum/neuron/trainers/training_args.py NeuronTrainingArguments has a field for each argument trnft sets."""
    body = _source("optimum.neuron.trainers.training_args", "NeuronTrainingArguments")
    fields = {n.target.id for n in body.body if isinstance(n, ast.AnnAssign)}
    from transformers import TrainingArguments

    fields |= {f.name for f in dataclasses.fields(TrainingArguments)}
    passed = {
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "kv_size_multiplier",
        "fuse_qkv",
        "use_xser",
        "recompute_causal_mask",
        "zero_1",
        "skip_cache_push",
        "save_strategy",
        "save_total_limit",
        "logging_steps",
        "disable_tqdm",
    }
    assert passed - fields == set()


def test_trn_config_receives_the_parallel_settings():
    """NeuronTrainingArguments.__post_init__ builds TrainingNeuronConfig from the arguments trnft sets."""
    body = _source("optimum.neuron.trainers.training_args", "NeuronTrainingArguments.__post_init__")
    call = next(c for c in _calls(body, "TrainingNeuronConfig"))
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    for name in (
        "kv_size_multiplier",
        "pipeline_parallel_size",
        "use_xser",
        "fuse_qkv",
        "recompute_causal_mask",
    ):
        assert keywords[name] == f"self.{name}"


def test_the_compile_cache_path_is_parsed_from_neuron_cc_flags():
    """optimum/neuron/utils/cache_utils.py get_neuron_cache_path: --cache_dir=([\\w/-]+), so no '.' (launch.cache_dir)."""
    body = _source("optimum.neuron.utils.cache_utils", "get_neuron_cache_path")
    patterns = [n.value for n in ast.walk(body) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert "--cache_dir=([\\w\\/-]+)" in patterns


def test_precompilation_is_detected_from_neuron_extract_graphs_only():
    """optimum/neuron/utils/misc.py is_precompilation: NEURON_EXTRACT_GRAPHS_ONLY == '1' (trnft's rule too)."""
    body = _source("optimum.neuron.utils.misc", "is_precompilation")
    assert "NEURON_EXTRACT_GRAPHS_ONLY" in ast.unparse(body)


def test_the_trn1_families_are_optimum_neurons_training_models():
    """optimum/neuron/models/training/auto_models.py (0.4.5) registers text-generation models for exactly
    the families trnft lets the trn1 line train."""
    from pathlib import Path

    from trnft.common.training.families import TRN1_FAMILIES

    # read, not imported: importing it needs neuronx-distributed (AWS's index only)
    package = Path(importlib.util.find_spec("optimum.neuron").submodule_search_locations[0])
    source = (package / "models" / "training" / "auto_models.py").read_text()
    registered = re.findall(r'register_neuron_model_for_training\("(\w+)", "text-generation"\)', source)
    assert sorted(registered) == sorted(TRN1_FAMILIES)
