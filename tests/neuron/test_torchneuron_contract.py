"""Every TorchNeuron name trnft relies on, pinned with the AWS documentation page it comes from.

TorchNeuron (torch-neuronx 2.13/2.14, native PyTorch on Neuron) cannot run here: no Trainium 2/3 and no
package on PyPI. These tests fix what the neuron-native platform assumes, so a change of any of them is a
deliberate edit of ``neuron/native/torchneuron.py`` and of this file, with the page that says so:

- device ``neuron`` and ``.to("neuron")``: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/index.html
- ``dist.init_process_group(backend="neuron")`` under torchrun:
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/guides/torch-distributed.html
- ``torch.compile(backend="neuron")``, just in time per shape, no dynamic shapes:
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/compile/index.html and
  .../torch/compile/reference-torch-compile.html
- the persistent NEFF cache ``TORCH_NEURONX_NEFF_CACHE_DIR`` (files ``*.neff``):
  .../torch/reference/env-vars.html and .../compiler/about-compiler-artifacts.html
- package family ``torch-neuronx==2.14.*`` for PyTorch 2.14 (2.13.3.x / 2.14.3.x), Python 3.12+, Trn2 and
  Trn3 only: .../release-notes/components/torchneuron.html (Neuron 2.33.0, 2026-10-19)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trnft.common.fsdp.platform import CPU
from trnft.neuron.native import torchneuron
from trnft.neuron.native.device import NEURON, NeuronAccelerator, cached_graphs, device_platform, register
from trnft.neuron.native.preflight import check

REPO = Path(__file__).resolve().parents[2]
PINS = json.loads((REPO / "containers" / "neuron-native.json").read_text())
DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest"


def test_the_names_and_their_pages():
    assert ("neuron", f"{DOCS}/torch/index.html") == (torchneuron.DEVICE_TYPE, torchneuron.DEVICE_SOURCE)
    assert torchneuron.PROCESS_GROUP_BACKEND == "neuron"
    assert f"{DOCS}/torch/guides/torch-distributed.html" == torchneuron.PROCESS_GROUP_SOURCE
    assert ("neuron", f"{DOCS}/torch/compile/index.html") == (
        torchneuron.COMPILE_BACKEND,
        torchneuron.COMPILE_SOURCE,
    )
    assert (torchneuron.NEFF_CACHE_ENV, torchneuron.NEFF_SUFFIX) == ("TORCH_NEURONX_NEFF_CACHE_DIR", ".neff")
    assert (
        f"{DOCS}/torch/reference/env-vars.html",
        f"{DOCS}/compiler/about-compiler-artifacts.html",
    ) == torchneuron.CACHE_SOURCES
    assert torchneuron.PACKAGE == "torch-neuronx" and torchneuron.MIN_PYTHON == (3, 12)
    assert torchneuron.TORCH_FAMILIES == {"2.13": "2.13.3", "2.14": "2.14.3"}
    assert f"{DOCS}/release-notes/components/torchneuron.html" == torchneuron.PACKAGE_SOURCE
    assert torchneuron.TARGETS == ("trn2", "trn3")


def test_the_platform_the_trainer_gets_is_built_from_those_names():
    assert (NEURON.device_type, NEURON.process_group_backend, NEURON.compile_backend) == ("neuron",) * 3
    assert NEURON.name == "neuron"
    # no Neuron device here: the same trainer runs on the CPU over gloo
    assert device_platform() is CPU and (CPU.process_group_backend, CPU.compile_backend) == ("gloo", None)


def test_lightning_knows_the_neuron_accelerator():
    from lightning.pytorch.accelerators import AcceleratorRegistry

    register()
    register()  # idempotent
    assert (
        "neuron" in AcceleratorRegistry and AcceleratorRegistry.get("neuron").__class__ is NeuronAccelerator
    )
    assert NeuronAccelerator.name() == "neuron"
    assert not NeuronAccelerator.is_available() and NeuronAccelerator.auto_device_count() == 0
    assert NeuronAccelerator.parse_devices(4) == 4


def test_the_image_pins_one_torchneuron_release():
    """neuron-native.json: the torch-neuronx family is the one documented for its torch; the Dockerfile
    installs exactly what the file says, on the Python the package needs, without torch-xla."""
    torch_version = PINS["python_packages"]["torch"]
    family = PINS["python_packages"]["torch-neuronx"]
    assert torchneuron.TORCH_FAMILIES[".".join(torch_version.split(".")[:2])] == family
    assert tuple(int(p) for p in PINS["python"].split(".")) >= torchneuron.MIN_PYTHON
    assert PINS["sdk"] == "2.34.0" and PINS["base_image"].endswith("ubuntu:24.04")
    text = (REPO / "containers" / "Dockerfile.neuron-native").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["TORCH_VERSION"] == torch_version and args["TORCH_NEURONX_FAMILY"] == family
    assert args["UBUNTU_BASE"] == PINS["base_image"] and args["APT_CODENAME"] == PINS["apt_codename"]
    assert args["EFA_INSTALLER_VERSION"] == PINS["efa_installer"]
    assert '"torch-neuronx==${TORCH_NEURONX_FAMILY}.*"' in text and "pip.repos.neuron.amazonaws.com" in text
    # AWS's install line for TorchNeuron: the compiler and nki come with it (the preflight checks both)
    assert PINS["python_packages"]["neuronx-cc"] == "2" and '"neuronx-cc==${NEURONX_CC_FAMILY}.*"' in text
    assert args["NEURONX_CC_FAMILY"] == "2" and '"nki==${NKI_FAMILY}.*"' in text and args["NKI_FAMILY"] == "0"
    # the rest of the stack is the current line's, as CI tests it
    assert "--constraints containers/constraints/current.txt" in text.replace("/opt/trnft/", "containers/")
    assert "--keep torch torch-neuronx" in text and "--skip torch-xla" in text
    assert "python -m trnft.neuron.native.preflight --image-only" in text
    for package in PINS["system_packages"]:
        assert package in text
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("aws-neuronx-dkms" in line for line in instructions)  # the driver is the host's


# An installed Neuron compiler and nki of the release's families (versions as AWS numbers them).
COMPILER = {"neuronx-cc": "2.29.2186.0", "nki": "0.8.0"}


@pytest.mark.parametrize(
    ("versions", "python", "problem"),
    [
        (
            {"torch": "2.14.0+cpu", "torch-neuronx": "2.14.3.0.1187", "torch-xla": None, **COMPILER},
            (3, 12),
            None,
        ),
        ({"torch": "2.14.0", "torch-neuronx": "2.14.3", "torch-xla": None, **COMPILER}, (3, 13), None),
        (
            {"torch": "2.13.0", "torch-neuronx": "2.14.3.0.1", "torch-xla": None, **COMPILER},
            (3, 12),
            "install torch==2.14.0",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": "2.13.3.0.1", "torch-xla": None, **COMPILER},
            (3, 12),
            "expected the 2.14.3.* family",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": "2.14.30.0", "torch-xla": None, **COMPILER},
            (3, 12),
            "expected the 2.14.3.* family",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": None, "torch-xla": None, **COMPILER},
            (3, 12),
            "torch-neuronx is not installed",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": "2.14.3.0.1", "torch-xla": None, **COMPILER},
            (3, 11),
            "needs Python 3.12",
        ),
        (
            {
                "torch": "2.14.0",
                "torch-neuronx": "2.14.3.1",
                "torch-xla": None,
                **COMPILER,
                "neuronx-cc": None,
            },
            (3, 12),
            "neuronx-cc is not installed: expected the 2.* family (TorchNeuron calls the Neuron compiler",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": "2.14.3.1", "torch-xla": None, **COMPILER, "nki": None},
            (3, 12),
            "nki is not installed",
        ),
        (
            {
                "torch": "2.14.0",
                "torch-neuronx": "2.14.3.1",
                "torch-xla": None,
                **COMPILER,
                "neuronx-cc": "3.0.1",
            },
            (3, 12),
            "neuronx-cc 3.0.1: expected the 2.* family",
        ),
        (
            {"torch": "2.14.0", "torch-neuronx": "2.14.3.0.1", "torch-xla": "2.8.1", **COMPILER},
            (3, 12),
            "torch-xla 2.8.1 is installed",
        ),
    ],
)
def test_the_startup_check_says_what_does_not_belong(versions, python, problem):
    problems = check(PINS, python, versions)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_graphs_are_counted_from_the_neff_files_of_the_cache(tmp_path):
    assert cached_graphs(None) == 0 and cached_graphs(tmp_path / "absent") == 0
    for name in ("ab/cd/1.neff", "ab/ef/2.neff", "ab/cd/note.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert cached_graphs(tmp_path) == 2


def test_the_step_counter_lists_only_the_folders_that_changed(tmp_path):
    """NeffCacheWatch equals a full walk at every call, and after the first call it lists only the folders
    a new file appeared in (their modification time changed): a stat per folder per step, not a walk."""
    import os

    from trnft.neuron.native.device import NeffCacheWatch

    assert NeffCacheWatch(None)() == 0 and NeffCacheWatch(tmp_path / "absent")() == 0
    for a in range(8):
        for b in range(8):
            (tmp_path / f"{a:02x}" / f"{b:02x}").mkdir(parents=True)
            (tmp_path / f"{a:02x}" / f"{b:02x}" / f"{a}{b}.neff").write_text("x")
    watch = NeffCacheWatch(tmp_path)
    assert watch() == cached_graphs(tmp_path) == 64 and watch.listed == 1 + 8 + 64
    assert watch() == 64 and watch.listed == 73  # nothing changed: nothing listed
    new = tmp_path / "03" / "05" / "new.neff"
    new.write_text("x")
    os.utime(new.parent, ns=(0, new.parent.stat().st_mtime_ns + 1))  # coarse clocks: a visible change
    assert watch() == cached_graphs(tmp_path) == 65 and watch.listed == 74
    (tmp_path / "09" / "00").mkdir(parents=True)
    (tmp_path / "09" / "00" / "z.neff").write_text("x")
    assert watch() == cached_graphs(tmp_path) == 66


def test_the_pods_point_compile_and_train_at_one_cache_on_the_shared_volume():
    from trnft.common.cluster.instances import instance, training_layout
    from trnft.common.config.run_config import load_config
    from trnft.neuron.native.backend import neuron_native_env

    cfg = load_config(REPO / "examples" / "llama31_8b_lora_trn2_native.yaml")
    layout = training_layout(cfg)
    assert (layout.nproc_per_node, layout.tp, layout.dp) == (64, 4, 16)  # trn2 at LNC=2: 64 ranks per node
    env = neuron_native_env(cfg, instance(cfg.cluster.instance_type), layout)
    assert env["TORCH_NEURONX_NEFF_CACHE_DIR"] == "/fsx/neuron_native_cache"
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "2" and "NEURON_CC_FLAGS" not in env


def test_a_neuron_device_without_torch_neuronx_is_refused_not_trained_on_the_cpu(monkeypatch):
    from trnft.common.errors import TrnftError
    from trnft.neuron.native import device

    monkeypatch.setattr(device, "has_neuron_device", lambda: True)  # what /dev/neuron0 would say
    with pytest.raises(TrnftError, match="has a Neuron device but no torch-neuronx"):
        device.device_platform()
