"""Kubernetes specs for every stage: computed here, placed by the Jinja templates in ``jobspecs/``.

``render(cfg)`` returns one YAML text per file: ``00-config.yaml`` (the ConfigMap with the resolved run
config, mounted at ``/config/run.yaml``) and ``NN-<stage>.yaml`` for the six stages in order. Every pod
runs ``trnft <stage> --config /config/run.yaml``; training runs the same under torchrun.

Which template a stage uses on which platform:

=========== ======================== ================================================ ==========================================
stage       neuron                   gpu                                              neuron-native
=========== ======================== ================================================ ==========================================
tokenize    Job (CPU)                Job (CPU)                                        Job (CPU)
compile     PyTorchJob (Trainium)    Job (CPU): an explicit no-op                     PyTorchJob (Trainium, trial run, torchrun)
train       PyTorchJob (Trainium)    PyTorchJob (GPU, FSDP2 under torchrun)           PyTorchJob (Trainium, FSDP2 under torchrun)
consolidate Job (CPU)                Job (CPU)                                        Job (CPU)
merge       Job (CPU)                Job (CPU)                                        Job (CPU)
evaluate    Job (GPU if cluster.eval_instance_type, else CPU)
=========== ======================== ================================================ ==========================================

compile and train on accelerators are Kubeflow Trainer v2 TrainJobs (``cluster.operator: trainjob``, the
default; :mod:`trnft.jobspecs.trainjob`) on a ClusterTrainingRuntime per instance type that
``trnft jobspec --runtimes`` renders, or training-operator v1 PyTorchJobs (``cluster.operator: pytorchjob``).

Instance facts come from ``common/cluster/instances.yaml``; processes, world size and TP x PP x DP are derived
and checked (:func:`trnft.common.instances.training_layout`) before anything is rendered. The Hugging
Face token is only ever a Secret reference.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import yaml

from ..common import stop
from ..common.cluster import launch, ray_train
from ..common.cluster.instances import (
    DEVICE_RESOURCES,
    EFA_RESOURCE,
    InstanceType,
    Layout,
    instance,
    training_layout,
)
from ..common.config.run_config import (
    RunConfig,
    dump_config,
    load_config,
    pinned_by_digest,
    stable_hash,
)
from ..common.errors import ConfigError, TrnftError
from ..common.exits import FIRST_RETRYABLE
from ..common.pipeline import backend, registry
from ..common.pipeline.atomic import swap_into_place
from ..common.pipeline.registry import JOB_TEMPLATE
from . import admission, rayjob, trainjob

CONFIG_DIR = "/config"
CONFIG_FILE = "00-config.yaml"
CONTAINER = "pytorch"  # the PyTorchJob webhook needs one container named so; Jobs use it too for uniformity


def stage_files() -> dict[str, str]:
    """Each stage's spec file, numbered in pipeline order (``00-config.yaml`` comes first)."""
    return {stage: f"{i:02d}-{stage}.yaml" for i, stage in enumerate(registry.names(), start=1)}


def template_of(cfg: RunConfig, stage: str) -> str:
    """The Jinja template a stage's job uses on ``cfg``'s platform (the stage's spec says; see the table in
    this module's docstring)."""
    return registry.spec(stage).templates.get(cfg.model.platform, JOB_TEMPLATE)


# Platforms whose compile stage is the train job's torchrun itself running `trnft compile` (a trial run that
# fills a just-in-time compile cache), rather than a command that starts its own processes.
COMPILE_UNDER_TORCHRUN = ("neuron-native",)

# Failure handling (the exit classes of trnft.common.exits). PyTorchJobs: training-operator v1.9's ExitCode
# policy restarts a replica only for a retryable exit (128 and above) and fails the job on 1-127.
RESTART_POLICY = "ExitCode"
# Seconds of a training pod's termination grace beyond cluster.stop_grace_seconds: the exit after the save.
STOP_MARGIN_S = 30
# A failed job deletes its still-running pods (they hold accelerators and EFA interfaces and would wait
# out a rendezvous that cannot complete); finished pods stay for their logs.
CLEAN_POD_POLICY = "Running"
PERMANENT_EXIT_CODES = list(range(1, FIRST_RETRYABLE))
ZONE_KEY = "topology.kubernetes.io/zone"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_SCHEDULER = "volcano"


