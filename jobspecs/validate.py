"""Offline validation of rendered Kubernetes documents; every problem is reported, not just the first.

Three layers (no API server can run here, see the project's K8S notes):

1. Built-in kinds (ConfigMap, Job, ...) against the upstream Kubernetes JSON schemas shipped by
   ``kubernetes-validate``, pinned to one minor (:data:`K8S_VERSION`, strict: unknown fields rejected).
2. PyTorchJob against a schema: the upstream Kubeflow CRD converted to JSON Schema when a CRD file is
   given (``crd_path`` or ``$TRNFT_PYTORCHJOB_CRD``), else our own schema built on the upstream
   PodTemplateSpec. Ours is stricter than the server on enums (rdzvBackend, cleanPodPolicy, restartPolicy).
3. Rules no schema holds: the training operator's webhook (container named ``pytorch``, DNS-1035 names,
   one Master, elastic needs a Worker, ...), quantities, Job restart policies, secrets only by reference,
   and trnft's own invariants (CPU stages ask for no accelerator; torchrun, nprocPerNode, replicas and
   NEURON_RT_NUM_CORES agree with the world size).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..common.exits import FIRST_RETRYABLE
from . import admission, rayjob, trainjob

K8S_VERSION = "v1.33.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY|CREDENTIAL)", re.IGNORECASE)
ACCELERATOR_RESOURCES = (
    "aws.amazon.com/neuron",
    "aws.amazon.com/neuroncore",
    "nvidia.com/gpu",
    "vpc.amazonaws.com/efa",
)
BUILTIN_SCHEMA_FILES = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("batch/v1", "Job"): "job-batch-v1.json",
}


def _schema_dir() -> Path:
    import kubernetes_validate

    return (
        Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{K8S_VERSION}-local-strict"
    )


@functools.cache
def _registry() -> Any:
    from referencing import Registry, Resource

    definitions = json.loads((_schema_dir() / "_definitions.json").read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


@functools.cache
def _builtin_validator(file: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = json.loads((_schema_dir() / file).read_text())
    return Draft202012Validator(schema, registry=_registry())


# -- PyTorchJob schemas -------------------------------------------------------------------------------


def _pod_template_ref() -> dict[str, str]:
    return {"$ref": "/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}


def own_pytorchjob_schema() -> dict[str, Any]:
    """A PyTorchJob v1 schema written from the operator's Go types, on the upstream PodTemplateSpec."""
    integer = {"type": "integer"}
    replica = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            # stricter than the server (no enum in the CRD): the operator's Go constants
            "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
            "template": _pod_template_ref(),
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/trnft/pytorchjob-kubeflow-v1",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kubeflow.org/v1"},
            "kind": {"const": "PyTorchJob"},
            "metadata": {
                "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["pytorchReplicaSpecs"],
                "properties": {
                    "pytorchReplicaSpecs": {
                        "type": "object",
                        "propertyNames": {"enum": ["Master", "Worker"]},
                        "additionalProperties": replica,
                    },
                    "nprocPerNode": {"type": "string", "pattern": "^(auto|cpu|gpu|[0-9]+)$"},
                    "runPolicy": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                            "ttlSecondsAfterFinished": integer,
                            "activeDeadlineSeconds": integer,
                            "backoffLimit": integer,
                            "suspend": {"type": "boolean"},
                            "managedBy": {"type": "string"},
                            "schedulingPolicy": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "minAvailable": integer,
                                    "queue": {"type": "string"},
                                    "priorityClass": {"type": "string"},
                                    "minResources": {"type": "object"},
                                    "scheduleTimeoutSeconds": integer,
                                },
                            },
                        },
                    },
                    "elasticPolicy": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "minReplicas": integer,
                            "maxReplicas": integer,
                            "maxRestarts": integer,
                            "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
                            "rdzvHost": {"type": "string"},
                            "rdzvPort": integer,
                            "rdzvId": {"type": "string"},
                            "rdzvConf": {"type": "array"},
                            "standalone": {"type": "boolean"},
                            "nProcPerNode": integer,
                            "metrics": {"type": "array"},
                        },
                    },
                },
            },
        },
    }


