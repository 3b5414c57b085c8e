"""What the consolidate and merge benchmarks share: timing a child process, synthetic weights, copying.

Every measured step runs in its own process, started from a small launcher, and is timed from here; its
peak resident memory is that process's own ``ru_maxrss`` from ``os.wait4``, so a step that loads torch
pays for it and a step that does not, does not. Wall time includes the launcher's start (~20 ms).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# TinyLlama-1.1B's dimensions (hidden 2048, 32 query / 4 KV heads, MLP 5632, 22 layers, vocab 32000)
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "num_hidden_layers": 22,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass
class Measured:
    label: str
    wall_s: float
    peak_rss_gb: float
    returncode: int


# Runs argv and writes the child's exit code and peak RSS (KiB) to a file. A forked child starts with its
# parent's peak RSS as its own (Linux carries the high-water mark across fork and exec), so the measured
# command is started from this small launcher, never from the benchmark process that built the weights.
_LAUNCHER = """
import json, os, subprocess, sys
report, argv = sys.argv[1], json.loads(sys.argv[2])
proc = subprocess.Popen(argv)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as fh:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, fh)
"""


def run_measured(label: str, argv: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``argv`` to completion; wall time and the command's own peak RSS. Its output goes to our stderr."""
    import json
    import tempfile

    full_env = {**os.environ, "PJRT_DEVICE": "CPU", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", _LAUNCHER, report.name, json.dumps(argv)],
            env=full_env, stdout=sys.stderr, stderr=sys.stderr, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        outcome = json.loads(Path(report.name).read_text())
    if outcome["code"] != 0:
        raise SystemExit(f"{label}: exit {outcome['code']} ({' '.join(argv)})")
    return Measured(label, wall, outcome["maxrss_kib"] / 1024**2, 0)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def trnft(*args: str) -> list[str]:
    return [sys.executable, "-m", "trnft.common.cli", *args]


def copy_tree_durably(src: Path, dst: Path) -> None:
    """The plain-copy baseline: same bytes, file by file, each fsynced (as our writers fsync outputs)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())


def copy_argv(src: Path, dst: Path) -> list[str]:
    code = (
        f"import pathlib, sys; sys.path.append({str(Path(__file__).parent)!r}); import measure; "
        f"measure.copy_tree_durably(pathlib.Path({str(src)!r}), pathlib.Path({str(dst)!r}))"
    )
    return python(code)


def seeded_tensor(name: str, shape: tuple[int, ...], std: float = 0.02):
    """A bf16 tensor that depends only on (name, shape): the benchmarks regenerate it to check outputs."""
    import torch

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama with ``config``'s dimensions."""
    h, n, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, inter, vocab = h // n, config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (n * hd, h),
            f"{p}.self_attn.k_proj.weight": (kv * hd, h),
            f"{p}.self_attn.v_proj.weight": (kv * hd, h),
            f"{p}.self_attn.o_proj.weight": (h, n * hd),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return shapes


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def warm(path: Path) -> None:
    """Read every file once so each measured step starts from the same (cached) input."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def at_two_sizes(workdir: str | None, layers: int, double: bool, one_size) -> list:
    """``one_size(work, layers, verify)`` at ``layers`` (verified) and, with ``double``, at twice the layers,
    in one scratch folder that is removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir, prefix="trnft-bench-") as tmp:
        work = Path(tmp)
        runs = [one_size(work, layers, True)]
        if double:
            runs.append(one_size(work, 2 * layers, False))
    return runs


# The integrity work alone, as trnft does it, measured in its own process: the CRC32 of every storage of
# every torch.save file (done inside `trnft consolidate` on what it reads) and the sha256 of every file of a
# folder (what a stage writes into its manifest and what the next stage checks before reading).
_CRC32 = r"""
import mmap, pathlib, sys, zipfile, zlib, struct
for path in sorted(pathlib.Path(sys.argv[1]).rglob("*.pt")):
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        for info in zf.infolist():
            if "/data/" not in info.filename:
                continue
            n, e = struct.unpack("<HH", mm[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + n + e
            assert zlib.crc32(memoryview(mm)[start : start + info.file_size]) == info.CRC
"""
_SHA256 = r"""
import pathlib, sys
from trnft.common.pipeline.hashing import file_sha256
for path in sorted(pathlib.Path(sys.argv[1]).rglob("*")):
    if path.is_file():
        file_sha256(path)
"""


def crc32_argv(folder: Path) -> list[str]:
    return [*python(_CRC32), str(folder)]


def sha256_argv(folder: Path) -> list[str]:
    return [*python(_SHA256), str(folder)]
