"""Content digests of a stage's external inputs, so a changed file redoes the stage like a changed key.

Hub ids (models, datasets) are identified by name and revision only: nothing is downloaded to hash them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..config.run_config import RunConfig
from ..io.hf_files import TOKENIZER_FILES
from .hashing import file_digest, tree_digest

MODEL_FILES_SUFFIXES = (".safetensors", ".bin", ".json")


def _entry(name: str, path: str | Path, digest: str) -> dict[str, Any]:
    return {"name": name, "path": str(path), "digest": digest}


def tokenizer_source(cfg: RunConfig) -> str:
    return cfg.model.tokenizer or cfg.model.name_or_path


def local_tokenizer_input(source: str) -> list[dict[str, Any]]:
    p = Path(source)
    if not p.is_dir():
        return []
    names = [n for n in TOKENIZER_FILES if (p / n).is_file()]
    return [_entry("tokenizer", p, tree_digest(p, names))] if names else []


def local_model_input(source: str, name: str = "base_model") -> list[dict[str, Any]]:
    """Digest of a local model folder's config and weight files (weights sampled when large)."""
    p = Path(source)
    if not p.is_dir():
        return []
    names = sorted(
        str(f.relative_to(p)) for f in p.iterdir() if f.is_file() and f.suffix in MODEL_FILES_SUFFIXES
    )
    return [_entry(name, p, tree_digest(p, names))] if names else []


def tokenize_inputs(cfg: RunConfig) -> list[dict[str, Any]]:
    out = [_entry("dataset_file", f, file_digest(f)) for f in cfg.dataset.files or [] if Path(f).is_file()]
    out += local_tokenizer_input(tokenizer_source(cfg))
    if cfg.dataset.converter:
        module = cfg.dataset.converter.split(":", 1)[0]
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            out.append(_entry("converter_source", spec.origin, file_digest(spec.origin)))
    return out


def base_model_inputs(cfg: RunConfig) -> list[dict[str, Any]]:
    return local_model_input(cfg.model.name_or_path)
