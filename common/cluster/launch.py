"""How training processes are started on every platform: the torchrun command and the EFA environment."""

from __future__ import annotations

from collections.abc import Sequence

from trnft.common.cluster.instances import Layout

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
    """torchrun with a c10d rendezvous unique to the job (no etcd) around ``python -m <entry> --config``."""
    return [
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


def efa_env() -> dict[str, str]:
    """libfabric over EFA for multi-node collectives."""
    return {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}
