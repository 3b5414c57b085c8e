from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported


def analyze_shared_weights_across_stages(*args, **kwargs):
    raise unsupported("analyze_shared_weights_across_stages")


__getattr__ = _placeholder_getattr(__name__)
