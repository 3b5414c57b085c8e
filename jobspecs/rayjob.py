"""KubeRay RayJob documents (``cluster.operator: rayjob``): compile and train as Ray Train runs. The values are
computed here; ``rayjob.yaml.j2`` writes the document with the pod partial every operator shares.

Facts relied on (ray-project/kuberay tag v1.7.0, read from source; pinned in tests/jobspecs/test_rayjob.py):

* ``ray.io/v1`` RayJob: ``spec.entrypoint`` is run by a submitter (``submissionMode: K8sJobMode``, a Kubernetes
  Job running ``ray job submit``) against the RayCluster made from ``spec.rayClusterSpec``;
  ``shutdownAfterJobFinishes`` deletes that cluster when the Ray job ends, after ``ttlSecondsAfterFinished``.
  ``spec.backoffLimit`` retries the whole RayJob on a new cluster (any failure, whatever its cause), so it
  is 0 here: Ray Train's ``FailureConfig`` retries inside the cluster and a permanent error is not retried
  (:mod:`trnft.common.cluster.ray_train`). ``submitterConfig.backoffLimit`` retries only the submitter Job.
* KubeRay's validating webhook checks the RayJob's name: at most ``MAX_RAYJOB_NAME`` (47 = 53 - 6, so the
  RayCluster it names ``<rayjob>-<5 random>`` keeps to 53) and a DNS-1035 label
  (``utils.ValidateRayJobMetadata``). The controller then refuses a spec (status ``ValidationFailed``) that
  breaks ``utils.ValidateRayJobSpec`` / ``ValidateRayClusterSpec``: worker groups need ``minReplicas`` and
  ``maxReplicas`` without autoscaling, resources in ``rayStartParams`` and a group's ``resources`` field not
  both, no ``rayStartParams.labels``, ``backoffLimit`` >= 0, a positive ``activeDeadlineSeconds``.
  :mod:`trnft.jobspecs.validate` applies those rules offline.
* KubeRay writes the container command: a pod's own ``command`` runs before ``ulimit; ray start`` (so trnft
  sets none); container 0 is Ray's. It turns ``nvidia.com/gpu`` limits into ``num-gpus`` and only
  ``aws.amazon.com/neuroncore`` into the ``neuron_cores`` resource; trnft asks for whole Neuron devices
  (``aws.amazon.com/neuron``), so a Neuron worker group declares its cores in ``rayStartParams.resources``;
  KubeRay writes each parameter into the ``ray start`` shell line as ``--key=value`` (``convertParamMap``), so
  a JSON value is shell-quoted.
* Status: ``jobDeploymentStatus`` (Initializing, Running, Complete, Failed, ValidationFailed, Suspending,
  Suspended, Retrying, Waiting), ``jobStatus`` (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED), ``reason``
  (SubmissionFailed, DeadlineExceeded, PreRunningDeadlineExceeded, AppFailed, ValidationFailed, ...) and
  ``message`` (``rayjob_types.go``); :mod:`trnft.jobspecs.operate` reads them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from ..common.cluster.instances import InstanceType, Layout

API_VERSION = "ray.io/v1"
KUBERAY_VERSION = "v1.7.0"
RAY_VERSION = "2.60.0"
# utils.MaxRayClusterNameLength (53) - 6: the RayCluster is <rayjob>-<5 random characters>.
MAX_RAYJOB_NAME = 47
SUBMISSION_MODE = "K8sJobMode"
WORKER_GROUP = "trainers"
# Submitter retries: `ray job submit` against a head that is not answering yet.
SUBMITTER_BACKOFF_LIMIT = 2
# The RayCluster stays this long after the job ends, for `kubectl logs` of its pods.
TTL_AFTER_FINISHED_S = 600


@dataclass(frozen=True)
class RayJobValues:
    """What ``rayjob.yaml.j2`` places beyond the pods."""

    entrypoint: str
    workers: int
    head_start_params: dict[str, str]
    worker_start_params: dict[str, str]
    ray_version: str = RAY_VERSION
    submission_mode: str = SUBMISSION_MODE
    worker_group: str = WORKER_GROUP
    submitter_backoff_limit: int = SUBMITTER_BACKOFF_LIMIT
    ttl_after_finished_s: int = TTL_AFTER_FINISHED_S


def per_worker_resources(inst: InstanceType, layout: Layout) -> dict[str, float]:
    """Ray resources of one rank: a GPU, or the NeuronCores of one (logical) core."""
    if inst.accelerator == "gpu":
        return {"GPU": 1}
    return {"neuron_cores": inst.neuron_cores // layout.nproc_per_node}


def entrypoint(stage: str, config_path: str, inst: InstanceType, layout: Layout) -> str:
    """``trnft ray <stage>`` with the world and each rank's resources."""
    resources = " ".join(f"--per-worker {k}={v:g}" for k, v in per_worker_resources(inst, layout).items())
    return f"trnft ray {stage} --config {config_path} --workers {layout.world} {resources}"


