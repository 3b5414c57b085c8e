"""Admission rules that the CRD schemas do not hold, for the objects the controllers derive from ours.

``kubectl apply`` of a TrainJob and its runtime succeeds whatever their JobSet failure-policy rule names
are: the Trainer CRDs do not check them. Only the JobSet the Trainer controller builds crosses JobSet's
webhook, and a refusal there is a Warning event ``TrainJobResourcesCreationFailed`` on the TrainJob and no
condition (Trainer v2.3.0 ``pkg/controller/trainjob_controller.go`` ``Reconcile``): the job waits forever.
So every rule here runs on what :mod:`trnft.jobspecs.controllers` derives, before anything is applied.

Each rule names the upstream file, function and tag it comes from; ``tests/jobspecs/test_admission.py``
pins each one against the input it exists for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import controllers

JOBSET_TAG = "sigs.k8s.io/jobset v0.12.0"  # what Kubeflow Trainer v2.3.0 builds with (its go.mod)
JOBSET_WEBHOOK = f"{JOBSET_TAG} pkg/webhooks/jobset_webhook.go"


@dataclass(frozen=True)
class Rule:
    """One admission rule and where it comes from."""

    source: str
    what: str


# -- JobSet v0.12.0 pkg/webhooks/jobset_webhook.go -------------------------------------------------------

RULE_NAME = Rule(f"{JOBSET_WEBHOOK} validateFailurePolicy (ruleNameFmt)", "failure-policy rule name")
RULE_NAME_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
RULE_NAME_LENGTH = (1, 128)  # minRuleNameLength, maxRuleNameLength
RULE_UNIQUE = Rule(f"{JOBSET_WEBHOOK} validateFailurePolicy (ruleNameToRulesWithName)", "unique rule names")
FAILURE_REASONS = Rule(f"{JOBSET_WEBHOOK} validOnJobFailureReasons", "known Job failure reasons")
# batchv1.JobReason* as the webhook lists them.
JOB_FAILURE_REASONS = (
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
)
MESSAGE_PATTERNS = Rule(
    f"{JOBSET_TAG} pkg/controllers/failure_policy.go anyMatchFound",
    "message patterns compile (one that does not is logged and never matches)",
)
TARGET_JOBS = Rule(f"{JOBSET_WEBHOOK} validateFailurePolicy", "rule targets name replicated jobs")
# Feature gates of v0.12.0 pkg/features/features.go, both Alpha and off by default.
GATED_ACTIONS = Rule(
    f"{JOBSET_WEBHOOK} validateFailurePolicy (features.RestartJob, default off)", "RestartJob actions gated"
)
GATED_RESTART_JOB_ACTIONS = ("RestartJob", "RestartJobAndIgnoreMaxRestarts")
GATED_STRATEGY = Rule(
    f"{JOBSET_WEBHOOK} ValidateCreate (features.InPlaceRestart, default off)", "InPlaceRestart gated"
)
JOB_NAME_LENGTH = Rule(f"{JOBSET_WEBHOOK} ValidateCreate (jobNameTooLongErrorMsg)", "child Job names")
POD_NAME_LENGTH = Rule(f"{JOBSET_WEBHOOK} ValidateCreate (podNameTooLongErrorMsg)", "pod names")
DEPENDS_ON_FIRST = Rule(f"{JOBSET_WEBHOOK} ValidateCreate", "the first replicated job depends on nothing")

# -- Kubernetes apimachinery validation (IsDNS1035Label) and the Trainer CRD's CEL rule ----------------

DNS_1035 = Rule(
    "k8s.io/apimachinery v0.36.0 (jobset v0.12.0 go.mod) pkg/util/validation/validation.go IsDNS1035Label",
    "DNS-1035 label",
)
DNS_1035_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL = 63
TRAINJOB_NAME = Rule(
    "kubeflow/trainer v2.3.0 pkg/apis/trainer/v1alpha1/trainjob_types.go (XValidation size(name) <= 63)",
    "TrainJob name length",
)
SERVICE_NAME = Rule(
    f"{JOBSET_TAG} pkg/controllers/jobset_controller.go (headless Service named by the subdomain or the "
    "JobSet; Services are DNS-1035 labels)",
    "Service name",
)

ALL_RULES = (
    RULE_NAME,
    RULE_UNIQUE,
    FAILURE_REASONS,
    MESSAGE_PATTERNS,
    TARGET_JOBS,
    GATED_ACTIONS,
    GATED_STRATEGY,
    JOB_NAME_LENGTH,
    POD_NAME_LENGTH,
    DEPENDS_ON_FIRST,
    DNS_1035,
    TRAINJOB_NAME,
    SERVICE_NAME,
)


def _by(rule: Rule, message: str) -> str:
    return f"{message} ({rule.source})"


def dns1035_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS-1035 label (a Service, Job or pod name), or None."""
    if len(value) > MAX_LABEL:
        return f"{value!r} is {len(value)} characters, more than {MAX_LABEL}"
    if not DNS_1035_PATTERN.match(value):
        return f"{value!r} is not a DNS-1035 label (lower-case letters, digits, '-', starting with a letter)"
    return None


