"""What the controllers make of a TrainJob and its runtime: the JobSet Kubeflow Trainer builds (with Kueue's
runtime patch when Kueue admits it) and the names JobSet and the Job controller derive from it.

There is no cluster here, and the objects that fail are the ones the controllers create, not the ones
``kubectl apply`` sees: a JobSet denied by its webhook leaves only an event on the TrainJob. So the checks in
:mod:`trnft.jobspecs.admission` run on what this module derives. Written from the sources at the tags
trnft supports; each behaviour names its file and function:

Kubeflow Trainer v2.3.0
  * ``pkg/runtime/core/trainingruntime.go`` ``mergeRuntimePatches``: each runtime patch is a strategic merge
    patch of the JobSet spec, in order, replicated-job order kept. ``newRuntimeInfo``: ``resourcesPerNode``
    merges per resource name into the ``node`` container's requests and limits
    (``pkg/util/trainingruntime`` ``MergeResourceRequirements``; **v2.2 replaced the whole resources
    block**, v2.2.0 ``trainingruntime.go`` line 182).
  * ``plugins/torch/torch.go`` ``EnforceMLPolicy``: trainer env upserted, then ``PET_*``; the container
    gets port 29500 (``apply.UpsertPort``, ``ContainerTrainerPort``; **not in v2.2's model**).
  * ``plugins/jobset/builder.go`` ``Trainer``: image, command, args onto the ``node`` container.
    ``plugins/jobset/jobset.go`` ``SyncParallelCount``: parallelism = completions = numNodes.
  * ``plugins/volcano/volcano.go`` ``EnforcePodGroupPolicy``: with ``podGroupPolicy.volcano`` every pod
    gets the annotation ``scheduling.k8s.io/group-name: <trainjob>`` (**not in v2.2's model**).
  * The JobSet is named as the TrainJob (``plugins/jobset`` ``Build``).

Kueue v0.17.0 (``pkg/controller/jobs/trainjob``): the webhook appends a runtime patch with manager
``kueue.x-k8s.io/manager``; on admission ``RunWithPodSetsInfo`` fills its replicated jobs with the
ResourceFlavor's node selector and **tolerations**, which a strategic merge replaces whole (``PodSpec``'s
tolerations have no merge key): the flavor's list is all the pods keep (:func:`kueue_admit`). Kueue
v0.14-v0.16 wrote ``podTemplateOverrides`` instead, a field Trainer v2.3 no longer has.

JobSet v0.12.0 ``pkg/util/placement/placement.go``: ``GenJobName`` ``<jobset>-<replicatedJob>-<jobIndex>``,
``GenPodName`` ``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>``, to which the Job controller's
``generateName`` adds 5 random characters.
"""

from __future__ import annotations

import copy
from typing import Any

NODE = "node"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_PORT = 29500
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
KUEUE_PATCH_MANAGER = "kueue.x-k8s.io/manager"
POD_NAME_SUFFIX = "-abcde"  # the 5 random characters of generateName, as JobSet's webhook counts them

# Patch merge keys of the Kubernetes Go types for the lists trnft renders; every other list (tolerations,
# command, args) is replaced whole, maps merge key by key.
MERGE_KEYS = {
    "replicatedJobs": "name",
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
}


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = strategic_merge(merged[at], item, None)
        return merged
    return copy.deepcopy(patch)


