"""How training processes are started on every platform: the torchrun command and the EFA environment."""

from __future__ import annotations

from trnft.common.cluster.instances import Layout

CONFIG_IN_POD = "/config/run.yaml"


def torchrun_argv(
    layout: Layout, *, rdzv_endpoint: str, rdzv_id: str, config_path: str = CONFIG_IN_POD
) -> list[str]:
    """The train command: torchrun with a c10d rendezvous unique to the job (no etcd)."""
    return [
        "torchrun",
        f"--nnodes={layout.nodes}",
        f"--nproc_per_node={layout.nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv_endpoint}",
        f"--rdzv_id={rdzv_id}",
        "--module",
        "trnft.common.cli",
        "train",
        "--config",
        config_path,
    ]


def efa_env() -> dict[str, str]:
    """libfabric over EFA for multi-node collectives."""
    return {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}
