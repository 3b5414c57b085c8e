"""The stages whose implementation depends on the platform (``by_platform``): each backend package has a
``compile``, ``train`` and ``consolidate`` module with the ``run`` its platform uses; these specs are
what the three share (what they read, which keys decide their output, how they are deployed)."""

from __future__ import annotations

from ..config.run_config import RunConfig, changes_output, to_dict
from . import backend, inputs
from .registry import StageSpec


def _output_keys(cfg: RunConfig, section: str, *, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``section``'s keys that can change a stage's output: all but the schema's ``runtime_only`` ones
    (:func:`trnft.common.config.run_config.changes_output`), so a key declares it in one place."""
    values = getattr(cfg, section)
    return tuple(
        f"{section}.{k}" for k in to_dict(values) if k not in leave_out and changes_output(values, k)
    )


def train_keys(cfg: RunConfig) -> tuple[str, ...]:
    """Config keys that decide what training produces: model, LoRA, train, parallelism and the trainer's
    section (``fsdp`` or ``neuron``)."""
    train = _output_keys(cfg, "train", leave_out=("compile_steps",))
    parallel = _output_keys(cfg, "parallel")
    return ("model", "lora", *train, *parallel, *_output_keys(cfg, backend.of(cfg).config_section))


# Accelerator stages run as distributed jobs; gpu's compile is a no-op and stays a plain Job.
_DISTRIBUTED = "pytorchjob.yaml.j2"

COMPILE = StageSpec(
    name="compile",
    help="Warm the compile cache: neuron_parallel_compile on Trainium, the XLA cache on CPU, a no-op on GPU.",
    needs=lambda cfg: ("tokenize",),
    config_keys=lambda cfg: (*train_keys(cfg), "train.compile_steps"),
    by_platform=True,
    templates={"neuron": _DISTRIBUTED, "neuron-native": _DISTRIBUTED},
    wait_timeout="12h",
)
TRAIN = StageSpec(
    name="train",
    help="Train LoRA or the full model, resuming from the newest complete checkpoint.",
    needs=lambda cfg: ("tokenize",),
    config_keys=train_keys,
    in_place=True,
    redo_on_change=False,
    inputs=inputs.base_model_inputs,
    by_platform=True,
    templates={"neuron": _DISTRIBUTED, "neuron-native": _DISTRIBUTED, "gpu": _DISTRIBUTED},
    wait_timeout="3d",
)
CONSOLIDATE = StageSpec(
    name="consolidate",
    help="Turn the newest complete checkpoint into a PEFT adapter or HF safetensors model.",
    needs=lambda cfg: ("train",),
    config_keys=lambda cfg: ("model.platform", "lora.enabled"),
    by_platform=True,
    offline=True,
)