def _upsert(items: list[dict[str, Any]], entries: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    out = [dict(e) for e in items]
    for entry in entries:
        at = next((i for i, e in enumerate(out) if e.get(key) == entry.get(key)), None)
        if at is None:
            out.append(dict(entry))
        else:
            out[at] = dict(entry)
    return out


def merge_resources(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Trainer v2.3.0's ``MergeResourceRequirements``: requests and limits merged per resource name."""
    out = copy.deepcopy(base or {})
    for section in ("requests", "limits", "claims"):
        if section in (override or {}):
            if section == "claims":
                out[section] = copy.deepcopy(override[section])
            else:
                out[section] = {**(out.get(section) or {}), **override[section]}
    return out


def kueue_admit(
    trainjob: dict[str, Any],
    *,
    flavor_tolerations: list[dict[str, Any]] | None = None,
    flavor_node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob as Kueue v0.17 leaves it when it admits it on a ResourceFlavor: its webhook's runtime
    patch (manager ``kueue.x-k8s.io/manager``, appended last) filled with the flavor's node labels and
    tolerations for every replicated job, and ``suspend`` false."""
    out = copy.deepcopy(trainjob)
    pod: dict[str, Any] = {}
    if flavor_node_selector:
        pod["nodeSelector"] = dict(flavor_node_selector)
    if flavor_tolerations:  # omitempty: no tolerations, no key, and the list before stays
        pod["tolerations"] = copy.deepcopy(flavor_tolerations)
    patch = {
        "manager": KUEUE_PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]
                }
            }
        },
    }
    out["spec"].setdefault("runtimePatches", []).append(patch)
    out["spec"]["suspend"] = False
    return out


def jobset_spec(trainjob: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet spec Trainer v2.3.0 creates for ``trainjob`` on ``runtime``."""
    if trainjob["spec"]["runtimeRef"]["name"] != runtime["metadata"]["name"]:
        raise ValueError("the TrainJob names another runtime")
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    order = [r["name"] for r in spec["replicatedJobs"]]
    for patch in trainjob["spec"].get("runtimePatches") or []:
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        if "spec" in template:
            spec = strategic_merge(spec, template["spec"])
    spec["replicatedJobs"].sort(key=lambda r: order.index(r["name"]))
    trainer = trainjob["spec"].get("trainer") or {}
    name = trainjob["metadata"]["name"]
    volcano = "volcano" in (runtime["spec"].get("podGroupPolicy") or {})
    for rjob in spec["replicatedJobs"]:
        labels = (rjob["template"].get("metadata") or {}).get("labels") or {}
        if labels.get(ANCESTOR_LABEL) != "trainer":
            continue
        nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
        rjob["replicas"] = 1
        job = rjob["template"]["spec"]
        job["parallelism"] = job["completions"] = nodes
        job["completionMode"] = "Indexed"
        pod_template = job["template"]
        if volcano:
            pod_template.setdefault("metadata", {}).setdefault("annotations", {})[
                VOLCANO_GROUP_ANNOTATION
            ] = name
        for container in pod_template["spec"]["containers"]:
            if container["name"] != NODE:
                continue
            for key in ("image", "command", "args"):
                if key in trainer:
                    container[key] = trainer[key]
            if "resourcesPerNode" in trainer:
                container["resources"] = merge_resources(
                    container.get("resources"), trainer["resourcesPerNode"]
                )
            container["env"] = _upsert(container.get("env") or [], trainer.get("env") or [], "name")
            container["env"] = _upsert(
                container["env"],
                [
                    {"name": "PET_NNODES", "value": str(nodes)},
                    {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
                    {
                        "name": "PET_NODE_RANK",
                        "valueFrom": {
                            "fieldRef": {
                                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                            }
                        },
                    },
                    {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
                    {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
                ],
                "name",
            )
            container["ports"] = _upsert(
                container.get("ports") or [], [{"containerPort": TRAINER_PORT}], "containerPort"
            )
    return spec


def pod_templates(trainjob: dict[str, Any], runtime: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod templates of the trainer's replicated job, one per node (identical but for the index)."""
    for rjob in jobset_spec(trainjob, runtime)["replicatedJobs"]:
        if rjob["name"] == NODE:
            job = rjob["template"]["spec"]
            return [job["template"]] * job["parallelism"]
    raise ValueError("the runtime has no node job")


def job_name(jobset: str, replicated_job: str, job_index: int) -> str:
    return f"{jobset}-{replicated_job}-{job_index}"


def longest_pod_name(jobset: str, replicated_job: str, replicas: int, completions: int) -> str:
    """The longest pod name a replicated job's Jobs make (the last Job's last index), with the random
    suffix: what JobSet's webhook measures."""
    return f"{job_name(jobset, replicated_job, replicas - 1)}-{completions - 1}{POD_NAME_SUFFIX}"