def pod_failure_policy() -> dict[str, Any]:
    """batch/v1 Jobs: the same classes as the PyTorchJobs. An evicted or preempted pod (node drain, spot
    reclaim: condition DisruptionTarget) is retried without counting against backoffLimit; a permanent exit
    code fails the Job at once; anything else (a retryable exit) counts against backoffLimit."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": PERMANENT_EXIT_CODES},
            },
        ]
    }


@dataclass(frozen=True)
class Placement:
    """Where a stage's pods run and what hardware they ask for."""

    kind: str  # "cpu" | "neuron" | "gpu"
    instance: InstanceType | None
    devices: int = 0
    efa: int = 0


@dataclass
class Pod:
    """A pod as _pod.yaml.j2 writes it for every operator; a field left None is not written (the runtime's
    node pod has no command, the TrainJob's patch no image)."""

    labels: dict[str, str] | None
    annotations: dict[str, str]
    image: str | None
    image_pull_policy: str | None
    command: list[str] | None
    env: list[dict[str, Any]] | None
    resources: dict[str, dict[str, str]] | None
    volume_mounts: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    node_selector: dict[str, str] | None
    tolerations: list[dict[str, Any]]
    service_account: str | None
    security_context: dict[str, Any] | None = None
    restart_policy: str | None = None
    container_name: str = CONTAINER
    affinity: dict[str, Any] | None = None
    scheduler_name: str | None = None
    termination_grace_seconds: int | None = None


@dataclass
class Document:
    """Values for one template."""

    template: str
    header: str
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    pod: Pod | None = None
    backoff_limit: int = 3
    nproc_per_node: str = ""
    workers: int = 0
    restart_policy: str = RESTART_POLICY
    run_policy: dict[str, Any] = field(default_factory=dict)
    pod_failure_policy: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""
    train_job: trainjob.TrainJobValues | None = None  # trainjob.yaml.j2
    runtime: trainjob.RuntimeValues | None = None  # clustertrainingruntime.yaml.j2
    ray_job: rayjob.RayJobValues | None = None  # rayjob.yaml.j2
    head_pod: Pod | None = None  # the RayJob's head (the driver), beside its worker group's pod

    def text(self) -> str:
        """The document as YAML, written by its template."""
        return _environment().get_template(self.template).render(doc=self)

    def body(self) -> dict[str, Any]:
        """The document as the API server would read it (parsed from :meth:`text`)."""
        return yaml.safe_load(self.text())


def job_name(cfg: RunConfig, stage: str) -> str:
    """``<run.name>-<stage>``: a DNS-1035 label, stable per run and stage (so a rerun is delete + apply)."""
    name = f"{cfg.run.name}-{stage}"
    assert len(name) <= 63, name
    return name


# --------------------------------------------------------------------------------------------------
# Checks that need the cluster view of the config


def _under(path: str, mount: str) -> bool:
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p == m or m in p.parents


def check_cluster_config(cfg: RunConfig) -> None:
    """Refuse values that cannot work in a pod, naming the key.

    Paths must be absolute and on the shared volume (the pods see nothing else); the image must be set.
    """
    c = cfg.cluster
    mount = c.storage.mount_path
    if not c.image:
        raise ConfigError("cluster.image: not set; use the URI that containers/build-and-push.sh printed")
    if not PurePosixPath(mount).is_absolute():
        raise ConfigError(f"cluster.storage.mount_path: must be an absolute path, got {mount!r}")
    paths = [("run.root", cfg.run.root)]
    paths += [("dataset.files", f) for f in cfg.dataset.files or []]
    for key, value in (
        ("model.name_or_path", cfg.model.name_or_path),
        ("model.tokenizer", cfg.model.tokenizer),
    ):
        if value and value.startswith("/"):
            paths.append((key, value))
    if cfg.eval.scorer_model:
        paths.append(("eval.scorer_model", cfg.eval.scorer_model))
    paths += backend.of(cfg).shared_volume_paths(cfg)
    for key, value in paths:
        if not _under(value, mount):
            raise ConfigError(
                f"{key}: {value} is not on the shared volume mounted at {mount} (cluster.storage.mount_path); "
                "pods see only that volume"
            )
    if c.num_nodes > 1 and not c.zone and c.gang_scheduler == "none":
        # The pods follow the first one's zone (EFA works within one zone); without a gang scheduler that
        # zone may lack room for the rest, which then wait out the rendezvous, fail, and are retried.
        raise ConfigError(
            f"cluster.num_nodes: {c.num_nodes} nodes need cluster.zone (the zone with your capacity and FSx "
            "volume) or cluster.gang_scheduler: kueue or volcano (all pods placed together, or none)"
        )
    if c.operator == "rayjob":
        ray_train.check_platform(cfg)
        if c.gang_scheduler == "volcano":
            raise ConfigError(
                "cluster.gang_scheduler: volcano is not rendered for cluster.operator rayjob (KubeRay's batch "
                "scheduler is an operator setting); use kueue, which admits a RayJob as a whole"
            )
        stages = ["compile", "train"] if backend.of(cfg).compiles_graphs else ["train"]
        longest = max((job_name(cfg, s) for s in stages), key=len)
        if len(longest) > rayjob.MAX_RAYJOB_NAME:
            suffix = len(longest) - len(cfg.run.name)
            raise ConfigError(
                f"run.name: the RayJob {longest} has {len(longest)} characters; KubeRay admits at most "
                f"{rayjob.MAX_RAYJOB_NAME} (its RayCluster adds 6); use a run.name of at most "
                f"{rayjob.MAX_RAYJOB_NAME - suffix} characters"
            )
    if c.eval_image and not c.eval_instance_type:
        raise ConfigError(
            "cluster.eval_image: set only with cluster.eval_instance_type (evaluate on GPU nodes)"
        )


