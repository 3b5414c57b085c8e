"""benchmarks/gpu_throughput.py runs end to end (tiny shape, CPU) and prints its table; the FLOP count
it divides by is the one its docstring states."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_throughput"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_of_llama_31_8b():
    bench = _module()
    shape = bench.LLAMA_31_8B
    # 32 layers: q/o 4096x4096, k/v 4096x1024, MLP 3 x 4096x14336 = 218,103,808 per layer; LM head 525M.
    assert shape.linear_parameters(32) == 32 * 218_103_808 + 4096 * 128_256
    forward = 2 * shape.linear_parameters(32) + 4 * 32 * 4096 * 4096
    assert shape.flops_per_token(32, 4096, full=True) == 3 * forward
    assert shape.flops_per_token(32, 4096, full=False) == 2 * forward


@pytest.mark.slow
def test_the_benchmark_runs_on_a_tiny_shape():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in proc.stdout.splitlines()
        if line.split()[:1] in (["lora"], ["full"])
    }
    assert set(rows) == {"lora", "full"}
    for row in rows.values():
        assert float(row[4].replace(",", "")) > 0  # tokens/s
