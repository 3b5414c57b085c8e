"""NxD pipeline parallelism: only the names optimum-neuron imports; pipeline_parallel_size must be 1."""

from .._limits import placeholder_getattr as _placeholder_getattr
from . import model, partition, trace  # noqa: F401
from .model import NxDPPModel  # noqa: F401

__getattr__ = _placeholder_getattr(__name__)