def rayjob_values(stage: str, config_path: str, inst: InstanceType, layout: Layout) -> RayJobValues:
    worker_params: dict[str, str] = {}
    if inst.accelerator == "neuron":
        # KubeRay maps only aws.amazon.com/neuroncore to neuron_cores; the pods ask for whole devices. It
        # pastes each value into the `ray start` shell line unquoted (convertParamMap: "--%s=%s"), so the
        # JSON travels shell-quoted, as KubeRay's own samples write it.
        resources = json.dumps({"neuron_cores": inst.neuron_cores}, separators=(",", ":"))
        worker_params["resources"] = shlex.quote(resources)
    return RayJobValues(
        entrypoint=entrypoint(stage, config_path, inst, layout),
        workers=layout.nodes,
        # The head runs the driver and Ray Train's controller, no rank: no CPU for Ray tasks.
        head_start_params={"num-cpus": "0"},
        worker_start_params=worker_params,
    )


def rayjob_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What KubeRay v1.7.0's webhook (name) and controller (spec) would refuse in a RayJob, as (path, why)."""
    import re

    problems: list[tuple[str, str]] = []
    name = str((doc.get("metadata") or {}).get("name") or "")
    if len(name) > MAX_RAYJOB_NAME:
        problems.append(("metadata.name", f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters"))
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(("metadata.name", "RayJob name should be a valid DNS1035 label"))
    spec = doc.get("spec") or {}
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append(("spec.suspend", "a RayJob with shutdownAfterJobFinishes false cannot be suspended"))
    if int(spec.get("ttlSecondsAfterFinished") or 0) < 0:
        problems.append(("spec.ttlSecondsAfterFinished", "must be a non-negative integer"))
    if not spec.get("shutdownAfterJobFinishes") and int(spec.get("ttlSecondsAfterFinished") or 0) > 0:
        problems.append(("spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes true"))
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        problems.append(("spec", "one of rayClusterSpec or clusterSelector must be set"))
    if spec.get("backoffLimit") is not None and int(spec["backoffLimit"]) < 0:
        problems.append(("spec.backoffLimit", "must be a non-negative integer"))
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and int(spec[key]) <= 0:
            problems.append((f"spec.{key}", "must be a positive integer"))
    cluster = spec.get("rayClusterSpec") or {}
    head = cluster.get("headGroupSpec") or {}
    groups = [("headGroupSpec", "Head", head)] + [
        (f"workerGroupSpecs[{i}]", g.get("groupName", "?"), g)
        for i, g in enumerate(cluster.get("workerGroupSpecs") or [])
    ]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    for path, group_name, group in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            problems.append(
                (f"spec.rayClusterSpec.{path}", f"{group_name} group needs at least one container")
            )
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get(
            "resources"
        ):
            problems.append(
                (
                    f"spec.rayClusterSpec.{path}",
                    f"{group_name}: resources in both rayStartParams and resources",
                )
            )
        if "labels" in params:
            problems.append(
                (f"spec.rayClusterSpec.{path}.rayStartParams.labels", "not supported; use labels")
            )
        if path == "headGroupSpec":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(
                (
                    f"spec.rayClusterSpec.{path}",
                    f"worker group {group_name} must set minReplicas and maxReplicas",
                )
            )
        if low is not None and high is not None and int(low) > int(high):
            problems.append(
                (f"spec.rayClusterSpec.{path}", f"worker group {group_name}: minReplicas > maxReplicas")
            )
    problems += kueue_problems(doc)
    return problems


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_MAX_POD_SETS = 8  # jobframework.MaxPodSets


def kueue_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Kueue v0.19.2's RayJob webhook on a queue-labelled RayJob (pkg/controller/jobs/rayjob/rayjob_webhook.go
    ``validateCreate`` and raycluster/common.go ``ValidateCreate``)."""
    labels = (doc.get("metadata") or {}).get("labels") or {}
    if not labels.get(KUEUE_QUEUE_LABEL):
        return []
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec")
    if spec.get("clusterSelector"):
        return [("spec.clusterSelector", "a kueue managed job should not use an existing cluster")]
    if cluster is None:
        return [("spec.rayClusterSpec", "required for Kueue-managed jobs that don't use clusterSelector")]
    problems: list[tuple[str, str]] = []
    if not spec.get("shutdownAfterJobFinishes"):
        problems.append(
            ("spec.shutdownAfterJobFinishes", "a kueue managed job should delete the cluster after finishing")
        )
    if cluster.get("enableInTreeAutoscaling"):
        problems.append(
            ("spec.rayClusterSpec.enableInTreeAutoscaling", "a kueue managed job cannot autoscale")
        )
    groups = cluster.get("workerGroupSpecs") or []
    if len(groups) + 1 > KUEUE_MAX_POD_SETS:
        problems.append(("spec.rayClusterSpec.workerGroupSpecs", f"more than {KUEUE_MAX_POD_SETS} pod sets"))
    for i, group in enumerate(groups):
        if group.get("groupName") == "head":
            problems.append(
                (
                    f"spec.rayClusterSpec.workerGroupSpecs[{i}].groupName",
                    '"head" is reserved for the head group',
                )
            )
    return problems
