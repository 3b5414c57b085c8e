from .._limits import placeholder_getattr as _placeholder_getattr
from . import checkpoint  # noqa: F401
from .checkpoint import save_checkpoint  # noqa: F401

__getattr__ = _placeholder_getattr(__name__)
