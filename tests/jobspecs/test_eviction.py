"""An eviction never spends a restart, whichever rank's failure the Job controller records first.

When one pod of a gang is evicted, every rank agrees to stop (trnft.common.stop), saves the step and exits
143, but only the evicted pod carries ``DisruptionTarget``. The failures are replayed through a model of the
Job controller and of JobSet's failure policy (tests/jobspecs/failure_model.py) in both orders.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from trnft.common import stop
from trnft.common.config.run_config import load_config
from trnft.jobspecs import trainjob
from trnft.jobspecs.render import runtime_document

from .failure_model import FailedPod, job_failure, jobset_action

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _runtime(example: str = "llama31_8b_lora_trn1.yaml") -> tuple[dict, dict]:
    """(the child Job spec, the JobSet failure policy) of a 2-node runtime, as rendered."""
    cfg = load_config(EXAMPLES / example, ["cluster.num_nodes=2", "cluster.zone=us-west-2a"])
    body = yaml.safe_load(yaml.safe_dump(runtime_document(cfg).body()))
    jobset = body["spec"]["template"]["spec"]
    return jobset["replicatedJobs"][0]["template"]["spec"], jobset["failurePolicy"]


EVICTED = FailedPod("train-node-0-1-x7k2p", trainjob.STOPPED_EXIT, {"DisruptionTarget": "True"})
ITS_PEER = FailedPod("train-node-0-0-q9f3c", trainjob.STOPPED_EXIT)


def test_every_rank_exits_with_the_code_the_stop_rule_matches():
    assert stop.Stopped(signal.SIGTERM).exit_code == trainjob.STOPPED_EXIT == 143


@pytest.mark.parametrize(
    "example", ["llama31_8b_lora_trn1.yaml", "llama31_8b_lora_p5.yaml", "llama31_8b_lora_trn2_native.yaml"]
)
@pytest.mark.parametrize("order", ["evicted first", "its peer first"])
def test_an_eviction_restarts_the_gang_without_counting(example, order):
    job, policy = _runtime(example)
    pods = [EVICTED, ITS_PEER] if order == "evicted first" else [ITS_PEER, EVICTED]
    reason, message = job_failure(job, pods)
    assert reason == "PodFailurePolicy"
    assert jobset_action(policy, reason, message) == ("RestartJobSetAndIgnoreMaxRestarts", False)


def test_the_policy_before_the_stop_rule_counted_an_eviction_seen_second():
    """The defect this rule fixes: without rule 2, the non-evicted rank's 143 is a counted failure."""
    job, policy = _runtime()
    job = {**job, "podFailurePolicy": {"rules": job["podFailurePolicy"]["rules"][:2]}}
    policy = {**policy, "rules": [dict(r) for r in policy["rules"]]}
    policy["rules"][0]["onJobFailureMessagePatterns"] = [trainjob.failjob_pattern(trainjob.EVICTED_RULE)]
    assert jobset_action(policy, *job_failure(job, [EVICTED, ITS_PEER])) == (
        "RestartJobSetAndIgnoreMaxRestarts",
        False,
    )
    assert jobset_action(policy, *job_failure(job, [ITS_PEER, EVICTED])) == ("RestartJobSet", True)


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # The evicted pod ran out of its grace and was killed: still an eviction.
        (
            [FailedPod("a", 137, {"DisruptionTarget": "True"}), ITS_PEER],
            ("RestartJobSetAndIgnoreMaxRestarts", False),
        ),
        # A rank killed by the kernel (OOM) or a lost peer: retryable, counted.
        ([FailedPod("a", 137), FailedPod("b", 200)], ("RestartJobSet", True)),
        # A configuration error: no restart.
        ([FailedPod("a", 2), ITS_PEER], ("FailJobSet", False)),
    ],
)
def test_other_failures_keep_their_class(pods, expected):
    job, policy = _runtime()
    assert jobset_action(policy, *job_failure(job, pods)) == expected
