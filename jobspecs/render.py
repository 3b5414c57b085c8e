"""Kubernetes specs for every stage: computed here, placed by the Jinja templates in ``jobspecs/``.

``render(cfg)`` returns one YAML text per file: ``00-config.yaml`` (the ConfigMap with the resolved run
config, mounted at ``/config/run.yaml``) and ``NN-<stage>.yaml`` for the six stages in order. Every pod
runs ``trnft <stage> --config /config/run.yaml``; training runs the same under torchrun.

Which template a stage uses on which platform:

=========== ======================== ======================================================
stage       neuron                   gpu
=========== ======================== ======================================================
tokenize    Job (CPU)                Job (CPU)
compile     PyTorchJob (Trainium)    Job (CPU): an explicit no-op that writes its manifest
train       PyTorchJob (Trainium)    PyTorchJob (GPU, FSDP2 under torchrun)
consolidate Job (CPU)                Job (CPU)
merge       Job (CPU)                Job (CPU)
evaluate    Job (GPU if cluster.eval_instance_type, else CPU)
=========== ======================== ======================================================

Instance facts come from ``common/cluster/instances.yaml``; processes, world size and TP x PP x DP are derived
and checked (:func:`trnft.common.instances.training_layout`) before anything is rendered. The Hugging
Face token is only ever a Secret reference.
"""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import yaml

from trnft.common.cluster import launch
from trnft.common.cluster.instances import InstanceType, Layout, instance, training_layout
from trnft.common.config.run_config import RunConfig, dump_config, load_config, stable_hash
from trnft.common.errors import ConfigError, TrnftError
from trnft.common.pipeline import backend
from trnft.common.pipeline.atomic import swap_into_place
from trnft.common.pipeline.stages import STAGES

CONFIG_DIR = "/config"
CONFIG_FILE = "00-config.yaml"
CONTAINER = "pytorch"  # the PyTorchJob webhook needs one container named so; Jobs use it too for uniformity
STAGE_FILES = {stage: f"{i:02d}-{stage}.yaml" for i, stage in enumerate(STAGES, start=1)}

# (platform, stage) -> template; see the module docstring.
TEMPLATES = {
    ("neuron", "tokenize"): "job.yaml.j2",
    ("neuron", "compile"): "pytorchjob.yaml.j2",
    ("neuron", "train"): "pytorchjob.yaml.j2",
    ("neuron", "consolidate"): "job.yaml.j2",
    ("neuron", "merge"): "job.yaml.j2",
    ("neuron", "evaluate"): "job.yaml.j2",
    ("gpu", "tokenize"): "job.yaml.j2",
    ("gpu", "compile"): "job.yaml.j2",
    ("gpu", "train"): "pytorchjob.yaml.j2",
    ("gpu", "consolidate"): "job.yaml.j2",
    ("gpu", "merge"): "job.yaml.j2",
    ("gpu", "evaluate"): "job.yaml.j2",
}
# Stages that read only the run directory (and the model cache filled by earlier stages).
OFFLINE_STAGES = ("consolidate", "merge", "evaluate")


@dataclass(frozen=True)
class Placement:
    """Where a stage's pods run and what hardware they ask for."""

    kind: str  # "cpu" | "neuron" | "gpu"
    instance: InstanceType | None
    devices: int = 0
    efa: int = 0