# --------------------------------------------------------------------------------------------------
# Pieces of a pod


def _labels(cfg: RunConfig, stage: str, placement: Placement) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "trnft",
        "app.kubernetes.io/instance": cfg.run.name,
        "trnft.dev/run": cfg.run.name,
        "trnft.dev/stage": stage,
        "trnft.dev/accelerator": placement.kind if placement.kind != "cpu" else "none",
    }


def _env(cfg: RunConfig, stage: str, extra: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": f"{cfg.cluster.storage.mount_path}/hf-cache"},
        {"name": "TRNFT_RUN", "value": cfg.run.name},
        {"name": "TRNFT_JOB_NAME", "value": job_name(cfg, stage)},
    ]
    if registry.spec(stage).offline:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if cfg.cluster.hf_token_secret:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": cfg.cluster.hf_token_secret, "key": "HF_TOKEN"}},
            }
        )
    env += [{"name": k, "value": v} for k, v in extra.items()]
    return env


def _volumes(cfg: RunConfig, shm_gib: int) -> tuple[list[dict], list[dict]]:
    volumes: list[dict[str, Any]] = [
        {"name": "run-storage", "persistentVolumeClaim": {"claimName": cfg.cluster.storage.claim_name}},
        {"name": "run-config", "configMap": {"name": f"{cfg.run.name}-config"}},
        # A pod's /dev/shm is 64 MiB by default; DataLoader workers and collectives need more.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "run-storage", "mountPath": cfg.cluster.storage.mount_path},
        {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


_QUOTA_RESOURCES = f"{' or '.join(DEVICE_RESOURCES.values())}, {EFA_RESOURCE}, cpu, memory"


def _resources(cfg: RunConfig, placement: Placement) -> dict[str, dict[str, str]]:
    if placement.kind == "cpu":
        requests = dict(cfg.cluster.cpu_requests)
        limits = {"memory": requests["memory"]} if "memory" in requests else {}
        return {"requests": requests, "limits": limits}
    inst = placement.instance
    assert inst is not None
    devices = {DEVICE_RESOURCES[placement.kind]: str(placement.devices)}
    if placement.efa:
        devices[EFA_RESOURCE] = str(placement.efa)
    share = placement.devices / (inst.neuron_devices or inst.gpus)
    # Ask for most of the node's CPU and memory in proportion to the devices, leaving room for daemons.
    host = {
        "cpu": str(max(1, math.floor(inst.vcpu * 0.8 * share))),
        "memory": f"{math.floor(inst.memory_gib * 0.8 * share)}Gi",
    }
    return {"requests": {**devices, **host}, "limits": dict(devices)}


def _accelerator_toleration(kind: str) -> dict[str, Any]:
    # Accelerator node groups are commonly tainted with their device resource name.
    return {"key": DEVICE_RESOURCES[kind], "operator": "Exists", "effect": "NoSchedule"}


def _tolerations(cfg: RunConfig, placement: Placement) -> list[dict[str, Any]]:
    if placement.kind == "cpu":
        return []
    auto = _accelerator_toleration(placement.kind)
    tolerations = [dict(t) for t in cfg.cluster.tolerations]
    if auto not in tolerations:
        tolerations.append(auto)
    return tolerations


def _shm_gib(placement: Placement) -> int:
    inst = placement.instance
    return 2 if placement.kind == "cpu" else max(8, (inst.memory_gib if inst else 64) // 8)


def _pod(
    cfg: RunConfig, stage: str, placement: Placement, command: list[str], extra_env: dict[str, str],
    *, restart_policy: str | None, image: str, nodes: int = 1,
) -> Pod:  # fmt: skip
    inst = placement.instance
    volumes, mounts = _volumes(cfg, _shm_gib(placement))
    node_selector = {}
    selector_type = inst.name if inst is not None else cfg.cluster.cpu_instance_type
    if selector_type:
        node_selector["node.kubernetes.io/instance-type"] = selector_type
    if cfg.cluster.zone:
        # Every stage in the zone of the shared volume and of each other (FSx for Lustre is zonal).
        node_selector[ZONE_KEY] = cfg.cluster.zone
    annotations = {"trnft.dev/config-hash": stable_hash(cfg)[:16]}
    if placement.kind != "cpu":
        # Long accelerator jobs must not be consolidated away by the autoscaler mid-run.
        annotations["karpenter.sh/do-not-disrupt"] = "true"
    return Pod(
        labels=_labels(cfg, stage, placement),
        annotations=annotations,
        image=image,
        image_pull_policy=cfg.cluster.image_pull_policy,
        command=command,
        env=_env(cfg, stage, extra_env),
        resources=_resources(cfg, placement),
        volume_mounts=mounts,
        volumes=volumes,
        node_selector=node_selector,
        tolerations=_tolerations(cfg, placement),
        service_account=cfg.cluster.service_account,
        security_context={"capabilities": {"add": ["IPC_LOCK"]}} if placement.efa else None,
        restart_policy=restart_policy,
        affinity=_same_zone_affinity(cfg, stage) if nodes > 1 and not cfg.cluster.zone else None,
        scheduler_name=VOLCANO_SCHEDULER if _volcano(cfg, nodes) else None,
    )


def _same_zone_affinity(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """Every pod of a multi-node job in the zone of the job's other pods (EFA does not cross zones).

    The first pod matches its own selector, which the scheduler accepts when no other pod exists yet; the
    rest follow it. ``cluster.zone`` pins a zone instead (a node selector).
    """
    return {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": {"trnft.dev/run": cfg.run.name, "trnft.dev/stage": stage}
                    },
                    "topologyKey": ZONE_KEY,
                }
            ]
        }
    }


