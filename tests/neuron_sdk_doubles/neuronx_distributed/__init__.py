"""Test double of neuronx-distributed 0.15 (tensor- and pipeline-parallel size 1 only); see ../README.md."""

from . import _limits
from ._limits import placeholder_getattr as _placeholder_getattr

_limits.install()

from . import kernels, modules, optimizer, parallel_layers, pipeline, trainer, utils  # noqa: E402, F401

__version__ = "0.15.22404+double"


__getattr__ = _placeholder_getattr(__name__)