@dataclass
class Pod:
    labels: dict[str, str]
    annotations: dict[str, str]
    image: str
    image_pull_policy: str
    command: list[str]
    env: list[dict[str, Any]]
    resources: dict[str, dict[str, str]]
    volume_mounts: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    service_account: str | None
    security_context: dict[str, Any] | None = None
    restart_policy: str | None = None
    container_name: str = CONTAINER


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
    restart_policy: str = "OnFailure"
    clean_pod_policy: str = "None"
    config_yaml: str = ""


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
    if stage in OFFLINE_STAGES:
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
    volumes = [
        {"name": "run-storage", "persistentVolumeClaim": {"claimName": cfg.cluster.storage.claim_name}},
        {"name": "run-config", "configMap": {"name": f"{cfg.run.name}-config"}},
        # A pod's /dev/shm is 64 MiB by default; DataLoader workers and collectives need more.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
    ]
    mounts = [
        {"name": "run-storage", "mountPath": cfg.cluster.storage.mount_path},
        {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def _resources(cfg: RunConfig, placement: Placement) -> dict[str, dict[str, str]]:
    if placement.kind == "cpu":
        requests = dict(cfg.cluster.cpu_requests)
        limits = {"memory": requests["memory"]} if "memory" in requests else {}
        return {"requests": requests, "limits": limits}
    inst = placement.instance
    assert inst is not None
    name = "aws.amazon.com/neuron" if placement.kind == "neuron" else "nvidia.com/gpu"
    devices = {name: str(placement.devices)}
    if placement.efa:
        devices["vpc.amazonaws.com/efa"] = str(placement.efa)
    share = placement.devices / (inst.neuron_devices or inst.gpus)
    # Ask for most of the node's CPU and memory in proportion to the devices, leaving room for daemons.
    host = {
        "cpu": str(max(1, math.floor(inst.vcpu * 0.8 * share))),
        "memory": f"{math.floor(inst.memory_gib * 0.8 * share)}Gi",
    }
    return {"requests": {**devices, **host}, "limits": dict(devices)}


def _tolerations(cfg: RunConfig, placement: Placement) -> list[dict[str, Any]]:
    if placement.kind == "cpu":
        return []
    # Accelerator node groups are commonly tainted with their device resource name.
    auto = {
        "neuron": {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"},
        "gpu": {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    }[placement.kind]
    tolerations = [dict(t) for t in cfg.cluster.tolerations]
    if auto not in tolerations:
        tolerations.append(auto)
    return tolerations


def _pod(
    cfg: RunConfig, stage: str, placement: Placement, command: list[str], extra_env: dict[str, str],
    *, restart_policy: str | None, image: str,
) -> Pod:  # fmt: skip
    inst = placement.instance
    shm_gib = 2 if placement.kind == "cpu" else max(8, (inst.memory_gib if inst else 64) // 8)
    volumes, mounts = _volumes(cfg, shm_gib)
    node_selector = {}
    selector_type = inst.name if inst is not None else cfg.cluster.cpu_instance_type
    if selector_type:
        node_selector["node.kubernetes.io/instance-type"] = selector_type
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
    )


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
        kind=cfg.model.platform, instance=inst, devices=inst.neuron_devices or inst.gpus, efa=efa
    )
    name = job_name(cfg, stage)
    env = backend.of(cfg).launch_env(cfg, inst, layout)
    if efa:
        env.update(launch.efa_env())
    if stage == "train":
        # The operator injects MASTER_ADDR/MASTER_PORT; kubelet expands $(VAR) in the command.
        command = launch.torchrun_argv(layout, rdzv_endpoint="$(MASTER_ADDR):$(MASTER_PORT)", rdzv_id=name)
    else:
        # `trnft compile` wraps the same torchrun command in neuron_parallel_compile (trnft.neuron.compile).
        command = _stage_command(stage)
    pod = _pod(cfg, stage, placement, command, env, restart_policy=None, image=cfg.cluster.image)
    return Document(
        template=TEMPLATES[(cfg.model.platform, stage)],
        header=f"trnft {stage} for run {cfg.run.name}: {layout.describe()} on {inst.name}",
        name=name,
        namespace=cfg.cluster.namespace,
        labels=pod.labels,
        annotations={
            "trnft.dev/world-size": str(layout.world),
            "trnft.dev/parallel": f"tp={layout.tp},pp={layout.pp},dp={layout.dp}",
        },
        pod=pod,
        backoff_limit=20,
        nproc_per_node=str(layout.nproc_per_node),
        workers=layout.nodes - 1,
    )


def _job_document(cfg: RunConfig, stage: str, placement: Placement, image: str, header: str) -> Document:
    pod = _pod(cfg, stage, placement, _stage_command(stage), {}, restart_policy="Never", image=image)
    return Document(
        template=TEMPLATES[(cfg.model.platform, stage)],
        header=header,
        name=job_name(cfg, stage),
        namespace=cfg.cluster.namespace,
        labels=pod.labels,
        pod=pod,
        backoff_limit=3,
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
    for stage in STAGES:
        file = STAGE_FILES[stage]
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
    return docs


class _SpecDumper(yaml.SafeDumper):
    """Block-style YAML; multi-line strings (the run config) as literal blocks."""


_SpecDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


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


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("trnft.jobspecs", ""),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["nested"] = nested
    return env


def render(cfg: RunConfig) -> dict[str, str]:
    """File name -> YAML text for every document, in apply order."""
    env = _environment()
    return {file: env.get_template(doc.template).render(doc=doc) for file, doc in plan(cfg).items()}


def apply_lines(out: Path, cfg: RunConfig) -> list[str]:
    lines = [f"kubectl apply -f {out / CONFIG_FILE}"]
    for stage in STAGES:
        kind = "pytorchjob" if TEMPLATES[(cfg.model.platform, stage)] == "pytorchjob.yaml.j2" else "job"
        condition = "Succeeded" if kind == "pytorchjob" else "complete"
        lines.append(
            f"kubectl apply -f {out / STAGE_FILES[stage]} && "
            f"kubectl wait --for=condition={condition} {kind}/{job_name(cfg, stage)} -n {cfg.cluster.namespace} --timeout=-1s"
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
    from trnft.jobspecs import validate as k8s_validate

    if args.files:
        problems = k8s_validate.validate_files([Path(f) for f in args.files])
        for line in problems:
            log(line)
        log(f"{len(args.files)} file(s): {'valid' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    cfg = load_config(args.config, args.overrides)
    files = render(cfg)
    if args.validate:
        docs = [(name, doc) for name, text in files.items() for doc in yaml.safe_load_all(text) if doc]
        problems = k8s_validate.validate_documents(docs)
        if problems:
            raise TrnftError(
                f"rendered specs are invalid ({len(problems)} problem(s)): " + "; ".join(problems)
            )
    out = Path(args.out)
    write_atomically(out, files)
    layout = training_layout(cfg)
    log(
        f"wrote {len(files)} specs to {out}/ for run {cfg.run.name}: {layout.describe()}"
        + (" (validated)" if args.validate else "")
    )
    log("apply in order, each after the previous one completed:")
    for line in apply_lines(out, cfg):
        log(f"  {line}")
    return 0
