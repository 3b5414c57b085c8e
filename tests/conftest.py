"""Shared fixtures: a tiny model built once per session, run configs in tmp folders, hardware markers."""

from __future__ import annotations

import os

# Must be set before anything imports torch_xla (transformers does): tests run XLA on the CPU device.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as every trnft process sets it
os.environ.setdefault("TORCH_WARM_POOL", "0")  # likewise (trnft.common.env.set_process_defaults)

import importlib.util
import shutil
from pathlib import Path

import pytest
from helpers import Run, smoke_raw, write_config


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# Which dependency line this environment is (README "Two lines"): torch-xla is only on the trn1 line.
TRN1_LINE_ENV = importlib.util.find_spec("torch_xla") is not None


def _writes_xser(item) -> bool:
    """A case parametrised with ``encoding="xser"`` writes NxD shards through torch-xla's serialization (the
    test-side writer needs its real ``TensorReference`` class), so it runs where torch-xla is: the trn1
    line. Reading xser needs no torch-xla; the same cases in the ``plain`` encoding run on both lines."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("encoding") == "xser"


def pytest_collection_modifyitems(config, items):
    """Hardware skips, and the split between the two dependency lines.

    On the current line, ``trn1`` tests are skipped (tests/trn1_line.sh runs them in the trn1
    environment); on the trn1 line, only ``trn1`` and ``both_lines`` tests are selected. ``extended`` tests
    run only when the -m expression names them.
    """
    from trnft.common.env import has_neuron_device

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trn = pytest.mark.skip(reason="needs a Neuron device and the Neuron SDK")
    skip_trn1 = pytest.mark.skip(reason="the trn1 line's test: tests/trn1_line.sh runs it in .venv-trn1")
    on_this_line, elsewhere = [], []
    # `extended` runs also carry `slow` (a module's or a function's mark): only a -m naming extended runs them.
    wants_extended = "extended" in (config.getoption("markexpr") or "")
    for item in items:
        if item.get_closest_marker("extended") is not None and not wants_extended:
            elsewhere.append(item)
            continue
        trn1_only = item.get_closest_marker("trn1") is not None or _writes_xser(item)
        if TRN1_LINE_ENV:
            both = item.get_closest_marker("both_lines") is not None
            (on_this_line if trn1_only or both else elsewhere).append(item)
            continue
        if trn1_only:
            item.add_marker(skip_trn1)
        on_this_line.append(item)
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = on_this_line
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
        raw = smoke_raw(root, model or tiny_llama, platform=platform, **sections)
        if model is None:
            shutil.copytree(tokenized, root / "tokenize")
        return Run(root, raw)

    return make


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank gloo group in this process on a free port; the variables it needs are restored after
    (a MASTER_PORT left behind would send every later run in this process to that port)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
