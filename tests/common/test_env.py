"""What every trnft process sets before torch and transformers are imported (trnft.common.env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.both_lines  # torch 2.8 and 2.14 differ in when inductor starts its workers

# A train stage's imports on this line, then the processes this one has started.
PROBE = """
import json, os, sys, time
from trnft.common.env import set_process_defaults
if sys.argv[1] == "defaults":
    set_process_defaults()
import importlib.util, psutil, torch, transformers, peft
if importlib.util.find_spec("torch_xla") is not None:
    from trnft.neuron import xla_trainer  # the trn1 line's trainer
else:
    from trnft.common.fsdp import trainer  # the current line's
time.sleep(1.0)
print(json.dumps({"children": len(psutil.Process().children(recursive=True)),
                  "async_compile": "torch._inductor.async_compile" in sys.modules}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_WARM_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_compile_worker_starts_in_a_stage_that_compiles_nothing():
    """torch 2.8 starts inductor's worker pool as soon as torch._inductor.async_compile is imported (which
    transformers does through torch._dynamo); trnft's process defaults keep it from starting."""
    assert _probe("defaults")["children"] == 0
    bare = _probe("bare")
    if torch_line() == "2.8":  # the trn1 line: without the default, the pool is there
        assert bare["async_compile"] and bare["children"] >= 1, bare


def torch_line() -> str:
    import torch

    return ".".join(torch.__version__.split(".")[:2])
