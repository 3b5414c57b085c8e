"""KubeRay RayJobs (``cluster.operator: rayjob``): the pinned upstream CRD they validate against, the rules
KubeRay's webhook and controller apply beyond it, what the documents hold, and how `trnft wait` reads a
RayJob's status."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import shlex
from pathlib import Path

import pytest
import yaml

from trnft.common.cluster import ray_train
from trnft.common.cluster.instances import instance, training_layout
from trnft.common.config.run_config import load_config
from trnft.common.errors import ConfigError, TrnftError
from trnft.jobspecs import rayjob
from trnft.jobspecs.operate import EXIT_FAILED, JobRef, job_state, wait
from trnft.jobspecs.render import render
from trnft.jobspecs.validate import RAY_CRD_FILE, TRAINER_CRD_DIR, document_problems, ray_crd

from .test_operate import Clock, FakeKubectl, recorded

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The examples whose trainer runs under Ray Train (the FSDP2 trainer); the trn1 ones are refused.
RAY_EXAMPLES = ["llama31_8b_lora_p5.yaml", "llama31_8b_lora_trn2_native.yaml"]
XLA_EXAMPLES = ["llama31_8b_lora_trn1.yaml", "qwen3_8b_lora_trn2.yaml"]
# sha256 of ray-project/kuberay v1.7.0 ray-operator/config/crd/bases/ray.io_rayjobs.yaml (checked against the
# tag's blob when added; commit 59d663aeec13760646da3db9c1cf8cfe883e30b7).
UPSTREAM_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"
RAY = ["cluster.operator=rayjob"]


def _rayjobs(example: str, overrides: list[str]) -> dict[str, dict]:
    cfg = load_config(EXAMPLES / example, [*RAY, *overrides])
    docs = {name: yaml.safe_load(text) for name, text in render(cfg).items()}
    return {name: doc for name, doc in docs.items() if doc["kind"] == "RayJob"}


def test_the_shipped_crd_is_kuberays_v1_7_0_file_and_serves_what_trnft_writes():
    assert hashlib.sha256(gzip.decompress((TRAINER_CRD_DIR / RAY_CRD_FILE).read_bytes())).hexdigest() == (
        UPSTREAM_SHA256
    )
    crd = ray_crd()
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert crd["spec"]["group"] == "ray.io" and "v1" in served
    spec = served["v1"]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("entrypoint", "submissionMode", "backoffLimit", "submitterConfig", "shutdownAfterJobFinishes",
                  "ttlSecondsAfterFinished", "activeDeadlineSeconds", "deletionStrategy", "rayClusterSpec"):  # fmt: skip
        assert field in spec, field
    assert spec["submissionMode"]["default"] == "K8sJobMode"
    assert "backoffLimit" in spec["submitterConfig"]["properties"]
    groups = spec["rayClusterSpec"]["properties"]["workerGroupSpecs"]["items"]["properties"]
    assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(
        groups
    )


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("example", RAY_EXAMPLES)
def test_every_example_renders_rayjobs_that_validate(example, nodes):
    jobs = _rayjobs(example, [f"cluster.num_nodes={nodes}", "cluster.zone=us-west-2a"])
    cfg = load_config(EXAMPLES / example, [*RAY, f"cluster.num_nodes={nodes}", "cluster.zone=us-west-2a"])
    inst, layout = instance(cfg.cluster.instance_type), training_layout(cfg)
    expected = {"03-train.yaml"} | ({"02-compile.yaml"} if cfg.model.platform == "neuron-native" else set())
    assert set(jobs) == expected
    for doc in jobs.values():
        assert document_problems(doc) == [], doc["metadata"]["name"]
        spec, cluster = doc["spec"], doc["spec"]["rayClusterSpec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["trnft", "ray", doc["metadata"]["labels"]["trnft.dev/stage"]]
        assert argv[argv.index("--workers") + 1] == str(layout.world)
        assert spec["backoffLimit"] == 0 and spec["shutdownAfterJobFinishes"] is True
        (group,) = cluster["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == nodes
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        worker = group["template"]["spec"]["containers"][0]
        assert "command" not in head and "command" not in worker  # KubeRay writes `ray start`
        limits = worker["resources"]["limits"]
        if inst.accelerator == "gpu":
            assert limits["nvidia.com/gpu"] == str(inst.gpus) and "--per-worker" in argv
            assert argv[argv.index("--per-worker") + 1] == "GPU=1" and group["rayStartParams"] == {}
        else:
            assert limits["aws.amazon.com/neuron"] == str(inst.neuron_devices)
            # as `ray start` receives it: KubeRay pastes --resources=<value> into a bash line
            (value,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
            assert json.loads(value.removeprefix("--resources=")) == {"neuron_cores": inst.neuron_cores}
            per_rank = inst.neuron_cores // layout.nproc_per_node
            assert argv[argv.index("--per-worker") + 1] == f"neuron_cores={per_rank}"
        assert not any(
            k in head.get("resources", {}).get("limits", {})
            for k in ("nvidia.com/gpu", "aws.amazon.com/neuron")
        )
        # the same image, volumes and zone on every pod; neither may be consolidated away mid-run
        for template in (cluster["headGroupSpec"]["template"], group["template"]):
            assert template["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
        for pod in (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
            assert pod["containers"][0]["image"] == cfg.cluster.image
            assert pod["nodeSelector"]["topology.kubernetes.io/zone"] == "us-west-2a"
            assert {v["name"] for v in pod["volumes"]} >= {"run-storage", "run-config"}
        if nodes > 1:
            assert limits["vpc.amazonaws.com/efa"] == str(inst.efa)


@pytest.mark.parametrize("example", XLA_EXAMPLES)
def test_the_xla_trainer_is_refused_under_rayjob_in_one_line(example):
    with pytest.raises(
        ConfigError, match=r"^cluster\.operator: rayjob runs the FSDP2 trainer .* trainjob or pytorchjob"
    ):
        render(load_config(EXAMPLES / example, RAY))


def test_a_run_name_kuberay_would_refuse_is_refused_before_rendering():
    """neuron-native renders compile as a RayJob too, whose name is the longest; gpu's <run>-train fits any
    run.name (40 characters at most)."""
    fits = rayjob.MAX_RAYJOB_NAME - len("-compile")
    with pytest.raises(
        ConfigError, match=rf"^run\.name: the RayJob .* at most 47 .* at most {fits} characters"
    ):
        render(load_config(EXAMPLES / RAY_EXAMPLES[1], [*RAY, f"run.name={'r' * (fits + 1)}"]))
    render(load_config(EXAMPLES / RAY_EXAMPLES[1], [*RAY, f"run.name={'r' * fits}"]))
    render(load_config(EXAMPLES / RAY_EXAMPLES[0], [*RAY, f"run.name={'r' * 40}"]))


def test_runtimes_are_refused_for_rayjobs_naming_the_operator(tmp_path, capsys):
    from trnft.common import cli

    out = tmp_path / "o"
    args = ["jobspec", "--config", str(EXAMPLES / RAY_EXAMPLES[0]), "--runtimes", "--out", str(out), *RAY]
    assert cli.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cluster.operator is rayjob, which needs no runtime" in line and not out.exists()


def test_volcano_is_refused_for_rayjobs_in_one_line():
    with pytest.raises(ConfigError, match=r"^cluster\.gang_scheduler: volcano .* use kueue"):
        render(load_config(EXAMPLES / RAY_EXAMPLES[0], [*RAY, "cluster.gang_scheduler=volcano"]))


def test_kueue_admits_the_rayjob_as_a_whole():
    jobs = _rayjobs(
        RAY_EXAMPLES[0], ["cluster.gang_scheduler=kueue", "cluster.queue=team-a", "cluster.num_nodes=2"]
    )
    assert all(doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" for doc in jobs.values())


KUEUE_BROKEN = [
    (lambda d: d["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0), "spec.shutdownAfterJobFinishes"),
    (lambda d: _cluster(d).update(enableInTreeAutoscaling=True), "enableInTreeAutoscaling"),
    (lambda d: _group(d).update(groupName="head"), "groupName"),
    (lambda d: _cluster(d).update(workerGroupSpecs=[_group(d)] * 8), "workerGroupSpecs"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "path"), KUEUE_BROKEN)
def test_kueues_rayjob_webhook_rules_apply_to_queued_rayjobs(mutate, path):
    """Kueue v0.19.2's RayJob webhook (validateCreate, raycluster ValidateCreate) on what trnft renders with
    a queue: the rendered one passes, each broken one is refused; without the queue label Kueue is silent."""
    doc = copy.deepcopy(
        _rayjobs(RAY_EXAMPLES[0], ["cluster.gang_scheduler=kueue", "cluster.queue=team-a"])["03-train.yaml"]
    )
    assert rayjob.kueue_problems(doc) == []
    mutate(doc)
    assert any(path in p for p, _ in rayjob.kueue_problems(doc))
    del doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert rayjob.kueue_problems(doc) == []


def _cluster(doc):
    return doc["spec"]["rayClusterSpec"]


def _group(doc):
    return _cluster(doc)["workerGroupSpecs"][0]


# KubeRay v1.7.0: the webhook's ValidateRayJobMetadata, the controller's ValidateRayJobSpec and
# ValidateRayClusterSpec (utils/validation.go); the schema admits each of these.
BROKEN = [
    (lambda d: d["metadata"].update(name="a" * 48), "metadata.name", "no more than 47 characters"),
    (lambda d: d["metadata"].update(name="Train-job"), "metadata.name", "DNS1035"),
    (lambda d: _group(d).update(minReplicas=3, maxReplicas=2), "workerGroupSpecs[0]", "minReplicas > maxReplicas"),
    (lambda d: _group(d).pop("maxReplicas"), "workerGroupSpecs[0]", "must set minReplicas and maxReplicas"),
    (lambda d: _group(d).update(rayStartParams={"num-gpus": "8"}, resources={"GPU": "8"}), "workerGroupSpecs[0]",
     "resources in both rayStartParams and resources"),
    (lambda d: _group(d)["rayStartParams"].update(labels="a=b"), "rayStartParams.labels", "not supported"),
    (lambda d: d["spec"].update(backoffLimit=-1), "spec.backoffLimit", "non-negative"),
    (lambda d: d["spec"].update(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds", "positive"),
    (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes"),
    (lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
     "spec.suspend", "cannot be suspended"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "path", "words"), BROKEN)
def test_what_kuberay_refuses_beyond_the_schema_is_caught(mutate, path, words):
    doc = copy.deepcopy(_rayjobs(RAY_EXAMPLES[0], [])["03-train.yaml"])
    assert rayjob.rayjob_problems(doc) == []
    mutate(doc)
    problems = rayjob.rayjob_problems(doc)
    assert any(path in p and words in m for p, m in problems), problems
    assert document_problems(doc)  # what --validate runs (the schema may name a missing field first)


def test_a_schema_violation_is_named_by_its_path():
    doc = copy.deepcopy(_rayjobs(RAY_EXAMPLES[0], [])["03-train.yaml"])
    doc["spec"]["submitterConfig"]["backoffLimit"] = "two"
    assert any(p == "spec.submitterConfig.backoffLimit" for p, _ in document_problems(doc))


# --------------------------------------------------------------------------------------------------
# The entrypoint's arguments


def test_per_worker_resources_and_their_refusals():
    assert ray_train.parse_resources(None) == {"CPU": 1.0}
    assert ray_train.parse_resources(["GPU=1", "neuron_cores=2"]) == {"GPU": 1.0, "neuron_cores": 2.0}
    for bad in ("GPU", "GPU=0", "GPU=one", "=1"):
        with pytest.raises(TrnftError, match=r"--per-worker .* write RESOURCE=NUMBER"):
            ray_train.parse_resources([bad])


def test_zero_workers_is_one_line_before_any_ray_cluster_starts(capsys):
    from trnft.common import cli

    config = str(EXAMPLES / RAY_EXAMPLES[0])
    assert cli.main(["ray", "train", "--config", config, "--workers", "0"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "trnft ray: error: --workers 0: give at least 1 (the ranks of the stage)"


def test_each_neuron_worker_sees_its_nodes_cores_as_torchrun_processes_do():
    views = [("n1", "0,1"), ("n1", "2-3"), ("n2", "0,1"), ("n2", "2,3"), ("n3", None)]
    assert ray_train.shared_neuron_cores(views) == ["0,1,2,3", "0,1,2,3", "0,1,2,3", "0,1,2,3", None]


def test_only_trnft_variables_are_forwarded_to_the_workers():
    env = {"TRNFT_DEBUG": "1", "TRNFT_FAULT": "kill-during-save:6", "HOME": "/root", "OMP_NUM_THREADS": "4"}
    assert ray_train.forwarded_environment(env) == {"TRNFT_DEBUG": "1", "TRNFT_FAULT": "kill-during-save:6"}


# --------------------------------------------------------------------------------------------------
# trnft wait / submit on a RayJob


@pytest.mark.parametrize(
    ("name", "phase", "words"),
    [
        ("rayjob-created", "waiting", "not yet picked up by the KubeRay operator"),
        ("rayjob-initializing", "waiting", "Ray cluster not ready: 1 of 2 worker pod(s) ready"),
        ("rayjob-pending", "running", "Ray job PENDING submitted (submitter starting)"),
        ("rayjob-running", "running", "Ray job running on 2 of 2 worker pod(s)"),
        ("rayjob-complete", "succeeded", "complete at 2026-11-30T14:12:09Z"),
        (
            "rayjob-failed-app",
            "failed",
            "AppFailed: the entrypoint (trnft ray) failed: trnft ray: error: train",
        ),
        ("rayjob-failed-submitter", "failed", "SubmissionFailed: the submitter could not run the entrypoint"),
        ("rayjob-failed-deadline", "failed", "DeadlineExceeded: spec.activeDeadlineSeconds passed"),
        ("rayjob-validation-failed", "failed", "ValidationFailed: KubeRay refused the spec: The RayJob spec"),
        ("rayjob-suspended", "waiting", "suspended"),
        ("rayjob-retrying", "running", "retrying the whole RayJob"),
    ],
)
def test_rayjob_state_of_every_recorded_status(name, phase, words):
    state = job_state(recorded(name))
    assert state.phase == phase and words in state.detail, state
    assert "\n" not in state.detail


RAYJOB = JobRef("RayJob", "llama31-8b-lora-train", "ml", Path("03-train.yaml"))


def _wait(kubectl):
    clock, lines = Clock(), []
    code = wait(RAYJOB, timeout_s=3600.0, interval_s=20.0, log=lines.append, kubectl=kubectl, clock=clock,
                sleep=clock.sleep)  # fmt: skip
    return code, lines


@pytest.mark.parametrize(
    ("ending", "code", "words"),
    [
        ("rayjob-complete", 0, "succeeded"),
        (
            "rayjob-failed-submitter",
            EXIT_FAILED,
            "SubmissionFailed: the submitter could not run the entrypoint",
        ),
        ("rayjob-failed-deadline", EXIT_FAILED, "DeadlineExceeded: spec.activeDeadlineSeconds passed"),
    ],
)
def test_wait_follows_a_rayjob_to_its_end_in_one_line(ending, code, words):
    kubectl = FakeKubectl("rayjob-initializing", "rayjob-running", ending)
    got, lines = _wait(kubectl)
    assert got == code and words in lines[-1], lines
    assert kubectl.calls[0][:2] == ["get", "rayjobs.ray.io/llama31-8b-lora-train"]
    if code:
        assert "kubectl logs -n ml job/llama31-8b-lora-train" in lines[-1]
