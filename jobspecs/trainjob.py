"""Kubeflow Trainer v2 documents: the ClusterTrainingRuntime of an instance type, and the TrainJob of a stage.

Facts relied on (kubeflow/trainer tag v2.3.0, read from source; pinned in tests/jobspecs/test_trainjob.py):

* A TrainJob names a runtime (``spec.runtimeRef``); the controller copies the runtime's JobSet template,
  applies ``spec.runtimePatches`` to it as a strategic merge patch of the JobSet spec (lists of containers,
  volumes and volumeMounts merge by name / mountPath; ``tolerations`` has no merge key and is replaced
  whole), then ``spec.trainer`` (image, command, env, numNodes, numProcPerNode, resourcesPerNode) onto the
  container named ``node`` of the replicated job labelled ``trainer.kubeflow.org/trainjob-ancestor-step:
  trainer`` (pkg/runtime/core/trainingruntime.go, plugins/torch/torch.go, plugins/jobset/builder.go).
* The torch plugin injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``
  (``<trainjob>-node-0-0.<trainjob>``) and ``PET_MASTER_PORT`` (29500) into that container; a TrainJob
  must not set them itself. ``numProcPerNode: auto`` counts only resources named like "gpu", so Trainium
  TrainJobs always give the number (:func:`trainjob_body`).
* The JobSet's job for ``node`` runs ``numNodes`` pods (parallelism = completions = numNodes, indexed).
* Webhook rules of runtimePatches: ``manager`` is a domain-prefixed path; every patched replicated job and
  container exists in the runtime; the ``node`` container gets no env through a patch (plugins/jobset).

Failure handling, the whole-gang restart PyTorchJob v1 lacks: the child Job has ``backoffLimit: 0`` (any
failed pod fails it) and a podFailurePolicy whose FailJob rules mark an eviction (rule 0), a permanent exit
code (rule 1) and the cooperative stop every rank makes after a stop signal (rule 2: exit 143). The batch Job
controller words such a failure ``... matching FailJob rule at index N`` (reason ``PodFailurePolicy``), which
the JobSet failurePolicy (JobSet v0.10+, embedded in the Trainer v2.3.0 CRDs) tells apart by message
pattern: an eviction restarts every pod without spending a restart, a permanent exit fails the TrainJob at
once, and a retryable exit (``BackoffLimitExceeded``) restarts every pod, at most
:data:`RUNTIME_MAX_RESTARTS` times.

Why rule 2: when one pod is evicted, every rank agrees to stop, saves the step and exits 143, but only the
evicted pod carries ``DisruptionTarget``. The Job controller keeps the first failure it processes, so a
non-evicted rank seen first would make the eviction a counted ``BackoffLimitExceeded`` restart. With rule 2
either order is the same free restart (``tests/jobspecs/test_eviction.py`` replays both orders through a
model of the Job and JobSet controllers). A 143 nobody evicted (``kubectl delete pod``, a node shutdown) is a
free restart too; trnft's own attempt counter (:mod:`trnft.common.pipeline.attempts`) ends a run whose
restarts make no progress, at ``cluster.backoff_limit``.
"""

from __future__ import annotations

import signal
from typing import Any

from ..common.exits import FIRST_RETRYABLE

API_VERSION = "trainer.kubeflow.org/v1alpha1"
API_GROUP = "trainer.kubeflow.org"
RUNTIME_KIND = "ClusterTrainingRuntime"
NODE = "node"  # the replicated job and its container that spec.trainer is applied to
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_TRAINER = "trainer"
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
MASTER_ENDPOINT = "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"  # expanded by the kubelet from the injected env
PATCH_MANAGER = "trnft.dev/jobspec"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod; the JobSet is named as the TrainJob
# A backstop above any sensible cluster.backoff_limit: the run directory's attempt counter (which knows
# whether a restart made progress) ends a run that keeps failing before this does.
RUNTIME_MAX_RESTARTS = 20
EVICTED_RULE, PERMANENT_RULE, STOPPED_RULE = 0, 1, 2
# What every rank exits with after a stop signal (trnft.common.stop: 128 + SIGTERM).
STOPPED_EXIT = 128 + signal.SIGTERM
# JobSet failure-policy rule names. JobSet's webhook admits only ^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$
# (no hyphens; trnft.jobspecs.admission), and the Trainer controller's JobSet is the object it checks.
RULE_EVICTED, RULE_PERMANENT, RULE_RETRYABLE = "evicted", "permanent_exit", "retryable_exit"


