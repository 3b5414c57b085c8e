"""Submitting a rendered stage and waiting for it: ``trnft submit FILE`` and ``trnft wait FILE``.

Both read the job's kind, name and namespace from the rendered spec file and talk to the cluster through
``kubectl`` (so they use the user's kubeconfig and credentials exactly as ``kubectl apply`` does).

* ``wait`` polls the job's status and returns as soon as it is decided: 0 when it succeeded, 1 as soon as
  it failed (naming the reason and where to look), :data:`EXIT_TIMEOUT` when ``--timeout`` passes first
  (the job keeps running; the wait only stops watching). ``kubectl wait --for=condition=complete`` cannot
  do this: a failed Job never becomes complete, so it waits out its whole timeout.
* ``submit`` applies the file. A Job's pod template is immutable, so a job of the same name that already
  finished (a failed attempt, or an earlier success being redone) is deleted first with foreground
  cascading (its pods are gone before the new job starts) and then applied; a job that is still running
  is left alone and refused, so two attempts never write the same run directory. Every stage skips work
  that is already complete, so resubmitting a finished stage is safe.

The decision is :func:`job_state` over the object ``kubectl get -o json`` returns, tested on status objects
of every kind and outcome. A TrainJob's own status does not say why it cannot start, so :func:`observe` looks
further (Kubeflow Trainer v2.3.0, Kueue v0.17, JobSet v0.12.0):

* a JobSet the Trainer controller could not create (its webhook denied it) leaves no condition, only a
  Warning event ``TrainJobResourcesCreationFailed`` on the TrainJob (``trainjob_controller.go``): once the
  TrainJob is older than :data:`CREATION_GRACE_S` with no JobSet, the event's message is the failure;
* a TrainJob Kueue has not admitted is suspended; the Workload (label ``kueue.x-k8s.io/job-uid``) says why
  (its ``QuotaReserved`` condition's message);
* a JobSet restart (an eviction, a retryable failure) shows as ``restarts`` and ``restartsCountTowardsMax``
  on the JobSet, against ``failurePolicy.maxRestarts``.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..common.errors import TrnftError

EXIT_FAILED = 1
EXIT_TIMEOUT = 124  # as timeout(1) reports it
# kubectl cannot reach or authenticate to the cluster in a way retrying will not fix (no kubeconfig, a missing
# credential plugin, a forbidden namespace): not the job's failure (sysexits' EX_UNAVAILABLE).
EXIT_KUBECTL = 69
# kubectl failures that pass by themselves: the API server restarting or overloaded, the network, a token that
# expired and is refreshed by the credential plugin on the next call. `wait` retries them until --timeout.
TRANSIENT_KUBECTL = (
    "connection refused",
    "was refused",
    "connection reset",
    "i/o timeout",
    "tls handshake timeout",
    "timeout awaiting response headers",
    "the server is currently unable to handle the request",
    "service unavailable",
    "too many requests",
    "etcdserver",
    "unexpected eof",
    "http2: client connection lost",
    "no route to host",
    "did not answer",
    "unauthorized",
)
# Consecutive Unauthorized answers after which the credential is wrong rather than expiring.
UNAUTHORIZED_RETRIES = 3
MAX_BACKOFF_S = 300.0
# The resource names kubectl takes for the kinds trnft renders.
RESOURCES = {
    "Job": "jobs.batch",
    "PyTorchJob": "pytorchjobs.kubeflow.org",
    "TrainJob": "trainjobs.trainer.kubeflow.org",
    "RayJob": "rayjobs.ray.io",
}
JOBSET_RESOURCE = "jobsets.jobset.x-k8s.io"
WORKLOAD_RESOURCE = "workloads.kueue.x-k8s.io"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
KUEUE_PATCH_MANAGER = "kueue.x-k8s.io/manager"
CREATION_FAILED_REASON = "TrainJobResourcesCreationFailed"
# How long the Trainer controller may take to create a TrainJob's JobSet before a missing one, with an event
# that says creation failed, is the job's failure (the controller retries, so a webhook that was briefly
# unreachable heals inside this).
CREATION_GRACE_S = 120.0

Kubectl = Callable[[Sequence[str]], subprocess.CompletedProcess]


@dataclass(frozen=True)
class JobRef:
    kind: str
    name: str
    namespace: str
    file: Path | None = None

    @property
    def resource(self) -> str:
        return f"{RESOURCES[self.kind]}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class JobState:
    """Where a job stands: ``phase`` is succeeded, failed, running or waiting (not yet admitted or
    scheduled); ``detail`` is one line for the user. ``never_started``: no pod of it was ever created (its
    resources were refused, or it is still suspended), so a new spec can replace it safely."""

    phase: str
    detail: str
    never_started: bool = False

    @property
    def finished(self) -> bool:
        return self.phase in ("succeeded", "failed")


def read_job_ref(file: Path) -> tuple[JobRef | None, list[dict[str, Any]]]:
    """The Job, PyTorchJob, TrainJob or RayJob a rendered spec file holds (None for the ConfigMap file), and its documents."""
    if not file.is_file():
        raise TrnftError(f"{file}: no such spec file; render the specs with `trnft jobspec` first")
    try:
        docs = [d for d in yaml.safe_load_all(file.read_text()) if d]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TrnftError(f"{file}: not a YAML spec file ({type(exc).__name__}); render it again") from exc
    if not docs:
        raise TrnftError(
            f"{file}: holds no Kubernetes object (an empty file); render it again with `trnft jobspec`"
        )
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") in RESOURCES]
    if len(jobs) > 1:
        raise TrnftError(f"{file}: holds {len(jobs)} jobs; trnft renders one per stage file")
    if not jobs:
        if not all(isinstance(d, dict) and d.get("kind") for d in docs):
            raise TrnftError(f"{file}: not a Kubernetes spec file")
        return None, docs
    meta = jobs[0].get("metadata") or {}
    if not meta.get("name"):
        raise TrnftError(f"{file}: the {jobs[0]['kind']} has no metadata.name")
    return JobRef(jobs[0]["kind"], meta["name"], meta.get("namespace") or "default", file), docs


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind and str(condition.get("status")) == "True":
            return condition
    return None


def _why(condition: dict[str, Any]) -> str:
    reason, message = condition.get("reason") or "", (condition.get("message") or "").strip()
    return (
        ": ".join(p for p in (reason, message.splitlines()[0] if message else "") if p) or "no reason given"
    )


def job_state(obj: dict[str, Any]) -> JobState:
    """Decide a Job's, PyTorchJob's or TrainJob's state from its ``status`` (as ``kubectl get -o json`` shows it)."""
    kind = obj.get("kind")
    status = obj.get("status") or {}
    if kind == "Job":
        if done := _condition(status, "Complete"):
            return JobState("succeeded", f"complete at {done.get('lastTransitionTime', '?')}")
        # FailureTarget comes first (k8s 1.31+: pods still terminating), then Failed.
        failed = _condition(status, "Failed") or _condition(status, "FailureTarget")
        if failed:
            return JobState("failed", _why(failed))
        if _condition(status, "Suspended") or (obj.get("spec") or {}).get("suspend"):
            return JobState(
                "waiting",
                "suspended (waiting for admission, e.g. by Kueue)",
                never_started=not status.get("active"),
            )
        active, failures = status.get("active") or 0, status.get("failed") or 0
        retried = f", {failures} failed attempt(s) so far" if failures else ""
        if active:
            return JobState("running", f"{active} pod(s) running{retried}")
        return JobState("waiting", f"no pod running yet{retried}")
    if kind == "PyTorchJob":
        if _condition(status, "Succeeded"):
            return JobState("succeeded", "succeeded")
        if failed := _condition(status, "Failed"):
            return JobState("failed", _why(failed))
        if _condition(status, "Suspended"):
            return JobState("waiting", "suspended (waiting for admission, e.g. by Kueue)")
        if restarting := _condition(status, "Restarting"):
            return JobState("running", f"restarting after a retryable failure ({_why(restarting)})")
        if _condition(status, "Running"):
            replicas = status.get("replicaStatuses") or {}
            active = sum(int((r or {}).get("active") or 0) for r in replicas.values())
            return JobState("running", f"{active} pod(s) running")
        return JobState("waiting", "created, pods not running yet (scheduling or pulling the image)")
    if kind == "TrainJob":
        # Trainer v2.3.0 copies the JobSet's Completed/Failed conditions as Complete/Failed
        # (plugins/jobset Status) and counts the child Jobs in jobsStatus.
        if _condition(status, "Complete"):
            return JobState("succeeded", "complete")
        if failed := _condition(status, "Failed"):
            return JobState("failed", _why(failed))
        jobs = status.get("jobsStatus") or []
        if _condition(status, "Suspended") or (obj.get("spec") or {}).get("suspend"):
            active = sum(int(j.get("active") or 0) for j in jobs)
            return JobState(
                "waiting", "suspended (waiting for admission, e.g. by Kueue)", never_started=not active
            )
        ready = sum(int(j.get("ready") or 0) for j in jobs)
        active = sum(int(j.get("active") or 0) for j in jobs)
        if ready:
            return JobState("running", f"{ready} child job(s) with every pod ready")
        if active:
            return JobState("running", f"{active} child job(s) active, pods starting")
        return JobState("waiting", "created, pods not running yet (scheduling or pulling the image)")
    if kind == "RayJob":
        return _rayjob_state(obj)
    raise TrnftError(f"{obj.get('kind')!r} is not a Job, PyTorchJob, TrainJob or RayJob")


