"""Test double of torch-neuronx 2.8 (Neuron SDK 2.26.1): what optimum-neuron's training path imports."""

from neuronx_distributed._limits import placeholder_getattr as _placeholder_getattr

from . import utils  # noqa: F401

__version__ = "2.8.0.2.10.16998+double"


class DataParallel:  # optimum-neuron only uses it in isinstance checks
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torch_neuronx test double: DataParallel")


__getattr__ = _placeholder_getattr(__name__)