def runtime_name(instance_name: str, volcano: bool) -> str:
    """``trnft-trn1-32xlarge``: one runtime per instance type (and per gang scheduler)."""
    return f"trnft-{instance_name.replace('.', '-')}" + ("-volcano" if volcano else "")


def child_job_failure_policy(container: str, permanent_exit_codes: list[int]) -> dict[str, Any]:
    """The child Job's podFailurePolicy: FailJob on an eviction (rule 0), on a permanent exit (rule 1) and
    on the cooperative stop after a stop signal (rule 2); a retryable exit is the default (counted, and
    backoffLimit 0 fails the Job)."""
    return {
        "rules": [
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": container, "operator": "In", "values": permanent_exit_codes},
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": container, "operator": "In", "values": [STOPPED_EXIT]},
            },
        ]
    }


def failjob_pattern(*indexes: int) -> str:
    """A JobSet message pattern (RE2) for a Job failed by one of these FailJob rules: the batch Job
    controller's message ends ``matching FailJob rule at index N`` (kubernetes
    pkg/controller/job/pod_failure_policy.go, ``matchPodFailurePolicy``)."""
    return f"matching FailJob rule at index ({'|'.join(str(i) for i in indexes)})$"


def jobset_failure_policy() -> dict[str, Any]:
    """Whole-gang restarts: free for an eviction (whichever rank's failure the Job records), counted for a
    retryable exit, none for a permanent one."""
    return {
        "maxRestarts": RUNTIME_MAX_RESTARTS,
        # New pods only once every old one is gone: their accelerators and the rendezvous port are free.
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {
                "name": RULE_EVICTED,
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [failjob_pattern(EVICTED_RULE, STOPPED_RULE)],
            },
            {
                "name": RULE_PERMANENT,
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [failjob_pattern(PERMANENT_RULE)],
            },
            {
                "name": RULE_RETRYABLE,
                "action": "RestartJobSet",
                "onJobFailureReasons": ["BackoffLimitExceeded"],
            },
        ],
    }