def _queue_labels(cfg: RunConfig) -> dict[str, str]:
    """Kueue admits a job, all its pods at once, from the LocalQueue named by this label."""
    queue = cfg.cluster.queue
    return {KUEUE_QUEUE_LABEL: queue} if cfg.cluster.gang_scheduler == "kueue" and queue else {}


def _volcano(cfg: RunConfig, nodes: int) -> bool:
    """Volcano gang-schedules multi-node jobs (a single pod needs no PodGroup)."""
    return cfg.cluster.gang_scheduler == "volcano" and nodes > 1


def _run_policy(cfg: RunConfig, nodes: int) -> dict[str, Any]:
    policy: dict[str, Any] = {"backoffLimit": cfg.cluster.backoff_limit, "cleanPodPolicy": CLEAN_POD_POLICY}
    if _volcano(cfg, nodes):
        # The operator makes a Volcano PodGroup: no pod starts until all `nodes` can.
        scheduling: dict[str, Any] = {"minAvailable": nodes}
        if cfg.cluster.queue:
            scheduling["queue"] = cfg.cluster.queue
        policy["schedulingPolicy"] = scheduling
    return policy


# --------------------------------------------------------------------------------------------------
# Documents


def _stage_command(stage: str) -> list[str]:
    return ["trnft", stage, "--config", f"{CONFIG_DIR}/run.yaml"]


