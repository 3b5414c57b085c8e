"""Train stage of neuron-native: the FSDP2 trainer on Lightning with the Neuron accelerator (device and
process-group backend ``neuron``), or on the CPU over gloo where this machine has no Neuron device.

On Neuron the graphs the run compiles land in the persistent NEFF cache (``TORCH_NEURONX_NEFF_CACHE_DIR``,
``neuron.cache_dir`` on the shared volume, filled by the compile stage); graphs compiled after the first
step are counted and handled as ``train.on_recompile`` says.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ...common.config.run_config import RunConfig
from ...common.fsdp import trainer
from ...common.pipeline.stages import StageResult
from .. import launch
from . import preflight, torchneuron
from .device import NEURON, NeffCacheWatch, cache_dir_of, device_platform


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    platform = device_platform()
    counter = None
    if platform is NEURON:
        preflight.require()
        # The pods set it (launch env); a run started by hand gets the same cache as the compile stage.
        os.environ.setdefault(torchneuron.NEFF_CACHE_ENV, launch.cache_dir(cfg))
        counter = NeffCacheWatch(cache_dir_of())

    return trainer.run(cfg, platform, force=force, log=log, graph_counter=counter)
