"""The dependency order of the packages, checked over the import graph of the source.

    common  <-  platforms (neuron, neuron.native, gpu)  <-  jobspecs and the CLI

- nothing in ``trnft.common`` imports a platform or ``trnft.jobspecs``, at module level or inside a function,
  except the CLI (``common/cli.py``, the top of the graph) and the backend registry (which names the platforms'
  backend modules as strings and imports them on first use);
- a platform never imports the other platform or ``trnft.jobspecs``; ``trnft.neuron.native`` (the
  neuron-native platform) may use the Neuron package's shared helpers, the XLA path never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "common": "trnft.common",
    "neuron": "trnft.neuron",
    "gpu": "trnft.gpu",
    "jobspecs": "trnft.jobspecs",
}
PLATFORMS = ("trnft.neuron", "trnft.gpu")
NATIVE = "trnft.neuron.native"
# Modules of common allowed to reach up the graph, and why.
COMMON_TOP = {"trnft.common.cli": "the command line sits above every package"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path, module: str) -> list[str]:
    """Every trnft module ``path`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{a.name}" for a in node.names]
    return [name for name in found if name.startswith("trnft.")]


MODULES = _modules()


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("module", [m for m in MODULES if _under(m, "trnft.common")])
def test_common_imports_no_platform_and_no_jobspecs(module):
    if module in COMMON_TOP:
        return
    upward = [
        name
        for name in _imports(MODULES[module], module)
        if any(_under(name, p) for p in (*PLATFORMS, "trnft.jobspecs"))
    ]
    assert upward == [], f"{module} imports {upward}; go through trnft.common.pipeline.backend instead"


@pytest.mark.parametrize("module", [m for m in MODULES if any(_under(m, p) for p in PLATFORMS)])
def test_a_platform_imports_neither_the_other_platform_nor_jobspecs(module):
    own = next(p for p in PLATFORMS if _under(module, p))
    forbidden = [p for p in PLATFORMS if p != own] + ["trnft.jobspecs"]
    wrong = [name for name in _imports(MODULES[module], module) if any(_under(name, p) for p in forbidden)]
    assert wrong == [], f"{module} imports {wrong}"


@pytest.mark.parametrize(
    "module", [m for m in MODULES if _under(m, "trnft.neuron") and not _under(m, NATIVE)]
)
def test_the_xla_path_does_not_import_the_native_platform(module):
    wrong = [name for name in _imports(MODULES[module], module) if _under(name, NATIVE)]
    assert wrong == [], f"{module} imports {wrong}"


def test_both_fsdp2_platforms_train_through_the_shared_trainer():
    """gpu and neuron-native own no training loop: their train stage hands a device to trnft.common.fsdp."""
    for module in ("trnft.gpu.train", f"{NATIVE}.train"):
        assert "trnft.common.fsdp.trainer" in _imports(MODULES[module], module) or "trnft.common.fsdp" in [
            n.rsplit(".", 1)[0] for n in _imports(MODULES[module], module)
        ]
        assert "def training_step" not in MODULES[module].read_text()


def test_the_registry_is_the_only_place_that_names_a_platform_module():
    from trnft.common.pipeline import backend

    assert set(backend.REGISTRY) == {"neuron", "gpu", "neuron-native"}
    for module, path in MODULES.items():
        if module == "trnft.common.pipeline.backend" or not _under(module, "trnft.common"):
            continue
        text = path.read_text()
        assert '"trnft.neuron' not in text and '"trnft.gpu' not in text, module


def test_the_checker_sees_a_violation(tmp_path):
    """The import walk finds imports inside functions, so the rules above can fail."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trnft.gpu.train import run\n    return run\n")
    assert "trnft.gpu.train" in _imports(bad, "trnft.common.bad")