# KubeRay v1.7.0's failure reasons (rayjob_types.go JobFailedReason), in words a user can act on.
RAYJOB_FAILURES = {
    "SubmissionFailed": "the submitter could not run the entrypoint on the Ray cluster",
    "DeadlineExceeded": "spec.activeDeadlineSeconds passed",
    "PreRunningDeadlineExceeded": "spec.preRunningDeadlineSeconds passed before the Ray job ran",
    "AppFailed": "the entrypoint (trnft ray) failed",
    "ValidationFailed": "KubeRay refused the spec",
    "JobStatusCheckTimeoutExceeded": "KubeRay could not read the Ray job's status for too long",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "the Ray job ended but the RayJob never finished",
}


def _rayjob_state(obj: dict[str, Any]) -> JobState:
    """A KubeRay RayJob: ``jobDeploymentStatus`` (the RayJob), ``jobStatus`` (the Ray job), ``reason`` and
    ``message`` (rayjob_types.go, v1.7.0)."""
    status = obj.get("status") or {}
    deployment, ray_job = status.get("jobDeploymentStatus") or "", status.get("jobStatus") or ""
    message = (status.get("message") or "").strip()
    last_line = message.splitlines()[-1] if message else ""
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and ray_job != "SUCCEEDED"):
        reason = status.get("reason") or ("AppFailed" if ray_job in ("FAILED", "STOPPED") else "")
        what = RAYJOB_FAILURES.get(reason, "failed")
        detail = f"{reason or deployment}: {what}" + (f": {last_line}" if last_line else "")
        return JobState("failed", detail, never_started=deployment == "ValidationFailed")
    if deployment == "Complete":
        return JobState("succeeded", f"complete at {status.get('endTime', '?')}")
    if deployment in ("Suspended", "Suspending") or (obj.get("spec") or {}).get("suspend"):
        return JobState("waiting", "suspended (waiting for admission, e.g. by Kueue)", never_started=True)
    cluster = status.get("rayClusterStatus") or {}
    ready, desired = (
        int(cluster.get("readyWorkerReplicas") or 0),
        int(cluster.get("desiredWorkerReplicas") or 0),
    )
    if deployment == "Retrying":
        return JobState(
            "running", f"retrying the whole RayJob on a new cluster ({last_line or 'after a failure'})"
        )
    if deployment == "Running":
        if ray_job == "RUNNING":
            return JobState("running", f"Ray job running on {ready} of {desired} worker pod(s)")
        return JobState(
            "running", f"Ray cluster ready, Ray job {ray_job or 'not yet'} submitted (submitter starting)"
        )
    if deployment == "Initializing":
        return JobState(
            "waiting",
            f"Ray cluster not ready: {ready} of {desired} worker pod(s) ready (scheduling or pulling the image)",
        )
    return JobState("waiting", "created, not yet picked up by the KubeRay operator", never_started=True)


