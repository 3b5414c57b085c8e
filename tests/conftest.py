"""Shared fixtures: a tiny model built once per session, run configs in tmp folders, hardware markers."""

from __future__ import annotations

import os

# Must be set before anything imports torch_xla (transformers does): tests run XLA on the CPU device.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import pytest
from helpers import Run, set_platform, smoke_raw, write_config


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    from trnft.common.env import has_neuron_device

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trn = pytest.mark.skip(reason="needs a Neuron device and the Neuron SDK")
    cuda = None
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(skip_gpu)
        if item.get_closest_marker("trainium") is not None and not has_neuron_device():
            item.add_marker(skip_trn)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama with GQA (4 heads, 2 KV heads, hidden 64, 2 layers) and its tokenizer."""
    from trnft.common.testing.fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture
def run_config(tmp_path, tiny_llama):
    """Factory: write a smoke-like run YAML under tmp_path and return its path."""

    def make(**sections) -> Path:
        raw = smoke_raw(tmp_path / "run", tiny_llama, **sections)
        return write_config(tmp_path / "run.yaml", raw)

    return make


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, tiny_llama) -> Path:
    """A complete tokenize stage of the smoke config (copied into each run that needs it)."""
    from trnft.common import tokenize
    from trnft.common.config.run_config import config_from_dict

    root = tmp_path_factory.mktemp("tokenized")
    cfg = config_from_dict(smoke_raw(root, tiny_llama))
    tokenize.run(cfg, log=lambda m: None)
    return root / "tokenize"


@pytest.fixture
def make_run(tmp_path, tiny_llama, tokenized):
    """Factory: a run (tokenize already complete) with section overrides of the smoke config."""
    counter = {"n": 0}

    def make(*, model: Path | None = None, platform: str | None = None, **sections) -> Run:
        counter["n"] += 1
        root = tmp_path / f"run{counter['n']}"
        root.mkdir()
        raw = smoke_raw(root, model or tiny_llama, **sections)
        if platform:
            set_platform(raw, platform)
        if model is None:
            shutil.copytree(tokenized, root / "tokenize")
        return Run(root, raw)

    return make
