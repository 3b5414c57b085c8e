"""How training processes are started on every platform: the torchrun command and the EFA environment.

A pod runs ``trnft torchrun ...`` rather than ``torchrun ...``: the same launcher, except for its exit code.
torchrun exits 1 whenever a worker fails, so a worker killed by the OOM killer would look like a
permanent error to the cluster; ``trnft torchrun`` exits with the first failed worker's own code (a signal
as 128 + its number), so the PyTorchJob ``ExitCode`` restart policy retries exactly the infrastructure
failures (:mod:`trnft.common.exits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .instances import Layout

CONFIG_IN_POD = "/config/run.yaml"
# What each process runs: the train stage of the trnft CLI, unless a caller names another module.
TRAIN_ENTRY = ("trnft.common.cli", "train")


def torchrun_argv(
    layout: Layout,
    *,
    rdzv_endpoint: str,
    rdzv_id: str,
    config_path: str = CONFIG_IN_POD,
    entry: Sequence[str] = TRAIN_ENTRY,
) -> list[str]:
    """``trnft torchrun`` with a c10d rendezvous unique to the job (no etcd) around ``python -m <entry> --config``."""
    return [
        "trnft",
        "torchrun",
        f"--nnodes={layout.nodes}",
        f"--nproc_per_node={layout.nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv_endpoint}",
        f"--rdzv_id={rdzv_id}",
        "--module",
        *entry,
        "--config",
        config_path,
    ]


def rendezvous_endpoint(env: Mapping[str, str]) -> str:
    """``host:port`` of the first pod, as the operator tells a pod: Trainer v2's torch plugin sets
    ``PET_MASTER_ADDR``/``PET_MASTER_PORT``, training-operator v1 ``MASTER_ADDR``/``MASTER_PORT``; locally
    this machine."""
    for addr, port in (("PET_MASTER_ADDR", "PET_MASTER_PORT"), ("MASTER_ADDR", "MASTER_PORT")):
        if env.get(addr):
            return f"{env[addr]}:{env.get(port) or '29500'}"
    return "localhost:29500"


def efa_env(rdma_read: bool) -> dict[str, str]:
    """libfabric over EFA for multi-node collectives; device RDMA only where the EFA device can read
    remotely (libfabric aborts at start-up when told to use it on a device without)."""
    env = {"FI_PROVIDER": "efa", "FI_EFA_FORK_SAFE": "1"}
    if rdma_read:
        env["FI_EFA_USE_DEVICE_RDMA"] = "1"
    return env


def run_torchrun(argv: Sequence[str]) -> int:
    """torchrun's own launcher with ``argv`` (torchrun's flags and the command), exiting as its first
    failed worker did. Rendezvous failures are left to :func:`trnft.common.exits.run_command` (retryable)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .. import stop
    from ..errors import ProcessFailed, TrnftError
    from ..exits import exit_code_of_process, is_retryable

    if not argv:
        raise TrnftError("torchrun: give torchrun's flags and the module to run, as for torchrun itself")
    args = get_args_parser().parse_args(list(argv))
    grace = stop.grace_seconds()
    try:
        with stop.workers_get_grace(grace, args):
            run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code_of_process(failure.exitcode) or 1
        kind = "retryable" if is_retryable(code) else "permanent"
        raise ProcessFailed(
            f"torchrun: worker {rank} exited with {code} ({kind}) and stopped the job; its error is above",
            code,
        ) from exc
    except Exception as exc:
        signum = stop.signal_of_agent_exception(exc)
        if signum is None:
            raise
        # torch's agent forwarded the signal and waited up to `grace` s for the workers (the train loop
        # saves the step it is in); the job was stopped, not failed: 128 + N, retryable.
        raise ProcessFailed(
            f"torchrun: stopped by {stop.signal.Signals(signum).name}; workers had up to {grace}s to save",
            128 + signum,
        ) from exc
    return 0
