"""Process environment defaults that must be set before torch_xla or transformers are imported."""

from __future__ import annotations

import glob
import os
import sys


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
    # transformers 5 draws a "Loading weights" progress bar on stderr for every from_pretrained; a stage's
    # stderr is for its one-line errors (and a pod log is not a terminal). It reads this at import time.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torch 2.8 (the trn1 line) starts inductor's compile-worker pool when torch._inductor.async_compile is
    # imported, which transformers' masking_utils does through torch._dynamo: a ~630 MB process and its
    # workers in every stage and rank, though nothing is compiled. Off, the pool starts when something
    # compiles (torch 2.14 already waits for that).
    os.environ.setdefault("TORCH_WARM_POOL", "0")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()  # imported before we ran
