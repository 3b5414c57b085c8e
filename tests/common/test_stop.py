"""Stop signals: what an eviction (SIGTERM) does to `trnft torchrun`, a stage, and a local `trnft train`.

Real processes throughout: torch's elastic agent as `trnft torchrun` runs it, workers that are plain scripts.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trnft.common import stop

WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    save_seconds = float(sys.argv[2])

    def on_term(signum, frame):
        time.sleep(save_seconds)  # a step finishing and a checkpoint being written
        open(os.path.join(out, "saved"), "w").close()
        sys.exit(128 + signum)

    if save_seconds >= 0:
        signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(out, "worker.pid"), "w").write(str(os.getpid()))
    time.sleep(120)
    """
)


def _start_torchrun(tmp_path: Path, save_seconds: float, grace: int | None = None) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ}
    if grace is not None:
        env[stop.GRACE_ENV] = str(grace)
    cmd = [sys.executable, "-m", "trnft.common.cli", "torchrun", "--standalone", "--nproc_per_node=1"]
    proc = subprocess.Popen(
        [*cmd, str(script), str(tmp_path), str(save_seconds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "worker.pid").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the worker did not start"
        time.sleep(0.2)
    time.sleep(0.5)
    return proc


def test_sigterm_to_trnft_torchrun_exits_143_not_1(tmp_path):
    proc = _start_torchrun(tmp_path, save_seconds=-1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err


def test_a_sigtermed_worker_exits_trnft_torchrun_with_143(tmp_path):
    proc = _start_torchrun(tmp_path, save_seconds=-1)  # the worker keeps the default SIGTERM action
    os.kill(int((tmp_path / "worker.pid").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]


@pytest.mark.both_lines  # torch 2.8 and 2.14 pass the grace to their workers differently
@pytest.mark.parametrize(("grace", "saved"), [(20, True), (1, False)])
def test_workers_get_the_configured_grace_to_save_before_sigkill(tmp_path, grace, saved):
    """The worker needs 4 s to save after SIGTERM: a 20 s grace lets it, a 1 s grace SIGKILLs it first."""
    proc = _start_torchrun(tmp_path, save_seconds=4, grace=grace)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-2000:]
    assert (tmp_path / "saved").exists() is saved


@pytest.mark.both_lines
def test_torch_elastic_still_shuts_workers_down_with_the_timeout_trnft_sets():
    """How `stop.workers_get_grace` reaches torch's elastic agent, per line. torch 2.14 (current line):
    torchrun's `--shutdown-timeout` (default None, then TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 30), which the agent
    passes to `PContext.close` (torch/distributed/run.py, elastic/agent/server/api.py). torch 2.8 (trn1 line):
    no such option, and `LocalElasticAgent._shutdown` calls `PContext.close(death_sig)` without a timeout, so
    its default is changed (elastic/agent/server/local_elastic_agent.py, elastic/multiprocessing/api.py)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--nproc_per_node=1", "x.py"])
    params = inspect.signature(PContext.close).parameters
    assert list(params)[:3] == ["self", "death_sig", "timeout"] and params["timeout"].default == 30
    if torch.__version__.startswith("2.8."):
        assert not hasattr(args, "shutdown_timeout")
        assert "self._pcontext.close(death_sig)" in inspect.getsource(LocalElasticAgent._shutdown)
        with stop.workers_get_grace(7, args):
            assert inspect.signature(PContext.close).parameters["timeout"].default == 7
        assert inspect.signature(PContext.close).parameters["timeout"].default == 30
    else:
        from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

        assert args.shutdown_timeout is None
        assert "self._pcontext.close(death_sig, timeout)" in inspect.getsource(LocalElasticAgent._shutdown)
        assert "self._shutdown(e.sigval, timeout=self._shutdown_timeout)" in inspect.getsource(
            SimpleElasticAgent.run
        )
        with stop.workers_get_grace(7, args):
            assert args.shutdown_timeout == 7
        given = get_args_parser().parse_args(["--shutdown-timeout=3", "--nproc_per_node=1", "x.py"])
        with stop.workers_get_grace(7, given):
            assert given.shutdown_timeout == 3  # torchrun's own flag wins


def test_sigterm_during_a_staged_stage_removes_its_staging_keeps_the_old_output_and_exits_143(make_run):
    """Tokenize redone with --force, SIGTERMed while it writes into its staging folder: the staging folder
    is gone, the complete output it was replacing is untouched, exit 143."""
    run = make_run()
    before = (run.root / "tokenize" / "manifest.json").read_text()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trnft.common.cli", "tokenize", "--config", str(run.config), "--force"],
        env={**os.environ, "TRNFT_FAULT": "stall-during-tokenize:started"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(run.root.glob("tokenize.staging-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert not list(run.root.glob("tokenize.staging-*"))
    assert (run.root / "tokenize" / "manifest.json").read_text() == before


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_a_local_train_ends_the_processes_it_started(make_run):
    run = make_run(platform="gpu", fsdp={"devices": 2}, train={"max_steps": 10_000, "save_steps": 10_000})
    parent = subprocess.Popen(
        [sys.executable, "-m", "trnft.common.cli", "train", "--config", str(run.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    workers: list[int] = []
    while len(workers) < 2:
        assert parent.poll() is None and time.time() < deadline
        workers = _children(parent.pid)
        time.sleep(0.5)
    time.sleep(3)  # past die_with_parent in each worker
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(_alive(w) for w in workers)


# The encode pool under each stop handler trnft installs. Before worker_pool, a forked worker inherited
# the parent's handler: under the raising one, `Pool.__exit__`'s SIGTERM printed "Process ForkPoolWorker-1:
# Traceback ... Stopped" (2 runs of 3 through the CLI); under the cooperative one a worker blocked on the
# task-queue lock swallowed it and the stage hung for good.
POOL_SCRIPT = textwrap.dedent(
    """
    import sys
    from trnft.common.env import set_process_defaults

    set_process_defaults()  # as the trnft command does first
    from trnft.common import stop, tokenize

    handler, num_proc, repeats, tok = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if handler == "raising":
        stop.install_raising()
    else:
        stop.install_cooperative()
    tokenize.ENCODE_CHUNK = 100
    pairs = [(f"question {i} about item {i % 17}", f"answer {i} " * (1 + i % 5)) for i in range(4000)]
    expected = None
    for _ in range(repeats):
        encoded = tokenize.encode_pairs(pairs, tok, num_proc)
        expected = expected or encoded.ids
        assert encoded.ids == expected
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("handler", ["raising", "cooperative"])
@pytest.mark.parametrize("num_proc", [2, 4])
def test_the_encode_pool_finishes_silently_under_every_stop_handler(tmp_path, tiny_llama, handler, num_proc):
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "TOKENIZERS_PARALLELISM")}
    try:
        done = subprocess.run(
            [sys.executable, str(script), handler, str(num_proc), "10", str(tiny_llama)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the encode pool hung under the {handler} handler: {hung.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr.strip() == "", done.stderr


def test_workers_start_with_default_handlers_and_the_block_is_lifted():
    stop.install_raising()
    try:
        with stop.worker_pool(2) as pool:
            seen = pool.map(_handlers_and_mask, range(2))
        assert signal.getsignal(signal.SIGTERM) is stop._raise  # the parent keeps its own
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # and nothing stays blocked here
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    for handlers, blocked in seen:
        assert handlers == [signal.SIG_DFL] * len(stop.STOP_SIGNALS)
        assert not blocked & set(stop.STOP_SIGNALS)


def _handlers_and_mask(_: int) -> tuple[list, set]:
    return [signal.getsignal(s) for s in stop.STOP_SIGNALS], signal.pthread_sigmask(signal.SIG_BLOCK, [])


STOPPED_POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from trnft.common import stop

    def slow(i):
        time.sleep(60)

    stop.install_raising()
    try:
        with stop.worker_pool(2) as pool:
            open(sys.argv[1], "w").write(" ".join(str(p.pid) for p in pool._pool))
            pool.map(slow, range(4))
    except stop.Stopped as stopped:
        sys.exit(stopped.exit_code)
    """
)


def test_a_stop_signal_during_the_pool_ends_the_stage_with_143_and_leaves_no_worker(tmp_path):
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_POOL_SCRIPT)
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, str(script), str(pids_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not pids_file.is_file() or not pids_file.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    for pid in map(int, pids_file.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
