"""The admission rules the controllers' objects cross (trnft.jobspecs.admission), each pinned to its upstream
source and shown to fail on the input it exists for; every example's TrainJobs pass them at 1, 2 and the
largest node count.

The upstream facts (read at the tags named; the tests cannot reach them, so they are written here):
- sigs.k8s.io/jobset v0.12.0 pkg/webhooks/jobset_webhook.go: ``ruleNameFmt =
  "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"``, ``minRuleNameLength = 1``, ``maxRuleNameLength = 128``,
  ``validOnJobFailureReasons`` (batchv1.JobReasonBackoffLimitExceeded, DeadlineExceeded, FailedIndexes,
  MaxFailedIndexesExceeded, PodFailurePolicy), the Job and pod name checks with IsDNS1035Label on
  ``GenJobName(js, rjob, replicas-1)`` and ``GenPodName(js, rjob, replicas-1, completions-1) + "-abcde"``.
- sigs.k8s.io/jobset v0.12.0 pkg/util/placement/placement.go: ``GenJobName`` ``%s-%s-%d``, ``GenPodName``
  ``%s-%s-%s-%s``.
- Kubeflow Trainer v2.3.0 go.mod builds with sigs.k8s.io/jobset v0.12.0; its TrainJob CRD carries the CEL
  rule ``size(self.metadata.name) <= 63``.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import pytest
import yaml

from trnft.common.config.run_config import MAX_NODES, load_config
from trnft.common.errors import ConfigError
from trnft.jobspecs import admission, controllers, trainjob
from trnft.jobspecs.render import render, runtime_document
from trnft.jobspecs.validate import TRAINER_CRD_DIR, document_problems, trainjob_runtime_problems

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTER_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "smoke.yaml")


def test_the_rules_are_the_upstream_ones():
    assert admission.RULE_NAME_PATTERN.pattern == "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert admission.RULE_NAME_LENGTH == (1, 128)
    assert admission.JOB_FAILURE_REASONS == (
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        "FailedIndexes",
        "MaxFailedIndexesExceeded",
        "PodFailurePolicy",
    )
    assert admission.GATED_RESTART_JOB_ACTIONS == ("RestartJob", "RestartJobAndIgnoreMaxRestarts")
    assert controllers.job_name("js", "node", 0) == "js-node-0"
    assert controllers.longest_pod_name("js", "node", 1, 12) == "js-node-0-11-abcde"
    for rule in admission.ALL_RULES:  # every rule says where it comes from: a tagged file and a function
        assert " v" in rule.source and ("/" in rule.source or ".go" in rule.source), rule


def test_the_vendored_runtime_crd_embeds_the_jobset_failure_policy_without_checking_rule_names():
    """Why the webhook rules are needed: the ClusterTrainingRuntime CRD accepts any rule name."""
    crd = yaml.safe_load(
        gzip.decompress(
            (TRAINER_CRD_DIR / "trainer.kubeflow.org_clustertrainingruntimes.yaml.gz").read_bytes()
        )
    )
    jobset = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "template"
    ]["properties"]["spec"]["properties"]
    name = jobset["failurePolicy"]["properties"]["rules"]["items"]["properties"]["name"]
    assert "pattern" not in name and "x-kubernetes-validations" not in name


def _rendered(example: str, nodes: int, extra: list[str] = ()) -> tuple[list, dict]:
    overrides = [f"cluster.num_nodes={nodes}", *extra]
    if nodes > 1:
        overrides.append("cluster.zone=us-west-2a")
    cfg = load_config(EXAMPLES / example, overrides)
    docs = [(name, d) for name, text in render(cfg).items() for d in yaml.safe_load_all(text) if d]
    return docs, runtime_document(cfg).body()


@pytest.mark.parametrize("nodes", [1, 2, MAX_NODES])
@pytest.mark.parametrize("example", CLUSTER_EXAMPLES)
def test_every_example_passes_every_webhook_at_1_2_and_the_largest_node_count(example, nodes):
    docs, runtime = _rendered(example, nodes)
    assert document_problems(runtime) == []
    assert trainjob_runtime_problems(docs, runtime) == []
    trainjobs = [d for _, d in docs if d["kind"] == "TrainJob"]
    assert trainjobs
    for doc in trainjobs:
        spec = controllers.jobset_spec(doc, runtime)
        assert spec["replicatedJobs"][0]["template"]["spec"]["completions"] == nodes
        assert admission.jobset_problems(doc["metadata"]["name"], spec) == []
    docs, _ = _rendered(example, nodes, ["cluster.operator=pytorchjob"])
    assert all(admission.pytorchjob_problems(d) == [] for _, d in docs if d["kind"] == "PyTorchJob")


def _jobset() -> tuple[str, dict]:
    docs, runtime = _rendered("llama31_8b_lora_trn1.yaml", 2)
    train = next(d for _, d in docs if d["kind"] == "TrainJob" and d["metadata"]["name"].endswith("-train"))
    return train["metadata"]["name"], controllers.jobset_spec(train, runtime)


def _rules(spec):
    return spec["failurePolicy"]["rules"]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda s: _rules(s)[1].__setitem__("name", "permanent-exit"), "'permanent-exit' is refused"),
        (lambda s: _rules(s)[1].__setitem__("name", "_exit"), "'_exit' is refused"),
        (lambda s: _rules(s)[1].__setitem__("name", "x" * 129), "129 characters; 1 to 128 allowed"),
        (lambda s: _rules(s)[1].__setitem__("name", _rules(s)[0]["name"]), "are all named 'evicted'"),
        (
            lambda s: _rules(s)[2].__setitem__("onJobFailureReasons", ["Evicted"]),
            "'Evicted' is not a Job failure",
        ),
        (lambda s: _rules(s)[0].__setitem__("onJobFailureMessagePatterns", ["index (0|2$"]), "missing )"),
        (lambda s: _rules(s)[0].__setitem__("action", "RestartJobAndIgnoreMaxRestarts"), "RestartJob gate"),
        (
            lambda s: _rules(s)[0].__setitem__("targetReplicatedJobs", ["worker"]),
            "'worker' is not a replicated",
        ),
        (
            lambda s: s["failurePolicy"].__setitem__("restartStrategy", "InPlaceRestart"),
            "InPlaceRestart needs",
        ),
        (lambda s: s["replicatedJobs"][0].__setitem__("dependsOn", [{"name": "x"}]), "must not be set"),
        (lambda s: s["replicatedJobs"][0].__setitem__("name", "n" * 35), "pod name"),
        (lambda s: s["replicatedJobs"][0].__setitem__("name", "n" * 45), "Job name"),
    ],
)
def test_each_jobset_rule_fails_on_the_input_it_exists_for(mutate, words):
    name, spec = _jobset()
    assert admission.jobset_problems(name, spec) == []
    spec = copy.deepcopy(spec)
    mutate(spec)
    problems = admission.jobset_problems(name, spec)
    assert any(words in message for _, message in problems), problems
    assert all(admission.JOBSET_TAG in message for _, message in problems)


def test_a_64_character_pod_name_is_refused_and_63_is_not():
    _, spec = _jobset()  # 2 nodes: pods <jobset>-node-0-1-abcde, 15 characters after the JobSet name
    assert admission.jobset_problems("j" * 48, spec) == []
    (problem,) = admission.jobset_problems("j" * 49, spec)
    assert "pod name" in problem[1] and "64 characters, more than 63" in problem[1]


def test_the_hyphenated_rule_names_of_the_last_release_are_refused_on_the_runtime():
    _, runtime = _rendered("llama31_8b_lora_trn1.yaml", 1)
    runtime = copy.deepcopy(runtime)
    for rule, old in zip(
        runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"][1:],
        ["permanent-exit", "retryable-exit"],
    ):
        rule["name"] = old
    problems = document_problems(runtime)
    assert len(problems) == 2 and all("is refused" in m and "jobset_webhook.go" in m for _, m in problems)


def test_a_trainjob_whose_pods_would_be_named_too_long_is_refused_at_render():
    long_name = "r" * 40  # run.name allows 40; <name>-compile-node-0-10-abcde is 64 at 11 nodes
    cfg = load_config(
        EXAMPLES / "llama31_8b_lora_trn1.yaml",
        [f"run.name={long_name}", "cluster.num_nodes=10", "cluster.zone=us-west-2a"],
    )
    render(cfg)  # 10 nodes: 63 characters, admitted
    cfg = load_config(
        EXAMPLES / "llama31_8b_lora_trn1.yaml",
        [f"run.name={long_name}", "cluster.num_nodes=11", "cluster.zone=us-west-2a"],
    )
    with pytest.raises(ConfigError) as refused:
        render(cfg)
    message = str(refused.value)
    assert message.startswith("run.name / cluster.num_nodes:") and "would never start" in message
    assert "64 characters" in message and "\n" not in message


def test_the_trainjob_name_limit_of_the_crd_rule():
    docs, runtime = _rendered("llama31_8b_lora_trn1.yaml", 1)
    train = copy.deepcopy(next(d for _, d in docs if d["kind"] == "TrainJob"))
    train["metadata"]["name"] = "t" * 64
    problems = admission.trainjob_problems(train, runtime)
    assert any("trainjob_types.go" in m and "64 characters" in m for _, m in problems)


def test_node_counts_above_the_largest_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"cluster\.num_nodes"):
        load_config(EXAMPLES / "llama31_8b_lora_trn1.yaml", [f"cluster.num_nodes={MAX_NODES + 1}"])


# -- Kueue's runtime patch (v0.17) and the pods' tolerations --------------------------------------------


def test_a_flavor_with_its_own_tolerations_replaces_the_pods_and_one_that_carries_trnfts_keeps_them():
    overrides = [
        "cluster.gang_scheduler=kueue",
        "cluster.queue=training",
        "cluster.tolerations=[{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]",
    ]
    docs, runtime = _rendered("llama31_8b_lora_trn1.yaml", 2, overrides)
    train = next(d for _, d in docs if d["kind"] == "TrainJob" and d["metadata"]["name"].endswith("-train"))
    ours = controllers.pod_templates(train, runtime)[0]["spec"]["tolerations"]
    assert [t["key"] for t in ours] == ["dedicated", "aws.amazon.com/neuron"]

    # A flavor without tolerations: Kueue's patch has none, the pods keep trnft's.
    admitted = controllers.kueue_admit(train, flavor_node_selector={"pool": "trn1"})
    pod = controllers.pod_templates(admitted, runtime)[0]["spec"]
    assert pod["tolerations"] == ours and pod["nodeSelector"]["pool"] == "trn1"

    # A flavor with its own: the list is replaced whole, the accelerator toleration is gone (README, Kueue).
    spot = {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
    admitted = controllers.kueue_admit(train, flavor_tolerations=[spot])
    assert controllers.pod_templates(admitted, runtime)[0]["spec"]["tolerations"] == [spot]

    # The flavor the jobspec note asks for (its own plus trnft's): nothing is lost.
    admitted = controllers.kueue_admit(train, flavor_tolerations=[spot, *ours])
    assert controllers.pod_templates(admitted, runtime)[0]["spec"]["tolerations"] == [spot, *ours]
    assert trainjob_runtime_problems([("train", admitted)], runtime) == []


def test_the_jobspec_note_lists_the_tolerations_a_kueue_flavor_must_carry(tmp_path, capsys):
    from trnft.common import cli

    args = ["jobspec", "--config", str(EXAMPLES / "llama31_8b_lora_trn1.yaml"), "--out", str(tmp_path / "o")]
    overrides = ["cluster.gang_scheduler=kueue", "cluster.queue=training"]
    assert cli.main([*args, *overrides]) == 0
    out = capsys.readouterr().out
    assert "Kueue v0.17 or later" in out
    assert (
        'must also carry [{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}]'
        in out
    )


# -- Trainer v2.3.0 behaviour the model follows, each a difference from v2.2 ------------------------------


def test_the_model_follows_trainer_v2_3_0():
    docs, runtime = _rendered(
        "llama31_8b_lora_trn1.yaml", 2, ["cluster.gang_scheduler=volcano", "cluster.queue=q"]
    )
    train = next(d for _, d in docs if d["kind"] == "TrainJob" and d["metadata"]["name"].endswith("-train"))
    pod = controllers.pod_templates(train, runtime)[0]
    (container,) = pod["spec"]["containers"]
    # torch plugin: port 29500 (v2.3.0 torch.go EnforceMLPolicy, apply.UpsertPort).
    assert container["ports"] == [{"containerPort": 29500}]
    # volcano plugin: the pod group annotation (v2.3.0 volcano.go EnforcePodGroupPolicy).
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == train["metadata"]["name"]
    # resourcesPerNode merges per key (v2.3.0 trainingruntime.go newRuntimeInfo; v2.2 replaced the block).
    base = {"requests": {"cpu": "4", "example.com/fpga": "1"}, "limits": {"example.com/fpga": "1"}}
    merged = controllers.merge_resources(base, {"requests": {"cpu": "8"}})
    assert merged == {"requests": {"cpu": "8", "example.com/fpga": "1"}, "limits": {"example.com/fpga": "1"}}
    assert trainjob.RULE_EVICTED == "evicted"
