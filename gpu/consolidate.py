"""Consolidate stage of the gpu platform: the FSDP2 trainer's sharded checkpoints to PEFT / HF safetensors
(:mod:`trnft.common.fsdp.consolidate`, shared with neuron-native)."""

from ..common.fsdp.consolidate import run, standalone

__all__ = ["run", "standalone"]
