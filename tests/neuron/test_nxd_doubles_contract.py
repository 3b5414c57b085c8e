"""The NxD doubles at two ranks, checked against what neuronx-distributed 0.15 (Neuron SDK 2.26, tag v2.26.0 of
github.com/aws-neuron/neuronx-distributed) does. Each fact and where upstream does it:

- rank grid: ``parallel_layers/parallel_state.py`` ``initialize_model_parallel`` reshapes the world row-major to
  ``[PP, DP, TP]``: tensor-parallel groups are contiguous ranks, data-parallel groups stride by tp;
- ``ColumnParallelLinear`` / ``RowParallelLinear`` (``parallel_layers/layers.py``): weight split on dim 0 / dim 1,
  copy-to-region before the column matmul (its backward all-reduces the input gradient), all-reduce after the
  row matmul, the row bias added after the reduction; ``create_local_weight`` keeps stride pieces ``r::tp``;
- ``ParallelEmbedding._forward_shard_across_vocab``: ids outside the rank's range masked to zero rows, then
  all-reduce;
- parallel cross-entropy: optimum-neuron 0.4.5's own ``models/training/loss_utils.py`` ``_ParallelCrossEntropy``
  over the doubles' tensor-parallel group;
- ``parallel_layers/grads.py`` ``get_grad_norm`` (``force_spmd=True``): split parameters count their shard on
  every rank, whole ones ``1/tp`` per rank, all-reduced over the tensor-parallel group; ``bucket_allreduce_gradients``
  sums with scale ``1/dp`` over the data-parallel replica groups;
- ``trainer/checkpoint.py`` ``save_checkpoint`` / ``_xser_save_data`` / ``_assign_tensors_to_bins``: xser tensor
  files spread over data-parallel ranks by ascending size into the smallest bin, the reference file from
  data-parallel rank 0; every rank meets in ``xm.rendezvous`` (the double raises instead of hanging when a
  rank does not come);
- ``modules/qkv_linear.py`` ``GQAQKVColumnParallelLinear`` with ``modules/qkv_linear_utils.py``: K/V output
  gradients summed over the kv-shared group before anything else, the input gradient
  ``gq Wq + (gk Wk + gv Wv) / kv_size_multiplier``; ``parallel_state.arrange_kv_groups``: on trn1 with
  tp 4 and 2 copies the groups interleave ([[0, 2], [1, 3]]; adjacent with ``sequential_ranks_in_group``), on
  trn2 copies sit on adjacent ranks; ``_initialize_affine_weight`` copies heads with ``repeat`` on trn1 and
  ``repeat_interleave`` on trn2; with a frozen fused ``weight_qkv`` the backward
  (``_qkvlinear_autograd_base_setup_bwd``) takes ``ctx.saved_tensors[:1]``, a tuple, and fails;
- ``parallel_layers/mappings.py`` ``_reduce`` through ``parallel_layers/comm.py`` ``all_reduce``: a single
  tensor is wrapped in a list and reduced in place (callers may drop the return value).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trn1  # the trn1 line (tests/trn1_line.sh)

DOUBLES = Path(__file__).resolve().parents[1] / "neuron_sdk_doubles"
CHECKS = Path(__file__).with_name("nxd_double_checks.py")


def _two_ranks(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(CHECKS),
        *args,
    ]
    full = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "PYTHONPATH": os.pathsep.join([str(DOUBLES), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=600)


# Gloo's C++ logging writes to the same stdout unbuffered ("[Gloo] Rank 1 is connected to 1 peer ranks..."),
# sometimes in the middle of a PASS line; CI saw it glued to one.
GLOO_NOISE = re.compile(
    r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+"
)


def _passed(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = GLOO_NOISE.sub("\n", proc.stdout).splitlines()
    return [line.removeprefix("PASS ") for line in lines if line.startswith("PASS ")]


def test_tensor_parallel_doubles_equal_the_dense_computation():
    assert _passed(_two_ranks("2")) == [
        "rank grid tp=2",
        "column + row parallel forward",
        "column + row parallel input gradient (copy-to-region all-reduce)",
        "create_local_weight stride 2",
        "parallel embedding",
        "parallel cross-entropy, loss and logit gradient",
        "gradient norm reduced over the tensor-parallel group",
        "GQA QKV layer unfused: outputs, input and weight gradients",
        "GQA QKV layer fused: outputs, input and weight gradients",
        "GQA QKV layer frozen: fused fails in backward as NxD's does, unfused trains",
        "tensor-parallel reduce of a gradient is in place",
    ]


def test_data_parallel_doubles_average_gradients_and_spread_checkpoint_files(tmp_path):
    assert _passed(_two_ranks("1", str(tmp_path))) == [
        "rank grid tp=1",
        "bucket all-reduce averages over data-parallel ranks",
        "save_checkpoint spreads tensor files over data-parallel ranks",
    ]


def test_save_checkpoint_raises_when_a_rank_does_not_call_it(tmp_path):
    proc = _two_ranks("missing-rank", str(tmp_path), env={"NXD_DOUBLE_SAVE_TIMEOUT_S": "3"})
    assert proc.returncode != 0
    assert "save_checkpoint (start) must be called by every rank" in proc.stdout + proc.stderr
    assert not (tmp_path / "tag" / "done").exists()


def test_kv_shared_groups_are_arranged_as_nxd_documents_them():
    """The examples of NxD 0.15's ``arrange_kv_groups`` docstring (one tensor group [0, 1, 2, 3], 2 copies)
    and its trn1 TP32 / kv 4 layout, from the double's own function (no process group needed)."""
    script = (
        "import json; from neuronx_distributed.parallel_layers.parallel_state import arrange_kv_groups as a; "
        "print(json.dumps([a(1, 4, 2, sequential_ranks_in_group=True), a(1, 4, 2), a(1, 4, 2, platform='trn2'), "
        "a(1, 32, 4), a(2, 4, 2)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(DOUBLES)}  # the double in its own process, as every run uses it
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sequential, interleaved, trn2, trn1, two_groups = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sequential == [[0, 1], [2, 3]] and interleaved == [[0, 2], [1, 3]] and trn2 == [[0, 1], [2, 3]]
    # trn1 TP32 with 4 copies: (K0..K7)(K0..K7)... so rank j holds head j % 8, grouped with j + 8, j + 16, j + 24.
    assert len(trn1) == 8 and trn1[3] == [3, 11, 19, 27]
    assert two_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
