from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported
from .trace import trace_model  # noqa: F401  (optimum-neuron replaces this attribute)


class NxDPPModel:
    def __init__(self, *args, **kwargs):
        raise unsupported("NxDPPModel (pipeline parallelism)")


__getattr__ = _placeholder_getattr(__name__)
