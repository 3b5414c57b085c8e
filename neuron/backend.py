"""The Neuron platform: Trainium through optimum-neuron, or the same training on torch-xla's CPU device.

:data:`BACKEND` is what ``trnft.common.pipeline.backend`` hands to every caller. :func:`device` is the one place that
decides between Trainium and the CPU rehearsal of ``neuron.backend``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..common.cluster.instances import InstanceType, Layout
from ..common.config.run_config import RunConfig
from ..common.env import has_neuron_device
from ..common.errors import ConfigError, TrnftError
from ..common.pipeline import checkpoints
from ..common.pipeline.backend import StageModules
from . import launch

REHEARSAL_ENV = "TRNFT_TRAINIUM_REHEARSAL"
# NxD tag folders: where optimum-neuron's shards live inside a checkpoint.
_TAG_NAMES = ("shards", "adapter_shards")


def trainium_rehearsal() -> bool:
    """True when the Trainium backend runs on torch-xla's CPU device (``TRNFT_TRAINIUM_REHEARSAL=1``).

    Used by the tests: optimum-neuron's real trainer with test doubles of the Neuron-only packages, no
    device and no preflight. Never set it on a Trainium node.
    """
    return os.environ.get(REHEARSAL_ENV) == "1"


# The trn1 line this platform trains on (containers/constraints/trn1.txt): optimum-neuron 0.4.5's pins.
TRN1_LINE = "torch 2.8.0, torch-xla 2.8.1, transformers 4.57.1, optimum-neuron 0.4.5"


def require_trn1_line(stage: str) -> None:
    """Refuse compile and train of ``model.platform: neuron`` outside the trn1 line's environment.

    The current line (torch 2.14, transformers 5) has no torch-xla: the XLA path cannot run there, and
    the other stages of this platform (tokenize, consolidate, merge, evaluate) do not need it.
    """
    if importlib.util.find_spec("torch_xla") is not None:
        return
    import torch

    raise ConfigError(
        f"model.platform: neuron: the {stage} stage runs on the trn1 line ({TRN1_LINE}), and this "
        f"environment has torch {torch.__version__} without torch-xla; run it in the trn1 image "
        "(containers/Dockerfile.neuron) or the environment tests/trn1_line.sh builds, or train on "
        "model.platform: neuron-native (trn2/trn3) or gpu"
    )


def device(cfg: RunConfig) -> Literal["trainium", "cpu"]:
    """Where ``neuron.backend`` trains: ``trainium`` (optimum-neuron) or ``cpu`` (torch-xla's CPU device)."""
    choice = cfg.neuron.backend
    if choice == "auto":
        on_trainium = has_neuron_device() and importlib.util.find_spec("optimum") is not None
        return "trainium" if on_trainium and importlib.util.find_spec("optimum.neuron") is not None else "cpu"
    if choice == "trainium" and not has_neuron_device() and not trainium_rehearsal():
        raise TrnftError(
            "neuron.backend: trainium needs a Neuron device (/dev/neuron*); use neuron.backend=cpu here"
        )
    return choice


def preflight_or_fail() -> None:
    """The Neuron startup check before anything is compiled or trained (skipped in a rehearsal)."""
    if trainium_rehearsal():
        return
    from .preflight import run as preflight

    problems = preflight()
    if problems:
        raise TrnftError(f"Neuron preflight: {problems[0]}")


def check_settings(cfg: RunConfig) -> None:
    """What the trn1 path refuses before any stage runs (one line each, exit 2).

    - ``parallel.pp > 1``: optimum-neuron's pipeline inputs are exactly input_ids / attention_mask / labels
      while trnft's batches carry position_ids, it ignores ``num_items_in_batch`` and cannot resume from
      meta parameters; no pipeline run has executed end to end, so it is refused until one does.
    - LoRA targets that name part of a group optimum-neuron fuses (:mod:`trnft.neuron.fused_groups`).
    - ``neuron.fuse_qkv`` with LoRA on NxD's GQA QKV layer, whose backward fails on a frozen fused weight.
    - KV-head copies of more than one head on a trn2/trn3 target (NxD's copy groups there do not match the
      layout optimum-neuron loads).
    - On Trainium, a layout whose memory estimate exceeds a NeuronCore (:mod:`trnft.neuron.memory`).
    - A model family optimum-neuron 0.4.5 has no training model for (:mod:`trnft.common.training.families`).
    - ``train.eval_steps`` or ``train.early_stopping_patience``: no trainer of this platform validates.
    """
    from ..common.errors import ConfigError
    from ..common.training.families import check_trn1_family
    from . import fused_groups
    from .parallel_layout import model_layout

    check_trn1_family(cfg.model.name_or_path)
    # Neither trainer of this platform validates: NeuronTrainer has no evaluation loop and the CPU-XLA
    # rehearsal follows it; a validation cadence is refused rather than ignored.
    for key, value in (
        ("eval_steps", cfg.train.eval_steps),
        ("early_stopping_patience", cfg.train.early_stopping_patience),
    ):
        if value:
            raise ConfigError(
                f"train.{key}: {value} needs validation, which model.platform neuron does not run (optimum-"
                "neuron's NeuronTrainer has no evaluation loop, and the CPU-XLA rehearsal follows it); set it "
                "to 0 (the evaluate stage scores the trained model) or train on neuron-native or gpu"
            )
    if cfg.parallel.replicate is not None:
        raise ConfigError(
            f"parallel.replicate: {cfg.parallel.replicate} sets HSDP replica groups of the FSDP2 trainer, which "
            "model.platform neuron does not run (its data parallelism is NxD's); remove it"
        )
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"parallel.pp: {cfg.parallel.pp} (pipeline parallelism) has never run end to end on this path "
            "(optimum-neuron's pipeline takes only input_ids/attention_mask/labels, ignores the global token "
            "count and cannot resume); set parallel.pp=1 and use parallel.tp and data parallelism"
        )
    config = _model_config(cfg)
    layout = None if config is None else model_layout(cfg, config)
    if cfg.lora.enabled:
        fused_groups.check(cfg.lora.target_modules, layout)
    fused_groups.check_frozen_fused_gqa(layout, cfg.lora.enabled)
    fused_groups.check_kv_copies_on_target(layout, _target(cfg))
    on_trainium = cfg.neuron.backend == "trainium" or (cfg.neuron.backend == "auto" and has_neuron_device())
    if on_trainium and config is not None:
        from ..common.cluster.instances import instance
        from . import memory

        memory.check(cfg, config, instance(cfg.cluster.instance_type))


