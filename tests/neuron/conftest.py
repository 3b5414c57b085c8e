"""Neuron-path fixtures: one tokenized copy of the bundled data, and runs of trnft stages as processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import Run, smoke_raw


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, tiny_llama) -> Path:
    """A complete tokenize stage of the smoke config (copied into each run that needs it)."""
    from trnft.common import tokenize
    from trnft.common.config import config_from_dict

    root = tmp_path_factory.mktemp("tokenized")
    cfg = config_from_dict(smoke_raw(root, tiny_llama))
    tokenize.run(cfg, log=lambda m: None)
    return root / "tokenize"


@pytest.fixture
def make_run(tmp_path, tiny_llama, tokenized):
    """Factory: a run (tokenize already complete) with section overrides of the smoke config."""
    counter = {"n": 0}

    def make(*, model: Path | None = None, **sections) -> Run:
        counter["n"] += 1
        root = tmp_path / f"run{counter['n']}"
        root.mkdir()
        raw = smoke_raw(root, model or tiny_llama, **sections)
        if model is None:
            shutil.copytree(tokenized, root / "tokenize")
        return Run(root, raw)

    return make
