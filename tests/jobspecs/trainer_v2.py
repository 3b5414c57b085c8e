"""What Kubeflow Trainer v2.3.0's controller makes of a TrainJob and its runtime, for tests (no cluster here).

Written from kubeflow/trainer v2.3.0 source: ``pkg/runtime/core/trainingruntime.go`` (``mergeRuntimePatches``:
a strategic merge patch of the JobSet spec per runtime patch, replicated-job order kept),
``plugins/torch/torch.go`` (``EnforceMLPolicy``: trainer env upserted, then the ``PET_*`` env; numNodes),
``plugins/jobset/builder.go`` (``Trainer``: image, command, args, resourcesPerNode onto the ``node``
container of the trainer ancestor) and ``plugins/jobset/jobset.go`` (``SyncParallelCount``: parallelism =
completions = numNodes). The strategic merge follows the Kubernetes Go types' patch merge keys for the fields
trnft renders: lists of containers, volumes, env and replicated jobs merge by ``name``, volumeMounts by
``mountPath``; every other list (tolerations, command) is replaced whole; maps merge key by key.
"""

from __future__ import annotations

import copy
from typing import Any

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
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item, None)
        return out
    return copy.deepcopy(patch)


def _upsert_env(env: list[dict[str, Any]], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [dict(e) for e in env]
    for entry in entries:
        at = next((i for i, e in enumerate(out) if e["name"] == entry["name"]), None)
        if at is None:
            out.append(dict(entry))
        else:
            out[at] = dict(entry)
    return out


def jobset_spec(trainjob: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet spec the controller would create for ``trainjob`` on ``runtime``."""
    assert trainjob["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    order = [r["name"] for r in spec["replicatedJobs"]]
    for patch in trainjob["spec"].get("runtimePatches") or []:
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        if "spec" in template:
            spec = strategic_merge(spec, template["spec"])
    spec["replicatedJobs"].sort(key=lambda r: order.index(r["name"]))
    trainer = trainjob["spec"].get("trainer") or {}
    name = trainjob["metadata"]["name"]
    for rjob in spec["replicatedJobs"]:
        labels = (rjob["template"].get("metadata") or {}).get("labels") or {}
        if labels.get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer":
            continue
        nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
        rjob["template"]["spec"]["parallelism"] = rjob["template"]["spec"]["completions"] = nodes
        rjob["template"]["spec"]["completionMode"] = "Indexed"
        for container in rjob["template"]["spec"]["template"]["spec"]["containers"]:
            if container["name"] != "node":
                continue
            for key in ("image", "command", "args"):
                if key in trainer:
                    container[key] = trainer[key]
            if "resourcesPerNode" in trainer:
                container["resources"] = trainer["resourcesPerNode"]
            container["env"] = _upsert_env(container.get("env") or [], trainer.get("env") or [])
            container["env"] = _upsert_env(
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
                    {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                    {"name": "PET_MASTER_PORT", "value": "29500"},
                ],
            )
    return spec


def pod_templates(trainjob: dict[str, Any], runtime: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod templates of the trainer's replicated job, one per node (they are identical but for the index)."""
    for rjob in jobset_spec(trainjob, runtime)["replicatedJobs"]:
        if rjob["name"] == "node":
            job = rjob["template"]["spec"]
            return [job["template"]] * job["parallelism"]
    raise AssertionError("no node job")