def failure_policy_problems(
    policy: dict[str, Any] | None, rjob_names: set[str], at: str
) -> list[tuple[str, str]]:
    """JobSet v0.12.0's ``validateFailurePolicy`` (and the controller's pattern matching) on one policy."""
    problems: list[tuple[str, str]] = []
    if not policy:
        return problems
    if policy.get("restartStrategy") == "InPlaceRestart":
        problems.append(
            (f"{at}.restartStrategy", _by(GATED_STRATEGY, "InPlaceRestart needs a feature gate that is off"))
        )
    seen: dict[str, list[int]] = {}
    for i, rule in enumerate(policy.get("rules") or []):
        path = f"{at}.rules.{i}"
        name = str(rule.get("name") or "")
        seen.setdefault(name, []).append(i)
        low, high = RULE_NAME_LENGTH
        if not low <= len(name) <= high:
            problems.append(
                (f"{path}.name", _by(RULE_NAME, f"{len(name)} characters; {low} to {high} allowed"))
            )
        if not RULE_NAME_PATTERN.match(name):
            problems.append(
                (
                    f"{path}.name",
                    _by(
                        RULE_NAME,
                        f"{name!r} is refused: a letter, then letters, digits, '_', ',' or ':', ending in a "
                        "letter, digit or '_' (no '-')",
                    ),
                )
            )
        if rule.get("action") in GATED_RESTART_JOB_ACTIONS:
            problems.append(
                (
                    f"{path}.action",
                    _by(GATED_ACTIONS, f"{rule['action']} needs the RestartJob gate, off by default"),
                )
            )
        for target in rule.get("targetReplicatedJobs") or []:
            if target not in rjob_names:
                problems.append(
                    (f"{path}.targetReplicatedJobs", _by(TARGET_JOBS, f"{target!r} is not a replicated job"))
                )
        for reason in rule.get("onJobFailureReasons") or []:
            if reason not in JOB_FAILURE_REASONS:
                problems.append(
                    (
                        f"{path}.onJobFailureReasons",
                        _by(FAILURE_REASONS, f"{reason!r} is not a Job failure reason"),
                    )
                )
        for pattern in rule.get("onJobFailureMessagePatterns") or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(
                    (f"{path}.onJobFailureMessagePatterns", _by(MESSAGE_PATTERNS, f"{pattern!r}: {exc}"))
                )
    for name, indexes in seen.items():
        if len(indexes) > 1:
            problems.append((f"{at}.rules", _by(RULE_UNIQUE, f"rules {indexes} are all named {name!r}")))
    return problems


def jobset_problems(name: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """JobSet v0.12.0's ``ValidateCreate`` on the JobSet ``name`` with ``spec`` (the parts trnft's
    JobSets can meet), plus the names of the Service, Jobs and pods it makes."""
    problems: list[tuple[str, str]] = []
    rjobs = spec.get("replicatedJobs") or []
    network = spec.get("network") or {}
    service = network.get("subdomain") or name
    if problem := dns1035_problem(service):
        problems.append(
            (
                "spec.network.subdomain" if network.get("subdomain") else "metadata.name",
                _by(SERVICE_NAME, problem),
            )
        )
    if rjobs and rjobs[0].get("dependsOn"):
        problems.append(("spec.replicatedJobs.0.dependsOn", _by(DEPENDS_ON_FIRST, "must not be set")))
    for i, rjob in enumerate(rjobs):
        at = f"spec.replicatedJobs.{i}"
        replicas = int(rjob.get("replicas", 1))
        job = (rjob.get("template") or {}).get("spec") or {}
        longest_job = controllers.job_name(name, rjob["name"], replicas - 1)
        if problem := dns1035_problem(longest_job):
            problems.append((f"{at}.name", _by(JOB_NAME_LENGTH, f"Job name {problem}")))
        completions = job.get("completions")
        if job.get("completionMode", "Indexed") == "Indexed" and completions is not None:
            pod = controllers.longest_pod_name(name, rjob["name"], replicas, int(completions))
            if problem := dns1035_problem(pod):
                problems.append(
                    (f"{at}.name", _by(POD_NAME_LENGTH, f"pod name {problem} at {completions} node(s)"))
                )
    problems += failure_policy_problems(
        spec.get("failurePolicy"), {r.get("name") for r in rjobs}, "spec.failurePolicy"
    )
    return problems


def trainjob_problems(trainjob: dict[str, Any], runtime: dict[str, Any]) -> list[tuple[str, str]]:
    """What stops ``trainjob`` on ``runtime`` after ``kubectl apply`` accepted both: the TrainJob name rule
    and every JobSet rule on the JobSet the Trainer controller derives (paths are the JobSet's)."""
    name = (trainjob.get("metadata") or {}).get("name") or ""
    problems: list[tuple[str, str]] = []
    if len(name) > MAX_LABEL:
        problems.append(
            ("metadata.name", _by(TRAINJOB_NAME, f"{len(name)} characters, more than {MAX_LABEL}"))
        )
    spec = controllers.jobset_spec(trainjob, runtime)
    return problems + [(f"JobSet {name}: {path}", message) for path, message in jobset_problems(name, spec)]


def pytorchjob_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """training-operator v1.9.4 names pods and Services ``<job>-<replica type>-<index>`` (lower-cased;
    ``pkg/core/utils.go`` ``GenGeneralName``): each a DNS-1035 label."""
    name = (doc.get("metadata") or {}).get("name") or ""
    problems = []
    for rtype, replica in ((doc.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
        last = f"{name}-{rtype.lower()}-{max(0, int((replica or {}).get('replicas') or 1) - 1)}"
        if problem := dns1035_problem(last):
            problems.append((f"spec.pytorchReplicaSpecs.{rtype}", _by(DNS_1035, f"pod name {problem}")))
    return problems
