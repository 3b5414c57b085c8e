"""Startup check of the Trainium image: do driver, runtime, collectives and compiler belong together?

The image carries one Neuron SDK release (``containers/neuron-sdk.json``, path in
``$TRNFT_NEURON_SDK_MANIFEST``). This check compares what is installed in the image with that release,
and the host's Neuron driver with the oldest driver the release supports, and says what to fix. It runs
in the image's entrypoint, in the image build (``--image-only``: no driver there), and at the start of
Trainium training. Exit 0 when everything matches, 1 with one line per problem otherwise.

    python -m trnft.neuron.preflight [--image-only] [--manifest PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

DRIVER_VERSION_FILE = Path("/sys/module/neuron/version")


@dataclass
class Readings:
    """Installed versions; None where a component could not be found."""

    python_packages: dict[str, str | None] = field(default_factory=dict)
    system_packages: dict[str, str | None] = field(default_factory=dict)
    driver: str | None = None


def release_of(version: str) -> Version | None:
    """The release a version string names: PEP 440 local labels (``+e9bf8a50``), Debian epochs (``1:``) and
    Debian revisions (``-dd5879008``) are build details of the same release and do not count.

    Returns None when the string is not a version at all.
    """
    text = version.strip()
    if ":" in text:  # Debian epoch
        text = text.split(":", 1)[1]
    text = text.split("-", 1)[0]  # Debian revision
    try:
        parsed = Version(text)
    except InvalidVersion:
        return None
    return Version(parsed.public)


def same_release(actual: str, expected: str) -> bool:
    a, e = release_of(actual), release_of(expected)
    return a is not None and a == e


def at_least(actual: str, minimum: str) -> bool:
    a, m = release_of(actual), release_of(minimum)
    return a is not None and m is not None and a >= m


def _python_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _deb_version(name: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.strip()


def _driver_version() -> str | None:
    if DRIVER_VERSION_FILE.is_file():
        return DRIVER_VERSION_FILE.read_text().strip() or None
    if shutil.which("modinfo"):
        proc = subprocess.run(["modinfo", "-F", "version", "neuron"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    return None


def read_installed(manifest: dict) -> Readings:
    return Readings(
        python_packages={n: _python_version(n) for n in manifest["python_packages"]},
        system_packages={n: _deb_version(n) for n in manifest["system_packages"]},
        driver=_driver_version(),
    )


def check(manifest: dict, found: Readings, *, check_driver: bool) -> list[str]:
    """One actionable line per mismatch between ``found`` and the image's SDK release."""
    sdk = manifest["sdk"]
    problems = []
    for group in ("python_packages", "system_packages"):
        for name, expected in manifest[group].items():
            actual = getattr(found, group).get(name)
            if actual is None:
                problems.append(
                    f"{name} is not installed, but Neuron SDK {sdk} needs {expected}: build the image from "
                    "containers/Dockerfile.neuron"
                )
            elif not same_release(actual, expected):
                problems.append(
                    f"{name} {actual} is in the image, but it is built for Neuron SDK {sdk} ({name} {expected}): "
                    "the image mixes Neuron releases; rebuild it without upgrading Neuron packages"
                )
    if check_driver:
        minimum = manifest["host_driver_min"]
        runtime = manifest["system_packages"].get("aws-neuronx-runtime-lib", "?")
        if found.driver is None:
            problems.append(
                f"cannot read the Neuron driver version ({DRIVER_VERSION_FILE}); is aws-neuronx-dkms installed and "
                "loaded on the host?"
            )
        elif not at_least(found.driver, minimum):
            problems.append(
                f"Neuron driver {found.driver} on this host is older than {minimum}, which runtime {runtime} of "
                f"Neuron SDK {sdk} needs: upgrade aws-neuronx-dkms on the node (on EKS, a Neuron AMI of SDK >= {sdk}), "
                "or use an image of an older SDK"
            )
    return problems


def default_manifest_path() -> Path:
    env = os.environ.get("TRNFT_NEURON_SDK_MANIFEST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "containers" / "neuron-sdk.json"


def run(manifest_path: Path | None = None, *, image_only: bool = False) -> list[str]:
    path = manifest_path or default_manifest_path()
    if not path.is_file():
        return [
            f"{path}: no Neuron SDK manifest; set TRNFT_NEURON_SDK_MANIFEST to containers/neuron-sdk.json"
        ]
    manifest = json.loads(path.read_text())
    return check(manifest, read_installed(manifest), check_driver=not image_only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trnft.neuron.preflight", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--image-only", action="store_true", help="skip the host driver (image build time)")
    parser.add_argument("--manifest", type=Path, help="SDK manifest (default $TRNFT_NEURON_SDK_MANIFEST)")
    args = parser.parse_args(argv)
    problems = run(args.manifest, image_only=args.image_only)
    for line in problems:
        print(f"trnft preflight: {line}", file=sys.stderr)
    if not problems:
        print("trnft preflight: Neuron driver, runtime, collectives and compiler match", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