def _training_documents(cfg: RunConfig, stage: str, layout: Layout) -> Document:
    """compile/train on Trainium, train on GPUs: a PyTorchJob of ``layout.nodes`` pods."""
    inst = instance(cfg.cluster.instance_type)
    multi_node = layout.nodes > 1
    efa = inst.efa if multi_node else 0
    placement = Placement(
        kind=inst.accelerator, instance=inst, devices=inst.neuron_devices or inst.gpus, efa=efa
    )
    name = job_name(cfg, stage)
    env = backend.of(cfg).launch_env(cfg, inst, layout)
    if efa:
        env.update(launch.efa_env(inst.efa_rdma_read))
    if cfg.cluster.operator == "rayjob":
        return _rayjob_document(cfg, stage, layout, inst, placement, env)
    trainer_v2 = cfg.cluster.operator == "trainjob"
    if stage == "train" or cfg.model.platform in COMPILE_UNDER_TORCHRUN:
        # The operator injects MASTER_ADDR/MASTER_PORT (Trainer v2: PET_MASTER_ADDR/PET_MASTER_PORT); kubelet
        # expands $(VAR) in the command.
        command = launch.torchrun_argv(
            layout,
            rdzv_endpoint=trainjob.MASTER_ENDPOINT if trainer_v2 else "$(MASTER_ADDR):$(MASTER_PORT)",
            rdzv_id=name,
            entry=("trnft.common.cli", stage),
        )
    else:
        # `trnft compile` wraps the same torchrun command in neuron_parallel_compile (trnft.neuron.compile).
        command = _stage_command(stage)
    # A stop signal reaches `trnft torchrun`, which gives the workers cluster.stop_grace_seconds to save
    # the step they are in (trnft.common.stop); the pod's grace covers that plus the exit.
    env[stop.GRACE_ENV] = str(cfg.cluster.stop_grace_seconds)
    pod = _pod(
        cfg, stage, placement, command, env, restart_policy=None, image=cfg.cluster.image, nodes=layout.nodes
    )
    pod.termination_grace_seconds = cfg.cluster.stop_grace_seconds + STOP_MARGIN_S
    header = f"trnft {stage} for run {cfg.run.name}: {layout.describe()} on {inst.name}"
    labels = {**(pod.labels or {}), **_queue_labels(cfg)}
    annotations = {
        "trnft.dev/world-size": str(layout.world),
        "trnft.dev/parallel": f"tp={layout.tp},pp={layout.pp},dp={layout.dp}",
    }
    if trainer_v2:
        volcano = _volcano(cfg, layout.nodes)
        runtime = trainjob.runtime_name(inst.name, volcano)
        annotations["trnft.dev/runtime"] = runtime
        values = trainjob.trainjob_values(
            runtime=runtime,
            pod=pod,
            nodes=layout.nodes,
            nproc_per_node=layout.nproc_per_node,
            volcano_queue=cfg.cluster.queue if volcano else None,
        )
        return Document(
            template="trainjob.yaml.j2",
            header=header,
            name=name,
            namespace=cfg.cluster.namespace,
            labels=labels,
            annotations=annotations,
            pod=pod,
            train_job=values,
        )
    return Document(
        template=template_of(cfg, stage),
        header=header,
        name=name,
        namespace=cfg.cluster.namespace,
        labels=labels,
        annotations=annotations,
        pod=pod,
        nproc_per_node=str(layout.nproc_per_node),
        workers=layout.nodes - 1,
        run_policy=_run_policy(cfg, layout.nodes),
    )


def _rayjob_document(
    cfg: RunConfig, stage: str, layout: Layout, inst: InstanceType, placement: Placement, env: dict[str, str]
) -> Document:
    """compile/train as a KubeRay RayJob: a CPU head running ``trnft ray <stage>`` (the driver) and one
    worker group of ``layout.nodes`` accelerator pods whose Ray workers are the ranks."""
    name = job_name(cfg, stage)
    values = rayjob.rayjob_values(stage, f"{CONFIG_DIR}/run.yaml", inst, layout)
    # KubeRay writes the Ray containers' command (`ray start`); a command of ours would run before it.
    pod = _pod(
        cfg, stage, placement, [], env, restart_policy=None, image=cfg.cluster.image, nodes=layout.nodes
    )
    pod.command = None
    pod.termination_grace_seconds = cfg.cluster.stop_grace_seconds + STOP_MARGIN_S
    head = _pod(
        cfg,
        stage,
        Placement(kind="cpu", instance=None),
        [],
        env,
        restart_policy=None,
        image=cfg.cluster.image,
    )
    head.command = None
    # The head holds the driver and Ray's control plane: if the autoscaler consolidates its node away the
    # whole RayJob fails, so it is as undisruptable as the accelerator pods.
    head.annotations["karpenter.sh/do-not-disrupt"] = "true"
    return Document(
        template="rayjob.yaml.j2",
        header=f"trnft {stage} for run {cfg.run.name} under Ray Train: {layout.describe()} on {inst.name}",
        name=name,
        namespace=cfg.cluster.namespace,
        labels={**(pod.labels or {}), **_queue_labels(cfg)},
        annotations={
            "trnft.dev/world-size": str(layout.world),
            "trnft.dev/parallel": f"tp={layout.tp},pp={layout.pp},dp={layout.dp}",
        },
        pod=pod,
        head_pod=head,
        ray_job=values,
    )


