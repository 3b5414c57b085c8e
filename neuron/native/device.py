"""The Neuron device for the FSDP2 trainer: a Lightning accelerator for device ``neuron``, the
:class:`~trnft.common.fsdp.platform.DevicePlatform` built on it, and the compile-cache counter.

:func:`device_platform` is the one place that picks Neuron or the CPU: Neuron when the driver exposes a
device (``/dev/neuron*``), the CPU (gloo) on a machine without one, so ``trnft smoke --platform
neuron-native`` runs on a laptop. A Neuron device without torch-neuronx is refused, never trained around.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry

from ...common.env import has_neuron_device
from ...common.errors import TrnftError
from ...common.fsdp.platform import CPU, DevicePlatform
from . import torchneuron


def runtime_present() -> bool:
    """True when this process can train on Neuron: a device and the torch-neuronx package."""
    return has_neuron_device() and importlib.util.find_spec("torch_neuronx") is not None


def _load_runtime() -> None:
    """Register the ``neuron`` device and distributed backend (PyTorch also autoloads it; importing makes
    the registration explicit and fails here, in one place, when the package is broken)."""
    importlib.import_module("torch_neuronx")


def _device_count() -> int:
    _load_runtime()
    return torch.accelerator.device_count()


class NeuronAccelerator(Accelerator):
    """Lightning's view of the NeuronCores of this node (logical cores, one process each)."""

    def setup_device(self, device: torch.device) -> None:
        """Select this rank's NeuronCore, but only once the process group exists.

        Lightning calls this first from ``Strategy.setup_environment``, before ``init_process_group``; the
        Neuron process group must be created before the runtime is initialised (AWS's torch.distributed
        guide), so that call does nothing and the strategy of :data:`NEURON` calls again after the group.
        """
        if device.type != torchneuron.DEVICE_TYPE:
            raise ValueError(
                f"NeuronAccelerator got device {device}, expected a {torchneuron.DEVICE_TYPE} device"
            )
        if not torch.distributed.is_initialized():
            return
        _load_runtime()
        if device.index is not None:
            torch.accelerator.set_device_index(device.index)

    def teardown(self) -> None:
        pass

    @staticmethod
    def parse_devices(devices: Any) -> int:
        if devices == "auto" or devices == -1:
            return NeuronAccelerator.auto_device_count()
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device(torchneuron.DEVICE_TYPE, i) for i in range(int(devices))]

    @staticmethod
    def auto_device_count() -> int:
        return _device_count() if runtime_present() else 0

    @staticmethod
    def is_available() -> bool:
        return runtime_present()

    @staticmethod
    def name() -> str:
        return torchneuron.DEVICE_TYPE

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return {}

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)


def register() -> None:
    """Make ``accelerator="neuron"`` known to Lightning (once)."""
    if torchneuron.DEVICE_TYPE not in AcceleratorRegistry:
        NeuronAccelerator.register_accelerators(AcceleratorRegistry)


def _neuron_accelerator() -> NeuronAccelerator:
    register()
    return NeuronAccelerator()


NEURON = DevicePlatform(
    name="neuron",
    device_type=torchneuron.DEVICE_TYPE,
    process_group_backend=torchneuron.PROCESS_GROUP_BACKEND,
    compile_backend=torchneuron.COMPILE_BACKEND,
    accelerator=_neuron_accelerator,
    count_devices=_device_count,
    device_of=lambda i: torch.device(torchneuron.DEVICE_TYPE, i),
    process_group_device_id=torchneuron.PROCESS_GROUP_TAKES_DEVICE_ID,
)


def device_platform() -> DevicePlatform:
    """Neuron on a machine with a Neuron device, the CPU on one without.

    Raises:
        TrnftError: a Neuron device without torch-neuronx (training would silently fall back to the CPU).
    """
    if not has_neuron_device():
        return CPU
    if importlib.util.find_spec("torch_neuronx") is None:
        raise TrnftError(
            "model.platform neuron-native: this node has a Neuron device but no torch-neuronx; run the "
            "neuron-native image (containers/Dockerfile.neuron-native) instead of training on the CPU"
        )
    return NEURON


def cache_dir_of(env: dict[str, str] | None = None) -> Path | None:
    """The persistent NEFF cache this process writes (``TORCH_NEURONX_NEFF_CACHE_DIR``), if set."""
    value = (os.environ if env is None else env).get(torchneuron.NEFF_CACHE_ENV)
    return Path(value) if value else None


def cached_graphs(cache_dir: Path | None) -> int:
    """Compiled graphs (NEFF files) in the cache folder; 0 when it does not exist yet (one full walk)."""
    if cache_dir is None or not cache_dir.is_dir():
        return 0
    return sum(1 for _ in cache_dir.rglob(f"*{torchneuron.NEFF_SUFFIX}"))


class NeffCacheWatch:
    """The NEFF files in a cache folder, counted without listing every file at every step.

    The train stage asks once per step (on rank 0; the trainer shares the answer). A file added to a folder
    changes that folder's modification time, so a call stats the folders and lists only the ones whose time
    changed since the last call: the first call walks the cache, later ones cost a ``stat`` per folder. The
    default cache is the run's own (``<run.root>/neuron_cache``); a ``neuron.cache_dir`` shared with another
    run that compiles at the same time counts that run's new graphs too.
    """

    def __init__(self, cache_dir: Path | None) -> None:
        self.root = cache_dir
        # folder -> (modification time in ns, NEFF files directly in it, its subfolders)
        self._folders: dict[str, tuple[int, int, tuple[str, ...]]] = {}
        self.listed = 0  # folders listed so far (what the tests and the cost figures read)

    def __call__(self) -> int:
        if self.root is None or not self.root.is_dir():
            return 0
        return self._count(str(self.root))

    def _count(self, folder: str) -> int:
        try:
            mtime = os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            self._folders.pop(folder, None)
            return 0
        known = self._folders.get(folder)
        if known is None or known[0] != mtime:
            neffs, subfolders = 0, []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append(entry.path)
                    elif entry.name.endswith(torchneuron.NEFF_SUFFIX):
                        neffs += 1
            known = (mtime, neffs, tuple(subfolders))
            self._folders[folder] = known
            self.listed += 1
        return known[1] + sum(self._count(sub) for sub in known[2])
