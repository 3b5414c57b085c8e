"""benchmarks/gpu_throughput.py runs end to end (tiny shape, CPU) and prints its table; the FLOP count
it divides by is the one its docstring states."""

from __future__ import annotations

import importlib.util
import os
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
    n = shape.linear_parameters(32)
    attention = 4 * 32 * 4096 * 4096  # QK^T and AV: 2 products x 2 FLOPs x L x h x S per token
    # By hand: forward 2N + A; backward input gradients 2N + A, weight gradients 2N (full only), and the
    # attention products' second operand gradients another A with or without LoRA.
    assert (
        shape.flops_per_token(32, 4096, full=True)
        == (2 * n + attention) + (2 * n + attention) + 2 * n + attention
    )
    assert (
        shape.flops_per_token(32, 4096, full=False) == (2 * n + attention) + (2 * n + attention) + attention
    )
    # LoRA at 4096 tokens: 4N + 12LhS = 4 x 7.505e9 + 12 x 32 x 4096 x 4096 = 36.46 GFLOPs per token
    assert round(shape.flops_per_token(32, 4096, full=False) / 1e9, 2) == 36.46


CHECK = SCRIPT.with_name("gpu_check.sh")
WHEELS = SCRIPT.with_name("gpu_wheels.sh")
# The scripts call `python`: this interpreter's, whether or not its environment is activated.
_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.slow
def test_the_whole_gpu_check_runs_on_cpu_with_tiny_and_reports_every_step(tmp_path):
    """--tiny, the default steps in one run: install (trnft alone), the probe's rows (attention variants,
    recompute modes, the loss, FSDP2 on one rank), then the benchmark's LoRA and full rows, each step
    reported, each row with its figures."""
    site = tmp_path / "site"
    env = {**os.environ, "TRNFT_GPU_SITE": str(site), "PIP_NO_INDEX": "1", "PATH": _PATH}
    proc = subprocess.run(
        ["bash", str(CHECK), "--tiny"], capture_output=True, text=True, timeout=1500, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    reports = [line.split()[1:3] for line in lines if line.startswith("gpu_check: ") and " in " in line]
    assert reports == [["install", "ok"], ["probe", "ok"], ["lora", "ok"], ["full", "ok"]], lines
    probes = [line for line in lines if line.startswith("probe: ") and " ms " in line]
    parts = ["attention"] + ["recompute"] * 3 + ["loss"] * 2 + ["fsdp"] * 3  # whole and chunked loss
    assert [p.split()[1] for p in probes] == parts, probes
    assert "probe: attention flex_attention (no backward on the CPU)" in "\n".join(lines)
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["lora"], ["full"])}
    assert set(rows) == {"lora", "full"}
    for row in rows.values():
        assert float(row[4].replace(",", "")) > 0  # tokens/s
        assert float(row[8].replace(",", "")) > 0  # MB of the mode's files, measured before its folder went
    assert (site / "trnft").is_dir()


def test_a_failed_step_does_not_stop_the_next_and_the_exit_counts_failures(tmp_path):
    """A benchmark mode that fails prints its step's FAILED line; the steps after it still run."""
    site = tmp_path / "site"
    (site / "trnft").mkdir(parents=True)  # an "installed" trnft that cannot import: every step fails
    # a regular package (first on PYTHONPATH), so it wins over any trnft installed in the environment
    (site / "trnft" / "__init__.py").write_text("raise ImportError('a broken trnft install')\n")
    env = {**os.environ, "TRNFT_GPU_SITE": str(site), "PYTHONPATH": str(site), "PATH": _PATH}
    proc = subprocess.run(["bash", str(CHECK), "--tiny", "lora", "full"], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert [line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("gpu_check: ")] == [
        ["lora", "FAILED"],
        ["full", "FAILED"],
    ]


def test_an_unknown_step_is_one_line():
    proc = subprocess.run(["bash", str(CHECK), "bench"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: unknown argument bench (steps: install probe lora full tests)"


def test_the_gpu_check_refuses_an_empty_wheel_folder(tmp_path):
    (tmp_path / "wheels").mkdir()
    site = tmp_path / "site"
    proc = subprocess.run(
        ["bash", str(CHECK), "--wheels", str(tmp_path / "wheels")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TRNFT_GPU_SITE": str(site)},
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no wheels in {tmp_path / 'wheels'} (run benchmarks/gpu_wheels.sh)"
    ]
    assert not any(site.iterdir()) if site.exists() else True


@pytest.mark.slow
def test_the_gpu_check_installs_from_carried_wheels_alone(tmp_path):
    """What a GPU machine that reaches no index does: the wheels from gpu_wheels.sh, then trnft, offline."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    got = subprocess.run(["bash", str(WHEELS), str(wheels), f"{sys.version_info[0]}.{sys.version_info[1]}"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    # PIP_NO_INDEX: any download the check tried would fail
    env = {**os.environ, "TRNFT_GPU_SITE": str(site), "PIP_NO_INDEX": "1", "PATH": _PATH}
    proc = subprocess.run(["bash", str(CHECK), "--wheels", str(wheels)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    # no CUDA here: everything up to the device check ran
    assert proc.returncode == 1 and proc.stderr.strip().endswith("gpu_check: no CUDA device"), proc.stderr[
        -2000:
    ]
    installed = {p.name.split("-")[0] for p in site.glob("*.dist-info")}
    assert {"trnft", "peft", "datasets", "dill", "multiprocess", "fsspec"} <= installed
    assert (site / "trnft" / "examples" / "data" / "tiny_instructions.jsonl").is_file()
