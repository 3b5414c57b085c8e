"""Tensor-parallel communication at tensor-parallel size 1: every region is the identity."""

from .._limits import placeholder_getattr as _placeholder_getattr


def reduce_from_tensor_model_parallel_region(x, *args, **kwargs):
    return x


def gather_from_tensor_model_parallel_region(x, *args, **kwargs):
    return x


def scatter_to_tensor_model_parallel_region(x, *args, **kwargs):
    return x


def copy_to_tensor_model_parallel_region(x, *args, **kwargs):
    return x


def gather_from_sequence_parallel_region(x, *args, **kwargs):
    return x


def scatter_to_sequence_parallel_region(x, *args, **kwargs):
    return x


def reduce_scatter_to_sequence_parallel_region(x, *args, **kwargs):
    return x


__getattr__ = _placeholder_getattr(__name__)
