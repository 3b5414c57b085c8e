"""Startup check of the neuron-native image: is this the TorchNeuron release the image was built for?

The image carries one TorchNeuron release (``containers/neuron-native.json``, path in
``$TRNFT_NEURON_NATIVE_MANIFEST``): Python, torch, and the families of torch-neuronx, the Neuron compiler
(neuronx-cc) and nki that AWS installs with it. The check
compares what is installed with that file and, unless ``--image-only`` (the image build has no device),
that a Neuron device is present and torch-neuronx loads. It runs in the image build and at the start of
neuron-native training on a Neuron device. Exit 0 when everything matches, 1 with one line per problem.

    python -m trnft.neuron.native.preflight [--image-only] [--manifest PATH]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from ...common.env import has_neuron_device
from . import torchneuron

MANIFEST_ENV = "TRNFT_NEURON_NATIVE_MANIFEST"
# Why each package of the release must be there (AWS's install line for TorchNeuron 2.14).
WHY_NEEDED = {
    torchneuron.PACKAGE: "TorchNeuron itself, the family that matches torch",
    "neuronx-cc": "TorchNeuron calls the Neuron compiler for every graph, eager or compiled",
    "nki": "Neuron kernels; neuronx-cc no longer carries neuronxcc.nki",
}


def default_manifest() -> Path:
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "containers" / "neuron-native.json"


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(pins: dict, python: tuple[int, int], versions: dict[str, str | None]) -> list[str]:
    """What does not match the release, one line each (empty: all match).

    ``versions`` maps package names to installed versions (None: not installed). torch must be the pinned
    version (local labels such as ``+cpu`` are build details); torch-neuronx must be of the pinned family
    (``2.14.3`` matches ``2.14.3.0.1234``).
    """
    problems = []
    wanted_python = tuple(int(p) for p in pins["python"].split("."))
    if python < max(wanted_python, torchneuron.MIN_PYTHON):
        problems.append(
            f"Python {python[0]}.{python[1]}: torch-neuronx needs Python {pins['python']} or newer; use the "
            "neuron-native image (containers/Dockerfile.neuron-native)"
        )
    torch_pin = pins["python_packages"]["torch"]
    torch_found = versions.get("torch")
    if torch_found is None or torch_found.split("+")[0] != torch_pin:
        problems.append(
            f"torch {torch_found or 'is not installed'}: this TorchNeuron release is built for torch "
            f"{torch_pin}; install torch=={torch_pin}"
        )
    for package, family in pins["python_packages"].items():
        if package == "torch":
            continue
        found = versions.get(package)
        if found is None or not (found == family or found.startswith(family + ".")):
            why = WHY_NEEDED.get(package, f"the {pins.get('sdk', 'pinned')} release has it")
            problems.append(
                f"{package} {found or 'is not installed'}: expected the {family}.* family ({why}); install "
                f"'{package}=={family}.*' from {pins.get('pip_extra_index', 'https://pip.repos.neuron.amazonaws.com')}"
            )
    if "torch-xla" in versions and versions["torch-xla"] is not None:
        problems.append(
            f"torch-xla {versions['torch-xla']} is installed: it is the trn1 XLA path's and replaces torch's "
            "device handling; uninstall it from the neuron-native image"
        )
    return problems


def device_problems() -> list[str]:
    if not has_neuron_device():
        return [
            "no Neuron device (/dev/neuron*): run on a trn2/trn3 node that requests aws.amazon.com/neuron"
        ]
    try:
        importlib.import_module("torch_neuronx")
    except Exception as exc:  # any import failure is the same problem to the user: the runtime is broken
        return [f"torch_neuronx does not load ({exc}); check the Neuron runtime and driver of this node"]
    return []


def run(manifest: Path | None = None, *, image_only: bool = False) -> list[str]:
    path = manifest or default_manifest()
    try:
        pins = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{path}: cannot read the release file ({exc}); set {MANIFEST_ENV}"]
    names = ["torch", *pins["python_packages"], "torch-xla"]
    problems = check(pins, sys.version_info[:2], {n: installed(n) for n in names})
    if not image_only:
        problems += device_problems()
    return problems


def require() -> None:
    """Run the check before a stage uses the device (compile and train on a Neuron node); the first problem
    stops the stage in one line."""
    from ...common.errors import TrnftError

    problems = run()
    if problems:
        raise TrnftError(f"neuron-native preflight: {problems[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-only", action="store_true", help="skip the device checks (image build)")
    parser.add_argument("--manifest", type=Path, default=None, help="the release file")
    args = parser.parse_args(argv)
    problems = run(args.manifest, image_only=args.image_only)
    for line in problems:
        print(f"neuron-native preflight: {line}", file=sys.stderr)
    if not problems:
        print("neuron-native preflight: the installed TorchNeuron release matches", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