def _target(cfg: RunConfig) -> str | None:
    """The Neuron target of the training instance type (trn1, trn2, trn3), None for an unknown type."""
    from ..common.cluster.instances import instance

    try:
        return instance(cfg.cluster.instance_type).target
    except ConfigError:  # an unknown instance type is refused, with its own message, where it is used
        return None


def _model_config(cfg: RunConfig) -> Any:
    """The model's config when it can be read here (a local folder or the HF cache), else None: the
    train stage, which loads it, checks again."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            cfg.model.name_or_path,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            local_files_only=True,
        )
    except Exception:  # not available offline here
        return None


def _holds_nxd_shards(path: Path, depth: int = 3) -> bool:
    if path.name in _TAG_NAMES and (path / "model").is_dir():
        return True
    if depth == 0 or not path.is_dir():
        return False
    return bool(checkpoints.tag_dirs(path)) or any(
        _holds_nxd_shards(child, depth - 1) for child in path.iterdir() if child.is_dir()
    )


@dataclass(frozen=True)
class NeuronBackend(StageModules):
    platform: str = "neuron"
    config_section: str = "neuron"
    compiles_graphs: bool = True
    accelerator: str = "neuron"

    def check_config(self, cfg: RunConfig) -> None:
        check_settings(cfg)

    def model_parallel(self, cfg: RunConfig) -> tuple[int, int]:
        return cfg.parallel.tp, cfg.parallel.pp

    def launch_env(self, cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
        return launch.neuron_env(cfg, inst, layout)

    def shared_volume_paths(self, cfg: RunConfig) -> list[tuple[str, str]]:
        return [("neuron.cache_dir", launch.cache_dir(cfg))]

    def owns_checkpoint(self, path: Path) -> bool:
        return _holds_nxd_shards(Path(path))

    def consolidate_standalone(self, args: Any, log: Any) -> int:
        from .consolidate import standalone

        return standalone(args, log)


BACKEND = NeuronBackend(package=__package__)