def _job_document(cfg: RunConfig, stage: str, placement: Placement, image: str, header: str) -> Document:
    pod = _pod(cfg, stage, placement, _stage_command(stage), {}, restart_policy="Never", image=image)
    return Document(
        template=template_of(cfg, stage),
        header=header,
        name=job_name(cfg, stage),
        namespace=cfg.cluster.namespace,
        labels={**(pod.labels or {}), **_queue_labels(cfg)},
        pod=pod,
        backoff_limit=cfg.cluster.backoff_limit,
        pod_failure_policy=pod_failure_policy(),
    )


def _evaluate_placement(cfg: RunConfig) -> tuple[Placement, str]:
    if not cfg.cluster.eval_instance_type:
        return Placement(kind="cpu", instance=None), cfg.cluster.image
    inst = instance(cfg.cluster.eval_instance_type, "cluster.eval_instance_type")
    if inst.accelerator != "gpu":
        raise ConfigError(f"cluster.eval_instance_type: {inst.name} has no GPUs; evaluate on GPU runs vLLM")
    if cfg.eval.tensor_parallel_size > inst.gpus:
        raise ConfigError(
            f"eval.tensor_parallel_size: {cfg.eval.tensor_parallel_size} exceeds the {inst.gpus} GPUs of a {inst.name}"
        )
    return Placement(
        kind="gpu", instance=inst, devices=cfg.eval.tensor_parallel_size
    ), cfg.cluster.eval_image or cfg.cluster.image


def runtime_document(cfg: RunConfig) -> Document:
    """The ClusterTrainingRuntime this config's TrainJobs reference (``trnft jobspec --runtimes``)."""
    inst = instance(cfg.cluster.instance_type)
    layout = training_layout(cfg)
    volcano = _volcano(cfg, layout.nodes)
    name = trainjob.runtime_name(inst.name, volcano)
    placement = Placement(kind=inst.accelerator, instance=inst, devices=inst.neuron_devices or inst.gpus)
    volumes, mounts = _volumes(cfg, _shm_gib(placement))
    pod = Pod(
        labels=None,
        # Long accelerator jobs must not be consolidated away mid-run.
        annotations={"karpenter.sh/do-not-disrupt": "true"},
        container_name=trainjob.NODE,
        # A default: every TrainJob sets spec.trainer.image (the CRD requires one here).
        image=cfg.cluster.image,
        # Trainer v2.3.0 patches no pull policy per TrainJob; images are pinned by digest (trnft jobspec).
        image_pull_policy="IfNotPresent",
        command=None,
        env=None,
        resources=_resources(cfg, placement),  # a whole node; a TrainJob's resourcesPerNode replaces them
        volume_mounts=[m for m in mounts if m["name"] == "shm"],
        volumes=[v for v in volumes if v["name"] == "shm"],
        node_selector={"node.kubernetes.io/instance-type": inst.name},
        tolerations=[_accelerator_toleration(inst.accelerator)],
        service_account=None,
        security_context={"capabilities": {"add": ["IPC_LOCK"]}} if inst.efa else None,  # EFA pins memory
        restart_policy="Never",  # required with a podFailurePolicy
        scheduler_name=VOLCANO_SCHEDULER if volcano else None,
    )
    return Document(
        template="clustertrainingruntime.yaml.j2",
        header=(
            f"Kubeflow Trainer v2 runtime of trnft's TrainJobs on {inst.name}"
            + (" (Volcano gang scheduling)" if volcano else "")
            + "; cluster-scoped, applied once per cluster by an admin"
        ),
        name=name,
        namespace="",
        labels=trainjob.runtime_labels(inst.accelerator),
        annotations={"trnft.dev/instance-type": inst.name},
        pod=pod,
        runtime=trainjob.runtime_values(volcano),
    )


def runtime_file(cfg: RunConfig) -> str:
    return f"runtime-{runtime_document(cfg).name}.yaml"


def render_runtimes(cfg: RunConfig) -> dict[str, str]:
    """File name -> YAML text of the runtime this config's TrainJobs need."""
    check_cluster_config(cfg)
    return {runtime_file(cfg): runtime_document(cfg).text()}