class KubectlError(TrnftError):
    """kubectl failed. ``transient``: worth retrying; otherwise access is broken (:data:`EXIT_KUBECTL`)."""

    def __init__(self, message: str, *, transient: bool, unauthorized: bool = False) -> None:
        super().__init__(message)
        self.exit_code = EXIT_FAILED if transient else EXIT_KUBECTL
        self.transient = transient
        self.unauthorized = unauthorized


KUBECTL_TIMEOUT_S = 120.0


def run_kubectl(args: Sequence[str], timeout_s: float = KUBECTL_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as exc:
        raise KubectlError(
            "kubectl is not on PATH; install it and point it at the cluster", transient=False
        ) from exc
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            ["kubectl", *args], 1, "", f"kubectl did not answer in {timeout_s:.0f} s"
        )


def kubectl_until(deadline: float, clock: Callable[[], float] = time.monotonic) -> Kubectl:
    """:func:`run_kubectl` with each call bounded by what is left until ``deadline`` (at least 1 s, at most
    kubectl's own :data:`KUBECTL_TIMEOUT_S`), so a hanging API server cannot hold ``--timeout`` up."""

    def call(args: Sequence[str]) -> subprocess.CompletedProcess:
        return run_kubectl(args, timeout_s=min(KUBECTL_TIMEOUT_S, max(1.0, deadline - clock())))

    return call