def crd_to_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """JSON Schema of one served version of a CRD, in kubectl's strict mode.

    Drops ``x-kubernetes-validations``, ``default`` and ``description``; turns ``nullable`` into a null
    type; closes every object that lists ``properties`` (unless it preserves unknown fields); pins
    ``apiVersion``/``kind`` and requires them with ``metadata`` and ``spec``.
    """
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served", True)}
    if version not in versions:
        raise ValueError(f"no served version {version!r} in CRD {crd['metadata']['name']}")
    schema = copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"])

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {
            k: walk(v)
            for k, v in node.items()
            if k not in ("x-kubernetes-validations", "default", "description")
        }
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node

    schema = walk(schema)
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


@functools.cache
def _pytorchjob_validator(crd_path: str | None) -> Any:
    from jsonschema import Draft7Validator, Draft202012Validator

    if crd_path:
        crd = yaml.safe_load(Path(crd_path).read_text())
        return Draft7Validator(crd_to_schema(crd))
    return Draft202012Validator(own_pytorchjob_schema(), registry=_registry())


# -- Kubeflow Trainer v2 schemas ---------------------------------------------------------------------

TRAINER_CRD_DIR = Path(__file__).parent / "crds"
TRAINER_CRD_FILES = {
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml.gz",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml.gz",
}
TRAINER_API_VERSION = "trainer.kubeflow.org/v1alpha1"


def trainer_crd(kind: str) -> dict[str, Any]:
    """The upstream Trainer v2.3.0 CRD of ``kind``, shipped gzipped in ``jobspecs/crds``."""
    import gzip

    text = gzip.decompress((TRAINER_CRD_DIR / TRAINER_CRD_FILES[kind]).read_bytes()).decode()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


RAY_CRD_FILE = "ray.io_rayjobs.yaml.gz"
RAY_API_VERSION = "ray.io/v1"


def ray_crd() -> dict[str, Any]:
    """KubeRay v1.7.0's RayJob CRD, shipped gzipped in ``jobspecs/crds``."""
    import gzip

    text = gzip.decompress((TRAINER_CRD_DIR / RAY_CRD_FILE).read_bytes()).decode()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _ray_validator() -> Any:
    from jsonschema import Draft7Validator

    return Draft7Validator(crd_to_schema(ray_crd(), "v1"))


@functools.cache
def _trainer_validator(kind: str) -> Any:
    from jsonschema import Draft7Validator

    return Draft7Validator(crd_to_schema(trainer_crd(kind), "v1alpha1"))


def default_crd_path() -> str | None:
    path = os.environ.get("TRNFT_PYTORCHJOB_CRD")
    return path if path and Path(path).is_file() else None


# -- layer 3: rules ---------------------------------------------------------------------------------


def _pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Job":
        return [("spec.template.spec", ((spec.get("template") or {}).get("spec") or {}))]
    if kind == "ClusterTrainingRuntime":
        return [
            (
                f"spec.template.spec.replicatedJobs.{i}.template.spec.template.spec",
                (((rjob or {}).get("template") or {}).get("spec") or {}).get("template", {}).get("spec")
                or {},
            )
            for i, rjob in enumerate(
                ((spec.get("template") or {}).get("spec") or {}).get("replicatedJobs") or []
            )
        ]
    if kind == "RayJob":
        cluster = spec.get("rayClusterSpec") or {}
        out = [
            ("spec.rayClusterSpec.headGroupSpec.template.spec", _template_spec(cluster.get("headGroupSpec")))
        ]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            out.append((f"spec.rayClusterSpec.workerGroupSpecs.{i}.template.spec", _template_spec(group)))
        return out
    if kind == "PyTorchJob":
        out = []
        for rtype, replica in (spec.get("pytorchReplicaSpecs") or {}).items():
            out.append(
                (
                    f"spec.pytorchReplicaSpecs.{rtype}.template.spec",
                    ((replica or {}).get("template") or {}).get("spec") or {},
                )
            )
        return out
    return []


def _template_spec(holder: Any) -> dict[str, Any]:
    return ((holder or {}).get("template") or {}).get("spec") or {}


def _flag(command: list[str], name: str) -> str | None:
    for part in command:
        if part.startswith(f"--{name}="):
            return part.split("=", 1)[1]
    return None


