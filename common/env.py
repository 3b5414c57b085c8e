"""Process environment defaults that must be set before torch_xla or transformers are imported."""

from __future__ import annotations

import glob
import os


def has_neuron_device() -> bool:
    """True on a Trainium/Inferentia host (the Neuron driver exposes /dev/neuron*)."""
    return bool(glob.glob("/dev/neuron[0-9]*"))


def set_process_defaults() -> None:
    """Default the XLA runtime to the CPU device off Neuron hosts and quiet tokenizer fork warnings.

    transformers imports torch_xla when it is installed, and torch_xla picks its PJRT device at first use,
    so this must run before either is imported. Values already in the environment win.
    """
    if not has_neuron_device():
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
