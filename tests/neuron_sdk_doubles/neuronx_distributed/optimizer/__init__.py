from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported


class NeuronZero1Optimizer:
    def __init__(self, *args, **kwargs):
        raise unsupported("NeuronZero1Optimizer (ZeRO-1)")


__getattr__ = _placeholder_getattr(__name__)
