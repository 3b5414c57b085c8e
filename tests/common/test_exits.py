"""Exit classes: configuration and input errors are permanent (1-127), infrastructure failures retryable
(128 and above), through `trnft torchrun` as the train pods run it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_config

from trnft.common.errors import ConfigError, TrnftError
from trnft.common.exits import (
    EXIT_OUT_OF_DEVICE_MEMORY,
    EXIT_RETRYABLE,
    exit_code_of_process,
    is_retryable,
    run_command,
)


def _raises(exc: BaseException):
    def work() -> int:
        raise exc

    return work


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as caught:
            raise outer from caught
    except BaseException as done:
        return done


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("train.learning_rate: must be finite"), 2),
        (TrnftError("data.jsonl: line 3 is not JSON"), 1),
        (OSError(errno.ENOSPC, "No space left on device", "/fsx/run/merge"), 1),
        (OSError(errno.EROFS, "Read-only file system", "/fsx/run"), 1),
    ],
    ids=["config", "input", "disk-full", "read-only"],
)
def test_configuration_and_input_errors_are_permanent(exc, code, capsys):
    assert run_command("train", _raises(exc)) == code
    assert not is_retryable(code)
    err = capsys.readouterr().err
    assert err.startswith("trnft train: error: ") and err.strip().count("\n") == 0


def _torch_errors():
    import torch.distributed as dist

    return [
        (dist.DistBackendError("NCCL communicator was aborted on rank 3"), "a collective failed"),
        (dist.DistNetworkError("Connection reset by peer"), "network"),
        (dist.DistStoreError("Timed out after 901 seconds waiting for clients"), "rendezvous store"),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited"), "NCCL"),
        (
            RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7)"),
            "timed out",
        ),
        (RuntimeError("nrt_execute status=1006 NRT_TIMEOUT"), "Neuron runtime"),
        (OSError(errno.ESTALE, "Stale file handle", "/fsx/run/train/checkpoint-40"), "stale"),
        (_chained(ValueError("could not read the batch"), ConnectionResetError("peer gone")), "connection"),
    ]


@pytest.mark.parametrize("index", range(8))
def test_infrastructure_failures_are_retryable(index, capsys):
    exc, words = _torch_errors()[index]
    code = run_command("train", _raises(exc))
    assert code == EXIT_RETRYABLE and is_retryable(code)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("trnft train: error: ") and words in last and "retries" in last


def test_out_of_device_memory_is_permanent_with_what_to_change(capsys):
    import torch

    code = run_command(
        "train", _raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    )
    assert code == EXIT_OUT_OF_DEVICE_MEMORY and not is_retryable(code)
    assert "train.micro_batch_size" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_is_permanent():
    with pytest.raises(KeyError):
        run_command("train", _raises(KeyError("q_proj")))  # Python then exits 1: permanent


def test_signals_become_128_plus_their_number():
    assert exit_code_of_process(-9) == 137 and is_retryable(137)
    assert exit_code_of_process(-15) == 143 and exit_code_of_process(2) == 2


# -- through `trnft torchrun`, as a train pod runs it ---------------------------------------------------


def _torchrun(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node=2", "--monitor_interval=0.2", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


TRNFT_TORCHRUN = [sys.executable, "-m", "trnft.common.cli", "torchrun"]
PLAIN_TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_a_config_error_under_torchrun_exits_with_the_permanent_class(tmp_path):
    config = tmp_path / "run.yaml"
    write_config(config, {"run": {"name": "x", "root": str(tmp_path / "run")}, "train": {"learning_rate": 1}})
    proc = _torchrun(TRNFT_TORCHRUN, "--module", "trnft.common.cli", "train", "--config", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trnft train: error: " in proc.stderr and "exited with 2 (permanent)" in proc.stderr


def test_a_killed_worker_exits_with_the_retryable_class(tmp_path):
    """Rank 1 is SIGKILLed (as the OOM killer does): plain torchrun reports 1, a permanent code to the
    cluster; `trnft torchrun` reports 137, so the ExitCode restart policy retries the job."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(30)\n"
    )
    plain = _torchrun(PLAIN_TORCHRUN, str(worker))
    assert plain.returncode == 1
    ours = _torchrun(TRNFT_TORCHRUN, str(worker))
    assert ours.returncode == 137, ours.stderr[-2000:]
    assert "worker 1 exited with 137 (retryable)" in ours.stderr


def test_torchrun_without_arguments_is_one_line(capsys):
    from trnft.common import cli

    assert cli.main(["torchrun"]) == 1
    assert "give torchrun's flags" in capsys.readouterr().err


def test_the_pods_run_trnft_torchrun():
    from trnft.common.cluster.instances import Layout
    from trnft.common.cluster.launch import torchrun_argv

    layout = Layout(nodes=2, nproc_per_node=8, world=16, tp=1, pp=1, dp=16)
    argv = torchrun_argv(layout, rdzv_endpoint="m:1", rdzv_id="job")
    assert argv[:2] == ["trnft", "torchrun"] and Path(argv[0]).name == "trnft"


def test_a_short_write_without_errno_is_a_full_disk_line(capsys):
    from trnft.common.exits import run_command

    def work():
        raise OSError("15104 requested and 9184 written")

    assert run_command("tokenize", work) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trnft tokenize: error: A write stopped short (9184 of 15104 bytes): the volume is most likely full; "
        "free space or write elsewhere (nothing half-written was kept)"
    ]


def test_a_torchrun_worker_ends_with_its_code_after_pythons_exit_handlers(tmp_path):
    """end_torchrun_worker skips only the interpreter's C++ teardown: atexit handlers (loggers, W&B) run,
    buffered output reaches the pipe, and the exit code is the stage's."""
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, pathlib, sys\n"
        "from trnft.common.cli import end_torchrun_worker\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "print('train: complete', end='')\n"
        "end_torchrun_worker(143)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stdout == "train: complete"
    assert marker.read_text() == "yes"
