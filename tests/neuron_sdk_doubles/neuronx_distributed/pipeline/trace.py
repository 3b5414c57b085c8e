from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported


class NxDTracer:
    def __init__(self, *args, **kwargs):
        raise unsupported("NxDTracer")


class HFTracerWrapper(NxDTracer):
    pass


def trace_model(*args, **kwargs):
    raise unsupported("pipeline trace_model")


__getattr__ = _placeholder_getattr(__name__)
