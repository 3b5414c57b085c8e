import os

from neuronx_distributed._limits import placeholder_getattr as _placeholder_getattr


def get_platform_target() -> str:
    """trn1, or what ``NEURON_PLATFORM_TARGET_OVERRIDE`` says (torch-neuronx reads the same variable)."""
    return os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")


__getattr__ = _placeholder_getattr(__name__)
