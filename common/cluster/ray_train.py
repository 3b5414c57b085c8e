"""compile and train as Ray Train runs (``cluster.operator: rayjob``): the ranks are Ray Train workers.

``trnft ray <stage> --config FILE`` is a RayJob's entrypoint (and runs locally against any Ray cluster,
``RAY_ADDRESS``, or a local one it starts). It starts a ``ray.train.torch.TorchTrainer`` whose workers are
the stage's ranks; each worker runs ``trnft <stage>`` in-process, exactly as a torchrun worker does:

* **The process group is Lightning's, as under torchrun.** :class:`TorchrunEnvironment` replaces Ray's
  torch backend: instead of creating the process group itself it gives each worker what torchrun gives a
  process (``MASTER_ADDR``/``MASTER_PORT`` of rank 0, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``TORCHELASTIC_RUN_ID``), so the trainer, its device rules (no
  ``device_id`` on Neuron) and its checkpoints are the ones the other operators run.
* **Retries are Ray's.** ``FailureConfig(max_failures=cluster.backoff_limit)`` is the budget: a worker that
  dies (killed, its node lost) or exits with a retryable code (128 and above, :mod:`trnft.common.exits`)
  restarts the worker group, and the stage resumes from its newest complete checkpoint on the shared volume.
* **A permanent error is not retried.** A worker whose stage exits 1-127 (a config or input error, a full
  volume) records it on an :class:`Outcome` actor before failing; Ray's failure policy cannot be told the
  difference, so a restarted group finds the record and ends at once without running the stage again, and
  this command exits with that code.

The trn1 platform is refused (``model.platform: neuron``): its trainer is optimum-neuron's, started by
torchrun inside ``neuron_parallel_compile``, and Ray's Neuron XLA backend (alpha) starts the XLA runtime its
own way.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config.run_config import RunConfig, dump_config
from ..errors import ConfigError, ProcessFailed, TrnftError
from ..exits import EXIT_RETRYABLE, is_retryable

# Stages a RayJob runs; the others are Jobs on every operator.
RAY_STAGES = ("compile", "train")
RAY_EXTRA = 'pip install "trnft[ray]"'


def check_platform(cfg: RunConfig) -> None:
    """The platforms whose trainer runs as Ray Train workers (the FSDP2 trainer on Lightning)."""
    if cfg.model.platform == "neuron":
        raise ConfigError(
            "cluster.operator: rayjob runs the FSDP2 trainer (model.platform gpu or neuron-native); trn1's "
            "trainer (model.platform neuron) is optimum-neuron's under neuron_parallel_compile, which Ray's "
            "alpha Neuron XLA backend does not start; use cluster.operator trainjob or pytorchjob for trn1"
        )


def parse_resources(items: list[str] | None) -> dict[str, float]:
    """``KEY=NUMBER`` pairs (``GPU=1``, ``neuron_cores=2``) as Ray's ``resources_per_worker``; CPU=1 if none."""
    resources: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not key or number <= 0:
            raise TrnftError(f"--per-worker {item!r}: write RESOURCE=NUMBER, e.g. GPU=1 or neuron_cores=2")
        resources[key] = number
    return resources or {"CPU": 1.0}