def plan(cfg: RunConfig) -> dict[str, Document]:
    """Every document's values, checked. Raises ConfigError naming the key of any impossible value."""
    check_cluster_config(cfg)
    layout = training_layout(cfg)
    cpu = Placement(kind="cpu", instance=None)
    docs = {
        CONFIG_FILE: Document(
            template="configmap.yaml.j2",
            header=f"trnft run config of {cfg.run.name}; every stage reads it at {CONFIG_DIR}/run.yaml",
            name=f"{cfg.run.name}-config",
            namespace=cfg.cluster.namespace,
            labels={"app.kubernetes.io/name": "trnft", "trnft.dev/run": cfg.run.name},
            config_yaml=dump_config(cfg),
        )
    }
    for stage in registry.names():
        file = stage_files()[stage]
        if stage == "train" or (stage == "compile" and backend.of(cfg).compiles_graphs):
            docs[file] = _training_documents(cfg, stage, layout)
        elif stage == "evaluate":
            placement, image = _evaluate_placement(cfg)
            where = f"{placement.instance.name} GPUs" if placement.instance else "CPU"
            docs[file] = _job_document(
                cfg, stage, placement, image, f"trnft evaluate for run {cfg.run.name} on {where}"
            )
        else:
            what = "no-op on the GPU path, writes its manifest" if stage == "compile" else "CPU"
            docs[file] = _job_document(
                cfg, stage, cpu, cfg.cluster.image, f"trnft {stage} for run {cfg.run.name} ({what})"
            )
    _check_derived_objects(cfg, docs)
    return docs


def _check_derived_objects(cfg: RunConfig, docs: dict[str, Document]) -> None:
    """Refuse a config whose TrainJobs the API server would accept but whose JobSet, Jobs or pods the
    controllers could never create (trnft.jobspecs.admission): the job would wait forever."""
    if cfg.cluster.operator != "trainjob":
        return
    runtime = runtime_document(cfg).body()
    for doc in docs.values():
        if doc.train_job is None:
            continue
        for path, message in admission.trainjob_problems(doc.body(), runtime):
            raise ConfigError(
                f"run.name / cluster.num_nodes: the {doc.name} TrainJob would never start: {path}: {message}; "
                f"use a shorter run.name (now {len(cfg.run.name)} characters)"
            )


class _SpecDumper(yaml.SafeDumper):
    """Block-style YAML; multi-line strings (the run config) as literal blocks."""


_SpecDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    # A list of numbers (the permanent exit codes) on one line; everything else in block style.
    flow = bool(items) and all(isinstance(i, int) and not isinstance(i, bool) for i in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow or None)


_SpecDumper.add_representer(list, _represent_list)


def nested(value: Any, indent: int) -> str:
    """Place ``value`` after a ``key:`` as an indented block (or inline when empty or scalar)."""
    if isinstance(value, (dict, list)) and value:
        text = yaml.dump(value, Dumper=_SpecDumper, default_flow_style=False, sort_keys=False, width=1000)
        pad = " " * indent
        return "\n" + "\n".join(pad + line for line in text.rstrip("\n").split("\n"))
    return (
        " "
        + yaml.dump(value, Dumper=_SpecDumper, default_flow_style=True, width=1000)
        .strip()
        .removesuffix("...")
        .strip()
    )


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("trnft.jobspecs", ""),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["nested"] = nested
    env.filters["document"] = lambda value: yaml.dump(
        value, Dumper=_SpecDumper, default_flow_style=False, sort_keys=False, width=1000
    ).rstrip("\n")
    return env


def render(cfg: RunConfig) -> dict[str, str]:
    """File name -> YAML text for every document, in apply order."""
    return {file: doc.text() for file, doc in plan(cfg).items()}


RUNTIME_RESOURCE = "clustertrainingruntimes.trainer.kubeflow.org"


# How long `trnft submit --wait` watches each stage before it gives up watching (the job keeps running).
def apply_lines(out: Path, cfg: RunConfig) -> list[str]:
    """The commands that run the stages in order, each only after the previous one succeeded.

    ``trnft submit`` deletes a finished job of the same name before applying (Job templates are
    immutable), so the same line reruns a failed stage; ``--wait`` ends with non-zero as soon as the stage
    fails, or when its bounded timeout passes.
    """
    lines = [f"kubectl apply -f {out / CONFIG_FILE}"]
    if cfg.cluster.operator == "trainjob":
        # Fails at once, before any stage runs, when the admin has not applied the runtime yet.
        lines.insert(0, f"kubectl get {RUNTIME_RESOURCE}/{runtime_document(cfg).name}")
    for stage in registry.names():
        lines.append(
            f"trnft submit {out / stage_files()[stage]} --wait --timeout {registry.spec(stage).wait_timeout}"
        )
    return lines


