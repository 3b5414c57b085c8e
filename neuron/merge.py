"""Merge stage entry of the neuron path: the shared streaming merge (:mod:`trnft.common.merge`)."""

from trnft.common.merge import run, standalone

__all__ = ["run", "standalone"]
