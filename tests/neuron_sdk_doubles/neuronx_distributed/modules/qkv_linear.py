"""NxD's GQA QKV layer: optimum-neuron only builds it when kv heads < tp or kv heads % tp != 0, never at tp=1."""

from torch import nn

from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported


class GQAQKVColumnParallelLinear(nn.Module):
    def __init__(self, *args, **kwargs):
        raise unsupported("GQAQKVColumnParallelLinear")


__getattr__ = _placeholder_getattr(__name__)