def _kubectl_error(proc: subprocess.CompletedProcess, what: str) -> KubectlError:
    text = (proc.stderr or proc.stdout or "").strip()
    lines = text.splitlines()
    last = lines[-1] if lines else "no output"
    lowered = text.lower()
    unauthorized = "unauthorized" in lowered
    transient = any(pattern in lowered for pattern in TRANSIENT_KUBECTL)
    fix = (
        ""
        if transient
        else "; check kubectl's context, credentials and credential plugin (`kubectl auth whoami`)"
    )
    return KubectlError(
        f"kubectl {what} failed (exit {proc.returncode}): {last}{fix}",
        transient=transient,
        unauthorized=unauthorized,
    )


def get_job(ref: JobRef, kubectl: Kubectl = run_kubectl) -> dict[str, Any] | None:
    """The job as the cluster has it, or None when the API server says it does not exist."""
    return _get_json(kubectl, [ref.resource, "-n", ref.namespace], ref.resource)


def _get_json(
    kubectl: Kubectl, args: list[str], what: str, *, optional_kind: bool = False
) -> dict[str, Any] | None:
    """``kubectl get ... -o json``; None when the API server says NotFound (only its own answer: "exec:
    executable aws not found", a credential plugin missing, also says "not found"), or, with
    ``optional_kind``, when the cluster serves no such kind (no Kueue, say)."""
    proc = kubectl(["get", *args, "-o", "json"])
    if proc.returncode != 0:
        err = proc.stderr or ""
        if "(NotFound)" in err or (optional_kind and "the server doesn't have a resource type" in err):
            return None
        raise _kubectl_error(proc, f"get {what}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise TrnftError(f"kubectl get {what} did not print JSON") from exc


def _age_s(obj: dict[str, Any], now: float) -> float | None:
    created = (obj.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return None
    try:
        stamp = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return None
    return now - stamp.timestamp()


def _creation_failure(ref: JobRef, kubectl: Kubectl) -> str | None:
    """The newest ``TrainJobResourcesCreationFailed`` event message of the TrainJob, or None."""
    selector = f"involvedObject.kind=TrainJob,involvedObject.name={ref.name},reason={CREATION_FAILED_REASON}"
    events = _get_json(kubectl, ["events", "-n", ref.namespace, "--field-selector", selector], "events") or {}
    items = [e for e in events.get("items") or [] if e.get("reason") == CREATION_FAILED_REASON]
    if not items:
        return None
    newest = max(items, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return " ".join(str(newest.get("message") or "no message").split())


def _kueue_reason(ref: JobRef, obj: dict[str, Any], kubectl: Kubectl) -> str:
    """Why Kueue keeps this TrainJob suspended, from its Workload."""
    patches = (obj.get("spec") or {}).get("runtimePatches") or []
    if not any((p or {}).get("manager") == KUEUE_PATCH_MANAGER for p in patches):
        return (
            f"suspended by Kueue, which added no {KUEUE_PATCH_MANAGER} runtime patch: Kueue v0.14-v0.16 "
            "cannot place Trainer v2.3 TrainJobs (they write podTemplateOverrides); upgrade Kueue to v0.17+"
        )
    uid = (obj.get("metadata") or {}).get("uid")
    found = _get_json(
        kubectl,
        [WORKLOAD_RESOURCE, "-n", ref.namespace, "-l", f"{KUEUE_JOB_UID_LABEL}={uid}"],
        "workloads",
        optional_kind=True,
    )
    workloads = (found or {}).get("items") or []
    if not workloads:
        return "suspended by Kueue: no Workload yet"
    conditions = {c.get("type"): c for c in (workloads[0].get("status") or {}).get("conditions") or []}
    for kind, status in (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False")):
        condition = conditions.get(kind)
        if condition and str(condition.get("status")) == status and condition.get("message"):
            return f"suspended by Kueue: {' '.join(str(condition['message']).split())}"
    return "suspended by Kueue: waiting for admission"


def _restarts(jobset: dict[str, Any]) -> str:
    status = jobset.get("status") or {}
    restarts = int(status.get("restarts") or 0)
    if not restarts:
        return ""
    counted = int(status.get("restartsCountTowardsMax") or 0)
    limit = ((jobset.get("spec") or {}).get("failurePolicy") or {}).get("maxRestarts")
    of = f" of maxRestarts {limit}" if limit is not None else ""
    return f"restarted {restarts} time(s), {counted}{of} counted (evictions are not)"


def observe(
    ref: JobRef, obj: dict[str, Any], kubectl: Kubectl = run_kubectl, now: Callable[[], float] = time.time
) -> JobState:
    """:func:`job_state`, and for a TrainJob what its status cannot say: a JobSet that was never created
    (failed after :data:`CREATION_GRACE_S`, quoting the controller's event), Kueue's reason for keeping it
    suspended, and the JobSet's restarts."""
    state = job_state(obj)
    if ref.kind != "TrainJob" or state.finished:
        return state
    if state.phase == "waiting" and (obj.get("spec") or {}).get("suspend"):
        if KUEUE_QUEUE_LABEL in ((obj.get("metadata") or {}).get("labels") or {}):
            return JobState("waiting", _kueue_reason(ref, obj, kubectl), never_started=state.never_started)
        return state
    jobset = _get_json(kubectl, [f"{JOBSET_RESOURCE}/{ref.name}", "-n", ref.namespace], f"jobset {ref.name}")
    if jobset is None:
        failure = _creation_failure(ref, kubectl)
        age = _age_s(obj, now())
        if failure and (age is None or age >= CREATION_GRACE_S):
            return JobState(
                "failed",
                f"{CREATION_FAILED_REASON}: the Trainer controller could not create the JobSet: {failure}",
                never_started=True,
            )
        why = f" (latest event: {failure})" if failure else ""
        return JobState("waiting", f"JobSet not created yet{why}", never_started=True)
    restarts = _restarts(jobset)
    if not restarts:
        return state
    if state.phase == "waiting" or "pods starting" in state.detail:
        return JobState("running", f"restarting: {restarts}")
    return JobState(state.phase, f"{state.detail}; {restarts}")


POD_SELECTORS = {
    "Job": "batch.kubernetes.io/job-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
    # The JobSet a TrainJob runs on has the TrainJob's name and labels every pod with it.
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",
    # The submitter Job KubeRay names as the RayJob; its pod prints the driver's log, the workers' included.
    "RayJob": "batch.kubernetes.io/job-name",
}


def failed_pod(ref: JobRef, kubectl: Kubectl = run_kubectl) -> str | None:
    """The first pod of the job that failed (phase Failed, or a container that ended non-zero), by finish
    time; None when none is left or kubectl cannot tell. With ``cleanPodPolicy: Running`` the operator
    deletes a PyTorchJob's still-running Master when a Worker fails, so the failed one is the pod to read."""
    try:
        proc = kubectl(
            ["get", "pods", "-n", ref.namespace, "-l", f"{POD_SELECTORS[ref.kind]}={ref.name}", "-o", "json"]
        )
        pods = json.loads(proc.stdout).get("items", []) if proc.returncode == 0 else []
    except (KubectlError, json.JSONDecodeError, AttributeError):
        return None
    failed: list[tuple[str, str]] = []
    for pod in pods:
        status = pod.get("status") or {}
        ended = [
            (c.get("state") or {}).get("terminated") or {} for c in status.get("containerStatuses") or []
        ]
        bad = [t for t in ended if t.get("exitCode", 0) != 0]
        if status.get("phase") == "Failed" or bad:
            finished = min((t.get("finishedAt") or "~" for t in bad), default="~")
            failed.append((finished, (pod.get("metadata") or {}).get("name", "?")))
    return min(failed)[1] if failed else None


def _hints(ref: JobRef, pod: str | None = None) -> str:
    # A Job's logs by the job; a PyTorchJob's from the pod that failed, else its Master (<job>-master-0); a
    # TrainJob's pod names end in a random suffix, so by label, each line prefixed with its pod.
    if pod:
        logs = pod
    elif ref.kind in ("Job", "RayJob"):
        logs = f"job/{ref.name}"
    elif ref.kind == "TrainJob":
        logs = f"-l {POD_SELECTORS['TrainJob']}={ref.name} --prefix"
    else:
        logs = f"{ref.name}-master-0"
    return (
        f"see `kubectl describe {ref.resource} -n {ref.namespace}` and "
        f"`kubectl logs -n {ref.namespace} {logs} --tail=50`"
    )


def wait(
    ref: JobRef,
    *,
    timeout_s: float,
    interval_s: float,
    log: Callable[[str], None],
    kubectl: Kubectl = run_kubectl,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.time,
) -> int:
    """Poll ``ref`` until it succeeds (0), fails (:data:`EXIT_FAILED`) or ``timeout_s`` passes
    (:data:`EXIT_TIMEOUT`). A job that does not exist is an error: apply it first.

    A transient kubectl failure (see :data:`TRANSIENT_KUBECTL`) is retried with doubling pauses (up to
    :data:`MAX_BACKOFF_S`) until the deadline; Unauthorized :data:`UNAUTHORIZED_RETRIES` times in a row, or
    any other kubectl failure, is a :class:`KubectlError` with :data:`EXIT_KUBECTL`."""
    deadline = clock() + timeout_s
    last = None
    failures = unauthorized = 0
    while True:
        try:
            obj = get_job(ref, kubectl)
        except KubectlError as exc:
            unauthorized = unauthorized + 1 if exc.unauthorized else 0
            if not exc.transient or unauthorized >= UNAUTHORIZED_RETRIES:
                raise KubectlError(str(exc), transient=False) from exc
            failures += 1
            remaining = deadline - clock()
            if remaining <= 0:
                log(f"{ref}: kubectl kept failing until --timeout ({exc}); the job itself is unknown")
                return EXIT_TIMEOUT
            pause = min(interval_s * 2 ** (failures - 1), MAX_BACKOFF_S, remaining)
            log(f"{ref}: {exc}; retrying in {format_duration(pause)} (transient, attempt {failures})")
            sleep(pause)
            continue
        failures = unauthorized = 0
        if obj is None:
            raise TrnftError(f"{ref}: not found in the cluster; submit it first (`trnft submit {ref.file}`)")
        try:
            state = observe(ref, obj, kubectl, now)
        except KubectlError as exc:
            if not exc.transient:
                raise
            state = job_state(obj)  # the extra look failed this time; the job's own status still holds
        if state != last:
            log(f"{ref}: {state.phase}: {state.detail}")
            last = state
        if state.phase == "succeeded":
            return 0
        if state.phase == "failed" and state.never_started:
            log(
                f"{ref}: failed before any pod existed; fix the cause (`trnft jobspec --validate`), then "
                f"`trnft submit {ref.file}` replaces it"
            )
            return EXIT_FAILED
        if state.phase == "failed":
            pod = failed_pod(ref, kubectl)
            named = f"pod {pod} failed; " if pod else ""
            log(
                f"{ref}: failed ({state.detail}); {named}{_hints(ref, pod)}; fix the cause, then "
                f"`trnft submit {ref.file}` reruns it"
            )
            return EXIT_FAILED
        remaining = deadline - clock()
        if remaining <= 0:
            log(
                f"{ref}: still {state.phase} after {format_duration(timeout_s)} (--timeout); the job keeps "
                f"running, this wait stopped watching; {_hints(ref)}"
            )
            return EXIT_TIMEOUT
        sleep(min(interval_s, remaining))


def submit(
    ref: JobRef | None, file: Path, *, log: Callable[[str], None], kubectl: Kubectl = run_kubectl
) -> None:
    """Apply ``file``; a finished job of the same name is deleted first (foreground cascading)."""
    if ref is not None:
        obj = get_job(ref, kubectl)
        if obj is not None:
            state = observe(ref, obj, kubectl)
            if not state.finished and not state.never_started:
                raise TrnftError(
                    f"{ref}: is still {state.phase} ({state.detail}); wait for it (`trnft wait {file}`) or "
                    f"delete it (`kubectl delete {ref.resource} -n {ref.namespace}`) before submitting again"
                )
            earlier = "never started" if state.never_started else f"{state.phase} earlier"
            log(f"{ref}: {earlier} ({state.detail}); deleting it and its pods before applying again")
            proc = kubectl(
                [
                    "delete",
                    ref.resource,
                    "-n",
                    ref.namespace,
                    "--cascade=foreground",
                    "--wait=true",
                    "--ignore-not-found",
                ]
            )
            if proc.returncode != 0:
                raise _kubectl_error(proc, f"delete {ref.resource}")
    proc = kubectl(["apply", "-f", str(file)])
    if proc.returncode != 0:
        raise _kubectl_error(proc, f"apply -f {file}")
    for line in (proc.stdout or "").strip().splitlines():
        log(line)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str, flag: str) -> float:
    """``90``, ``45s``, ``30m``, ``2h``, ``1d12h`` -> seconds (> 0)."""
    text = text.strip()
    match = _DURATION.match(f"{text}s" if text.isdigit() else text)  # plain digits are seconds
    if not text or match is None:
        raise TrnftError(f"{flag}: {text!r} is not a duration; write e.g. 45s, 30m, 2h or 1d12h")
    d, h, m, sec = (int(g or 0) for g in match.groups())
    seconds = ((d * 24 + h) * 60 + m) * 60 + sec
    if seconds <= 0:
        raise TrnftError(f"{flag}: must be more than 0, got {text!r}")
    return float(seconds)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def submit_command(args: Any, log: Callable[[str], None]) -> int:
    """``trnft submit FILE [--wait --timeout D]``."""
    file = Path(args.file)
    ref, _ = read_job_ref(file)
    timeout_s = parse_duration(args.timeout, "--timeout")
    interval_s = parse_duration(args.interval, "--interval")
    submit(ref, file, log=log)
    if not args.wait or ref is None:
        return 0
    kubectl = kubectl_until(time.monotonic() + timeout_s)
    return wait(ref, timeout_s=timeout_s, interval_s=interval_s, log=log, kubectl=kubectl)


def wait_command(args: Any, log: Callable[[str], None]) -> int:
    """``trnft wait FILE [--timeout D]``."""
    file = Path(args.file)
    ref, _ = read_job_ref(file)
    if ref is None:
        raise TrnftError(f"{file}: holds no Job, PyTorchJob, TrainJob or RayJob to wait for")
    timeout_s = parse_duration(args.timeout, "--timeout")
    interval_s = parse_duration(args.interval, "--interval")
    kubectl = kubectl_until(time.monotonic() + timeout_s)
    return wait(ref, timeout_s=timeout_s, interval_s=interval_s, log=log, kubectl=kubectl)
