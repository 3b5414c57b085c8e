"""How a gang's pod failures become a JobSet action: a model of the Kubernetes Job controller and of JobSet's
failure policy, for tests (no cluster here).

Job controller (kubernetes ``pkg/controller/job/pod_failure_policy.go`` ``matchPodFailurePolicy``, and
``job_controller.go``): failed pods are taken in the order the controller sees them; for each, the first
podFailurePolicy rule that matches decides. ``FailJob`` fails the Job at once with reason ``PodFailurePolicy``
and the message ``Container <c> for pod <ns>/<pod> failed with exit code <n> matching FailJob rule at index
<i>`` (or ``Pod <ns>/<pod> has condition <type> matching FailJob rule at index <i>``); ``Ignore`` does not
count the pod; ``Count`` or no matching rule counts it, and more counted failures than ``backoffLimit`` fail
the Job with ``BackoffLimitExceeded``. The first failure recorded is the Job's: later pods change nothing.
``onExitCodes`` looks at the named container (any container when none is named); ``In`` matches a listed
code, ``NotIn`` an unlisted non-zero one.

JobSet v0.12.0 (``pkg/controllers/failure_policy.go`` ``executeFailurePolicy``, ``ruleIsApplicable``,
``anyMatchFound``): the first rule whose reasons and message patterns (RE2; at least one must match)
match the failed Job applies; no rule: ``RestartJobSet``. ``RestartJobSetAndIgnoreMaxRestarts`` does not
count toward ``maxRestarts``; ``RestartJobSet`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

COUNTED_ACTIONS = {"RestartJobSet": True, "RestartJobSetAndIgnoreMaxRestarts": False}


@dataclass
class FailedPod:
    name: str
    exit_code: int
    conditions: dict[str, str] = field(default_factory=dict)  # type -> status
    container: str = "node"


def _rule_matches(rule: dict[str, Any], pod: FailedPod) -> str | None:
    """The failure message text a matching rule writes, or None."""
    if "onExitCodes" in rule:
        codes = rule["onExitCodes"]
        if codes.get("containerName") not in (None, pod.container):
            return None
        listed = pod.exit_code in codes["values"]
        if (codes["operator"] == "In" and listed) or (
            codes["operator"] == "NotIn" and not listed and pod.exit_code
        ):
            return (
                f"Container {pod.container} for pod default/{pod.name} failed with exit code {pod.exit_code}"
            )
        return None
    for wanted in rule.get("onPodConditions") or []:
        if pod.conditions.get(wanted["type"]) == wanted.get("status", "True"):
            return f"Pod default/{pod.name} has condition {wanted['type']}"
    return None


def job_failure(job: dict[str, Any], pods_in_order: list[FailedPod]) -> tuple[str, str] | None:
    """(reason, message) of the Job's Failed condition after these pod failures, or None."""
    rules = (job.get("podFailurePolicy") or {}).get("rules") or []
    counted = 0
    for pod in pods_in_order:
        for index, rule in enumerate(rules):
            text = _rule_matches(rule, pod)
            if text is None:
                continue
            if rule["action"] == "FailJob":
                return "PodFailurePolicy", f"{text} matching FailJob rule at index {index}"
            if rule["action"] == "Ignore":
                break
            counted += 1  # Count
            break
        else:
            counted += 1
        if counted > int(job.get("backoffLimit", 6)):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(policy: dict[str, Any], reason: str, message: str) -> tuple[str, bool]:
    """(action, whether the restart counts toward maxRestarts) for a child Job that failed so."""
    for rule in policy.get("rules") or []:
        reasons = rule.get("onJobFailureReasons") or []
        patterns = rule.get("onJobFailureMessagePatterns") or []
        if reasons and reason not in reasons:
            continue
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        return rule["action"], COUNTED_ACTIONS.get(rule["action"], False)
    return "RestartJobSet", True