def rule_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Webhook, naming, quantity, secret and trnft-invariant problems of one document."""
    problems: list[tuple[str, str]] = []
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    if kind in ("Job", "PyTorchJob", "TrainJob") and not DNS_1035.match(str(name)):
        problems.append(
            (
                "metadata.name",
                f"{name!r} is not a DNS-1035 label (lower-case letters, digits, '-'; starts with a letter)",
            )
        )
    if len(str(name)) > 63:
        problems.append(("metadata.name", f"{name!r} is longer than 63 characters"))
    if kind in ("ConfigMap", "ClusterTrainingRuntime") and not DNS_1123_SUBDOMAIN.match(str(name)):
        problems.append(("metadata.name", f"{name!r} is not a DNS-1123 subdomain"))
    if "namespace" in meta and not DNS_1123_LABEL.match(str(meta["namespace"])):
        problems.append(("metadata.namespace", f"{meta['namespace']!r} is not a DNS-1123 label"))

    spec = doc.get("spec") or {}
    if kind == "PyTorchJob":
        replicas = spec.get("pytorchReplicaSpecs") or {}
        for rtype in replicas:
            if rtype not in ("Master", "Worker"):
                problems.append(
                    (f"spec.pytorchReplicaSpecs.{rtype}", "replica type must be Master or Worker")
                )
        master = replicas.get("Master")
        if master is not None and master.get("replicas", 1) != 1:
            problems.append(
                ("spec.pytorchReplicaSpecs.Master.replicas", f"must be 1, got {master.get('replicas')}")
            )
        worker = replicas.get("Worker")
        if worker is not None and (worker.get("replicas") or 0) < 1:
            problems.append(
                ("spec.pytorchReplicaSpecs.Worker.replicas", "must be at least 1 when a Worker is given")
            )
        if spec.get("elasticPolicy") is not None and worker is None:
            problems.append(("spec.pytorchReplicaSpecs.Worker", "required when elasticPolicy is used"))
        if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is not None and spec.get(
            "nprocPerNode"
        ) is not None:
            problems.append(("spec.elasticPolicy.nProcPerNode", "must not be used with spec.nprocPerNode"))
        problems += admission.pytorchjob_problems(doc)

    if kind == "Job":
        problems += _pod_failure_policy_problems(spec.get("podFailurePolicy"))
    if kind == "TrainJob":
        problems += _trainjob_problems(doc)
    if kind == "ClusterTrainingRuntime":
        problems += _runtime_problems(doc)
    if kind == "RayJob":
        problems += rayjob.rayjob_problems(doc)

    for path, pod in _pod_specs(doc):
        containers = pod.get("containers") or []
        if not containers:
            problems.append((f"{path}.containers", "at least one container is required"))
        if kind == "PyTorchJob" and not any(c.get("name") == "pytorch" for c in containers):
            problems.append((f"{path}.containers", "must have at least one container named pytorch"))
        if kind == "Job" and spec.get("podFailurePolicy") is not None and pod.get("restartPolicy") != "Never":
            problems.append(
                (f"{path}.restartPolicy", "must be Never when spec.podFailurePolicy is set (batch/v1 Job)")
            )
        if kind == "Job" and pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(
                (
                    f"{path}.restartPolicy",
                    f"must be Never or OnFailure for a Job, got {pod.get('restartPolicy')!r}",
                )
            )
        for i, c in enumerate(containers):
            cpath = f"{path}.containers.{i}"
            if not c.get("image"):
                problems.append((f"{cpath}.image", "required"))
            if c.get("name") and not DNS_1123_LABEL.match(str(c["name"])):
                problems.append((f"{cpath}.name", f"{c['name']!r} is not a DNS-1123 label"))
            for section in ("requests", "limits"):
                for res, qty in ((c.get("resources") or {}).get(section) or {}).items():
                    if not QUANTITY.match(str(qty)):
                        problems.append((f"{cpath}.resources.{section}.{res}", f"{qty!r} is not a quantity"))
            for j, env in enumerate(c.get("env") or []):
                if SECRET_NAME.search(str(env.get("name", ""))) and "value" in env:
                    problems.append(
                        (
                            f"{cpath}.env.{j}.value",
                            f"{env['name']} must come from a Secret (valueFrom.secretKeyRef), not a literal",
                        )
                    )
            problems += _trnft_invariants(doc, cpath, c)
    return problems


def _pod_failure_policy_problems(policy: Any, at: str = "spec.podFailurePolicy") -> list[tuple[str, str]]:
    """The API server's rules for a Job's podFailurePolicy exit codes (no schema holds them)."""
    problems: list[tuple[str, str]] = []
    for i, rule in enumerate((policy or {}).get("rules") or []):
        codes = (rule.get("onExitCodes") or {}).get("values")
        if codes is None:
            continue
        path = f"{at}.rules.{i}.onExitCodes.values"
        if not codes or len(codes) > 255:
            problems.append((path, f"must hold 1 to 255 exit codes, got {len(codes)}"))
        if list(codes) != sorted(set(codes)):
            problems.append((path, "must be sorted and without duplicates"))
        if rule["onExitCodes"].get("operator") == "In" and 0 in codes:
            problems.append((path, "0 cannot be used with the In operator"))
    return problems


def _world_problems(
    annotations: dict[str, Any],
    pods: int,
    nproc: int,
    command: list[str],
    env: dict[str, Any],
    cpath: str,
    nproc_key: str,
) -> list[tuple[str, str]]:
    """Pods x processes, torchrun's flags, NEURON_RT_NUM_CORES and TP x PP x DP agree with the world size."""
    problems = []
    world = int(annotations["trnft.dev/world-size"])
    if pods * nproc != world:
        problems.append((nproc_key, f"{pods} pods x {nproc} processes != world size {world}"))
    if "torchrun" in command:
        if _flag(command, "nproc_per_node") != str(nproc):
            problems.append(
                (
                    f"{cpath}.command",
                    f"torchrun --nproc_per_node={_flag(command, 'nproc_per_node')} != {nproc_key} {nproc}",
                )
            )
        if _flag(command, "nnodes") != str(pods):
            problems.append(
                (f"{cpath}.command", f"torchrun --nnodes={_flag(command, 'nnodes')} != {pods} pods")
            )
        if _flag(command, "rdzv_backend") not in ("c10d",):
            problems.append((f"{cpath}.command", "torchrun must use the c10d rendezvous (no etcd)"))
    if "NEURON_RT_NUM_CORES" in env and env["NEURON_RT_NUM_CORES"] != str(nproc):
        problems.append(
            (f"{cpath}.env", f"NEURON_RT_NUM_CORES={env['NEURON_RT_NUM_CORES']} != {nproc_key} {nproc}")
        )
    tp, pp, dp = (
        int(kv.split("=")[1]) for kv in annotations.get("trnft.dev/parallel", "tp=1,pp=1,dp=0").split(",")
    )
    if tp * pp * dp != world:
        problems.append(
            ("metadata.annotations.trnft.dev/parallel", f"TP x PP x DP = {tp}x{pp}x{dp} != world {world}")
        )
    return problems


