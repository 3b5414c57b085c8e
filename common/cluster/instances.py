"""Instance facts (``common/cluster/instances.yaml``) and the parallel layout derived from them.

Everything a spec needs about hardware is computed here: processes per node, world size, and the
tensor/pipeline/data-parallel split, checked to multiply out before anything is rendered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import yaml

from ..config.run_config import RunConfig
from ..errors import ConfigError
from ..pipeline import backend

# Targets whose NeuronCores the runtime groups by the logical NeuronCore config (LNC): Trainium 2 and 3.
LNC_TARGETS = ("trn2", "trn3")


# The Kubernetes extended resource each accelerator kind's device plugin advertises (and the taint an
# accelerator node group commonly carries), and EFA's: the one place spec rendering takes them from.
DEVICE_RESOURCES = {"neuron": "aws.amazon.com/neuron", "gpu": "nvidia.com/gpu"}
EFA_RESOURCE = "vpc.amazonaws.com/efa"


@dataclass(frozen=True)
class InstanceType:
    """One row of the instance table."""

    name: str
    accelerator: Literal["neuron", "gpu"]
    neuron_devices: int
    neuron_cores: int
    gpus: int
    efa: int
    vcpu: int
    memory_gib: int
    target: str | None = None
    gpu_memory_gib: int | None = None
    device_memory_gib: int | None = None  # HBM of one Trainium chip
    efa_rdma_read: bool = False  # EFA with RDMA read: FI_EFA_USE_DEVICE_RDMA may be set

    def neuron_core_memory_gib(self, logical_nc_config: int = 1) -> float | None:
        """HBM one training process (a logical NeuronCore) has on this instance."""
        if self.device_memory_gib is None or not self.neuron_cores:
            return None
        per_core = self.device_memory_gib * self.neuron_devices / self.neuron_cores
        return per_core * (logical_nc_config if self.target in LNC_TARGETS else 1)

    def ranks_per_node(self, logical_nc_config: int = 1) -> int:
        """Processes per node: one per (logical) NeuronCore, or one per GPU."""
        if self.accelerator == "gpu":
            return self.gpus
        lnc = logical_nc_config if self.target in LNC_TARGETS else 1
        return self.neuron_cores // lnc


@functools.cache
def instance_table() -> dict[str, InstanceType]:
    raw = yaml.safe_load((resources.files("trnft.common.cluster") / "instances.yaml").read_text())
    return {name: InstanceType(name=name, **row) for name, row in raw.items()}


def instance(name: str, key: str = "cluster.instance_type") -> InstanceType:
    table = instance_table()
    if name not in table:
        raise ConfigError(f"{key}: unknown instance type {name!r}; known: {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class Layout:
    """Processes and parallel degrees of the training stages. tp * pp * dp == world."""

    nodes: int
    nproc_per_node: int
    world: int
    tp: int
    pp: int
    dp: int

    def describe(self) -> str:
        return (
            f"{self.nodes} node(s) x {self.nproc_per_node} processes = {self.world}: "
            f"TP={self.tp} x PP={self.pp} x DP={self.dp}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def training_layout(cfg: RunConfig) -> Layout:
    """The layout of the train/compile stages on the cluster, or a ConfigError naming the bad key."""
    inst = instance(cfg.cluster.instance_type)
    platform = backend.of(cfg)
    platform.check_config(cfg)
    if inst.accelerator != platform.accelerator:
        raise ConfigError(
            f"cluster.instance_type: {inst.name} is a {inst.accelerator} instance but model.platform is "
            f"{cfg.model.platform}; choose a {platform.accelerator} instance type"
        )
    nodes = cfg.cluster.num_nodes
    per_node = inst.ranks_per_node(cfg.neuron.logical_nc_config)
    world = nodes * per_node
    tp, pp = platform.model_parallel(cfg)
    if (tp, pp) == (1, 1):
        return Layout(nodes=nodes, nproc_per_node=per_node, world=world, tp=1, pp=1, dp=world)
    if inst.accelerator == "gpu":
        unit = "GPUs"
    else:
        unit = "logical NeuronCores" if inst.target in LNC_TARGETS else "NeuronCores"
    if per_node % tp:
        choices = ", ".join(str(d) for d in _divisors(per_node))
        raise ConfigError(
            f"parallel.tp: {tp} does not divide the {per_node} {unit} of a {inst.name}; use one of {choices}"
        )
    if world % (tp * pp):
        raise ConfigError(
            f"parallel.pp: TP x PP = {tp} x {pp} does not divide the world size {world} "
            f"({nodes} node(s) x {per_node} {unit})"
        )
    dp = world // (tp * pp)
    layout = Layout(nodes=nodes, nproc_per_node=per_node, world=world, tp=tp, pp=pp, dp=dp)
    assert layout.tp * layout.pp * layout.dp == layout.world
    return layout
