from .._limits import placeholder_getattr as _placeholder_getattr
from . import grads, layers, mappings, parallel_state, utils  # noqa: F401
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear  # noqa: F401

__getattr__ = _placeholder_getattr(__name__)