def runtime_body(
    *,
    name: str,
    accelerator: str,
    instance_name: str,
    image: str,
    node_resources: dict[str, Any],
    tolerations: list[dict[str, Any]],
    shm_volume: dict[str, Any],
    shm_mount: dict[str, Any],
    ipc_lock: bool,
    volcano: bool,
) -> dict[str, Any]:
    """A ClusterTrainingRuntime (metadata and spec) for every trnft run on ``instance_name``.

    It holds what is the same for every run on that hardware: the node selector, the accelerator
    toleration, a whole node's resources (a TrainJob's ``resourcesPerNode`` replaces them), /dev/shm, the
    failure policies. What differs per run (volumes, zone, service account, grace period, labels) comes in
    the TrainJob's runtimePatches.
    """
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required with a podFailurePolicy
        "nodeSelector": {"node.kubernetes.io/instance-type": instance_name},
        "tolerations": tolerations,
    }
    if volcano:
        pod_spec["schedulerName"] = "volcano"
    container: dict[str, Any] = {
        "name": NODE,
        # A default: every TrainJob sets spec.trainer.image (the CRD requires one here).
        "image": image,
        # Trainer v2.3.0 patches no pull policy per TrainJob; images are pinned by digest (trnft jobspec).
        "imagePullPolicy": "IfNotPresent",
        "resources": node_resources,
        "volumeMounts": [shm_mount],
    }
    if ipc_lock:
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}  # EFA pins memory
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [shm_volume]
    spec: dict[str, Any] = {"mlPolicy": {"numNodes": 1, "torch": {}}}
    if volcano:
        spec["podGroupPolicy"] = {"volcano": {}}
    spec["template"] = {
        "spec": {
            "failurePolicy": jobset_failure_policy(),
            "replicatedJobs": [
                {
                    "name": NODE,
                    "replicas": 1,
                    "template": {
                        "metadata": {"labels": {ANCESTOR_LABEL: ANCESTOR_TRAINER}},
                        "spec": {
                            "backoffLimit": 0,
                            "podFailurePolicy": child_job_failure_policy(NODE, permanent_exit_codes()),
                            "template": {
                                # Long accelerator jobs must not be consolidated away mid-run.
                                "metadata": {"annotations": {"karpenter.sh/do-not-disrupt": "true"}},
                                "spec": pod_spec,
                            },
                        },
                    },
                }
            ],
        }
    }
    return {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_KIND,
        "metadata": {
            "name": name,
            "labels": {
                "trainer.kubeflow.org/framework": "torch",
                "app.kubernetes.io/name": "trnft",
                "trnft.dev/accelerator": accelerator,
            },
            "annotations": {"trnft.dev/instance-type": instance_name},
        },
        "spec": spec,
    }


def permanent_exit_codes() -> list[int]:
    return list(range(1, FIRST_RETRYABLE))


def trainjob_body(
    *,
    name: str,
    namespace: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    runtime: str,
    pod: Any,
    nodes: int,
    nproc_per_node: int,
    volcano_queue: str | None,
) -> dict[str, Any]:
    """A TrainJob for one stage: ``pod`` (a :class:`trnft.jobspecs.render.Pod`) split into what
    ``spec.trainer`` sets and what the runtime patch adds; the pod's CPU-stage volumes (run storage, run
    config) are patched in, /dev/shm comes from the runtime."""
    own_volumes = [v for v in pod.volumes if v["name"] != "shm"]
    own_mounts = [m for m in pod.volume_mounts if m["name"] != "shm"]
    pod_spec: dict[str, Any] = {}
    if pod.service_account:
        pod_spec["serviceAccountName"] = pod.service_account
    if pod.termination_grace_seconds:
        pod_spec["terminationGracePeriodSeconds"] = pod.termination_grace_seconds
    extra_selector = {k: v for k, v in pod.node_selector.items() if k != "node.kubernetes.io/instance-type"}
    if extra_selector:
        pod_spec["nodeSelector"] = extra_selector
    if pod.affinity:
        pod_spec["affinity"] = pod.affinity
    # Replaced whole by the patch (no merge key): the runtime's accelerator toleration is repeated here.
    pod_spec["tolerations"] = pod.tolerations
    pod_spec["containers"] = [{"name": NODE, "volumeMounts": own_mounts}]
    pod_spec["volumes"] = own_volumes
    template: dict[str, Any] = {
        "spec": {
            "replicatedJobs": [
                {
                    "name": NODE,
                    "template": {
                        "spec": {
                            "template": {
                                "metadata": {"labels": pod.labels, "annotations": pod.annotations},
                                "spec": pod_spec,
                            }
                        }
                    },
                }
            ]
        }
    }
    if volcano_queue:
        template = {"metadata": {"annotations": {VOLCANO_QUEUE_ANNOTATION: volcano_queue}}, **template}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "runtimeRef": {"apiGroup": API_GROUP, "kind": RUNTIME_KIND, "name": runtime},
            "trainer": {
                "image": pod.image,
                "command": pod.command,
                "env": pod.env,
                "numNodes": nodes,
                "numProcPerNode": nproc_per_node,
                "resourcesPerNode": pod.resources,
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": template}}],
        },
    }
