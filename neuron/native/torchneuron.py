"""What trnft relies on from TorchNeuron (torch-neuronx 2.13/2.14, native PyTorch on Neuron), with the AWS
documentation page each name comes from. ``tests/neuron/test_torchneuron_contract.py`` pins every value.

TorchNeuron is in public beta from Neuron SDK 2.33 (2026-10-19) and is the training path AWS points to from
SDK 2.34 (2026-11-30); PyTorch/XLA training is unsupported from SDK 2.30 (2026-05-20). It runs on Trainium 2
and Trainium 3 only.
"""

from __future__ import annotations

DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest"

# The tensor device: `.to("neuron")`, registered through PyTorch's PrivateUse1 mechanism.
DEVICE_TYPE = "neuron"
DEVICE_SOURCE = f"{DOCS}/torch/index.html"

# The torch.distributed backend: dist.init_process_group(backend="neuron"), workers started by torchrun.
PROCESS_GROUP_BACKEND = "neuron"
PROCESS_GROUP_SOURCE = f"{DOCS}/torch/guides/torch-distributed.html"
# That guide's example creates the group with neither a device selected before it nor `device_id`; the
# backend asserts the Neuron runtime is not initialised when the group is created.
PROCESS_GROUP_TAKES_DEVICE_ID = False

# torch.compile(..., backend="neuron"): TorchDynamo -> StableHLO -> neuronx-cc -> NEFF, compiled just in time
# per graph and shape.
COMPILE_BACKEND = "neuron"
COMPILE_SOURCE = f"{DOCS}/torch/compile/index.html"

# The persistent NEFF cache (compiled graphs reused across runs and instances; eager mode and torch.compile
# both write it). Files are `<hash>.neff` below two levels of sharded folders.
NEFF_CACHE_ENV = "TORCH_NEURONX_NEFF_CACHE_DIR"
NEFF_SUFFIX = ".neff"
CACHE_SOURCES = (f"{DOCS}/torch/reference/env-vars.html", f"{DOCS}/compiler/about-compiler-artifacts.html")

# The package: still named torch-neuronx, its version family follows the PyTorch version
# ("install torch-neuronx==2.14.* with PyTorch 2.14"); Python 3.12+.
PACKAGE = "torch-neuronx"
TORCH_FAMILIES = {"2.13": "2.13.3", "2.14": "2.14.3"}
MIN_PYTHON = (3, 12)
PACKAGE_SOURCE = f"{DOCS}/release-notes/components/torchneuron.html"

# Instances it supports (neuronx-cc --target names of the instance table).
TARGETS = ("trn2", "trn3")
TARGETS_SOURCE = f"{DOCS}/torch/about-pytorch-neuron.html"
