"""Kubeflow Trainer v2 documents: the ClusterTrainingRuntime of an instance type, and the TrainJob of a stage.
The values are computed here; ``trainjob.yaml.j2`` and ``clustertrainingruntime.yaml.j2`` write the documents,
with the pod partial every operator's objects share (``_pod.yaml.j2``).

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
  TrainJobs always give the number (:func:`trainjob_values`).
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

import dataclasses
import signal
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class RuntimeValues:
    """What clustertrainingruntime.yaml.j2 places besides the node pod (render.Document.pod): a
    ClusterTrainingRuntime for every trnft run on one instance type.

    It holds what is the same for every run on that hardware: the node selector, the accelerator
    toleration, a whole node's resources (a TrainJob's ``resourcesPerNode`` replaces them), /dev/shm, the
    failure policies. What differs per run (volumes, zone, service account, grace period, labels) comes in
    the TrainJob's runtimePatches."""

    ml_policy: dict[str, Any]
    pod_group_policy: dict[str, Any] | None
    failure_policy: dict[str, Any] = field(default_factory=jobset_failure_policy)
    child_backoff_limit: int = 0  # any failed pod fails the child Job; the JobSet policy decides what next
    child_pod_failure_policy: dict[str, Any] = field(
        default_factory=lambda: child_job_failure_policy(NODE, permanent_exit_codes())
    )
    replicated_job_labels: dict[str, str] = field(default_factory=lambda: {ANCESTOR_LABEL: ANCESTOR_TRAINER})
    node: str = NODE
    api_version: str = API_VERSION


def runtime_values(volcano: bool) -> RuntimeValues:
    return RuntimeValues(
        ml_policy={"numNodes": 1, "torch": {}}, pod_group_policy={"volcano": {}} if volcano else None
    )


def runtime_labels(accelerator: str) -> dict[str, str]:
    return {
        "trainer.kubeflow.org/framework": "torch",
        "app.kubernetes.io/name": "trnft",
        "trnft.dev/accelerator": accelerator,
    }


def permanent_exit_codes() -> list[int]:
    return list(range(1, FIRST_RETRYABLE))


@dataclass(frozen=True)
class TrainJobValues:
    """What trainjob.yaml.j2 places besides the stage's pod (render.Document.pod, whose image, command, env
    and resources go to ``spec.trainer``): the runtime it names and ``patch_pod``, the rest of the pod
    (labels, annotations, placement, the run's volumes) that the runtime patch adds; /dev/shm comes from the
    runtime."""

    runtime_ref: dict[str, str]
    nodes: int
    nproc_per_node: int
    patch_pod: Any  # a render.Pod with only what the patch may set
    jobset_annotations: dict[str, str] | None = None
    patch_manager: str = PATCH_MANAGER
    node: str = NODE
    api_version: str = API_VERSION


def trainjob_values(
    *, runtime: str, pod: Any, nodes: int, nproc_per_node: int, volcano_queue: str | None
) -> TrainJobValues:
    """Split ``pod`` (a :class:`trnft.jobspecs.render.Pod`) into what ``spec.trainer`` sets and what the
    runtime patch adds. The patch repeats the runtime's accelerator toleration (``tolerations`` has no merge
    key and is replaced whole), adds only node selectors beyond the runtime's instance type, and gives the
    ``node`` container no env (Trainer's webhook refuses one)."""
    extra_selector = {k: v for k, v in pod.node_selector.items() if k != "node.kubernetes.io/instance-type"}
    patch = dataclasses.replace(
        pod,
        container_name=NODE,
        image=None,
        image_pull_policy=None,
        command=None,
        env=None,
        resources=None,
        security_context=None,
        restart_policy=None,
        scheduler_name=None,
        node_selector=extra_selector or None,
        volume_mounts=[m for m in pod.volume_mounts if m["name"] != "shm"],
        volumes=[v for v in pod.volumes if v["name"] != "shm"],
    )
    return TrainJobValues(
        runtime_ref={"apiGroup": API_GROUP, "kind": RUNTIME_KIND, "name": runtime},
        nodes=nodes,
        nproc_per_node=nproc_per_node,
        patch_pod=patch,
        jobset_annotations={VOLCANO_QUEUE_ANNOTATION: volcano_queue} if volcano_queue else None,
    )