DOMAIN_PREFIXED_PATH = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/\S+$")
NODE_CONTAINER = "node"


def _patched_pod_specs(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, replicated job name, pod spec patch) of every runtime patch of a TrainJob."""
    out = []
    for i, patch in enumerate((doc.get("spec") or {}).get("runtimePatches") or []):
        template = ((patch or {}).get("trainingRuntimeSpec") or {}).get("template") or {}
        for j, rjob in enumerate((template.get("spec") or {}).get("replicatedJobs") or []):
            pod = ((((rjob or {}).get("template") or {}).get("spec") or {}).get("template") or {}).get(
                "spec"
            ) or {}
            out.append(
                (
                    f"spec.runtimePatches.{i}.trainingRuntimeSpec.template.spec.replicatedJobs.{j}.template.spec.template.spec",
                    rjob.get("name"),
                    pod,
                )
            )
    return out


def _trainjob_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Trainer v2.3.0's webhook rules on a TrainJob (plugins/torch, plugins/jobset) and trnft's invariants."""
    from .trainjob import RESERVED_ENV

    problems: list[tuple[str, str]] = []
    spec = doc.get("spec") or {}
    trainer = spec.get("trainer") or {}
    env_list = trainer.get("env") or []
    reserved = sorted({e.get("name") for e in env_list} & set(RESERVED_ENV))
    if reserved:
        problems.append(
            ("spec.trainer.env", f"must not set {', '.join(reserved)} (the torch plugin injects them)")
        )
    for j, env in enumerate(env_list):
        if SECRET_NAME.search(str(env.get("name", ""))) and "value" in env:
            problems.append(
                (
                    f"spec.trainer.env.{j}.value",
                    f"{env['name']} must come from a Secret (valueFrom.secretKeyRef), not a literal",
                )
            )
    for section in ("requests", "limits"):
        for res, qty in ((trainer.get("resourcesPerNode") or {}).get(section) or {}).items():
            if not QUANTITY.match(str(qty)):
                problems.append(
                    (f"spec.trainer.resourcesPerNode.{section}.{res}", f"{qty!r} is not a quantity")
                )
    for i, patch in enumerate(spec.get("runtimePatches") or []):
        if not DOMAIN_PREFIXED_PATH.match(str((patch or {}).get("manager", ""))):
            problems.append(
                (f"spec.runtimePatches.{i}.manager", "must be a domain-prefixed path, e.g. example.com/tool")
            )
    for path, _, pod in _patched_pod_specs(doc):
        for k, c in enumerate(pod.get("containers") or []):
            if c.get("name") == NODE_CONTAINER and c.get("env"):
                problems.append(
                    (f"{path}.containers.{k}.env", "the node container gets env from spec.trainer.env only")
                )
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if "trnft.dev/world-size" in annotations:
        if trainer.get("numProcPerNode") is None:
            # `auto` counts only GPU-named resources: Trainium would get one process per CPU.
            problems.append(("spec.trainer.numProcPerNode", "trnft TrainJobs give the number of processes"))
        else:
            env = {e.get("name"): e.get("value") for e in env_list}
            problems += _world_problems(
                annotations,
                int(trainer.get("numNodes") or 1),
                int(trainer["numProcPerNode"]),
                trainer.get("command") or [],
                env,
                "spec.trainer",
                "spec.trainer.numProcPerNode",
            )
        if int(trainer.get("numNodes") or 1) > 1:
            for path, _, pod in _patched_pod_specs(doc):
                if not _one_zone(pod):
                    problems.append(
                        (
                            path,
                            "a multi-node job must keep its pods in one zone (zone node selector or pod affinity)",
                        )
                    )
    return problems


