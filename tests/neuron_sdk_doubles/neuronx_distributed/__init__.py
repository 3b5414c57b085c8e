"""Test double of neuronx-distributed 0.15 (tensor and data parallel; pipeline-parallel size 1); see ../README.md."""

import xla_multiprocess_cpu as _xla_multiprocess_cpu

from . import _limits
from ._limits import placeholder_getattr as _placeholder_getattr

_limits.install()
if _xla_multiprocess_cpu.wanted():
    # Two or more torchrun processes on torch-xla's CPU device: collectives over gloo (see that module).
    _xla_multiprocess_cpu.install()

from . import kernels, modules, optimizer, parallel_layers, pipeline, trainer, utils  # noqa: E402, F401

__version__ = "0.15.22404+double"


__getattr__ = _placeholder_getattr(__name__)
