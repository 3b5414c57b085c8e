"""Content hashes for manifests: files, folders and library versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

# External inputs (dataset files, local base models) up to this size are hashed in full. Bigger ones get a
# sampled hash of their size and first/last blocks: enough to notice a different file, cheap enough to run
# on every stage start. Stage outputs are always hashed in full (file_sha256).
FULL_HASH_LIMIT = 256 * 1024 * 1024
_SAMPLE = 16 * 1024 * 1024
_BLOCK = 1024 * 1024


def file_sha256(path: str | Path) -> str:
    """``sha256:<hex>`` of a whole file (stage outputs: what a downstream stage verifies before reading)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK * 8):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file, or ``sampled-sha256:<hex>`` for files over :data:`FULL_HASH_LIMIT`."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            while block := fh.read(_BLOCK):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        h.update(fh.read(_SAMPLE))
        fh.seek(size - _SAMPLE)
        h.update(fh.read(_SAMPLE))
    return f"sampled-sha256:{h.hexdigest()}"


def list_files(root: str | Path) -> list[Path]:
    """Every regular file below ``root``, sorted, as paths relative to it."""
    base = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            out.append((Path(dirpath) / name).relative_to(base))
    return out


def tree_digest(root: str | Path, names: list[str] | None = None) -> str:
    """One digest over the relative paths and contents of the files of a folder (or just ``names``)."""
    base = Path(root)
    h = hashlib.sha256()
    rels = [Path(n) for n in names] if names is not None else list_files(base)
    for rel in sorted(rels):
        h.update(str(rel).encode())
        h.update(file_digest(base / rel).encode())
    return f"sha256:{h.hexdigest()}"


_TRACKED = (
    "trnft",
    "torch",
    "torch-xla",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
    "optimum-neuron",
    "neuronx-distributed",
    "torch-neuronx",
    "neuronx-cc",
    "flash-attn",
    "vllm",
    "bert-score",
)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a stage's output (absent ones are left out)."""
    out = {}
    for name in _TRACKED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