def _one_zone(pod: dict[str, Any]) -> bool:
    pinned = "topology.kubernetes.io/zone" in (pod.get("nodeSelector") or {})
    terms = ((pod.get("affinity") or {}).get("podAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or []
    return pinned or any(t.get("topologyKey") == "topology.kubernetes.io/zone" for t in terms)


def _runtime_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """A ClusterTrainingRuntime as Trainer needs it and as trnft's failure classes need it: one trainer
    replicated job with a ``node`` container; its Job fails on the first failed pod (the JobSet restarts
    the gang); the JobSet rules' message patterns point at FailJob rules of the matching kind."""
    from .trainjob import ANCESTOR_LABEL, ANCESTOR_TRAINER

    problems: list[tuple[str, str]] = []
    jobset = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    rjobs = jobset.get("replicatedJobs") or []
    trainers = [
        (i, r)
        for i, r in enumerate(rjobs)
        if (((r.get("template") or {}).get("metadata") or {}).get("labels") or {}).get(ANCESTOR_LABEL)
        == ANCESTOR_TRAINER
    ]
    if len(trainers) != 1:
        problems.append(
            (
                "spec.template.spec.replicatedJobs",
                f"needs exactly one job labelled {ANCESTOR_LABEL}: trainer, got {len(trainers)}",
            )
        )
        return problems
    i, rjob = trainers[0]
    at = f"spec.template.spec.replicatedJobs.{i}.template.spec"
    job = (rjob.get("template") or {}).get("spec") or {}
    pod = (job.get("template") or {}).get("spec") or {}
    if not any(c.get("name") == NODE_CONTAINER for c in pod.get("containers") or []):
        problems.append((f"{at}.template.spec.containers", "the trainer job needs a container named node"))
    policy = job.get("podFailurePolicy")
    problems += _pod_failure_policy_problems(policy, f"{at}.podFailurePolicy")
    if policy is not None and pod.get("restartPolicy") != "Never":
        problems.append((f"{at}.template.spec.restartPolicy", "must be Never when podFailurePolicy is set"))
    if (doc.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/name") != "trnft":
        return problems
    if job.get("backoffLimit") != 0:
        problems.append(
            (
                f"{at}.backoffLimit",
                f"must be 0 (a failed pod restarts the whole gang), got {job.get('backoffLimit')!r}",
            )
        )
    failure = jobset.get("failurePolicy") or {}
    problems += admission.failure_policy_problems(
        failure, {r.get("name") for r in rjobs}, "spec.template.spec.failurePolicy"
    )
    if not isinstance(failure.get("maxRestarts"), int):
        problems.append(("spec.template.spec.failurePolicy.maxRestarts", "restarts must be bounded"))
    rules = (policy or {}).get("rules") or []
    for k, rule in enumerate(failure.get("rules") or []):
        wanted = _WANTED_FAILJOB.get(rule.get("name"))
        if wanted is None:
            continue
        for pattern in rule.get("onJobFailureMessagePatterns") or []:
            match = re.search(r"rule at index \(?([\d|]+)\)?\$$", pattern)
            indexes = [int(i) for i in match.group(1).split("|")] if match else [-1]
            for index in indexes:
                target = rules[index] if 0 <= index < len(rules) else {}
                if target.get("action") != "FailJob" or not wanted(target):
                    problems.append(
                        (
                            f"spec.template.spec.failurePolicy.rules.{k}.onJobFailureMessagePatterns",
                            f"{pattern!r}: index {index} must point at a FailJob rule of the podFailurePolicy "
                            f"for {rule['name']}",
                        )
                    )
    return problems


def _exit_codes(rule: dict[str, Any]) -> set[int]:
    return set((rule.get("onExitCodes") or {}).get("values") or [])


_WANTED_FAILJOB = {
    # An eviction: the evicted pod's DisruptionTarget, or any rank's cooperative stop (exit 143).
    trainjob.RULE_EVICTED: lambda r: "onPodConditions" in r or _exit_codes(r) == {trainjob.STOPPED_EXIT},
    trainjob.RULE_PERMANENT: lambda r: bool(_exit_codes(r)) and max(_exit_codes(r)) < FIRST_RETRYABLE,
}


def trainjob_runtime_problems(docs: Iterable[tuple[str, Any]], runtime: dict[str, Any]) -> list[str]:
    """Every TrainJob in ``docs`` against ``runtime``: the name it references, and (Trainer's webhook) every
    patched replicated job and container exists in the runtime."""
    name = (runtime.get("metadata") or {}).get("name")
    rjobs = (((runtime.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "replicatedJobs"
    ) or []
    containers = {
        r.get("name"): {
            c.get("name")
            for c in (((r.get("template") or {}).get("spec") or {}).get("template") or {})
            .get("spec", {})
            .get("containers")
            or []
        }
        for r in rjobs
    }
    lines = []
    for source, doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "TrainJob":
            continue
        label = f"{source}: TrainJob/{(doc.get('metadata') or {}).get('name')}"
        ref = ((doc.get("spec") or {}).get("runtimeRef") or {}).get("name")
        if ref != name:
            lines.append(f"{label}: spec.runtimeRef.name: {ref!r} is not the rendered runtime {name!r}")
        for path, rjob, pod in _patched_pod_specs(doc):
            if rjob not in containers:
                lines.append(f"{label}: {path}: replicated job {rjob!r} is not in runtime {name}")
                continue
            for c in pod.get("containers") or []:
                if c.get("name") not in containers[rjob]:
                    lines.append(f"{label}: {path}: container {c.get('name')!r} is not in runtime {name}")
        if ref == name:
            # What the controllers build from the two: the JobSet, its Jobs and pods, with their webhooks.
            lines += [
                f"{label}: {path}: {message}" for path, message in admission.trainjob_problems(doc, runtime)
            ]
    return lines


def _trnft_invariants(doc: dict[str, Any], cpath: str, container: dict[str, Any]) -> list[tuple[str, str]]:
    """Invariants of specs trnft renders (recognised by their labels and annotations)."""
    problems = []
    labels = (doc.get("metadata") or {}).get("labels") or {}
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    resources = container.get("resources") or {}
    asked = set(resources.get("requests") or {}) | set(resources.get("limits") or {})
    if labels.get("trnft.dev/accelerator") == "none":
        for res in sorted(asked & set(ACCELERATOR_RESOURCES)):
            problems.append((f"{cpath}.resources", f"a CPU stage must not request {res}"))
    if doc.get("kind") == "PyTorchJob" and "trnft.dev/world-size" in annotations:
        spec = doc["spec"]
        problems += _failure_handling_problems(spec)
        replicas = sum(int((r or {}).get("replicas") or 0) for r in spec["pytorchReplicaSpecs"].values())
        env = {e.get("name"): e.get("value") for e in container.get("env") or []}
        problems += _world_problems(
            annotations,
            replicas,
            int(spec.get("nprocPerNode", "0")),
            container.get("command") or [],
            env,
            cpath,
            "spec.nprocPerNode",
        )
    return problems


def _failure_handling_problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """trnft's PyTorchJobs retry only retryable exits, clean up running pods, keep multi-node jobs in one zone."""
    problems = []
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for rtype, replica in replicas.items():
        if (replica or {}).get("restartPolicy") != "ExitCode":
            problems.append(
                (
                    f"spec.pytorchReplicaSpecs.{rtype}.restartPolicy",
                    f"must be ExitCode (permanent errors fail at once), got {(replica or {}).get('restartPolicy')!r}",
                )
            )
    clean = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if clean != "Running":
        problems.append(("spec.runPolicy.cleanPodPolicy", f"must be Running, got {clean!r}"))
    if "Worker" in replicas:
        for rtype, replica in replicas.items():
            pod = ((replica or {}).get("template") or {}).get("spec") or {}
            if not _one_zone(pod):
                problems.append(
                    (
                        f"spec.pytorchReplicaSpecs.{rtype}.template.spec",
                        "a multi-node job must keep its pods in one zone (zone node selector or pod affinity)",
                    )
                )
    return problems


# -- entry points -----------------------------------------------------------------------------------


def _path(error: Any) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(document)"


def document_problems(doc: Any, crd_path: str | None = None) -> list[tuple[str, str]]:
    """(path, message) for every problem of one parsed document."""
    if not isinstance(doc, dict):
        return [("(document)", "not a mapping")]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if doc.get("kind") == "PyTorchJob":
        if doc.get("apiVersion") != "kubeflow.org/v1":
            return [
                ("apiVersion", f"no served version {doc.get('apiVersion')!r} of PyTorchJob (kubeflow.org/v1)")
            ]
        validator = _pytorchjob_validator(crd_path or default_crd_path())
    elif doc.get("kind") in TRAINER_CRD_FILES:
        if doc.get("apiVersion") != TRAINER_API_VERSION:
            return [
                (
                    "apiVersion",
                    f"no served version {doc.get('apiVersion')!r} of {doc['kind']} ({TRAINER_API_VERSION})",
                )
            ]
        validator = _trainer_validator(doc["kind"])
    elif doc.get("kind") == "RayJob":
        if doc.get("apiVersion") != RAY_API_VERSION:
            return [
                ("apiVersion", f"no served version {doc.get('apiVersion')!r} of RayJob ({RAY_API_VERSION})")
            ]
        validator = _ray_validator()
    elif key in BUILTIN_SCHEMA_FILES:
        validator = _builtin_validator(BUILTIN_SCHEMA_FILES[key])
    else:
        return [("kind", f"no schema for {doc.get('apiVersion')}/{doc.get('kind')}")]
    schema_problems = sorted(((_path(e), e.message) for e in validator.iter_errors(doc)), key=str)
    if schema_problems:
        # Rules assume a well-formed document; report schema problems first, like the API server would.
        return schema_problems
    return rule_problems(doc)


def validate_documents(docs: Iterable[tuple[str, Any]], crd_path: str | None = None) -> list[str]:
    """One line per problem: ``<source>: <Kind>/<name>: <path>: <message>``; empty when all are valid."""
    lines = []
    for source, doc in docs:
        label = (
            f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" if isinstance(doc, dict) else "?"
        )
        for path, message in document_problems(doc, crd_path):
            lines.append(f"{source}: {label}: {path}: {message}")
    return lines


def validate_files(paths: Iterable[Path], crd_path: str | None = None) -> list[str]:
    docs = []
    lines = []
    for p in paths:
        try:
            docs += [(str(p), d) for d in yaml.safe_load_all(p.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            lines.append(f"{p}{where}: not valid YAML ({problem}); fix the file or render it again")
        except (OSError, UnicodeDecodeError) as exc:
            lines.append(f"{p}: cannot be read ({exc.strerror if isinstance(exc, OSError) else exc.reason})")
    return lines + validate_documents(docs, crd_path)