def forwarded_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """trnft's own variables of the driver (``TRNFT_*``: debug output, the stop grace, test faults), which the
    workers get as torchrun's processes inherit them; Ray starts its workers from the raylet's environment."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k.startswith("TRNFT_")}


# --------------------------------------------------------------------------------------------------
# Inside the Ray cluster


class Outcome:
    """The first permanent failure of a run (rank, exit code, line), shared by the driver and its workers."""

    def __init__(self) -> None:
        self.failure: tuple[int, int, str] | None = None

    def record(self, rank: int, code: int, line: str) -> None:
        if self.failure is None:
            self.failure = (rank, code, line)

    def permanent(self) -> tuple[int, int, str] | None:
        return self.failure


def _free_address() -> tuple[str, int]:
    """This node's address and a free port (rank 0's, for the rendezvous Lightning makes)."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _torchrun_variables(address: str, port: int, run_id: str) -> None:
    """What torchrun's agent sets for each process, from Ray Train's view of this worker."""
    import ray.train

    context = ray.train.get_context()
    os.environ.update(
        {
            "MASTER_ADDR": address,
            "MASTER_PORT": str(port),
            "RANK": str(context.get_world_rank()),
            "LOCAL_RANK": str(context.get_local_rank()),
            "WORLD_SIZE": str(context.get_world_size()),
            "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
            "GROUP_RANK": str(context.get_node_rank()),
            "NODE_RANK": str(context.get_node_rank()),
            # Lightning (and torch.distributed.is_torchelastic_launched) read this as "started by torchrun".
            "TORCHELASTIC_RUN_ID": run_id,
        }
    )


NEURON_CORES_ENV = "NEURON_RT_VISIBLE_CORES"


def _node_and_neuron_cores() -> tuple[str, str | None]:
    import ray

    return ray.get_runtime_context().get_node_id(), os.environ.get(NEURON_CORES_ENV)


def _core_ids(value: str) -> list[int]:
    """``0,1`` or ``0-3`` (the forms the Neuron runtime reads) as core numbers."""
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def shared_neuron_cores(views: list[tuple[str, str | None]]) -> list[str | None]:
    """For each worker (node, the NeuronCores Ray gave it), the cores of every worker on its node.

    Ray gives each worker only its own NeuronCores; a torchrun process sees the node's and picks its device
    by ``LOCAL_RANK``, which is what the trainer does. So each worker sees its node's union, in order (what
    Ray Train does for GPUs with ``CUDA_VISIBLE_DEVICES``). None where Ray set nothing (no Neuron workers).
    """
    union: dict[str, set[int]] = {}
    for node, cores in views:
        if cores:
            union.setdefault(node, set()).update(_core_ids(cores))
    return [",".join(map(str, sorted(union[node]))) if node in union else None for node, _ in views]


def _set_neuron_cores(cores: str) -> None:
    os.environ[NEURON_CORES_ENV] = cores


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _backend_classes() -> tuple[type, type]:
    """(TorchrunEnvironment, its Backend), built on import of Ray (an optional dependency)."""
    from dataclasses import dataclass

    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    class _TorchrunBackend(Backend):
        share_cuda_visible_devices = True

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            address, port = worker_group.execute_single(0, _free_address)
            worker_group.execute(_torchrun_variables, address, port, backend_config.run_id)
            shared = shared_neuron_cores(worker_group.execute(_node_and_neuron_cores))
            for index, cores in enumerate(shared):
                if cores is not None:
                    worker_group.execute_single(index, _set_neuron_cores, cores)

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(_leave_process_group)

    @dataclass
    class TorchrunEnvironment(TorchConfig):
        """Ray's torch config, but the workers get torchrun's environment and make the process group
        themselves (Lightning, as under torchrun)."""

        run_id: str = "trnft"

        @property
        def backend_cls(self) -> type:
            return _TorchrunBackend

    return TorchrunEnvironment, _TorchrunBackend


