from .._limits import placeholder_getattr as _placeholder_getattr
from . import model_utils  # noqa: F401

__getattr__ = _placeholder_getattr(__name__)
