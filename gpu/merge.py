"""Merge stage entry of the gpu path: the shared streaming merge (:mod:`trnft.common.merge`)."""

from trnft.common.merge import run, standalone

__all__ = ["run", "standalone"]