def _worker(loop_config: Mapping[str, Any]) -> None:
    """One rank: ``trnft <stage>`` in this worker, its exit code turned into Ray's success or failure."""
    import ray
    import ray.train

    from .. import cli

    outcome = loop_config["outcome"]
    rank = ray.train.get_context().get_world_rank()
    earlier = ray.get(outcome.permanent.remote())
    if earlier is not None:
        # A permanent error ended this run; Ray restarted the group without knowing it. Nothing to redo.
        first_rank, first_code, _ = earlier
        print(
            f"rank {rank}: rank {first_rank} exited with {first_code} (permanent) earlier in this run; "
            "the stage is not run again",
            file=sys.stderr,
            flush=True,
        )
        return
    stage = loop_config["stage"]
    os.environ.update(loop_config["environment"])
    with tempfile.TemporaryDirectory(prefix="trnft-ray-") as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(loop_config["config"])
        # An exception cli.main lets through (what torchrun would report as exit 1) reaches Ray as a worker
        # error and is retried: when a peer dies, the surviving ranks fail with such errors (a closed gloo
        # connection), and only the exit codes trnft chose itself are known to be permanent.
        code = cli.main([stage, "--config", str(config), *(["--force"] if loop_config["force"] else [])])
    if code == 0:
        return
    if is_retryable(code):
        raise RuntimeError(
            f"trnft {stage}: rank {rank} exited with {code} (retryable); Ray restarts the workers"
        )
    ray.get(outcome.record.remote(rank, code, f"trnft {stage} exited with {code} on rank {rank}"))
    raise RuntimeError(f"trnft {stage}: rank {rank} exited with {code} (permanent); not retried")


# --------------------------------------------------------------------------------------------------
# The driver (the RayJob's entrypoint)


def run(
    stage: str,
    cfg: RunConfig,
    *,
    workers: int,
    per_worker: dict[str, float],
    max_failures: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> int:
    """Run ``stage`` on ``workers`` Ray Train workers of the cluster at ``RAY_ADDRESS`` (or a local one).

    Returns 0 when every rank finished; raises :class:`ProcessFailed` with the permanent code of the first
    rank that had one (not retried), or ``EXIT_RETRYABLE`` when Ray's retry budget ran out.
    """
    if stage not in RAY_STAGES:
        raise TrnftError(f"{stage}: Ray Train runs {' or '.join(RAY_STAGES)} only; the other stages are Jobs")
    check_platform(cfg)
    if workers < 1:
        raise TrnftError(f"--workers {workers}: give at least 1 (the ranks of the stage)")
    try:
        import ray
        from ray.train import FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchTrainer
    except ImportError as exc:
        raise TrnftError(f"Ray Train is not installed in this environment; {RAY_EXTRA}") from exc

    budget = cfg.cluster.backoff_limit if max_failures is None else max_failures
    environment_cls, _ = _backend_classes()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    try:
        outcome: Any = ray.remote(num_cpus=0)(Outcome).remote()  # an actor handle
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "stage": stage,
                "config": dump_config(cfg),
                "force": force,
                "outcome": outcome,
                "environment": forwarded_environment(),
            },
            torch_config=environment_cls(run_id=f"{cfg.run.name}-{stage}"),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=per_worker.get("GPU", 0) > 0,
                resources_per_worker=per_worker,
            ),
            run_config=RayRunConfig(
                name=f"{cfg.run.name}-{stage}",
                storage_path=str(Path(cfg.run.root).resolve() / ".trnft" / "ray"),
                failure_config=FailureConfig(max_failures=budget),
            ),
        )
        log(
            f"{stage}: {workers} Ray Train worker(s), {per_worker} each, up to {budget} restart(s) "
            "(FailureConfig.max_failures = cluster.backoff_limit)"
        )
        failed: BaseException | None = None
        try:
            trainer.fit()
        except Exception as exc:  # TrainingFailedError: the budget is spent (or a permanent error with 0)
            failed = exc
        permanent = ray.get(outcome.permanent.remote())
    finally:
        if started_here:
            ray.shutdown()
    if permanent is not None:
        rank, code, _line = permanent
        raise ProcessFailed(
            f"{stage}: rank {rank} exited with {code} (permanent) and the run was not retried; its error is "
            "above",
            code,
        )
    if failed is not None:
        raise ProcessFailed(
            f"{stage}: Ray Train gave up after {budget} restart(s) (cluster.backoff_limit): "
            f"{str(failed).splitlines()[0]}",
            EXIT_RETRYABLE,
        )
    return 0