def write_atomically(out: Path, files: dict[str, str]) -> None:
    """Replace ``out`` with exactly ``files``; a failure leaves the old folder (or nothing) in place."""
    if out.exists():
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in files and not (p.suffix == ".yaml" and p.name[:2].isdigit())
        ]
        if foreign:
            raise TrnftError(
                f"{out}: holds files trnft did not write ({', '.join(sorted(foreign)[:3])}); choose an empty OUTDIR"
            )
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def command(args: Any, log: Callable[[str], None]) -> int:
    """``trnft jobspec``: render (or take ``--files``), validate, write atomically, print apply lines."""
    from . import validate as k8s_validate

    if args.files:
        problems = k8s_validate.validate_files([Path(f) for f in args.files])
        for line in problems:
            log(line)
        log(f"{len(args.files)} file(s): {'valid' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    cfg = load_config(args.config, args.overrides)
    runtimes = getattr(args, "runtimes", False)
    if runtimes and cfg.cluster.operator != "trainjob":
        raise ConfigError(
            f"--runtimes: cluster.operator is {cfg.cluster.operator}, which needs no runtime (only TrainJobs "
            "name one); set cluster.operator=trainjob"
        )
    files = render_runtimes(cfg) if runtimes else render(cfg)
    if args.validate:
        docs = [(name, doc) for name, text in files.items() for doc in yaml.safe_load_all(text) if doc]
        problems = k8s_validate.validate_documents(docs)
        if cfg.cluster.operator == "trainjob" and not runtimes:
            # Every TrainJob against the runtime it names, as Trainer's webhook checks its patches.
            problems += k8s_validate.trainjob_runtime_problems(docs, runtime_document(cfg).body())
        if problems:
            raise TrnftError(
                f"rendered specs are invalid ({len(problems)} problem(s)): " + "; ".join(problems)
            )
    out = Path(args.out)
    write_atomically(out, files)
    if runtimes:
        (name,) = files
        log(f"wrote {out / name}" + (" (validated)" if args.validate else ""))
        log(
            f"apply it once per cluster, with rights on cluster-scoped objects: kubectl apply -f {out / name} "
            "(reapplying is safe; a changed runtime applies to TrainJobs created afterwards)"
        )
        return 0
    layout = training_layout(cfg)
    log(
        f"wrote {len(files)} specs to {out}/ for run {cfg.run.name}: {layout.describe()}"
        + (" (validated)" if args.validate else "")
    )
    log(
        "run in order (each line waits for its stage and stops at a failure; rerun a failed stage with its line):"
    )
    for line in apply_lines(out, cfg):
        log(f"  {line}")
    if cfg.cluster.operator == "trainjob":
        log(
            f"note: compile and train are TrainJobs on ClusterTrainingRuntime {runtime_document(cfg).name} "
            "(Kubeflow Trainer v2.3+, JobSet v0.10+); have a cluster admin apply it once: "
            + shlex.join(
                [
                    "trnft",
                    "jobspec",
                    *(f"--config={c}" for c in args.config),
                    *args.overrides,
                    "--runtimes",
                    "--out",
                    "runtimes",
                ]
            )
        )
    if cfg.cluster.gang_scheduler == "kueue" and cfg.cluster.operator == "trainjob":
        log(
            "note: Kueue v0.17 or later (v0.14-v0.16 cannot place Trainer v2.3 TrainJobs; its trainjob integration "
            "is on by default) admits the TrainJobs "
            f"and the Jobs from LocalQueue {cfg.cluster.queue}; set waitForPodsReady and give the ClusterQueue "
            f"quota for every resource the pods request ({_QUOTA_RESOURCES}) (README, Kueue)"
        )
        log(
            "note: a ResourceFlavor with tolerations of its own replaces the TrainJob pods' tolerations "
            "(Kueue's runtime patch); such a flavor must also carry "
            + json.dumps(
                _tolerations(
                    cfg, Placement(kind=instance(cfg.cluster.instance_type).accelerator, instance=None)
                )
            )
        )
    elif cfg.cluster.gang_scheduler == "kueue":
        log(
            "note: Kueue queues these PyTorchJobs only with its `kubeflow.org/pytorchjob` integration enabled "
            "(off by default and deprecated since Kueue v0.19): add it to integrations.frameworks of the Kueue "
            "Configuration, set waitForPodsReady, and give the ClusterQueue quota for every resource the pods "
            f"request ({_QUOTA_RESOURCES}); otherwise they run unqueued (README, Kueue)"
        )
    for key, image in (("cluster.image", cfg.cluster.image), ("cluster.eval_image", cfg.cluster.eval_image)):
        if image and not pinned_by_digest(image):
            log(
                f"note: {key} {image} is a tag, which can be moved to another image between two stages; "
                "use the digest containers/build-and-push.sh printed (REPOSITORY@sha256:...)"
            )
    return 0
