"""Consolidate stage of neuron-native: its checkpoints are the FSDP2 trainer's, consolidated by the same
code as the gpu platform's (:mod:`trnft.common.fsdp.consolidate`)."""

from ...common.fsdp.consolidate import run, standalone

__all__ = ["run", "standalone"]
